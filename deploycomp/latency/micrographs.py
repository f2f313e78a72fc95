"""ONNX micro-graphs of the parts of a ViT, with the op patterns the compiler emits.

Each builder returns a standalone ``onnx.ModelProto`` with a symbolic batch axis, random weights
and the same ops, in the same order and layout, as the corresponding part of a FlexViT exported
by the dynamo exporter and cleaned by deploycomp (``tests/test_latency.py`` checks that chaining
the parts gives the op counts of the real export), or, for STViT's generator, by the semantic-token
rewrite. The profiler times these; the predictor sums them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, compose, helper, numpy_helper

from ..tokens.op import DOMAIN, OP_TYPE, VERSION, lower

OPSET = 18


class _Graph:
    """A small helper around onnx.helper for building one graph."""

    def __init__(self, seed: int = 0):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, array, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, *shape: int) -> str:
        return self.const((self.rng.standard_normal(shape) * 0.02).astype(np.float32), "w")

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def model(self, x: str, x_shape: list, y: str, y_shape: list) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "part",
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)

    # -- layers as the exporter writes them --------------------------------------------------
    def layernorm(self, x: str, emb: int) -> str:
        return self.op("LayerNormalization", x, self.const(np.ones(emb, np.float32)),
                       self.const(np.zeros(emb, np.float32)), axis=-1, epsilon=1e-6)

    def linear(self, x: str, d_in: int, d_out: int) -> str:
        return self.op("Add", self.op("MatMul", x, self.weight(d_in, d_out)), self.weight(d_out))

    def heads(self, x: str, tokens: int, heads: int, dim: int) -> str:
        shaped = self.op("Reshape", x, self.const(np.array([-1, tokens, heads, dim], np.int64)))
        return self.op("Transpose", shaped, perm=[0, 2, 1, 3])


def attention_part(tokens: int, emb: int, heads: int, qk_dim: int, v_dim: int, seed: int = 0) -> onnx.ModelProto:
    """x + proj(softmax(q k^T * s) v) with q, k, v from LayerNorm(x): one block's attention half."""
    g = _Graph(seed)
    x = "x"
    y = g.layernorm(x, emb)
    q = g.heads(g.linear(y, emb, heads * qk_dim), tokens, heads, qk_dim)
    k = g.heads(g.linear(y, emb, heads * qk_dim), tokens, heads, qk_dim)
    v = g.heads(g.linear(y, emb, heads * v_dim), tokens, heads, v_dim)
    q = g.op("Mul", q, g.const(np.array(qk_dim**-0.5, np.float32)))
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.const(np.array([-1, tokens, heads * v_dim], np.int64)))
    out = g.op("Add", x, g.linear(ctx, heads * v_dim, emb))
    return g.model(x, ["batch", tokens, emb], out, ["batch", tokens, emb])


def cross_attention_part(queries: int, tokens: int, emb: int, heads: int, qk_dim: int, v_dim: int,
                         lowering: str | None = "reference", seed: int = 0) -> onnx.ModelProto:
    """p + proj(TokenCluster(q(LN(p)), k(LN(x)), v(LN(x)))) with p the first ``queries`` of the
    ``tokens`` rows of x: one STViT generator block's attention half as the semantic-token rewrite
    emits it (``tokens/rewrite.py``), its TokenCluster lowered the way the target runs it
    (``lowering``; None keeps the node for a target that runs the op itself). The pooling that
    makes the first block's centres is not in it (a few Slice/ReduceMax on the patch grid)."""
    g = _Graph(seed)
    out = _token_cluster_block(g, "x", queries, tokens, emb, heads, qk_dim, v_dim)
    return _lowered(g.model("x", ["batch", tokens, emb], out, ["batch", queries, emb]), lowering)


def window_cross_attention_part(windows: int, queries: int, tokens: int, emb: int, heads: int, qk_dim: int,
                                v_dim: int, lowering: str | None = "reference", seed: int = 0) -> onnx.ModelProto:
    """The same block half per window of a Swin stage with semantic tokens (``tokens/stvit_swin.py``):
    the (batch, windows, rows, emb) input is folded to windows × batch sequences (as the partition
    leaves them), queries are its first ``queries`` rows and keys its first ``tokens`` (rows is the
    larger: a generator's M queries over w² or w² + M keys, the semantic blocks' M over M, the
    recovery's w² over M). No relative-position bias and no shift: the design's semantic attention
    has neither. The table's ``window_cross_attention`` part."""
    g = _Graph(seed)
    rows = max(queries, tokens)
    folded = g.op("Reshape", "x", g.const(np.array([-1, rows, emb], np.int64)))
    out = _token_cluster_block(g, folded, queries, tokens, emb, heads, qk_dim, v_dim)
    out = g.op("Reshape", out, g.const(np.array([-1, windows, queries, emb], np.int64)))
    return _lowered(g.model("x", ["batch", windows, rows, emb], out, ["batch", windows, queries, emb]), lowering)


