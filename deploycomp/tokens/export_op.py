"""``TokenCluster`` as a torch custom op (``deploycomp::token_cluster``) with its ONNX translation,
so that a torch model exported with :func:`export_with_token_cluster` carries ``deploycomp::TokenCluster``
nodes (lowered per target by ``op.lower``) where its cross-attention would otherwise be spelled out
in MatMul/Softmax. The op's torch implementation is :func:`~deploycomp.tokens.op.token_cluster_reference`;
it is used only while exporting (the torch models call the reference directly, and train through it).
"""

from __future__ import annotations

import contextlib

import torch

from .op import DOMAIN, OP_TYPE, VERSION, token_cluster_reference


@torch.library.custom_op("deploycomp::token_cluster", mutates_args=())
def token_cluster(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    return token_cluster_reference(q, k, v, num_heads, scale)


@token_cluster.register_fake
def _(q, k, v, num_heads, scale):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


def _translation():
    import onnxscript

    register_schema()
    deploycomp = onnxscript.values.Opset(DOMAIN, VERSION)

    def token_cluster_onnx(q, k, v, num_heads: int, scale: float):
        return getattr(deploycomp, OP_TYPE)(q, k, v, num_heads=num_heads, scale=scale)

    return {torch.ops.deploycomp.token_cluster.default: token_cluster_onnx}


def register_schema() -> None:
    """Declare the op to ONNX (inputs, output, attributes) once, so onnxscript can build its nodes."""
    import onnx

    if onnx.defs.has(OP_TYPE, VERSION, DOMAIN):
        return
    T = "T"
    schema = onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, VERSION, doc="deploycomp.tokens.op: multi-head attention of M queries over N keys/values",
        inputs=[onnx.defs.OpSchema.FormalParameter(n, T) for n in ("query", "key", "value")],
        outputs=[onnx.defs.OpSchema.FormalParameter("output", T)],
        type_constraints=[(T, ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
        attributes=[onnx.defs.OpSchema.Attribute("num_heads", onnx.defs.OpSchema.AttrType.INT, "heads"),
                    onnx.defs.OpSchema.Attribute("scale", onnx.defs.OpSchema.AttrType.FLOAT, "scale of q.k"),
                    # what kernels/trt_plugin.py adds for TensorRT's parser: once this schema is
                    # registered in a process, onnx's checker rejects attributes it does not declare
                    onnx.defs.OpSchema.Attribute("plugin_namespace", onnx.defs.OpSchema.AttrType.STRING,
                                                 "TensorRT plugin namespace", required=False),
                    onnx.defs.OpSchema.Attribute("aot", onnx.defs.OpSchema.AttrType.INT,
                                                 "1: TensorRT's ahead-of-time plugin", required=False)])
    onnx.defs.register_schema(schema)


def custom_translation_table() -> dict:
    """What ``torch.onnx.export(..., custom_translation_table=...)`` needs to write TokenCluster nodes."""
    return _translation()


@contextlib.contextmanager
def cluster_as_op(module):
    """While exporting: ``module``'s ``cluster`` attribute (its TokenCluster implementation) is the custom op."""
    before = module.cluster
    module.cluster = lambda q, k, v, heads, scale: token_cluster(q, k, v, heads, float(scale))
    try:
        yield module
    finally:
        module.cluster = before
