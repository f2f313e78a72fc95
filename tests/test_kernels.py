"""The TokenCluster Triton kernel: correctness in Triton's interpreter, and its AOT PTX.

No GPU here. Correctness runs the real kernel under ``TRITON_INTERPRET=1`` on CPU tensors; that
variable must be set before triton decorates the kernel, so those cases run in one subprocess
(the rest of the suite keeps compiled-mode triton). PTX is produced in-process for sm_80 / sm_90.

Tolerances, on max |kernel - token_cluster_reference| (outputs are O(1)), are the kernel module's
``TOLERANCE`` (also used by scripts/gpu_check.py on a GPU):
  float32: 1e-5 absolute;  float16: 2e-3 x max|reference|  (bfloat16 is wrong in the interpreter).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deploycomp.errors import DeployCompError
from deploycomp.kernels.token_cluster import (PTX_ISA_FLOOR, KernelPTX, driver_cuda_version, launch_grid,
                                              max_error, ptx_for, ptx_isa_for, ptx_isa_of_cuda, token_cluster)

ROOT = Path(__file__).resolve().parents[1]

# The interpreter worker: builds each case's inputs from its seed, runs kernel and reference,
# prints one JSON line of {case name: {"err": max abs error, "ref_max": max |reference|}}.
WORKER = r"""
import json, sys
import torch
from deploycomp.kernels import token_cluster as tc
from deploycomp.tokens.op import token_cluster_reference

assert tc._interpreting(), "TRITON_INTERPRET=1 did not take effect"
torch.set_num_threads(2)


def inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt = getattr(torch, c["dtype"])
    b, m, n, h, dq, dv = c["b"], c["m"], c["n"], c["h"], c["dq"], c["dv"]
    amp = c.get("amp", 1.0)
    r = lambda *s: (amp * torch.randn(*s, generator=g)).to(dt)
    layout = c.get("layout", "contiguous")
    if layout == "contiguous":
        return r(b, m, h * dq), r(b, n, h * dq), r(b, n, h * dv)
    if layout == "fused_qkv":
        # q, k, v as slices of one (B, N, H*(2*Dqk+Dv)) projection, queries = first M tokens
        qkv = r(b, n, h * (2 * dq + dv))
        return qkv[:, :m, : h * dq], qkv[:, :, h * dq: 2 * h * dq], qkv[:, :, 2 * h * dq:]
    if layout == "channel_strided":
        # channel stride != 1: q from a (B, C, M) tensor, k from a batch-major-last tensor, v sliced
        q = r(b, h * dq, m).transpose(1, 2)
        k = r(n, b, h * dq).transpose(0, 1)
        v = r(b, n, 2 * h * dv)[:, :, ::2]
        return q, k, v
    raise ValueError(layout)