def _token_cluster_block(g: _Graph, x: str, queries: int, tokens: int, emb: int, heads: int, qk_dim: int,
                         v_dim: int) -> str:
    """The first ``queries`` rows of ``x`` attend to its first ``tokens`` rows through a TokenCluster
    node (pre-norm, projections, the residual on the queries)."""
    def first(rows: int) -> str:
        return g.op("Slice", x, g.const(np.array([0], np.int64)), g.const(np.array([rows], np.int64)),
                    g.const(np.array([1], np.int64)))

    p = first(queries)
    keys = g.layernorm(first(tokens) if tokens < queries else x, emb)
    q = g.linear(g.layernorm(p, emb), emb, heads * qk_dim)
    k, v = g.linear(keys, emb, heads * qk_dim), g.linear(keys, emb, heads * v_dim)
    ctx = g.name("token_cluster")
    g.nodes.append(helper.make_node(OP_TYPE, [q, k, v], [ctx], domain=DOMAIN, num_heads=heads, scale=qk_dim**-0.5))
    return g.op("Add", p, g.linear(ctx, heads * v_dim, emb))


def _lowered(model: onnx.ModelProto, lowering: str | None) -> onnx.ModelProto:
    """``model`` with its TokenCluster nodes lowered as the target runs them (None: kept)."""
    model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    if lowering is None:
        return model
    lowered = ir.from_proto(model)
    lower(lowered, lowering)
    return ir.to_proto(lowered)


def mlp_part(tokens: int, emb: int, mlp_dim: int, seed: int = 0) -> onnx.ModelProto:
    """x + fc2(gelu(fc1(LayerNorm(x)))), GELU in the exact erf form the exporter writes."""
    g = _Graph(seed)
    x = "x"
    h = g.linear(g.layernorm(x, emb), emb, mlp_dim)
    erf = g.op("Erf", g.op("Div", h, g.const(np.array(np.sqrt(2.0), np.float32))))
    gelu = g.op("Mul", h, g.op("Mul", g.const(np.array(0.5, np.float32)), g.op("Add", erf, g.const(np.array(1.0, np.float32)))))
    out = g.op("Add", x, g.linear(gelu, mlp_dim, emb))
    return g.model(x, ["batch", tokens, emb], out, ["batch", tokens, emb])


def stem_part(emb: int, img_size: int = 224, patch: int = 16, in_chans: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Patch embedding Conv, flatten, cls token and position embedding."""
    g = _Graph(seed)
    n = (img_size // patch) ** 2
    x = "x"
    conv = g.op("Conv", x, g.weight(emb, in_chans, patch, patch), g.weight(emb), kernel_shape=[patch, patch],
                strides=[patch, patch])
    seq = g.op("Transpose", g.op("Reshape", conv, g.const(np.array([0, emb, n], np.int64))), perm=[0, 2, 1])
    batch = g.op("Slice", g.op("Shape", x), g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64)))
    cls_shape = g.op("Concat", batch, g.const(np.array([1, emb], np.int64)), axis=0)
    cls = g.op("Expand", g.weight(1, 1, emb), cls_shape)
    out = g.op("Add", g.op("Concat", cls, seq, axis=1), g.weight(1, n + 1, emb))
    return g.model(x, ["batch", in_chans, img_size, img_size], out, ["batch", n + 1, emb])


def head_part(tokens: int, emb: int, num_classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """Final LayerNorm, the cls token, the classifier."""
    g = _Graph(seed)
    x = "x"
    cls = g.op("Gather", g.layernorm(x, emb), g.const(np.array(0, np.int64)), axis=1)
    out = g.op("Gemm", cls, g.weight(num_classes, emb), g.weight(num_classes), transB=1)
    return g.model(x, ["batch", tokens, emb], out, ["batch", num_classes])


def window_attention_part(resolution: int, window: int, emb: int, heads: int, qk_dim: int, v_dim: int,
                          shift: int = 0, seed: int = 0) -> onnx.ModelProto:
    """One Swin block's attention half on a (batch, R, R, emb) grid, as a pruned Swin compiles:
    LayerNorm, the cyclic shift (Slice/Concat per spatial axis) when ``shift``, window partition,
    the canonical core (separate q/k/v, relative-position bias per head, the shifted-window mask
    through the (-1, windows, H, N, N) view), window reverse, the shift back, the residual.
    The table's ``window_attention`` part (``profiler.build_part``)."""
    g = _Graph(seed)
    n, per_side = window * window, resolution // window
    windows = per_side * per_side
    x = "x"
    y = g.layernorm(x, emb)

    def roll(t: str, by: int) -> str:
        for axis in (1, 2):
            cut = (-by) % resolution
            head = g.op("Slice", t, g.const(np.array([cut], np.int64)), g.const(np.array([resolution], np.int64)),
                        g.const(np.array([axis], np.int64)))
            tail = g.op("Slice", t, g.const(np.array([0], np.int64)), g.const(np.array([cut], np.int64)),
                        g.const(np.array([axis], np.int64)))
            t = g.op("Concat", head, tail, axis=axis)
        return t

    if shift:
        y = roll(y, -shift)
    y = g.op("Reshape", y, g.const(np.array([-1, per_side, window, per_side, window, emb], np.int64)))
    y = g.op("Transpose", y, perm=[0, 1, 3, 2, 4, 5])
    y = g.op("Reshape", y, g.const(np.array([-1, n, emb], np.int64)))
    q = g.heads(g.linear(y, emb, heads * qk_dim), n, heads, qk_dim)
    k = g.heads(g.linear(y, emb, heads * qk_dim), n, heads, qk_dim)
    v = g.heads(g.linear(y, emb, heads * v_dim), n, heads, v_dim)
    q = g.op("Mul", q, g.const(np.array(qk_dim**-0.5, np.float32)))
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    scores = g.op("Add", scores, g.weight(1, heads, n, n))
    if shift:
        mask = np.where(g.rng.random((1, windows, 1, n, n)) < 0.5, -100.0, 0.0).astype(np.float32)
        scores = g.op("Reshape", scores, g.const(np.array([-1, windows, heads, n, n], np.int64)))
        scores = g.op("Add", scores, g.const(mask, "mask"))
        scores = g.op("Reshape", scores, g.const(np.array([-1, heads, n, n], np.int64)))
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.const(np.array([0, 0, heads * v_dim], np.int64)))
    out = g.linear(ctx, heads * v_dim, emb)
    out = g.op("Reshape", out, g.const(np.array([-1, per_side, per_side, window, window, emb], np.int64)))
    out = g.op("Transpose", out, perm=[0, 1, 3, 2, 4, 5])
    out = g.op("Reshape", out, g.const(np.array([-1, resolution, resolution, emb], np.int64)))
    if shift:
        out = roll(out, shift)
    out = g.op("Add", x, out)
    shape = ["batch", resolution, resolution, emb]
    return g.model(x, shape, out, shape)


