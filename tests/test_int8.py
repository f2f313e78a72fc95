"""int8's fidelity gate: per-layer sensitivity, accuracy-aware fallback, and --max-drop.

Each case plants a quantization bug inside the quantize module's own functions (``nncf_qdq``: a
garbage activation scale, the calibration bug that clips a layer's input to a few percent of its
range; ``dynamic_int8``: a layer's int8 weights scrambled) and checks, against numbers the test
computes itself (OpenVINO or ONNX Runtime run on the emitted ``model.onnx``, the torch model built
from the same weights), that the compiler ranks the planted layer most sensitive and keeps it in
float, refuses when a capped fallback cannot pass, and refuses an accuracy drop above --max-drop.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import deploycomp
from deploycomp.api import plan_compile
from deploycomp.errors import VerificationError
from deploycomp.passes.verify import cosine_similarity, relative_l2

from .models import DEIT, save_weights, timm_deit, torch_out
from .test_gate import model_args, run_cli, wrap

# two blocks with peaked attention and non-zero biases (tests/models.py): every layer matters
INT8_DEIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "num_heads": 2, "depth": 2, "num_classes": 10}
PLANTED = "blocks.1.attn.qkv.weight"


def int8_deit() -> torch.nn.Module:
    """A tiny DeiT whose blocks matter: at timm's init (std 0.02) the residual stream is mostly the
    patch embedding, and a layer whose input is clipped to 2 % of its range still left an output
    cosine of 0.9992 (it passed the gate); with the blocks' weights 4x, 0.95."""
    module = timm_deit(INT8_DEIT)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("blocks.") and name.endswith(".weight") and "norm" not in name:
                p.mul_(4.0)
    return module


def garbage_activation_scale(weights: set[str] | None, factor: float = 0.02):
    """NNCF's calibration gives the activation quantizer of the layers reading ``weights`` (None:
    every quantized MatMul/Gemm) a scale ``factor`` times too small: their inputs are clipped to a
    few percent of their range."""

    def make(real):
        def wrong(model, inputs, **kwargs):
            quantized = real(model, inputs, **kwargs)
            targets = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                       and (weights is None or set(n.input) & weights)}
            producer = {out: n for n in quantized.graph.node for out in n.output}
            initializers = {t.name: t for t in quantized.graph.initializer}
            scaled = set()
            for node in quantized.graph.node:
                dq = producer.get(node.input[0]) if node.name in targets else None
                if dq is None or dq.op_type != "DequantizeLinear":
                    continue
                q = producer[dq.input[0]]
                for name in {dq.input[1], q.input[1]} - scaled:
                    scale = numpy_helper.to_array(initializers[name])
                    initializers[name].CopyFrom(numpy_helper.from_array((scale * factor).astype(scale.dtype), name))
                    scaled.add(name)
            assert scaled, "nothing planted: no quantized layer reads those weights"
            return quantized

        return wrong

    return make


def scrambled_int8_weight(weight: str):
    """ONNX Runtime's dynamic quantization stores one layer's int8 weights permuted (when it quantizes it)."""

    def make(real):
        def wrong(model, path, exclude=()):
            out = real(model, path, exclude)
            graph = onnx.load(str(out))
            for t in graph.graph.initializer:
                if t.name.startswith(weight) and t.data_type == onnx.TensorProto.INT8:
                    arr = numpy_helper.to_array(t)
                    t.CopyFrom(numpy_helper.from_array(
                        np.random.default_rng(0).permutation(arr.ravel()).reshape(arr.shape), t.name))
            onnx.save(graph, str(out))
            return out

        return wrong

    return make


def run_openvino(path, x: np.ndarray) -> np.ndarray:
    """The emitted ONNX run by OpenVINO itself (not through deploycomp), f32 precision hint."""
    import openvino as ov

    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]


def images(n: int, seed: int = 5) -> np.ndarray:
    size = INT8_DEIT["img_size"]
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def float_layers(model_path) -> set[str]:
    """Weight names of the MatMul/Gemm nodes of an emitted Q/DQ graph that read no dequantized tensor."""
    graph = onnx.load(str(model_path)).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    inits = {t.name for t in graph.initializer}
    return {n.input[1] for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits
            and all(producer.get(i) != "DequantizeLinear" for i in n.input)}


