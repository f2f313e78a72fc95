"""quantize: int8 post-training quantization of the graph: NNCF's Q/DQ ONNX, or ONNX Runtime's
dynamic int8 for targets that run it faster; per-layer sensitivity, and accuracy-aware fallback.

NNCF's transformer preset (``ModelType.TRANSFORMER``) keeps LayerNorm, Softmax, GELU and the
residual Adds in float and quantizes the MatMul/Gemm inputs (weights per channel), with
SmoothQuant-style activation scaling where it helps. The result is standard ONNX with
QuantizeLinear/DequantizeLinear pairs: OpenVINO turns them into int8 kernels, ONNX Runtime runs
them as QDQ, and TensorRT builds a strongly typed int8 engine from them without builder flags.

``ort-dynamic`` is ONNX Runtime's dynamic quantization of the MatMul/Gemm weights (per channel,
activations quantized at run time, no calibration): ORT-only ops (MatMulInteger,
DynamicQuantizeMatMul); the backend says which method it runs (``Backend.int8_quantizer``).

Calibration uses ``--data`` training images when given; without data it uses Gaussian images and
says that the accuracy is unknown. The verification gate for int8 is a fidelity gate
(``passes/verify.FidelityGate``), since a relative L2 of 1e-4 cannot hold for int8.

**Per-layer sensitivity.** For every quantized MatMul/Gemm (named by its torch parameter name; an
attention product, which has no parameter, by its block) the graph is run by the target runtime
with only that layer put back in float, on images neither calibration nor the gate uses; the
layer's sensitivity is how much that raises the mean output cosine to the fp32 reference. One
variant per layer, so the cost is one runtime compile and one batch per quantized layer.

**Accuracy-aware fallback.** When the quantized graph misses the gate, the most sensitive layers
are kept in float, one more at a time in ranking order, until the gate passes (the same
``FidelityGate`` the verify pass applies, on the same held-out data), at most ``max_float_layers``
of them (default: a quarter of the quantized layers); if even that fails, the compile is refused.
Keeping a layer in float is exact, not a re-quantization: NNCF's Q/DQ graph is made with its float
weights still in it (``compress_weights`` off), so a kept layer reads the tensors its Q/DQ pairs
were fed (SmoothQuant's scaled activation and weight, whose product is the float layer's), and
NNCF's own weight compression folds the remaining weight quantizers into int8 afterwards. For
``ort-dynamic`` the kept layers are ONNX Runtime's ``nodes_to_exclude``. NNCF's
``quantize_with_accuracy_control`` was not used: it judges one scalar metric (this gate has three
thresholds), ranks quantizers by its own ONNX Runtime engine's outputs unless the metric is computed
per item, and names what it reverted only in its log.

**Quantization-aware fine-tuning** (``qat_epochs``, the CLI's ``--finetune-epochs`` with
``--precision int8`` and ``--data``): between PTQ and the sensitivity/fallback, the float weights
behind the Q/DQ graph's quantizers are fine-tuned by distillation from the fp32 model (or stored
top-K teacher logits) with those quantizers emulated in torch (``learn/qat.py``), and written back
into the same graph by parameter name. NNCF's torch QAT (``nncf.quantize`` on the module, export)
was not used: its export is another graph than the one the pipeline (and a pruning or token rewrite
before it) produced, with its own scales, so the sensitivity, fallback and gate would judge a graph
the pipeline never made. The emulation is compared with ONNX Runtime on the Q/DQ graph before it is
trained (``qat_emulation_ratio``); the manifest records the gate before and after and how many layers the
fallback would keep after PTQ alone. Only the Q/DQ methods (nncf, nncf-symmetric): ORT's dynamic
int8 has no fixed scales to train under.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import DeployCompError, VerificationError
from .base import CompileContext, Pass, PassResult, register_pass

SYNTHETIC_WARNING = ("int8 calibrated on synthetic Gaussian images (no --data): the artifact's accuracy on real "
                     "images is unknown; give --data to calibrate and score it")
MATMULS = ("MatMul", "Gemm")


def calibration_inputs(ctx: CompileContext, samples: int, seed: int) -> tuple[list[np.ndarray], str]:
    """Batch-1 calibration images: the first ``samples`` training images, or Gaussian ones."""
    if ctx.train is not None:
        data = ctx.train.head(samples)
        images = data.normalize(data.images).numpy()
        return [images[i:i + 1] for i in range(len(images))], data.name
    rng = np.random.default_rng(seed)
    shape = (1, *ctx.input_shape[1:])
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(samples)], "synthetic gaussian"


def sensitivity_inputs(ctx: CompileContext, skip: int, samples: int, seed: int) -> tuple[np.ndarray, str]:
    """Images the per-layer sensitivity is measured on: training images after the ``skip`` that
    calibration used (the gate's test images stay unseen by every choice made here), or Gaussian
    images of their own seed."""
    if ctx.train is not None and len(ctx.train) >= skip + samples:
        data = ctx.train.subset(range(skip, skip + samples))
        return data.normalize(data.images).numpy(), f"{ctx.train.name} images {skip}-{skip + samples - 1}"
    shape = (samples, *ctx.input_shape[1:])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32), f"gaussian, seed {seed}"


def seven_bit_weights(method: str) -> bool:
    """Whether ``method``'s int8 weights keep to 7 bits: on a CPU whose int8 kernels saturate
    (``fingerprint.int8_dot_saturates``), for the artifacts this CPU kind runs; not for TensorRT's
    (``nncf-symmetric``), whose GPU kernels accumulate in int32."""
    from ..backends.fingerprint import int8_dot_saturates

    return method != "nncf-symmetric" and int8_dot_saturates()


def nncf_qdq(model: onnx.ModelProto, inputs: list[np.ndarray], symmetric: bool = False,
             fast_bias_correction: bool = True, seven_bit: bool = False) -> onnx.ModelProto:
    """NNCF post-training quantization (transformer preset) to Q/DQ ONNX, the weights left in float
    behind their QuantizeLinear (``compress_weights`` off) so that any layer can be put back in float
    exactly; ``compress_int8_weights`` folds them afterwards. ``seven_bit``: NNCF's overflow fix on
    every layer (half the weight range), else its default (first layer only)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    name = model.graph.input[0].name
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return nncf.quantize(model, nncf.Dataset(inputs, lambda x: {name: x}), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(inputs), preset=nncf.QuantizationPreset.PERFORMANCE if symmetric else None,
                             fast_bias_correction=fast_bias_correction,
                             advanced_parameters=AdvancedQuantizationParameters(
                                 backend_params={"compress_weights": False},
                                 overflow_fix=OverflowFix.ENABLE if seven_bit else None))


def compress_int8_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """NNCF's own last step of ONNX quantization: every QuantizeLinear of a constant weight folded
    into an int8 initializer (what ``nncf.quantize`` does by default)."""
    from nncf.onnx.graph.passes import compress_quantize_weights_transformation

    compress_quantize_weights_transformation(model)
    return model


def dynamic_int8(model, path, exclude: Sequence[str] = ()):
    """ONNX Runtime's dynamic int8 (``backends/ort.dynamic_int8``), ``exclude`` node names kept in
    float, weights in 7 bits where this CPU's kernels would saturate."""
    from ..backends.ort import dynamic_int8 as ort_dynamic_int8

    return ort_dynamic_int8(model, path, exclude=exclude, reduce_range=seven_bit_weights("ort-dynamic"))


def quantize_for_latency(model, method: str, inputs: list[np.ndarray], workdir) -> onnx.ModelProto:
    """``model`` in int8 as this pass makes it with ``method`` (no sensitivity, no fallback), for
    timing only: latency-table micro-graphs and the prune pass's on-device checks of an int8 budget.
    ``inputs``: calibration samples (Gaussian is fine: scales do not pick the kernels)."""
    from pathlib import Path

    if method not in QuantizePass.METHODS:
        raise DeployCompError(f"unknown int8 method '{method}': use {' or '.join(QuantizePass.METHODS)}")
    proto = model if isinstance(model, onnx.ModelProto) else (
        onnx.load_from_string(model) if isinstance(model, bytes) else ir.to_proto(model))
    if method == "ort-dynamic":
        return onnx.load(str(dynamic_int8(proto, Path(workdir) / "dynamic-int8.onnx")))
    return compress_int8_weights(nncf_qdq(proto, inputs, symmetric=method == "nncf-symmetric",
                                          seven_bit=seven_bit_weights(method)))


@dataclass(frozen=True)
class Int8Layer:
    node: str  # the MatMul/Gemm node's name in the graph
    name: str  # its torch parameter name (weight), or "block i attention q@k" / "... attn@v"


def layer_names(model: ir.Model, structure) -> dict[str, str]:
    """MatMul/Gemm node name -> what the report calls it: the weight's initializer name (the torch
    parameter name: cleanup keeps it), or the attention product of block i for the weightless ones."""
    roles = {"qk_matmul": "q@k", "av_matmul": "attn@v"}
    attention = {}
    for block in getattr(structure, "blocks", None) or []:
        for role, what in roles.items():
            if role in block.nodes:
                attention[block.nodes[role]] = f"block {block.index} attention {what}"
    names = {}
    for node in model.graph:
        if node.op_type in MATMULS and node.name:
            weight = next((v.name for v in node.inputs[1:] if v is not None and v.is_initializer()), None)
            names[node.name] = weight or attention.get(node.name, node.name)
    return names


class QdqLayers:
    """An NNCF Q/DQ graph whose quantized layers can be put back in float, any subset at once."""

    def __init__(self, quantized: onnx.ModelProto, names: dict[str, str]):
        self.quantized = quantized
        producer = {out: node for node in quantized.graph.node for out in node.output}
        self.restore: dict[str, dict[int, str]] = {}  # node -> {input index: the float tensor its Q/DQ pair was fed}
        layers = []
        for node in quantized.graph.node:
            if node.op_type not in MATMULS:
                continue
            sources = {}
            for i, name in enumerate(node.input):
                dq = producer.get(name)
                if dq is None or dq.op_type != "DequantizeLinear":
                    continue
                q = producer.get(dq.input[0])
                assert q is not None and q.op_type == "QuantizeLinear", \
                    f"{node.name}: input {i} is a compressed int8 tensor, it cannot be put back in float"
                sources[i] = q.input[0]
            if sources:
                self.restore[node.name] = sources
                layers.append(Int8Layer(node.name, names.get(node.name, node.name)))
        self.layers = layers

    def model(self, keep: Sequence[str] = ()) -> onnx.ModelProto:
        """The quantized graph with the layers ``keep`` (node names) in float."""
        out = onnx.ModelProto()
        out.CopyFrom(self.quantized)
        keep = set(keep)
        for node in out.graph.node:
            if node.name in keep:
                for i, source in self.restore[node.name].items():
                    node.input[i] = source
        return out

    def emit(self, keep: Sequence[str] = ()) -> ir.Model:
        """The artifact's graph: ``keep`` in float, their dead Q/DQ pairs removed, weights int8."""
        import onnx_ir.passes.common as common

        model = ir.from_proto(self.model(keep))
        common.RemoveUnusedNodesPass()(model)  # before compression: it would drop a kept layer's float weight
        return ir.from_proto(compress_int8_weights(ir.to_proto(model)))


class DynamicLayers:
    """ONNX Runtime dynamic int8 of a graph; a layer in float is one ORT leaves out (``nodes_to_exclude``)."""

    def __init__(self, fp32: ir.Model, names: dict[str, str], workdir):
        from pathlib import Path

        self.fp32 = ir.to_proto(fp32)
        self.workdir = Path(workdir)
        quantized = self.model()
        left = {n.name for n in quantized.graph.node if n.op_type in MATMULS}
        self.layers = [Int8Layer(n.name, names.get(n.name, n.name)) for n in self.fp32.graph.node
                       if n.op_type in MATMULS and n.name not in left]

    def model(self, keep: Sequence[str] = ()) -> onnx.ModelProto:
        path = self.workdir / f"int8-{len(keep)}.onnx"
        return onnx.load(str(dynamic_int8(self.fp32, path, exclude=list(keep))))

    def emit(self, keep: Sequence[str] = ()) -> ir.Model:
        return ir.from_proto(self.model(keep))


def mean_cosine(got: np.ndarray, want: np.ndarray) -> float:
    from .verify import cosine_similarity

    return float(np.mean(cosine_similarity(got, want)))


def layer_sensitivity(layers, run_model, x: np.ndarray, want: np.ndarray) -> tuple[float, list[dict]]:
    """Mean output cosine to the fp32 reference of the fully quantized graph, and per layer with
    only that layer in float; rows sorted most sensitive first (largest cosine gain)."""
    base = mean_cosine(run_model(layers.model()), want)
    rows = []
    for layer in layers.layers:
        cosine = mean_cosine(run_model(layers.model([layer.node])), want)
        rows.append({"layer": layer.name, "node": layer.node, "cosine_only_this_float": cosine, "gain": cosine - base})
    rows.sort(key=lambda r: -r["gain"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return base, rows


@register_pass
class QuantizePass(Pass):
    name = "quantize"

    # nncf: NNCF's transformer preset (symmetric weights, asymmetric activations where it helps);
    # nncf-symmetric: every zero point 0, as TensorRT's explicit-precision int8 requires
    METHODS = ("nncf", "nncf-symmetric", "ort-dynamic")

    def __init__(self, samples: int = 128, method: str = "nncf", fast_bias_correction: bool = True,
                 sensitivity_samples: int = 16, max_float_layers: int | None = None, qat_epochs: int = 0,
                 qat_lr: float = 1e-4, qat_teacher_logits: str | None = None, qat_emulation_ratio: float = 0.2):
        if method not in self.METHODS:
            raise DeployCompError(f"unknown int8 method '{method}': use {' or '.join(self.METHODS)}")
        if max_float_layers is not None and max_float_layers < 0:
            raise DeployCompError(f"--max-float-layers must be >= 0, not {max_float_layers}")
        if sensitivity_samples < 0:
            raise DeployCompError(f"sensitivity samples must be >= 0, not {sensitivity_samples}")
        if max_float_layers and not sensitivity_samples:
            raise DeployCompError("the accuracy-aware fallback (--max-float-layers) needs per-layer sensitivity "
                                  "(sensitivity samples > 0)")
        self.samples, self.method, self.fast_bias_correction = samples, method, fast_bias_correction
        self.sensitivity_samples, self.max_float_layers = sensitivity_samples, max_float_layers
        if qat_epochs < 0:
            raise DeployCompError(f"fine-tuning epochs must be >= 0, not {qat_epochs}")
        if qat_epochs and method == "ort-dynamic":
            raise DeployCompError("quantization-aware fine-tuning tunes the weights under a Q/DQ graph's quantizers; "
                                  "ort-cpu's int8 is ONNX Runtime's dynamic quantization (no fixed scales): use "
                                  "openvino-cpu or tensorrt")
        self.qat_epochs, self.qat_lr, self.qat_teacher_logits = qat_epochs, qat_lr, qat_teacher_logits
        # the emulation's relative L2 to the runtime on the Q/DQ graph, at most this share of the fp32 model's:
        # float summation order flips a few roundings, which a sensitive model amplifies (a random proxy DeiT
        # with 4x blocks: 0.005 against fp32's 0.043); a missed quantizer or factor is of fp32's order or more
        self.qat_emulation_ratio = qat_emulation_ratio

    def requires(self, model: ir.Model, ctx: CompileContext) -> None:
        assert ctx.input_shape is not None, "quantization needs the input shape for its calibration images"
        if self.qat_epochs:
            assert ctx.train is not None and ctx.module is not None, \
                "quantization-aware fine-tuning needs training data and the torch model"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        import tempfile

        ctx.fp32_model = model.clone()
        names = layer_names(model, ctx.structure)
        seven_bit = seven_bit_weights(self.method)  # this CPU's int8 kernels would saturate on 8-bit weights
        with tempfile.TemporaryDirectory(prefix="deploycomp-int8-") as tmp:
            if self.method == "ort-dynamic":
                import onnxruntime

                layers = DynamicLayers(model, names, tmp)
                info = {"method": "onnxruntime dynamic int8 (MatMul/Gemm weights per channel)",
                        "onnxruntime": onnxruntime.__version__, "calibration": "none (dynamic)", "samples": 0}
                calibrated = 0
            else:
                try:
                    import nncf
                except ImportError as exc:
                    raise DeployCompError("--precision int8 needs NNCF: pip install 'deploycomp[int8]' (nncf)") from exc
                inputs, source = calibration_inputs(ctx, self.samples, ctx.seed + 1)
                quantized = nncf_qdq(ir.to_proto(model), inputs, symmetric=self.method == "nncf-symmetric",
                                     fast_bias_correction=self.fast_bias_correction,
                                     seven_bit=seven_bit)
                info = {"method": "nncf post-training quantization (transformer preset), Q/DQ ONNX",
                        "nncf": nncf.__version__, "calibration": source, "samples": len(inputs),
                        **({"warning": SYNTHETIC_WARNING} if ctx.train is None else {})}
                calibrated = len(inputs)
                if self.qat_epochs:
                    quantized = self.finetune(quantized, model, names, ctx, info, calibrated)
                layers = QdqLayers(quantized, names)
            info["quantized_layers"] = len(layers.layers)
            info["weight_bits"] = 7 if seven_bit else 8
            measurable = ctx.backend is not None and ctx.reference is not None  # a hand-built pipeline may lack both
            keep = self.fit_gate(layers, ctx, info, calibrated) if self.sensitivity_samples and layers.layers \
                and measurable else []
            out = layers.emit(keep)
        ctx.results["quantization"] = info
        q = sum(n.op_type in ("QuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul") for n in out.graph)
        return PassResult(out, modified=True, info={"int8_nodes": q, "kept_float": len(keep),
                                                    "calibration": info["calibration"]})

    def fit_gate(self, layers, ctx: CompileContext, info: dict, calibrated: int, refuse: bool = True) -> list[str] | None:
        """Per-layer sensitivity into ``info``; then, if the quantized graph misses the fidelity gate,
        the most sensitive layers kept in float until it passes (node names of the kept layers).
        ``refuse=False``: None instead of the refusal when the cap is not enough."""
        from .verify import FidelityGate

        t0 = time.perf_counter()
        x, inputs = sensitivity_inputs(ctx, calibrated, self.sensitivity_samples, ctx.seed + 3)
        want = np.asarray(ctx.reference(x))
        run_model = lambda m: ctx.backend.runner(m)(x)  # noqa: E731
        base, rows = layer_sensitivity(layers, run_model, x, want)
        info["sensitivity"] = {
            "measure": "mean output cosine to the fp32 reference with only this layer in float, minus the fully "
                       "quantized graph's (gain); run by the target runtime",
            "inputs": inputs, "samples": len(x), "cosine_all_int8": base, "layers": rows,
            "seconds": round(time.perf_counter() - t0, 2)}
        cap = self.max_float_layers if self.max_float_layers is not None else max(1, len(rows) // 4)
        cap = min(cap, len(rows)) if ctx.fidelity is not None else 0
        fallback = {"cap": cap, "kept_float": [], "attempts": []}
        info["fallback"] = fallback
        if cap == 0:  # no fallback: the verify pass judges the quantized graph as it is
            return []
        gate = FidelityGate.of(ctx)
        for k in range(cap + 1):
            keep = [r["node"] for r in rows[:k]]
            result = gate.measure(ctx.backend.runner(layers.model(keep)))
            failures = gate.failures(result)
            fallback["attempts"].append({"kept": k, **result, "passed": not failures})
            if not failures:
                fallback["kept_float"] = [r["layer"] for r in rows[:k]]
                return keep
        if not refuse:
            fallback["kept_float"] = None  # the cap was not enough
            return None
        raise VerificationError(
            f"fidelity gate failed even with the {cap} most sensitive of {len(rows)} quantized layers kept in float "
            f"(--max-float-layers {cap}): {'; '.join(failures)} against the {ctx.reference_kind} reference on "
            f"{gate.inputs}; no artifact written")

    def finetune(self, quantized: onnx.ModelProto, model: ir.Model, names: dict[str, str], ctx: CompileContext,
                 info: dict, calibrated: int) -> onnx.ModelProto:
        """Quantization-aware fine-tuning (``learn/qat.py``): the PTQ graph's float weights tuned under
        its own quantizers by distillation from the fp32 teacher, written back into the graph. Records
        in ``info["qat"]`` the gate before and after (the fully quantized graph, run by the target) and
        how many layers the fallback needed to keep in float after PTQ alone."""
        import copy

        import onnxruntime
        import torch

        from ..learn.distill import finetune_with_distillation
        from ..learn.qat import QdqEmulation, read_floats, write_back
        from .base import objective_of
        from .verify import FidelityGate, relative_l2

        qat = info["qat"] = {"epochs": self.qat_epochs, "lr": self.qat_lr,
                             "teacher": f"stored top-K logits {self.qat_teacher_logits}" if self.qat_teacher_logits
                             else "the fp32 model (live)", "train_samples": len(ctx.train)}
        measurable = ctx.backend is not None and ctx.fidelity is not None and ctx.reference is not None
        gate = FidelityGate.of(ctx) if measurable else None
        if gate is not None:
            qat["gate_before"] = gate.measure(ctx.backend.runner(quantized))
            if self.sensitivity_samples:  # what PTQ alone would have kept in float (None: its cap was not enough)
                ptq: dict = {}
                self.fit_gate(QdqLayers(quantized, names), ctx, ptq, calibrated, refuse=False)
                qat["ptq_kept_float"] = ptq["fallback"]["kept_float"]

        student = copy.deepcopy(ctx.module)
        attention = {b.index: names[b.nodes["q"]].rsplit(".", 2)[0] for b in getattr(ctx.structure, "blocks", [])
                     if b.nodes.get("q") in names}
        emulation = QdqEmulation(student, quantized, model, names, attention)
        read_floats(student, quantized, model, skip=set(emulation.smoothing))
        # the emulation must compute what the Q/DQ graph means before it is trained: ORT at basic
        # optimizations (Q/DQ not fused into int8 kernels, which saturate on a CPU without VNNI where
        # TensorRT's do not; the CPU targets' 7-bit weights already make the two agree)
        from ..backends.fingerprint import usable_cores
        from ..backends.ort import session_options_for

        x, inputs = sensitivity_inputs(ctx, calibrated, max(self.sensitivity_samples, 8), ctx.seed + 4)
        session = onnxruntime.InferenceSession(quantized.SerializeToString(), session_options_for(usable_cores(), "basic"),
                                               providers=["CPUExecutionProvider"])
        ort_out = session.run(None, {session.get_inputs()[0].name: x})[0]
        with torch.inference_mode():
            emulated = student.eval()(torch.from_numpy(x)).numpy()
        err, fp32_err = relative_l2(emulated, ort_out), relative_l2(np.asarray(ctx.reference(x)), ort_out)
        qat["emulation_vs_onnxruntime"] = {"rel_l2": err, "fp32_rel_l2": fp32_err, "max_ratio": self.qat_emulation_ratio,
                                           "inputs": inputs}
        if not err <= self.qat_emulation_ratio * fp32_err:
            raise DeployCompError(f"quantization-aware fine-tuning refused: the torch emulation of the Q/DQ graph "
                                  f"differs from ONNX Runtime by relative L2 {err:.3g}, more than "
                                  f"{self.qat_emulation_ratio:g} x the fp32 model's {fp32_err:.3g}")
        t0 = time.perf_counter()
        teacher = ctx.teacher if ctx.teacher is not None else ctx.module
        history = finetune_with_distillation(student, ctx.train, None, teacher, epochs=self.qat_epochs,
                                             lr=self.qat_lr, seed=ctx.seed, teacher_logits=self.qat_teacher_logits,
                                             log=ctx.say, objective=objective_of(ctx)).history
        student.eval()
        tuned = onnx.ModelProto()
        tuned.CopyFrom(quantized)
        qat["parameters_written"] = write_back(student, tuned, model)
        qat["history"], qat["seconds"] = history, round(time.perf_counter() - t0, 2)
        if gate is not None:
            qat["gate_after"] = gate.measure(ctx.backend.runner(tuned))
        return tuned

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
        ops = {n.op_type for n in model.graph}
        if self.method == "ort-dynamic":
            assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, "no int8 MatMul: nothing was quantized"
            return
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, "no Q/DQ nodes: nothing was quantized"
        if self.method == "nncf-symmetric":
            for node in model.graph:
                if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.inputs) > 2:
                    zp = node.inputs[2].const_value
                    assert zp is None or not zp.numpy().any(), f"{node.name}: zero point is not 0 (TensorRT needs symmetric int8)"
        for node in model.graph:  # the transformer preset keeps these in float
            if node.op_type in ("LayerNormalization", "Softmax"):
                assert not (node.inputs[0].producer() and node.inputs[0].producer().op_type == "DequantizeLinear"), \
                    f"{node.op_type} '{node.name}' reads a dequantized int8 tensor"
        for node in model.graph:  # weights stored as int8 (NNCF's compression ran)
            if node.op_type == "QuantizeLinear":
                assert not node.inputs[0].is_initializer(), f"{node.name}: a float weight quantized at run time"
