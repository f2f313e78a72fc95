"""Why does the latency-aware selection (η = 1) lose to the latency-blind one (η = 0) on the proxy?
(issue 18, "settle η"). No training and no timing: one-shot selections on the trained proxy's
Hessian importance and the proxy's latency table, compared on what they cost.

For each budget, saliency seed and rule, the selection runs to the budget in one step from the
unpruned proxy and reports:
- the importance it removes, as a share of the model's total (the first-order loss it costs; the
  quantity every rule trades against latency);
- what it removes per kind (heads, QK/V dims, MLP, EMB), as a fraction of each kind's units;
- how many units of each group it keeps;
- every group's first chunk from the unpruned model: its importance share against its latency share.

Rules: the additive score ``I − η·ΔLat`` (shares; η = 0, 0.5, 1, 2) and ``ratio`` (``I / ΔLat``,
the knapsack greedy). The table is the proxy's fp32 table at batch 32 of ``--target`` on this host
(default openvino-cpu, the compiler's default target, as in ``bench_design_vs_prune.py``), as profiled
(a compile scales it to the device first: ``latency_calibration`` in its manifest).

    .venv/bin/python benchmarks/analyze_selection.py        # ~1 min on 2 cores

Writes benchmarks/results/selection_analysis_<target>.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploycomp.artifact import write_json  # noqa: E402
from proxy_common import CACHE, MODEL, SHAPE, proxy_table  # noqa: E402

RULES = (("additive", 0.0), ("additive", 0.5), ("additive", 1.0), ("additive", 2.0), ("ratio", None))


def main() -> None:
    from deploycomp.frontend import load_source
    from deploycomp.frontend.timm_models import build_timm_model
    from deploycomp.ir.discover import discover
    from deploycomp.latency.predictor import LatencyPredictor
    from deploycomp.latency.table import load_table
    from deploycomp.learn.data import load_fashion_mnist
    from deploycomp.passes.base import CompileContext, Pipeline
    from deploycomp.passes.cleanup import CleanupPass
    from deploycomp.passes.prune import geometry_of, grid_floors
    from deploycomp.pruning.config import DEFAULT_GROUP_SIZES, PruneConfig
    from deploycomp.pruning.plan import PrunePlan, plan_arch
    from deploycomp.pruning.schedule import calibration_batches, unit_importance
    from deploycomp.pruning.select import next_chunk, select_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.5,0.3")
    ap.add_argument("--seeds", default="0,1,2", help="saliency batch seeds")
    ap.add_argument("--target", default="openvino-cpu")
    ap.add_argument("--table", type=Path, default=None, help="default: the target's proxy table at batch 32 on this host")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/selection_analysis_<target>.json")
    args = ap.parse_args()
    args.table = args.table or proxy_table(args.target, 32)
    args.out = args.out or ROOT / "benchmarks" / "results" / f"selection_analysis_{args.target}.json"

    weights = CACHE / "proxy-fmnist" / "model.safetensors"
    if not weights.is_file():
        sys.exit(f"{weights} not found: run benchmarks/train_proxy.py first")
    module = build_timm_model(MODEL.removeprefix("timm:"), weights)
    model = Pipeline([CleanupPass()])(load_source(MODEL, weights).model, CompileContext())  # as compile reads it
    structure = discover(model)
    predictor = LatencyPredictor(load_table(args.table, force=True))
    geometry = geometry_of(module, SHAPE)
    floors = grid_floors(predictor.table.grid, structure)
    train = load_fashion_mnist("train")

    def predict(plan: PrunePlan) -> float:
        return predictor.predict(plan_arch(structure, plan, **geometry)).total_ms

    kinds = {g: structure.graph.nodes[g]["kind"] for g in structure.groups()}
    full_ms = predict(PrunePlan())
    runs, first_chunks = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        # as the proxy benchmarks' compiles score units: Hessian importance, 16 batches of 64 training images
        config = PruneConfig(saliency_batches=16, batch_size=64)
        importance = unit_importance(config, module, structure, model,
                                     calibration_batches(module, train, SHAPE, config.saliency_batches,
                                                         config.batch_size, seed))
        total = sum(float(v.sum()) for v in importance.values())
        # every group's first chunk from the unpruned model: its importance share against its latency share
        for g in structure.groups():
            chunk = next_chunk(np.arange(len(importance[g])), importance[g], DEFAULT_GROUP_SIZES[kinds[g]],
                               floors.get(g, floors.get(kinds[g], 0)))
            if chunk is not None:
                saved = full_ms - predict(PrunePlan({g: np.setdiff1d(np.arange(len(importance[g])), chunk)}))
                first_chunks.append({"seed": seed, "group": g, "kind": kinds[g], "units": len(chunk),
                                     "importance_share": float(importance[g][chunk].sum()) / total,
                                     "latency_share": saved / full_ms})
        for budget in (float(b) for b in args.budgets.split(",")):
            for rule, eta in RULES:
                step = select_step(structure, PrunePlan(), importance, predict, budget * full_ms, eta or 0.0,
                                   floors=floors, rule=rule)
                kept = {g: step.plan.kept(structure, g) for g in structure.groups()}
                removed_importance = sum(float(importance[g].sum() - importance[g][kept[g]].sum()) for g in kept)
                per_kind = {}
                for k in dict.fromkeys(kinds.values()):
                    groups = [g for g in kinds if kinds[g] == k]
                    units = sum(len(importance[g]) for g in groups)
                    per_kind[k] = 1 - sum(len(kept[g]) for g in groups) / units
                runs.append({
                    "seed": seed, "budget": budget, "rule": rule, "eta": eta,
                    "predicted_ratio": step.predicted_ms / full_ms,
                    "importance_removed_share": removed_importance / total,
                    "removed_fraction_per_kind": per_kind,
                    "chunks_per_kind": {k: sum(kinds[r.group] == k for r in step.removals) for k in per_kind},
                    "kept": {g: int(len(v)) for g, v in kept.items()}})
    summary = []
    for budget in dict.fromkeys(r["budget"] for r in runs):
        for rule, eta in RULES:
            group = [r for r in runs if r["budget"] == budget and r["rule"] == rule and r["eta"] == eta]
            imp = np.array([r["importance_removed_share"] for r in group])
            summary.append({"budget": budget, "rule": rule if rule == "ratio" else f"additive eta={eta:g}",
                            "importance_removed_mean": float(imp.mean()), "importance_removed_min": float(imp.min()),
                            "importance_removed_max": float(imp.max()),
                            "removed_fraction_per_kind": {k: float(np.mean([r["removed_fraction_per_kind"][k] for r in group]))
                                                          for k in group[0]["removed_fraction_per_kind"]},
                            "predicted_ratio_mean": float(np.mean([r["predicted_ratio"] for r in group]))})
    kinds_order = list(summary[0]["removed_fraction_per_kind"])
    print(f"\none-shot selection on the trained proxy, seeds {args.seeds} (mean; importance removed min-max)")
    print(f"{'budget':>6} {'rule':18} {'pred':>6} {'importance removed':>22} " + " ".join(f"{k:>6}" for k in kinds_order))
    for s in summary:
        print(f"{s['budget']:6.2f} {s['rule']:18} {s['predicted_ratio_mean']:6.3f} "
              f"{s['importance_removed_mean']:8.4f} ({s['importance_removed_min']:.4f}-{s['importance_removed_max']:.4f}) "
              + " ".join(f"{s['removed_fraction_per_kind'][k]:6.2f}" for k in kinds_order))
    print("\nfirst chunk of every group, unpruned model: importance share / latency share (median over groups and seeds)")
    chunk_stats = {}
    for k in kinds_order:
        c = [f for f in first_chunks if f["kind"] == k]
        if c:
            chunk_stats[k] = {
                "importance_share_median": float(np.median([f["importance_share"] for f in c])),
                "latency_share_median": float(np.median([f["latency_share"] for f in c])),
                # the table can predict a removal to be slower (a non-monotonic part): no ratio for those
                "saves_nothing": sum(f["latency_share"] <= 0 for f in c), "chunks": len(c),
                "ratio_median": float(np.median([f["importance_share"] / f["latency_share"] for f in c
                                                 if f["latency_share"] > 0] or [np.nan]))}
            print(f"  {k:5} importance {chunk_stats[k]['importance_share_median']:.2e}  latency "
                  f"{chunk_stats[k]['latency_share_median']:.2e}  ratio {chunk_stats[k]['ratio_median']:.3f} "
                  f"({chunk_stats[k]['saves_nothing']} of {len(c)} chunks predicted to save nothing)")
    write_json(args.out, {"first_chunks": chunk_stats, "model": MODEL, "weights": str(weights), "target": args.target,
                          "table": str(args.table.resolve().relative_to(ROOT)),
                          "saliency": "Hessian (Fisher) importance, 16 batches of 64 training images, no divisors",
                          "full_predicted_ms": full_ms, "summary": summary, "runs": runs})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