def assert_weight_bits(model_path, bits: int) -> None:
    """The recorded weight width is the stored one: 7-bit int8 weights reach at most 64 in magnitude."""
    stored = [numpy_helper.to_array(t) for t in onnx.load(str(model_path)).graph.initializer
              if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    peak = max(int(np.abs(w.astype(np.int32)).max()) for w in stored)
    assert bits in (7, 8) and ((peak <= 64) if bits == 7 else (peak > 64)), (bits, peak)


def compile_options(target: str, **kw) -> deploycomp.CompileOptions:
    return deploycomp.CompileOptions(target=target, model_kwargs=dict(INT8_DEIT), measure_rounds=0, seed=0,
                                     precision="int8", calibration_samples=32, fidelity_samples=32, **kw)


@pytest.mark.slow
def test_sensitivity_ranks_a_planted_bad_layer_first_and_the_fallback_keeps_it_in_float(tmp_path, monkeypatch):
    """openvino-cpu: an honest quantization passes with nothing kept; with one layer's activation
    scale garbage, that layer is ranked most sensitive, kept in float (alone), and the artifact run
    by OpenVINO directly is close to the torch model again while the other layers stay int8."""
    module = int8_deit()
    weights = save_weights(module, tmp_path / "w.safetensors")
    x = images(24)
    want = torch_out(module, x)
    # A gate of cosine 0.98: on a CPU without VNNI the weights are 7-bit (fingerprint.int8_dot_saturates),
    # and this random DeiT's honest quantization reads 0.989 there (0.99+ with 8 bits)
    gated = dict(weights=weights, fidelity_cosine=0.98)

    honest = deploycomp.compile(DEIT, tmp_path / "honest", compile_options("openvino-cpu", **gated))
    quant = honest["quantization"]
    params = dict(module.named_parameters())
    weight_layers = [r["layer"] for r in quant["sensitivity"]["layers"] if r["layer"].endswith(".weight")]
    assert len(weight_layers) == 4 * INT8_DEIT["depth"] + 1 and set(weight_layers) <= set(params)  # torch names
    assert quant["fallback"]["kept_float"] == [] and quant["fallback"]["attempts"][-1]["passed"]
    assert float_layers(tmp_path / "honest" / "model.onnx") == set()
    assert_weight_bits(tmp_path / "honest" / "model.onnx", quant["weight_bits"])
    report = (tmp_path / "honest" / "report.md").read_text()
    assert "## int8 sensitivity" in report and f"`{PLANTED}`" in report

    calls = wrap(monkeypatch, "deploycomp.passes.quantize", "nncf_qdq", garbage_activation_scale({PLANTED}))
    manifest = deploycomp.compile(DEIT, tmp_path / "planted", compile_options("openvino-cpu", **gated))
    assert calls
    quant = manifest["quantization"]
    rows = quant["sensitivity"]["layers"]
    assert rows[0]["layer"] == PLANTED and rows[0]["gain"] > 10 * max(abs(r["gain"]) for r in rows[1:])
    assert quant["fallback"]["kept_float"] == [PLANTED]
    first, last = quant["fallback"]["attempts"][0], quant["fallback"]["attempts"][-1]
    assert not first["passed"] and last["passed"] and last["kept"] == 1
    path = tmp_path / "planted" / "model.onnx"
    assert float_layers(path) == {PLANTED}  # kept in float, every other MatMul still reads int8
    got = run_openvino(path, x)
    assert cosine_similarity(got, want).mean() > 0.98 and relative_l2(got, want) > 1e-4  # close, and still int8
    assert "**1 of" in (tmp_path / "planted" / "report.md").read_text()
    on_disk = json.loads((tmp_path / "planted" / "manifest.json").read_text())
    assert on_disk["quantization"]["fallback"]["kept_float"] == [PLANTED]


@pytest.mark.slow  # a sensitivity pass and an int8 compile (~3 s)
def test_fallback_on_ort_cpu_keeps_the_scrambled_layer_out_of_dynamic_int8(tmp_path, monkeypatch):
    """ort-cpu (dynamic int8): one layer's int8 weights scrambled; the fallback leaves exactly that
    node to float (ONNX Runtime's nodes_to_exclude) and the artifact, run by ONNX Runtime directly,
    matches torch to int8 accuracy again."""
    from .conftest import run_ort

    module = int8_deit()
    weights = save_weights(module, tmp_path / "w.safetensors")
    planted = "blocks.0.mlp.fc1.weight"
    calls = wrap(monkeypatch, "deploycomp.passes.quantize", "dynamic_int8", scrambled_int8_weight(planted))
    manifest = deploycomp.compile(DEIT, tmp_path / "out", compile_options("ort-cpu", weights=weights))
    assert calls
    quant = manifest["quantization"]
    assert quant["sensitivity"]["layers"][0]["layer"] == planted and quant["fallback"]["kept_float"] == [planted]
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    assert any(n.op_type in ("MatMul", "Gemm") and planted in n.input for n in graph.node)  # float
    assert not any(t.name.startswith(planted) and t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    assert sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node) >= 4  # the rest int8
    assert_weight_bits(tmp_path / "out" / "model.onnx", quant["weight_bits"])
    x = images(24)
    got, want = run_ort(tmp_path / "out" / "model.onnx", x), torch_out(module, x)
    assert cosine_similarity(got, want).mean() > 0.99


@pytest.mark.slow
def test_fallback_that_cannot_pass_within_its_cap_is_refused(tmp_path, monkeypatch, capsys):
    """Every layer's activation scale garbage: keeping the 3 most sensitive in float cannot pass the
    gate, so the CLI refuses with one error line, exit 2, and nothing is left behind."""
    weights = save_weights(int8_deit(), tmp_path / "w.safetensors")
    calls = wrap(monkeypatch, "deploycomp.passes.quantize", "nncf_qdq", garbage_activation_scale(None))
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "out"
    code, err = run_cli(monkeypatch, capsys, "compile", DEIT, *model_args(INT8_DEIT), "--weights", weights,
                        "--target", "openvino-cpu", "--precision", "int8", "--max-float-layers", "3",
                        "--seed", "0", "--no-measure", "-q", "-o", out)
    assert calls
    lines = [line for line in err.strip().splitlines()
             if line.strip() and not line.startswith("warning: int8 calibrated on synthetic")]
    assert code == 2 and len(lines) == 1, err  # the synthetic-calibration warning, then one error line
    assert lines[0].startswith("error: fidelity gate failed even with the 3 most sensitive of"), err  # not the default 2
    assert not out.exists() and list(parent.iterdir()) == []


def hand_qdq_chain() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x @ W1 @ W2 with a Q/DQ pair on every MatMul input, as NNCF writes it with compress_weights off
    (float weights behind their QuantizeLinear; scale and zero point shared by each pair)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    w = {"W1": rng.standard_normal((8, 8)).astype(np.float32), "W2": rng.standard_normal((8, 5)).astype(np.float32)}
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    nodes = []
    for layer, (act, weight, out) in {"mm1": ("x", "W1", "h"), "mm2": ("h", "W2", "y")}.items():
        for tensor, scale in ((act, 0.05), (weight, float(np.abs(w[weight]).max() / 127))):
            inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_s"),
                      numpy_helper.from_array(np.array(0, np.int8), f"{tensor}_z")]
            nodes += [helper.make_node("QuantizeLinear", [tensor, f"{tensor}_s", f"{tensor}_z"], [f"{tensor}_q"],
                                       name=f"{tensor}_Q"),
                      helper.make_node("DequantizeLinear", [f"{tensor}_q", f"{tensor}_s", f"{tensor}_z"],
                                       [f"{tensor}_dq"], name=f"{tensor}_DQ")]
        nodes.append(helper.make_node("MatMul", [f"{act}_dq", f"{weight}_dq"], [out], name=layer))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), w


