"""Triton kernel for ``deploycomp::TokenCluster`` (see :mod:`deploycomp.tokens.op`).

Multi-head cross-attention of M query tokens over N key/value tokens, read straight from the op's
layouts (no transposes): q (B, M, H·Dqk), k (B, N, H·Dqk), v (B, N, H·Dv) -> out (B, M, H·Dv).

Kernel shape: one program per (block of BLOCK_M queries, batch·head); it walks the keys in BLOCK_N
blocks with an online (flash-attention style) softmax, accumulating in float32. Inputs are float32,
float16 or (launcher only, not the AOT PTX) bfloat16, and the output has the input dtype. float32 dots use ``input_precision="ieee"`` (no TF32),
so the GPU result matches the float32 reference to ~1e-5; float16 dots run on tensor cores with the
probabilities rounded to float16 before ``p @ v`` (the usual flash-attention trade, ~1e-3 relative).

Kernel parameters (order of :func:`_token_cluster_kernel`)::

    q_ptr, k_ptr, v_ptr, o_ptr          pointers (element type = dtype)            runtime
    M, N, H                             i32: queries, keys, heads                  runtime
    scale                               f32: multiplies q·kᵀ (any sign)            runtime
    stride_qb, stride_qm, stride_qc     i32 strides of q in elements (b, m, channel)
    stride_kb, stride_kn, stride_kc     i32 strides of k
    stride_vb, stride_vn, stride_vc     i32 strides of v
    stride_ob, stride_om, stride_oc     i32 strides of out
    DQK, DV                             head dims                                  constexpr
    BLOCK_M, BLOCK_N                    query / key tile                           constexpr
    BLOCK_DQ, BLOCK_DV                  head dims padded to a power of two >= 16   constexpr

Element (b, m, h·D + d) of a tensor is at ``ptr + b·stride_b + m·stride_m + (h·D + d)·stride_c``.

Ahead-of-time PTX (:func:`ptx_for`, for the TensorRT plugin) compiles a second entry,
:func:`_token_cluster_trt`, which calls the same kernel body with TensorRT's AOT calling convention:
the input pointers, then the int32 scalars, then the output pointer; nothing else. dtype, DQK, DV,
the block sizes and the softmax scale (``SCALE``: an AOT plugin cannot pass a float at run time;
it is an attribute of the ONNX node, known when the engine is built) are baked in, and so are the
channel strides (1: TensorRT's linear format has the last axis contiguous). No alignment or
divisibility hints are given, so the PTX assumes nothing about pointer alignment or the other
strides. The ``.param`` list of the ``.entry`` is, in order, :data:`AOT_PARAMS`::

    q_ptr, k_ptr, v_ptr, M, N, H,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_om,
    o_ptr, global_scratch, profile_scratch

The last two are hidden pointer parameters that Triton (3.x) appends to every kernel; this kernel
needs no scratch (``ptx_for`` checks the compiled sizes are 0), so the plugin drops them from the
entry (``kernels/trt_plugin.trt_abi``). Grid: :func:`launch_grid`; block: ``KernelPTX.num_warps * 32``
threads; dynamic shared memory: ``KernelPTX.shared_bytes`` (48 KiB for float32, 16 KiB for float16
at d=64; above 48 KiB a launcher must raise ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`` first).

PTX ISA version (the ``.version`` line): a driver refuses PTX newer than it knows
(``CUDA_ERROR_UNSUPPORTED_PTX_VERSION`` when TensorRT loads the engine's kernel), and Triton by
default writes the newest ISA its bundled ptxas knows (triton 3.8: ptxas 12.9, ISA 8.8). ``ptx_for``
therefore caps the ISA (:func:`ptx_isa_for`): at the driver's own ISA when a CUDA driver can be
queried (``cuDriverGetVersion``), otherwise at :data:`PTX_ISA_FLOOR`, the lowest ISA that can
express the arch's target: 8.0 (CUDA 12.0 drivers, r525+) for sm_80 and sm_90a; the kernel
assembles at 8.0 for both (checked by ptxas in the tests). ``.target sm_80`` for arch 80 and the
arch-specific ``.target sm_90a`` for arch 90 (loads only on 9.0 devices, so ship one PTX per arch).
float16 dots are ``mma.sync`` (BLOCK_M = 32 is below wgmma's 64 rows), float32 dots are plain FMAs.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass, field

import triton
import triton.language as tl

DEFAULT_BLOCK_M = 32
DEFAULT_BLOCK_N = 64
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 2

#: Runtime parameters of the AOT kernel entry, in ``.param`` order (see the module docstring).
AOT_PARAMS: tuple[str, ...] = (
    "q_ptr", "k_ptr", "v_ptr", "M", "N", "H",
    "stride_qb", "stride_qm", "stride_kb", "stride_kn", "stride_vb", "stride_vn", "stride_ob", "stride_om",
    "o_ptr", "global_scratch", "profile_scratch",
)
#: Hidden parameters Triton appends after the kernel's own runtime arguments.
HIDDEN_PARAMS: tuple[str, ...] = ("global_scratch", "profile_scratch")

#: Largest error allowed against ``tokens.op.token_cluster_reference`` (outputs are O(1)), as
#: (bound, kind): "abs" = max |kernel - reference| <= bound; "rel" = <= bound x max |reference|.
#: float32 dots are IEEE; float16 rounds the probabilities to 11 significant bits before p @ v;
#: bfloat16 keeps 8 bits, so 8x the float16 bound. Shared by the tests and scripts/gpu_check.py.
TOLERANCE: dict[str, tuple[float, str]] = {"float32": (1e-5, "abs"), "float16": (2e-3, "rel"),
                                           "bfloat16": (1.6e-2, "rel")}

#: Lowest PTX ISA (x10: 80 = 8.0) whose ``.target`` covers each compute capability, used when no
#: CUDA driver can be asked (PTX ISA release notes, "PTX ISA version / target" table): sm_90a needs
#: 8.0, sm_100a 8.6, sm_120a 8.7, sm_103a/sm_121a 8.8, sm_110a 9.0. 8.0 (CUDA 12.0, driver r525+) is
#: also used for sm_80-89, which would accept 7.x: every CUDA 12 driver loads it.
PTX_ISA_FLOOR: dict[int, int] = {80: 80, 86: 80, 87: 80, 89: 80, 90: 80, 100: 86, 103: 88, 110: 90, 120: 87,
                                 121: 88}


def max_error(dtype: str, ref_max_abs: float) -> float:
    """The allowed max |kernel - reference| for ``dtype`` (see :data:`TOLERANCE`)."""
    bound, kind = TOLERANCE[dtype]
    return bound * ref_max_abs if kind == "rel" else bound


def ptx_isa_of_cuda(version: str) -> int:
    """Newest PTX ISA (x10) that CUDA ``major.minor`` (a driver or a ptxas) accepts: CUDA 12.0-12.5
    shipped ISA 8.0-8.5, 12.6 kept 8.5, 12.7 8.6, 12.8 8.7, 12.9 8.8; 13.x is 9.x; 11.x is 7.x."""
    major, minor = (int(p) for p in version.split(".")[:2])
    if major >= 13:
        return 90 + 10 * (major - 13) + minor
    if major == 12:
        return 80 + minor if minor < 6 else 80 + minor - 1
    if major == 11:
        return 70 + minor
    raise ValueError(f"CUDA {version} is older than any PTX this kernel can target")


def driver_cuda_version() -> str | None:
    """CUDA version of the installed driver (``cuDriverGetVersion``, e.g. "12.8"), or None when there
    is no driver library (CPU machines). Needs no GPU context."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def ptxas_cuda_version(arch: int) -> str:
    """CUDA version of the ptxas Triton assembles with for ``arch`` (its bundled one by default)."""
    nvidia = triton.knobs.nvidia
    tool = getattr(nvidia, "ptxas_blackwell", None) if arch >= 100 else None
    return (tool or nvidia.ptxas).version


