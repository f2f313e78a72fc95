"""Baselines on ort-cpu: torch eager vs plain ONNX Runtime vs ORT's optimize_model vs deploycomp.

For each model (224x224, random weights: timing does not depend on weight values) all candidates
are timed interleaved in one run, so the ratios share the machine's drift. Also measures the
machine's float32 GEMM rate and each candidate's achieved GFLOP/s as a fraction of it.

    .venv/bin/python benchmarks/bench_baselines.py                # all four models
    .venv/bin/python benchmarks/bench_baselines.py --models deit_tiny --rounds 3   # quick look

Writes benchmarks/results/baselines.json and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads must not spin while ORT is timed

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import onnx_ir as ir  # noqa: E402

import deploycomp  # noqa: E402
from deploycomp.api import baseline_name  # noqa: E402
from deploycomp.backends.fingerprint import host_fingerprint, usable_cores  # noqa: E402
from deploycomp.backends.base import backend_for_manifest, get_backend  # noqa: E402
from deploycomp.bench.harness import gemm_rate_gflops, measure_interleaved, summarize, torch_candidate  # noqa: E402
from deploycomp.frontend.export import export_to_onnx  # noqa: E402
from deploycomp.frontend.timm_models import build_timm_model, timm_spec  # noqa: E402
from deploycomp.ir.shapes import matmul_flops  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def ort_optimized_bytes(model: ir.Model) -> bytes:
    """ONNX Runtime's transformer optimizer as a user would call it (model_type='vit')."""
    from onnxruntime.transformers.optimizer import optimize_model

    proto = ir.serde.serialize_model(model)
    with contextlib.redirect_stdout(io.StringIO()):
        optimized = optimize_model(proto, model_type="vit")
    return optimized.model.SerializeToString()


def named(cand, model: str, gflops: float):
    cand.model, cand.gflops = model, gflops
    return cand


def candidates_for(alias: str, threads: int, workdir: Path):
    name = baseline_name(alias)
    spec = timm_spec(name)
    shape = (1, spec.in_chans, spec.img_size, spec.img_size)
    module = build_timm_model(name)
    plain = export_to_onnx(module, shape)
    gflops = matmul_flops(plain) / 1e9
    plain_bytes = ir.serde.serialize_model(plain).SerializeToString()
    plain_ort = get_backend("ort-cpu", threads=threads, allow_spinning=True)  # ONNX Runtime's defaults
    cands = [
        torch_candidate("torch eager", module, shape, threads, name, gflops),
        named(plain_ort.candidate("ort plain", plain_bytes, shape), name, gflops),
        # the plain graph with deploycomp's session options: separates graph from session effects
        named(get_backend("ort-cpu", threads=threads).candidate("ort plain, no spinning", plain_bytes, shape), name, gflops),
        named(plain_ort.candidate("ort optimize_model(vit)", ort_optimized_bytes(plain), shape), name, gflops),
    ]
    compiled = {}
    for label, fuse in (("deploycomp", False), ("deploycomp --fuse", True)):
        out = workdir / f"{alias}{'_fused' if fuse else ''}"
        t0 = time.perf_counter()
        manifest = deploycomp.compile(f"timm:{name}", out, deploycomp.CompileOptions(threads=threads, fuse=fuse,
                                                                                        measure_rounds=0))
        compiled[label] = {"compile_seconds": round(time.perf_counter() - t0, 1),
                           "max_rel_l2": max(c["rel_l2"] for c in manifest["parity"]["checks"])}
        backend = backend_for_manifest(manifest)
        cands.append(named(backend.candidate(label, backend.artifact(out, manifest), shape), name, gflops))
    return name, cands, compiled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deit_tiny,deit_small,deit_base,swin_tiny")
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="throughput batch size")
    ap.add_argument("--out", type=Path, default=RESULTS / "baselines.json")
    args = ap.parse_args(argv)

    gemm_before = gemm_rate_gflops(threads=args.threads)
    report = {"command": "python benchmarks/bench_baselines.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
              "deploycomp_version": deploycomp.__version__,
              "host": {**host_fingerprint(), "threads": args.threads},
              "protocol": {"rounds": args.rounds, "iters": args.iters, "throughput_batch": args.batch,
                           "interleaved": "all candidates of one model, shuffled each round"},
              "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for alias in [m.strip() for m in args.models.split(",") if m.strip()]:
            name, cands, compiled = candidates_for(alias, args.threads, Path(tmp))
            print(f"== {name}: timing {len(cands)} candidates", flush=True)
            lat = measure_interleaved(cands, 1, rounds=args.rounds, iters=args.iters)
            tp = measure_interleaved(cands, args.batch, rounds=args.rounds, iters=max(1, args.iters - 1))
            rows = summarize(cands, lat, tp, args.batch)
            report["models"].append({"model": name, "compile": compiled, "rows": rows})
    gemm_after = gemm_rate_gflops(threads=args.threads)
    gemm = max(gemm_before["median_gflop_s"], gemm_after["median_gflop_s"])
    report["gemm"] = {"before": gemm_before, "after": gemm_after, "reference_gflop_s": gemm}

    lines = [f"float32 GEMM 2048^3 (torch, {args.threads} threads): {gemm_before['median_gflop_s']:.0f} GFLOP/s before, "
             f"{gemm_after['median_gflop_s']:.0f} after",
             f"{'model':<30} {'candidate':<26} {'b1 med ms':>9} {'p10-p90':>13} {'vs ort':>7} "
             f"{f'b{args.batch} img/s':>10} {'GFLOP/s':>8} {'of GEMM':>7}"]
    for m in report["models"]:
        base = next(r for r in m["rows"] if r["name"] == "ort plain")["latency_b1"]["median_ms"]
        for r in m["rows"]:
            lat = r["latency_b1"]
            r["speedup_vs_ort_plain_b1"] = base / lat["median_ms"]
            r["fraction_of_gemm_b1"] = r["achieved_gflop_s_b1"] / gemm
            lines.append(f"{m['model']:<30} {r['name']:<26} {lat['median_ms']:>9.2f} "
                         f"{lat['p10_ms']:>6.2f}-{lat['p90_ms']:<6.2f} {r['speedup_vs_ort_plain_b1']:>6.2f}x "
                         f"{r['throughput']['median_img_s']:>10.1f} {r['achieved_gflop_s_b1']:>8.1f} "
                         f"{r['fraction_of_gemm_b1']:>7.2f}")
    table = "\n".join(lines)
    print(table)
    report["table"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