def test_a_layer_put_back_in_float_is_exactly_the_float_layer():
    """QdqLayers on a hand-written Q/DQ chain (no NNCF): a kept layer computes its float product
    exactly, the emitted graph keeps that layer's weight in float and stores the other one as int8,
    and compression does not change what the graph computes."""
    import onnx_ir as ir

    from deploycomp.passes.quantize import QdqLayers

    from .conftest import run_ort

    quantized, w = hand_qdq_chain()
    layers = QdqLayers(quantized, {"mm1": "W1", "mm2": "W2"})
    assert [(l.node, l.name) for l in layers.layers] == [("mm1", "W1"), ("mm2", "W2")]
    run = lambda proto: run_ort(ir.from_proto(proto), x, fuse_qdq=False)  # noqa: E731
    x = np.random.default_rng(4).uniform(-3, 3, (6, 8)).astype(np.float32)  # h = x @ W1 exceeds 0.05 * 127: clipped
    exact = x @ w["W1"] @ w["W2"]
    assert relative_l2(run(quantized), exact) > 1e-2  # the chain is really quantized
    assert relative_l2(run(layers.model(["mm1", "mm2"])), exact) < 1e-6
    h = x @ w["W1"]  # mm1 in float, mm2 still quantized: compare with mm2's Q/DQ applied by hand
    dq = lambda t, s: np.clip(np.round(t / s), -128, 127) * s  # noqa: E731
    s_w2 = np.float32(np.abs(w["W2"]).max() / 127)
    by_hand = dq(h, np.float32(0.05)) @ dq(w["W2"], s_w2)
    only_mm1 = run(layers.model(["mm1"]))
    assert relative_l2(only_mm1, by_hand) < 1e-5
    emitted = layers.emit(["mm1"])
    inits = {name: v.const_value.numpy() for name, v in emitted.graph.initializers.items()}
    assert inits["W1"].dtype == np.float32 and "W2" not in inits
    assert any(v.dtype == np.int8 and v.shape == w["W2"].shape for v in inits.values())
    assert not any(n.op_type == "QuantizeLinear" and n.inputs[0].is_initializer() for n in emitted.graph)
    assert relative_l2(run_ort(emitted, x, fuse_qdq=False), only_mm1) < 1e-6


