"""Structure discovery: read a ViT's blocks and NViT's coupled groups off an ONNX graph.

Discovery works on op patterns, not on names, so it reads what different exporters emit (fused
or separate q/k/v projections, MatMul+Add or Gemm, folded or computed relative-position bias):

* an **attention** is ``MatMul(q, k) -> [Add bias/mask, Reshape]* -> Softmax -> MatMul(., v)``;
  q, k and v are traced up through layout ops (Reshape/Transpose/Slice/Gather/Split/scale) to
  their projection, and the attention output down to the output projection;
* an **MLP** is a projection whose output reaches exactly one other projection through
  element-wise ops only (the activation);
* the **embedding stream** is found by walking up from the first block to the patch-embedding
  Conv, and down from each stage's last block to the head or the next stage's patch merging.

Head count and per-head dims are read from the shapes of q, k and v, measured by running the graph
once on ONNX Runtime at batch 1 (robust to exporters whose reshape targets are computed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx_ir as ir

from ..errors import NotAViTError
from .shapes import probe_shapes
from .structure import BlockStructure, ChannelSlice, Structure, StructureGraphBuilder

# Ops that move or rescale data without mixing channels across heads.
LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split", "Identity",
              "Cast", "Flatten", "Mul", "Div", "Expand", "Pad", "Concat"}
ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div", "Erf", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Sigmoid",
                   "Tanh", "Pow", "Sqrt", "Relu", "Cast", "Identity", "HardSigmoid", "HardSwish"}
SCORE_OPS = {"Add", "Mul", "Div", "Reshape", "Sub", "Cast", "Identity", "Where"}
STREAM_UP_OPS = {"Add", "Concat", "Expand", "Transpose", "Reshape", "Flatten", "LayerNormalization",
                 "Identity", "Squeeze", "Unsqueeze", "Pad", "Slice", "Cast"}
STREAM_DOWN_OPS = {"Add", "Mul", "LayerNormalization", "Gather", "Slice", "Squeeze", "Unsqueeze", "ReduceMean",
                   "Reshape", "Transpose", "Flatten", "GlobalAveragePool", "Identity", "Pad", "Concat", "Cast"}


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def _is_shape_derived(value: ir.Value | None, depth: int = 12) -> bool:
    """Computed only from constants and tensor *shapes* (e.g. a 1/sqrt(head_dim) scale an
    exporter derives from ``Shape(q)``): constant for a given architecture."""
    if value is None or _is_const(value):
        return True
    node = value.producer()
    if node is None or depth == 0:
        return False
    if node.op_type in ("Shape", "Size"):
        return True
    if node.op_type == "CastLike":  # the second input only lends its type
        return _is_shape_derived(node.inputs[0], depth - 1)
    return all(_is_shape_derived(v, depth - 1) for v in node.inputs)


# Consumers that read only a value's shape or type: exporters branch to them (TorchScript's
# ``Shape(attn_out) -> Reshape target``), and they never carry the value's data on.
SHAPE_ONLY_OPS = {"Shape", "Size"}


def _data_consumers(value: ir.Value) -> list[ir.Node]:
    """The consumers of ``value`` that use its data (not only its shape)."""
    return [n for n in value.consumers() if n.op_type not in SHAPE_ONLY_OPS]


def _array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


@dataclass
class Projection:
    """A linear layer: ``x @ W (+ b)`` as MatMul(+Add) or Gemm, with W an initializer."""

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    in_axis: int
    out_axis: int
    output: ir.Value  # the value after the bias

    @property
    def in_dim(self) -> int:
        return self.weight.const_value.shape[self.in_axis]

    @property
    def out_dim(self) -> int:
        return self.weight.const_value.shape[self.out_axis]


def as_projection(node: ir.Node | None) -> Projection | None:
    """The projection that ``node`` computes or ends (its bias Add), if any."""
    if node is None:
        return None
    if node.op_type == "Add":
        for i in (0, 1):
            other = node.inputs[1 - i]
            inner = node.inputs[i].producer() if node.inputs[i] is not None else None
            if inner is not None and inner.op_type == "MatMul" and _is_const(other) and other.is_initializer():
                proj = as_projection(inner)
                if proj is not None and proj.bias is not None and proj.bias is other:
                    return proj
        return None
    if node.op_type == "MatMul":
        w = node.inputs[1]
        if not (_is_const(w) and w.is_initializer() and len(w.const_value.shape) == 2):
            return None
        out = node.outputs[0]
        bias = None
        consumers = _data_consumers(out)
        if len(consumers) == 1 and consumers[0].op_type == "Add":
            add = consumers[0]
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            if _is_const(other) and other.is_initializer() and other.const_value.shape[-1:] == (w.const_value.shape[1],) \
                    and int(np.prod(other.const_value.shape)) == w.const_value.shape[1]:
                bias, out = other, add.outputs[0]
        return Projection(node, w, bias, 0, 1, out)
    if node.op_type == "Gemm":
        w = node.inputs[1]
        attrs = node.attributes
        if not (_is_const(w) and w.is_initializer()) or (attrs.get("transA") and attrs["transA"].as_int()):
            return None
        trans_b = bool(attrs["transB"].as_int()) if attrs.get("transB") is not None else False
        bias = node.inputs[2] if len(node.inputs) > 2 and _is_const(node.inputs[2]) else None
        return Projection(node, w, bias, 1 if trans_b else 0, 0 if trans_b else 1, node.outputs[0])
    return None


def _data_input(node: ir.Node) -> ir.Value | None:
    """The input that carries activations through a layout op (the others are constants)."""
    if node.op_type in ("Mul", "Div"):
        live = [v for v in node.inputs[:2] if v is not None and not _is_shape_derived(v)]
        return live[0] if len(live) == 1 else None
    if node.op_type == "Concat":
        live = [v for v in node.inputs if v is not None and not _is_const(v)]
        sources = {id(v.producer().inputs[0]) if v.producer() is not None and v.producer().inputs else id(v) for v in live}
        return live[0] if live and len(sources) == 1 else None  # a roll: slices of one tensor
    return node.inputs[0]


def _chunk_of(node: ir.Node, value: ir.Value) -> int | None:
    """For a node that selects one of q/k/v from a fused tensor, which one (0, 1, 2)."""
    if node.op_type == "Split":
        return value.index()
    if node.op_type == "Gather" and _is_const(node.inputs[1]):
        idx = _array(node.inputs[1])
        return int(idx) if idx.size == 1 else None
    if node.op_type == "Slice" and _is_const(node.inputs[1]) and _is_const(node.inputs[2]):
        starts, ends = _array(node.inputs[1]).ravel(), _array(node.inputs[2]).ravel()
        if starts.size == 1 and int(ends[0]) - int(starts[0]) == 1:
            return int(starts[0])
    return None


def _walk_up(value: ir.Value, limit: int = 64) -> Iterator[tuple[ir.Node, ir.Value]]:
    """Producers upstream of ``value`` through layout ops, each with the value it produced; the
    first non-layout producer is yielded last."""
    for _ in range(limit):
        node = value.producer()
        if node is None:
            return
        yield node, value
        if node.op_type not in LAYOUT_OPS:
            return
        value = _data_input(node)
        if value is None:
            return


def trace_to_projection(value: ir.Value) -> tuple[Projection, int | None] | None:
    """Walk up from an attention operand to the projection that produced it (and which of a
    fused q/k/v it selects)."""
    chunk = None
    for node, produced in _walk_up(value):
        proj = as_projection(node)
        if proj is not None:
            return proj, chunk
        if chunk is None:
            chunk = _chunk_of(node, produced)
    return None


def trace_to_layernorm(value: ir.Value) -> ir.Node | None:
    """The LayerNormalization that feeds a projection input through layout ops, if any."""
    return next((node for node, _ in _walk_up(value) if node.op_type == "LayerNormalization"), None)


@dataclass
class Attention:
    softmax: ir.Node
    qk: ir.Node
    av: ir.Node
    q: tuple[Projection, int | None]
    k: tuple[Projection, int | None]
    v: tuple[Projection, int | None]
    out: Projection
    score_terms: list[ir.Value]  # constants added to the scores (relative position bias, masks)
    score_tables: list[ir.Value]  # gathered bias tables when the bias is not folded


def find_attention(softmax: ir.Node) -> Attention | None:
    value = softmax.inputs[0]
    terms: list[ir.Value] = []
    tables: list[ir.Value] = []
    qk = None
    for _ in range(16):
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "MatMul":
            qk = node
            break
        if node.op_type not in SCORE_OPS:
            return None
        live = [v for v in node.inputs if v is not None and not _is_shape_derived(v)]
        if node.op_type == "Add":
            terms += [v for v in node.inputs if _is_const(v) and v.is_initializer()]
            if len(live) == 2:  # bias computed at run time: find the table behind it
                main = [v for v in live if _leads_to_matmul(v)]
                side = [v for v in live if v not in main]
                if len(main) != 1:
                    return None
                tables += [t for t in (_gathered_table(v) for v in side) if t is not None]
                live = main
        if node.op_type == "Where":
            live = [v for v in node.inputs[1:] if v is not None and not _is_shape_derived(v)]
        if len(live) != 1:
            return None
        value = live[0]
    if qk is None:
        return None
    av = _forward_to_av(softmax.outputs[0])
    if av is None:
        return None
    q, k, v = (trace_to_projection(x) for x in (qk.inputs[0], qk.inputs[1], av.inputs[1]))
    if q is None or k is None or v is None:
        return None
    out = _forward_to_projection(av.outputs[0])
    if out is None:
        return None
    return Attention(softmax, qk, av, q, k, v, out, terms, tables)


def _leads_to_matmul(value: ir.Value, depth: int = 8) -> bool:
    node = value.producer()
    if node is None or depth == 0:
        return False
    if node.op_type == "MatMul" and not _is_const(node.inputs[1]):
        return True
    return any(_leads_to_matmul(v, depth - 1) for v in node.inputs if v is not None and not _is_const(v))


def _gathered_table(value: ir.Value) -> ir.Value | None:
    """The initializer behind a score bias computed at run time (a gathered table), heads last."""
    for node, _ in _walk_up(value):
        data = node.inputs[0] if node.op_type == "Gather" else _data_input(node) if node.op_type in LAYOUT_OPS else None
        if _is_const(data) and data.is_initializer():
            return data
    return None


def _forward_to_av(probs: ir.Value) -> ir.Node | None:
    """The MatMul that applies attention probabilities to v, through what exporters put between:
    casts, and the NaN guard of a decomposed scaled_dot_product_attention
    (``Where(IsNaN(p), 0, p)``, dynamo)."""
    value = probs
    for _ in range(8):
        consumers = [n for n in _data_consumers(value) if not (n.op_type == "IsNaN" and _guards(n, value))]
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.op_type == "MatMul" and node.inputs[0] is value:
            return node
        if node.op_type in ("Cast", "Identity"):
            value = node.outputs[0]
        elif node.op_type == "Where" and node.inputs[2] is value and _is_shape_derived(node.inputs[1]) \
                and node.inputs[0].producer() is not None and node.inputs[0].producer().op_type == "IsNaN" \
                and node.inputs[0].producer().inputs[0] is value:
            value = node.outputs[0]
        else:
            return None
    return None


def _guards(isnan: ir.Node, value: ir.Value) -> bool:
    """An IsNaN of ``value`` whose result only selects between ``value`` and a constant."""
    return all(c.op_type == "Where" and c.inputs[0] is isnan.outputs[0] and c.inputs[2] is value
               for c in isnan.outputs[0].consumers())


def _forward_to_projection(value: ir.Value) -> Projection | None:
    """The output projection reached from the attention output through layout ops; branches
    that read only the shape (TorchScript's ``Shape -> Reshape`` target) are not data paths."""
    for _ in range(16):
        consumers = _data_consumers(value)
        if len(consumers) != 1:
            return None
        node = consumers[0]
        proj = as_projection(node)
        if proj is not None and node.inputs[0] is value:
            return proj
        if node.op_type not in ("Reshape", "Transpose", "Identity", "Flatten", "Cast"):
            return None
        value = node.outputs[0]
    return None


def _walk_down(start: ir.Value, follow) -> Iterator[tuple[ir.Value, ir.Node]]:
    """Every node reachable downstream of ``start`` once, with the value it was reached by; the
    walk goes on through the outputs of the nodes for which ``follow(node)`` holds."""
    seen: set[int] = set()
    stack = [start]
    while stack:
        value = stack.pop()
        for node in value.consumers():
            if id(node) in seen:
                continue
            seen.add(id(node))
            yield value, node
            if follow(node):
                stack.extend(node.outputs)


def find_mlp_partner(proj: Projection, claimed: set[int]) -> Projection | None:
    """fc2 for an fc1: the single projection reached from ``proj`` through element-wise ops."""
    partner = None
    for value, node in _walk_down(proj.output, lambda n: n.op_type in ELEMENTWISE_OPS):
        other = as_projection(node) if node.op_type in ("MatMul", "Gemm") else None
        if other is not None and node.inputs[0] is value:
            if partner is not None and partner.node is not other.node:
                return None
            partner = other
        elif node.op_type not in ELEMENTWISE_OPS and node.op_type not in SHAPE_ONLY_OPS:
            return None
    if partner is None or id(partner.node) in claimed or partner.in_dim != proj.out_dim:
        return None
    return partner


# Attention as one node, q/k/v (B, tokens, H·D) in, (B, tokens, H·Dv) out, heads in ``num_heads``:
# deploycomp's TokenCluster (semantic tokens) and ONNX Runtime's MultiHeadAttention (its lowering).
FUSED_ATTENTION = {("deploycomp", "TokenCluster"), ("com.microsoft", "MultiHeadAttention")}


def is_fused_attention(node: ir.Node) -> bool:
    return (node.domain, node.op_type) in FUSED_ATTENTION


def find_fused_attention(node: ir.Node) -> Attention | None:
    """A fused attention node read as an :class:`Attention` (the node stands for Softmax and both MatMuls)."""
    if len(node.inputs) < 3 or any(v is None for v in node.inputs[:3]):
        return None
    q, k, v = (trace_to_projection(x) for x in node.inputs[:3])
    out = _forward_to_projection(node.outputs[0])
    if q is None or k is None or v is None or out is None:
        return None
    return Attention(node, node, node, q, k, v, out, [], [])


def discover(model: ir.Model, family: str | None = None) -> Structure:
    """Find the blocks and coupled groups of a ViT graph, or raise NotAViTError."""
    graph = model.graph
    order = {id(n): i for i, n in enumerate(graph)}
    softmaxes = [n for n in graph if n.op_type == "Softmax" or is_fused_attention(n)]
    attentions = [a for a in ((find_fused_attention(n) if is_fused_attention(n) else find_attention(n))
                              for n in softmaxes) if a is not None]
    if not attentions:
        raise NotAViTError("no self-attention (MatMul -> Softmax -> MatMul with q/k/v projections) found")
    attentions.sort(key=lambda a: order[id(a.softmax)])
    first, last = order[id(attentions[0].softmax)], order[id(attentions[-1].softmax)]
    unread = [n.name for n in softmaxes if first < order[id(n)] < last and all(a.softmax is not n for a in attentions)]
    if unread:  # never report a structure with a block silently missing
        raise NotAViTError(f"attention at Softmax '{unread[0]}' could not be read (unsupported op pattern)")

    claimed: set[int] = set()
    for a in attentions:
        for p, _ in (a.q, a.k, a.v):
            claimed.add(id(p.node))
        claimed.add(id(a.out.node))
    mlps: list[tuple[Projection, Projection]] = []
    for node in graph:
        proj = as_projection(node) if node.op_type in ("MatMul", "Gemm") else None
        if proj is None or id(node) in claimed:
            continue
        partner = find_mlp_partner(proj, claimed)
        if partner is not None:
            mlps.append((proj, partner))
            claimed.update((id(proj.node), id(partner.node)))

    # Each MLP belongs to the last attention before it.
    block_mlp: list[tuple[Projection, Projection] | None] = [None] * len(attentions)
    starts = [order[id(a.softmax)] for a in attentions]
    for fc1, fc2 in mlps:
        pos = order[id(fc1.node)]
        owner = max((i for i, s in enumerate(starts) if s < pos), default=None)
        if owner is not None and block_mlp[owner] is None:
            block_mlp[owner] = (fc1, fc2)
    for i, m in enumerate(block_mlp):
        if m is None:
            raise NotAViTError(f"block {i} has no MLP (Linear -> activation -> Linear) after its attention")

    def operands(a: Attention) -> list[ir.Value]:
        """q, k (as the score product sees them) and v."""
        return list(a.qk.inputs[:3]) if is_fused_attention(a.qk) else [a.qk.inputs[0], a.qk.inputs[1], a.av.inputs[1]]

    probe = [v.name for a in attentions for v in operands(a)]
    shapes = probe_shapes(model, probe)
    tensor_shapes = {name: tuple(v.const_value.shape) for name, v in graph.initializers.items() if v.const_value is not None}
    builder = StructureGraphBuilder(tensor_shapes)

    blocks: list[BlockStructure] = []
    stage_embs: list[int] = []
    for i, (a, (fc1, fc2)) in enumerate(zip(attentions, block_mlp)):
        qs, ks, vs = (shapes[v.name] for v in operands(a))
        if is_fused_attention(a.qk):  # (B, tokens, H·D): heads from the node
            h = a.qk.attributes["num_heads"].as_int()
            qs, ks, vs = ((*x[:-1][:-1], h, x[-2], x[-1] // h) for x in (qs, ks, vs))
        if len(qs) < 4 or len(vs) < 4:
            raise NotAViTError(f"block {i}: attention operands are {len(qs)}-d; heads are folded into the batch axis")
        heads, tokens, qk_dim, v_dim = qs[-3], qs[-2], qs[-1], vs[-1]
        keys = vs[-2] if vs[-2] != tokens else 0  # cross-attention (semantic-token generator)
        if ks[-3] != heads or qk_dim not in (ks[-1], ks[-2]):
            raise NotAViTError(f"block {i}: q {qs} and k {ks} disagree on heads/dims")
        emb = a.q[0].in_dim
        if not stage_embs or stage_embs[-1] != emb:
            stage_embs.append(emb)
        stage = len(stage_embs) - 1
        fused = a.q[0].node is a.k[0].node is a.v[0].node
        block = BlockStructure(
            index=i, stage=stage, emb=emb, heads=heads, qk_dim=qk_dim, v_dim=v_dim, mlp_dim=fc1.out_dim,
            tokens=tokens, sequences=int(np.prod(qs[:-3])), fused_qkv=fused, keys=keys,
            nodes={**({"fused_attention": a.qk.name} if is_fused_attention(a.qk) else
                      {"qk_matmul": a.qk.name, "softmax": a.softmax.name, "av_matmul": a.av.name}),
                   "q": a.q[0].node.name, "k": a.k[0].node.name, "v": a.v[0].node.name,
                   "proj": a.out.node.name, "fc1": fc1.node.name, "fc2": fc2.node.name},
        )
        _couple_block(builder, block, a, fc1, fc2)
        blocks.append(block)

    _couple_stem(builder, attentions[0])
    last_of_stage = [b for b, nxt in zip(blocks, blocks[1:] + [None]) if nxt is None or nxt.stage != b.stage]
    for b in last_of_stage:
        _couple_stage_exit(builder, b, block_mlp[b.index][1], stage_embs, claimed)
    return Structure(family=family or detect_family(model, blocks), blocks=blocks, stage_embs=stage_embs,
                     graph=builder.graph)


# Initializer-name marks of the libraries a ViT graph is exported from: both exporters keep the
# module's parameter names for the tensors they do not fold (norms, tokens, embeddings).
FAMILY_MARKS = (
    ("hf-clip", ("pre_layrnorm", "vision_model.embeddings", "post_layernorm")),
    ("hf-deit", ("distillation_token", "deit.embeddings", "deit.layers", "deit.encoder")),
    ("hf-vit", ("embeddings.patch_embeddings", "layernorm_before", "layernorm_after")),
    ("open_clip", ("transformer.resblocks", "positional_embedding", "class_embedding", "ln_pre.")),
    ("timm-vit", ("patch_embed.proj", "blocks.0.norm1", "cls_token", "pos_embed")),
)


def detect_family(model: ir.Model, blocks: list[BlockStructure]) -> str:
    """The source family of a discovered graph, for ``inspect`` and the report: ``swin`` when
    attention runs in windows, else the library whose parameter names the graph carries
    (``hf-vit``, ``hf-deit``, ``hf-clip``, ``open_clip``, ``timm-vit``), else ``vit``."""
    if any(b.sequences > 1 for b in blocks):
        return "swin"
    names = list(model.graph.initializers)
    for family, marks in FAMILY_MARKS:
        if any(mark in name for name in names for mark in marks):
            return family
    return "vit"


def _couple_block(builder: StructureGraphBuilder, b: BlockStructure, a: Attention, fc1: Projection, fc2: Projection) -> None:
    pre = f"block{b.index}"
    emb = f"stage{b.stage}.emb"
    if emb not in builder.graph:
        builder.group(emb, "emb", b.emb, stage=b.stage)
    heads = builder.group(f"{pre}.heads", "heads", b.heads, block=b.index)
    qk = builder.group(f"{pre}.qk", "qk", b.qk_dim, block=b.index)
    v = builder.group(f"{pre}.v", "v", b.v_dim, block=b.index)
    mlp = builder.group(f"{pre}.mlp", "mlp", b.mlp_dim, block=b.index)
    H = b.heads

    expected = {0: H * b.qk_dim, 1: H * b.qk_dim, 2: H * b.v_dim}
    if b.fused_qkv:
        chunks = [a.q[1], a.k[1], a.v[1]]
        if sorted(c for c in chunks if c is not None) != [0, 1, 2] or b.qk_dim != b.v_dim:
            raise NotAViTError(f"block {b.index}: fused qkv projection with an unreadable q/k/v split")
        if a.q[0].out_dim != 3 * H * b.qk_dim:
            raise NotAViTError(f"block {b.index}: qkv width {a.q[0].out_dim} != 3 x {H} heads x {b.qk_dim}")
        offsets = [c * H * b.qk_dim for c in chunks]
    else:
        for role, (p, _), width in zip("qkv", (a.q, a.k, a.v), expected.values()):
            if p.out_dim != width:
                raise NotAViTError(f"block {b.index}: {role} projection width {p.out_dim} != {H} heads x dim")
        offsets = [0, 0, 0]

    for (p, _), off, d, groups in zip((a.q, a.k, a.v), offsets, (b.qk_dim, b.qk_dim, b.v_dim),
                                     ((heads, qk), (heads, qk), (heads, v))):
        for t, axis in ((p.weight, p.out_axis), (p.bias, 0)):
            if t is None:
                continue
            builder.couple(groups[0], ChannelSlice(t.name, axis, off, d, 1, d))
            builder.couple(groups[1], ChannelSlice(t.name, axis, off, 1, d, H))
    out = a.out
    if out.in_dim != H * b.v_dim:
        raise NotAViTError(f"block {b.index}: output projection takes {out.in_dim} != {H} heads x {b.v_dim}")
    builder.couple(heads, ChannelSlice(out.weight.name, out.in_axis, 0, b.v_dim, 1, b.v_dim))
    builder.couple(v, ChannelSlice(out.weight.name, out.in_axis, 0, 1, b.v_dim, H))
    for term in a.score_terms:
        shape = term.const_value.shape
        if len(shape) >= 3 and shape[-3] == H and H > 1:
            builder.couple(heads, ChannelSlice(term.name, len(shape) - 3))
    for table in a.score_tables:
        if table.const_value.shape[-1] == H:
            builder.couple(heads, ChannelSlice(table.name, len(table.const_value.shape) - 1))

    builder.couple(mlp, ChannelSlice(fc1.weight.name, fc1.out_axis))
    if fc1.bias is not None:
        builder.couple(mlp, ChannelSlice(fc1.bias.name, 0))
    builder.couple(mlp, ChannelSlice(fc2.weight.name, fc2.in_axis))

    # The residual stream: everything that reads or writes the block's embedding channels.
    readers = {id(p.node): p for p, _ in (a.q, a.k, a.v)}
    for p in [*readers.values(), fc1]:
        builder.couple(emb, ChannelSlice(p.weight.name, p.in_axis))
        ln = trace_to_layernorm(p.node.inputs[0])
        if ln is not None:
            _couple_layernorm(builder, emb, ln, b.emb)
    for p in (out, fc2):
        builder.couple(emb, ChannelSlice(p.weight.name, p.out_axis))
        if p.bias is not None:
            builder.couple(emb, ChannelSlice(p.bias.name, 0))
        gamma = layer_scale(p, b.emb)
        if gamma is not None:
            builder.couple(emb, ChannelSlice(gamma.name, len(gamma.const_value.shape) - 1))


def layer_scale(proj: Projection, emb: int) -> ir.Value | None:
    """The per-channel gamma a block multiplies a residual branch by (LayerScale: CaiT, DeiT-III,
    open_clip ``ls_init_value``), if the projection's output goes through one."""
    value = proj.output
    for _ in range(4):  # nn.MultiheadAttention reshapes/transposes its output back to the batch layout first
        consumers = _data_consumers(value)
        if len(consumers) != 1 or consumers[0].op_type not in ("Mul", "Reshape", "Transpose", "Identity"):
            return None
        if consumers[0].op_type == "Mul":
            break
        value = consumers[0].outputs[0]
    else:
        return None
    gamma = next((v for v in consumers[0].inputs if v is not value), None)
    if _is_const(gamma) and gamma.is_initializer() and gamma.const_value.shape[-1] == emb \
            and int(np.prod(gamma.const_value.shape)) == emb:
        return gamma
    return None


def _couple_layernorm(builder: StructureGraphBuilder, group: str, ln: ir.Node, emb: int) -> None:
    for t in ln.inputs[1:3]:
        if t is None or not _is_const(t):
            continue
        if (builder.graph.has_edge(group, f"tensor:{t.name}")):
            continue
        size = t.const_value.shape[-1]
        if size == emb:
            builder.couple(group, ChannelSlice(t.name, len(t.const_value.shape) - 1))
        elif size % emb == 0:  # patch merging: k neighbours' channels concatenated, channel innermost
            builder.couple(group, ChannelSlice(t.name, len(t.const_value.shape) - 1, 0, 1, emb, size // emb))
        else:
            raise NotAViTError(f"LayerNorm '{ln.name}' of width {size} does not fit embedding {emb}")


def _couple_stem(builder: StructureGraphBuilder, first: Attention) -> None:
    emb = first.q[0].in_dim
    group = "stage0.emb"
    start = first.q[0].node.inputs[0]
    ln = trace_to_layernorm(start)
    if ln is not None:
        start = ln.inputs[0]
    seen: set[int] = set()
    stack = [start]
    found_conv = False
    while stack:
        node = stack.pop().producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Conv":
            found_conv = True
            w = node.inputs[1]
            if not _is_const(w) or w.const_value.shape[0] != emb:
                raise NotAViTError(f"patch embedding Conv '{node.name}' does not produce the embedding width {emb}")
            builder.couple(group, ChannelSlice(w.name, 0))
            if len(node.inputs) > 2 and _is_const(node.inputs[2]):
                builder.couple(group, ChannelSlice(node.inputs[2].name, 0))
            continue
        if node.op_type not in STREAM_UP_OPS:
            continue
        if node.op_type == "LayerNormalization":
            _couple_layernorm(builder, group, node, emb)
            stack.append(node.inputs[0])
            continue
        for v in node.inputs:
            if v is None:
                continue
            if _is_const(v) and v.is_initializer():
                arr_shape = v.const_value.shape
                floating = v.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
                if floating and len(arr_shape) >= 1 and arr_shape[-1] == emb and not builder.graph.has_edge(group, f"tensor:{v.name}"):
                    builder.couple(group, ChannelSlice(v.name, len(arr_shape) - 1))
            elif not _is_const(v):
                stack.append(v)
    if not found_conv:
        raise NotAViTError("no patch embedding (Conv) before the first block")


def _couple_stage_exit(builder: StructureGraphBuilder, block: BlockStructure, fc2: Projection,
                       stage_embs: list[int], claimed: set[int]) -> None:
    """Couple what reads the stage's stream after its last block: final norm and head, or patch merging."""
    group = f"stage{block.stage}.emb"
    emb = block.emb
    for _, node in _walk_down(fc2.output, lambda n: n.op_type in STREAM_DOWN_OPS):
        if node.op_type == "LayerNormalization":
            _couple_layernorm(builder, group, node, emb)
        proj = as_projection(node) if node.op_type in ("MatMul", "Gemm") else None
        if proj is None or id(node) in claimed:
            continue
        if proj.in_dim == emb:  # the classifier head
            builder.couple(group, ChannelSlice(proj.weight.name, proj.in_axis))
        elif proj.in_dim % emb == 0 and block.stage + 1 < len(stage_embs):  # patch merging
            nxt_emb = stage_embs[block.stage + 1]
            if proj.out_dim != nxt_emb:
                raise NotAViTError(f"patch merging '{node.name}' gives {proj.out_dim}, next stage reads {nxt_emb}")
            builder.couple(group, ChannelSlice(proj.weight.name, proj.in_axis, 0, 1, emb, proj.in_dim // emb))
            nxt = f"stage{block.stage + 1}.emb"
            builder.couple(nxt, ChannelSlice(proj.weight.name, proj.out_axis))
            if proj.bias is not None:
                builder.couple(nxt, ChannelSlice(proj.bias.name, 0))
