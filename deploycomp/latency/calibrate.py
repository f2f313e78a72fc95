"""Calibrate a latency table to the device as it runs now, on one whole model.

Machines drift: the committed batch-1 ort-cpu table, re-validated on a later day, ran 1.12-1.51x
slower than when it was profiled, while its *shape* (relative costs) still held to a few percent
after one global scale. And a runtime that optimizes across parts runs a whole model faster than
the sum of its parts: on openvino-cpu the tables' sums over-predicted whole models by 12-20 %
(benchmarks/results/latency_validation_openvino-cpu_*), a bias that re-timing the table's own
parts cannot see (calibrating on four parts moved the batch-8 error from 11.8 % to 17.6 %).

So calibration measures *whole models* the table predicts, interleaved, and scales every
prediction by measured / predicted. One anchor is not always enough: the ort-cpu batch-8 table
predicted the grid's full DeiT-B at 1.02x its measurement but 20 smaller architectures at 0.94x
(sd 0.025), so scaling by the full model alone left a median error of 8.6 %. Two anchors are not
always enough either: at batch 1 on ort-cpu the same 20 architectures, measured in two quiet runs,
differed per model by 8 % (sd of the log ratio after the common drift), so one anchor's scale is
that noisy, and a uniform mid-width anchor alone set the scale 10 % below what the non-uniform
models ran at (benchmarks/results/latency_validation_ort-cpu_b1_*). Hence several anchors and one
least-squares line through them in log-log (predicted ms -> log scale; ``Calibration.scale_at``),
held constant beyond the anchors so it never extrapolates a trend: the unpruned source, a copy
narrowed uniformly near the budget and copies narrowed non-uniformly (every group by its own seeded
factor, as pruning narrows) in a compile (``passes/prune.py``); the grid's full architecture, a
uniform and non-uniform mid-width ones in a validation. With two anchors the line is the
interpolation between them. Budgets relative to the source are unaffected by a constant scale;
absolute budgets are judged by measurement anyway; predicted milliseconds become the device's now.
The anchors are recorded in the manifest; a scale beyond ``DRIFT_WARN`` warns and suggests
re-profiling, because a drift that large may also have changed the shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .arch import BlockArch, SwinArch, SwinStage, ViTArch, swin_stage_geometry, width_steps
from .table import LatencyTable

# |log scale| beyond log(1.25): the model runs >25 % slower (or 20 % faster) than the table says
DRIFT_WARN = 1.25


def full_arch(table: LatencyTable) -> ViTArch | SwinArch:
    """The grid's widest architecture (the unpruned model the grid was laid out for: DeiT-B for
    deit-base, the proxy DeiT for proxy-fmnist, Swin-T for swin-t): the anchor of a validation's
    calibration."""
    fixed = table.fixed
    if "window" in fixed:  # a Swin grid: every stage at its widest, with the grid's depths
        stages = []
        for s, ((res, window), depth) in enumerate(zip(swin_stage_geometry(fixed), fixed["depths"])):
            att, mlp = table.grid[f"window_attention.{s}"], table.grid[f"mlp.{s}"]
            block = BlockArch(max(att["heads"]), max(att["qk_dim"]), max(att["v_dim"]), max(mlp["mlp_dim"]), window**2)
            stages.append(SwinStage(max(att["emb"]), res, window, (block,) * depth))
        return SwinArch(tuple(stages), img_size=fixed["img_size"], patch=fixed["patch"], in_chans=fixed["in_chans"],
                        num_classes=fixed["num_classes"])
    att, mlp = table.grid["attention"], table.grid["mlp"]
    tokens = (fixed["img_size"] // fixed["patch"]) ** 2 + 1
    block = BlockArch(max(att["heads"]), max(att["qk_dim"]), max(att["v_dim"]), max(mlp["mlp_dim"]), tokens)
    return ViTArch(max(att["emb"]), (block,) * fixed.get("depth", 12), img_size=fixed["img_size"], patch=fixed["patch"],
                   in_chans=fixed["in_chans"], num_classes=fixed["num_classes"])


def mid_arch(table: LatencyTable, fraction: float = 0.55, seed: int | None = None) -> ViTArch | SwinArch:
    """The full architecture narrowed (EMB, heads, QK, V, MLP) to about ``fraction`` of its widths,
    off the grid's points: an anchor of a validation, near the middle of the random architectures it
    predicts. Uniformly without a ``seed``; with one, every block's heads, QK, V and MLP get
    ``fraction`` times their own factor in [0.6, 1.4] (EMB stays global), non-uniform like the
    models validated. A Swin's stages are narrowed to 0.75 instead: its grid goes down to half a
    stage's width, and every stage must stay wider than the one before."""
    full = full_arch(table)
    if isinstance(full, SwinArch):
        step, fraction = {"emb": 8, "heads": 1, "qk_dim": 8, "v_dim": 8, "mlp_dim": 16}, 0.75
    else:
        step = width_steps(table.grid)
    rng = np.random.default_rng(seed) if seed is not None else None

    def narrow(value: int, key: str, factor: float = 1.0) -> int:
        return min(value, max(step[key], int(round(value * fraction * factor / step[key])) * step[key]))

    def narrowed(b: BlockArch) -> BlockArch:
        f = rng.uniform(0.6, 1.4, 4) if rng is not None else np.ones(4)
        return BlockArch(narrow(b.heads, "heads", f[0]), narrow(b.qk_dim, "qk_dim", f[1]),
                         narrow(b.v_dim, "v_dim", f[2]), narrow(b.mlp_dim, "mlp_dim", f[3]), b.tokens)

    if isinstance(full, SwinArch):
        return replace(full, stages=tuple(replace(st, emb=narrow(st.emb, "emb"), blocks=tuple(map(narrowed, st.blocks)))
                                          for st in full.stages))
    return replace(full, emb=narrow(full.emb, "emb"), blocks=tuple(map(narrowed, full.blocks)))


