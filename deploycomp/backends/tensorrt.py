"""TensorRT target: the compiled ONNX graph built into a serialized engine (``model.plan``).

Nothing here imports TensorRT, pycuda or torch's CUDA at module import; ``check_available`` says
in one line what to install. The engine build follows the TensorRT Python API of 10.x and 11.x:
a strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on 10.x; on 11.x every
network is strongly typed and the flag is deprecated, so none is passed), precision decided in the
graph by our precision pass (TensorRT 11 removed ``BuilderFlag.FP16``/``BF16``; we never set
them on 10.x either, so both versions build the same network), ``OnnxParser``, one optimization
profile over a batch range, a workspace pool limit, a timing cache loaded before and saved after
every build, ``build_serialized_network``. TokenCluster nodes become the AOT plugin of
``deploycomp.kernels.trt_plugin``. Runs use pycuda, or torch's CUDA tensors when torch has CUDA,
and time with CUDA events. See docs/gpu.md for the versions and what has (not) been run.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bench.harness import Candidate
from ..errors import DeployCompError
from .base import BackendBase, random_input, register_backend
from .fingerprint import host_fingerprint

if TYPE_CHECKING:  # imported where used: registering the target costs nothing
    import onnx
    import onnx_ir as ir

INSTALL = "pip install 'deploycomp[tensorrt]' (tensorrt, pycuda) on a machine with an NVIDIA GPU and driver"
ENGINE_FILE = "model.plan"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise DeployCompError(f"target 'tensorrt' needs TensorRT, which is not installed: {INSTALL}") from None
    return trt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def network_flags(trt) -> int:
    """Creation flags of a strongly typed network: explicit on 10.x, the default (flag deprecated) on 11+."""
    if trt_major(trt) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def profile_shapes(shape: list[int], batch: tuple[int, int, int]) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of an input whose only dynamic axis is the batch (axis 0)."""
    if any(d < 0 for d in shape[1:]):
        raise DeployCompError(f"input shape {shape}: only the batch axis may be dynamic for TensorRT")
    return tuple(tuple([b, *shape[1:]]) if shape[0] < 0 else tuple(shape) for b in batch)


@dataclass
class EngineConfig:
    batch: tuple[int, int, int] = (1, 8, 32)  # optimization profile: min, opt, max batch
    workspace_mb: int = 1024
    timing_cache: str = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                            / "deploycomp" / "tensorrt.timing")

    def __post_init__(self):
        lo, opt, hi = self.batch
        if not 1 <= lo <= opt <= hi:
            raise DeployCompError(f"batch range {self.batch} must satisfy 1 <= min <= opt <= max")


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_for_tensorrt(model: ir.Model) -> bytes:
    """The exact ONNX bytes handed to TensorRT's parser: a copy with TokenCluster nodes marked."""
    from ..kernels.trt_plugin import mark_for_tensorrt

    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    copy = ir.serde.deserialize_model(proto)
    mark_for_tensorrt(copy)
    return ir.serde.serialize_model(copy).SerializeToString()


