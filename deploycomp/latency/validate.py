"""Validate the latency model against whole compiled models measured on the backend.

Random non-uniform architectures (per-block heads / QK / V / MLP drawn independently, half of them
with the token count reduced after a random block) are built as FlexViT, exported, compiled by
deploycomp, and measured interleaved; the prediction error is reported per model with its median
and p90. A FLOPs-proportional model (ms per FLOP fitted on the same models) is reported alongside,
to show what the table adds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .arch import ViTArch, random_arch
from .predictor import LatencyPredictor
from .table import LatencyTable


def compile_arch(arch: ViTArch, workdir: Path, name: str, threads: int) -> Path:
    """FlexViT(arch) -> ONNX -> deploycomp compile (verified); returns the artifact's model path."""
    import onnx_ir as ir
    import torch

    from ..api import CompileOptions, compile
    from ..frontend.export import export_to_onnx
    from .flexvit import FlexViT

    torch.manual_seed(0)
    module = FlexViT(arch).eval()
    src = workdir / f"{name}.onnx"
    ir.save(export_to_onnx(module, (1, arch.in_chans, arch.img_size, arch.img_size)), src)
    out = workdir / name
    compile(str(src), out, CompileOptions(threads=threads, measure_rounds=0))
    return out / "model.onnx"


def measure_models(paths: list[Path], shape: tuple[int, ...], session_config: dict, batch: int, rounds: int,
                   iters: int, progress: Callable[[], None] | None = None) -> list[dict[str, float]]:
    from ..bench.harness import measure_interleaved, ort_candidate, stats

    cands = [ort_candidate(str(i), "model", p.read_bytes(), shape, session_config) for i, p in enumerate(paths)]
    times = measure_interleaved(cands, batch, rounds=rounds, iters=iters, progress=progress)
    return [stats(times[c.name]) for c in cands]


def summarize_errors(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    ape = np.abs(pred - meas) / meas * 100
    return {"median_ape_pct": float(np.median(ape)), "p90_ape_pct": float(np.percentile(ape, 90)),
            "max_ape_pct": float(ape.max())}


def validate(table: LatencyTable, backend, archs: list[ViTArch], rounds: int = 5, iters: int = 2,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = progress or (lambda s: None)
    predictor = LatencyPredictor(table)
    batch, threads = table.fingerprint["batch"], table.fingerprint["threads"]
    preds = [predictor.predict(a) for a in archs]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, arch in enumerate(archs):
            say(f"compile {i + 1}/{len(archs)}")
            paths.append(compile_arch(arch, Path(tmp), f"arch{i}", threads))
        say("measure")
        shape = (1, archs[0].in_chans, archs[0].img_size, archs[0].img_size)
        measured = measure_models(paths, shape, backend.session_config, batch, rounds, iters)
    meas = np.array([m["median_ms"] for m in measured])
    pred = np.array([p.total_ms for p in preds])
    flops = np.array([a.flops() for a in archs])
    # FLOPs-proportional baseline, given its best single constant (least squares in relative error)
    ms_per_flop = float(np.sum(meas * flops / meas**2) / np.sum(flops**2 / meas**2))
    rows = [{"arch": a.to_dict(), "gflops": f / 1e9, "predicted_ms": p.total_ms, "measured": m,
             "ape_pct": abs(p.total_ms - m["median_ms"]) / m["median_ms"] * 100,
             "flops_predicted_ms": f * ms_per_flop, "outside_grid": p.outside_grid}
            for a, p, m, f in zip(archs, preds, measured, flops)]
    return {"fingerprint": table.fingerprint, "table": str(table.path), "n": len(archs),
            "protocol": {"rounds": rounds, "iters": iters, "interleaved": True},
            "table_model": summarize_errors(pred, meas),
            "flops_model": {**summarize_errors(flops * ms_per_flop, meas), "ms_per_gflop": ms_per_flop * 1e9},
            "rows": rows}


def random_archs(n: int, seed: int = 0, **kw) -> list[ViTArch]:
    """``n`` random architectures; every second one runs on fewer tokens after some block."""
    rng = np.random.default_rng(seed)
    return [random_arch(rng, reduce_tokens=bool(i % 2), **kw) for i in range(n)]
