"""The TensorRT target without a GPU: everything short of TensorRT's own API is checked here.

The graph handed to TensorRT's parser (checker, plugin attributes, same numbers under ONNX Runtime
with TokenCluster decomposed), the AOT kernel's PTX for sm_80/sm_90 in TensorRT's calling
convention (assembled by Triton's bundled ptxas), the launch values against torch's strides, the
precision pass on ORT CPU, and the one-line error without TensorRT. The plugin's registration and
AOT implementation run against ``kernels.trt_standin`` (TensorRT's signature rules), and the engine
runner against stand-ins for the engine and the CUDA wrapper. Tests that need TensorRT and a GPU are
marked ``gpu`` and skipped here with the reason.
"""

from __future__ import annotations

import importlib.util
import subprocess
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from deploycomp.backends.base import get_backend
from deploycomp.backends.tensorrt import network_flags, prepare_for_tensorrt, profile_shapes
from deploycomp.errors import DeployCompError
from deploycomp.kernels import trt_plugin as tp
from deploycomp.passes.base import DEFAULT_INVARIANTS, CompileContext, Pipeline
from deploycomp.passes.precision import PrecisionPass, convert_precision
from deploycomp.passes.verify import relative_l2
from deploycomp.tokens.op import lower

from .conftest import invoke_cli, run_ort
from .test_cli import DEIT, DEIT_ARGS

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_GPU = HAVE_TRT and torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs TensorRT and an NVIDIA GPU; this machine has neither")


@pytest.fixture(scope="module")
def tiny_deit():
    import timm

    from deploycomp.frontend.export import export_to_onnx

    torch.manual_seed(0)
    module = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16, embed_dim=32,
                               num_heads=2, depth=2, num_classes=10).eval()
    return export_to_onnx(module, (1, 3, 64, 64), 18)


def copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def x_image(batch=3, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, 64, 64)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The graph handed to TensorRT


@pytest.mark.parametrize("scale", [None, 0.3])
def test_token_cluster_graph_for_tensorrt(scale):
    from deploycomp.tokens.export_op import register_schema

    # as after any Swin export in the same process: onnx's checker then validates the node against
    # the op's schema, which must declare the TensorRT attributes (else this test depends on order)
    register_schema()
    graph, weights = tp.token_cluster_graph(scale=scale)
    proto = onnx.load_from_string(prepare_for_tensorrt(graph))
    onnx.checker.check_model(proto)
    nodes = [n for n in proto.graph.node if n.op_type == "TokenCluster"]
    assert len(nodes) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    # what TensorRT's ONNX parser reads to map the node to the AOT plugin deploycomp::TokenCluster
    assert attrs["plugin_namespace"] == b"deploycomp" and attrs["aot"] == 1
    # the scale stays an attribute: the AOT kernel bakes it into its PTX (ptx_for(..., scale))
    assert attrs["scale"] == pytest.approx(float(weights["scale"])) and attrs["num_heads"] == 2
    assert {"deploycomp", ""} <= {o.domain for o in proto.opset_import}
    # same numbers as the op's torch reference, with TokenCluster decomposed into standard ops
    model = ir.serde.deserialize_model(proto)
    assert lower(model, "reference") == 1
    x = np.random.default_rng(1).standard_normal((3, 17, 32)).astype(np.float32)
    assert relative_l2(run_ort(model, x), tp.token_cluster_graph_reference(x, weights)) < 1e-5
    assert "aot" not in graph.graph.node("token_cluster").attributes  # the caller's graph is untouched


def test_tiny_deit_graph_for_tensorrt(tiny_deit):
    proto = onnx.load_from_string(prepare_for_tensorrt(tiny_deit))
    onnx.checker.check_model(proto, full_check=True)
    x = x_image()
    np.testing.assert_array_equal(run_ort(ir.serde.deserialize_model(proto), x), run_ort(tiny_deit, x))


def test_profile_and_network_flags():
    assert profile_shapes([-1, 3, 64, 64], (1, 8, 32)) == ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))
    assert profile_shapes([2, 3, 64, 64], (1, 8, 32)) == ((2, 3, 64, 64),) * 3
    with pytest.raises(DeployCompError, match="only the batch axis"):
        profile_shapes([-1, 3, -1, 64], (1, 8, 32))
    flag = SimpleNamespace(STRONGLY_TYPED=1)
    assert network_flags(SimpleNamespace(__version__="10.13.3.9", NetworkDefinitionCreationFlag=flag)) == 1 << 1
    assert network_flags(SimpleNamespace(__version__="11.0.0.0", NetworkDefinitionCreationFlag=flag)) == 0


