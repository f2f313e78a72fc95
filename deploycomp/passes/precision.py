"""precision: the graph in fp16 or bf16, float32 kept where accuracy needs it.

TensorRT 11 removed the builder's precision flags (networks are strongly typed: every tensor's type
comes from the graph), so precision is decided here, for every backend. Nodes whose op accumulates
or normalizes — LayerNorm and the other normalizations, Softmax, the reductions — stay float32,
and so does a node whose ONNX schema does not take the low type at the model's opset (Conv has no
bfloat16 before opset 22), an op of another domain, and TokenCluster in bf16 (its kernel takes
float32/float16); every other node computes in the low type. Casts go where the two meet, and at the graph
boundary: inputs and outputs stay float32. Float32 weights used only by low-precision nodes are
stored in the low type (clipped to its finite range); weights of float32 nodes stay float32.

Why not ``onnxruntime.transformers.float16.convert_float_to_float16`` (which has ``op_block_list``
and ``keep_io_types``)? It converts to float16 only (no bf16), and it learns intermediate types
from ONNX shape inference, which knows nothing of our custom op (``deploycomp::TokenCluster``).
Our graphs carry types (onnx-ir), so the conversion is a short walk over them.

ONNX Runtime's CPU provider lacks float16 kernels for some ops; see ``tests/test_tensorrt.py``
for what was run here and docs/gpu.md.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import DeployCompError
from .base import CompileContext, Pass, PassResult, register_pass

F32 = ir.DataType.FLOAT
LOW = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
KEEP_FP32 = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
})


def _kept(node: ir.Node, keep_ops, low: ir.DataType, opset: int) -> bool:
    """Stays float32: an op of ``keep_ops``, or one whose schema does not take ``low`` at this opset
    (e.g. Conv has no bfloat16 before opset 22; ops of other domains keep their types)."""
    from ..tokens.op import DOMAIN, OP_TYPE

    if node.domain == DOMAIN and node.op_type == OP_TYPE:
        return low != ir.DataType.FLOAT16  # the Triton kernel takes float32 or float16
    if node.domain not in ("", "ai.onnx"):
        return True
    if node.op_type in keep_ops:
        return True
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return True
    wanted = f"tensor({low.name.lower()})"
    return any("tensor(float)" in c.allowed_type_strs and wanted not in c.allowed_type_strs
               for c in schema.type_constraints)


def _fill_missing_dtypes(model: ir.Model) -> None:
    """Types of values the graph left open: the output of an op of another domain (our TokenCluster,
    ONNX Runtime's MultiHeadAttention of the ``ort-mha`` lowering) is its query's type, the rest comes
    from ONNX shape inference (which skips those ops, hence twice). An untyped MultiHeadAttention
    output used to get no Cast before the fp16 projection after it (fp16 + semantic tokens on ort-cpu)."""
    from onnx_ir.passes.common import ShapeInferencePass

    for _ in range(2):
        for node in model.graph:
            if node.domain in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
                continue
            if node.outputs[0].dtype is None and node.inputs[0].dtype is not None:
                node.outputs[0].type = ir.TensorType(node.inputs[0].dtype)
        if all(o.dtype is not None for n in model.graph for o in n.outputs):
            return
        ShapeInferencePass()(model)


def _low_tensor(tensor, low: ir.DataType, name: str):
    array = tensor.numpy().astype(np.float32)
    if low == ir.DataType.FLOAT16:
        array = np.clip(array, -65504.0, 65504.0)
    return ir.tensor(array.astype(low.numpy()), name=name)


def convert_precision(model: ir.Model, dtype: str = "fp16", keep_ops=KEEP_FP32) -> ir.Model:
    """Convert ``model`` in place (and return it); see the module docstring for the rules."""
    if dtype not in LOW:
        raise DeployCompError(f"unknown precision '{dtype}': use one of fp32, {', '.join(LOW)}")
    low, graph = LOW[dtype], model.graph
    _fill_missing_dtypes(model)
    nodes = list(graph)
    opset = model.opset_imports.get("", 18)
    kept = {n: _kept(n, keep_ops, low, opset) for n in nodes}
    # Values that will hold low-precision data: float32 outputs of low nodes, and float32 weights
    # whose every consumer is a low node.
    low_values = {o for n in nodes if not kept[n] for o in n.outputs if o.dtype == F32}
    low_weights = {v for v in graph.initializers.values()
                   if v.dtype == F32 and v.consumers() and not any(kept.get(c, True) for c in v.consumers())}
    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
    new_nodes: list[ir.Node] = []

    def cast(value: ir.Value, to: ir.DataType) -> ir.Value:
        if (value, to) not in casts:
            node = ir.node("Cast", [value], attributes={"to": to}, name=f"{value.name}.to_{to.name.lower()}")
            out = node.outputs[0]
            out.name, out.type, out.shape = node.name, ir.TensorType(to), value.shape
            new_nodes.append(node)
            casts[(value, to)] = out
        return casts[(value, to)]

    for node in nodes:
        for i, value in enumerate(node.inputs):
            if value is None:
                continue
            is_low = value in low_values or value in low_weights
            if kept[node] and is_low:
                node.replace_input_with(i, cast(value, F32))
            elif not kept[node] and not is_low and value.dtype == F32:
                node.replace_input_with(i, cast(value, low))
        if not kept[node]:
            _retype_attributes(node, low)
    for value in low_weights:
        value.const_value = _low_tensor(value.const_value, low, value.name)
        value.type = ir.TensorType(low)
    for value in low_values:
        value.type = ir.TensorType(low)
    for i, value in enumerate(list(graph.outputs)):
        if value in low_values:  # the boundary stays float32: the output name moves to a Cast
            name = value.name
            value.name = f"{name}.{dtype}"
            out = cast(value, F32)
            out.name = name
            graph.outputs[i] = out
    graph.extend(new_nodes)
    graph.sort()
    return model


def _retype_attributes(node: ir.Node, low: ir.DataType) -> None:
    """Attributes that fix a float32 result inside the low region: Cast targets and constants."""
    if node.domain not in ("", "ai.onnx"):
        return
    if node.op_type == "Cast" and node.attributes["to"].as_int() == F32:
        node.attributes["to"] = ir.AttrInt64("to", low)
    elif node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
        tensor = node.attributes["value"].as_tensor()
        if tensor.dtype == F32:
            node.attributes["value"] = ir.AttrTensor("value", _low_tensor(tensor, low, tensor.name))
    elif node.op_type == "Constant" and ({"value_float", "value_floats"} & set(node.attributes)):
        key = "value_float" if "value_float" in node.attributes else "value_floats"
        array = np.array(node.attributes.pop(key).value, np.float32)
        node.attributes["value"] = ir.AttrTensor("value", _low_tensor(ir.tensor(array), low, None))


@register_pass
class PrecisionPass(Pass):
    """Convert the graph to fp16/bf16 (``convert_precision``); fp32 is a no-op."""

    name = "precision"

    def __init__(self, dtype: str = "fp16", keep_ops=KEEP_FP32):
        if dtype != "fp32" and dtype not in LOW:
            raise DeployCompError(f"unknown precision '{dtype}': use one of fp32, {', '.join(LOW)}")
        self.dtype, self.keep_ops = dtype, keep_ops

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        if self.dtype == "fp32":
            return PassResult(model, modified=False)
        ctx.fp32_model = model.clone()
        convert_precision(model, self.dtype, self.keep_ops)
        return PassResult(model, modified=True, info={"precision": self.dtype})

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
        for value in (*model.graph.inputs, *model.graph.outputs):
            assert value.dtype not in LOW.values(), f"boundary value '{value.name}' is {value.dtype}, expected float32"
        if self.dtype != "fp32":
            for node in model.graph:
                if node.domain in ("", "ai.onnx") and node.op_type in self.keep_ops:
                    bad = [v.name for v in node.inputs if v is not None and v.dtype == LOW[self.dtype]]
                    assert not bad, f"{node.op_type} '{node.name}' reads {self.dtype} inputs {bad}"
