"""Profile the parts of a ViT on a target and fill a latency table.

Every grid point is an ONNX micro-graph (``micrographs.py``) run by the target backend with the
session options artifacts are deployed with. Noise handling: warm-up runs, several timed repeats,
and several *passes* over the whole grid, each in a new random order, so that slow drift of the
machine spreads over all points instead of biasing a region of the grid; the table keeps every
sample and reports the median. The table is saved every few seconds; a killed profile resumes from
the last save.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from ..errors import DeployCompError
from . import micrographs
from .table import LatencyTable, cross_reference, load_table, save_table, table_path

# The DeiT-B search space: EMB <= 768, H <= 12, QK/V <= 64, MLP <= 3072, tokens <= 197.
GRIDS: dict[str, dict[str, dict[str, list[int]]]] = {
    "deit-base": {
        "attention": {"tokens": [5, 17, 50, 101, 197], "emb": [192, 384, 576, 768], "heads": [1, 3, 6, 9, 12],
                      "qk_dim": [16, 32, 48, 64], "v_dim": [16, 32, 48, 64]},
        "mlp": {"tokens": [5, 17, 50, 101, 197], "emb": [192, 384, 576, 768],
                "mlp_dim": [128, 384, 768, 1536, 2304, 3072]},
        "stem": {"emb": [192, 384, 576, 768]},
        "head": {"tokens": [5, 17, 50, 101, 197], "emb": [192, 384, 576, 768]},
        # centres = cls + 4..49 semantic tokens; keys: 197 tokens (first generator block) + centres (second)
        "cross_attention": {"queries": [5, 10, 17, 26, 50], "tokens": [50, 101, 197, 247], "emb": [192, 384, 576, 768]},
    },
    # The proxy DeiT (28 px Fashion-MNIST, patch 4: 49 tokens + cls, EMB 96, 4 heads x 24, MLP 384);
    # 5 tokens = 4 semantic tokens + cls.
    "proxy-fmnist": {
        "attention": {"tokens": [5, 17, 50], "emb": [16, 32, 48, 64, 80, 96], "heads": [1, 2, 3, 4],
                      "qk_dim": [4, 8, 16, 24], "v_dim": [4, 8, 16, 24]},
        "mlp": {"tokens": [5, 17, 50], "emb": [16, 32, 48, 64, 80, 96], "mlp_dim": [16, 64, 128, 192, 256, 384]},
        "stem": {"emb": [16, 32, 48, 64, 80, 96]},
        "head": {"tokens": [5, 17, 50], "emb": [16, 32, 48, 64, 80, 96]},
        "cross_attention": {"queries": [5, 10, 17], "tokens": [50, 67], "emb": [16, 32, 48, 64, 80, 96]},
    },
    # a small grid for tests and quick looks
    "tiny": {
        "attention": {"tokens": [5, 17], "emb": [32, 64], "heads": [1, 2], "qk_dim": [8, 16], "v_dim": [8, 16]},
        "mlp": {"tokens": [5, 17], "emb": [32, 64], "mlp_dim": [32, 128]},
        "stem": {"emb": [32, 64]},
        "head": {"tokens": [5, 17], "emb": [32, 64]},
        "cross_attention": {"queries": [2, 5], "tokens": [17, 22], "emb": [32, 64]},
    },
}
FIXED = {"deit-base": {"img_size": 224, "patch": 16, "in_chans": 3, "num_classes": 1000},
         "proxy-fmnist": {"img_size": 28, "patch": 4, "in_chans": 1, "num_classes": 10, "depth": 6},
         "tiny": {"img_size": 64, "patch": 16, "in_chans": 3, "num_classes": 10}}
# Eight passes of two: each point's median mixes eight moments of the profile, so a slow minute
# of the machine moves it less. Validation at batch 1 here: 2 passes x 5 repeats gave 12 % median /
# 27 % p90 error, 4 x 3 gave 5.6 % / 12 % (one EMB-576 point still 15 % off a re-measurement).
DEFAULT_PROTOCOL = {"warmup": 2, "repeats": 2, "passes": 8}


def grid_for(geometry: dict[str, int]) -> str:
    """The grid preset profiled for a model's input geometry and class count, else for its input
    geometry alone (another head width: the predictor scales the head part, ``predictor.head_scale``)."""
    for keys in (("img_size", "patch", "in_chans", "num_classes"), ("img_size", "patch", "in_chans")):
        for name, fixed in FIXED.items():
            if all(geometry.get(k) == fixed[k] for k in keys):
                return name
    raise DeployCompError(f"no latency grid preset covers {geometry}; presets: "
                          + ", ".join(f"{n} {f}" for n, f in FIXED.items()))


def build_part(part: str, point: tuple[int, ...], fixed: dict[str, Any], grid: dict[str, Any] | None = None,
               lowering: str | None = "reference"):
    """The micro-graph of one grid point (``grid`` and ``lowering``: the cross-attention part's
    head shape and the TokenCluster lowering of the target)."""
    if part == "cross_attention":
        return micrographs.cross_attention_part(*point, *cross_reference(grid), lowering=lowering)
    if part == "attention":
        return micrographs.attention_part(*point)
    if part == "mlp":
        return micrographs.mlp_part(*point)
    if part == "stem":
        return micrographs.stem_part(point[0], fixed["img_size"], fixed["patch"], fixed["in_chans"])
    if part == "head":
        return micrographs.head_part(point[0], point[1], fixed["num_classes"])
    raise ValueError(part)


def part_input(part: str, point: tuple[int, ...], fixed: dict[str, Any], batch: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    if part == "stem":
        shape = (batch, fixed["in_chans"], fixed["img_size"], fixed["img_size"])
    elif part == "cross_attention":  # (queries, tokens, emb): the input holds the keys
        shape = (batch, point[1], point[2])
    else:
        shape = (batch, point[0], point[1])
    return rng.standard_normal(shape).astype(np.float32)


def time_part(backend, part: str, point, table: LatencyTable, batch: int, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` runs of one part after ``warmup`` runs, timed by the backend."""
    model = build_part(part, point, table.fixed, table.grid, backend.token_cluster_lowering)
    return backend.time_part(model, part_input(part, point, table.fixed, batch), warmup, repeats)


