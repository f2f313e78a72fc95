"""The GPU check: everything the project can check on one NVIDIA GPU without TensorRT, in one go.

    PYTHONPATH=. python scripts/gpu_check.py OUT/             # on the GPU machine: checks 1-4, <= 6 min
    PYTHONPATH=. python scripts/gpu_check.py --dry-run OUT/   # on any CPU: checks 1-2 at tiny sizes (CI)
    PYTHONPATH=. python scripts/gpu_check.py --checks 2,3 OUT/   # rerun some checks only
    DEPLOYCOMP_FASHION_MNIST=out/fmnist PYTHONPATH=. python scripts/gpu_check.py --checks 5 OUT/   # train on the GPU

Writes ``OUT/gpu_check.json`` (everything measured) and ``OUT/gpu_check.md`` (a short summary), and
``OUT/checkN.json`` per check as it goes; exit code 0 when every check passed or ran to completion.

Checks (each in its own process, with its own timeout, so a hang or a CUDA fault in one cannot take
the others down; a check that runs out of time keeps the cases it finished):

1. **Kernel correctness**: the Triton TokenCluster kernel (``kernels.token_cluster``) against the
   op's torch reference, fp32 / fp16 / bf16, odd sizes and DeiT-S/B sizes (M = 17, N = 197 and
   214, 6 and 12 heads of 64), fused-qkv strides, the AOT entry; tolerances of the CPU tests
   (``token_cluster.TOLERANCE``).
2. **The plugin's kernel as TensorRT would launch it, without TensorRT**: the plugin is registered
   against a stand-in of ``tensorrt.plugin`` (``kernels.trt_standin``, which also enforces
   TensorRT's signature rules); its AOT implementation ``_aot`` returns the kernel name, the PTX
   (``ptx_for`` for this GPU's arch, ISA capped at the driver's), launch parameters and int32
   scalars; the PTX is loaded with the CUDA driver API (``cuModuleLoadData`` via cuda-bindings, else
   cupy) and launched with exactly that grid, block, shared memory and argument order
   (inputs, scalars, output); outputs are compared with the reference.
3. **Kernel speed**: the Triton kernel against ``torch.nn.functional.scaled_dot_product_attention``
   (with the op's layout change) on the generator's shapes, batch 1 to 256, fp16/bf16; medians of
   ``triton.testing.do_bench``.
4. **The compiled architectures on the GPU, as torch twins** (not TensorRT): FlexViT of the 0.5x and
   0.3x pruning plans of DeiT-S/B (``benchmarks/gpu_plans/*.json``, made on CPU from the committed
   latency tables by ``scripts/make_gpu_plans.py``: global "magnitude" selection and "uniform" width
   scaling) against FlexViT of the unpruned DeiT, and STViT with 16 semantic tokens against
   timm's DeiT, in bf16 with CUDA graphs at batch 1, 64, 256 (median of CUDA-event-timed replays).

5. **Training on the GPU** (``TrainConfig.device``; only when asked, ``--checks 5``): a small DeiT
   trained 24 steps on the CPU and on the GPU from the same weights on the same batches (TF32 off)
   must end at the same weights (difference under 1 % of how far they moved); then, when the
   Fashion-MNIST files are there (``$DEPLOYCOMP_FASHION_MNIST``: the machine has no Debian package,
   so they travel with the working tree), the proxy DeiT is trained with ``benchmarks/train_proxy.py``'s
   recipe into ``OUT/proxy-fmnist/`` (``model.safetensors``, ``metrics.json``: the weights come back
   with ``$OUT``; a run cut short leaves its resumable checkpoint there).

``--dry-run`` runs checks 1-2 on CPU at tiny sizes: check 1 under ``TRITON_INTERPRET=1``; check 2
validates the PTX (its ``.version``/``.target``, the entry's parameters against the arguments,
assembled by Triton's ptxas) and the launch parameters with no driver, then runs the AOT entry in
Triton's interpreter with exactly the grid and arguments ``_aot`` returned.

Plan on the GPU (timeouts, seconds): 1: 90, 2: 60, 3: 75, 4: 110 = 335 s; and the whole run is held
to ``--budget`` (360 s): each check's timeout is cut to what is left, a check with under 15 s left is
skipped, so the script ends within 6 minutes whatever happens. Needs torch with CUDA, triton >= 3.5, cuda-bindings (or cupy), timm; not TensorRT.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

T0 = time.monotonic()  # the run's start, for the budget (before any heavy import)
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PLANS_DIR = ROOT / "benchmarks" / "gpu_plans"
TITLES = {1: "Triton TokenCluster kernel vs torch reference",
          2: "plugin PTX launched as TensorRT would (driver API, no TensorRT)",
          3: "kernel speed vs scaled_dot_product_attention",
          4: "compiled architectures as torch twins (bf16, CUDA graphs)",
          5: "training on the GPU (same weights as the CPU; the proxy DeiT)"}
TIMEOUT_GPU = {1: 90, 2: 60, 3: 75, 4: 110, 5: 330}
DEFAULT_CHECKS = (1, 2, 3, 4)  # check 5 trains for minutes: only on request
TIMEOUT_DRY = {1: 120, 2: 120}
BUDGET_S = 360  # the whole run, start to finish: each check's timeout is cut to what is left of it
MEASUREMENTS = {3, 4}  # (5 passes or fails on its equivalence; the proxy's training is recorded beside it)  # checks that measure (status "done"), the others pass or fail


# ---------------------------------------------------------------------------------------------
# Results, written as they come (a check that times out keeps what it finished)


class Recorder:
    def __init__(self, path: Path, check: int, dry: bool):
        self.path = path
        self.data = {"check": check, "title": TITLES[check], "mode": "dry-run" if dry else "gpu", "status": "running",
                     "cases": [], "notes": [], "env": {}}
        self.write()

    def case(self, **row) -> dict:
        self.data["cases"].append(row)
        self.write()
        return row

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.write()

    def finish(self, status: str) -> None:
        self.data["status"] = status
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def environment(device: str) -> dict:
    import torch
    import triton

    from deploycomp.kernels.token_cluster import driver_cuda_version

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "torch_cuda": torch.version.cuda, "driver_cuda": driver_cuda_version(), "host": platform.node()}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env.update(gpu=torch.cuda.get_device_name(), arch=10 * major + minor,
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return env


# ---------------------------------------------------------------------------------------------
# Inputs and tolerances shared by checks 1 and 2


def make_inputs(shape: dict, dtype: str, device: str, seed: int):
    """q, k, v for a case: contiguous, or (``fused``) slices of one (B, N, H·(2·Dqk+Dv)) projection
    with the queries its first M tokens, as a fused-qkv model feeds the op."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, m, n, h, dq, dv = (shape[key] for key in ("b", "m", "n", "h", "dq", "dv"))
    dt = getattr(torch, dtype)

    def r(*size):
        return torch.randn(*size, generator=g).to(dtype=dt, device=device)

    if shape.get("layout") == "fused":
        qkv = r(b, n, h * (2 * dq + dv))
        return qkv[:, :m, : h * dq], qkv[:, :, h * dq: 2 * h * dq], qkv[:, :, 2 * h * dq:]
    return r(b, m, h * dq), r(b, n, h * dq), r(b, n, h * dv)


