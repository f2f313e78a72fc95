"""NViT pruning of the proxy DeiT on Fashion-MNIST to half its latency, against the baselines.

Four methods, one harness, one budget, the same distillation and fine-tuning budget:
hessian (NViT, eta = 1), hessian with eta = 0 (latency-blind), magnitude (L1 groups), uniform width
scaling. Each is a real ``deploycomp compile --latency`` (the artifact is verified against its
pruned torch model and scored on all 10 000 test images on ort-cpu). At the end the unpruned
graph and the four artifacts are timed interleaved in one run (shuffled order every round), at
the budget's batch and at batch 1.

    .venv/bin/python benchmarks/train_proxy.py          # the teacher, once (~55 min)
    .venv/bin/python benchmarks/bench_prune_proxy.py    # ~45 min on 2 cores; resumes per method

Fine-tuning uses stored top-5 teacher logits (TinyViT) written once for all methods. Results go
to benchmarks/results/prune_proxy.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploycomp.api import CompileOptions, compile  # noqa: E402
from deploycomp.artifact import read_manifest, write_json  # noqa: E402
from proxy_common import CACHE, MODEL, ratio_fields, teacher_and_logits, time_against_source  # noqa: E402

METHODS = {  # name -> (method, eta)
    "hessian": ("hessian", 1.0),
    "hessian-eta0": ("hessian", 0.0),
    "magnitude": ("magnitude", 1.0),
    "uniform": ("uniform", 1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", default="0.5x")
    ap.add_argument("--batch", type=int, default=32, help="batch the budget is for (latency table)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--kd-steps", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--budget-rounds", type=int, default=0,
                    help="on-device budget checks during pruning (0, as recorded: every method stops at the table's "
                         "predicted budget and the final interleaved run measures them side by side)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prune_proxy.json")
    args = ap.parse_args()

    weights, logits = teacher_and_logits(args.epochs)
    work = CACHE / "prune-bench"
    work.mkdir(parents=True, exist_ok=True)

    from deploycomp.pruning.schedule import PruneConfig

    artifacts = {}
    for name in args.methods.split(","):
        method, eta = METHODS[name]
        config = PruneConfig(latency=args.latency, method=method, selection="additive", eta=eta, steps=args.steps,
                             saliency_batches=16,
                             batch_size=64, kd_steps=args.kd_steps, finetune_epochs=args.epochs,
                             teacher_logits=str(logits), budget_rounds=args.budget_rounds)
        out = work / f"{name}-{args.latency}-b{args.batch}-e{args.epochs}"
        wanted = {k: v for k, v in vars(config).items() if k != "teacher_logits"}
        if (out / "manifest.json").is_file():
            done = read_manifest(out)["pruning"]["config"]
            wanted = json.loads(json.dumps(wanted))
            if all(wanted.get(k) == v for k, v in done.items() if k != "teacher_logits"):
                print(f"{name}: reusing {out}", flush=True)
                artifacts[name] = out
                continue
        print(f"{name}: compiling -> {out}", flush=True)
        compile(MODEL, out, CompileOptions(weights=str(weights), data="fashion-mnist", prune=config,
                                           latency_batch=args.batch, measure_rounds=0, seed=0),
                progress=lambda msg, n=name: print(f"  {n}: {msg}", flush=True))
        artifacts[name] = out

    rows = measure_all(artifacts, args.batch, args.rounds)
    report = {"model": MODEL, "latency_budget": args.latency, "budget_batch": args.batch, "steps": args.steps,
              "kd_steps_per_step": args.kd_steps, "finetune_epochs": args.epochs, "teacher_logits": "top-5, stored",
              "rounds": args.rounds, "rows": rows}
    print_table(report)
    write_json(args.out, report)
    print(f"wrote {args.out}")


def measure_all(artifacts: dict[str, Path], batch: int, rounds: int) -> list[dict]:
    """Unpruned graph and every artifact, interleaved, at ``batch`` and at batch 1."""
    from deploycomp.bench.harness import stats

    timing, base = time_against_source(artifacts, CACHE / "proxy-fmnist" / "model.safetensors", batch, rounds,
                                       source="unpruned")
    rows = [{"method": "unpruned", **{f"b{b}": stats(timing[b]["unpruned"]) for b in timing}}]
    for name, path in artifacts.items():
        m = read_manifest(path)
        p, acc = m["pruning"], m["accuracy"]
        row = {"method": name, "artifact": str(path), "emb": p["emb"][1],
               "blocks": [{k: r[k][1] for k in ("heads", "qk_dim", "v_dim", "mlp_dim")} for r in p["blocks"]],
               "params": p["params"], "gflops": p["gflops_per_image"],
               "predicted_ratio": p["latency"]["predicted_ratio"],
               "top1_unpruned": acc["reference_top1"], "top1": acc["artifact_top1"], "delta_pt": acc["delta_pt"],
               "finetune_history": p["finetune"], "prune_seconds": p["seconds"]}
        for b in timing:
            row.update(ratio_fields(timing[b][name], base[b], b))
        rows.append(row)
    return rows


def print_table(report: dict) -> None:
    b = report["budget_batch"]
    print(f"\nproxy DeiT, budget {report['latency_budget']} at batch {b}, {report['steps']} steps x "
          f"{report['kd_steps_per_step']} KD steps, {report['finetune_epochs']} fine-tuning epochs")
    print(f"{'method':14} {'EMB':>4} {'params':>8} {'GFLOPs':>7} {'pred':>6} {'meas b' + str(b):>9} "
          f"{'p10-p90':>12} {'meas b1':>8} {'top-1':>6} {'delta':>6}")
    for r in report["rows"]:
        if r["method"] == "unpruned":
            print(f"{'unpruned':14} {'96':>4} {'':>8} {'':>7} {'1':>6} {1.0:9.3f} {'':>12} {1.0:8.3f} "
                  f"{report['rows'][1]['top1_unpruned']:6.2f}")
            continue
        lo, hi = r[f"ratio_b{b}_p10_p90"]
        print(f"{r['method']:14} {r['emb']:>4} {r['params'][1] / 1e6:7.3f}M {r['gflops'][1]:7.4f} "
              f"{r['predicted_ratio']:6.3f} {r[f'ratio_b{b}']:9.3f} {lo:5.3f}-{hi:5.3f} {r['ratio_b1']:8.3f} "
              f"{r['top1']:6.2f} {r['delta_pt']:+6.2f}")


if __name__ == "__main__":
    main()
