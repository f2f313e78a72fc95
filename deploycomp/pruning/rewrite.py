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

Windowed attention (Swin) keeps what the source does between the scores and the softmax, in its
order (:class:`ScoreStep`): the relative-position bias (a folded ``(1, H, N, N)`` initializer,
sliced per head like every coupled tensor), the view to ``(-1, windows, H, N, N)`` around the
shifted-window mask (the mask itself untouched: it is the same for every head), and back. Those
views are the only places a head count hides on the score path; they are re-emitted with the
kept head count.
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


@dataclass(frozen=True)
class ScoreStep:
    """One op between ``q·kᵀ`` and the softmax, as the source applies it: ``scale`` (a scalar
    factor), ``add`` (a bias or mask, ``value`` an initializer or a computed side input) or
    ``reshape`` (``shape`` a view whose third-from-last entry is the head count)."""

    kind: str
    factor: float = 1.0
    value: ir.Value | None = None
    shape: tuple[int, ...] = ()


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
    # what the source does to the scores before the softmax, beyond scalar factors (Swin: position
    # bias, window mask); empty for plain attention, whose factors are all in ``scale``
    score_steps: tuple[ScoreStep, ...] = ()

    @classmethod
    def of(cls, a: Attention, b: BlockStructure, heads: int | None = None, qk_dim: int | None = None,
           v_dim: int | None = None) -> "AttentionCore":
        """Block ``b``'s attention ``a`` at the given dims (default: the block's own). With a
        position bias or a window mask, ``scale`` is the factor on q and k only and the score
        path's own steps (factors included, in order) are kept in ``score_steps``."""
        if a.score_tables:
            raise DeployCompError(f"block {b.index}: the position bias is gathered from its table at run time "
                                  f"(not folded); rewriting such an attention is not supported")
        steps = read_score_steps(a, b.heads) if a.score_terms else []
        if all(s.kind == "scale" for s in steps):  # plain attention: every factor in one scale on q
            scale, steps = softmax_scale(a), []
        else:
            scale = _path_scale(a.qk.inputs[0], a.q[0].node) * _path_scale(a.qk.inputs[1], a.k[0].node)
        return cls(a, b.index, heads or b.heads, qk_dim or b.qk_dim, v_dim or b.v_dim, scale,
                   [a.q[1], a.k[1], a.v[1]] if b.fused_qkv else None, tuple(steps))

    def projections(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        widths = {"q": self.heads * self.qk_dim, "k": self.heads * self.qk_dim, "v": self.heads * self.v_dim}
        return qkv_arrays(self.attention, self.chunk_order, widths, self.block)


def prune_graph(model: ir.Model, structure: Structure, plan: PrunePlan) -> dict:
    """Rewrite ``model`` in place to the plan's architecture; returns what changed
    (``stem_constants``: the shape constants that held an embedding width and were changed — the
    stem's for a single-stage ViT, every stream view's for Swin)."""
    if any(b.keys or "fused_attention" in b.nodes for b in structure.blocks):
        raise DeployCompError("the graph already has semantic tokens (cross-attention): prune the source model, "
                              "with --semantic-tokens in the same compile")
    widths = {s: (emb, len(plan.kept(structure, f"stage{s}.emb"))) for s, emb in enumerate(structure.stage_embs)}
    emb_changes = {s: change for s, change in widths.items() if change[0] != change[1]}
    multi_stage = len(structure.stage_embs) > 1
    # Multi-stage (Swin): the stream's views hold each stage's width; they are found by their
    # measured shapes before anything changes, and every attention of a changed stage gets the
    # canonical core (whose views hold no embedding width).
    views = _stream_views(model, widths) if multi_stage and emb_changes else []
    softmax = {n.name: n for n in model.graph if n.op_type == "Softmax"}
    cores = []
    for b in structure.blocks:
        heads, qk, v = (len(plan.kept(structure, f"block{b.index}.{k}")) for k in ("heads", "qk", "v"))
        if (heads, qk, v) == (b.heads, b.qk_dim, b.v_dim) and not (multi_stage and b.stage in emb_changes):
            continue
        a = find_attention(softmax[b.nodes["softmax"]])
        if a is None:
            raise DeployCompError(f"block {b.index}: attention no longer readable")
        cores.append(AttentionCore.of(a, b, heads, qk, v))  # read before slicing: views hold the old H

    sliced = slice_initializers(model, structure, plan)
    for core in cores:
        rebuild_attention(model, core)
    if multi_stage:
        RemoveUnusedNodesPass()(model)  # the replaced attentions' views go first
        stem_constants = _fix_stream_views(model, views)
    else:
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


def _reaches(value: ir.Value | None, target: ir.Node, depth: int = 16) -> bool:
    """Whether ``target`` produces ``value`` or is upstream of it within ``depth`` nodes."""
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return False
    return node is target or any(_reaches(v, target, depth - 1) for v in node.inputs if v is not None
                                 and v.const_value is None)


def read_score_steps(a: Attention, heads: int) -> list[ScoreStep]:
    """The ops from ``q·kᵀ`` to the softmax, in order; anything else there is refused (one line)
    rather than dropped."""
    steps: list[ScoreStep] = []
    value = a.softmax.inputs[0]
    while value.producer() is not a.qk:
        node = value.producer()
        if node is None:
            raise DeployCompError(f"attention at '{a.softmax.name}': the scores do not come from '{a.qk.name}'")
        main = [v for v in node.inputs[:2] if _reaches(v, a.qk)]
        if node.op_type in ("Cast", "Identity"):
            main = [node.inputs[0]]
        elif node.op_type in ("Mul", "Div") and len(main) == 1:
            i = 1 - list(node.inputs).index(main[0])
            factor = _scalar(node.inputs[i])
            if factor is None or (node.op_type == "Div" and i == 0):
                raise DeployCompError(f"attention at '{a.softmax.name}': '{node.name}' scales the scores by a "
                                      f"non-scalar; not supported")
            steps.append(ScoreStep("scale", factor=factor if node.op_type == "Mul" else 1.0 / factor))
        elif node.op_type == "Add" and len(main) == 1:
            steps.append(ScoreStep("add", value=node.inputs[1 - list(node.inputs).index(main[0])]))
        elif node.op_type == "Reshape" and node.inputs[1].const_value is not None:
            shape = tuple(int(d) for d in node.inputs[1].const_value.numpy().ravel())
            if len(shape) < 3 or shape[-3] != heads:
                raise DeployCompError(f"attention at '{a.softmax.name}': the view {list(shape)} of the scores does "
                                      f"not keep the {heads} heads third from last; not supported")
            steps.append(ScoreStep("reshape", shape=shape))
            main = [node.inputs[0]]
        else:
            raise DeployCompError(f"attention at '{a.softmax.name}': '{node.op_type}' between the scores and the "
                                  f"softmax is not supported by the rewrite")
        value = main[0]
    return steps[::-1]


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
                   scale: float, score_steps: tuple[ScoreStep, ...] = ()) -> ir.Value:
    """Multi-head attention of projected (B, M, H·Dqk) queries over (B, N, ·) keys/values, in
    standard ops: the pattern the latency micro-graphs time and the token-clustering op decomposes to.
    ``score_steps`` are applied to the scores before the softmax (views re-emitted with ``heads``)."""

    def split_heads(x: ir.Value, dim: int, name: str) -> ir.Value:
        shaped = b.op("Reshape", x, b.const(f"{name}_shape", np.array([0, 0, heads, dim], np.int64)))
        return b.op("Transpose", shaped, perm=[0, 2, 1, 3])

    q, k, v = split_heads(q, qk_dim, "q"), split_heads(k, qk_dim, "k"), split_heads(v, v_dim, "v")
    q = b.op("Mul", q, b.const("scale", np.array(scale, np.float32)))
    scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    for i, step in enumerate(score_steps):
        if step.kind == "scale":
            scores = b.op("Mul", scores, b.const(f"score_scale{i}", np.array(step.factor, np.float32)))
        elif step.kind == "add":
            scores = b.op("Add", scores, step.value)
        else:
            shape = np.array(step.shape, np.int64)
            shape[-3] = heads
            scores = b.op("Reshape", scores, b.const(f"score_shape{i}", shape))
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
    ctx = attention_core(b, q, k, v, c.heads, c.qk_dim, c.v_dim, c.scale, c.score_steps)
    anchor = a.out.node
    b.insert_before(anchor)
    anchor.replace_input_with(0, ctx)


