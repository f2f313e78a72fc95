"""int8 quantization-aware fine-tuning (QAT) with distillation: the emulation, the recovery, the refusals.

The emulation (``learn/qat.py``) must compute what ONNX Runtime computes on NNCF's Q/DQ graph, and
the weights it writes back must land where the graph reads them (checked by the test running ONNX
Runtime on the graphs itself). The recovery is checked on the artifact run by OpenVINO directly,
against the fp32 torch model the test builds: with one layer's weight quantization planted coarse,
QAT's artifact is closer to the fp32 teacher than PTQ's.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper

import deploycomp
from deploycomp.api import plan_compile
from deploycomp.errors import DeployCompError
from deploycomp.passes.verify import cosine_similarity, relative_l2

from .conftest import run_ort
from .models import DEIT, save_weights, source_structure
from .test_gate import model_args, run_cli, wrap
from .test_int8 import INT8_DEIT, float_layers, images, int8_deit, run_openvino


def ptq_graph(symmetric: bool = False):
    """A tiny DeiT whose blocks matter, its cleaned fp32 graph and structure, and NNCF's Q/DQ graph of it
    (SmoothQuant factors, per-channel weights, the patch embedding's Conv and the attention's q@k quantized)."""
    from deploycomp.passes.quantize import layer_names, nncf_qdq, seven_bit_weights

    module = int8_deit()
    model, structure = source_structure(module, INT8_DEIT)
    calibration = [images(1, seed=s) for s in range(16)]
    quantized = nncf_qdq(ir.to_proto(model), calibration, symmetric=symmetric,
                         seven_bit=seven_bit_weights("nncf-symmetric" if symmetric else "nncf"))
    return module, model, structure, quantized, layer_names(model, structure)


def emulate(module, model, structure, quantized, names):
    from deploycomp.learn.qat import QdqEmulation, read_floats

    student = copy.deepcopy(module)
    attention = {b.index: names[b.nodes["q"]].rsplit(".", 2)[0] for b in structure.blocks}
    emulation = QdqEmulation(student, quantized, model, names, attention)
    read_floats(student, quantized, model, skip=set(emulation.smoothing))
    return student.eval(), emulation


def samples_equal(got: np.ndarray, want: np.ndarray, tol: float = 1e-5) -> int:
    """How many samples agree to float rounding (per-sample relative L2 < ``tol``). A summation order
    that differs between torch and the runtime can flip one activation's int8 rounding, which moves
    that sample by ~1e-3: seen on 1 of 8 samples on an AVX2 CPU (2026-12-03)."""
    return sum(relative_l2(g, w) < tol for g, w in zip(got, want))


def forward(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.slow  # an NNCF quantization (~8 s quiet, ~15 s busy)
@pytest.mark.parametrize("symmetric", [False, True], ids=["nncf", "nncf-symmetric"])  # openvino-cpu, tensorrt
def test_the_emulation_computes_what_onnxruntime_computes_on_the_qdq_graph_and_writes_back_by_name(symmetric):
    """Emulation vs ONNX Runtime on NNCF's Q/DQ graph: equal to float rounding, where the fp32 model is
    10 % away (the graph is really quantized). Then the student's weights are changed, written back,
    and ONNX Runtime on the written graph again equals the emulation (transposes and SmoothQuant factors
    re-applied by name), while the unwritten graph no longer does."""
    from deploycomp.learn.qat import write_back

    module, model, structure, quantized, names = ptq_graph(symmetric)
    assert any("smooth_quant" in t.name for t in quantized.graph.initializer)  # SmoothQuant is in play
    zero_points = [numpy_helper.to_array(t) for t in quantized.graph.initializer if t.name.startswith("zero_point")]
    assert all(not z.any() for z in zero_points) if symmetric else any(z.any() for z in zero_points)
    student, emulation = emulate(module, model, structure, quantized, names)
    assert {n.rpartition(".")[0] for n in emulation.smoothing} >= {"patch_embed.proj", "head", "blocks.1.mlp.fc2"}
    x = images(8, seed=9)
    # the CPU graph as ORT's int8 kernels run it; TensorRT's as it reads (ORT's fused kernels of a CPU
    # without VNNI saturate on its 8-bit weights, TensorRT's int32 accumulation does not)
    runtime = run_ort(ir.from_proto(quantized), x, fuse_qdq=not symmetric)
    assert samples_equal(forward(student, x), runtime) >= 7
    assert relative_l2(forward(module, x), runtime) > 3e-2

    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn_like(p))
    tuned = copy.deepcopy(quantized)
    assert write_back(student, tuned, model) == len(list(student.parameters()))
    changed = forward(student, x)
    assert samples_equal(run_ort(ir.from_proto(tuned), x, fuse_qdq=not symmetric), changed) >= 7
    assert relative_l2(runtime, changed) > 1e-2  # the change mattered: the check above could fail


def coarse_weight_scale(weights: set[str], factor: float):
    """NNCF's per-channel weight scales of ``weights`` ``factor`` times too coarse, as one outlier weight
    ``factor`` times a row's largest makes its channel's scale: the row's other weights fall on a grid of
    a few levels."""

    def make(real):
        def wrong(model, inputs, **kwargs):
            quantized = real(model, inputs, **kwargs)
            inits = {t.name: t for t in quantized.graph.initializer}
            planted = 0
            for node in quantized.graph.node:
                if node.op_type == "QuantizeLinear" and node.input[0] in weights:
                    scale = numpy_helper.to_array(inits[node.input[1]])
                    inits[node.input[1]].CopyFrom(numpy_helper.from_array(scale * factor, node.input[1]))
                    planted += 1
            assert planted == len(weights), "nothing planted"
            return quantized

        return wrong

    return make


PROXY = "timm:deit_fmnist_patch4_28"
PROXY_ARGS = {"depth": 2}
PLANTED = "blocks.0.attn.qkv.weight"


def proxy() -> torch.nn.Module:
    """The proxy DeiT (2 blocks, random init, blocks' weights 4x so that they matter: int8_deit; the head 10x)."""
    from deploycomp.frontend.timm_models import build_timm_model

    torch.manual_seed(0)
    module = build_timm_model("deit_fmnist_patch4_28", None, PROXY_ARGS).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("blocks.") and name.endswith(".weight") and "norm" not in name:
                p.mul_(4.0)
        module.head.weight.mul_(10.0)  # confident logits: the teacher's softmax says something to distil
    return module


@pytest.mark.slow  # two int8 compiles, sensitivity twice and a short fine-tuning
def test_qat_recovers_a_planted_coarse_weight_quantization_closer_to_the_fp32_teacher(tmp_path, monkeypatch):
    """One layer's weight scales planted 24x too coarse. PTQ alone (epochs 0) and QAT (2 epochs of
    distillation from the fp32 model) compile the same Q/DQ graph with the fallback off; the test runs
    both artifacts with OpenVINO on held-out test images and compares with the torch fp32 model: QAT's
    distillation loss (KL to the teacher's softmax) is clearly lower and its cosine higher. The manifest
    records the gate before/after QAT (agreement and cosine up there too). The QAT compile runs the
    default gate with sensitivity and fallback: PTQ alone would have kept the planted layer in float
    (recorded), after QAT the graph passes with every layer int8 (read from its model.onnx), so only the
    tuned weights make the difference."""
    from deploycomp.learn.data import load_data
    from deploycomp.passes.quantize import seven_bit_weights

    module = proxy()
    weights = save_weights(module, tmp_path / "proxy.safetensors")
    calls = wrap(monkeypatch, "deploycomp.passes.quantize", "nncf_qdq", coarse_weight_scale({PLANTED}, 24.0))
    test = load_data("fashion-mnist", "test", 28, 1).head(300)
    x = test.normalize(test.images).numpy()
    teacher = torch.from_numpy(forward(module, x))

    def options(epochs: int, **kw) -> deploycomp.CompileOptions:
        return deploycomp.CompileOptions(
            target="openvino-cpu", weights=weights, model_kwargs=dict(PROXY_ARGS), measure_rounds=0, seed=0,
            precision="int8", data="fashion-mnist", eval_samples=200, train_samples=1024, calibration_samples=32,
            fidelity_samples=32, qat_epochs=epochs, qat_lr=1e-4, **kw)

    gate_off = dict(sensitivity_samples=0, max_float_layers=0, fidelity_top1=0.0, fidelity_cosine=-1.0, max_drop=100.0)

    def score(out) -> tuple[float, float, float]:
        got = torch.from_numpy(run_openvino(out / "model.onnx", x))
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                        reduction="batchmean").item()
        agreement = float((got.argmax(1) == teacher.argmax(1)).float().mean())
        return kl, float(cosine_similarity(got.numpy(), teacher.numpy()).mean()), agreement

    ptq = deploycomp.compile(PROXY, tmp_path / "ptq", options(0, **gate_off))
    # the default gate, sensitivity and fallback on: PTQ alone would keep the planted layer in float, QAT
    # none. With 7-bit weights (a CPU whose int8 kernels saturate) the grid is twice as coarse everywhere,
    # and the gate is relaxed by as much as the honest quantization loses there: cosine 0.99 -> 0.98
    gate = {} if not seven_bit_weights("nncf") else dict(fidelity_cosine=0.98, fidelity_top1=0.8)
    qat = deploycomp.compile(PROXY, tmp_path / "qat", options(2, sensitivity_samples=8, **gate))
    assert len(calls) == 2 and "qat" not in ptq["quantization"]
    record = qat["quantization"]["qat"]
    assert record["ptq_kept_float"] == [PLANTED] and qat["quantization"]["fallback"]["kept_float"] == []
    assert float_layers(tmp_path / "qat" / "model.onnx") == set()  # every layer int8: what follows is QAT's doing
    (kl_ptq, cos_ptq, agree_ptq), (kl_qat, cos_qat, agree_qat) = score(tmp_path / "ptq"), score(tmp_path / "qat")
    # measured: KL 0.034 -> 0.0064, cosine 0.9906 -> 0.9940, agreement 0.897 -> 0.970 on these 300 images
    assert kl_qat < 0.5 * kl_ptq and cos_qat > cos_ptq and agree_qat > agree_ptq, \
        (kl_ptq, kl_qat, cos_ptq, cos_qat, agree_ptq, agree_qat)
    assert record["epochs"] == 2 and record["teacher"] == "the fp32 model (live)" and len(record["history"]) == 2
    emulation = record["emulation_vs_onnxruntime"]
    assert emulation["rel_l2"] <= 0.2 * emulation["fp32_rel_l2"] and emulation["fp32_rel_l2"] > 1e-2
    before, after = record["gate_before"], record["gate_after"]
    assert after["cosine"] > before["cosine"] and after["top1_agreement"] > before["top1_agreement"]
    assert {"reference_top1", "artifact_top1", "drop_pt"} <= set(after)
    report = (tmp_path / "qat" / "report.md").read_text()
    assert "quantization-aware fine-tuning" in report