def ptx_isa_for(arch: int, driver: str | None = None, ptxas: str | None = None) -> tuple[int, str]:
    """(PTX ISA x10, why) for the AOT PTX of ``sm_<arch>``: never newer than Triton's ptxas can
    assemble; capped at the driver's ISA when a driver answers (``driver``: its CUDA version,
    default: asked), else at :data:`PTX_ISA_FLOOR`. A driver too old for the arch's target refuses."""
    ptxas = ptxas or ptxas_cuda_version(arch)
    driver = driver if driver is not None else driver_cuda_version()
    assembler = ptx_isa_of_cuda(ptxas)
    floor = PTX_ISA_FLOOR.get(arch)
    if driver:
        isa = min(assembler, ptx_isa_of_cuda(driver))
        if floor is not None and isa < floor:
            from ..errors import DeployCompError

            raise DeployCompError(f"the CUDA {driver} driver loads PTX ISA up to {isa / 10:.1f}, but sm_{arch} "
                                  f"needs {floor / 10:.1f}: update the NVIDIA driver")
        return isa, f"CUDA {driver} driver (ISA {ptx_isa_of_cuda(driver) / 10:.1f}), ptxas {ptxas}"
    if floor is None:
        raise ValueError(f"no CUDA driver to ask and no documented PTX ISA floor for sm_{arch} "
                         f"(known: {sorted(PTX_ISA_FLOOR)}); build the PTX on the GPU machine")
    return min(assembler, floor), f"no CUDA driver here: the documented floor for sm_{arch}, ptxas {ptxas}"


