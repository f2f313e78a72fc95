"""ONNX Runtime targets: ``ort-cpu`` (the embedded default) and ``ort-cuda``.

The artifact is the compiled ``model.onnx`` in standard ops plus the session options it was
verified and measured with; ``deploycomp`` records those options in the manifest so a deployment
can reproduce them (``session_options_for``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ..errors import DeployCompError
from .base import Runner, register_backend
from .fingerprint import host_fingerprint, usable_cores

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


def session_options_for(config: dict[str, Any]):
    """Build ``onnxruntime.SessionOptions`` from the dict a manifest records."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(config["intra_op_threads"])
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[config["optimization_level"]])
    opts.log_severity_level = 3
    if not config.get("allow_spinning", True):
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def model_bytes(model: ir.Model | bytes | Path) -> bytes:
    if isinstance(model, bytes):
        return model
    if isinstance(model, (str, Path)):
        return Path(model).read_bytes()
    return ir.serde.serialize_model(model).SerializeToString()


class OrtBackend:
    """ONNX Runtime with one execution provider."""

    name = "ort"
    provider = "CPUExecutionProvider"
    extra: str = ""
    # TokenCluster (semantic tokens) as ONNX Runtime's fused MultiHeadAttention: 1.5-2.1x faster than
    # the standard-op decomposition alone at DeiT-S sizes (benchmarks/results/semantic_tokens_deit.json)
    token_cluster_lowering = "ort-mha"

    def __init__(self, threads: int | None = None, optimization_level: str = "all", allow_spinning: bool = False):
        if optimization_level not in OPT_LEVELS:
            raise DeployCompError(f"unknown optimization level '{optimization_level}': use one of {', '.join(OPT_LEVELS)}")
        self.session_config = {
            "intra_op_threads": threads or usable_cores(),
            "optimization_level": optimization_level,
            "execution_mode": "sequential",
            # Off by default: with spinning, idle workers of one session busy-wait and steal the 2 cores
            # from the next session's run, which made interleaved measurements of several sessions
            # (profiling, validation, bench) unusable (p90 93 ms vs 60 ms for DeiT-S). The price, in
            # the interleaved baseline run (benchmarks/results/baselines.json), is 6-9 % batch-1
            # latency of a single deployed session; --spinning turns it on (re-profile to match).
            "allow_spinning": allow_spinning,
            "providers": [self.provider],
        }

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

        return {
            "target": self.name,
            **host_fingerprint(),
            "threads": self.session_config["intra_op_threads"],
            "allow_spinning": self.session_config["allow_spinning"],
            "backend": "onnxruntime",
            "backend_version": ort.__version__,
            "provider": self.provider,
        }

    def session(self, model: ir.Model | bytes | Path, **overrides):
        import onnxruntime as ort

        config = {**self.session_config, **overrides}
        return ort.InferenceSession(model_bytes(model), session_options_for(config), providers=[self.provider])

    def runner(self, model: ir.Model | bytes | Path, **overrides) -> Runner:
        sess = self.session(model, **overrides)
        name = sess.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

        return run

    def emit(self, model: ir.Model, out_dir: Path) -> dict[str, Any]:
        path = Path(out_dir) / "model.onnx"
        ir.save(model, path)
        return {"files": {"model": path.name}, "session_options": dict(self.session_config)}


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

    def __init__(self, *args, cache_dir: str | None = None, workspace_mb: int = 1024, **kwargs):
        super().__init__(*args, **kwargs)
        cache = cache_dir or str(Path.home() / ".cache" / "deploycomp" / "ort-trt")
        self.trt_options = {"trt_max_workspace_size": str(workspace_mb << 20), "trt_engine_cache_enable": "True",
                            "trt_engine_cache_path": cache, "trt_timing_cache_enable": "True",
                            "trt_timing_cache_path": cache}
        self.session_config["providers"] = [self.provider, "CUDAExecutionProvider"]
        self.session_config["tensorrt_options"] = dict(self.trt_options)

    def session(self, model: ir.Model | bytes | Path, **overrides):
        import onnxruntime as ort

        config = {**self.session_config, **overrides}
        return ort.InferenceSession(model_bytes(model), session_options_for(config),
                                    providers=[(self.provider, self.trt_options), "CUDAExecutionProvider"])