# ---------------------------------------------------------------------------------------------
# The AOT kernel in TensorRT's calling convention


@pytest.mark.parametrize("arch,dtype", [(80, "float16"), (90, "float16"), (80, "float32")])
def test_ptx_for_tensorrt_abi(arch, dtype, tmp_path):
    tc = importlib.import_module("deploycomp.kernels.token_cluster")  # a broken import fails, not skips
    kernel = tc.ptx_for(arch, dtype, 16, 16, 0.25)
    assert f".entry {kernel.name}(" in kernel.ptx and f".target sm_{arch}" in kernel.ptx
    ptx, scalars = tp.trt_abi(kernel)
    decls = tp.entry_params(ptx, kernel.name)
    original = dict(zip(kernel.params, (d.split()[-1] for d in tp.entry_params(kernel.ptx, kernel.name))))
    # TensorRT passes q, k, v, the int32 scalars, the output - and nothing else
    assert [d.split()[-1] for d in decls] == [original[p] for p in (*tp.INPUTS, *scalars, *tp.OUTPUTS)]
    assert scalars == ["M", "N", "H", "stride_qb", "stride_qm", "stride_kb", "stride_kn", "stride_vb", "stride_vn",
                       "stride_ob", "stride_om"]
    assert all(".u64 .ptr" in d for d in decls[:3] + decls[-1:]) and all(".u32" in d for d in decls[3:-1])
    assert len(decls) == len(kernel.params) - 2  # Triton's hidden scratch pointers dropped
    ptxas = importlib.util.find_spec("triton").submodule_search_locations[0] + "/backends/nvidia/bin/ptxas"
    path = tmp_path / "k.ptx"
    path.write_text(ptx)
    target = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    result = subprocess.run([ptxas, f"-arch={target}", str(path), "-o", str(tmp_path / "k.cubin")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def fake_kernel(params, reads):
    decls = ",\n".join(f"\t.param .u64 .ptr k_param_{i}" for i in range(len(params)))
    body = "".join(f"\tld.param.b64 %rd{i}, [k_param_{i}];\n" for i, p in enumerate(params) if p in reads)
    ptx = f".version 8.0\n.visible .entry k(\n{decls}\n)\n{{\n{body}}}\n"
    return SimpleNamespace(ptx=ptx, name="k", params=tuple(params))


def test_trt_abi_keeps_tensorrts_order_and_refuses_what_tensorrt_cannot_pass():
    ins = ("q_ptr", "k_ptr", "v_ptr")
    ptx, scalars = tp.trt_abi(fake_kernel((*ins, "M", "o_ptr", "global_scratch"), reads=(*ins, "M", "o_ptr")))
    assert scalars == ["M"]
    assert [d.split()[-1] for d in tp.entry_params(ptx, "k")] == ["k_param_0", "k_param_1", "k_param_2", "k_param_3",
                                                                  "k_param_4"]  # unread scratch dropped
    with pytest.raises(ValueError, match="not TensorRT's order"):  # output pointer before the scalars
        tp.trt_abi(fake_kernel((*ins, "o_ptr", "M"), reads=(*ins, "o_ptr", "M")))
    with pytest.raises(ValueError, match="cannot place"):
        tp.trt_abi(fake_kernel((*ins, "alpha", "o_ptr"), reads=(*ins, "o_ptr")))
    with pytest.raises(ValueError, match="reads global_scratch"):
        tp.trt_abi(fake_kernel((*ins, "o_ptr", "global_scratch"), reads=(*ins, "o_ptr", "global_scratch")))


class Sym:
    """Stand-in for TensorRT's ShapeExpr: +, -, *, // with an int or Sym on the right, nothing reflected."""

    def __init__(self, v):
        self.v = v

    def _op(self, other, f):
        return Sym(f(self.v, other.v if isinstance(other, Sym) else other))

    def __add__(self, o):
        return self._op(o, lambda a, b: a + b)

    def __sub__(self, o):
        return self._op(o, lambda a, b: a - b)

    def __mul__(self, o):
        return self._op(o, lambda a, b: a * b)

    def __floordiv__(self, o):
        return self._op(o, lambda a, b: a // b)


def test_launch_values_match_torch_strides_and_symbolic_shapes():
    b, m, n, h, dq, dv = 3, 5, 17, 2, 16, 8
    q, k, v, o = (torch.empty(b, t, h * d) for t, d in ((m, dq), (n, dq), (n, dv), (m, dv)))
    values = tp.scalar_values(m, n, h, h * dq, h * dv)
    expect = {"M": m, "N": n, "H": h}
    for name, t in zip("qkvo", (q, k, v, o)):
        expect[f"stride_{name}b"] = t.stride(0)
        expect[f"stride_{name}{'m' if name in 'qo' else 'n'}"] = t.stride(1)
    assert values == expect
    symbolic = tp.scalar_values(Sym(m), Sym(n), h, h * dq, h * dv)  # the build-time form (ShapeExpr)
    assert {key: getattr(val, "v", val) for key, val in symbolic.items()} == values
    tc = importlib.import_module("deploycomp.kernels.token_cluster")  # a broken import fails, not skips
    grid = tc.launch_grid(Sym(b), Sym(m), h, 32)
    assert tuple(getattr(g, "v", g) for g in grid) == tc.launch_grid(b, m, h, 32)


# ---------------------------------------------------------------------------------------------
# Precision


def test_precision_fp16_runs_on_ort_cpu_within_fp16_tolerance(tiny_deit):
    model = Pipeline([PrecisionPass("fp16")], DEFAULT_INVARIANTS)(copy(tiny_deit), CompileContext())
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    graph = model.graph
    assert graph.inputs[0].dtype == graph.outputs[0].dtype == ir.DataType.FLOAT
    for node in graph:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert all(v.dtype == ir.DataType.FLOAT for v in node.inputs if v is not None), node.name
        if node.op_type == "MatMul" and node.inputs[1].is_initializer():
            assert node.inputs[1].dtype == ir.DataType.FLOAT16
    x = x_image()
    want = run_ort(tiny_deit, x)
    got = run_ort(model, x)
    assert got.dtype == np.float32
    err = relative_l2(got, want)
    assert 0 < err < 5e-3, err  # not bit-identical (it did compute in fp16), within fp16 accuracy


def test_precision_bf16_graph_structure(tiny_deit):
    """bf16 graphs are for TensorRT/CUDA: ONNX Runtime 1.32's CPU provider has no bfloat16 kernels
    for Expand or MatMul (tried here), so only the graph is checked."""
    model = convert_precision(copy(tiny_deit), "bf16")
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.inputs[1].dtype == ir.DataType.FLOAT  # Conv takes no bfloat16 at opset 18: stays float32
    assert any(n.op_type == "MatMul" and n.inputs[1].dtype == ir.DataType.BFLOAT16 for n in model.graph)


@pytest.mark.slow
def test_compile_fp16_on_ort_cpu(tmp_path, monkeypatch, capsys):
    """``compile --precision fp16``: the artifact stores fp16 weights, keeps float32 I/O, passes the gate
    at the fp16 tolerance; what cannot work is refused before anything is written. (The command runs
    in this process: ``invoke_cli``.)"""
    code, _, err = invoke_cli(monkeypatch, capsys, "compile", DEIT, *DEIT_ARGS, "--target", "ort-cpu", "--precision", "fp16",
                              "--no-measure", "-q", "-o", tmp_path / "fp16")
    assert code == 0, err
    import json

    m = json.loads((tmp_path / "fp16" / "manifest.json").read_text())
    assert m["parity"]["tolerance"] == 5e-3 and all(c["rel_l2"] <= 5e-3 for c in m["parity"]["checks"])
    model = ir.load(tmp_path / "fp16" / "model.onnx")
    types = {v.const_value.dtype for v in model.graph.initializers.values() if v.const_value is not None}
    assert ir.DataType.FLOAT16 in types and model.graph.inputs[0].dtype == ir.DataType.FLOAT
    for args, message in ((["--precision", "bf16"], "runs precisions fp32, fp16, int8, not 'bf16'"), (["--precision", "int4"], "unknown precision"),
                          (["--precision", "auto"], "give --latency")):
        code, _, err = invoke_cli(monkeypatch, capsys, "compile", DEIT, *DEIT_ARGS, "--target", "ort-cpu", *args, "-o", tmp_path / "bad")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


def test_precision_token_cluster():
    graph, weights = tp.token_cluster_graph()
    x = np.random.default_rng(2).standard_normal((2, 17, 32)).astype(np.float32)
    want = tp.token_cluster_graph_reference(x, weights)
    fp16 = convert_precision(copy(graph), "fp16")
    node = fp16.graph.node("token_cluster")
    assert [v.dtype for v in node.inputs] == [ir.DataType.FLOAT16] * 3  # the kernel takes fp16
    bf16 = convert_precision(copy(graph), "bf16")
    assert [v.dtype for v in bf16.graph.node("token_cluster").inputs] == [ir.DataType.FLOAT] * 3  # but not bf16
    lowered = copy(graph)  # ONNX Runtime targets decompose first, then lower the precision
    lower(lowered, "reference")
    fp32_err = relative_l2(run_ort(lowered, x), want)
    fp16_err = relative_l2(run_ort(convert_precision(lowered, "fp16"), x), want)
    # fp16 rounding (measured 5.4e-4) is far above fp32's (~1e-7): a conversion that left the graph
    # in float32 fails the lower bound, one that broke the math fails the upper one
    assert fp32_err < 1e-5 < fp16_err < 3e-3, (fp32_err, fp16_err)


# ---------------------------------------------------------------------------------------------
# Without TensorRT


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    for args in (("selftest", "--target", "tensorrt"), ("compile", DEIT, *DEIT_ARGS, "--target", "tensorrt", "-o",
                                                         tmp_path / "out")):
        code, _, err = invoke_cli(monkeypatch, capsys, *args)  # in this process
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "pip install 'deploycomp[tensorrt]'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_ort_trt_is_a_target_and_says_what_is_missing():
    import onnxruntime as ort

    from deploycomp.backends.base import backend_names, get_backend

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT execution provider")
    with pytest.raises(DeployCompError, match="TensorrtExecutionProvider"):
        get_backend("ort-trt")
    assert {"ort-trt", "tensorrt"} <= set(backend_names())


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped here)


@gpu
@needs_gpu
def test_engine_matches_ort_cpu(tiny_deit, tmp_path):
    from deploycomp.backends.tensorrt import TensorRTBackend

    backend = TensorRTBackend(timing_cache=str(tmp_path / "timing.cache"))
    backend.check_available()
    info = backend.emit(tiny_deit, tmp_path)
    runner = backend.runner(tmp_path / info["files"]["engine"])
    x = x_image()
    assert relative_l2(runner(x), run_ort(tiny_deit, x)) < 5e-3
    assert (tmp_path / "timing.cache").stat().st_size > 0
    assert min(runner.time(x, warmup=2, repeats=5)) > 0


@gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_selftest_on_gpu(precision):
    from deploycomp.backends.tensorrt import selftest

    rows = selftest(precision=precision, rounds=10)
    assert [r["passed"] for r in rows] == [True, True], rows


# ---------------------------------------------------------------------------------------------
# The plugin's registration as TensorRT checks it (deploycomp.kernels.trt_standin mimics
# tensorrt.plugin's register / aot_impl rules; see its docstring)


@pytest.fixture
def standin(monkeypatch):
    from deploycomp.kernels import trt_standin

    monkeypatch.setattr(tp, "_REGISTERED", {})
    with trt_standin.installed() as plugin:
        yield plugin


def test_plugin_registers_under_tensorrts_signature_rules(standin):
    tp.register(90)
    plugin = standin.registry.plugins[tp.PLUGIN_ID]
    assert plugin.tensors == ["q", "k", "v"] and plugin.attrs == {"num_heads": int, "scale": float}
    assert plugin.aot_fn is tp._aot
    tp.register(90)  # again: a no-op
    with pytest.raises(RuntimeError, match="registered for sm_90"):
        tp.register(80)


def test_aot_impl_without_tactic_or_return_annotation_is_refused(standin):
    """The stand-in refuses what TensorRT's _validate_aot_impl refuses (the check is not vacuous)."""
    from typing import Tuple

    tp.annotate(standin)
    standin.register(tp.PLUGIN_ID)(tp._desc)

    def no_tactic(q, k, v, num_heads, scale, outputs) -> tp._aot.__annotations__["return"]:
        pass

    def no_return(q, k, v, num_heads, scale, outputs, tactic):
        pass

    def wrong_attr(q, k, v, num_heads: float, scale, outputs: Tuple[standin.TensorDesc],
                   tactic) -> tp._aot.__annotations__["return"]:
        pass

    for fn, message in ((no_tactic, "does not match"), (no_return, "no return annotation"),
                        (wrong_attr, "registered as")):
        with pytest.raises(ValueError, match=message):
            standin.aot_impl(tp.PLUGIN_ID)(fn)


def test_register_can_be_retried_after_aot_impl_failed(standin, monkeypatch):
    """register() succeeded, aot_impl() raised: a second call must not register the id again."""
    real_aot_impl, calls = standin.aot_impl, []

    def failing_once(plugin_id):
        calls.append(plugin_id)
        if len(calls) == 1:
            raise RuntimeError("simulated failure inside tensorrt.plugin.aot_impl")
        return real_aot_impl(plugin_id)

    monkeypatch.setattr(standin, "aot_impl", failing_once)
    with pytest.raises(RuntimeError, match="simulated"):
        tp.register(90)
    tp.register(90)  # TensorRT would say "already has a definition" if register() ran twice
    assert standin.registry.plugins[tp.PLUGIN_ID].aot_fn is tp._aot and len(calls) == 2


def test_aot_impl_returns_the_launch_tensorrt_makes(standin):
    """What _aot hands TensorRT (through the stand-in's types) is aot_launch's launch, with symbolic
    batch and token counts; the PTX entry takes exactly inputs, the scalars, the output."""
    from deploycomp.kernels import trt_standin as ts

    tp.register(90)
    b, m, n, h, d = 3, 17, 197, 6, 64
    descs = [ts.TensorDesc((b, t, h * d), ts.float16, constant_axes=(2,)) for t in (m, n, n)]
    outputs = (ts.TensorDesc((b, m, h * d), ts.float16, constant_axes=(2,)),)
    name, ptx, params, extra = tp._aot(*descs, h, 0.125, outputs, 0)
    want = tp.aot_launch(90, "float16", b, m, n, h * d, h * d, h, 0.125)
    assert name == want.name.encode() and ptx == want.ptx.encode()
    assert tuple(ts.value_of(g) for g in (params.grid_x, params.grid_y, params.grid_z)) == want.grid == (1, b * h, 1)
    assert (params.block_x, params.shared_mem) == (want.block, want.shared_mem) == (128, want.kernel.shared_bytes)
    assert isinstance(extra, ts.SymIntExprs)
    assert [ts.value_of(e) for e in extra] == [want.scalar_values[p] for p in want.scalars]
    assert [ts.value_of(e) for e in extra][:3] == [m, n, h]
    assert len(tp.entry_params(ptx.decode(), name.decode())) == 3 + len(extra) + 1
    with pytest.raises(ValueError, match="must be static"):
        tp._aot(*(ts.TensorDesc((b, t, h * d), ts.float16, constant_axes=(0,)) for t in (m, n, n)), h, 0.125, outputs,
                0)


# ---------------------------------------------------------------------------------------------
# The engine runner's checks, with stand-ins for TensorRT's engine/context and the CUDA wrapper


class FakeContext:
    """An execution context whose profile admits batch 1..8 of x (B, 4) -> y (B, 2)."""

    def __init__(self):
        self.batch, self.enqueue_ok = None, True

    def set_input_shape(self, name, shape):
        if not 1 <= shape[0] <= 8:
            return False  # what TensorRT returns for a shape outside the profile
        self.batch = shape[0]
        return True

    def get_tensor_shape(self, name):
        b = -1 if self.batch is None else self.batch
        return (b, 4) if name == "x" else (b, 2)

    def set_tensor_address(self, name, ptr):
        pass

    def execute_async_v3(self, handle):
        return self.enqueue_ok


class FakeEngine:
    num_io_tensors = 2

    def get_tensor_name(self, i):
        return ["x", "y"][i]

    def get_tensor_mode(self, name):
        return "input" if name == "x" else "output"

    def get_tensor_dtype(self, name):
        return np.float32

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 4), (4, 4), (8, 4)]

    def create_execution_context(self):
        return FakeContext()


