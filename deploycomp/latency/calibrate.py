"""Calibrate a latency table to the device as it runs now, on one whole model.

Machines drift: the committed batch-1 ort-cpu table, re-validated on a later day, ran 1.12-1.51x
slower than when it was profiled, while its *shape* (relative costs) still held to a few percent
after one global scale. And a runtime that optimizes across parts runs a whole model faster than
the sum of its parts: on openvino-cpu the tables' sums over-predicted whole models by 12-20 %
(benchmarks/results/latency_validation_openvino-cpu_*), a bias that re-timing the table's own
parts cannot see (calibrating on four parts moved the batch-8 error from 11.8 % to 17.6 %).

So calibration measures one *whole model* the table predicts, the unpruned source of a compile
(``passes/prune.py``) or the grid's full architecture in a validation, and scales every prediction
by measured / predicted. Budgets relative to the source are unaffected by the scale; absolute
budgets are judged by measurement anyway; predicted milliseconds become the device's now. The
scale is recorded in the manifest; beyond ``DRIFT_WARN`` the caller warns and suggests
re-profiling, because a drift that large may also have changed the shape.
"""

from __future__ import annotations

import math
from typing import Any

from .arch import BlockArch, SwinArch, SwinStage, ViTArch, swin_stage_geometry
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


def calibration(predicted_ms: float, measured_ms: float, anchor: str) -> dict[str, Any]:
    """The scale that makes the table predict ``anchor`` as measured now, with its warning."""
    scale = measured_ms / predicted_ms
    out: dict[str, Any] = {"scale": scale, "bound": DRIFT_WARN, "anchor": anchor, "predicted_ms": predicted_ms,
                           "measured_ms": measured_ms}
    if abs(math.log(scale)) > math.log(DRIFT_WARN):
        out["warning"] = (f"{anchor} runs at {scale:.2f}x what the latency table predicts (bound {DRIFT_WARN}x): "
                          "predictions are scaled, but re-profile the table to trust their shape")
    return out
