"""Apply a pruning plan to the ONNX graph: slice every coupled initializer, rebuild the attention of
every block whose heads / QK / V changed, and fix the shape constants that held a pruned width.

The most common bug of pruning tools is a stale ``num_heads`` / ``head_dim``: the exporter writes
them as constants of the Reshape that splits q/k/v into heads (dynamo: ``Concat(batch, [N], [3],
[H], [d])``) and of the Reshape that merges heads back. Rather than patching each exporter's
constants, a block whose attention changed gets a canonical attention core: separate q/k/v
projections (QK != V per head cannot be expressed by a fused qkv), ``Reshape [0, 0, H, d]``,
the original softmax scale (NViT keeps it when QK shrinks), and a merge ``Reshape [0, 0, H·dv]``.
It is the op pattern the latency micro-graphs time, so the table and the artifact agree.
The old chain is left dead and removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ..errors import DeployCompError
from ..ir.build import ChainBuilder, add_const
from ..ir.discover import STREAM_UP_OPS, Attention, Projection, find_attention, trace_to_layernorm
from ..ir.structure import BlockStructure, Structure
from .plan import PrunePlan, clear_intermediate_shapes, slice_initializers


@dataclass
class AttentionCore:
    """What a block's canonical attention needs, read before slicing changes the tensors."""

    attention: Attention
    block: int
    heads: int
    qk_dim: int
    v_dim: int
    scale: float
    chunk_order: list[int] | None  # fused qkv: position of q, k, v chunks along the output axis

    @classmethod
    def of(cls, a: Attention, b: BlockStructure, heads: int | None = None, qk_dim: int | None = None,
           v_dim: int | None = None) -> "AttentionCore":
        """Block ``b``'s attention ``a`` at the given dims (default: the block's own)."""
        return cls(a, b.index, heads or b.heads, qk_dim or b.qk_dim, v_dim or b.v_dim, softmax_scale(a),
                   [a.q[1], a.k[1], a.v[1]] if b.fused_qkv else None)

    def projections(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        widths = {"q": self.heads * self.qk_dim, "k": self.heads * self.qk_dim, "v": self.heads * self.v_dim}
        return qkv_arrays(self.attention, self.chunk_order, widths, self.block)


def prune_graph(model: ir.Model, structure: Structure, plan: PrunePlan) -> dict:
    """Rewrite ``model`` in place to the plan's architecture; returns what changed."""
    if any(b.keys or "fused_attention" in b.nodes for b in structure.blocks):
        raise DeployCompError("the graph already has semantic tokens (cross-attention): prune the source model, "
                              "with --semantic-tokens in the same compile")
    softmax = {n.name: n for n in model.graph if n.op_type == "Softmax"}
    cores = []
    for b in structure.blocks:
        heads, qk, v = (len(plan.kept(structure, f"block{b.index}.{k}")) for k in ("heads", "qk", "v"))
        if (heads, qk, v) == (b.heads, b.qk_dim, b.v_dim):
            continue
        a = find_attention(softmax[b.nodes["softmax"]])
        if a is None:
            raise DeployCompError(f"block {b.index}: attention no longer readable")
        if a.score_terms or a.score_tables or b.sequences > 1:
            raise DeployCompError(f"block {b.index}: pruning heads/QK/V of windowed attention or attention with a "
                                  f"position bias is not supported yet (prune MLP only: --groups mlp)")
        cores.append(AttentionCore.of(a, b, heads, qk, v))

    emb_changes = {}
    for s, emb in enumerate(structure.stage_embs):
        new = len(plan.kept(structure, f"stage{s}.emb"))
        if new != emb:
            if len(structure.stage_embs) > 1:
                raise DeployCompError("pruning the embedding of a multi-stage model (Swin) is not supported yet")
            emb_changes[s] = (emb, new)

    sliced = slice_initializers(model, structure, plan)
    for core in cores:
        rebuild_attention(model, core)
    stem_constants = _fix_stem_constants(model, structure, emb_changes[0]) if 0 in emb_changes else 0
    RemoveUnusedNodesPass()(model)
    for name in [n for n, v in model.graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        model.graph.initializers.pop(name)
    clear_intermediate_shapes(model)
    return {"tensors_sliced": sliced, "attention_rebuilt": [c.block for c in cores], "stem_constants": stem_constants}


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    array = value.const_value.numpy()
    return float(array.reshape(())) if array.dtype.kind == "f" else None


def _path_scale(start: ir.Value, stop: ir.Node | None) -> float:
    """Product of the scalar Mul / Div constants from ``start`` up to (excluding) node ``stop``."""
    scale, value = 1.0, start
    for _ in range(64):
        node = value.producer()
        if node is None or node is stop:
            return scale
        if node.op_type in ("Mul", "Div"):
            consts = [(i, _scalar(v)) for i, v in enumerate(node.inputs[:2]) if _scalar(v) is not None]
            if len(consts) == 1:
                i, c = consts[0]
                scale = scale * c if node.op_type == "Mul" else (scale / c if i == 1 else scale)
                value = node.inputs[1 - i]
                continue
        data = [v for v in node.inputs if v is not None and v.const_value is None]
        if not data:
            return scale
        value = data[0]
    return scale


def softmax_scale(a: Attention) -> float:
    """The factor the source applies to q·kᵀ, wherever the exporter put it (on q, on k, on scores)."""
    return (_path_scale(a.qk.inputs[0], a.q[0].node) * _path_scale(a.qk.inputs[1], a.k[0].node)
            * _path_scale(a.softmax.inputs[0], a.qk))


def _projection_arrays(p: Projection) -> tuple[np.ndarray, np.ndarray | None]:
    """(W as [in, out], b) of a projection, whatever layout the graph stores."""
    w = p.weight.const_value.numpy()
    w = w if p.out_axis == 1 else w.T
    return w, (p.bias.const_value.numpy().reshape(-1) if p.bias is not None else None)


def qkv_arrays(a: Attention, chunk_order: list[int] | None, widths: dict[str, int],
               block: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The q, k, v projections as separate (W [in, out], b), split out of a fused qkv if needed."""
    parts: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    if chunk_order is not None:  # fused qkv: the tensor holds the q, k, v rows chunk by chunk
        w, bias = _projection_arrays(a.q[0])
        sizes = dict(zip(chunk_order, widths.values()))
        starts = np.cumsum([0] + [sizes[i] for i in range(3)])
        for role, chunk in zip("qkv", chunk_order):
            cols = slice(starts[chunk], starts[chunk + 1])
            parts[role] = (w[:, cols], bias[cols] if bias is not None else None)
    else:
        for role, (p, _) in zip("qkv", (a.q, a.k, a.v)):
            parts[role] = _projection_arrays(p)
    for role, (w, _) in parts.items():
        if w.shape[1] != widths[role]:
            raise DeployCompError(f"block {block}: {role} projection has {w.shape[1]} outputs, expected {widths[role]}")
    return parts


def project(b: ChainBuilder, x: ir.Value, role: str, part: tuple[np.ndarray, np.ndarray | None]) -> ir.Value:
    w, bias = part
    y = b.op("MatMul", x, b.const(f"{role}.weight", w))
    return b.op("Add", y, b.const(f"{role}.bias", bias)) if bias is not None else y


def attention_core(b: ChainBuilder, q: ir.Value, k: ir.Value, v: ir.Value, heads: int, qk_dim: int, v_dim: int,
                   scale: float) -> ir.Value:
    """Multi-head attention of projected (B, M, H·Dqk) queries over (B, N, ·) keys/values, in
    standard ops: the pattern the latency micro-graphs time and the token-clustering op decomposes to."""

    def split_heads(x: ir.Value, dim: int, name: str) -> ir.Value:
        shaped = b.op("Reshape", x, b.const(f"{name}_shape", np.array([0, 0, heads, dim], np.int64)))
        return b.op("Transpose", shaped, perm=[0, 2, 1, 3])

    q, k, v = split_heads(q, qk_dim, "q"), split_heads(k, qk_dim, "k"), split_heads(v, v_dim, "v")
    q = b.op("Mul", q, b.const("scale", np.array(scale, np.float32)))
    scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    ctx = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)
    return b.op("Reshape", b.op("Transpose", ctx, perm=[0, 2, 1, 3]),
                b.const("merge_shape", np.array([0, 0, heads * v_dim], np.int64)))


def rebuild_attention(model: ir.Model, c: AttentionCore) -> None:
    """Replace the block's attention (projections to the merged heads) by the canonical core."""
    a = c.attention
    parts = c.projections()
    x = a.q[0].node.inputs[0]
    b = ChainBuilder(model.graph, f"block{c.block}.attn")
    q, k, v = (project(b, x, role, parts[role]) for role in "qkv")
    ctx = attention_core(b, q, k, v, c.heads, c.qk_dim, c.v_dim, c.scale)
    anchor = a.out.node
    b.insert_before(anchor)
    anchor.replace_input_with(0, ctx)


def _fix_stem_constants(model: ir.Model, structure: Structure, change: tuple[int, int]) -> int:
    """Shape constants between the image and the first block that hold the old embedding width
    (e.g. the Reshape that flattens the patch grid: ``Concat(batch, [EMB], [N])``)."""
    old, new = change
    first = structure.blocks[0]
    ln = trace_to_layernorm(next(n for n in model.graph if n.name == first.nodes["q"]).inputs[0])
    if ln is None:
        raise DeployCompError("cannot find the first block's LayerNorm to walk the patch embedding from")
    count, seen, stack = 0, set(), [ln.inputs[0]]
    while stack:
        node = stack.pop().producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for i, value in enumerate(node.inputs):
            if value is None:
                continue
            if value.const_value is not None and value.const_value.dtype == ir.DataType.INT64 \
                    and node.op_type in ("Concat", "Reshape", "Expand"):
                array = value.const_value.numpy()
                if np.any(array == old):
                    if node.op_type != "Concat" and i == 0:
                        continue
                    node.replace_input_with(i, add_const(model.graph, f"{value.name}.pruned", np.where(array == old, new, array)))
                    count += 1
            elif value.const_value is None and (node.op_type in STREAM_UP_OPS or node.op_type in ("Concat", "Reshape",
                                                                                               "Expand", "Transpose")):
                stack.append(value)
    return count
