"""Calibrate a latency table to the device as it runs now.

Machines drift: the committed batch-1 ort-cpu table, re-validated on a later day, ran 1.12-1.51x
slower than when it was profiled, while its *shape* (relative costs) still held to a few percent
after one global scale. So every compile and profile that uses a table first re-measures a few
anchor points of its grid, interleaved, and scales predictions by the geometric mean of
now/profiled. The scale is recorded in the manifest; beyond ``DRIFT_WARN`` the caller warns and
suggests re-profiling, because a drift that large may also have changed the shape.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .table import LatencyTable

# |log drift| beyond log(1.25): the device runs >25 % slower (or 20 % faster) than at profiling time
DRIFT_WARN = 1.25


def anchor_points(grid: dict[str, dict[str, list[int]]]) -> list[tuple[str, tuple[int, ...]]]:
    """Four grid points spanning the table's cost range: the full attention and the widest MLP at
    all tokens, at the smallest and the largest EMB."""
    att, mlp = grid["attention"], grid["mlp"]
    embs = sorted({min(att["emb"]), max(att["emb"])})
    return ([("attention", (max(att["tokens"]), e, max(att["heads"]), max(att["qk_dim"]), max(att["v_dim"])))
             for e in embs] + [("mlp", (max(mlp["tokens"]), e, max(mlp["mlp_dim"]))) for e in embs])


def measure_drift(table: LatencyTable, backend, rounds: int = 4, points=None) -> dict[str, Any]:
    """Re-measure ``points`` (default: ``anchor_points``) on ``backend`` the way the table was
    profiled (``profiler.time_part``: each part alone, warm-up then repeats, passes in shuffled
    order); the drift scale and the points.

    Timing the small parts interleaved with idle gaps instead (as whole models are timed) measured
    them ~25 % slower than profiling did while whole models matched the table (batch 1, spinning
    ONNX Runtime: a 1-2 ms part pays the workers' wake-up a 30 ms model amortizes), so the protocol
    must be the profiler's."""
    from .profiler import time_part

    points = points or anchor_points(table.grid)
    warmup, repeats = table.protocol.get("warmup", 2), table.protocol.get("repeats", 2)
    samples: list[list[float]] = [[] for _ in points]
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for i in rng.permutation(len(points)):
            part, point = points[i]
            samples[i] += time_part(backend, part, point, table.fixed, table.fingerprint["batch"], warmup, repeats)
    now = [float(np.median(s)) for s in samples]
    profiled = [table.median(part, point) for part, point in points]
    scale = float(np.exp(np.mean(np.log(np.asarray(now) / np.asarray(profiled)))))
    out: dict[str, Any] = {"scale": scale, "bound": DRIFT_WARN,
                           "points": [{"part": part, "point": list(point), "now_ms": n, "profiled_ms": p}
                                      for (part, point), n, p in zip(points, now, profiled)]}
    if abs(math.log(scale)) > math.log(DRIFT_WARN):
        out["warning"] = (f"parts take {scale:.2f}x the time they took when this latency table was profiled "
                          f"(bound {DRIFT_WARN}x): predictions are scaled, but re-profile to trust their shape")
    return out