def compare(out, ref, dtype: str) -> dict:
    from deploycomp.kernels.token_cluster import max_error

    err = (out.float() - ref.float()).abs().max().item()
    ref_max = ref.float().abs().max().item()
    tol = max_error(dtype, ref_max)
    finite = bool(out.float().isfinite().all())
    return {"max_abs_err": err, "ref_max_abs": ref_max, "tolerance": tol, "passed": finite and err <= tol}


def _shape(name, b, m, n, h, dq, dv=None, **extra):
    return {"name": name, "b": b, "m": m, "n": n, "h": h, "dq": dq, "dv": dq if dv is None else dv, **extra}


# M = 17 queries (16 semantic tokens + cls); N = 197 keys (first generator block), 214 = 17 + 197 (second)
GPU_SHAPES = [
    _shape("odd", 2, 5, 37, 3, 24, 20),
    _shape("deit_s_gen1", 4, 17, 197, 6, 64), _shape("deit_s_gen2", 4, 17, 214, 6, 64),
    _shape("deit_b_gen1", 4, 17, 197, 12, 64), _shape("deit_b_gen2", 4, 17, 214, 12, 64),
    _shape("deit_s_fused_qkv", 4, 17, 197, 6, 64, layout="fused"),
    _shape("deit_b_batch256", 256, 17, 214, 12, 64),
]
DRY_SHAPES = [_shape("odd", 2, 5, 37, 3, 24, 20), _shape("fused_qkv", 1, 7, 29, 2, 32, 16, layout="fused")]
GPU_PLUGIN_SHAPES = [_shape("odd", 2, 5, 37, 3, 24, 20), _shape("deit_s_gen1", 8, 17, 197, 6, 64),
                     _shape("deit_b_gen2", 8, 17, 214, 12, 64), _shape("deit_b_gen1_batch256", 256, 17, 197, 12, 64)]
DRY_PLUGIN_SHAPES = [_shape("odd", 2, 5, 37, 3, 24, 20), _shape("gen", 1, 17, 50, 2, 64)]


# ---------------------------------------------------------------------------------------------
# Check 1: kernel correctness