def test_qat_is_refused_in_one_line_before_anything_loads(tmp_path, monkeypatch, capsys):
    """--finetune-epochs with --precision int8 and no --data: one line, exit 2, nothing written; the model
    (an unknown name, which would be refused otherwise) is never looked at. The API refuses the other
    combinations QAT does not apply to, ort-cpu's dynamic int8 before the source is loaded."""
    parent = tmp_path / "outs"
    parent.mkdir()
    code, err = run_cli(monkeypatch, capsys, "compile", "timm:no_such_model", "--target", "openvino-cpu",
                        "--precision", "int8", "--finetune-epochs", "1", "-q", "-o", parent / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == ("error: quantization-aware fine-tuning (--finetune-epochs with --precision int8) needs "
                        "training data (--data)"), err
    assert list(parent.iterdir()) == []

    def no_load(*args, **kwargs):
        raise AssertionError("the source was loaded before the refusal")

    monkeypatch.setattr("deploycomp.frontend.load_source", no_load)
    base = dict(model_kwargs=dict(INT8_DEIT), measure_rounds=0, data="fashion-mnist", qat_epochs=1)
    for kw, message in (({"precision": "fp32"}, "applies to --precision int8"),
                        ({"precision": "int8", "target": "ort-cpu"}, "ort-cpu's int8 is ort-dynamic")):
        with pytest.raises(DeployCompError, match=message):
            plan_compile(DEIT, tmp_path / "x", deploycomp.CompileOptions(**{**base, **kw}))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # a short QAT compile
def test_qat_reads_stored_teacher_logits(tmp_path):
    """``qat_teacher_logits`` (the CLI's --teacher-logits) is the teacher QAT distils from: a file stored
    for 256 training images is read (and refused for a 384-image run, which shows it is opened), and a
    matching run records it as the teacher."""
    from deploycomp.learn.data import load_data
    from deploycomp.learn.distill import ViewSpec, store_teacher_logits

    module = proxy()
    weights = save_weights(module, tmp_path / "proxy.safetensors")
    train = load_data("fashion-mnist", "train", 28, 1).head(256)
    logits = tmp_path / "teacher.kd"
    store_teacher_logits(module, train, logits, epochs=1, view=ViewSpec(0), topk=3)

    def options(samples: int) -> deploycomp.CompileOptions:
        return deploycomp.CompileOptions(
            target="openvino-cpu", weights=weights, model_kwargs=dict(PROXY_ARGS), measure_rounds=0, seed=0,
            precision="int8", data="fashion-mnist", eval_samples=64, train_samples=samples, calibration_samples=16,
            sensitivity_samples=0, fidelity_samples=16, max_float_layers=0, fidelity_top1=0.0,
            fidelity_cosine=-1.0, max_drop=100.0, qat_epochs=1, qat_teacher_logits=str(logits))

    with pytest.raises(DeployCompError, match="were stored for 256 samples"):
        deploycomp.compile(PROXY, tmp_path / "mismatch", options(384))
    manifest = deploycomp.compile(PROXY, tmp_path / "out", options(256))
    assert manifest["quantization"]["qat"]["teacher"] == f"stored top-K logits {logits}"


def test_qat_refuses_an_attention_it_cannot_emulate():
    """Swin's WindowAttention has no q_norm/k_norm slots: refused by the check plan_compile runs right
    after loading the source (before data, calibration and NNCF); a timm DeiT passes it."""
    from deploycomp.learn.qat import check_emulable

    from .conftest import tiny_module

    check_emulable(int8_deit())
    with pytest.raises(DeployCompError, match="'layers.0.blocks.0.attn' \\(WindowAttention\\) has none"):
        check_emulable(tiny_module("swin"))
