"""Validate the latency model against whole compiled models measured on the backend.

Random non-uniform architectures (per-block heads / QK / V / MLP drawn independently, half of them
with the token count reduced after a random block) are built as FlexViT, exported, compiled by
deploycomp, and measured interleaved; on a Swin grid, random Swins (every stage's width and every
block's dims drawn from its stage's grid) are timm Swins at the grid's full widths sliced in torch
(``pruning/torch_prune.swin_from_timm``); the prediction error is reported per model with its median
and p90, raw and corrected for the device's drift since profiling (see ``validate``). A FLOPs-proportional model (ms per FLOP fitted on the same models) is reported alongside,
to show what the table adds. A table of another precision is validated on models compiled at that
precision (``compile --precision``; int8 with synthetic calibration and its fidelity gate off:
random weights, speed only).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .arch import SwinArch, ViTArch, random_arch, random_swin_arch
from .predictor import LatencyPredictor
from .table import LatencyTable


def swin_module(arch: SwinArch, full: SwinArch):
    """A torch Swin of ``arch``: a timm Swin at ``full``'s widths (random weights) with the first
    units of every group kept (which units does not change the latency)."""
    import networkx as nx
    import timm
    import torch

    from ..ir.structure import BlockStructure, Structure
    from ..pruning.plan import PrunePlan
    from ..pruning.torch_prune import swin_from_timm

    torch.manual_seed(0)
    stages = full.stages
    source = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=full.img_size, patch_size=full.patch,
        in_chans=full.in_chans, num_classes=full.num_classes, window_size=stages[0].window,
        embed_dim=stages[0].emb, depths=tuple(len(st.blocks) for st in stages),
        num_heads=tuple(st.blocks[0].heads for st in stages), head_dim=stages[0].blocks[0].qk_dim,
        mlp_ratio=stages[0].blocks[0].mlp_dim / stages[0].emb).eval()
    graph, blocks, keep = nx.MultiDiGraph(), [], {}

    def group(name: str, kind: str, units: int, kept: int) -> None:
        graph.add_node(name, type="group", kind=kind, units=units)
        keep[name] = np.arange(kept)

    for s, (st, small) in enumerate(zip(stages, arch.stages)):
        group(f"stage{s}.emb", "emb", st.emb, small.emb)
        for b, kept in zip(st.blocks, small.blocks):
            i = len(blocks)
            blocks.append(BlockStructure(i, s, st.emb, b.heads, b.qk_dim, b.v_dim, b.mlp_dim, b.tokens, st.windows,
                                         fused_qkv=True))
            for kind, units, n in (("heads", b.heads, kept.heads), ("qk", b.qk_dim, kept.qk_dim),
                                   ("v", b.v_dim, kept.v_dim), ("mlp", b.mlp_dim, kept.mlp_dim)):
                group(f"block{i}.{kind}", kind, units, n)
    structure = Structure("swin", blocks, [st.emb for st in stages], graph)
    return swin_from_timm(source, structure, PrunePlan(keep))


def compile_arch(arch: ViTArch | SwinArch, workdir: Path, name: str, backend, full: SwinArch | None = None,
                 precision: str = "fp32") -> Path:
    """FlexViT(arch) (a Swin: ``swin_module(arch, full)``) -> ONNX -> deploycomp compile (verified)
    at ``precision``; returns the compiled graph."""
    import warnings

    import onnx_ir as ir
    import torch

    from ..errors import DeployCompWarning
    from ..api import CompileOptions, compile
    from ..frontend.export import export_to_onnx
    from .flexvit import FlexViT

    torch.manual_seed(0)
    module = swin_module(arch, full) if isinstance(arch, SwinArch) else FlexViT(arch).eval()
    src = workdir / f"{name}.onnx"
    ir.save(export_to_onnx(module, (1, arch.in_chans, arch.img_size, arch.img_size)), src)
    out = workdir / name
    runtime = {k: v for k, v in backend.options().items() if k != "precision"}  # a runtime precision: set below
    options = CompileOptions(target=backend.name, runtime=runtime, measure_rounds=0, precision=precision)
    if precision == "int8":  # speed only: random weights, Gaussian calibration, no gate or sensitivity
        options = CompileOptions(**{**vars(options), "calibration_samples": 4, "sensitivity_samples": 0,
                                    "fidelity_top1": 0.0, "fidelity_cosine": -1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployCompWarning)
        manifest = compile(str(src), out, options)
    return out / manifest["files"].get("onnx", manifest["files"]["model"])


def measure_models(backend, paths: list[Path], shape: tuple[int, ...], batch: int, rounds: int,
                   iters: int) -> list[dict[str, float]]:
    """Whole models, interleaved in one measurement on ``backend``."""
    from ..bench.harness import measure_interleaved, stats

    models = [backend.candidate(str(i), p, shape) for i, p in enumerate(paths)]
    times = measure_interleaved(models, batch, rounds=rounds, iters=iters)
    return [stats(times[c.name]) for c in models]


def summarize_errors(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    ape = np.abs(pred - meas) / meas * 100
    return {"median_ape_pct": float(np.median(ape)), "p90_ape_pct": float(np.percentile(ape, 90)),
            "max_ape_pct": float(ape.max())}


def validate(table: LatencyTable, backend, archs: list[ViTArch], rounds: int = 5, iters: int = 2,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Predict, compile and measure ``archs``; report raw and calibrated prediction errors.

    Raw: the table's numbers as profiled. Calibrated: scaled as compile scales them, by whole
    models measured now (``calibrate``): here the grid's full architecture, a uniform mid-width one
    and two non-uniform ones (seeded, not among ``archs``), measured in the same interleaved run as
    ``archs``, as compile calibrates on the unpruned source and uniformly and non-uniformly narrowed
    copies. The best single scale is reported as the bound a constant scale could reach.
    """
    from .calibrate import calibration, fitted, full_arch, mid_arch

    say = progress or (lambda s: None)
    predictor = LatencyPredictor(table)
    batch = table.fingerprint["batch"]
    anchors = {"the grid's full architecture": full_arch(table), "a uniform mid-width architecture": mid_arch(table),
               "a non-uniform narrower architecture (seed 1)": mid_arch(table, 0.45, seed=1),
               "a non-uniform wider architecture (seed 2)": mid_arch(table, 0.65, seed=2)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        full = anchors["the grid's full architecture"]
        for i, arch in enumerate([*archs, *anchors.values()]):
            say(f"compile {i + 1}/{len(archs) + len(anchors)}")
            paths.append(compile_arch(arch, Path(tmp), f"arch{i}", backend, full=full,
                                      precision=table.fingerprint.get("dtype", "fp32")))
        say("measure")
        shape = (1, archs[0].in_chans, archs[0].img_size, archs[0].img_size)
        measured = measure_models(backend, paths, shape, batch, rounds, iters)
    measured, anchor_measured = measured[:len(archs)], measured[len(archs):]
    drift = calibration([(f"{name} (EMB {a.emb}, {len(a.blocks)} blocks)", predictor.predict(a).total_ms, m["median_ms"],
                          a.to_dict())
                         for (name, a), m in zip(anchors.items(), anchor_measured)])
    calibrated_predictor = LatencyPredictor(table, fitted(drift))
    raw = [predictor.predict(a) for a in archs]
    calibrated = [calibrated_predictor.predict(a) for a in archs]
    meas = np.array([m["median_ms"] for m in measured])
    raw_ms = np.array([p.total_ms for p in raw])
    # the table's shape alone: its predictions given the single scale that fits these models best
    # (least squares in relative error); what calibration could reach at most
    best_scale = float(np.sum(raw_ms / meas) / np.sum(raw_ms**2 / meas**2))
    flops = np.array([a.flops() for a in archs])
    # FLOPs-proportional baseline, given its best single constant (least squares in relative error)
    ms_per_flop = float(np.sum(flops / meas) / np.sum(flops**2 / meas**2))
    rows = [{"arch": a.to_dict(), "gflops": f / 1e9, "predicted_ms": p.total_ms, "calibrated_ms": c.total_ms,
             "measured": m, "ape_pct": abs(p.total_ms - m["median_ms"]) / m["median_ms"] * 100,
             "calibrated_ape_pct": abs(c.total_ms - m["median_ms"]) / m["median_ms"] * 100,
             "flops_predicted_ms": f * ms_per_flop, "outside_grid": p.outside_grid}
            for a, p, c, m, f in zip(archs, raw, calibrated, measured, flops)]
    return {"fingerprint": table.fingerprint, "table": str(table.path), "n": len(archs),
            "protocol": {"rounds": rounds, "iters": iters, "interleaved": True},
            "calibration": drift,
            "table_model": summarize_errors(np.array([p.total_ms for p in raw]), meas),
            "table_model_calibrated": summarize_errors(np.array([c.total_ms for c in calibrated]), meas),
            "table_model_best_scale": {**summarize_errors(raw_ms * best_scale, meas), "scale": best_scale},
            "flops_model": {**summarize_errors(flops * ms_per_flop, meas), "ms_per_gflop": ms_per_flop * 1e9},
            "rows": rows}


def random_archs(n: int, seed: int = 0, **kw) -> list[ViTArch]:
    """``n`` random architectures; every second one runs on fewer tokens after some block."""
    rng = np.random.default_rng(seed)
    return [random_arch(rng, reduce_tokens=bool(i % 2), **kw) for i in range(n)]


def random_archs_for(table: LatencyTable, n: int, seed: int = 0) -> list[ViTArch] | list[SwinArch]:
    """``n`` random architectures inside ``table``'s grid: Swins on a Swin grid, else ViTs."""
    fixed = table.fixed
    if "window" in fixed:
        rng = np.random.default_rng(seed)
        return [random_swin_arch(rng, table.grid, fixed) for _ in range(n)]
    return random_archs(n, seed, img_size=fixed["img_size"], patch=fixed["patch"], in_chans=fixed["in_chans"],
                        num_classes=fixed["num_classes"], grid=table.grid, depth=fixed.get("depth", 12))