def test_seven_bit_weights_exactly_where_int8_kernels_saturate(monkeypatch):
    """7-bit weights on x86 without any VNNI (AVX2, AVX-512 alone), 8 with avx512_vnni, avx_vnni or
    AMX and off x86; never for TensorRT's graph."""
    from deploycomp.backends import fingerprint
    from deploycomp.passes.quantize import seven_bit_weights

    monkeypatch.setattr(fingerprint.platform, "machine", lambda: "x86_64")
    for flags, saturates in (({"avx2", "fma"}, True), ({"avx2", "avx512f"}, True), ({"avx512f", "avx512_vnni"}, False),
                             ({"avx2", "avx_vnni"}, False), ({"avx512f", "amx_int8"}, False)):
        monkeypatch.setattr(fingerprint, "all_cpu_flags", lambda f=frozenset(flags): f)
        assert fingerprint.int8_dot_saturates() is saturates, flags
        assert seven_bit_weights("nncf") is saturates and seven_bit_weights("ort-dynamic") is saturates
        assert seven_bit_weights("nncf-symmetric") is False
    monkeypatch.setattr(fingerprint, "all_cpu_flags", lambda: frozenset({"asimd"}))
    monkeypatch.setattr(fingerprint.platform, "machine", lambda: "aarch64")
    assert not fingerprint.int8_dot_saturates()


class _ClockedBackend:
    """A backend whose ``time`` returns given medians (ms) and records what it was asked to time together."""

    name = "ort-cpu"
    static_batch = None  # any batch: measured at batch 1

    def __init__(self, medians):
        self.medians, self.calls = medians, []

    def options(self):
        return {"threads": 2}

    def time(self, models, input_shape, batch, rounds, backends=None):
        self.calls.append(dict(models))
        return {k: {"median_ms": self.medians[k], "p10_ms": self.medians[k], "p90_ms": self.medians[k], "n": rounds}
                for k in models}


