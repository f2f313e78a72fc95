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
from ..ir.discover import STREAM_UP_OPS, Attention, Projection, find_attention, trace_to_layernorm
from ..ir.structure import Structure
from .plan import PrunePlan, clear_intermediate_shapes, slice_initializers


@dataclass
class _Core:
    """What a block's canonical attention needs, read before slicing changes the tensors."""

    attention: Attention
    block: int
    heads: int
    qk_dim: int
    v_dim: int
    scale: float
    chunk_order: list[int] | None  # fused qkv: position of q, k, v chunks along the output axis


def prune_graph(model: ir.Model, structure: Structure, plan: PrunePlan) -> dict:
    """Rewrite ``model`` in place to the plan's architecture; returns what changed."""
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
        order = [a.q[1], a.k[1], a.v[1]] if b.fused_qkv else None
        cores.append(_Core(a, b.index, heads, qk, v, _softmax_scale(a), order))

    emb_changes = {}
    for s, emb in enumerate(structure.stage_embs):
        new = len(plan.kept(structure, f"stage{s}.emb"))
        if new != emb:
            if len(structure.stage_embs) > 1:
                raise DeployCompError("pruning the embedding of a multi-stage model (Swin) is not supported yet")
            emb_changes[s] = (emb, new)

    sliced = slice_initializers(model, structure, plan)
    for core in cores:
        _rebuild_attention(model, core)
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


def _softmax_scale(a: Attention) -> float:
    """The factor the source applies to q·kᵀ, wherever the exporter put it (on q, on k, on scores)."""
    return (_path_scale(a.qk.inputs[0], a.q[0].node) * _path_scale(a.qk.inputs[1], a.k[0].node)
            * _path_scale(a.softmax.inputs[0], a.qk))


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def _projection_arrays(p: Projection) -> tuple[np.ndarray, np.ndarray | None]:
    """(W as [in, out], b) of a projection, whatever layout the graph stores."""
    w = p.weight.const_value.numpy()
    w = w if p.out_axis == 1 else w.T
    return w, (p.bias.const_value.numpy().reshape(-1) if p.bias is not None else None)


def _rebuild_attention(model: ir.Model, c: _Core) -> None:
    graph, a = model.graph, c.attention
    widths = {"q": c.heads * c.qk_dim, "k": c.heads * c.qk_dim, "v": c.heads * c.v_dim}
    parts: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    if c.chunk_order is not None:  # fused qkv: the sliced tensor holds the kept q, k, v rows chunk by chunk
        w, bias = _projection_arrays(a.q[0])
        sizes = dict(zip(c.chunk_order, widths.values()))
        starts = np.cumsum([0] + [sizes[i] for i in range(3)])
        for role, chunk in zip("qkv", c.chunk_order):
            cols = slice(starts[chunk], starts[chunk + 1])
            parts[role] = (w[:, cols], bias[cols] if bias is not None else None)
    else:
        for role, (p, _) in zip("qkv", (a.q, a.k, a.v)):
            parts[role] = _projection_arrays(p)
    for role, (w, _) in parts.items():
        if w.shape[1] != widths[role]:
            raise DeployCompError(f"block {c.block}: sliced {role} projection has {w.shape[1]} outputs, "
                                  f"expected {widths[role]}")

    x = a.q[0].node.inputs[0]
    anchor = a.out.node
    nodes: list[ir.Node] = []
    prefix = f"block{c.block}.attn"

    def op(op_type: str, *inputs: ir.Value, **attrs) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attrs, name=f"{prefix}.{op_type.lower()}_{len(nodes)}")
        node.outputs[0].name = node.name
        nodes.append(node)
        return node.outputs[0]

    def split_heads(role: str, dim: int) -> ir.Value:
        w, bias = parts[role]
        y = op("MatMul", x, _const(graph, f"{prefix}.{role}.weight", w))
        if bias is not None:
            y = op("Add", y, _const(graph, f"{prefix}.{role}.bias", bias))
        shaped = op("Reshape", y, _const(graph, f"{prefix}.{role}_shape", np.array([0, 0, c.heads, dim], np.int64)))
        return op("Transpose", shaped, perm=[0, 2, 1, 3])

    q, k, v = split_heads("q", c.qk_dim), split_heads("k", c.qk_dim), split_heads("v", c.v_dim)
    q = op("Mul", q, _const(graph, f"{prefix}.scale", np.array(c.scale, np.float32)))
    scores = op("MatMul", q, op("Transpose", k, perm=[0, 1, 3, 2]))
    ctx = op("MatMul", op("Softmax", scores, axis=-1), v)
    ctx = op("Reshape", op("Transpose", ctx, perm=[0, 2, 1, 3]),
             _const(graph, f"{prefix}.merge_shape", np.array([0, 0, c.heads * c.v_dim], np.int64)))
    graph.insert_before(anchor, nodes)
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
                    node.replace_input_with(i, _const(model.graph, f"{value.name}.pruned", np.where(array == old, new, array)))
                    count += 1
            elif value.const_value is None and (node.op_type in STREAM_UP_OPS or node.op_type in ("Concat", "Reshape",
                                                                                               "Expand", "Transpose")):
                stack.append(value)
    return count
