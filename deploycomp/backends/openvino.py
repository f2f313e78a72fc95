"""``openvino-cpu``: Intel's OpenVINO runtime on the CPU.

The artifact is the OpenVINO IR (``model.xml`` + ``model.bin``) converted from the compiled ONNX
graph, plus that ``model.onnx``. OpenVINO reads the ONNX directly (``Core.read_model`` on the
serialized bytes) for verification and timing, so the graph that is checked is the graph that is
converted. The runtime options (threads, performance hint, inference precision) are recorded in the
manifest and rebuilt from it. OpenVINO on a CPU with avx512_bf16/AMX infers in bf16 unless told
``f32``; fp32 artifacts pin ``INFERENCE_PRECISION_HINT=f32`` so verification holds at 1e-4.

``static_batch=N`` fixes the input batch: the emitted IR has batch N, and every model this backend
runs or times is compiled for the exact shape it is fed (``ov.Model.reshape``). OpenVINO's CPU
plugin plans memory and picks kernels once for a static shape, where a dynamic batch re-plans
per call: measured 1.05-1.33x faster on the proxy's small models at batch 32 and 1.05x on
DeiT-Tiny at batch 1/8 (``benchmarks/bench_static_batch.py``). Latency tables record it in their
fingerprint, so a static artifact is budgeted by a table profiled static.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bench.harness import Candidate
from ..errors import DeployCompError
from .base import BackendBase, ModelLike, Runner, onnx_bytes, random_input, register_backend
from .fingerprint import cpu_flags, host_fingerprint, usable_cores

if TYPE_CHECKING:  # imported where used: registering the target costs nothing
    import onnx_ir as ir

HINTS = ("LATENCY", "THROUGHPUT")
# compile --precision -> OpenVINO's inference precision hint
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def import_openvino():
    try:
        import openvino
    except ImportError as exc:  # pragma: no cover - a regular dependency; only a broken install gets here
        raise DeployCompError("target 'openvino-cpu' needs the openvino package: pip install openvino") from exc
    return openvino


def has_bf16() -> bool:
    """bf16 runs natively (not emulated) on this CPU."""
    return bool({"avx512_bf16", "amx_tile"} & set(cpu_flags()))


@register_backend("openvino-cpu")
class OpenVinoCpuBackend(BackendBase):
    name = "openvino-cpu"
    # fp32/bf16: OpenVINO's inference precision hint, the graph stays fp32; int8: the quantize pass
    # writes Q/DQ into the graph, which OpenVINO runs as int8 kernels
    precisions = {"fp32": "runtime", "bf16": "runtime", "int8": "graph"}
    # TokenCluster as the standard-op decomposition, which OpenVINO fuses itself (measured against
    # the ORT MultiHeadAttention form, which OpenVINO also reads: docs/ARCHITECTURE.md)
    token_cluster_lowering = "reference"

    def __init__(self, threads: int | None = None, performance_hint: str = "LATENCY", precision: str = "fp32",
                 static_batch: int | None = None):
        if performance_hint not in HINTS:
            raise DeployCompError(f"unknown OpenVINO performance hint '{performance_hint}': use {' or '.join(HINTS)}")
        if precision not in INFERENCE_PRECISION:
            raise DeployCompError(f"openvino-cpu runs precisions {', '.join(INFERENCE_PRECISION)}, not '{precision}'")
        if precision == "bf16" and not has_bf16():
            raise DeployCompError("--precision bf16 needs a CPU with avx512_bf16 or AMX; this one has "
                                  f"{', '.join(cpu_flags()) or 'neither'}")
        if static_batch is not None and not (isinstance(static_batch, int) and static_batch >= 1):
            raise DeployCompError(f"a static batch is a positive whole number, not {static_batch!r}")
        self.threads = int(threads or usable_cores())
        self.performance_hint = performance_hint
        self.precision = precision
        self.static_batch = static_batch
        self._core = None

    def options(self) -> dict[str, Any]:
        options = {"threads": self.threads, "performance_hint": self.performance_hint, "precision": self.precision}
        if self.static_batch is not None:  # absent when dynamic: manifests written before it rebuild as they were
            options["static_batch"] = self.static_batch
        return options

    def config(self) -> dict[str, Any]:
        """OpenVINO's compile_model properties for these options."""
        return {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": self.performance_hint,
                "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[self.precision]}

    def check_available(self) -> None:
        ov = import_openvino()
        if "CPU" not in self.core().available_devices:
            raise DeployCompError(f"OpenVINO {ov.__version__} sees no CPU device here")

    def core(self):
        if self._core is None:
            self._core = import_openvino().Core()
        return self._core

    def fingerprint(self) -> dict[str, Any]:
        ov = import_openvino()
        return {"target": self.name, **host_fingerprint(), "threads": self.threads, "backend": "openvino",
                "backend_version": ov.__version__.split("-")[0], "build": ov.__version__, "performance_hint": self.performance_hint,
                "inference_precision": INFERENCE_PRECISION[self.precision],
                **({"static_batch": self.static_batch} if self.static_batch is not None else {})}

    def read(self, model: ModelLike):
        """An ``openvino.Model`` from an IR file or any ONNX model."""
        if isinstance(model, (str, Path)) and Path(model).suffix == ".xml":
            return self.core().read_model(str(model))
        return self.core().read_model(onnx_bytes(model))

    def compiled(self, model: ModelLike):
        """``model`` compiled as read (an emitted static IR keeps its batch)."""
        return self.core().compile_model(self.read(model), "CPU", self.config())

    def with_batch(self, ov_model, batch: int):
        """``ov_model`` (changed in place) with its input batch fixed to ``batch``."""
        shape = ov_model.input(0).get_partial_shape()
        shape[0] = batch
        ov_model.reshape({0: shape})
        return ov_model

    def request(self, ov_model, batch: int):
        """An infer request of ``ov_model`` compiled for ``batch`` inputs: for that static batch when
        this backend is static (on a copy: ``ov_model`` is left as it is), else as read."""
        if self.static_batch is not None:
            ov_model = self.with_batch(ov_model.clone(), batch)
        return self.core().compile_model(ov_model, "CPU", self.config()).create_infer_request()

    def runner(self, model: ModelLike) -> Runner:
        ov_model = self.read(model)
        requests: dict[int, Any] = {}  # batch -> request: one when dynamic, one per batch seen when static

        def run(x: np.ndarray) -> np.ndarray:
            key = x.shape[0] if self.static_batch is not None else 0
            if key not in requests:
                requests[key] = self.request(ov_model, x.shape[0])
            requests[key].infer({0: np.ascontiguousarray(x, dtype=np.float32)})
            return requests[key].get_output_tensor(0).data.copy()

        return run

    def candidate(self, name: str, model: ModelLike, input_shape: tuple[int, ...]) -> Candidate:
        ov_model = self.read(model)

        def make(batch: int):
            request = self.request(ov_model, batch)
            feed = {0: random_input(input_shape, batch)}
            return lambda: request.infer(feed)

        return Candidate(name, self.name, make, meta={"runtime_options": self.options()},
                         settle_s=self.interleave_gap_s)

    def emit(self, model: ir.Model, out_dir: Path) -> dict[str, Any]:
        ov = import_openvino()
        out_dir = Path(out_dir)
        import onnx_ir as ir

        ir.save(model, out_dir / "model.onnx")
        ov_model = self.read(out_dir / "model.onnx")
        if self.static_batch is not None:
            self.with_batch(ov_model, self.static_batch)
        ov.save_model(ov_model, str(out_dir / "model.xml"), compress_to_fp16=False)
        return {"files": {"model": "model.xml", "weights": "model.bin", "onnx": "model.onnx"}}


def nncf_int8_ir(module, input_shape: tuple[int, ...], path: Path, samples: int = 128, seed: int = 1,
                 calibration: list[np.ndarray] | None = None) -> Path:
    """The OpenVINO user's own int8: the torch ``module`` converted by ``openvino.convert_model``,
    quantized by NNCF's post-training quantization with the transformer preset on ``calibration``
    inputs (the user's images; default ``samples`` Gaussian images), saved as IR at ``path`` (a
    peer baseline for bench, not deploycomp's path).

    The route matters: NNCF on the OpenVINO model *read from our ONNX export* placed its
    FakeQuantize nodes where OpenVINO's CPU plugin ran 48 of DeiT-Tiny's 49 FullyConnected layers
    in f32 (``runtimePrecision`` of the compiled model), so that peer ran no faster than fp32; from
    ``convert_model`` all 49 run in int8, as OpenVINO's own quantization guide does it."""
    import contextlib
    import io

    import nncf
    import torch

    ov = import_openvino()
    ov_model = ov.convert_model(module.eval(), example_input=torch.zeros(1, *input_shape[1:]))
    rng = np.random.default_rng(seed)
    calib = calibration or [rng.standard_normal((1, *input_shape[1:])).astype(np.float32) for _ in range(samples)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quantized = nncf.quantize(ov_model, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calib))
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return Path(path)
