"""Profile the parts of a ViT on a target and fill a latency table.

Every grid point is an ONNX micro-graph (``micrographs.py``) run by the target backend with the
session options artifacts are deployed with. Noise handling: warm-up runs, several timed repeats,
and several *passes* over the whole grid, each in a new random order, so that slow drift of the
machine spreads over all points instead of biasing a region of the grid; the table keeps every
sample and reports the median. The table is saved every few seconds; a killed profile resumes from
the last save.

**Precision.** A table is per (target, precision): its fingerprint's ``dtype`` names the precision
(and ``quantizer`` how int8 was made), and so does its file name. Micro-graphs are put in that
precision the way the compiler puts a model in it (``micrograph_preparer``): int8 by the target's
quantizer (openvino-cpu: NNCF post-training quantization, transformer preset, one synthetic
calibration sample, since scales do not change which kernels run and the weights are random;
ort-cpu: ONNX Runtime's dynamic int8), fp16/bf16 graph precision by the precision pass, a runtime
precision (OpenVINO bf16) by the backend the caller built. NNCF costs 1.4-2.5 s per micro-graph
here (subset 1 or 4, bias correction on or off: all within noise), more than timing one, so the
quantized micro-graphs are cached beside the table (``<table>.micrographs/``) while it is being
profiled: every pass after the first and every resumed profile reads them; the cache is removed
when the table is complete.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DeployCompError
from . import micrographs
from .arch import handed_on_geometry, swin_stage_geometry, window_count
from .table import LatencyTable, cross_reference, load_table, part_kind, save_table, stage_of, table_path

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


def swin_grid(fixed: dict[str, Any], embs: list[list[int]], heads: list[list[int]], head_dims: list[int],
              mlp_dims: list[list[int]], semantic: dict[int, list[int]] | None = None) -> dict[str, dict[str, list[int]]]:
    """A Swin grid: per stage s, ``window_attention.s`` and ``mlp.s`` at the stage's own windows and
    tokens (fixed by the input geometry) over its own widths ``embs[s]``, heads ``heads[s]`` and MLP
    widths ``mlp_dims[s]`` (pruning never moves a block to another stage's sizes, so one product
    grid over all stages would profile mostly sizes no model has); ``patch_merging.s`` from stage
    s's widths to stage s+1's; the stem at stage 0's widths, the head at the last stage's.

    ``semantic`` (stage -> semantic tokens per window, ``tokens/stvit_swin.py``) adds what that
    design runs: ``window_cross_attention.s`` (M queries over the window's w², w² + M or M keys, and
    the recovery's w² over M), the MLP on windows x M tokens, and, for each M, the smaller grids of
    the later stages (their windows, MLP, patch merging and head at those tokens)."""
    geometry = swin_stage_geometry(fixed)
    grid: dict[str, dict[str, list[int]]] = {"swin_stem": {"emb": embs[0]},
                                              "swin_head": {"tokens": [geometry[-1][0] ** 2], "emb": embs[-1]}}
    for s, (res, window) in enumerate(geometry):
        windows = window_count(res, window)
        grid[f"window_attention.{s}"] = {"windows": [windows], "tokens": [window * window], "emb": embs[s],
                                         "heads": heads[s], "qk_dim": head_dims, "v_dim": head_dims,
                                         "shift": [0, 1] if windows > 1 else [0]}
        grid[f"mlp.{s}"] = {"tokens": [res * res], "emb": embs[s], "mlp_dim": mlp_dims[s]}
        if s + 1 < len(geometry):
            grid[f"patch_merging.{s}"] = {"tokens": [res * res], "emb": embs[s], "out_emb": embs[s + 1]}

    def add(part: str, key: str, *values: int) -> None:
        grid[part][key] = sorted({*grid[part][key], *values})

    for s, counts in (semantic or {}).items():
        res, window = geometry[s]
        full, windows = window * window, window_count(res, window)
        grid[f"window_cross_attention.{s}"] = {"windows": [windows], "queries": sorted({*counts, full}),
                                               "tokens": sorted({*counts, full, *(full + m for m in counts)}),
                                               "emb": embs[s]}
        for m in counts:
            add(f"mlp.{s}", "tokens", windows * m)
            side = (res // window) * math.isqrt(m)  # the grid the stage hands on
            for k, (later, win) in enumerate(handed_on_geometry(geometry, s, side), start=s + 1):
                if side % 2:  # timm pads an odd grid before merging; the micro-graph does not
                    raise ValueError(f"{m} semantic tokens in stage {s}: a {side}x{side} grid to merge")
                add(f"patch_merging.{k - 1}", "tokens", side * side)
                side = later
                add(f"window_attention.{k}", "windows", window_count(side, win))
                add(f"window_attention.{k}", "tokens", win * win)
                add(f"mlp.{k}", "tokens", side * side)
            add("swin_head", "tokens", side * side)
    return grid


FIXED = {"deit-base": {"img_size": 224, "patch": 16, "in_chans": 3, "num_classes": 1000},
         "proxy-fmnist": {"img_size": 28, "patch": 4, "in_chans": 1, "num_classes": 10, "depth": 6},
         # the tests' tiny DeiTs (tests/models.py, 2-4 blocks): validation anchors and random
         # architectures take this depth, so a test validates at its models' depth, not at DeiT's 12
         "tiny": {"img_size": 64, "patch": 16, "in_chans": 3, "num_classes": 10, "depth": 4},
         # Swin-T and Swin-S (same geometry and widths; Swin-S is deeper in stage 2)
         "swin-t": {"img_size": 224, "patch": 4, "in_chans": 3, "num_classes": 1000, "window": 7,
                    "depths": [2, 2, 6, 2]},
         # the tests' tiny Swin (tests/conftest.py): 14x14 in four 7x7 windows, then 7x7
         "swin-micro": {"img_size": 56, "patch": 4, "in_chans": 3, "num_classes": 10, "window": 7, "depths": [2, 2]}}
# Swin-T: stage s has width 96·2^s and 3·2^s heads of 32 channels, MLP 4x; stage 0's width down to
# a quarter, the others' to half (pruning keeps each above the previous stage's: ``passes/prune.grid_floors``),
# heads down to one, head dims down to 8, MLP down to half the width.
GRIDS["swin-t"] = swin_grid(FIXED["swin-t"],
                            embs=[[24, 48, 72, 96]] + [[c // 2, 2 * c // 3, 5 * c // 6, c] for c in (192, 384, 768)],
                            heads=[[1, 2, 3], [1, 2, 4, 6], [1, 4, 8, 12], [1, 8, 16, 24]], head_dims=[8, 16, 32],
                            mlp_dims=[[c // 2, c, 2 * c, 3 * c, 4 * c] for c in (96, 192, 384, 768)],
                            semantic={2: [4, 9, 16]})  # STViT-R's stage; 9 per 7x7 window: the benchmark's
GRIDS["swin-micro"] = swin_grid(FIXED["swin-micro"], embs=[[24, 32], [48, 64]], heads=[[1, 2], [1, 4]],
                                head_dims=[8, 16], mlp_dims=[[64, 128], [128, 256]], semantic={0: [4]})
# Eight passes of two: each point's median mixes eight moments of the profile, so a slow minute
# of the machine moves it less. Validation at batch 1 here: 2 passes x 5 repeats gave 12 % median /
# 27 % p90 error, 4 x 3 gave 5.6 % / 12 % (one EMB-576 point still 15 % off a re-measurement).
# ``chain``: a block half is measured as what one more copy of it adds to a chain (see ``time_part``).
DEFAULT_PROTOCOL = {"warmup": 2, "repeats": 2, "passes": 8, "chain": 2}
# Part kinds whose output has their input's shape, so copies of them chain.
CHAINED_KINDS = ("attention", "mlp", "window_attention")


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
    kind = part_kind(part)
    if kind == "mlp":  # a Swin stage's
        return micrographs.mlp_part(*point)
    if kind == "window_attention":
        windows, tokens, emb, heads, qk_dim, v_dim, shift = point
        window = _side(tokens)
        return micrographs.window_attention_part(_side(windows) * window, window, emb, heads, qk_dim, v_dim,
                                                 shift * (window // 2))
    if kind == "window_cross_attention":
        return micrographs.window_cross_attention_part(*point, *cross_reference(grid, f"window_attention.{stage_of(part)}"),
                                                       lowering=lowering)
    if kind == "patch_merging":
        return micrographs.patch_merging_part(_side(point[0]), point[1], point[2])
    if kind == "swin_stem":
        return micrographs.swin_stem_part(point[0], fixed["img_size"], fixed["patch"], fixed["in_chans"])
    if kind == "swin_head":
        return micrographs.swin_head_part(point[0], point[1], fixed["num_classes"])
    raise ValueError(part)


def _side(square: int) -> int:
    side = int(round(square**0.5))
    assert side * side == square, square
    return side


def part_input(part: str, point: tuple[int, ...], fixed: dict[str, Any], batch: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    kind = part_kind(part)
    if kind in ("stem", "swin_stem"):
        shape = (batch, fixed["in_chans"], fixed["img_size"], fixed["img_size"])
    elif kind == "window_attention":  # the stage's (batch, R, R, emb) grid
        side = _side(point[0]) * _side(point[1])
        shape = (batch, side, side, point[2])
    elif kind in ("patch_merging", "swin_head"):
        shape = (batch, _side(point[0]), _side(point[0]), point[1])
    elif part == "cross_attention":  # (queries, tokens, emb): the input holds the keys
        shape = (batch, point[1], point[2])
    elif kind == "window_cross_attention":  # (windows, queries, tokens, emb): per window, the larger set
        shape = (batch, point[0], max(point[1], point[2]), point[3])
    else:
        shape = (batch, point[0], point[1])
    return rng.standard_normal(shape).astype(np.float32)


Prepare = Callable[[str, tuple[int, ...], Any], Any]


def time_part(backend, part: str, point, table: LatencyTable, batch: int, warmup: int, repeats: int,
              prepare: Prepare | None = None) -> list[float]:
    """Milliseconds of ``repeats`` runs of one part after ``warmup`` runs, timed by the backend;
    ``prepare(part, point, model)`` puts the micro-graph in the table's precision.

    A block half (``CHAINED_KINDS``) under a protocol with ``chain`` = n > 1 is measured in context:
    sample i is (time of n chained copies - time of one copy) / (n - 1). A micro-graph alone also pays
    what a whole model pays once: the call, its input and output at the graph's edges, the runtime's
    layout conversions there. Summed over 12 parts that overhead swamped thin models: on openvino-cpu
    at batch 32 on the proxy, a 6-block EMB-96 model with 8-wide heads and 16-wide MLPs ran in
    3.7 ms; its parts alone summed to 5.9 ms, their in-context costs to 3.5 ms (the residual Add at a
    graph's output cost 0.18 ms there, 0.03 ms inside the model). The stem and the head stay
    measured alone: each sits at one edge of the model anyway."""
    model = build_part(part, point, table.fixed, table.grid, backend.token_cluster_lowering)
    if prepare is not None:
        model = prepare(part, point, model)
    x = part_input(part, point, table.fixed, batch)
    copies = int(table.protocol.get("chain", 1))
    if copies < 2 or part_kind(part) not in CHAINED_KINDS:
        return backend.time_part(model, x, warmup, repeats)
    alone = backend.time_part(model, x, warmup, repeats)
    chain = backend.time_part(micrographs.chained(model, copies), x, warmup, repeats)
    return [max(c - a, 0.0) / (copies - 1) for a, c in zip(alone, chain)]  # a copy cannot cost less than nothing


def check_precision(backend, precision: str) -> str:
    """How ``backend`` runs ``precision`` ("graph" or "runtime"); one line if it does not."""
    how = backend.precisions.get(precision)
    if how is None:
        raise DeployCompError(f"target '{backend.name}' runs precisions {', '.join(backend.precisions)}, "
                              f"not '{precision}'")
    if how == "runtime" and backend.options().get("precision", "fp32") != precision:
        raise DeployCompError(f"{precision} is a runtime option of '{backend.name}': build the backend with "
                              f"precision='{precision}'")
    return how


def device_fingerprint(backend, batch: int, dtype: str) -> dict[str, Any]:
    """What a table was measured on, ``dtype`` its precision; an int8 table also names its quantizer."""
    fp = {**backend.fingerprint(), "batch": batch, "dtype": dtype}
    if dtype == "int8":
        fp["quantizer"] = backend.int8_quantizer
    return fp


def find_table(target: str, batch: int, grid: str, tables: Path, *, table: Path | None = None, force: bool = False,
               threads: int | None = None, static_batch: bool = False) -> LatencyTable:
    """This device's fp32 latency table for ``grid`` (or the file ``table``), checked against the
    device unless forced; one line naming the profile command where it is missing. ``static_batch``:
    the table of parts compiled for exactly ``batch`` (openvino-cpu)."""
    from ..backends.base import get_backend

    backend = get_backend(target, threads=threads, static_batch=batch if static_batch else None)
    fp = device_fingerprint(backend, batch, "fp32")
    path = Path(table) if table else table_path(Path(tables), fp, grid)
    if not path.is_file():
        flag = " --static-batch" if static_batch else ""
        raise DeployCompError(f"no latency table for this device at batch {batch} and grid {grid}: run `deploycomp "
                              f"profile --target {target} --batch {batch} --grid {grid}{flag}` (expected {path})")
    return load_table(path, None if force else fp, force=force)


def micrograph_preparer(backend, precision: str, table: LatencyTable, cache: Path | None) -> Prepare | None:
    """The micro-graph in ``precision`` as the compiler would make it; int8 ones cached in ``cache``."""
    if check_precision(backend, precision) == "runtime" or precision == "fp32":
        return None  # the graph stays fp32 (the backend was built with the runtime precision)
    if precision != "int8":
        from ..passes.precision import convert_precision
        import onnx_ir as ir

        return lambda part, point, model: ir.to_proto(convert_precision(ir.from_proto(model), precision))

    from ..passes.quantize import quantize_for_latency

    def prepare(part, point, model):
        import onnx

        name = cache / f"{part}-{'-'.join(str(int(v)) for v in point)}.onnx" if cache else None
        if name is not None and name.is_file():
            try:
                return onnx.load(str(name))
            except Exception:  # a file cut short by a kill: quantize again
                pass
        x = part_input(part, point, table.fixed, 1)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="deploycomp-micro-") as tmp:
            quantized = quantize_for_latency(model, backend.int8_quantizer, [x], Path(tmp))
        if name is not None:
            name.parent.mkdir(parents=True, exist_ok=True)
            part_file = name.with_suffix(".tmp")
            onnx.save(quantized, str(part_file))
            part_file.replace(name)
        return quantized

    return prepare


def profile(backend, root, batch: int = 1, dtype: str = "fp32", grid: str = "deit-base",
            protocol: dict[str, int] | None = None, save_every_s: float = 10.0,
            progress: Callable[[int, int], None] | None = None, path=None) -> LatencyTable:
    """Fill (or resume) the table of this device at ``root``; return it when complete. ``dtype``: the
    precision the parts run in (a runtime precision needs ``backend`` built with it)."""
    check_precision(backend, dtype)
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
    cache = Path(path).with_suffix(".micrographs")
    prepare = micrograph_preparer(backend, dtype, table, cache)
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
                                                     protocol["warmup"], protocol["repeats"], prepare))
            done += 1
            if progress:
                progress(done, total)
            if time.perf_counter() - last_save > save_every_s:
                table.profiling_seconds = base_seconds + time.perf_counter() - start
                save_table(table, path)
                last_save = time.perf_counter()
    table.profiling_seconds = base_seconds + time.perf_counter() - start
    save_table(table, path)
    if table.complete:
        shutil.rmtree(cache, ignore_errors=True)
    return table
