"""Why a latency table: architectures with equal FLOPs but different shapes run at different speeds.

Starting from DeiT-S (EMB 384, 12 blocks of 6 heads x 64, MLP 1536, 197 tokens), builds a dozen
architectures at about half its FLOPs, each shrunk along a different axis (width, heads, head dim,
MLP, tokens, depth, front/back-loaded), compiles each with deploycomp, and measures them all
interleaved on ort-cpu. For each it prints the measured latency, the FLOPs-proportional prediction
(ms per FLOP of full DeiT-S, measured in the same run) and the latency-table prediction.

    .venv/bin/python benchmarks/bench_equal_flops.py [--batch 1] [--rounds 8]

Needs the latency table of this device (``deploycomp profile --batch B``). Writes
benchmarks/results/equal_flops_b<B>.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import brentq  # noqa: E402

from deploycomp.backends.base import get_backend  # noqa: E402
from deploycomp.backends.fingerprint import usable_cores  # noqa: E402
from deploycomp.latency.arch import BlockArch, ViTArch  # noqa: E402
from deploycomp.latency.predictor import LatencyPredictor  # noqa: E402
from deploycomp.latency.profiler import find_table  # noqa: E402
from deploycomp.latency.validate import compile_arch, measure_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = BlockArch(6, 64, 64, 1536, 197)
DEIT_S = ViTArch(384, (FULL,) * 12)


def solve(make, lo: float, hi: float, target: float, step: int) -> ViTArch:
    """The architecture make(x) whose FLOPs hit ``target``, x rounded to a multiple of ``step``."""
    x = brentq(lambda v: make(v).flops() - target, lo, hi)
    return make(max(step, round(x / step) * step))


def candidates(target: float) -> dict[str, ViTArch]:
    def blocks(**kw):
        return (replace(FULL, **kw),) * 12

    return {
        "DeiT-S (reference, 1x FLOPs)": DEIT_S,
        "uniform width (EMB, head dim, MLP)": solve(lambda e: ViTArch(int(e), blocks(qk_dim=int(e) // 6, v_dim=int(e) // 6, mlp_dim=4 * int(e))), 48, 384, target, 24),
        "MLP only": solve(lambda m: ViTArch(384, blocks(mlp_dim=int(m))), 16, 1536, target, 16),
        "3 heads, MLP fit": solve(lambda m: ViTArch(384, blocks(heads=3, mlp_dim=int(m))), 16, 1536, target, 16),
        "12 heads x 16, MLP fit": solve(lambda m: ViTArch(384, blocks(heads=12, qk_dim=16, v_dim=16, mlp_dim=int(m))), 16, 1536, target, 16),
        "6 heads x 32, MLP fit": solve(lambda m: ViTArch(384, blocks(qk_dim=32, v_dim=32, mlp_dim=int(m))), 16, 1536, target, 16),
        "QK 16 / V 64, MLP fit": solve(lambda m: ViTArch(384, blocks(qk_dim=16, mlp_dim=int(m))), 16, 1536, target, 16),
        "depth 6": ViTArch(384, (FULL,) * 6),
        "tokens 197 -> k after block 4": solve(lambda k: ViTArch(384, (FULL,) * 4 + (replace(FULL, tokens=int(k)),) * 8), 5, 197, target, 1),
        "tokens 197 -> 17 after block k": solve(lambda k: ViTArch(384, (FULL,) * int(k) + (replace(FULL, tokens=17),) * (12 - int(k))), 1, 11, target, 1),
        "front-loaded (last 8 thin)": solve(lambda m: ViTArch(384, (FULL,) * 4 + (replace(FULL, heads=1, mlp_dim=int(m)),) * 8), 16, 1536, target, 16),
        "back-loaded (first 8 thin)": solve(lambda m: ViTArch(384, (replace(FULL, heads=1, mlp_dim=int(m)),) * 8 + (FULL,) * 4), 16, 1536, target, 16),
        "EMB 192, wide MLP": solve(lambda m: ViTArch(192, blocks(heads=6, qk_dim=64, v_dim=64, mlp_dim=int(m))), 16, 8192, target, 64),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.5, help="target FLOPs as a fraction of DeiT-S")
    args = ap.parse_args(argv)

    backend = get_backend("ort-cpu", threads=args.threads)
    table = find_table("ort-cpu", args.batch, "deit-base", ROOT / "latency_tables", threads=args.threads)
    predictor = LatencyPredictor(table)
    archs = candidates(args.ratio * DEIT_S.flops())
    with tempfile.TemporaryDirectory() as tmp:
        paths = [compile_arch(a, Path(tmp), f"a{i}", backend) for i, a in enumerate(archs.values())]
        measured = measure_models(backend, paths, (1, 3, 224, 224), args.batch, args.rounds, args.iters)
    ref_ms = measured[0]["median_ms"]
    rows = []
    for (name, arch), m in zip(archs.items(), measured):
        pred = predictor.predict(arch).total_ms
        flops_pred = ref_ms * arch.flops() / DEIT_S.flops()
        rows.append({"name": name, "arch": arch.to_dict(), "gflops": arch.flops() / 1e9,
                     "flops_ratio": arch.flops() / DEIT_S.flops(), "measured": m, "table_ms": pred,
                     "table_err_pct": (pred - m["median_ms"]) / m["median_ms"] * 100, "flops_ms": flops_pred,
                     "flops_err_pct": (flops_pred - m["median_ms"]) / m["median_ms"] * 100})
    lines = [f"{'architecture':<32} {'FLOPs':>6} {'measured ms':>20} {'FLOPs-pred':>16} {'table-pred':>16}"]
    for r in rows:
        m = r["measured"]
        lines.append(f"{r['name']:<32} {r['flops_ratio']:>5.2f}x {m['median_ms']:>8.2f} ({m['p10_ms']:.1f}-{m['p90_ms']:.1f})"
                     f" {r['flops_ms']:>8.2f} ({r['flops_err_pct']:+5.1f}%) {r['table_ms']:>8.2f} ({r['table_err_pct']:+5.1f}%)")
    others = rows[1:]
    summary = {k: {"median_abs_err_pct": float(np.median([abs(r[f"{k}_err_pct"]) for r in others])),
                   "max_abs_err_pct": float(max(abs(r[f"{k}_err_pct"]) for r in others))} for k in ("flops", "table")}
    lines.append(f"equal-FLOPs models: FLOPs model median |err| {summary['flops']['median_abs_err_pct']:.1f} % "
                 f"(max {summary['flops']['max_abs_err_pct']:.1f}); table median |err| "
                 f"{summary['table']['median_abs_err_pct']:.1f} % (max {summary['table']['max_abs_err_pct']:.1f})")
    print("\n".join(lines))
    out = ROOT / "benchmarks" / "results" / f"equal_flops_b{args.batch}.json"
    out.write_text(json.dumps({"command": "python benchmarks/bench_equal_flops.py " + " ".join(argv or sys.argv[1:]),
                               "fingerprint": table.fingerprint, "table": str(table.path),
                               "protocol": {"rounds": args.rounds, "iters": args.iters, "interleaved": True},
                               "summary": summary, "rows": rows, "printed": lines}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
