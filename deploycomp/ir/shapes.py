"""Concrete shapes and FLOPs of a graph, measured by running it once at batch 1.

Exporters compute many reshape targets at run time, so static shape inference can leave
dimensions unknown; one ONNX Runtime run at batch 1 with the wanted values exposed as outputs
gives exact shapes for any exporter.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def probe_values(model: ir.Model, names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Run the graph once at batch 1 on ONNX Runtime (unoptimized, so every value exists) on a
    Gaussian image and return the values of ``names``."""
    import onnx
    import onnxruntime as ort

    names = list(dict.fromkeys(names))
    proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [1] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return dict(zip(names, sess.run(names, {inp.name: x})))


def probe_shapes(model: ir.Model, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shapes of ``names`` in one run of the graph at batch 1 (``probe_values``)."""
    return {n: tuple(v.shape) for n, v in probe_values(model, names).items()}


def matmul_flops(model: ir.Model) -> float:
    """FLOPs (2 x multiply-accumulates) of every MatMul, Gemm and Conv for one image."""
    nodes = [n for n in model.graph if n.op_type in ("MatMul", "Gemm", "Conv") and n.domain in ("", "ai.onnx")]
    names = []
    for n in nodes:
        names += [n.inputs[0].name, n.outputs[0].name]
    shapes = probe_shapes(model, names)
    total = 0.0
    for n in nodes:
        a, out = shapes[n.inputs[0].name], shapes[n.outputs[0].name]
        if n.op_type == "Conv":
            w = n.inputs[1].const_value.shape if n.inputs[1].const_value is not None else None
            if w is None:
                continue
            total += 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            trans_a = n.attributes.get("transA")
            k = a[0] if trans_a is not None and trans_a.as_int() else a[-1]
            total += 2.0 * float(np.prod(out)) * k
        else:
            total += 2.0 * float(np.prod(out)) * a[-1]
    return total


FLOAT_WEIGHTS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
INT8 = (ir.DataType.INT8, ir.DataType.UINT8)
# inputs that are quantization parameters: Q/DQ's scale and zero point, ORT's dynamic int8 weight scale/zero point
QPARAM_INPUTS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "DynamicQuantizeMatMul": (2, 3),
                 "MatMulInteger": (2, 3)}


def param_count(model: ir.Model) -> int:
    """Weights in the graph's initializers: float ones and int8 matrices (a quantized graph's
    weights), not the scales and zero points that quantize them, nor scalars and shape constants."""
    qparams = {node.inputs[i].name for node in model.graph for i in QPARAM_INPUTS.get(node.op_type, ())
               if i < len(node.inputs) and node.inputs[i] is not None}

    def is_weight(v: ir.Value) -> bool:
        t = v.const_value
        if t is None or len(t.shape) == 0 or v.name in qparams:
            return False
        return t.dtype in FLOAT_WEIGHTS or (t.dtype in INT8 and len(t.shape) >= 2)

    return int(sum(int(np.prod(v.const_value.shape)) for v in model.graph.initializers.values() if is_weight(v)))