@pytest.mark.parametrize("artifact_ms, warns", [(12.0, True), (8.0, False)])
def test_a_lossy_precision_slower_than_its_fp32_graph_is_measured_together_and_warned(monkeypatch, artifact_ms, warns):
    import warnings

    from deploycomp.backends import fingerprint
    from deploycomp.errors import DeployCompWarning
    from deploycomp.job import measure_artifact

    monkeypatch.setattr(fingerprint, "int8_dot_saturates", lambda: True)
    backend = _ClockedBackend({"fp32": 10.0, "artifact": artifact_ms})
    fp32_graph, emitted, artifact = object(), object(), object()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lat = measure_artifact(backend, artifact, emitted, fp32_graph, (1, 3, 8, 8), 5, "int8")
    assert backend.calls == [{"fp32": fp32_graph, "artifact": artifact}]  # one interleaved run of both
    assert lat["median_ms"] == artifact_ms and lat["fp32"]["median_ms"] == 10.0
    assert lat["speedup_vs_fp32"] == pytest.approx(10.0 / artifact_ms)
    ours = [str(w.message) for w in seen if issubclass(w.category, DeployCompWarning)]
    if warns:
        assert len(ours) == 1 and "1.20x the latency" in ours[0] and "no VNNI" in ours[0]
    else:
        assert not ours

    fp32_only = _ClockedBackend({"artifact": 9.0})  # fp32 compile: the artifact alone, as before
    lat = measure_artifact(fp32_only, artifact, emitted, None, (1, 3, 8, 8), 5, "fp32")
    assert fp32_only.calls == [{"artifact": artifact}] and "speedup_vs_fp32" not in lat


def test_bad_int8_options_are_refused_before_anything_loads(tmp_path):
    for kw, message in (({"max_drop": -1.0}, "--max-drop must be >= 0"),
                        ({"max_float_layers": -1}, "--max-float-layers must be >= 0"),
                        ({"max_float_layers": 2, "sensitivity_samples": 0}, "ranks layers by sensitivity")):
        with pytest.raises(deploycomp.errors.DeployCompError, match=message):
            plan_compile("timm:no_such_model", tmp_path / "x", compile_options("openvino-cpu", **kw))
    assert not (tmp_path / "x").exists()


# ---- --max-drop on real data ---------------------------------------------------------------------

PROXY = "timm:deit_fmnist_patch4_28"
PROXY_ARGS = {"depth": 2}
EVAL = 400  # one image = 0.25 pt


