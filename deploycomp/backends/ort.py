"""ONNX Runtime targets: ``ort-cpu``, ``ort-cuda`` and ``ort-trt`` (TensorRT execution provider).

The artifact is the compiled ``model.onnx`` in standard ops plus the session options it was
verified and measured with; the manifest records them (``options()``) and ``session_options_for``
rebuilds them, so a deployment runs exactly what was checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..bench.harness import Candidate
from ..errors import DeployCompError
from .base import BackendBase, ModelLike, Runner, onnx_bytes, random_input, register_backend
from .fingerprint import host_fingerprint, usable_cores

if TYPE_CHECKING:  # imported where used: registering the target costs nothing
    import onnx_ir as ir

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


def session_options_for(threads: int, optimization_level: str = "all", allow_spinning: bool = True):
    """``onnxruntime.SessionOptions`` for the options a manifest records."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[optimization_level])
    opts.log_severity_level = 3
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OrtBackend(BackendBase):
    """ONNX Runtime with one execution provider."""

    name = "ort"
    provider = "CPUExecutionProvider"
    extra: str = ""
    # fp16: the precision pass (ORT's CPU EP has no bf16 MatMul); int8: the quantize pass
    precisions = {"fp32": "graph", "fp16": "graph", "int8": "graph"}
    # dynamic int8 measured faster than static QDQ on this CPU (peers in docs/ARCHITECTURE.md);
    # benchmarks/bench_runtimes.py times both
    int8_quantizer = "ort-dynamic"
    # TokenCluster as ONNX Runtime's fused MultiHeadAttention: 1.5-2.1x faster than the standard-op
    # decomposition alone at DeiT-S sizes (benchmarks/results/semantic_tokens_deit.json)
    token_cluster_lowering = "ort-mha"

    def __init__(self, threads: int | None = None, optimization_level: str = "all", allow_spinning: bool = True):
        if optimization_level not in OPT_LEVELS:
            raise DeployCompError(f"unknown optimization level '{optimization_level}': use one of {', '.join(OPT_LEVELS)}")
        self.threads = int(threads or usable_cores())
        self.optimization_level = optimization_level
        # On by default (ONNX Runtime's own default): a lone deployed session ran DeiT-S 1.42x faster
        # at batch 1 and 1.11x at batch 8 with it, each setting in its own process
        # (benchmarks/results/spinning.json). Interleaved measurements wait out the spinning instead.
        self.allow_spinning = bool(allow_spinning)
        # spinning workers keep a core busy 10-50 ms after run(): interleaved timing waits that out
        self.interleave_gap_s = 0.1 if self.allow_spinning else 0.0

    def options(self) -> dict[str, Any]:
        return {"threads": self.threads, "optimization_level": self.optimization_level,
                "allow_spinning": self.allow_spinning}

    def providers(self) -> list:
        return [self.provider]

    def check_available(self) -> None:
        import onnxruntime as ort

        have = ort.get_available_providers()
        if self.provider not in have:
            raise DeployCompError(
                f"target '{self.name}' needs ONNX Runtime's {self.provider} ({self.extra}); "
                f"this onnxruntime has {', '.join(have)}"
            )

    def fingerprint(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"target": self.name, **host_fingerprint(), "threads": self.threads,
                "allow_spinning": self.allow_spinning, "backend": "onnxruntime", "backend_version": ort.__version__,
                "provider": self.provider}

    def session(self, model: ModelLike):
        import onnxruntime as ort

        return ort.InferenceSession(onnx_bytes(model), session_options_for(self.threads, self.optimization_level, self.allow_spinning),
                                    providers=self.providers())

    def runner(self, model: ModelLike) -> Runner:
        sess = self.session(model)
        name = sess.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

        return run

    def candidate(self, name: str, model: ModelLike, input_shape: tuple[int, ...]) -> Candidate:
        blob = onnx_bytes(model)

        def make(batch: int):
            sess = self.session(blob)
            feed = {sess.get_inputs()[0].name: random_input(input_shape, batch)}
            return lambda: sess.run(None, feed)

        return Candidate(name, self.name, make, meta={"runtime_options": self.options()},
                         settle_s=self.interleave_gap_s)

    def emit(self, model: ir.Model, out_dir: Path) -> dict[str, Any]:
        path = Path(out_dir) / "model.onnx"
        import onnx_ir as ir

        ir.save(model, path)
        return {"files": {"model": path.name}}


