"""``--precision auto``: which precision a latency-budgeted compile runs in, read from the target's
latency tables per precision before any pass runs (the backend is built for the chosen one).

Predictions are the tables' as profiled: only the chosen table is calibrated on the device later,
by the prune pass. Semantic tokens change every precision alike, so they do not enter the choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the candidates, least lossy first (a tie goes to the earlier)
AUTO_PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def source_arch(model, torch_module, input_shape: tuple[int, ...]):
    """The source's architecture as the latency tables see it: its ONNX graph (a copy; the
    compile's passes run on the original), cleaned and discovered as the pipeline does."""
    import onnx_ir as ir

    from ..passes.base import DEFAULT_INVARIANTS, CompileContext, Pipeline
    from ..passes.cleanup import CleanupPass
    from ..passes.discover import DiscoverPass
    from ..passes.prune import geometry_of
    from ..pruning.plan import PrunePlan, plan_arch

    ctx = CompileContext()
    Pipeline([CleanupPass(), DiscoverPass()], DEFAULT_INVARIANTS)(ir.from_proto(ir.to_proto(model)), ctx)
    return plan_arch(ctx.structure, PrunePlan(), **geometry_of(torch_module, input_shape))


def choose_precision(tables: dict[str, tuple[Any, Path]], arch, budget: str) -> dict[str, Any]:
    """The candidate whose table predicts the unpruned ``arch`` fastest relative to fp32 (so pruning
    has the least to remove to meet ``budget``); among candidates that meet a relative budget without
    pruning, the least lossy. ``tables``: precision -> (predictor, path), fp32 among them. Returns the
    manifest's record: the choice, why, and every candidate's prediction."""
    from ..pruning.schedule import LatencyBudget

    base = tables["fp32"][0].predict(arch, scale=1.0).total_ms
    rows = {p: {"predicted_ms": pred.predict(arch, scale=1.0).total_ms, "table": str(path)} for p, (pred, path) in tables.items()}
    for row in rows.values():
        row["ratio_to_fp32"] = row["predicted_ms"] / base
    limit = LatencyBudget.parse(budget)
    limit = limit.value if limit.relative else limit.value / base
    meets = [p for p in AUTO_PRECISIONS if p in rows and rows[p]["ratio_to_fp32"] <= limit]
    if meets:
        chosen, why = meets[0], "the least lossy precision that meets the budget without pruning"
    else:
        chosen = min(rows, key=lambda p: (rows[p]["ratio_to_fp32"], AUTO_PRECISIONS.index(p)))
        why = "the fastest unpruned model: the least pruning left to meet the budget"
    return {"precision": chosen, "why": why, "budget": budget, "candidates": rows}