results = {}
for c in json.loads(sys.argv[1]):
    q, k, v = inputs(c)
    ref = token_cluster_reference(q, k, v, c["h"], c["scale"])
    kw = {key: c[key] for key in ("block_m", "block_n") if key in c}
    launch = tc.token_cluster_aot_entry if c.get("entry") == "aot" else tc.token_cluster
    out = launch(q, k, v, c["h"], c["scale"] * c.get("kernel_scale_factor", 1.0), **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape, (out.dtype, out.shape)
    err = (out.float() - ref.float()).abs().max().item()
    results[c["name"]] = {"err": err, "ref_max": ref.float().abs().max().item(),
                          "finite": bool(torch.isfinite(out).all())}
# AOT compilation is impossible in an interpreting process: it must say so, not crash obscurely
try:
    tc.ptx_for(80, "float32", 24, 20, 0.2)
    results["aot_under_interpreter"] = "compiled"
except RuntimeError as e:
    results["aot_under_interpreter"] = str(e)
print(json.dumps(results))
"""


def _case(name, dtype, seed, b, m, n, h, dq, dv=None, **extra):
    dv = dq if dv is None else dv
    return {"name": name, "dtype": dtype, "seed": seed, "b": b, "m": m, "n": n, "h": h, "dq": dq, "dv": dv,
            "scale": extra.pop("scale", dq ** -0.5), **extra}


CASES = [
    # odd M, N, non-power-of-two and unequal head dims
    _case("odd_fp32", "float32", 1, 2, 5, 37, 3, 24, 20),
    _case("odd_fp16", "float16", 2, 2, 5, 37, 3, 24, 20),
    # DeiT-like cluster step: 17 queries over 197 tokens, 6 heads of 64 (batch 1 keeps it fast)
    _case("deit_fp32", "float32", 3, 1, 17, 197, 6, 64),
    _case("deit_fp16", "float16", 4, 1, 17, 197, 6, 64),
    # several query blocks and a partial last key block (small blocks force the loops)
    _case("blocks_fp32", "float32", 5, 1, 40, 50, 2, 16, block_m=16, block_n=16),
    # non-contiguous inputs
    _case("fused_qkv_fp32", "float32", 6, 2, 7, 29, 2, 32, 16, layout="fused_qkv"),
    _case("fused_qkv_fp16", "float16", 7, 2, 7, 29, 2, 32, 16, layout="fused_qkv"),
    _case("channel_strided_fp32", "float32", 8, 2, 6, 21, 2, 12, 10, layout="channel_strided"),
    # large logits (|scale*q.k| ~ 1e3) and a negative scale: needs the running-max subtraction
    _case("large_logits_fp32", "float32", 9, 1, 9, 70, 2, 16, amp=4.0, scale=4.0),
    _case("negative_scale_fp32", "float32", 10, 1, 9, 70, 2, 16, scale=-0.7),
    # the AOT entry as TensorRT launches it (its argument order, scale baked in as a constexpr)
    _case("aot_entry_odd_fp32", "float32", 12, 2, 5, 37, 3, 24, 20, entry="aot"),
    _case("aot_entry_deit_fp16", "float16", 13, 1, 17, 197, 6, 64, entry="aot"),
    # deliberately wrong: kernel run with 1.5x the scale the reference uses (must be detected)
    _case("wrong_scale_fp32", "float32", 11, 2, 5, 37, 3, 24, 20, kernel_scale_factor=1.5),
]


@pytest.fixture(scope="module")
def interpreted():
    """Run every case once in a TRITON_INTERPRET=1 subprocess; {name: result}."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(CASES)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [c for c in CASES if "kernel_scale_factor" not in c], ids=lambda c: c["name"])
def test_interpreter_matches_reference(interpreted, case):
    """The kernel agrees with token_cluster_reference within the dtype's tolerance."""
    r = interpreted[case["name"]]
    assert r["finite"]
    assert r["ref_max"] > 0.05  # a near-zero output would make the tolerance meaningless
    tol = max_error(case["dtype"], r["ref_max"])
    assert r["err"] <= tol, f"{case['name']}: max abs err {r['err']:.3g} > {tol:.3g}"


def test_wrong_scale_is_detected(interpreted):
    """A 1.5x scale error must fail the fp32 comparison by a wide margin (the check is not vacuous)."""
    r = interpreted["wrong_scale_fp32"]
    assert r["finite"]
    assert r["err"] > 100 * max_error("float32", r["ref_max"]), r


def test_aot_refused_under_interpreter(interpreted):
    """Under TRITON_INTERPRET=1 triton cannot compile (tl.standard is interpreted too): clear error."""
    assert "TRITON_INTERPRET" in interpreted["aot_under_interpreter"]


def test_launch_grid():
    assert launch_grid(2, 17, 6, 32) == (1, 12, 1)
    assert launch_grid(3, 33, 4, 32) == (2, 12, 1)
    assert launch_grid(1, 32, 1, 32) == (1, 1, 1)


def test_launcher_refuses_cpu_tensors_when_compiled():
    """Outside the interpreter the launcher needs CUDA tensors, and says so instead of crashing."""
    import torch

    q, k, v = torch.zeros(1, 2, 8), torch.zeros(1, 3, 8), torch.zeros(1, 3, 8)
    with pytest.raises(RuntimeError, match="CUDA"):
        token_cluster(q, k, v, 1, 1.0)
    with pytest.raises(ValueError):
        token_cluster(q, k, torch.zeros(1, 4, 8), 1, 1.0)
    with pytest.raises(TypeError):
        token_cluster(q.double(), k.double(), v.double(), 1, 1.0)


# expected .param types of the entry, in AOT_PARAMS order
_PARAM_TYPES = ["u64"] * 3 + ["u32"] * 3 + ["u32"] * 8 + ["u64"] + ["u64"] * 2


def _entry_params(ptx: str, name: str) -> list[str]:
    m = re.search(r"\.visible\s+\.entry\s+(\w+)\s*\(([^)]*)\)", ptx)
    assert m is not None, "no .visible .entry in PTX"
    assert m.group(1) == name
    assert len(re.findall(r"\.visible\s+\.entry", ptx)) == 1
    return re.findall(r"\.param\s+\.(\w+)", m.group(2))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("dims", [(64, 64), (24, 20)], ids=["d64", "dq24_dv20"])
def test_ptx(arch, dtype, dims):
    """PTX for sm_arch: target line, entry symbol, the documented .param list, and the dot flavour."""
    kp = ptx_for(arch, dtype, *dims, dims[0] ** -0.5)
    assert isinstance(kp, KernelPTX) and kp.arch == arch
    # Triton targets the arch-specific sm_90a for 9.0 (wgmma/TMA features), plain sm_80 for 8.0
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    assert re.findall(r"^\s*\.target\s+(\w+)", kp.ptx, re.MULTILINE) == [target]
    assert _entry_params(kp.ptx, kp.name) == _PARAM_TYPES
    assert kp.num_warps == 4 and kp.block_m == 32
    # the dots stage their tiles through shared memory, and a launch without the opt-in gets 48 KiB
    assert 0 < kp.shared_bytes <= 48 * 1024, kp.shared_bytes
    if dtype == "float16":
        assert "mma.sync" in kp.ptx or "wgmma" in kp.ptx, "fp16 dots should use tensor cores"
    else:
        assert "tf32" not in kp.ptx, "fp32 dots must be IEEE (no TF32), to match the fp32 reference"


def test_ptx_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ptx_for(80, "bfloat16", 64, 64, 0.125)
    with pytest.raises(ValueError):
        ptx_for(80, "float32", 0, 64, 0.125)


def test_ptx_isa_of_cuda_agrees_with_triton():
    """Our CUDA -> PTX ISA table against the one the installed Triton uses for its ptxas."""
    from triton.backends.nvidia.compiler import ptx_get_version

    for version in ("11.8", "12.0", "12.4", "12.5", "12.6", "12.7", "12.8", "12.9", "13.0", "13.1"):
        assert ptx_isa_of_cuda(version) == ptx_get_version(version), version


def test_ptx_isa_is_capped_by_the_driver_else_the_floor():
    # a CUDA 12.0 driver loads ISA <= 8.0: Triton's ptxas 12.9 would write 8.8, which that driver refuses
    assert ptx_isa_for(90, driver="12.0", ptxas="12.9")[0] == 80
    assert ptx_isa_for(90, driver="12.8", ptxas="12.9")[0] == 87
    assert ptx_isa_for(90, driver="13.0", ptxas="12.9")[0] == 88  # never newer than the assembler
    with pytest.raises(DeployCompError, match="update the NVIDIA driver"):
        ptx_isa_for(90, driver="11.8", ptxas="12.9")  # sm_90a needs ISA 8.0
    isa, why = ptx_isa_for(90, driver="", ptxas="12.9")  # "": no driver answered
    assert isa == PTX_ISA_FLOOR[90] == 80 and "floor" in why
    with pytest.raises(ValueError, match="no documented PTX ISA floor"):
        ptx_isa_for(75, driver="", ptxas="12.9")


@pytest.mark.parametrize("arch", [80, 90])
def test_ptx_version_line_is_the_capped_isa(arch):
    """The PTX's .version is the cap (here, without a driver: the documented floor 8.0), not the
    newest ISA of Triton's ptxas; and ptxas assembled it (triton.compile runs it)."""
    kp = ptx_for(arch, "float16", 64, 64, 0.125)
    isa, _ = ptx_isa_for(arch)
    if driver_cuda_version() is None:
        assert isa == PTX_ISA_FLOOR[arch] == 80
    assert kp.ptx_isa == isa
    assert re.findall(r"^\s*\.version\s+(\S+)", kp.ptx, re.MULTILINE) == [f"{isa // 10}.{isa % 10}"]
    older = ptx_for(arch, "float16", 64, 64, 0.125, ptx_isa=81 if arch == 90 else 78)
    assert re.findall(r"^\s*\.version\s+(\S+)", older.ptx, re.MULTILINE) == ["8.1" if arch == 90 else "7.8"]