def check_kernel(rec: Recorder, dry: bool) -> str:
    import torch

    from deploycomp.kernels import token_cluster as tc
    from deploycomp.tokens.op import token_cluster_reference

    device = "cpu" if dry else "cuda"
    if dry:
        assert tc._interpreting(), "the dry run's check 1 needs TRITON_INTERPRET=1 set before triton is imported"
        torch.set_num_threads(2)
    rec.data["env"] = environment(device)
    # bf16 arithmetic is wrong in Triton's interpreter: bf16 runs on the GPU only
    dtypes = ("float32", "float16") if dry else ("float32", "float16", "bfloat16")
    passed = True
    for i, shape in enumerate(DRY_SHAPES if dry else GPU_SHAPES):
        for dtype in dtypes:
            q, k, v = make_inputs(shape, dtype, device, seed=i)
            scale = shape["dq"] ** -0.5
            t0 = time.perf_counter()
            out = tc.token_cluster(q, k, v, shape["h"], scale)
            if not dry:
                torch.cuda.synchronize()
            row = compare(out, token_cluster_reference(q, k, v, shape["h"], scale), dtype)
            passed &= row["passed"]
            rec.case(entry="launcher", shape=shape, dtype=dtype, seconds=round(time.perf_counter() - t0, 3), **row)
    for i, shape in enumerate((DRY_SHAPES if dry else GPU_SHAPES)[:2]):  # the AOT entry (TensorRT's argument order)
        shape = {**shape, "layout": None}  # the AOT entry takes contiguous tensors (TensorRT's linear format)
        for dtype in ("float32", "float16"):
            q, k, v = make_inputs(shape, dtype, device, seed=100 + i)
            scale = shape["dq"] ** -0.5
            out = tc.token_cluster_aot_entry(q, k, v, shape["h"], scale)
            row = compare(out, token_cluster_reference(q, k, v, shape["h"], scale), dtype)
            passed &= row["passed"]
            rec.case(entry="aot", shape=shape, dtype=dtype, **row)
    return "passed" if passed else "failed"


# ---------------------------------------------------------------------------------------------
# Check 2: the plugin's PTX launched as TensorRT would


def plugin_launch(arch: int, shape: dict, dtype: str):
    """Register the plugin against the TensorRT stand-in (once per process) and return what its AOT
    implementation hands TensorRT for ``shape``: (name, ptx, KernelLaunchParams, SymIntExprs)."""
    from deploycomp.kernels import trt_plugin as tp
    from deploycomp.kernels import trt_standin as ts

    if not hasattr(plugin_launch, "plugin"):
        plugin_launch.context = ts.installed()  # entered for the life of this worker process (a reference
        plugin_launch.plugin = plugin_launch.context.__enter__()  # kept: collecting it would restore sys.modules)
        tp.register(arch)
    aot = plugin_launch.plugin.registry.plugins[tp.PLUGIN_ID].aot_fn
    trt_dtype = {"float32": ts.float32, "float16": ts.float16}[dtype]
    b, m, n, h = shape["b"], shape["m"], shape["n"], shape["h"]
    descs = [ts.TensorDesc((b, t, h * d), trt_dtype, constant_axes=(2,))
             for t, d in ((m, shape["dq"]), (n, shape["dq"]), (n, shape["dv"]))]
    outputs = (ts.TensorDesc((b, m, h * shape["dv"]), trt_dtype, constant_axes=(2,)),)
    return aot(*descs, h, shape["dq"] ** -0.5, outputs, 0)


