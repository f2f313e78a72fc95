"""The token-clustering op: ``deploycomp::TokenCluster`` (domain ``deploycomp``, version 1).

STViT's semantic-token generator recovers cluster centres by attention: each centre (a query)
gathers the image tokens (keys/values) it attends to. That multi-head cross-attention, with a query
set much smaller than the key set, is the op every backend implements:

    inputs   query  (B, M, H·Dqk)   projected centres (M semantic tokens, + cls)
             key    (B, N, H·Dqk)   projected tokens
             value  (B, N, H·Dv)
    attrs    num_heads: int = H,  scale: float (applied to q·kᵀ)
    output   (B, M, H·Dv)          out[b, m, h·Dv:(h+1)·Dv] = softmax_n(scale · q_bmh · k_bnhᵀ) · v_bnh

Implementations, all checked against :func:`token_cluster_reference`:
  - reference decomposition in standard ONNX ops (``decompose``): every backend runs it;
  - ONNX Runtime CPU lowering to ``com.microsoft.MultiHeadAttention`` (``lower_for_ort``);
  - a Triton kernel (``deploycomp.kernels.token_cluster``) for GPUs, and the TensorRT plugin
    built from its PTX.
"""

from __future__ import annotations

import numpy as np

DOMAIN = "deploycomp"
OP_TYPE = "TokenCluster"
VERSION = 1


def token_cluster_reference(q, k, v, num_heads: int, scale: float):
    """The op's meaning in torch (float32 accumulation whatever the input dtype)."""
    import torch

    b, m, hq = q.shape
    n, hv = k.shape[1], v.shape[2]
    dq, dv = hq // num_heads, hv // num_heads
    qh = q.float().reshape(b, m, num_heads, dq).transpose(1, 2)
    kh = k.float().reshape(b, n, num_heads, dq).transpose(1, 2)
    vh = v.float().reshape(b, n, num_heads, dv).transpose(1, 2)
    attn = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)
    return (attn @ vh).transpose(1, 2).reshape(b, m, hv).to(q.dtype)


def token_cluster_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, scale: float) -> np.ndarray:
    import torch

    return token_cluster_reference(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), num_heads,
                                   scale).numpy()


def token_cluster_node(b, q, k, v, num_heads: int, scale: float):
    """Append a TokenCluster node to a :class:`~deploycomp.ir.build.ChainBuilder`; returns its output."""
    return b.op(OP_TYPE, q, k, v, domain=DOMAIN, num_heads=int(num_heads), scale=float(scale))


def token_cluster_nodes(model) -> list:
    return [n for n in model.graph if n.domain == DOMAIN and n.op_type == OP_TYPE]


def _attrs(node) -> tuple[int, float]:
    return node.attributes["num_heads"].as_int(), node.attributes["scale"].as_float()


LOWERINGS = ("reference", "ort-mha")


def lower(model, how: str) -> int:
    """Replace every TokenCluster node in place: ``reference`` = the decomposition in standard ONNX
    ops; ``ort-mha`` = ONNX Runtime's fused ``com.microsoft.MultiHeadAttention`` (CPU and CUDA).
    Returns the number of nodes replaced."""
    from ..errors import DeployCompError
    from ..ir.build import ChainBuilder

    if how not in LOWERINGS:
        raise DeployCompError(f"unknown TokenCluster lowering '{how}': use one of {', '.join(LOWERINGS)}")
    nodes = token_cluster_nodes(model)
    for node in nodes:
        heads, scale = _attrs(node)
        q, k, v = node.inputs
        b = ChainBuilder(model.graph, f"{node.name}.{how}")
        if how == "reference":
            def split(x, name):
                return b.op("Transpose", b.op("Reshape", x, b.const(f"{name}_shape", np.array([0, 0, heads, -1], np.int64))),
                            perm=[0, 2, 1, 3])

            qh = split(q, "q")  # the scale takes q's dtype (fp16 graphs after the precision pass)
            qh = b.op("Mul", qh, b.op("CastLike", b.const("scale", np.array(scale, np.float32)), qh))
            scores = b.op("MatMul", qh, b.op("Transpose", split(k, "k"), perm=[0, 1, 3, 2]))
            ctx = b.op("MatMul", b.op("Softmax", scores, axis=-1), split(v, "v"))
            out = b.op("Reshape", b.op("Transpose", ctx, perm=[0, 2, 1, 3]),
                       b.const("merge_shape", np.array([0, 0, -1], np.int64)))
        else:
            out = b.op("MultiHeadAttention", q, k, v, domain="com.microsoft", num_heads=heads, scale=scale)
            model.opset_imports.setdefault("com.microsoft", 1)
        b.insert_before(node)
        old = node.outputs[0]
        if old.is_graph_output():  # keep the output's name and type
            out.name, out.shape, out.type, old.name = old.name, old.shape, old.type, f"{old.name}.lowered"
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
    if not token_cluster_nodes(model) and DOMAIN in model.opset_imports:
        model.opset_imports.pop(DOMAIN)
    return len(nodes)


def token_cluster_model(m: int, n: int, num_heads: int, dq: int, dv: int, scale: float, single_input: bool = False):
    """A model of one TokenCluster node with inputs q, k, v (symbolic batch): for checking and
    timing implementations of the op on their own. ``single_input`` (dq == dv): one input x of N
    tokens, the queries its first M (a Slice), keys and values x itself, as in the generator; any
    backend's one-input runner and timing can then run it."""
    import onnx_ir as ir

    from ..ir.build import ChainBuilder

    def inp(name, length, width):
        return ir.Value(name=name, shape=ir.Shape(["B", length, width]), type=ir.TensorType(ir.DataType.FLOAT))

    if single_input:
        assert dq == dv, "one input holds q, k and v: dq must equal dv"
        x = inp("x", n, num_heads * dq)
        graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18, DOMAIN: VERSION}, name="token_cluster")
        builder = ChainBuilder(graph, "token_cluster")
        q = builder.op("Slice", x, builder.const("starts", np.array([0], np.int64)),
                       builder.const("ends", np.array([m], np.int64)), builder.const("axes", np.array([1], np.int64)))
        k = v = x
    else:
        q, k, v = inp("q", m, num_heads * dq), inp("k", n, num_heads * dq), inp("v", n, num_heads * dv)
        graph = ir.Graph([q, k, v], [], nodes=[], opset_imports={"": 18, DOMAIN: VERSION}, name="token_cluster")
        builder = ChainBuilder(graph, "token_cluster")
    out = token_cluster_node(builder, q, k, v, num_heads, scale)
    graph.extend(builder.nodes)
    out.shape, out.type = ir.Shape(["B", m, num_heads * dv]), ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(out)
    return ir.Model(graph, ir_version=10)
