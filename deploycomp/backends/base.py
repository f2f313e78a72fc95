"""The Backend protocol: everything target-specific sits behind it.

A backend is what ``--target`` names. It owns how the compiled graph becomes a deployable artifact,
how that artifact (or any ONNX model) runs, how it is timed against other models on this device,
the runtime options a manifest records and rebuilds, its device fingerprint, how a latency-table
micro-graph is timed, which TokenCluster lowering it runs and which precisions it supports.
Passes, the profiler, validation, bench, evaluate and the report talk to targets only through
this protocol; nothing outside a backend module reads ONNX Runtime or OpenVINO fields.

Adding a target is one module: a class implementing ``Backend`` (``BackendBase`` gives the
generic parts), decorated with ``@register_backend("name")``, and its module name in
``backends/__init__.py``. This module imports no backend, so there are no import circles.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol, Union, runtime_checkable

import numpy as np

from ..bench.harness import Candidate, measure_interleaved, stats
from ..errors import DeployCompError

if TYPE_CHECKING:  # onnx and onnx_ir are imported where used: the CLI reads the target names without them
    import onnx
    import onnx_ir as ir

Runner = Callable[[np.ndarray], np.ndarray]
ModelLike = Union["ir.Model", "onnx.ModelProto", bytes, Path, str]


@runtime_checkable
class Backend(Protocol):
    name: str
    # compile --precision values this target runs, each with how: "graph" (the precision pass
    # converts the graph) or "runtime" (the graph stays fp32; the runtime's own precision option)
    precisions: ClassVar[dict[str, str]]
    # how TokenCluster (semantic tokens) is lowered for this target; None: the target runs the node itself
    token_cluster_lowering: ClassVar[str | None]
    # how the quantize pass makes an int8 graph for this target (passes/quantize.py), if it runs int8
    int8_quantizer: ClassVar[str]
    # the input batch emitted artifacts are fixed to (their measured batch); None: any batch
    static_batch: int | None

    def check_available(self) -> None:
        """Raise DeployCompError saying what is missing if this target cannot run here."""

    def fingerprint(self) -> dict[str, Any]:
        """What a number measured on this target was measured on (device, runtime, threads)."""

    def options(self) -> dict[str, Any]:
        """The runtime options the manifest records; ``type(b)(**b.options())`` rebuilds ``b``."""

    def runner(self, model: ModelLike) -> Runner:
        """Run ``model`` (an ONNX model, or an artifact file this backend wrote): images -> logits."""

    def candidate(self, name: str, model: ModelLike, input_shape: tuple[int, ...]) -> Candidate:
        """``model`` as a candidate of an interleaved measurement (``bench.harness``)."""

    def time(self, models: Mapping[str, ModelLike], input_shape: tuple[int, ...], batch: int, rounds: int,
             iters: int = 3, backends: Mapping[str, "Backend"] | None = None) -> dict[str, dict[str, float]]:
        """Median/spread (ms) of each model at ``batch``, measured interleaved in one run;
        ``backends`` names models that run on another backend (default: this one)."""

    def time_part(self, model: onnx.ModelProto, x: np.ndarray, warmup: int, repeats: int) -> list[float]:
        """Milliseconds of ``repeats`` runs of one latency-table micro-graph on input ``x``."""

    def emit(self, model: ir.Model, out_dir: Path) -> dict[str, Any]:
        """Write the artifact files into ``out_dir``; return the manifest's ``files`` (and extras)."""

    def artifact(self, artifact_dir: Path, manifest: Mapping[str, Any]) -> ModelLike:
        """What ``runner``/``candidate`` take to run an artifact this backend emitted."""


