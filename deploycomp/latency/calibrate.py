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

from ..bench.harness import measure_interleaved, stats
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
    """Re-measure ``points`` (default: ``anchor_points``) on ``backend``; the drift scale and the points."""
    from .validate import part_candidate

    points = points or anchor_points(table.grid)
    cands = [part_candidate(backend, part, point, table.fixed) for part, point in points]
    times = measure_interleaved(cands, table.fingerprint["batch"], rounds=rounds, iters=table.protocol.get("repeats", 2),
                                warmup=2)
    now = [stats(times[c.name])["median_ms"] for c in cands]
    profiled = [table.median(part, point) for part, point in points]
    scale = float(np.exp(np.mean(np.log(np.asarray(now) / np.asarray(profiled)))))
    out: dict[str, Any] = {"scale": scale, "bound": DRIFT_WARN,
                           "points": [{"part": part, "point": list(point), "now_ms": n, "profiled_ms": p}
                                      for (part, point), n, p in zip(points, now, profiled)]}
    if abs(math.log(scale)) > math.log(DRIFT_WARN):
        out["warning"] = (f"parts take {scale:.2f}x the time they took when this latency table was profiled "
                          f"(bound {DRIFT_WARN}x): predictions are scaled, but re-profile to trust their shape")
    return out
