"""Pruning plans for the GPU check (``scripts/gpu_check.py``, check 4), made on CPU from the committed tables.

The GPU machine cannot run the compiler's pruning (no time: 15 minutes in all), and its speed check
needs only the *architecture* a budget leads to, not trained weights. So each plan here is the
selection ``deploycomp compile --latency R`` makes, from the committed ort-cpu latency table at batch
1 (the compiler's default latency batch), without any training:

* importance: the magnitude baseline (mean |w| of every coupled slice, ``pruning.saliency``) of a
  randomly initialised timm model (seed 0). Random weights have nearly equal magnitudes, so the
  latency term decides the selection; that is stated in every JSON;
* selection, two methods of the compiler, each in one step to the predicted target and never below
  the table's grid: ``magnitude``, NViT's latency-regularized global selection
  (``pruning.select.select_step``, eta 1, the default chunk sizes), which with near-equal importance
  cuts whatever the table prices highest per unit (extreme shapes: the embedding down to the grid's
  192, single heads); and ``uniform``, DeiT-style width scaling (``pruning.select.uniform_step``:
  one ratio for the embedding, every block's heads and MLP);
* no distillation, no fine-tuning, no measurement on a device (the compiler closes the budget on
  the target; here the prediction is all there is).

    PYTHONPATH=. .venv/bin/python scripts/make_gpu_plans.py     # writes benchmarks/gpu_plans/*.json (~2 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("deit_small_patch16_224", "deit_base_patch16_224")
RATIOS = (0.5, 0.3)
TABLE = ROOT / "latency_tables" / "ort-cpu" / "amd-epyc-avx512-vnni-bf16-2c-t2-b1-fp32-onnxruntime1.32.0.json"
COMMON = ("table-driven selection without training: magnitude importance (mean |w| of coupled slices) of a randomly "
          "initialised timm model (torch seed 0), so the latency table decides; one step to the predicted target, kept "
          "inside the table's grid; no distillation, no fine-tuning, no on-device measurement")
METHODS = {
    "magnitude": "NViT's latency-regularized global selection (pruning.select.select_step, eta 1, default chunk sizes). "
                 + COMMON,
    "uniform": "DeiT-style uniform width scaling (pruning.select.uniform_step: one ratio for EMB, heads, MLP). " + COMMON,
}


def make_plans(model_name: str, ratios, table_path: Path) -> list[dict]:
    import torch

    from deploycomp.frontend import load_source
    from deploycomp.latency.predictor import LatencyPredictor
    from deploycomp.latency.table import load_table
    from deploycomp.passes.base import DEFAULT_INVARIANTS, CompileContext, Pipeline
    from deploycomp.passes.cleanup import CleanupPass
    from deploycomp.passes.discover import DiscoverPass
    from deploycomp.passes.prune import grid_floors
    from deploycomp.pruning.plan import PrunePlan, plan_arch
    from deploycomp.pruning.saliency import magnitude_importance
    from deploycomp.pruning.select import copy_plan, select_step, uniform_step

    torch.manual_seed(0)
    src = load_source(f"timm:{model_name}")
    ctx = CompileContext(family=src.family)
    model = Pipeline([CleanupPass(), DiscoverPass()], DEFAULT_INVARIANTS)(src.model, ctx)
    structure, module = ctx.structure, src.torch_module
    geometry = {"img_size": src.input_shape[-1], "patch": int(module.patch_embed.patch_size[0]),
                "in_chans": src.input_shape[1], "num_classes": int(module.num_classes)}
    table = load_table(table_path)
    predictor = LatencyPredictor(table)

    def predict(plan) -> float:
        return predictor.predict(plan_arch(structure, plan, **geometry)).total_ms

    importance = magnitude_importance(module, structure, model)
    full = copy_plan(structure, PrunePlan())
    base_ms = predict(full)
    base_arch = plan_arch(structure, full, **geometry)
    plans = []
    for method, ratio in ((m, r) for m in METHODS for r in ratios):
        if method == "magnitude":
            result = select_step(structure, full, importance, predict, ratio * base_ms, eta=1.0, rule="additive",
                                 floors=grid_floors(table.grid))
        else:
            result = uniform_step(structure, full, importance, predict, ratio * base_ms, floors=grid_floors(table.grid))
        arch = plan_arch(structure, result.plan, **geometry)
        plans.append({
            "schema": 1, "model": model_name, "budget": f"{ratio}x", "method": method, "how": METHODS[method],
            "latency_table": str(table_path.relative_to(ROOT)), "table_batch": 1,
            "predicted_ms": round(result.predicted_ms, 4), "unpruned_predicted_ms": round(base_ms, 4),
            "predicted_ratio": round(result.predicted_ms / base_ms, 4),
            "flops_ratio": round(arch.flops() / base_arch.flops(), 4), "gflops": round(arch.flops() / 1e9, 3),
            "unpruned_gflops": round(base_arch.flops() / 1e9, 3), "removals": len(result.removals),
            "arch": arch.to_dict(),
        })
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_plans")
    ap.add_argument("--table", type=Path, default=TABLE)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        t0 = time.monotonic()
        for plan in make_plans(name, RATIOS, args.table.resolve()):
            path = args.out / f"{name}-{plan['budget']}-{plan['method']}.json"
            path.write_text(json.dumps(plan, indent=1) + "\n")
            print(f"{path.relative_to(ROOT)}: predicted {plan['predicted_ratio']:.3f}x, FLOPs {plan['flops_ratio']:.3f}x "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