@dataclass
class StreamView:
    """A Reshape of a multi-stage model's stream whose target holds a stage's width in its last
    entry: ``old`` (channels last, as Swin keeps them) or ``factor`` x old (patch merging's flatten
    of the 2x2 neighbours), to become ``new``."""

    node: ir.Node
    old: int
    new: int


def _stream_views(model: ir.Model, stages: dict[int, tuple[int, int]]) -> list[StreamView]:
    """The Reshapes that carry a stage's channels on their last axis, measured at batch 1: input
    and output end in the stage's width C (window partition and reverse, the block's views), or the
    input in C and the output in 4C (patch merging). Attention-internal views split or merge heads
    (input and output widths differ) and are rebuilt anyway. Views are told apart by width, so
    stages of one width must keep one width."""
    from ..ir.shapes import probe_shapes

    widths: dict[int, int] = {}
    for old, new in stages.values():
        if widths.get(old, new) != new:
            raise DeployCompError(f"two stages of width {old} are pruned to different widths; their views cannot "
                                  f"be told apart")
        widths[old] = new
    reshapes = [n for n in model.graph if n.op_type == "Reshape"]
    shapes = probe_shapes(model, [v.name for n in reshapes for v in (n.inputs[0], n.outputs[0])])
    views = []
    for node in reshapes:
        inp, out = shapes[node.inputs[0].name], shapes[node.outputs[0].name]
        if not inp or not out or inp[-1] not in widths:
            continue
        c = inp[-1]
        if widths[c] == c:
            continue
        if out[-1] == c:
            views.append(StreamView(node, c, widths[c]))
        elif out[-1] == 4 * c:
            views.append(StreamView(node, 4 * c, 4 * widths[c]))
    return views