def validate_launch(arch: int, shape: dict, dtype: str, name: bytes, ptx: bytes, params, extra) -> dict:
    """What can be checked without a driver: PTX header and entry parameters against the arguments
    TensorRT will pass, and the launch parameters against the kernel and the device limits."""
    import re

    from deploycomp.kernels import trt_plugin as tp
    from deploycomp.kernels import trt_standin as ts
    from deploycomp.kernels.token_cluster import launch_grid, ptx_for, ptx_isa_for

    text, entry = ptx.decode(), name.decode()
    decls = tp.entry_params(text, entry)
    scalars = [ts.value_of(e) for e in extra]
    problems = []
    if len(decls) != 3 + len(scalars) + 1:
        problems.append(f"entry has {len(decls)} parameters, TensorRT passes {3 + len(scalars) + 1}")
    kinds = ["ptr"] * 3 + ["u32"] * len(scalars) + ["ptr"]
    for d, kind in zip(decls, kinds):
        if (kind == "ptr") != (".u64" in d) or (kind == "u32" and ".u32" not in d):
            problems.append(f"parameter '{d}' does not take a {kind}")
    isa, why = ptx_isa_for(arch)
    version = re.findall(r"^\s*\.version\s+(\S+)", text, re.MULTILINE)
    if version != [f"{isa // 10}.{isa % 10}"]:
        problems.append(f".version {version} is not the capped ISA {isa / 10:.1f} ({why})")
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    if not re.search(rf"^\s*\.target\s+{target}\b", text, re.MULTILINE):
        problems.append(f"no .target {target}")
    kernel = ptx_for(arch, dtype, shape["dq"], shape["dv"], shape["dq"] ** -0.5)
    grid = tuple(ts.value_of(g) for g in (params.grid_x, params.grid_y, params.grid_z))
    b, m, n, h = shape["b"], shape["m"], shape["n"], shape["h"]
    if grid != launch_grid(b, m, h, kernel.block_m):
        problems.append(f"grid {grid} != {launch_grid(b, m, h, kernel.block_m)}")
    if params.block_x != kernel.num_warps * 32 or not 32 <= params.block_x <= 1024:
        problems.append(f"block {params.block_x} threads for {kernel.num_warps} warps")
    if params.shared_mem != kernel.shared_bytes or params.shared_mem > 227 * 1024:
        problems.append(f"shared memory {params.shared_mem} B (kernel {kernel.shared_bytes} B, device limit 227 KiB)")
    import torch

    # M, N, H, then the batch and token strides of contiguous q, k, v, out as torch lays them out
    q, k, v, o = (torch.empty(b, t, h * d, device="meta") for t, d in ((m, shape["dq"]), (n, shape["dq"]),
                                                                       (n, shape["dv"]), (m, shape["dv"])))
    want = [m, n, h, *(s for t in (q, k, v, o) for s in t.stride()[:2])]
    if scalars != want:
        problems.append(f"int32 scalars {scalars} != {want}")
    return {"grid": grid, "block": params.block_x, "shared_mem": params.shared_mem, "scalars": scalars,
            "ptx_isa": f"{isa / 10:.1f}", "ptx_isa_reason": why, "entry": entry, "params": len(decls),
            "constexprs": kernel.constexprs, "problems": problems}


def assemble(ptx: bytes, arch: int, workdir: Path) -> str | None:
    """Assemble with Triton's bundled ptxas for the arch; None when it accepts, else its error."""
    import triton

    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    src, cubin = workdir / f"plugin_{arch}.ptx", workdir / f"plugin_{arch}.cubin"
    src.write_bytes(ptx)
    result = subprocess.run([triton.knobs.nvidia.ptxas.path, f"-arch={target}", str(src), "-o", str(cubin)],
                            capture_output=True, text=True)
    return None if result.returncode == 0 else result.stderr.strip()[-2000:]


class DriverKernel:
    """A PTX entry loaded with the CUDA driver API (cuda-bindings; cupy's RawModule when absent)."""

    def __init__(self, ptx: bytes, name: bytes, workdir: Path):
        try:
            from cuda.bindings import driver as cu
        except ImportError:
            cu = None
        self.cu = cu
        if cu is not None:
            import ctypes

            self._ok(cu.cuInit(0))  # torch's primary context is already current on this thread
            self.image = ctypes.create_string_buffer(ptx)  # NUL-terminated, alive as long as the module
            self.module = self._ok(cu.cuModuleLoadData(ctypes.addressof(self.image)))[0]
            self.function = self._ok(cu.cuModuleGetFunction(self.module, name))[0]
            self.via = "cuda-bindings cuModuleLoadData"
        else:
            import cupy

            path = workdir / (name.decode() + ".ptx")
            path.write_bytes(ptx)
            self.function = cupy.RawModule(path=str(path)).get_function(name.decode())
            self.via = "cupy RawModule (cuModuleLoadData)"

    def _ok(self, result):
        err, rest = result[0], result[1:]
        if err != self.cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver: {self.cu.cuGetErrorName(err)[1].decode()}")
        return rest

    def launch(self, grid, block: int, shared: int, args: list, stream: int) -> None:
        """``args``: ("ptr", int) or ("i32", int), in the kernel's parameter order."""
        import ctypes

        import numpy as np

        if self.cu is None:
            values = [np.uint64(v) if kind == "ptr" else np.int32(v) for kind, v in args]
            if shared > 48 * 1024:
                self.function.max_dynamic_shared_size_bytes = shared
            self.function(tuple(grid), (block, 1, 1), tuple(values), shared_mem=shared)
            return
        cu = self.cu
        if shared > 48 * 1024:
            self._ok(cu.cuFuncSetAttribute(self.function,
                                           cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                           shared))
        holders = [ctypes.c_uint64(v) if kind == "ptr" else ctypes.c_int32(v) for kind, v in args]
        pointers = (ctypes.c_void_p * len(holders))(*(ctypes.addressof(h) for h in holders))
        self._ok(cu.cuLaunchKernel(self.function, *grid, block, 1, 1, shared, cu.CUstream(stream),
                                   ctypes.addressof(pointers), 0))


