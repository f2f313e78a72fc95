"""quantize: int8 post-training quantization of the graph: NNCF's Q/DQ ONNX, or ONNX Runtime's
dynamic int8 for targets that run it faster.

NNCF's transformer preset (``ModelType.TRANSFORMER``) keeps LayerNorm, Softmax, GELU and the
residual Adds in float and quantizes the MatMul/Gemm inputs (weights per channel), with
SmoothQuant-style activation scaling where it helps. The result is standard ONNX with
QuantizeLinear/DequantizeLinear pairs: OpenVINO turns them into int8 kernels, ONNX Runtime runs
them as QDQ, and TensorRT builds a strongly typed int8 engine from them without builder flags.

``ort-dynamic`` is ONNX Runtime's dynamic quantization of the MatMul/Gemm weights (per channel,
activations quantized at run time, no calibration): ORT-only ops (MatMulInteger,
DynamicQuantizeMatMul); the backend says which method it runs (``Backend.int8_quantizer``).

Calibration uses ``--data`` training images when given; without data it uses Gaussian images and
says that the accuracy is unknown. The verification gate for int8 is a fidelity gate (top-1
agreement and cosine against the fp32 reference on inputs the calibration never saw), since a
relative L2 of 1e-4 cannot hold for int8.
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import onnx_ir as ir

from ..errors import DeployCompError
from .base import CompileContext, Pass, PassResult, register_pass

SYNTHETIC_WARNING = ("int8 calibrated on synthetic Gaussian images (no --data): the artifact's accuracy on real "
                     "images is unknown; give --data to calibrate and score it")


def calibration_inputs(ctx: CompileContext, samples: int, seed: int) -> tuple[list[np.ndarray], str]:
    """Batch-1 calibration images: the first ``samples`` training images, or Gaussian ones."""
    if ctx.train is not None:
        data = ctx.train.head(samples)
        images = data.normalize(data.images).numpy()
        return [images[i:i + 1] for i in range(len(images))], data.name
    rng = np.random.default_rng(seed)
    shape = (1, *ctx.input_shape[1:])
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(samples)], "synthetic gaussian"


@register_pass
class QuantizePass(Pass):
    name = "quantize"

    # nncf: NNCF's transformer preset (symmetric weights, asymmetric activations where it helps);
    # nncf-symmetric: every zero point 0, as TensorRT's explicit-precision int8 requires
    METHODS = ("nncf", "nncf-symmetric", "ort-dynamic")

    def __init__(self, samples: int = 128, method: str = "nncf", fast_bias_correction: bool = True):
        if method not in self.METHODS:
            raise DeployCompError(f"unknown int8 method '{method}': use {' or '.join(self.METHODS)}")
        self.samples, self.method, self.fast_bias_correction = samples, method, fast_bias_correction

    def requires(self, model: ir.Model, ctx: CompileContext) -> None:
        assert ctx.input_shape is not None, "quantization needs the input shape for its calibration images"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        if self.method == "ort-dynamic":
            return self.run_ort_dynamic(model, ctx)
        try:
            import nncf
        except ImportError as exc:
            raise DeployCompError("--precision int8 needs NNCF: pip install 'deploycomp[int8]' (nncf)") from exc
        inputs, source = calibration_inputs(ctx, self.samples, ctx.seed + 1)
        name = model.graph.inputs[0].name
        logging.getLogger("nncf").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            preset = nncf.QuantizationPreset.PERFORMANCE if self.method == "nncf-symmetric" else None
            quantized = nncf.quantize(ir.to_proto(model), nncf.Dataset(inputs, lambda x: {name: x}),
                                      model_type=nncf.ModelType.TRANSFORMER, subset_size=len(inputs), preset=preset,
                                      fast_bias_correction=self.fast_bias_correction)
        out = ir.from_proto(quantized)
        ctx.results["quantization"] = {"method": "nncf post-training quantization (transformer preset), Q/DQ ONNX",
                                       "nncf": nncf.__version__, "calibration": source, "samples": len(inputs),
                                       **({"warning": SYNTHETIC_WARNING} if ctx.train is None else {})}
        q = sum(n.op_type == "QuantizeLinear" for n in out.graph)
        return PassResult(out, modified=True, info={"quantize_nodes": q, "calibration": source})

    def run_ort_dynamic(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        import tempfile
        from pathlib import Path

        import onnx
        import onnxruntime

        from ..backends.ort import dynamic_int8

        with tempfile.TemporaryDirectory() as tmp:
            quantized = ir.from_proto(onnx.load(str(dynamic_int8(model, Path(tmp) / "int8.onnx"))))
        ctx.results["quantization"] = {"method": "onnxruntime dynamic int8 (MatMul/Gemm weights per channel)",
                                       "onnxruntime": onnxruntime.__version__, "calibration": "none (dynamic)",
                                       "samples": 0}
        n = sum(node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for node in quantized.graph)
        return PassResult(quantized, modified=True, info={"int8_matmuls": n})

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