class FakeCuda:
    def __init__(self):
        self.allocated, self.activations, self.handle = [], 0, 0

    def activate(self):
        self.activations += 1

    def empty(self, shape, dtype):
        self.allocated.append(tuple(shape))
        return 0, np.zeros(shape, dtype)

    def upload(self, buf, host):
        buf[...] = host

    def download(self, buf):
        return buf.copy()

    def events(self):
        return object(), object()

    def record(self, event):
        pass

    @staticmethod
    def elapsed_ms(start, end):
        return 1.0


@pytest.fixture
def fake_runner(monkeypatch):
    import sys

    from deploycomp.backends import tensorrt as trt_backend

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    fake_trt = SimpleNamespace(Logger=Logger, Runtime=lambda logger: SimpleNamespace(
        deserialize_cuda_engine=lambda plan: FakeEngine()), TensorIOMode=SimpleNamespace(INPUT="input"),
        nptype=lambda t: t, __version__="10.9.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    cuda = FakeCuda()
    monkeypatch.setattr(trt_backend, "cuda_device", lambda device=0: cuda)
    return trt_backend.EngineRunner(b"plan", device=1), cuda


def test_runner_refuses_a_batch_outside_the_profile(fake_runner):
    runner, cuda = fake_runner
    with pytest.raises(DeployCompError, match=r"outside the engine's optimization profile \(\(1, 4\) to \(8, 4\)\)"):
        runner.run(np.zeros((16, 4), np.float32))
    assert cuda.allocated == []  # refused before any (1-byte) buffer was made
    assert runner.run(np.ones((3, 4), np.float32))[0].shape == (3, 2)
    assert cuda.activations >= 2  # the runner's device made current at load and at every bind


def test_runner_checks_every_enqueue(fake_runner):
    runner, _ = fake_runner
    x = np.ones((2, 4), np.float32)
    assert runner.time(x, warmup=1, repeats=2) == [1.0, 1.0]
    runner.context.enqueue_ok = False
    with pytest.raises(DeployCompError, match="failed to enqueue"):
        runner.run(x)
    with pytest.raises(DeployCompError, match="failed to enqueue"):
        runner.time(x, warmup=1, repeats=2)


def test_torch_cuda_sets_the_device(monkeypatch):
    from deploycomp.backends import tensorrt as trt_backend

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: SimpleNamespace(cuda_stream=7))
    dev = trt_backend._TorchCuda(1)
    assert current == [torch.device("cuda", 1)] and dev.handle == 7