def device_fingerprint(backend, batch: int, dtype: str) -> dict[str, Any]:
    return {**backend.fingerprint(), "batch": batch, "dtype": dtype}


def profile(backend, root, batch: int = 1, dtype: str = "fp32", grid: str = "deit-base",
            protocol: dict[str, int] | None = None, save_every_s: float = 10.0,
            progress: Callable[[int, int], None] | None = None, path=None) -> LatencyTable:
    """Fill (or resume) the table of this device at ``root``; return it when complete."""
    if dtype != "fp32":
        raise DeployCompError(f"dtype {dtype} is not supported yet on this target; profile fp32")
    if grid not in GRIDS:
        raise DeployCompError(f"unknown grid '{grid}': use one of {', '.join(GRIDS)}")
    fp = device_fingerprint(backend, batch, dtype)
    path = path or table_path(root, fp, grid)
    protocol = {**DEFAULT_PROTOCOL, **(protocol or {})}
    table = LatencyTable(fp, GRIDS[grid], FIXED[grid], {**protocol, "grid_name": grid})
    if path.is_file():  # resume: keep every part a previous run measured on the same grid, so a
        old = load_table(path, fp)  # part kind added to the preset since is all that is profiled
        if old.protocol == table.protocol:
            table.entries = {part: points for part, points in old.entries.items()
                             if old.grid.get(part) == table.grid.get(part)}
            table.profiling_seconds = old.profiling_seconds
    work = [(part, p) for part in table.parts for p in table.points(part)]
    total = len(work) * protocol["passes"]
    done = sum(min(len(table.samples(part, p)) // protocol["repeats"], protocol["passes"]) for part, p in work)
    rng = np.random.default_rng(int(time.time()))
    start, last_save = time.perf_counter(), time.perf_counter()
    base_seconds = table.profiling_seconds
    if progress:
        progress(done, total)
    for pass_index in range(protocol["passes"]):
        todo = [w for w in work if len(table.samples(*w)) // protocol["repeats"] <= pass_index]
        for idx in rng.permutation(len(todo)):
            part, point = todo[idx]
            table.add_samples(part, point, time_part(backend, part, point, table, batch,
                                                     protocol["warmup"], protocol["repeats"]))
            done += 1
            if progress:
                progress(done, total)
            if time.perf_counter() - last_save > save_every_s:
                table.profiling_seconds = base_seconds + time.perf_counter() - start
                save_table(table, path)
                last_save = time.perf_counter()
    table.profiling_seconds = base_seconds + time.perf_counter() - start
    save_table(table, path)
    return table
