"""What the proxy benchmarks share: the trained proxy teacher, its stored logits, and timing
artifacts against the source graph (interleaved, at the budget's batch and at batch 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "deploycomp"
PLAIN_ORT = "plain ORT fp32"
MODEL = "timm:deit_fmnist_patch4_28"


def teacher_and_logits(epochs: int) -> tuple[Path, Path]:
    """The proxy teacher's weights and its stored top-5 logits for ``epochs`` fine-tuning epochs
    (written once, shared by every proxy benchmark)."""
    from deploycomp.api import store_logits

    weights = CACHE / "proxy-fmnist" / "model.safetensors"
    if not weights.is_file():
        sys.exit(f"{weights} not found: run benchmarks/train_proxy.py first")
    logits = CACHE / "prune-bench" / f"teacher-top5-e{epochs}-s0.kd"
    if not logits.is_file():
        logits.parent.mkdir(parents=True, exist_ok=True)
        print(f"storing teacher logits for {epochs} epochs -> {logits}", flush=True)
        store_logits(MODEL, logits, weights=str(weights), epochs=epochs, topk=5, seed=0)
    return weights, logits


def time_against_source(artifacts: dict[str, Path], weights: Path, batch: int, rounds: int,
                        source: str = "source") -> tuple[dict[int, dict[str, list[float]]], dict[int, float]]:
    """Per-call times of the source graph (named ``source``) and every artifact, interleaved, at
    ``batch`` and at batch 1, with the backend and runtime options of the artifacts; and the source medians.
    The same graph in plain ONNX Runtime (default session, spinning on: ``PLAIN_ORT``) runs beside
    them, the common base of every proxy benchmark's speed (``bench_precision_proxy.py``'s too)."""
    import onnx_ir as ir

    from deploycomp.artifact import read_manifest
    from deploycomp.backends.base import backend_for_manifest, get_backend
    from deploycomp.bench.harness import measure_interleaved
    from deploycomp.frontend import load_source
    from deploycomp.passes.base import CompileContext, Pipeline
    from deploycomp.passes.cleanup import CleanupPass

    backend = backend_for_manifest(read_manifest(next(iter(artifacts.values()))))
    shape = (1, 1, 28, 28)
    src = load_source(MODEL, weights)
    plain = ir.serde.serialize_model(src.model).SerializeToString()  # the export as is (cleanup edits in place)
    graph = ir.serde.serialize_model(Pipeline([CleanupPass()])(src.model, CompileContext())).SerializeToString()
    cands = [backend.candidate(source, graph, shape),
             get_backend("ort-cpu", allow_spinning=True).candidate(PLAIN_ORT, plain, shape)]
    cands += [backend.candidate(n, backend.artifact(p, read_manifest(p)), shape) for n, p in artifacts.items()]
    timing = {b: measure_interleaved(cands, batch=b, rounds=rounds, iters=3, warmup=2) for b in (batch, 1)}
    return timing, {b: float(np.median(timing[b][source])) for b in timing}


def ratio_fields(times: list[float], base_median: float, batch: int) -> dict:
    """Stats of one artifact at ``batch`` and its ratio to the source (median, and p10/p90 over the
    source median as the spread)."""
    from deploycomp.bench.harness import stats

    t = np.asarray(times)
    return {f"b{batch}": stats(list(t)), f"ratio_b{batch}": float(np.median(t)) / base_median,
            f"ratio_b{batch}_p10_p90": [float(np.percentile(t, 10)) / base_median,
                                        float(np.percentile(t, 90)) / base_median]}
