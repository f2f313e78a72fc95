"""A torch twin of a ViT read from a bare ONNX graph: the torch model that pruning and semantic
tokens train when the user holds only an ``.onnx`` file.

Pruning needs gradients and semantic tokens need a torch model of the rewritten architecture;
both work on timm's ``VisionTransformer`` whose parameter names are the graph's initializer names
(the cleanup pass keeps torch names on exported weights and records folded transposes in
``deploycomp.transposed_from``). For a graph from an exporter and a model the code has never
seen, this module builds that torch model from what the graph computes:

1. **Read** (:func:`read_twin_spec`, structure only, no run): the blocks structure discovery
   found, and around them what discovery does not need — each block's pre-norms, the path from
   each projection to the attention (layout ops and scalar factors only: the softmax scale), the
   residual Adds, layer scales, the stem (patch Conv, prefix tokens, position embedding, a norm
   before the blocks) and the head (final norm, cls or average pooling, a norm after pooling, the
   final projection). Anything the twin cannot compute — a post-norm or parallel block, q/k
   norms, an attention bias or mask, in-graph image normalization, a second head — is refused
   here in one line naming the node, before anything is run or trained.
2. **Probe** (one ONNX Runtime run at batch 1): each MLP's activation is identified by comparing
   fc2's input with candidate activations of fc1's output (exporters spell GELU in many ways);
   softmax scales an exporter computes from shapes are read as values. Attention that runs
   tokens first (nn.MultiheadAttention) is then rebuilt in (batch, tokens, channels) with the
   same weights (:func:`rebuild_tokens_first_attention`) and the graph read again, so that every
   later rewrite sees one layout.
3. **Build** (frontend/twin_module.py, the only part that imports torch) :class:`OnnxTwinViT`, a
   subclass of timm's ``VisionTransformer`` with per-block
   attention (:class:`TwinAttention`: fused or separate q/k/v, any heads and q/k and v widths per
   block, the graph's softmax scale) and per-block MLP widths, holding the graph's tensors in the
   graph's own shapes (a ``(E,)`` class embedding stays ``(E,)``).
4. **Name**: the graph's initializers are renamed to the twin's parameter names (timm's names;
   ``deploycomp.transposed_from`` set where the graph stores a weight transposed), so pruning's
   coupled slices, saliency and ``copy_weights_to_graph`` map them by name exactly as for a timm
   export; every parameter is checked to read back from its initializer. The original names are
   kept in the manifest (``torch_twin.names``).
5. **Verify**: the twin must reproduce the input graph run by ONNX Runtime on fresh random images
   (relative L2 <= :data:`TWIN_TOLERANCE`) or the compile is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx_ir as ir

from ..errors import DeployCompError
from ..ir.discover import (Projection, _data_consumers, _data_input, _is_const, _is_shape_derived, as_projection,
                           find_attention, layer_scale)
from ..passes.cleanup import TRANSPOSED_FROM

if TYPE_CHECKING:
    from torch import nn

    from ..ir.structure import Structure
    from . import Source

# Relative L2 between the twin and the input graph on random images (fp32).
TWIN_TOLERANCE = 1e-4
# Relative L2 between fc2's input and a candidate activation of fc1's output (fp32 rounding ~1e-7;
# GELU's exact and tanh forms differ by ~1e-4 on these inputs, QuickGELU by ~1e-2).
ACTIVATION_TOLERANCE = 1e-5
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu")
# The opset the compiler's rewrites emit (pruning, semantic tokens: e.g. ReduceMax with axes as an
# input); an older graph is converted to it (onnxscript's version converter) before it is read.
REWRITE_OPSET = 18

# Ops allowed between a projection and the attention MatMul that reads it: they move data (heads,
# chunks of a fused qkv) or scale it by a scalar (the softmax scale).
QKV_PATH_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split", "Identity", "Flatten",
                "Cast", "Mul", "Div"}
# Ops that only move the residual stream or a branch into it.
MOVE_OPS = {"Reshape", "Transpose", "Identity", "Cast", "Flatten", "Squeeze", "Unsqueeze"}
FLOAT = ir.DataType.FLOAT


def refuse(what: str, node: ir.Node | None = None) -> DeployCompError:
    where = f" at node '{node.name}' ({node.op_type})" if node is not None else ""
    return DeployCompError(f"the torch twin of this ONNX graph cannot express {what}{where}; pruning and semantic "
                           "tokens need it")


# ---------------------------------------------------------------------------------------------
# What the twin holds, read from the graph (initializer names, not arrays).


@dataclass
class LinearSpec:
    """A projection: ``weight`` stored (in, out) in the graph when ``transposed`` (MatMul), else
    (out, in) (Gemm with transB), as nn.Linear holds it."""

    weight: str
    bias: str | None
    transposed: bool
    in_dim: int
    out_dim: int

    @classmethod
    def of(cls, p: Projection) -> "LinearSpec":
        return cls(p.weight.name, p.bias.name if p.bias is not None else None, p.out_axis == 1, p.in_dim, p.out_dim)


@dataclass
class NormSpec:
    weight: str
    bias: str | None
    eps: float


@dataclass
class AttentionSpec:
    heads: int
    qk_dim: int
    v_dim: int
    qkv: LinearSpec | None  # fused: one projection, q/k/v chunks at ``chunk_order`` positions
    chunk_order: tuple[int, int, int] | None
    q: LinearSpec | None
    k: LinearSpec | None
    v: LinearSpec | None
    proj: LinearSpec
    scale_factors: list[tuple[str, bool]]  # (value name, divides) whose product is the softmax scale
    zero_terms: list[str] = field(default_factory=list)  # added to the scores, computed from shapes: must be 0
    scale: float | None = None  # set by the probe
    probed: dict[str, np.ndarray] = field(default_factory=dict)  # computed scale factors and zero terms, as run


@dataclass
class BlockSpec:
    norm1: NormSpec
    attn: AttentionSpec
    ls1: str | None
    norm2: NormSpec
    fc1: LinearSpec
    fc2: LinearSpec
    ls2: str | None
    act_probe: tuple[str, str]  # (fc1 output, fc2 input) value names
    act: str | None = None  # set by the probe


@dataclass
class TwinSpec:
    img_size: tuple[int, int]
    in_chans: int
    patch: tuple[int, int]
    emb: int
    conv_weight: str
    conv_bias: str | None
    prefix: list[tuple[str, int]]  # (initializer, tokens) in token order; the first is cls when class_token
    class_token: bool
    pos: str | None
    pos_on_patches: bool  # added to the patch tokens before the prefix is concatenated (no_embed_class)
    norm_pre: NormSpec | None
    blocks: list[BlockSpec]
    norm: NormSpec | None  # on every token after the blocks
    pool: str  # "token" | "avg"
    pool_include_prefix: bool
    fc_norm: NormSpec | None  # after pooling
    head: LinearSpec | None
    head_act: str | None  # "tanh" (Hugging Face ViT's pooler)
    names: dict[str, str] = field(default_factory=dict)  # twin parameter -> graph initializer
    # a node that runs some block's attention in another layout than (batch, tokens, channels)
    # (nn.MultiheadAttention: tokens first, heads flattened to 2-D for the output projection)
    attention_layout: str | None = None


def _is(value: ir.Value | None, values) -> bool:
    """``value`` is one of ``values`` (identity: graph values)."""
    return any(value is v for v in values)


def _norm(node: ir.Node, what: str) -> NormSpec:
    axis = node.attributes.get("axis")
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if axis is not None and axis.as_int() != -1 and (rank is None or axis.as_int() != rank - 1):
        raise refuse(f"{what}: a LayerNorm over axis {axis.as_int()} (not the channels)", node)
    scale, bias = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    if not (_is_const(scale) and scale.is_initializer()) or (bias is not None and not (_is_const(bias) and bias.is_initializer())):
        raise refuse(f"{what}: a LayerNorm whose scale or bias is computed", node)
    eps = node.attributes.get("epsilon")
    return NormSpec(scale.name, bias.name if bias is not None else None, eps.as_float() if eps is not None else 1e-5)


def _up_to_norm(value: ir.Value, what: str) -> ir.Node:
    """The LayerNormalization feeding ``value`` through move-only ops (the block's pre-norm)."""
    for _ in range(16):
        node = value.producer()
        if node is None:
            break
        if node.op_type == "LayerNormalization":
            return node
        if node.op_type not in MOVE_OPS:
            raise refuse(f"{what}: no LayerNorm before it (post-norm block or a decomposed norm)", node)
        value = node.inputs[0]
    raise refuse(f"{what}: no LayerNorm before it (post-norm block or a decomposed norm)")


def _single_reader(value: ir.Value, what: str) -> ir.Node:
    readers = _data_consumers(value)
    if len(readers) != 1:
        raise refuse(f"{what}: a value read by {len(readers)} nodes ({', '.join(n.name for n in readers[:3])})",
                     value.producer())
    return readers[0]


def _residual_add(proj: Projection, emb: int, what: str) -> tuple[ir.Node, ir.Value | None]:
    """The Add that puts a branch (ending in ``proj``) back into the stream, and its layer scale."""
    gamma = layer_scale(proj, emb)
    value = proj.output
    for _ in range(8):
        node = _single_reader(value, what)
        if node.op_type == "Add":
            return node, gamma
        if node.op_type == "Mul" and gamma is not None and _is(gamma, node.inputs):
            value = node.outputs[0]
            continue
        if node.op_type not in MOVE_OPS:
            raise refuse(f"{what}: the branch output does not go straight into a residual Add", node)
        value = node.outputs[0]
    raise refuse(f"{what}: no residual Add after the branch", proj.node)


def _path_factors(start: ir.Value, stop: ir.Value, what: str, block: int) -> list[tuple[ir.Value, bool]]:
    """The scalar factors (value, divides) applied on the path from ``stop`` down to ``start``;
    every op on it must move data or scale it."""
    factors: list[tuple[ir.Value, bool]] = []
    value = start
    for _ in range(64):
        if value is stop:
            return factors
        node = value.producer()
        if node is None:
            break
        if node.op_type not in QKV_PATH_OPS:
            raise refuse(f"block {block}: an op on the {what} path (q/k norm, rotary embedding?)", node)
        data = _data_input(node)
        if data is None:
            raise refuse(f"block {block}: an op on the {what} path with two data inputs", node)
        if node.op_type in ("Mul", "Div"):
            index = 0 if node.inputs[0] is data else 1
            if node.op_type == "Div" and index == 1:
                raise refuse(f"block {block}: a division by the {what}", node)
            factors.append((node.inputs[1 - index], node.op_type == "Div"))
        value = data
    raise refuse(f"block {block}: the {what} path does not lead back to its projection")


def _score_factors(a, block: int) -> tuple[list[tuple[ir.Value, bool]], list[ir.Value]]:
    """Scalar factors between q·kᵀ and the Softmax, and the terms added there that are computed from
    shapes only (an exporter's all-pass mask: the probe checks they are zero); a bias or a mask
    that depends on anything else is refused."""
    factors: list[tuple[ir.Value, bool]] = []
    terms: list[ir.Value] = []
    value = a.softmax.inputs[0]
    for _ in range(16):
        if value is a.qk.outputs[0]:
            return factors, terms
        node = value.producer()
        if node is None:
            break
        if node.op_type in ("Reshape", "Cast", "Identity"):
            value = node.inputs[0]
        elif node.op_type in ("Mul", "Div"):
            data = _data_input(node)
            if data is None or (node.op_type == "Div" and node.inputs[1] is data):
                raise refuse(f"block {block}: attention scores combined with another tensor", node)
            factors.append((node.inputs[1] if node.inputs[0] is data else node.inputs[0], node.op_type == "Div"))
            value = data
        elif node.op_type in ("Add", "Sub") and sum(not _is_shape_derived(v) for v in node.inputs[:2]) == 1:
            index = 0 if not _is_shape_derived(node.inputs[0]) else 1
            if node.op_type == "Sub" and index == 1:
                raise refuse(f"block {block}: attention scores subtracted from another tensor", node)
            term = node.inputs[1 - index]
            if not (_is_const(term) and not np.any(term.const_value.numpy())):
                terms.append(term)
            value = node.inputs[index]
        else:
            raise refuse(f"block {block}: an attention bias or mask", node)
    raise refuse(f"block {block}: the attention scores do not lead back to q·kᵀ", a.softmax)


def _read_attention(model: ir.Model, b, nodes: dict[str, ir.Node]) -> tuple[AttentionSpec, object]:
    softmax = nodes[b.nodes["softmax"]]
    a = find_attention(softmax)
    if a is None:
        raise refuse(f"block {b.index}: an attention it cannot read", softmax)
    axis = softmax.attributes.get("axis")
    if axis is not None and axis.as_int() not in (-1, 3):
        raise refuse(f"block {b.index}: a softmax over axis {axis.as_int()}", softmax)
    if a.score_terms or a.score_tables:
        raise refuse(f"block {b.index}: an attention bias (relative position bias or mask)", softmax)
    score_factors, zero_terms = _score_factors(a, b.index)
    factors = (_path_factors(a.qk.inputs[0], a.q[0].output, "q", b.index)
               + _path_factors(a.qk.inputs[1], a.k[0].output, "k", b.index) + score_factors)
    if _path_factors(a.av.inputs[1], a.v[0].output, "v", b.index):
        raise refuse(f"block {b.index}: v scaled before the attention", a.av)
    for value, _ in factors:
        if not _is_shape_derived(value):
            raise refuse(f"block {b.index}: a softmax scale computed from activations", value.producer())
    names = [v.name for v, _ in factors]
    fused = a.q[0].node is a.k[0].node is a.v[0].node
    if not fused and len({id(a.q[0].node), id(a.k[0].node), id(a.v[0].node)}) != 3:
        raise refuse(f"block {b.index}: two of q, k, v share a projection", a.q[0].node)
    proj = LinearSpec.of(a.out)
    if fused:
        order = (a.q[1], a.k[1], a.v[1])
        if sorted(c for c in order if c is not None) != [0, 1, 2]:
            raise refuse(f"block {b.index}: a fused qkv projection with an unreadable q/k/v split", a.q[0].node)
        spec = AttentionSpec(b.heads, b.qk_dim, b.v_dim, LinearSpec.of(a.q[0]), order, None, None, None, proj,
                             list(zip(names, [d for _, d in factors])))
    else:
        spec = AttentionSpec(b.heads, b.qk_dim, b.v_dim, None, None, LinearSpec.of(a.q[0]), LinearSpec.of(a.k[0]),
                             LinearSpec.of(a.v[0]), proj, list(zip(names, [d for _, d in factors])))
    spec.zero_terms = [t.name for t in zero_terms]
    return spec, a


def read_twin_spec(model: ir.Model, structure: "Structure") -> TwinSpec:
    """What the twin holds, read off a cleaned graph and its discovered structure; refuses (one
    line, naming the node) whatever the twin cannot compute. Runs nothing."""
    graph = model.graph
    if len(structure.stage_embs) != 1 or any(b.sequences != 1 for b in structure.blocks):
        raise refuse(f"a multi-stage or windowed ViT ({len(structure.stage_embs)} stages; Swin): the twin is a "
                     "single-stage ViT")
    if any(b.keys or "fused_attention" in b.nodes for b in structure.blocks):
        raise refuse("a graph that already has semantic tokens (cross-attention)")
    inp = graph.inputs[0]
    if inp.dtype != FLOAT:
        raise refuse(f"an image input of type {inp.dtype}: give a float32 graph")
    nodes = {n.name: n for n in graph}
    emb = structure.stage_embs[0]
    blocks: list[BlockSpec] = []
    stream_in: list[ir.Value] = []
    stream_out: list[ir.Value] = []
    attention_layout = None
    for b in structure.blocks:
        what = f"block {b.index}"
        attn, a = _read_attention(model, b, nodes)
        projections = [a.q[0]] if attn.qkv is not None else [a.q[0], a.k[0], a.v[0]]
        lns = {id(ln): ln for ln in (_up_to_norm(p.node.inputs[0], f"{what}'s attention") for p in projections)}
        if len(lns) != 1:
            raise refuse(f"{what}: q, k and v read different norms", a.q[0].node)
        ln1 = next(iter(lns.values()))
        x_in = ln1.inputs[0]
        add1, gamma1 = _residual_add(a.out, emb, f"{what}'s attention")
        if not _is(x_in, add1.inputs[:2]):
            raise refuse(f"{what}: the attention's residual Add does not add the block input (post-norm or "
                         "parallel block)", add1)
        fc1, fc2 = (as_projection(nodes[b.nodes[k]]) for k in ("fc1", "fc2"))
        ln2 = _up_to_norm(fc1.node.inputs[0], f"{what}'s MLP")
        x_mid = add1.outputs[0]
        if ln2.inputs[0] is not x_mid:
            raise refuse(f"{what}: the MLP does not read the attention's residual sum (parallel or post-norm block)",
                         ln2)
        add2, gamma2 = _residual_add(fc2, emb, f"{what}'s MLP")
        if not _is(x_mid, add2.inputs[:2]):
            raise refuse(f"{what}: the MLP's residual Add does not add the attention's residual sum", add2)
        for value, allowed in ((x_in, (ln1, add1)), (x_mid, (ln2, add2))):
            extra = [n for n in _data_consumers(value) if not any(n is m for m in allowed)]
            if extra:
                raise refuse(f"{what}: the residual stream is also read elsewhere", extra[0])
        layout = _attention_layout(a, ln1)
        if layout is not None and attention_layout is None:
            attention_layout = f"block {b.index}: '{layout.name}' ({layout.op_type})"
        stream_in.append(x_in)
        stream_out.append(add2.outputs[0])
        blocks.append(BlockSpec(_norm(ln1, what), attn, gamma1.name if gamma1 is not None else None, _norm(ln2, what),
                                LinearSpec.of(fc1), LinearSpec.of(fc2), gamma2.name if gamma2 is not None else None,
                                (fc1.output.name, fc2.node.inputs[0].name)))
    for i in range(1, len(blocks)):
        if stream_in[i] is not stream_out[i - 1]:
            raise refuse(f"something between blocks {i - 1} and {i}", stream_in[i].producer())
    stem = _read_stem(graph, stream_in[0], emb)
    head = _read_head(graph, stream_out[-1], emb, sum(t for _, t in stem["prefix"]), structure.blocks[-1].tokens)
    if head["pool"] == "token" and not stem["class_token"]:
        raise refuse("a head that reads token 0 of a model without a cls token")
    spec = TwinSpec(blocks=blocks, emb=emb, **stem, **head, attention_layout=attention_layout)
    _name_parts(spec)
    _check_tensors(graph, spec, structure)
    return spec


def _attention_layout(a, ln: ir.Node) -> ir.Node | None:
    """The first node that takes the attention out of the (batch, tokens, channels) layout the
    pruning and token rewrites rebuild attention in: a Transpose/Reshape between the norm and the
    q projection, or an output projection on a 2-D (flattened) input (Gemm)."""
    value = a.q[0].node.inputs[0]
    while value is not ln.outputs[0]:
        node = value.producer()
        if node.op_type not in ("Identity", "Cast"):
            return node
        value = node.inputs[0]
    return a.out.node if a.out.node.op_type == "Gemm" else None


def _branch_end(proj: Projection, emb: int, what: str) -> tuple[ir.Value, ir.Node]:
    """The value a branch ending in ``proj`` puts into the stream (before its layer scale, if any)
    and the node that reads it (the layer-scale Mul or the residual Add)."""
    gamma = layer_scale(proj, emb)
    value = proj.output
    for _ in range(8):
        node = _single_reader(value, what)
        if node.op_type == "Add" or (node.op_type == "Mul" and gamma is not None and _is(gamma, node.inputs)):
            return value, node
        if node.op_type not in MOVE_OPS:
            raise refuse(f"{what}: the branch output does not go straight into a residual Add", node)
        value = node.outputs[0]
    raise refuse(f"{what}: no residual Add after the branch", proj.node)


def rebuild_tokens_first_attention(model: ir.Model, spec: TwinSpec, structure: "Structure") -> list[int]:
    """Rebuild every attention that runs tokens-first (nn.MultiheadAttention: ``(N, B, C)`` and the
    heads flattened to 2-D for the output projection, spelled with run-time shapes) as the
    canonical attention core in ``(batch, tokens, channels)`` (pruning/rewrite.py: separate q/k/v
    projections, ``Reshape [0, 0, H, d]``, the probed softmax scale, the output projection), from
    the block's norm to where the branch re-enters the stream. The same computation with the same
    weights, in the layout the pruning and token rewrites rebuild attention in; the twin built
    afterwards is verified against the input graph. Returns the blocks rebuilt."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from ..ir.build import ChainBuilder
    from ..pruning.rewrite import _projection_arrays, attention_core, project, qkv_arrays

    nodes = {n.name: n for n in model.graph}
    emb = structure.stage_embs[0]
    rebuilt = []
    for b, bs in zip(structure.blocks, spec.blocks):
        a = find_attention(nodes[b.nodes["softmax"]])
        ln1 = _up_to_norm(a.q[0].node.inputs[0], f"block {b.index}'s attention")
        if _attention_layout(a, ln1) is None:
            continue
        at = bs.attn
        widths = {"q": at.heads * at.qk_dim, "k": at.heads * at.qk_dim, "v": at.heads * at.v_dim}
        parts = qkv_arrays(a, list(at.chunk_order) if at.qkv is not None else None, widths, b.index)
        back, reader = _branch_end(a.out, emb, f"block {b.index}'s attention")
        chain = ChainBuilder(model.graph, f"block{b.index}.attn")
        x = ln1.outputs[0]
        q, k, v = (project(chain, x, role, parts[role]) for role in "qkv")
        out = project(chain, attention_core(chain, q, k, v, at.heads, at.qk_dim, at.v_dim, at.scale), "proj",
                      _projection_arrays(a.out))
        chain.insert_before(reader)
        back.replace_all_uses_with(out)
        rebuilt.append(b.index)
    if rebuilt:
        RemoveUnusedNodesPass()(model)
        for name in [n for n, v in model.graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
            model.graph.initializers.pop(name)
    return rebuilt


def _tokens_of(value: ir.Value, emb: int) -> tuple[str, int] | None:
    """A prefix token tensor (cls, registers, distillation token): a float initializer of whole
    embeddings, reached through expand/reshape ops; (name, tokens)."""
    for _ in range(8):
        if _is_const(value) and value.is_initializer():
            shape = value.const_value.shape
            n = int(np.prod(shape))
            if value.const_value.dtype == FLOAT and len(shape) and shape[-1] == emb and n % emb == 0:
                return value.name, n // emb
            return None
        node = value.producer()
        if node is None or node.op_type not in MOVE_OPS | {"Expand", "Tile"}:
            return None
        value = node.inputs[0]
    return None


def _pos_of(add: ir.Node, emb: int) -> tuple[ir.Value, ir.Value] | None:
    """(position embedding initializer, the other input) of an Add that adds one."""
    for i in (0, 1):
        v = add.inputs[i]
        if _is_const(v) and v.is_initializer() and v.const_value.dtype == FLOAT and v.const_value.shape[-1] == emb:
            return v, add.inputs[1 - i]
    return None


def _read_stem(graph: ir.Graph, x0: ir.Value, emb: int) -> dict:
    """Patch Conv, prefix tokens and position embedding, and a norm before the blocks."""
    out: dict = {"norm_pre": None, "pos": None, "pos_on_patches": False, "prefix": [], "class_token": False}
    node = x0.producer()
    if node is not None and node.op_type == "LayerNormalization":
        out["norm_pre"] = _norm(node, "the norm before the blocks")
        x0 = node.inputs[0]
        node = x0.producer()
    if node is not None and node.op_type == "Add":
        found = _pos_of(node, emb)
        if found is None:
            raise refuse("the token embedding: an Add that is not a position embedding", node)
        out["pos"], x0 = found[0].name, found[1]
        node = x0.producer()
    patches, concat = x0, None
    if node is not None and node.op_type == "Concat":
        concat = node
        axis = node.attributes.get("axis")
        if axis is None or axis.as_int() not in (1, -2):
            raise refuse("the token embedding: a Concat that is not along the tokens", node)
        *prefix, patches = node.inputs
        for v in prefix:
            tokens = _tokens_of(v, emb)
            if tokens is None:
                raise refuse("the token embedding: a prefix token that is not a learned embedding (or patch tokens "
                             "before the prefix tokens)", v.producer() or node)
            out["prefix"].append(tokens)
    value = patches
    for _ in range(16):
        node = value.producer()
        if node is None:
            raise refuse("the patch embedding: no Conv on the image")
        if node.op_type == "Conv":
            break
        if node.op_type == "Add" and out["pos"] is None and _pos_of(node, emb) is not None:
            pos, value = _pos_of(node, emb)
            out["pos"], out["pos_on_patches"] = pos.name, True
            continue
        if node.op_type not in MOVE_OPS:
            raise refuse("the patch embedding", node)
        value = node.inputs[0]
    conv = node
    image = conv.inputs[0]
    while image.producer() is not None and _is_float_cast(image.producer()):
        image = image.producer().inputs[0]
    if image is not graph.inputs[0]:
        raise refuse("an op between the image input and the patch Conv (in-graph normalization?)",
                     image.producer() or conv)
    w = conv.inputs[1]
    if not (_is_const(w) and w.is_initializer()) or w.const_value.shape[0] != emb or len(w.const_value.shape) != 4:
        raise refuse("a patch Conv whose weight is not an initializer of the embedding width", conv)
    kernel = tuple(int(k) for k in w.const_value.shape[2:])
    attrs = {k: list(v.as_ints()) for k, v in conv.attributes.items() if k in ("strides", "pads", "dilations")}
    group = conv.attributes.get("group")
    if attrs.get("strides", [1, 1]) != list(kernel) or any(attrs.get("pads", [0])) or \
            any(d != 1 for d in attrs.get("dilations", [1])) or (group is not None and group.as_int() != 1):
        raise refuse("a patch Conv that is not non-overlapping patches (stride = kernel, no padding)", conv)
    shape = list(graph.inputs[0].shape)
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    if bias is not None and not (_is_const(bias) and bias.is_initializer()):
        raise refuse("a patch Conv with a computed bias", conv)
    out["class_token"] = bool(out["prefix"]) and out["prefix"][0][1] == 1  # else registers only
    if len(out["prefix"]) > (2 if out["class_token"] else 1):  # timm holds a cls token and one register tensor
        raise refuse(f"{len(out['prefix'])} separate prefix token tensors", concat)
    return {**out, "img_size": (int(shape[2]), int(shape[3])), "in_chans": int(shape[1]), "patch": kernel,
            "conv_weight": w.name, "conv_bias": bias.name if bias is not None else None}


def _is_float_cast(node: ir.Node) -> bool:
    to = node.attributes.get("to")
    return node.op_type == "Identity" or (node.op_type == "Cast" and to is not None and to.as_int() == FLOAT.value)


def _axes(node: ir.Node) -> list[int] | None:
    attr = node.attributes.get("axes")
    if attr is not None:
        return list(attr.as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None and _is_const(node.inputs[1]):
        return [int(a) for a in node.inputs[1].const_value.numpy().ravel()]
    return None


def _read_head(graph: ir.Graph, x: ir.Value, emb: int, prefix_tokens: int, tokens: int) -> dict:
    """Final norm, pooling (cls token or average), a norm after pooling, the final projection and
    its activation, from the last block's output to the graph output."""
    out: dict = {"norm": None, "pool": None, "pool_include_prefix": False, "fc_norm": None, "head": None,
                 "head_act": None}
    pending_skip = None  # a Slice over the tokens, waiting for its Squeeze (cls) or ReduceMean (avg)
    value = x
    for _ in range(32):
        if value.is_graph_output():
            if _data_consumers(value):
                raise refuse("the graph output is also read by other nodes", value.producer())
            break
        node = _single_reader(value, "after the last block")
        op = node.op_type
        if op == "LayerNormalization":
            key = "norm" if out["pool"] is None else "fc_norm"
            if out[key] is not None or out["head"] is not None:
                raise refuse("a third norm after the blocks", node)
            out[key] = _norm(node, "the final norm")
        elif op == "Gather" and out["pool"] is None:
            axis = node.attributes.get("axis")
            index = node.inputs[1]
            if axis is None or axis.as_int() not in (1, -2) or not _is_const(index) or index.const_value.size != 1 \
                    or int(index.const_value.numpy().ravel()[0]) != 0:
                raise refuse("a token selection other than the cls token (index 0)", node)
            out["pool"] = "token"
        elif op == "Slice" and out["pool"] is None and pending_skip is None:
            starts, ends = (node.inputs[i].const_value.numpy().ravel() if _is_const(node.inputs[i]) else None for i in (1, 2))
            axes = node.inputs[3].const_value.numpy().ravel() if len(node.inputs) > 3 and _is_const(node.inputs[3]) else None
            steps = node.inputs[4].const_value.numpy().ravel() if len(node.inputs) > 4 and _is_const(node.inputs[4]) else None
            if starts is None or ends is None or axes is None or len(axes) != 1 \
                    or (steps is not None and int(steps[0]) != 1):
                raise refuse("a slice of the tokens it cannot read", node)
            start, end = int(starts[0]), int(ends[0])
            if start == 0 and end >= 2**31 - 1:  # all of one axis: moves nothing
                pass
            elif int(axes[0]) not in (1, -2):
                raise refuse("a slice of the tokens it cannot read", node)
            elif start == 0 and end == 1:
                pending_skip = "cls"
            elif start == prefix_tokens and prefix_tokens and end >= tokens:
                pending_skip = "patches"
            else:
                raise refuse(f"a slice of tokens {start}:{end} (prefix tokens: {prefix_tokens})", node)
        elif op == "ReduceMean" and out["pool"] is None:
            if _axes(node) not in ([1], [-2]):
                raise refuse("a mean that is not over the tokens", node)
            if pending_skip == "cls":
                raise refuse("a mean of the cls token", node)
            out["pool"], out["pool_include_prefix"] = "avg", pending_skip is None and prefix_tokens > 0
            pending_skip = None
        elif op in ("Squeeze", "Reshape", "Flatten") and pending_skip == "cls":
            out["pool"], pending_skip = "token", None
        elif op in ("MatMul", "Gemm") and out["pool"] is not None and out["head"] is None:
            proj = as_projection(node)
            if proj is None or proj.in_dim != emb or node.inputs[0] is not value:
                raise refuse("a final projection it cannot read", node)
            out["head"] = LinearSpec.of(proj)
            value = proj.output
            continue
        elif op == "Tanh" and out["head"] is not None and out["head_act"] is None:
            out["head_act"] = "tanh"
        elif op in MOVE_OPS and pending_skip is None:
            pass
        else:
            raise refuse("this head (after the last block)", node)
        value = node.outputs[0]
    else:
        raise refuse("a head it cannot follow to the graph output")
    if out["pool"] is None:
        raise refuse("a graph that outputs every token: export the pooled output (cls token, average, or "
                     "the model's logits/embedding)")
    return out


def _name_parts(spec: TwinSpec) -> None:
    """The twin's parameter name for every tensor it holds (timm's names)."""
    names = spec.names

    def add(name: str, tensor: str | None) -> None:
        if tensor is not None:
            if tensor in names.values():
                raise refuse(f"one tensor '{tensor}' used by two parts ({name} and "
                             f"{next(k for k, v in names.items() if v == tensor)})")
            names[name] = tensor

    def linear(prefix: str, lin: LinearSpec | None) -> None:
        if lin is not None:
            add(f"{prefix}.weight", lin.weight)
            add(f"{prefix}.bias", lin.bias)

    def norm(prefix: str, n: NormSpec | None) -> None:
        if n is not None:
            add(f"{prefix}.weight", n.weight)
            add(f"{prefix}.bias", n.bias)

    add("patch_embed.proj.weight", spec.conv_weight)
    add("patch_embed.proj.bias", spec.conv_bias)
    for i, (tensor, _) in enumerate(spec.prefix):
        add("cls_token" if i == 0 and spec.class_token else "reg_token", tensor)
    add("pos_embed", spec.pos)
    norm("norm_pre", spec.norm_pre)
    for i, b in enumerate(spec.blocks):
        p = f"blocks.{i}"
        norm(f"{p}.norm1", b.norm1)
        for role in ("qkv", "q", "k", "v", "proj"):
            linear(f"{p}.attn.{role}", getattr(b.attn, role))
        add(f"{p}.ls1.gamma", b.ls1)
        norm(f"{p}.norm2", b.norm2)
        linear(f"{p}.mlp.fc1", b.fc1)
        linear(f"{p}.mlp.fc2", b.fc2)
        add(f"{p}.ls2.gamma", b.ls2)
    norm("norm", spec.norm)
    norm("fc_norm", spec.fc_norm)
    linear("head.0" if spec.head_act else "head", spec.head)


def _check_tensors(graph: ir.Graph, spec: TwinSpec, structure: "Structure") -> None:
    held = set(spec.names.values())
    for name in held:
        value = graph.initializers[name]
        if value.const_value.dtype != FLOAT:
            raise refuse(f"weights stored as {value.const_value.dtype} ('{name}'): give a float32 graph")
    extra = [t for t in (sl.tensor for g in structure.groups() for sl in structure.slices(g)) if t not in held]
    if extra:
        raise refuse(f"a coupled weight '{extra[0]}' that is none of the parts it holds")


# ---------------------------------------------------------------------------------------------
# The probe: activations and run-time softmax scales.

def probe(model: ir.Model, spec: TwinSpec) -> None:
    """One ONNX Runtime run at batch 1 with the values the spec needs exposed: each MLP's
    activation, and softmax scale factors computed from shapes. Fills ``act`` and ``scale``."""
    import torch

    from ..ir.shapes import probe_values
    from .twin_module import _activation_layer

    wanted = [n for b in spec.blocks for n in b.act_probe]
    wanted += [n for b in spec.blocks for n, _ in b.attn.scale_factors if n not in model.graph.initializers]
    wanted += [n for b in spec.blocks for n in b.attn.zero_terms if n not in model.graph.initializers]
    values = probe_values(model, wanted, seed=1)

    def array(name: str) -> np.ndarray:
        v = model.graph.initializers.get(name)
        return v.const_value.numpy() if v is not None else values[name]

    for i, b in enumerate(spec.blocks):
        scale = 1.0
        b.attn.probed = {n: np.asarray(values[n]) for n in [*(n for n, _ in b.attn.scale_factors), *b.attn.zero_terms]
                         if n in values}
        for name, divides in b.attn.scale_factors:
            f = np.asarray(array(name), dtype=np.float64)
            if f.size != 1:
                raise refuse(f"block {i}: a softmax scale of shape {f.shape} (per-head or learned scales)")
            scale = scale / float(f.ravel()[0]) if divides else scale * float(f.ravel()[0])
        if not (np.isfinite(scale) and scale > 0):
            raise refuse(f"block {i}: a softmax scale of {scale}")
        for name in b.attn.zero_terms:
            if np.any(array(name)):
                raise refuse(f"block {i}: an attention mask or bias ('{name}') that is not zero")
        b.attn.scale = scale
        before, after = (torch.from_numpy(np.asarray(values[n], np.float32)) for n in b.act_probe)
        errors = {}
        with torch.no_grad():
            for act in ACTIVATIONS:
                got = _activation_layer(act)()(before)
                errors[act] = float(torch.linalg.vector_norm(got - after) / torch.linalg.vector_norm(after).clamp_min(1e-30))
        best = min(errors, key=errors.get)
        if errors[best] > ACTIVATION_TOLERANCE:
            raise refuse(f"block {i}: an MLP activation that is none of {', '.join(ACTIVATIONS)} (closest {best}, "
                         f"relative error {errors[best]:.2g})")
        b.act = best

def _transposed(spec: TwinSpec) -> set[str]:
    """Twin parameters whose graph tensor is the transpose (nn.Linear weights stored (in, out))."""
    out = set()
    for i, b in enumerate(spec.blocks):
        for role in ("qkv", "q", "k", "v", "proj"):
            lin = getattr(b.attn, role)
            if lin is not None and lin.transposed:
                out.add(f"blocks.{i}.attn.{role}.weight")
        for role, lin in (("fc1", b.fc1), ("fc2", b.fc2)):
            if lin.transposed:
                out.add(f"blocks.{i}.mlp.{role}.weight")
    if spec.head is not None and spec.head.transposed:
        out.add("head.0.weight" if spec.head_act else "head.weight")
    return out


# ---------------------------------------------------------------------------------------------
# Names and verification.


def rename_to_twin(model: ir.Model, spec: TwinSpec) -> dict[str, str]:
    """Rename the graph's initializers to the twin's parameter names and record transposed layouts;
    returns {twin name: original initializer name}."""
    graph = model.graph
    mapping = dict(spec.names)
    transposed = _transposed(spec)
    values = {name: graph.initializers[tensor] for name, tensor in mapping.items()}
    taken = {v.name: v for node in graph for v in node.outputs} | {v.name: v for v in graph.inputs}
    for name in mapping:  # a computed value already called like a parameter: rename it out of the way
        other = taken.get(name)
        if other is not None and not other.is_initializer():
            other.name = f"{name}__value"
    for k, value in enumerate(values.values()):
        value.name = f"__deploycomp_twin_{k}"
    for name, value in values.items():
        clash = graph.initializers.get(name)
        if clash is not None:
            clash.name = f"{name}__unused"
        value.name = name
        if name in transposed:
            value.metadata_props[TRANSPOSED_FROM] = "1,0"
        else:
            value.metadata_props.pop(TRANSPOSED_FROM, None)
    return mapping


def check_names(model: ir.Model, twin: nn.Module) -> None:
    """Every twin parameter reads back from the initializer of its name (the convention pruning's
    saliency, masks and ``copy_weights_to_graph`` rely on)."""
    for name, param in twin.named_parameters():
        value = model.graph.initializers.get(name)
        if value is None:
            raise DeployCompError(f"internal: twin parameter {name} has no initializer of that name")
        perm = value.metadata_props.get(TRANSPOSED_FROM)
        tensor = param.detach()
        if perm:
            tensor = tensor.permute(*[int(p) for p in perm.split(",")])
        if tuple(tensor.shape) != tuple(value.const_value.shape) or not np.array_equal(tensor.numpy(),
                                                                                       value.const_value.numpy()):
            raise DeployCompError(f"internal: twin parameter {name} does not read back from its initializer")


def check_twin(twin: nn.Module, reference: Callable[[np.ndarray], np.ndarray], input_shape: tuple[int, ...],
               seed: int = 2) -> float:
    """Relative L2 between the twin and the graph (``reference``) on two fresh random images."""
    import torch

    x = np.random.default_rng(seed).standard_normal((2, *input_shape[1:])).astype(np.float32)
    want = np.asarray(reference(x), np.float64)
    with torch.inference_mode():
        got = twin(torch.from_numpy(x)).numpy().astype(np.float64)
    if got.shape != want.shape:
        raise DeployCompError(f"the torch twin gives outputs of shape {got.shape}, the graph {want.shape}; "
                              "pruning and semantic tokens need it")
    rel = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    if not rel <= TWIN_TOLERANCE:
        raise DeployCompError(f"the torch twin built from this ONNX graph does not reproduce it (relative L2 "
                              f"{rel:.2e} > {TWIN_TOLERANCE:g}); pruning and semantic tokens need it")
    return rel


def fold_probed(model: ir.Model, spec: TwinSpec) -> int:
    """Write what the probe read into the graph: softmax scale factors an exporter computes from
    shapes become constants, and all-zero score terms (an exporter's all-pass mask) are dropped, so
    that the pruning and token rewrites read the scale as a constant (``softmax_scale``) and find no
    mask; returns the values replaced. The twin is verified against the input graph afterwards."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from ..ir.build import add_const

    values = {v.name: v for node in model.graph for v in node.outputs}
    count = 0
    for b in spec.blocks:
        for name in (n for n, _ in b.attn.scale_factors):
            if name in b.attn.probed and name in values:
                values[name].replace_all_uses_with(add_const(model.graph, f"{name}.probed", b.attn.probed[name]))
                count += 1
        for name in b.attn.zero_terms:
            term = values.get(name)
            for add in [n for n in term.consumers() if n.op_type == "Add"] if term is not None else ():
                other = add.inputs[1] if add.inputs[0] is term else add.inputs[0]
                add.outputs[0].replace_all_uses_with(other)
                count += 1
    if count:
        RemoveUnusedNodesPass()(model)
    return count


def with_torch_twin(src: "Source") -> "Source":
    """``src`` (a bare ONNX file) with its graph cleaned and renamed to, and its torch module set to,
    a verified torch twin; refuses in one line what the twin cannot express."""
    from ..passes.base import DEFAULT_INVARIANTS, CompileContext, Pipeline
    from ..passes.cleanup import CleanupPass
    from ..passes.discover import DiscoverPass
    from . import Source

    model = src.model
    opset = model.opset_imports.get("", 0)
    if opset < REWRITE_OPSET:
        import logging

        from onnxscript.version_converter import convert_version

        # its fallback to the onnx C API logs a warning on every use: not the user's business
        converter_log = logging.getLogger("onnxscript.version_converter")
        level = converter_log.level
        converter_log.setLevel(logging.ERROR)
        try:
            convert_version(model, REWRITE_OPSET, fallback=True)
        except Exception as exc:  # noqa: BLE001 - any converter failure: the graph stays unreadable to the rewrites
            raise refuse(f"opset {opset} (converting it to opset {REWRITE_OPSET} failed: "
                         f"{(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
        finally:
            converter_log.setLevel(level)
    def read() -> tuple["Structure", TwinSpec, int]:
        ctx = CompileContext()
        Pipeline([CleanupPass(), DiscoverPass()], DEFAULT_INVARIANTS)(model, ctx)
        spec = read_twin_spec(model, ctx.structure)
        probe(model, spec)
        return ctx.structure, spec, fold_probed(model, spec)

    structure, spec, folded = read()
    rebuilt = []
    if spec.attention_layout is not None:  # nn.MultiheadAttention: rebuilt in (batch, tokens, channels), read again
        rebuilt = rebuild_tokens_first_attention(model, spec, structure)
        structure, spec, _ = read()
        if spec.attention_layout is not None:
            raise refuse(f"attention in another layout ({spec.attention_layout}) after rebuilding it")
    from .twin_module import build_twin  # torch: only for a graph the twin can express

    twin = build_twin(model, spec)
    rel = check_twin(twin, src.reference, src.input_shape)
    names = rename_to_twin(model, spec)
    check_names(model, twin)
    meta = {"rel_l2": rel, "tolerance": TWIN_TOLERANCE, "blocks": len(spec.blocks), "opset": max(opset, REWRITE_OPSET),
            "activations": sorted({b.act for b in spec.blocks}), "pool": spec.pool,
            "softmax_scales": [round(b.attn.scale, 8) for b in spec.blocks], "attention_rebuilt": rebuilt,
            "values_folded": folded,
            "names": {k: v for k, v in names.items() if k != v}}
    return Source(src.name, structure.family, model, src.input_shape, src.reference, src.reference_kind, twin,
                  {**src.meta, "torch_twin": meta})