def patch_merging_part(resolution: int, emb: int, out_emb: int, seed: int = 0) -> onnx.ModelProto:
    """Swin's patch merging on a (batch, R, R, emb) grid: the 2x2 neighbours' channels concatenated
    (slot-major, as timm flattens them), LayerNorm over 4·emb, the bias-free reduction to ``out_emb``.
    The table's ``patch_merging`` part."""
    g = _Graph(seed)
    half = resolution // 2
    x = "x"
    y = g.op("Reshape", x, g.const(np.array([-1, half, 2, half, 2, emb], np.int64)))
    y = g.op("Transpose", y, perm=[0, 1, 3, 4, 2, 5])
    y = g.op("Reshape", y, g.const(np.array([-1, half, half, 4 * emb], np.int64)))
    out = g.op("MatMul", g.layernorm(y, 4 * emb), g.weight(4 * emb, out_emb))
    return g.model(x, ["batch", resolution, resolution, emb], out, ["batch", half, half, out_emb])


def swin_stem_part(emb: int, img_size: int = 224, patch: int = 4, in_chans: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Swin's patch embedding as exported: Conv, to channels last (Transpose), LayerNorm; no cls
    token and no position embedding."""
    g = _Graph(seed)
    x = "x"
    conv = g.op("Conv", x, g.weight(emb, in_chans, patch, patch), g.weight(emb), kernel_shape=[patch, patch],
                strides=[patch, patch])
    out = g.layernorm(g.op("Transpose", conv, perm=[0, 2, 3, 1]), emb)
    side = img_size // patch
    return g.model(x, ["batch", in_chans, img_size, img_size], out, ["batch", side, side, emb])


def swin_head_part(tokens: int, emb: int, num_classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """Swin's head on the last stage's (batch, R, R, emb) grid, R² = ``tokens``: LayerNorm, the
    mean over the grid (ReduceMean), the classifier (Gemm)."""
    g = _Graph(seed)
    side = int(round(tokens**0.5))
    x = "x"
    pooled = g.op("ReduceMean", g.layernorm(x, emb), g.const(np.array([1, 2], np.int64)), keepdims=0)
    out = g.op("Gemm", pooled, g.weight(num_classes, emb), g.weight(num_classes), transB=1)
    return g.model(x, ["batch", side, side, emb], out, ["batch", num_classes])


def chained(model: onnx.ModelProto, copies: int) -> onnx.ModelProto:
    """``copies`` copies of a part whose output has its input's shape (a block's attention or MLP
    half), each feeding the next (``onnx.compose``, names prefixed per copy): the profiler's
    in-context measure of the part (``profiler.time_part``)."""
    out = compose.add_prefix(model, "c0_")
    for i in range(1, copies):
        nxt = compose.add_prefix(model, f"c{i}_")
        out = compose.merge_models(out, nxt, io_map=[(out.graph.output[0].name, nxt.graph.input[0].name)])
    return out