@register_backend("ort-cpu")
class OrtCpuBackend(OrtBackend):
    name = "ort-cpu"
    provider = "CPUExecutionProvider"


@register_backend("ort-cuda")
class OrtCudaBackend(OrtBackend):
    name = "ort-cuda"
    provider = "CUDAExecutionProvider"
    extra = "install the 'gpu' extra (onnxruntime-gpu) on a machine with an NVIDIA GPU"


@register_backend("ort-trt")
class OrtTensorRTBackend(OrtBackend):
    """ONNX Runtime's TensorRT execution provider (CUDA provider for what TensorRT does not take), for
    users who already deploy ONNX Runtime on GPUs. Engines and timing caches are cached on disk.
    Provider option names: onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html."""

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"
    extra = "install onnxruntime-gpu built with TensorRT, and TensorRT, on a machine with an NVIDIA GPU"

    def __init__(self, threads: int | None = None, optimization_level: str = "all", allow_spinning: bool = True,
                 cache_dir: str | None = None, workspace_mb: int = 1024):
        super().__init__(threads, optimization_level, allow_spinning)
        self.cache_dir = cache_dir or str(Path.home() / ".cache" / "deploycomp" / "ort-trt")
        self.workspace_mb = int(workspace_mb)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "cache_dir": self.cache_dir, "workspace_mb": self.workspace_mb}

    def providers(self) -> list:
        trt_options = {"trt_max_workspace_size": str(self.workspace_mb << 20), "trt_engine_cache_enable": "True",
                       "trt_engine_cache_path": self.cache_dir, "trt_timing_cache_enable": "True",
                       "trt_timing_cache_path": self.cache_dir}
        return [(self.provider, trt_options), "CUDAExecutionProvider"]


def dynamic_int8(model: ModelLike, path: Path, exclude: Sequence[str] = (), preprocess: bool = False,
                 reduce_range: bool = False) -> Path:
    """ONNX Runtime's documented dynamic int8 quantization of a model (weights per channel), saved at
    ``path``: what ort-cpu's int8 runs (on the compiler's cleaned graph) and, with ``preprocess``,
    the ORT user's own int8 (a peer baseline for bench). ``exclude``: node names left in float (the
    quantize pass's accuracy-aware fallback).

    ``reduce_range``: 7-bit weights, ORT's documented remedy where u8 x s8 kernels saturate (a CPU
    without VNNI); the peer keeps ORT's default.

    ``preprocess`` runs ORT's quantization pre-processing first (``quant_pre_process``: shape
    inference and ORT's graph optimization), as ORT's docs and its own warning ask. Without it, on a
    raw torch export, the weights reach the MatMuls through Transpose nodes, ``quantize_dynamic``
    finds no weight initializers and quantizes 0 of DeiT-Tiny's 49 linear layers, so the peer ran
    like fp32. Its symbolic shape inference is skipped: it fails on the exporter's Constant nodes."""
    import contextlib
    import io
    import logging
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto = onnx.load_from_string(onnx_bytes(model))
    with contextlib.redirect_stdout(io.StringIO()), tempfile.TemporaryDirectory() as tmp:
        if preprocess:
            quant_pre_process(proto, Path(tmp) / "preprocessed.onnx", skip_symbolic_shape=True)
            proto = onnx.load(Path(tmp) / "preprocessed.onnx")
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing": done where it matters
        try:
            # a tensor whose type onnx's inference cannot find (the output of a com.microsoft op such as
            # MultiHeadAttention, ort-cpu's TokenCluster lowering) is float: deploycomp quantizes fp32 graphs
            quantize_dynamic(proto, path, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude), reduce_range=reduce_range,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            logging.getLogger().setLevel(level)
    return Path(path)
