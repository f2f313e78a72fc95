"""Latency-regularized global selection: which chunk of which group to remove next.

NViT ranks every structure of the whole network on one scale: ``score = I_S − η · ΔLat_S``, with
``I_S`` the Hessian-aware importance and ``ΔLat_S`` the latency the removal saves, read from the
lookup table for the *current* architecture. Units are removed in hardware-friendly chunks (the
least important ``size`` units of a group, so dims stay multiples of 8/16), greedily, with every
group's next chunk and its latency delta re-evaluated after each removal, until the predicted
latency reaches the step's target.

Both terms are taken as shares — the chunk's part of the total importance still in the model and
of the current predicted latency — so that η is unit-free: η = 1 trades 1 % of importance for 1 %
of latency whatever the loss scale or the device (NViT's raw η = 5e-4 is tied to its ImageNet loss
scale and V100 table). η = 0 is saliency-only selection, blind to latency.

``rule="ratio"`` (the default of ``PruneConfig``) ranks chunks by importance share per latency share
instead (lowest first): the greedy of the knapsack "save the latency, lose the least importance"
(HALP's problem). Whenever chunks have ``I < η·ΔLat`` the additive score prefers the one that
saves the *most* latency even when it costs more importance per millisecond; on the proxy every
chunk's importance share is far below its latency share, so η = 1 spent its budget on heads
(ort-cpu table) or cut EMB from 96 to 16 (openvino-cpu table) and lost 6.7 pt to the ratio rule at
0.3x (``benchmarks/analyze_selection.py``, docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import DeployCompError
from ..ir.structure import Structure
from .config import DEFAULT_GROUP_SIZES, SELECTIONS
from .plan import PrunePlan


Predict = Callable[[PrunePlan], float]  # plan -> predicted latency (ms)


@dataclass
class Removal:
    group: str
    units: list[int]
    importance_share: float
    latency_share: float
    score: float


@dataclass
class StepResult:
    plan: PrunePlan
    removals: list[Removal] = field(default_factory=list)
    predicted_ms: float = 0.0


def copy_plan(structure: Structure, plan: PrunePlan) -> PrunePlan:
    return PrunePlan({g: plan.kept(structure, g).copy() for g in structure.groups()})


def next_chunk(kept: np.ndarray, importance: np.ndarray, size: int, floor: int = 0) -> np.ndarray | None:
    """The least important units to remove next: enough to reach a multiple of ``size``, else one
    chunk of ``size``; None when the group is down to one chunk or would go below ``floor``."""
    count = len(kept) % size or size
    if len(kept) <= size or len(kept) - count < floor:
        return None
    order = np.argsort(importance[kept], kind="stable")
    return np.sort(kept[order[:count]])


def _without(plan: PrunePlan, group: str, units: np.ndarray) -> PrunePlan:
    out = PrunePlan(dict(plan.keep))
    out.keep[group] = np.setdiff1d(plan.keep[group], units)
    return out


def select_step(structure: Structure, plan: PrunePlan, importance: dict[str, np.ndarray], predict: Predict,
                target_ms: float, eta: float, sizes: dict[str, int] | None = None,
                groups: set[str] | None = None, floors: dict[str, int] | None = None,
                best_effort: bool = False, *, rule: str) -> StepResult:
    """Remove chunks, lowest score first, until the predicted latency is at most ``target_ms``.
    ``floors`` (per kind, or per group: a Swin stage's own grid) keep every group inside the latency
    table's grid, where its predictions were validated (extrapolated below it, the DeiT-B table
    overestimated a 112-wide EMB by 23 %).
    ``best_effort``: stop at the floors instead of failing (targets corrected by a measurement).
    ``rule``: "additive" (``I − η·ΔLat``, NViT) or "ratio" (``I / ΔLat``, η unused)."""
    if rule not in SELECTIONS:
        raise DeployCompError(f"unknown selection rule {rule!r}: use {' or '.join(SELECTIONS)}")
    sizes = {**DEFAULT_GROUP_SIZES, **(sizes or {})}
    floors = floors or {}
    plan = copy_plan(structure, plan)
    result = StepResult(plan, predicted_ms=predict(plan))
    candidates = [g for g in structure.groups()
                  if groups is None or structure.graph.nodes[g]["kind"] in groups]
    while result.predicted_ms > target_ms:
        total_importance = sum(float(importance[g][plan.keep[g]].sum()) for g in candidates) or 1.0
        best = None
        for g in candidates:
            kind = structure.graph.nodes[g]["kind"]
            chunk = next_chunk(plan.keep[g], importance[g], sizes[kind], floors.get(g, floors.get(kind, 0)))
            if chunk is None:
                continue
            trial = _without(plan, g, chunk)
            saved = result.predicted_ms - predict(trial)
            share_i = float(importance[g][chunk].sum()) / total_importance
            share_l = saved / result.predicted_ms
            if rule == "ratio":  # a chunk that saves nothing is the last resort
                score = share_i / share_l if share_l > 0 else float("inf")
            else:
                score = share_i - eta * share_l
            if best is None or score < best[0].score:
                best = (Removal(g, chunk.tolist(), share_i, share_l, score), trial)
        if best is None:
            if best_effort:
                break
            raise DeployCompError(f"cannot reach {target_ms:.3f} ms: every group is down to one chunk or to the "
                                  f"latency table's smallest size (predicted {result.predicted_ms:.3f} ms)")
        result.removals.append(best[0])
        plan = best[1]
        result.plan = plan
        result.predicted_ms = predict(plan)
    return result


def uniform_step(structure: Structure, plan: PrunePlan, importance: dict[str, np.ndarray], predict: Predict,
                 target_ms: float, sizes: dict[str, int] | None = None,
                 floors: dict[str, int] | None = None, best_effort: bool = False,
                 kinds: tuple[str, ...] = ("emb", "heads", "mlp"), factors: dict[str, float] | None = None) -> StepResult:
    """Uniform width scaling as the DeiT family scales (Ti/S/B): one ratio r for the embedding, every
    block's head count and MLP width (head dims kept), the largest r whose predicted latency meets
    the target; units are still chosen by importance inside each group. ``kinds`` and per-group
    ``factors`` (group g keeps about r * factors[g] of its units) give a non-uniform variant of the
    same search: calibration's anchors near the budget (``passes/prune.py``)."""
    sizes = {**DEFAULT_GROUP_SIZES, **(sizes or {})}
    floors, factors = floors or {}, factors or {}
    current = copy_plan(structure, plan)
    scaled = [g for g in structure.groups() if structure.graph.nodes[g]["kind"] in kinds]

    def at(ratio: float) -> PrunePlan:
        out = copy_plan(structure, current)
        for g in scaled:
            units, kind = structure.graph.nodes[g]["units"], structure.graph.nodes[g]["kind"]
            size = sizes[kind]
            count = min(len(current.keep[g]), max(size, floors.get(g, floors.get(kind, 0)),
                                                  int(round(min(1.0, ratio * factors.get(g, 1.0)) * units / size)) * size))
            kept = current.keep[g]
            order = np.argsort(-importance[g][kept], kind="stable")
            out.keep[g] = np.sort(kept[order[:count]])
        return out

    lo, hi = 0.0, max([1.0] + [1.0 / f for g, f in factors.items() if g in scaled])
    if predict(at(lo)) > target_ms:
        if best_effort:
            return StepResult(at(lo), predicted_ms=predict(at(lo)))
        raise DeployCompError(f"uniform scaling cannot reach {target_ms:.3f} ms (minimum width predicts "
                              f"{predict(at(lo)):.3f} ms)")
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict(at(mid)) <= target_ms else (lo, mid)
    best = at(lo)
    return StepResult(best, predicted_ms=predict(best))