def _token_cluster_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    M, N, H, scale,
    stride_qb, stride_qm, stride_qc,
    stride_kb, stride_kn, stride_kc,
    stride_vb, stride_vn, stride_vc,
    stride_ob, stride_om, stride_oc,
    DQK: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of large tensors overflow int32
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < M
    mask_dq = offs_dq < DQK
    mask_dv = offs_dv < DV

    q_base = q_ptr + b * stride_qb + (h * DQK) * stride_qc
    k_base = k_ptr + b * stride_kb + (h * DQK) * stride_kc
    v_base = v_ptr + b * stride_vb + (h * DV) * stride_vc
    o_base = o_ptr + b * stride_ob + (h * DV) * stride_oc

    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_dq[None, :] * stride_qc,
                mask=mask_m[:, None] & mask_dq[None, :], other=0.0)

    qk_scale = scale * 1.4426950408889634  # softmax via exp2: e^x = 2^(x·log2 e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < N
        # k loaded transposed, (BLOCK_DQ, BLOCK_N), so that s = q @ kᵀ is a plain dot
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_dq[:, None] * stride_kc,
                     mask=mask_dq[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision="ieee", out_dtype=tl.float32) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # the first block holds >= 1 valid key, so m_new is finite from the first iteration on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vc,
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee", out_dtype=tl.float32)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_oc,
             out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])


# The launcher's kernel: a JITFunction, or an InterpretedFunction when TRITON_INTERPRET=1 was set
# before this module was imported.
_kernel = triton.jit(_token_cluster_kernel)
_token_cluster_body = _kernel  # called by the AOT entry below (interpreted too under TRITON_INTERPRET=1)