def trained_proxy(path) -> tuple[torch.nn.Module, str]:
    """The proxy DeiT (2 blocks) trained briefly on 2000 Fashion-MNIST images: well above chance,
    so that a broken layer costs accuracy."""
    from deploycomp.frontend.timm_models import build_timm_model
    from deploycomp.learn.data import load_data

    torch.manual_seed(0)
    module = build_timm_model("deit_fmnist_patch4_28", None, PROXY_ARGS)
    train = load_data("fashion-mnist", "train", 28, 1).head(2000)
    x, y = train.normalize(train.images), train.labels
    opt = torch.optim.AdamW(module.parameters(), lr=2e-3)
    module.train()
    for epoch in range(3):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            loss = torch.nn.functional.cross_entropy(module(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return module.eval(), save_weights(module, path)


def proxy_options(weights: str, **kw) -> deploycomp.CompileOptions:
    return deploycomp.CompileOptions(target="openvino-cpu", weights=weights, model_kwargs=dict(PROXY_ARGS),
                                     measure_rounds=0, seed=0, precision="int8", data="fashion-mnist",
                                     eval_samples=EVAL, calibration_samples=64, fidelity_samples=64, **kw)


@pytest.mark.slow
def test_max_drop_refuses_an_accuracy_drop_on_real_data(tmp_path, monkeypatch, capsys):
    """A trained proxy: the honest int8 passes, and its reported accuracies match the test's own
    count (OpenVINO on model.onnx, torch on the same images). With one layer's activation scale
    garbage and the other gates and the fallback off, only --max-drop can refuse, and it does; with
    --max-drop 100 the same compile passes (so it was the drop). Through the CLI: one line, exit 2."""
    from deploycomp.learn.data import load_data

    module, weights = trained_proxy(tmp_path / "proxy.safetensors")
    test = load_data("fashion-mnist", "test", 28, 1).head(EVAL)
    x, labels = test.normalize(test.images).numpy(), test.labels.numpy()
    torch_top1 = 100.0 * float((torch_out(module, x).argmax(1) == labels).mean())
    assert torch_top1 > 40, "the proxy did not train (chance is 10 %): a drop could not show"

    manifest = deploycomp.compile(PROXY, tmp_path / "honest", proxy_options(weights))
    parity = manifest["parity"]
    ov_top1 = 100.0 * float((run_openvino(tmp_path / "honest" / "model.onnx", x).argmax(1) == labels).mean())
    assert parity["accuracy_samples"] == EVAL and parity["max_drop_pt"] == 1.0
    assert parity["reference_top1"] == pytest.approx(torch_top1, abs=1e-9)
    assert parity["artifact_top1"] == pytest.approx(ov_top1, abs=100 / EVAL + 1e-9)  # thread-order ties at most
    assert torch_top1 - ov_top1 <= 1.0 + 100 / EVAL

    # block 0's qkv input clipped: 56.0 -> 16.5 % top-1 here (block 1's fc1 clipped alike cost under 1 pt)
    wrap(monkeypatch, "deploycomp.passes.quantize", "nncf_qdq", garbage_activation_scale({"blocks.0.attn.qkv.weight"}))
    # no fallback, so no sensitivity ranking either (it only feeds the fallback and the report)
    only_drop = dict(fidelity_top1=0.0, fidelity_cosine=-1.0, max_float_layers=0, sensitivity_samples=0)
    with pytest.raises(VerificationError, match=r"fidelity gate failed: top-1 accuracy drop \d+\.\d+ pt > max 1 pt"):
        deploycomp.compile(PROXY, tmp_path / "planted", proxy_options(weights, **only_drop))
    assert not (tmp_path / "planted").exists()
    passed = deploycomp.compile(PROXY, tmp_path / "lenient", proxy_options(weights, max_drop=100.0, **only_drop))
    assert passed["parity"]["drop_pt"] > 1.0  # the planted layer did cost accuracy

    parent = tmp_path / "outs"
    parent.mkdir()
    code, err = run_cli(monkeypatch, capsys, "compile", PROXY, *model_args(PROXY_ARGS), "--weights", weights,
                        "--target", "openvino-cpu", "--precision", "int8", "--data", "fashion-mnist",
                        "--eval-samples", EVAL, "--max-drop", "2.5", "--max-float-layers", "0", "--seed", "0",
                        "--no-measure", "-q", "-o", parent / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: fidelity gate failed:"), err
    assert "pt > max 2.5 pt" in lines[0] and list(parent.iterdir()) == []


def test_dynamic_int8_quantizes_a_graph_with_ort_multi_head_attention(tmp_path):
    """ort-cpu lowers TokenCluster to com.microsoft.MultiHeadAttention, whose output type onnx's
    inference cannot give; the projection after it must still quantize (the int8 latency table's
    generator micro-graph, and a tokens + int8 compile) and stay close to the float graph."""
    import onnxruntime as ort

    from deploycomp.backends.ort import dynamic_int8
    from deploycomp.latency.micrographs import cross_attention_part

    model = cross_attention_part(5, 17, 32, 2, 16, 16, lowering="ort-mha")
    quantized = onnx.load(str(dynamic_int8(model, tmp_path / "q.onnx")))
    ops = {n.op_type for n in quantized.graph.node}
    assert "MultiHeadAttention" in ops and ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    x = np.random.default_rng(0).standard_normal((2, 17, 32)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    assert relative_l2(run(quantized), run(model)) < 0.05