def test_pycuda_context_is_popped_at_exit(monkeypatch):
    import sys

    from deploycomp.backends import tensorrt as trt_backend

    stack = []
    context = SimpleNamespace(push=lambda: stack.append("primary"), pop=lambda: stack.pop())
    driver = SimpleNamespace(init=lambda: None, Device=lambda i: SimpleNamespace(retain_primary_context=lambda: context),
                             Stream=lambda: SimpleNamespace(handle=5))
    monkeypatch.setitem(sys.modules, "pycuda", SimpleNamespace(driver=driver))
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    at_exit = []
    monkeypatch.setattr(trt_backend.atexit, "register", at_exit.append)
    trt_backend._PyCuda(0)
    assert stack == ["primary"]
    for fn in at_exit:
        fn()
    assert stack == []  # pycuda aborts at exit when a pushed context is left on the stack


@pytest.mark.slow  # an int8 quantization and an ORT run (~3 s)
def test_int8_for_tensorrt_is_symmetric_qdq_that_onnx_runtime_runs(tmp_path):
    """What TensorRT would build int8 from (no TensorRT here): the quantize pass's symmetric Q/DQ graph
    passes the ONNX checker, every zero point is 0, and it runs under ONNX Runtime close to fp32."""
    import onnx

    from deploycomp.frontend import load_source
    from deploycomp.passes.base import CompileContext, Pipeline, build_pass

    src = load_source(f"timm:{DEIT.removeprefix('timm:')}", None, {"depth": 2, "img_size": 32, "patch_size": 8})
    ctx = CompileContext(input_shape=src.input_shape, seed=0)
    model = Pipeline([build_pass("cleanup"), build_pass("quantize", samples=16, method="nncf-symmetric")])(src.model, ctx)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    zero_points = [n for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zero_points and all(len(n.inputs) < 3 or not n.inputs[2].const_value.numpy().any() for n in zero_points)
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    got = get_backend("ort-cpu").runner(proto)(x)
    want = src.reference(x)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99 and np.abs(got - want).max() > 0  # quantized, and close