class BackendBase:
    """Generic parts of a backend: interleaved timing of candidates, micro-graph timing with a
    runner, the artifact's main file. Subclasses set ``name``, ``precisions`` and
    ``token_cluster_lowering`` and implement the rest of the protocol."""

    name: str = "backend"
    precisions: ClassVar[dict[str, str]] = {"fp32": "graph"}
    token_cluster_lowering: ClassVar[str | None] = "reference"
    int8_quantizer: ClassVar[str] = "nncf"
    # seconds of idle between two candidates of an interleaved measurement: a runtime whose worker
    # threads keep spinning after a run needs it, or it slows the next candidate (see harness)
    interleave_gap_s: float = 0.0
    static_batch: int | None = None

    def time(self, models: Mapping[str, ModelLike], input_shape: tuple[int, ...], batch: int, rounds: int,
             iters: int = 3, backends: Mapping[str, Backend] | None = None) -> dict[str, dict[str, float]]:
        runs_on = backends or {}
        cands = [runs_on.get(name, self).candidate(name, model, input_shape) for name, model in models.items()]
        times = measure_interleaved(cands, batch=batch, rounds=rounds, iters=iters, warmup=2)
        return {c.name: stats(times[c.name]) for c in cands}

    def time_part(self, model: onnx.ModelProto, x: np.ndarray, warmup: int, repeats: int) -> list[float]:
        run = self.runner(model)
        for _ in range(warmup):
            run(x)
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(x)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def artifact(self, artifact_dir: Path, manifest: Mapping[str, Any]) -> ModelLike:
        return Path(artifact_dir) / manifest["files"]["model"]


def onnx_bytes(model: ModelLike) -> bytes:
    """Serialized ONNX of any model-like value."""
    import onnx
    import onnx_ir as ir

    if isinstance(model, bytes):
        return model
    if isinstance(model, (str, Path)):
        return Path(model).read_bytes()
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return ir.serde.serialize_model(model).SerializeToString()


def random_input(input_shape: tuple[int, ...], batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *input_shape[1:])).astype(np.float32)


_BACKENDS: dict[str, type] = {}


# The embedded default target: the faster of the two verified CPU runtimes on the runtimes table
# (benchmarks/results/runtimes.json: DeiT-S at batch 8, plain OpenVINO 1.28x and deploycomp's
# openvino-cpu artifact 1.30x of plain ONNX Runtime fp32; deploycomp's ort-cpu artifact 1.03x).
DEFAULT_TARGET = "openvino-cpu"


def register_backend(name: str):
    def deco(cls):
        _BACKENDS[name] = cls
        return cls

    return deco


def backend_names() -> list[str]:
    from . import targets  # noqa: F401  (imports every target module, which registers itself)

    return sorted(_BACKENDS)


def get_backend(name: str, **options) -> Backend:
    """The backend ``name`` with runtime ``options`` (None values mean the target's default)."""
    from . import targets  # noqa: F401

    if name not in _BACKENDS:
        raise DeployCompError(f"unknown target '{name}': available targets are {', '.join(sorted(_BACKENDS))}")
    cls = _BACKENDS[name]
    accepted = inspect.signature(cls).parameters
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DeployCompError(f"target '{name}' has no option {', '.join(unknown)}: it takes {', '.join(accepted)}")
    backend = cls(**options)
    backend.check_available()
    return backend


def fp32_backend(backend: Backend) -> Backend:
    """``backend`` as it runs the fp32 source: itself, unless its precision is a runtime option
    (OpenVINO bf16), then the same target and options at fp32. Budgets are relative to the fp32 source."""
    if backend.options().get("precision", "fp32") == "fp32":
        return backend
    return get_backend(backend.name, **{**backend.options(), "precision": "fp32"})


def time_against(backend: Backend, reference: Backend, models: Mapping[str, ModelLike], reference_name: str,
                 input_shape: tuple[int, ...], batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """``models`` timed on ``backend``, ``models[reference_name]`` on ``reference`` (a runtime
    precision, such as OpenVINO's bf16 hint, against the fp32 source), interleaved in one run so the
    ratio is not one of two machine states."""
    return backend.time(models, input_shape, batch, rounds,
                        backends=None if reference is backend else {reference_name: reference})


def backend_for_manifest(manifest: Mapping[str, Any], **overrides) -> Backend:
    """The backend an artifact was verified and measured with, rebuilt from its manifest."""
    options = dict(manifest.get("runtime_options") or {})
    if not options and "session_options" in manifest:  # artifacts written before runtime_options existed
        old = manifest["session_options"]
        options = {"threads": old.get("intra_op_threads"), "optimization_level": old.get("optimization_level"),
                   "allow_spinning": old.get("allow_spinning")}
    return get_backend(manifest["target"]["target"], **{**options, **overrides})
