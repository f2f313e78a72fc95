"""Validate the latency model against whole compiled models measured on the backend.

Random non-uniform architectures (per-block heads / QK / V / MLP drawn independently, half of them
with the token count reduced after a random block) are built as FlexViT, exported, compiled by
deploycomp, and measured interleaved; the prediction error is reported per model with its median
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

from .arch import ViTArch, random_arch
from .predictor import LatencyPredictor
from .table import LatencyTable


def compile_arch(arch: ViTArch, workdir: Path, name: str, backend, precision: str = "fp32") -> Path:
    """FlexViT(arch) -> ONNX -> deploycomp compile (verified) at ``precision``; returns the compiled graph."""
    import warnings

    import onnx_ir as ir
    import torch

    from ..errors import DeployCompWarning
    from ..api import CompileOptions, compile
    from ..frontend.export import export_to_onnx
    from .flexvit import FlexViT

    torch.manual_seed(0)
    module = FlexViT(arch).eval()
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

    Raw: the table's numbers as profiled. Calibrated: scaled as compile scales them, by one whole
    model measured now (``calibrate``): here the grid's full architecture, measured in the same
    interleaved run as ``archs`` and not among them, as compile calibrates on the unpruned source
    of the architectures it predicts. The best single scale is reported as the bound calibration
    could reach.
    """
    from .calibrate import calibration, full_arch

    say = progress or (lambda s: None)
    predictor = LatencyPredictor(table)
    batch = table.fingerprint["batch"]
    anchor = full_arch(table)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, arch in enumerate([*archs, anchor]):
            say(f"compile {i + 1}/{len(archs) + 1}")
            paths.append(compile_arch(arch, Path(tmp), f"arch{i}", backend, table.fingerprint.get("dtype", "fp32")))
        say("measure")
        shape = (1, archs[0].in_chans, archs[0].img_size, archs[0].img_size)
        *measured, anchor_measured = measure_models(backend, paths, shape, batch, rounds, iters)
    drift = calibration(predictor.predict(anchor).total_ms, anchor_measured["median_ms"],
                        f"the grid's full architecture (EMB {anchor.emb}, {len(anchor.blocks)} blocks)")
    scale = drift["scale"]
    raw = [predictor.predict(a) for a in archs]
    calibrated = [predictor.predict(a, scale) for a in archs]
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