def _last_entry_constant(node: ir.Node) -> tuple[ir.Node, int, np.ndarray] | None:
    """(consumer, input index, array) of the constant that holds a Reshape target's last entry:
    the target itself, or the last input of the Concat that builds it."""
    target = node.inputs[1]
    if target.const_value is not None:
        return node, 1, target.const_value.numpy()
    concat = target.producer()
    if concat is not None and concat.op_type == "Concat" and concat.inputs[-1].const_value is not None:
        return concat, len(concat.inputs) - 1, concat.inputs[-1].const_value.numpy()
    return None


def _fix_stream_views(model: ir.Model, views: list[StreamView]) -> int:
    """Set the last entry of every stream view's target to its stage's new width."""
    count, alive, fixed = 0, {id(n) for n in model.graph}, set()
    for view in views:
        if id(view.node) not in alive:  # removed with a rebuilt attention
            continue
        found = _last_entry_constant(view.node)
        if found is not None and (id(found[0]), found[1]) in fixed:  # a target shared after CSE
            continue
        if found is None or int(found[2].ravel()[-1]) != view.old:
            raise DeployCompError(f"view '{view.node.name}' of the stream (width {view.old}) has no constant last "
                                  f"entry to change")
        consumer, index, array = found
        array = array.copy()
        array.reshape(-1)[-1] = view.new
        consumer.replace_input_with(index, add_const(model.graph, f"{consumer.inputs[index].name}.pruned", array))
        fixed.add((id(consumer), index))
        count += 1
    return count


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