def check_plugin(rec: Recorder, dry: bool, workdir: Path) -> str:
    import torch

    from deploycomp.tokens.op import token_cluster_reference

    rec.data["env"] = environment("cpu" if dry else "cuda")
    arch = 90 if dry else rec.data["env"]["arch"]
    passed, launches = True, []
    for i, shape in enumerate(DRY_PLUGIN_SHAPES if dry else GPU_PLUGIN_SHAPES):
        for dtype in ("float32", "float16"):
            name, ptx, params, extra = plugin_launch(arch, shape, dtype)
            row = validate_launch(arch, shape, dtype, name, ptx, params, extra)
            row["ptxas"] = assemble(ptx, arch, workdir) or "assembled"
            ok = not row["problems"] and row["ptxas"] == "assembled"
            if dry:
                launches.append({"shape": shape, "dtype": dtype, "name": row["entry"], "grid": row["grid"],
                                 "scalars": row["scalars"], "constexprs": row["constexprs"], "seed": i})
            else:
                q, k, v = make_inputs(shape, dtype, "cuda", seed=i)
                out = torch.empty(shape["b"], shape["m"], shape["h"] * shape["dv"], dtype=q.dtype, device="cuda")
                kernel = DriverKernel(ptx, name, workdir)
                args = ([("ptr", t.data_ptr()) for t in (q, k, v)] + [("i32", s) for s in row["scalars"]]
                        + [("ptr", out.data_ptr())])
                torch.cuda.synchronize()
                kernel.launch(row["grid"], params.block_x, params.shared_mem, args, torch.cuda.current_stream().cuda_stream)
                torch.cuda.synchronize()
                row.update(compare(out, token_cluster_reference(q, k, v, shape["h"], shape["dq"] ** -0.5), dtype),
                           loaded_via=kernel.via)
                ok &= row["passed"]
            row["passed"] = ok
            passed &= ok
            rec.case(shape=shape, dtype=dtype, **row)
    if dry:
        # no driver here: run the AOT entry in Triton's interpreter with exactly the grid and arguments
        # _aot returned (a separate process: the interpreter must be on before triton is imported)
        spec = workdir / "plugin_launches.json"
        spec.write_text(json.dumps(launches))
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        proc = subprocess.run([sys.executable, __file__, "--interpret-launches", str(spec)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            rec.note(f"interpreted launch failed: {proc.stderr[-2000:]}")
            return "failed"
        for row in json.loads(proc.stdout.strip().splitlines()[-1]):
            passed &= row["passed"]
            rec.case(interpreted=True, **row)
    return "passed" if passed else "failed"


def interpret_launches(spec: Path) -> None:
    """(dry run, under TRITON_INTERPRET=1) Launch the AOT entry with each recorded grid and argument
    list, as TensorRT passes them (q, k, v, the int32 scalars, out); print one JSON line of results."""
    import torch

    from deploycomp.kernels import token_cluster as tc
    from deploycomp.tokens.op import token_cluster_reference

    assert tc._interpreting(), "needs TRITON_INTERPRET=1"
    torch.set_num_threads(2)
    rows = []
    for launch in json.loads(spec.read_text()):
        shape, dtype = launch["shape"], launch["dtype"]
        q, k, v = make_inputs(shape, dtype, "cpu", seed=launch["seed"])
        out = torch.empty(shape["b"], shape["m"], shape["h"] * shape["dv"], dtype=q.dtype)
        tc._kernel_trt[tuple(launch["grid"])](q, k, v, *launch["scalars"], out, **launch["constexprs"],
                                              num_warps=tc.DEFAULT_NUM_WARPS, num_stages=tc.DEFAULT_NUM_STAGES)
        rows.append({"shape": shape, "dtype": dtype, "entry": launch["name"],
                     **compare(out, token_cluster_reference(q, k, v, shape["h"], shape["dq"] ** -0.5), dtype)})
    print(json.dumps(rows))


# ---------------------------------------------------------------------------------------------
# Check 3: kernel speed


def check_speed(rec: Recorder) -> str:
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from deploycomp.kernels.token_cluster import token_cluster

    rec.data["env"] = environment("cuda")
    rec.note("medians of triton.testing.do_bench (ms); SDPA includes the (B,H,M,D) -> (B,M,H*D) layout change "
             "the op's output needs; inputs contiguous in the op's layout")
    for model, h in (("deit_s", 6), ("deit_b", 12)):
        for n in (197, 214):
            for dtype in ("float16", "bfloat16"):
                for b in (1, 8, 64, 256):
                    shape = _shape(f"{model}_n{n}", b, 17, n, h, 64)
                    q, k, v = make_inputs(shape, dtype, "cuda", seed=0)
                    qh, kh, vh = (t.view(b, -1, h, 64).transpose(1, 2) for t in (q, k, v))

                    def sdpa():
                        return F.scaled_dot_product_attention(qh, kh, vh, scale=0.125).transpose(1, 2).reshape(b, 17, -1)

                    def triton_kernel():
                        return token_cluster(q, k, v, h, 0.125)

                    t_triton = do_bench(triton_kernel, warmup=10, rep=40, return_mode="median")
                    t_sdpa = do_bench(sdpa, warmup=10, rep=40, return_mode="median")
                    rec.case(shape=shape, dtype=dtype, batch=b, triton_ms=t_triton, sdpa_ms=t_sdpa,
                             sdpa_over_triton=t_sdpa / t_triton)
    return "done"


# ---------------------------------------------------------------------------------------------
# Check 4: the compiled architectures as torch twins


def graph_ms(model, batch: int, budget_ms: float = 300.0, rounds: int = 5) -> float:
    """Median milliseconds per forward of ``model`` at ``batch`` (bf16 224x224 images), replaying a
    CUDA graph: warm-up on a side stream, capture, then ``rounds`` CUDA-event-timed runs of replays."""
    import torch

    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode():
        with torch.cuda.stream(side):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x)

    def timed(reps: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps

    reps = max(3, min(50, int(budget_ms / max(timed(1), 1e-3) / rounds)))
    out = statistics.median(timed(reps) for _ in range(rounds))
    del graph
    torch.cuda.empty_cache()
    return out


def load_plans(directory: Path = PLANS_DIR) -> dict[str, list[dict]]:
    plans: dict[str, list[dict]] = {}
    for path in sorted(directory.glob("*.json")):
        plan = json.loads(path.read_text())
        plans.setdefault(plan["model"], []).append(plan)
    return plans


def arch_from_dict(d: dict):
    from deploycomp.latency.arch import BlockArch, ViTArch

    return ViTArch(**{**d, "blocks": tuple(BlockArch(**b) for b in d["blocks"])})


def unpruned_arch(vit):
    """The ViTArch of a timm DeiT (FlexViT of it is the unpruned twin of the pruned FlexViTs)."""
    from deploycomp.latency.arch import BlockArch, ViTArch

    emb, tokens = vit.embed_dim, vit.patch_embed.num_patches + 1
    blocks = tuple(BlockArch(b.attn.num_heads, b.attn.head_dim, b.attn.head_dim, b.mlp.fc1.out_features, tokens)
                   for b in vit.blocks)
    return ViTArch(emb, blocks, img_size=vit.patch_embed.img_size[0], patch=vit.patch_embed.patch_size[0],
                   num_classes=vit.num_classes)


MODELS = ("deit_small_patch16_224", "deit_base_patch16_224")


def check_models(rec: Recorder, device: str = "cuda", dtype: str = "bfloat16", batches=(1, 64, 256),
                 timer=None, names=MODELS) -> str:
    """Time every variant of every model at every batch; ``timer(model, batch) -> ms`` (default
    ``graph_ms``). The arguments let a CPU test run the same bookkeeping with a plain timer."""
    import timm
    import torch

    from deploycomp.latency.flexvit import FlexViT
    from deploycomp.tokens.stvit import SemanticTokenConfig, SemanticTokenViT

    timer = timer or graph_ms
    rec.data["env"] = environment(device)
    rec.note("torch-level numbers (bf16, CUDA graphs, random weights), not TensorRT's. Pruned FlexViTs are compared "
             "with FlexViT of the unpruned DeiT (same implementation: separate q/k/v projections, attention by "
             "scaled_dot_product_attention), STViT with timm's DeiT it is built on; 'FlexViT unpruned, written-out "
             "attention' is the exported form (matmul-softmax-matmul). "
             "For reference: NViT-B reports 1.86x on a V100, STViT +105 % throughput (their setups, not these).")
    plans = load_plans()
    if not plans:
        rec.note(f"no plans in {PLANS_DIR}: run scripts/make_gpu_plans.py on a CPU first")
        return "failed"
    for name in names:
        torch.manual_seed(0)
        vit = timm.create_model(name, pretrained=False).eval()
        variants = [("timm DeiT", "timm DeiT", lambda: vit),
                    ("FlexViT unpruned", "timm DeiT", lambda: FlexViT(unpruned_arch(vit), fused_attention=True)),
                    ("FlexViT unpruned, written-out attention", "FlexViT unpruned",
                     lambda: FlexViT(unpruned_arch(vit)))]
        for plan in plans.get(name, []):
            variants.append((f"FlexViT {plan['budget']} {plan['method']} plan", "FlexViT unpruned",
                             lambda plan=plan: FlexViT(arch_from_dict(plan["arch"]), fused_attention=True)))
        variants.append(("STViT 16 tokens", "timm DeiT", lambda: SemanticTokenViT(vit, SemanticTokenConfig(tokens=16))))
        times: dict[tuple[str, int], float] = {}
        for label, baseline, build in variants:
            model = build().to(device, getattr(torch, dtype)).eval()
            for batch in batches:
                ms = timer(model, batch)
                times[(label, batch)] = ms
                base = times.get((baseline, batch))
                rec.case(model=name, variant=label, batch=batch, dtype=dtype, ms=ms, images_per_s=batch / ms * 1e3,
                         baseline=baseline, speedup=None if base is None else base / ms)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        del vit
    return "done"


# ---------------------------------------------------------------------------------------------
# Check 5: training on the GPU


def trained_weights(device: str, steps: int = 24) -> tuple[dict, dict]:
    """A 2-block DeiT on 28x28 random images, ``steps`` optimizer steps on ``device`` from fixed
    weights and batches: (initial, final) state dicts on the CPU."""
    import torch

    from deploycomp.frontend.timm_models import build_timm_model
    from deploycomp.learn.data import ImageSet
    from deploycomp.learn.train import TrainConfig, fit

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (steps * 32, 1, 28, 28), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (steps * 32,), generator=g), (0.286,), (0.353,),
                    tuple(map(str, range(10))), "random")
    torch.manual_seed(0)
    model = build_timm_model("deit_fmnist_patch4_28", None, {"depth": 2, "embed_dim": 48, "num_heads": 3})
    init = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, data, None, TrainConfig(epochs=1, batch_size=32, lr=1e-3, warmup_epochs=0.0, device=device))
    return init, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def check_training(rec: Recorder, device: str = "cuda", proxy: bool = True) -> str:
    import torch

    if device.startswith("cuda"):
        rec.data["env"] = environment(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    init, on_cpu = trained_weights("cpu")
    _, on_device = trained_weights(device)
    moved = sum(float((on_cpu[k] - init[k]).pow(2).sum()) for k in init) ** 0.5
    apart = sum(float((on_device[k] - on_cpu[k]).pow(2).sum()) for k in init) ** 0.5
    equal = rec.case(part="same weights as the CPU", device=device, steps=24, moved_l2=moved, apart_l2=apart,
                     passed=moved > 1e-3 and apart < 0.01 * moved)
    if not equal["passed"] or not proxy:
        return "passed" if equal["passed"] else "failed"
    from deploycomp.learn.data import FASHION_MNIST_DIR

    data_dir = Path(os.environ.get("DEPLOYCOMP_FASHION_MNIST", FASHION_MNIST_DIR))
    if not (data_dir / "train-images-idx3-ubyte.gz").is_file():
        rec.note(f"the proxy was not trained: no Fashion-MNIST in {data_dir} (set $DEPLOYCOMP_FASHION_MNIST)")
        return "passed"
    from dataclasses import replace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_proxy import MODEL, RECIPE

    from deploycomp.api import train

    out = rec.path.parent / "proxy-fmnist"
    metrics = train(MODEL, out, replace(RECIPE, device=device), log=rec.note)
    rec.case(part="proxy DeiT, train_proxy.py's recipe", device=metrics["device"], epochs=RECIPE.epochs,
             test_top1=metrics["test_accuracy"], train_seconds=round(metrics["train_seconds"], 1),
             weights=str(out / "model.safetensors"), passed=metrics["finished"])
    return "passed" if metrics["finished"] else "failed"


# ---------------------------------------------------------------------------------------------
# The driver: one process per check, each with its timeout


def run_worker(check: int, out: Path, dry: bool) -> None:
    rec = Recorder(out / f"check{check}.json", check, dry)
    workdir = out / "work"
    workdir.mkdir(exist_ok=True)
    try:
        if check == 1:
            status = check_kernel(rec, dry)
        elif check == 2:
            status = check_plugin(rec, dry, workdir)
        elif check == 3:
            status = check_speed(rec)
        elif check == 4:
            status = check_models(rec)
        else:
            status = check_training(rec)
    except BaseException as exc:
        import traceback

        rec.note(f"error: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}")
        rec.finish("error")
        raise SystemExit(1) from None
    rec.finish(status)


def run_check(check: int, out: Path, dry: bool, timeout: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    if dry and check == 1:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, __file__, str(out), "--worker", str(check)] + (["--dry-run"] if dry else [])
    path = out / f"check{check}.json"
    path.unlink(missing_ok=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stderr = None, (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    seconds = round(time.monotonic() - t0, 1)
    data = json.loads(path.read_text()) if path.is_file() else {"check": check, "title": TITLES[check], "cases": [],
                                                                   "notes": [], "env": {}}
    if rc is None:
        data["status"] = "timeout"
        data["notes"].append(f"stopped after its {timeout} s timeout; the cases above finished")
    elif rc != 0 and data.get("status") in (None, "running"):
        data["status"] = "error"
    if rc not in (0, None) or data["status"] in ("error", "timeout"):
        data["stderr_tail"] = stderr[-3000:]
    data.update(seconds=seconds, timeout_s=timeout)
    return data


def summary_markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['mode']})", "",
             f"{report['started']} · {report['seconds']} s of a {report['plan_seconds']} s plan · "
             f"overall: **{'passed' if report['passed'] else 'FAILED'}**", ""]
    env = next((c["env"] for c in report["checks"] if c.get("env")), {})
    if env:
        lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += ["| check | status | seconds | cases |", "|---|---|---|---|"]
    for c in report["checks"]:
        bad = sum(1 for r in c["cases"] if r.get("passed") is False)
        cases = f"{len(c['cases'])}" + (f" ({bad} failed)" if bad else "")
        lines.append(f"| {c['check']}. {c['title']} | {c['status']} | {c['seconds']} | {cases} |")
    for c in report["checks"]:
        if c["check"] == 3 and c["cases"]:
            lines += ["", "Kernel speed (ms, medians; SDPA / Triton > 1: Triton faster):", "",
                      "| shape | dtype | batch | Triton | SDPA | SDPA/Triton |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['shape']['name']} | {r['dtype']} | {r['batch']} | {r['triton_ms']:.4f} | {r['sdpa_ms']:.4f} "
                      f"| {r['sdpa_over_triton']:.2f} |" for r in c["cases"]]
        if c["check"] == 5 and c["cases"]:
            lines += ["", "Training on the GPU:", ""] + [
                f"- {r['part']}: " + (f"weights {r['apart_l2']:.3g} apart after moving {r['moved_l2']:.3g} (L2)"
                                      if "apart_l2" in r else f"test top-1 {r['test_top1']:.2f} % in {r['train_seconds']} s")
                for r in c["cases"]]
        if c["check"] == 4 and c["cases"]:
            lines += ["", "Architectures, torch twins in bf16 with CUDA graphs (not TensorRT):", "",
                      "| model | variant | batch | ms | images/s | speed-up vs |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['model']} | {r['variant']} | {r['batch']} | {r['ms']:.3f} | {r['images_per_s']:.0f} | "
                      + (f"{r['speedup']:.2f}x {r['baseline']}" if r["speedup"] is not None and r["variant"] != r["baseline"]
                         else "") + " |" for r in c["cases"]]
        for note in c["notes"]:
            lines += ["", f"Check {c['check']}: {note.splitlines()[0]}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, help="directory for gpu_check.json, gpu_check.md, checkN.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU only: checks 1-2 at tiny sizes (TRITON_INTERPRET=1)")
    ap.add_argument("--checks", default=None, help="comma-separated subset, e.g. 2,3 (default: 1-4, dry run 1-2; 5 trains)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (default %(default)s)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--interpret-launches", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.interpret_launches is not None:
        interpret_launches(args.interpret_launches)
        return 0
    if args.out is None:
        ap.error("give an output directory")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        run_worker(args.worker, args.out, args.dry_run)
        return 0
    timeouts = TIMEOUT_DRY if args.dry_run else TIMEOUT_GPU
    default = sorted(timeouts) if args.dry_run else list(DEFAULT_CHECKS)
    checks = default if args.checks is None else [int(c) for c in args.checks.split(",")]
    if any(c not in timeouts for c in checks):
        ap.error(f"--checks: choose from {sorted(timeouts)}" + (" (the dry run has checks 1-2)" if args.dry_run else ""))
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU visible to torch; on a CPU use --dry-run", file=sys.stderr)
            return 2
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = []
    for check in checks:
        left = int(args.budget - (time.monotonic() - T0))
        timeout = min(timeouts[check], left)
        if timeout < 15:
            results.append({"check": check, "title": TITLES[check], "status": "skipped", "cases": [], "env": {},
                            "notes": [f"skipped: {left} s left of the {args.budget:.0f} s budget"], "seconds": 0,
                            "timeout_s": 0})
            print(f"check {check}: skipped ({left} s left of the budget)", flush=True)
            continue
        print(f"check {check}: {TITLES[check]} (timeout {timeout} s) ...", flush=True)
        result = run_check(check, args.out, args.dry_run, timeout)
        print(f"check {check}: {result['status']} in {result['seconds']} s, {len(result['cases'])} cases", flush=True)
        results.append(result)
    ok = all(r["status"] in ("passed", "done") for r in results)
    report = {"script": "scripts/gpu_check.py", "mode": "dry-run" if args.dry_run else "gpu", "started": started,
              "seconds": round(time.monotonic() - T0, 1), "budget_seconds": args.budget,
              "plan_seconds": sum(timeouts[c] for c in checks),
              "passed": ok, "checks": results}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(summary_markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}: {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