def build_engine(onnx_bytes: bytes, config: EngineConfig, arch: int, plugin: bool) -> tuple[bytes, dict[str, Any]]:
    """Serialized engine for ``onnx_bytes`` (from ``prepare_for_tensorrt``) and what the manifest records.
    ``plugin``: the graph has TokenCluster nodes, so the AOT plugin is registered before parsing."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    if plugin:
        from ..kernels.trt_plugin import register

        register(arch)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DeployCompError(f"TensorRT's ONNX parser rejected the graph: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes[tensor.name] = profile_shapes(list(tensor.shape), config.batch)
        profile.set_shape(tensor.name, *shapes[tensor.name])
    builder_config.add_optimization_profile(profile)
    cache_path = Path(config.timing_cache)
    cache = builder_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if cache is None or not builder_config.set_timing_cache(cache, False):  # ignore_mismatch=False
        # a cache written by another TensorRT version or GPU is not reused: start an empty one
        builder_config.set_timing_cache(builder_config.create_timing_cache(b""), False)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, builder_config)
    if plan is None:
        raise DeployCompError("TensorRT could not build an engine for this graph (see its log above)")
    seconds = time.perf_counter() - start
    atomic_write(cache_path, memoryview(builder_config.get_timing_cache().serialize()).tobytes())
    info = {"tensorrt_version": trt.__version__, "strongly_typed": True, "network_flags": network_flags(trt),
            "profile": {name: [list(s) for s in shape] for name, shape in shapes.items()}, "arch": arch,
            "workspace_mb": config.workspace_mb, "timing_cache": str(cache_path), "build_seconds": round(seconds, 2)}
    return memoryview(plan).tobytes(), info


# ---------------------------------------------------------------------------------------------
# Device memory, streams and events: torch's CUDA when present, else pycuda.


class _TorchCuda:
    def __init__(self, device: int):
        import torch

        self.torch, self.device = torch, torch.device("cuda", device)
        self.activate()
        self.stream = torch.cuda.Stream(self.device)
        self.handle = self.stream.cuda_stream

    def activate(self) -> None:
        """Make this the current device: TensorRT builds, deserializes and enqueues on the current one."""
        self.torch.cuda.set_device(self.device)

    def empty(self, shape, dtype):
        t = self.torch.empty(tuple(shape), dtype=self.torch.from_numpy(np.empty(0, dtype)).dtype, device=self.device)
        return t.data_ptr(), t

    def upload(self, buf, host: np.ndarray) -> None:
        with self.torch.cuda.stream(self.stream):
            buf.copy_(self.torch.from_numpy(np.ascontiguousarray(host)), non_blocking=False)

    def download(self, buf) -> np.ndarray:
        self.stream.synchronize()
        return buf.cpu().numpy()

    def events(self):
        return (self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True))

    def record(self, event) -> None:
        event.record(self.stream)

    @staticmethod
    def elapsed_ms(start, end) -> float:
        end.synchronize()
        return start.elapsed_time(end)


class _PyCuda:
    def __init__(self, device: int):
        import pycuda.driver as cuda

        cuda.init()
        self.cuda = cuda
        self.context = cuda.Device(device).retain_primary_context()  # the context TensorRT's runtime uses
        self.context.push()
        # pycuda aborts at exit ("context stack was not empty") if a pushed context is left on the
        # stack: pop it at interpreter exit, as pycuda's own autoprimaryctx does
        atexit.register(self.close)
        self.stream = cuda.Stream()
        self.handle = self.stream.handle

    def activate(self) -> None:
        """The primary context pushed in __init__ stays current (one device per process with pycuda)."""

    def close(self) -> None:
        if self.context is not None:
            self.context.pop()
            self.context = None

    def empty(self, shape, dtype):
        mem = self.cuda.mem_alloc(max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1))
        return int(mem), (mem, tuple(shape), np.dtype(dtype))

    def upload(self, buf, host: np.ndarray) -> None:
        self.cuda.memcpy_htod(buf[0], np.ascontiguousarray(host, dtype=buf[2]))

    def download(self, buf) -> np.ndarray:
        self.stream.synchronize()
        out = np.empty(buf[1], buf[2])
        self.cuda.memcpy_dtoh(out, buf[0])
        return out

    def events(self):
        return self.cuda.Event(), self.cuda.Event()

    def record(self, event) -> None:
        event.record(self.stream)

    @staticmethod
    def elapsed_ms(start, end) -> float:
        end.synchronize()
        return start.time_till(end)


@functools.lru_cache(maxsize=None)
def cuda_device(device: int = 0):
    """torch's CUDA if torch sees a GPU, else pycuda; DeployCompError if neither can reach one.
    One per device and process (one stream, one pushed pycuda context), shared by the runners."""
    try:
        import torch

        if torch.cuda.is_available():
            return _TorchCuda(device)
    except ImportError:
        pass
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        raise DeployCompError(f"target 'tensorrt' needs pycuda (or torch with CUDA) for the GPU: {INSTALL}") from None
    try:
        return _PyCuda(device)
    except Exception as exc:  # pycuda raises its own error types when there is no driver or device
        raise DeployCompError(f"target 'tensorrt' found no usable CUDA device ({exc}): {INSTALL}") from None


def device_info(device: int = 0) -> dict[str, Any]:
    dev = cuda_device(device)
    if isinstance(dev, _TorchCuda):
        major, minor = dev.torch.cuda.get_device_capability(device)
        name = dev.torch.cuda.get_device_name(device)
    else:
        major, minor = dev.cuda.Device(device).compute_capability()
        name = dev.cuda.Device(device).name()
    return {"gpu": name, "compute_capability": f"{major}.{minor}", "arch": 10 * major + minor}


class EngineRunner:
    """Runs a serialized engine: device buffers per input shape, one stream, CUDA-event timing."""

    def __init__(self, plan: bytes, device: int = 0):
        trt = import_tensorrt()
        self.cuda = cuda_device(device)
        self.cuda.activate()  # the engine lives on the device current at deserialization
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise DeployCompError("TensorRT could not deserialize the engine (built by another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, tuple[tuple[int, ...], Any]] = {}

    def _bind(self, arrays: list[np.ndarray]) -> None:
        self.cuda.activate()
        for name, array in zip(self.inputs, arrays):
            if not self.context.set_input_shape(name, tuple(array.shape)):
                lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
                raise DeployCompError(f"input '{name}' of shape {tuple(array.shape)} is outside the engine's "
                                      f"optimization profile ({lo} to {hi}): rebuild with a wider batch range")
        for name in self.inputs + self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise DeployCompError(f"TensorRT left tensor '{name}' without a shape ({shape}): an input shape is "
                                      "missing")
            if name not in self._buffers or self._buffers[name][0] != shape:
                ptr, buf = self.cuda.empty(shape, self.dtypes[name])
                self._buffers[name] = (shape, buf)
                self.context.set_tensor_address(name, ptr)
        for name, array in zip(self.inputs, arrays):
            self.cuda.upload(self._buffers[name][1], array.astype(self.dtypes[name], copy=False))

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        self._bind(list(arrays))
        if not self.context.execute_async_v3(self.cuda.handle):
            raise DeployCompError("TensorRT failed to enqueue the engine")
        return [self.cuda.download(self._buffers[n][1]) for n in self.outputs]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]

    def time(self, *arrays: np.ndarray, warmup: int = 5, repeats: int = 20) -> list[float]:
        """Milliseconds per run on the GPU (CUDA events around the enqueue; inputs already on the device)."""
        self._bind(list(arrays))
        out = []
        for i in range(warmup + repeats):
            start, end = self.cuda.events()
            self.cuda.record(start)
            if not self.context.execute_async_v3(self.cuda.handle):
                raise DeployCompError("TensorRT failed to enqueue the engine")
            self.cuda.record(end)
            ms = self.cuda.elapsed_ms(start, end)
            if i >= warmup:
                out.append(ms)
        return out


@register_backend("tensorrt")
class TensorRTBackend(BackendBase):
    """``--target tensorrt``: a strongly typed engine built from the compiled ONNX graph."""

    name = "tensorrt"
    # strongly typed: the precision pass writes the types into the graph, no builder flags
    # int8: explicit Q/DQ in the graph (symmetric, zero points 0), which a strongly typed network
    # builds as int8 without builder flags
    precisions = {"fp32": "graph", "fp16": "graph", "bf16": "graph", "int8": "graph"}
    int8_quantizer = "nncf-symmetric"
    token_cluster_lowering = None  # TokenCluster stays a node: the AOT plugin (kernels/trt_plugin.py) runs it

    def __init__(self, batch: tuple[int, int, int] = (1, 8, 32), workspace_mb: int = 1024,
                 timing_cache: str | None = None, device: int = 0):
        self.config = EngineConfig(batch=tuple(batch), workspace_mb=workspace_mb,
                                   **({"timing_cache": timing_cache} if timing_cache else {}))
        self.device = device
        self._device_info: dict[str, Any] | None = None
        self._plans: dict[str, tuple[bytes, dict[str, Any]]] = {}  # sha256 of ONNX bytes -> (plan, info)

    def options(self) -> dict[str, Any]:
        return {"batch": list(self.config.batch), "workspace_mb": self.config.workspace_mb,
                "timing_cache": self.config.timing_cache, "device": self.device}

    def check_available(self) -> None:
        import_tensorrt()
        self._device_info = device_info(self.device)

    def fingerprint(self) -> dict[str, Any]:
        trt = import_tensorrt()
        return {"target": self.name, **host_fingerprint(), **(self._device_info or device_info(self.device)),
                "backend": "tensorrt", "backend_version": trt.__version__, "batch_profile": list(self.config.batch),
                "workspace_mb": self.config.workspace_mb}

    def build(self, model: ir.Model, config: EngineConfig | None = None) -> tuple[bytes, dict[str, Any]]:
        """Engine for an ONNX model, memoized per graph and config (verify and emit build it once)."""
        from ..tokens.op import token_cluster_nodes

        onnx_bytes, config = prepare_for_tensorrt(model), config or self.config
        key = hashlib.sha256(onnx_bytes + repr(asdict(config)).encode()).hexdigest()
        if key not in self._plans:
            arch = (self._device_info or device_info(self.device))["arch"]
            cuda_device(self.device).activate()  # the builder times tactics on the current device
            self._plans[key] = build_engine(onnx_bytes, config, arch, plugin=bool(token_cluster_nodes(model)))
        return self._plans[key]

    def runner(self, model: ir.Model | onnx.ModelProto | bytes | Path) -> EngineRunner:
        """A runner for an engine file (``.plan``/``.engine``), or an ONNX model built on the spot."""
        import onnx
        import onnx_ir as ir

        if isinstance(model, (str, Path)):
            path = Path(model)
            if path.suffix in (".plan", ".engine"):
                return EngineRunner(path.read_bytes(), self.device)
            model = ir.load(path)
        elif isinstance(model, bytes):
            model = ir.serde.deserialize_model(onnx.load_from_string(model))
        elif isinstance(model, onnx.ModelProto):
            model = ir.serde.deserialize_model(model)
        return EngineRunner(self.build(model)[0], self.device)

    def candidate(self, name: str, model, input_shape: tuple[int, ...]) -> Candidate:
        runner = self.runner(model)

        def make(batch: int):
            x = random_input(input_shape, batch)
            return lambda: runner.run(x)

        return Candidate(name, self.name, make, meta={"runtime_options": self.options()},
                         settle_s=self.interleave_gap_s)

    def artifact(self, artifact_dir: Path, manifest) -> Path:
        return Path(artifact_dir) / manifest["files"].get("engine", manifest["files"]["model"])

    def emit(self, model: ir.Model, out_dir: Path) -> dict[str, Any]:
        """``model.onnx`` (the graph handed to TensorRT) and ``model.plan``, each written atomically."""
        plan, info = self.build(model)
        atomic_write(Path(out_dir) / "model.onnx", prepare_for_tensorrt(model))
        atomic_write(Path(out_dir) / ENGINE_FILE, plan)
        return {"files": {"model": "model.onnx", "engine": ENGINE_FILE}, "tensorrt": info}

    def time_part(self, model: onnx.ModelProto, x: np.ndarray, warmup: int, repeats: int) -> list[float]:
        """The profiler's hook: one latency micro-graph built into an engine for exactly its batch, timed
        with CUDA events (same graphs as the CPU profilers, ``latency/micrographs.py``)."""
        import onnx_ir as ir

        batch = int(x.shape[0])
        plan, _ = self.build(ir.serde.deserialize_model(model),
                             EngineConfig(batch=(batch, batch, batch), workspace_mb=self.config.workspace_mb,
                                          timing_cache=self.config.timing_cache))
        return EngineRunner(plan, self.device).time(x, warmup=warmup, repeats=repeats)


def selftest(batch: int = 2, precision: str = "fp32", rounds: int = 50) -> list[dict[str, Any]]:
    """Build two tiny engines on this GPU — a tiny DeiT and a TokenCluster graph (the AOT plugin) —
    compare each with its CPU reference and time it. Raises DeployCompError without TensorRT/GPU."""
    import timm
    import torch

    from ..frontend.export import export_to_onnx
    from ..kernels.trt_plugin import token_cluster_graph, token_cluster_graph_reference
    from ..passes.verify import relative_l2
    from .ort import OrtCpuBackend

    tolerances = {"fp32": 5e-3, "fp16": 2e-2}  # fp32 allows TensorRT's default TF32 matmuls
    if precision not in tolerances:
        raise DeployCompError(f"selftest precision must be one of {', '.join(tolerances)}, not '{precision}'")
    backend = TensorRTBackend(batch=(1, batch, max(batch, 4)))
    backend.check_available()
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16, embed_dim=32,
                             num_heads=2, depth=2, num_classes=10).eval()
    deit_graph = export_to_onnx(deit, (1, 3, 64, 64), 18)
    tc_graph, weights = token_cluster_graph()
    rng = np.random.default_rng(0)
    x_img = rng.standard_normal((batch, 3, 64, 64)).astype(np.float32)
    x_tok = rng.standard_normal((batch, 17, 32)).astype(np.float32)
    cases = [("tiny DeiT (ORT CPU reference)", deit_graph, x_img, OrtCpuBackend(threads=1).runner(deit_graph)(x_img)),
             ("TokenCluster AOT plugin (torch reference)", tc_graph, x_tok,
              token_cluster_graph_reference(x_tok, weights))]
    tolerance = tolerances[precision]
    rows = []
    for name, graph, x, want in cases:
        if precision != "fp32":
            from ..passes.precision import convert_precision

            graph = convert_precision(graph, precision)
        runner = backend.runner(graph)
        err = relative_l2(runner(x), want)
        times = sorted(runner.time(x, warmup=10, repeats=rounds))
        rows.append({"case": name, "precision": precision, "batch": batch, "rel_l2": err, "tolerance": tolerance,
                     "passed": bool(err <= tolerance), "median_ms": times[len(times) // 2],
                     "p90_ms": times[int(0.9 * (len(times) - 1))], **backend.fingerprint()})
    return rows