@dataclass(frozen=True)
class Calibration:
    """Measured / predicted at one or more whole-model anchors, as a scale over predicted ms."""

    predicted_ms: tuple[float, ...]  # raw table predictions of the anchors, ascending
    measured_ms: tuple[float, ...]

    @classmethod
    def of(cls, anchors: list[tuple[float, float]]) -> "Calibration":
        pairs = sorted(anchors)
        return cls(tuple(p for p, _ in pairs), tuple(m for _, m in pairs))

    def scale_at(self, predicted_ms: float) -> float:
        """log(scale) on the least-squares line in log(predicted ms) through the anchors (through
        both when there are two), constant beyond the smallest and largest anchor."""
        x, y = np.log(self.predicted_ms), np.log(np.asarray(self.measured_ms) / np.asarray(self.predicted_ms))
        if np.ptp(x) < 1e-9:  # one anchor, or all at one size: their mean scale
            return float(np.exp(y.mean()))
        slope, intercept = np.polyfit(x, y, 1)
        return float(np.exp(intercept + slope * np.clip(math.log(predicted_ms), x.min(), x.max())))


def calibration(anchors: list[tuple[str, float, float, dict]]) -> dict[str, Any]:
    """The manifest's record of (anchor, predicted ms, measured ms, architecture) tuples, the first
    being the unpruned source (its scale is the headline), with a warning when any scale is beyond
    the bound."""
    rows = [{"anchor": name, "predicted_ms": p, "measured_ms": m, "scale": m / p, "arch": arch}
            for name, p, m, arch in anchors]
    out: dict[str, Any] = {**rows[0], "bound": DRIFT_WARN, "anchors": rows}
    worst = max(rows, key=lambda r: abs(math.log(r["scale"])))
    if abs(math.log(worst["scale"])) > math.log(DRIFT_WARN):
        out["warning"] = (f"{worst['anchor']} runs at {worst['scale']:.2f}x what the latency table predicts (bound "
                          f"{DRIFT_WARN}x): predictions are scaled, but re-profile the table to trust their shape")
    return out


def fitted(record: dict[str, Any]) -> Calibration:
    """The scale curve of a ``calibration`` record."""
    return Calibration.of([(r["predicted_ms"], r["measured_ms"]) for r in record["anchors"]])
