"""Full-size DeiT pruned to a latency budget on ort-cpu: is the measured latency on budget, and how
long does a compile without fine-tuning take?

Random weights (speed only: no ImageNet here), so the importance comes from Gaussian inputs labelled
by the model itself; what this checks is the budget, not accuracy. Each run is a real
``deploycomp compile --latency``; its report times the unpruned and the pruned graph interleaved
(shuffled order every round) at batch 1, the budget's batch.

    .venv/bin/python benchmarks/bench_prune_deit.py      # DeiT-B at 0.5x and 0.3x, DeiT-S at 0.5x
    # the same as CLI:  deploycomp compile timm:deit_base_patch16_224 --latency 0.5x --saliency-batches 2 --calib-batch 8 -o out/deit_b_05

Writes benchmarks/results/prune_deit.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploycomp.api import CompileOptions, compile  # noqa: E402
from deploycomp.artifact import write_json  # noqa: E402
from deploycomp.pruning.schedule import PruneConfig  # noqa: E402

RUNS = [  # (model, budget, saliency batches, calibration batch)
    ("deit_base_patch16_224", "0.5x", 2, 8),
    ("deit_base_patch16_224", "0.3x", 2, 8),
    ("deit_small_patch16_224", "0.5x", 4, 32),  # the CLI defaults: the compile-time target
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="x6 interleaved rounds for the pruned-vs-unpruned timing")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prune_deit.json")
    ap.add_argument("--only", default=None, help="re-run only MODEL:BUDGET (e.g. deit_base_patch16_224:0.3x); the "
                                                 "other rows are kept from --out")
    args = ap.parse_args()
    runs = [r for r in RUNS if args.only is None or f"{r[0]}:{r[1]}" == args.only]
    if not runs:
        sys.exit(f"--only {args.only}: not one of {', '.join(f'{r[0]}:{r[1]}' for r in RUNS)}")
    kept = json.loads(args.out.read_text())["rows"] if args.only and args.out.is_file() else []
    rows = [r for r in kept if (r["model"], r["budget"]) != tuple(args.only.split(":"))] if args.only else []
    with tempfile.TemporaryDirectory() as tmp:
        for model, budget, batches, batch in runs:
            t0 = time.monotonic()
            prune = PruneConfig(latency=budget, saliency_batches=batches, batch_size=batch)
            m = compile(f"timm:{model}", Path(tmp) / f"{model}-{budget}", CompileOptions(prune=prune, measure_rounds=args.rounds),
                        progress=lambda s, n=model: print(f"  {n}: {s}", flush=True))
            seconds = time.monotonic() - t0
            p = m["pruning"]
            lat = p["latency"]
            passes = {x["pass"]: x["seconds"] for x in m["passes"]}
            row = {"model": model, "budget": budget, "requested_ratio": float(budget[:-1]),
                   "predicted_ratio": lat["predicted_ratio"], "measured_ratio": lat["measured_ratio"],
                   "budget_error_pct": (lat["measured_ratio"] / float(budget[:-1]) - 1) * 100,
                   "unpruned_ms": lat["unpruned"], "pruned_ms": lat["pruned"], "emb": p["emb"],
                   "blocks": [{k: r[k][1] for k in ("heads", "qk_dim", "v_dim", "mlp_dim")} for r in p["blocks"]],
                   "params": p["params"], "gflops": p["gflops_per_image"], "compile_seconds": seconds,
                   "on_device_checks": p["budget_checks"], "steps": [s["step"] for s in p["steps"]],
                   "prune_pass_seconds": passes.get("prune"), "parity": m["parity"]["checks"],
                   "saliency_batches": batches, "calib_batch": batch}
            rows.append(row)
            print(f"{model} {budget}: predicted {row['predicted_ratio']:.3f}x measured {row['measured_ratio']:.3f}x "
                  f"({row['budget_error_pct']:+.1f} % vs budget), EMB {p['emb']}, compile {seconds:.0f} s", flush=True)
    order = {(m, b): i for i, (m, b, _, _) in enumerate(RUNS)}
    write_json(args.out, {"batch": 1, "rows": sorted(rows, key=lambda r: order[(r["model"], r["budget"])])})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
