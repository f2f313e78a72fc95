"""What the proxy benchmarks share: the trained proxy teacher, its stored logits, and timing
artifacts against the source graph (interleaved, at the budget's batch and at batch 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "deploycomp"
PLAIN_ORT = "plain ORT fp32"
MODEL = "timm:deit_fmnist_patch4_28"
SHAPE = (1, 1, 28, 28)
# what a user would pick instead of deploycomp, built with each runtime's own tools from the fp32 proxy
PLAIN_OV, PEER_ORT_INT8, PEER_NNCF_INT8 = "plain OpenVINO fp32", "peer: ONNX Runtime dynamic int8", "peer: OpenVINO + NNCF int8"
PEERS = (PLAIN_OV, PEER_ORT_INT8, PEER_NNCF_INT8)


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


def proxy_table(target: str, batch: int, root: Path = Path(__file__).resolve().parents[1] / "latency_tables",
                static_batch: bool = False) -> Path:
    """The path of the proxy's fp32 latency table for ``target`` at ``batch`` on this host: the table a
    ``deploycomp compile --target`` of the proxy would read (``api._latency_tables``); ``static_batch``:
    the one a ``--static-batch`` compile reads."""
    from deploycomp.backends.base import get_backend
    from deploycomp.frontend import meta_module
    from deploycomp.frontend import proxy  # noqa: F401  (registers the proxy with timm)
    from deploycomp.latency.profiler import device_fingerprint, grid_for
    from deploycomp.latency.table import table_path
    from deploycomp.passes.prune import geometry_of

    geometry = geometry_of(meta_module(MODEL), SHAPE)
    backend = get_backend(target, static_batch=batch if static_batch else None)
    return table_path(root, device_fingerprint(backend, batch, "fp32"), grid_for(geometry))


def calibration_images(train, samples: int) -> list[np.ndarray]:
    """The first ``samples`` training images, normalized, one per batch: what deploycomp's int8
    calibrates on with ``--data`` (``passes/quantize.calibration_inputs``)."""
    images = train.normalize(train.head(samples).images).numpy()
    return [images[i:i + 1] for i in range(len(images))]


def peer_candidates(module, plain, work: Path, samples: int = 128) -> dict[str, tuple]:
    """The peers (``PEERS``) of the fp32 proxy ``module`` (``plain``: its ONNX export), name ->
    (backend, model to run): plain OpenVINO fp32 of the export; ONNX Runtime dynamic int8 of the export
    (``quant_pre_process`` first); OpenVINO + NNCF int8 from the torch model as OpenVINO's guide builds
    it, calibrated on the first ``samples`` training images (as deploycomp's int8 with ``--data``).
    Files are written under ``work``."""
    from deploycomp.backends.base import get_backend
    from deploycomp.backends.openvino import nncf_int8_ir
    from deploycomp.backends.ort import dynamic_int8
    from deploycomp.learn.data import load_fashion_mnist

    ov, ort = get_backend("openvino-cpu"), get_backend("ort-cpu", allow_spinning=True)
    ort_int8 = dynamic_int8(plain, work / "peer_ort_int8.onnx", preprocess=True)
    nncf_int8 = nncf_int8_ir(module, SHAPE, work / "peer_ov_int8.xml", samples=samples,
                             calibration=calibration_images(load_fashion_mnist("train"), samples))
    return {PLAIN_OV: (ov, plain), PEER_ORT_INT8: (ort, ort_int8), PEER_NNCF_INT8: (ov, nncf_int8)}


def time_against_source(artifacts: dict[str, Path], weights: Path, batch: int, rounds: int,
                        source: str = "source", peers: bool = False) -> tuple[dict[int, dict[str, list[float]]], dict[int, float]]:
    """Per-call times of the source graph (named ``source``) and every artifact, interleaved, at
    ``batch`` and at batch 1, with the backend and runtime options of the artifacts; and the source medians.
    The same graph in plain ONNX Runtime (default session, spinning on: ``PLAIN_ORT``) runs beside
    them, the common base of every proxy benchmark's speed (``bench_precision_proxy.py``'s too);
    with ``peers``, so do the ``PEERS`` (``peer_candidates``), in the same interleaved run."""
    import tempfile

    import onnx_ir as ir

    from deploycomp.artifact import read_manifest
    from deploycomp.backends.base import backend_for_manifest, get_backend
    from deploycomp.bench.harness import measure_interleaved
    from deploycomp.frontend import load_source
    from deploycomp.frontend.timm_models import build_timm_model
    from deploycomp.passes.base import CompileContext, Pipeline
    from deploycomp.passes.cleanup import CleanupPass

    backend = backend_for_manifest(read_manifest(next(iter(artifacts.values()))))
    shape = SHAPE
    src = load_source(MODEL, weights)
    plain = ir.serde.serialize_model(src.model).SerializeToString()  # the export as is (cleanup edits in place)
    graph = ir.serde.serialize_model(Pipeline([CleanupPass()])(src.model, CompileContext())).SerializeToString()
    cands = [backend.candidate(source, graph, shape),
             get_backend("ort-cpu", allow_spinning=True).candidate(PLAIN_ORT, plain, shape)]
    cands += [backend.candidate(n, backend.artifact(p, read_manifest(p)), shape) for n, p in artifacts.items()]
    with tempfile.TemporaryDirectory() as tmp:
        if peers:
            module = build_timm_model(MODEL.removeprefix("timm:"), weights).eval()
            cands += [b.candidate(n, m, shape) for n, (b, m) in peer_candidates(module, plain, Path(tmp)).items()]
        timing = {b: measure_interleaved(cands, batch=b, rounds=rounds, iters=3, warmup=2) for b in (batch, 1)}
    return timing, {b: float(np.median(timing[b][source])) for b in timing}


def speed_vs(timing: dict[int, dict[str, list[float]]], name: str, over: str, b: int) -> float:
    """How many times faster ``name`` ran than ``over`` at batch ``b`` (median / median, one run)."""
    return float(np.median(timing[b][over]) / np.median(timing[b][name]))


def peer_speeds(timing: dict[int, dict[str, list[float]]], base: dict[int, float]) -> dict[str, dict]:
    """Each peer (``PEERS``) timed by ``time_against_source(peers=True)``: its ratio to the source
    and its speed against plain ORT fp32, at every batch."""
    return {name: {k: v for b in timing for k, v in (*ratio_fields(timing[b][name], base[b], b).items(),
                                                       (f"speed_vs_plain_ort_b{b}", speed_vs(timing, name, PLAIN_ORT, b)))}
            for name in PEERS}


def ratio_fields(times: list[float], base_median: float, batch: int) -> dict:
    """Stats of one artifact at ``batch`` and its ratio to the source (median, and p10/p90 over the
    source median as the spread)."""
    from deploycomp.bench.harness import stats

    t = np.asarray(times)
    return {f"b{batch}": stats(list(t)), f"ratio_b{batch}": float(np.median(t)) / base_median,
            f"ratio_b{batch}_p10_p90": [float(np.percentile(t, 10)) / base_median,
                                        float(np.percentile(t, 90)) / base_median]}