def _token_cluster_trt(
    q_ptr, k_ptr, v_ptr,
    M, N, H,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_om,
    o_ptr,
    SCALE: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The AOT entry: TensorRT's argument order (inputs, int32 scalars, output), scale and channel
    strides baked in; the body is the launcher's kernel."""
    _token_cluster_body(q_ptr, k_ptr, v_ptr, o_ptr, M, N, H, SCALE,
                        stride_qb, stride_qm, 1, stride_kb, stride_kn, 1, stride_vb, stride_vn, 1, stride_ob, stride_om, 1,
                        DQK, DV, BLOCK_M, BLOCK_N, BLOCK_DQ, BLOCK_DV)


def _block_d(d: int) -> int:
    """Head dim padded to a power of two, at least 16 (tl.dot's minimum tile)."""
    return max(16, triton.next_power_of_2(d))


def _interpreting() -> bool:
    return not isinstance(_kernel, triton.runtime.jit.JITFunction)


def launch_grid(batch: int, m: int, num_heads: int, block_m: int) -> tuple[int, int, int]:
    """Grid of the kernel: (query blocks, batch·heads, 1)."""
    return (triton.cdiv(m, block_m), batch * num_heads, 1)


def token_cluster(q, k, v, num_heads: int, scale: float, *, block_m: int = DEFAULT_BLOCK_M,
                  block_n: int = DEFAULT_BLOCK_N, num_warps: int = DEFAULT_NUM_WARPS):
    """Run TokenCluster on torch tensors: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

    Any strides are accepted (e.g. slices of a fused qkv tensor); the output is a new contiguous
    (B, M, H·Dv) tensor of the input dtype.
    """
    import torch

    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be 3-D (B, tokens, heads*dim)")
    b, m, hq = q.shape
    n, hv = k.shape[1], v.shape[2]
    if k.shape != (b, n, hq) or v.shape[:2] != (b, n):
        raise ValueError(f"inconsistent shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if num_heads <= 0 or hq % num_heads or hv % num_heads:
        raise ValueError(f"channel dims {hq}, {hv} not divisible by num_heads={num_heads}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"dtypes must all be float32, all float16 or all bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if n == 0:
        raise ValueError("softmax over zero keys is undefined")
    if not _interpreting() and not (q.is_cuda and k.is_cuda and v.is_cuda):
        raise RuntimeError("token_cluster needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    dq, dv = hq // num_heads, hv // num_heads
    out = torch.empty((b, m, hv), dtype=q.dtype, device=q.device)
    if m == 0 or b == 0:
        return out
    grid = launch_grid(b, m, num_heads, block_m)
    _kernel[grid](
        q, k, v, out, m, n, num_heads, float(scale),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        DQK=dq, DV=dv, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_DQ=_block_d(dq), BLOCK_DV=_block_d(dv), num_warps=num_warps, num_stages=DEFAULT_NUM_STAGES,
    )
    return out


_kernel_trt = triton.jit(_token_cluster_trt)


def token_cluster_aot_entry(q, k, v, num_heads: int, scale: float):
    """Run the AOT entry exactly as the TensorRT plugin launches it (contiguous tensors; inputs,
    int32 scalars from ``trt_plugin.scalar_values``, output; scale baked in): for checking its
    argument mapping under ``TRITON_INTERPRET=1`` on CPU, or on a GPU."""
    import torch

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, m, hq = q.shape
    n, hv = k.shape[1], v.shape[2]
    dq, dv = hq // num_heads, hv // num_heads
    out = torch.empty((b, m, hv), dtype=q.dtype, device=q.device)
    _kernel_trt[launch_grid(b, m, num_heads, DEFAULT_BLOCK_M)](
        q, k, v, m, n, num_heads, m * hq, hq, n * hq, hq, n * hv, hv, m * hv, hv, out,
        SCALE=float(scale), DQK=dq, DV=dv, BLOCK_M=DEFAULT_BLOCK_M, BLOCK_N=DEFAULT_BLOCK_N,
        BLOCK_DQ=_block_d(dq), BLOCK_DV=_block_d(dv), num_warps=DEFAULT_NUM_WARPS, num_stages=DEFAULT_NUM_STAGES)
    return out


@dataclass(frozen=True)
class KernelPTX:
    """PTX of one TokenCluster specialisation, with what a launcher needs besides the arguments."""

    ptx: str
    name: str                  # the .entry symbol
    num_warps: int             # block = num_warps * 32 threads
    shared_bytes: int          # dynamic shared memory to request at launch (opt-in above 48 KiB)
    block_m: int               # for launch_grid
    params: tuple[str, ...]    # every .param in order (AOT_PARAMS); the 2 hidden scratch ones are unused
    arch: int                  # compute capability, e.g. 80, 90
    scale: float               # the softmax scale baked in
    ptx_isa: int = 0           # the .version line x10 (80 = 8.0), see ptx_isa_for
    ptx_isa_reason: str = ""   # where that cap came from (driver, or the documented floor)
    constexprs: dict = field(default_factory=dict)  # what the entry was specialised with (SCALE, DQK, ...)


_DTYPES = {"float32": "*fp32", "float16": "*fp16"}


@functools.lru_cache(maxsize=None)
def _aot_fn():
    return triton.runtime.jit.JITFunction(_token_cluster_trt)


@functools.lru_cache(maxsize=None)
def ptx_for(arch: int, dtype: str, dq: int, dv: int, scale: float, ptx_isa: int | None = None) -> KernelPTX:
    """Compile the AOT entry for ``sm_<arch>`` ("float32" | "float16", head dims dq, dv, softmax scale).

    Needs no GPU: ``triton.compile`` runs to PTX (and through Triton's bundled ptxas) for an
    explicit ``GPUTarget("cuda", arch, 32)``. Needs a process without ``TRITON_INTERPRET=1``.
    ``ptx_isa`` (x10) overrides the cap of :func:`ptx_isa_for` (driver, else documented floor).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _interpreting() or triton.knobs.runtime.interpret:
        # Under TRITON_INTERPRET=1 triton.language's own helpers (tl.standard) are interpreted
        # functions too, and triton.compile fails on them; AOT needs a normal (compiling) process.
        raise RuntimeError("ptx_for cannot compile in a process running with TRITON_INTERPRET=1")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if dq <= 0 or dv <= 0:
        raise ValueError(f"head dims must be positive, got dq={dq}, dv={dv}")
    isa, reason = (ptx_isa, "given") if ptx_isa is not None else ptx_isa_for(arch)
    fn = _aot_fn()
    ptr = _DTYPES[dtype]
    constexprs = {
        "SCALE": float(scale), "DQK": dq, "DV": dv, "BLOCK_M": DEFAULT_BLOCK_M, "BLOCK_N": DEFAULT_BLOCK_N,
        "BLOCK_DQ": _block_d(dq), "BLOCK_DV": _block_d(dv),
    }
    signature = {name: "constexpr" if name in constexprs else (ptr if name.endswith("_ptr") else "i32")
                 for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": DEFAULT_NUM_WARPS, "num_stages": DEFAULT_NUM_STAGES,
                                       "ptx_version": isa})
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError("kernel unexpectedly needs Triton scratch memory, which a TensorRT plugin cannot pass")
    runtime = tuple(name for name in fn.arg_names if signature[name] != "constexpr")
    params = runtime + HIDDEN_PARAMS
    assert params == AOT_PARAMS, params
    return KernelPTX(ptx=compiled.asm["ptx"], name=md.name, num_warps=md.num_warps, shared_bytes=md.shared,
                     block_m=DEFAULT_BLOCK_M, params=params, arch=arch, scale=float(scale), ptx_isa=isa,
                     ptx_isa_reason=reason, constexprs=dict(constexprs))


__all__ = ["AOT_PARAMS", "KernelPTX", "PTX_ISA_FLOOR", "TOLERANCE", "launch_grid", "max_error", "ptx_for",
           "ptx_isa_for", "token_cluster"]
