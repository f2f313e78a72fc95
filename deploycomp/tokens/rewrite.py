"""Rewrite a DeiT graph to STViT's semantic tokens (see ``stvit.py`` for the method).

The generator reuses blocks ``layer`` and ``layer + 1`` in place: their LayerNorms, projections,
MLPs and residual Adds stay; what changes is where queries and keys come from. Each gets a
``deploycomp::TokenCluster`` node (queries = centres, keys/values = tokens) instead of its
self-attention, and its residual Add adds the centres instead of the tokens. Later blocks then
see the prefix tokens (cls and/or registers, none for a GAP ViT) + s² tokens; a GAP head's mean
over the tokens after the prefix needs no change (it reads no token count), so it averages the
semantic tokens; their attention is rebuilt in the canonical, token-count-free form (the
exporter may have written the token count into its Reshape constants). Pooling is built from
standard ops: adaptive max pooling as row and column Slice/ReduceMax (bins as torch computes
them), adaptive average pooling as one MatMul with a pooling matrix.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ..errors import DeployCompError
from ..ir.build import ChainBuilder
from ..ir.discover import Attention, find_attention, trace_to_layernorm
from ..ir.structure import BlockStructure, Structure
from ..pruning.plan import clear_intermediate_shapes
from ..pruning.rewrite import AttentionCore, project, rebuild_attention
from .op import DOMAIN, VERSION, token_cluster_node
from .stvit import SemanticTokenConfig

INT64_MAX = np.iinfo(np.int64).max


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """The [start, end) input range of each adaptive-pooling output (torch's rule)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def pooling_matrix(grid: int, side: int) -> np.ndarray:
    """(side², grid²) averaging weights of adaptive average pooling over a grid×grid patch grid."""
    rows = np.zeros((side, grid), np.float32)
    for i, (a, b) in enumerate(adaptive_bins(grid, side)):
        rows[i, a:b] = 1.0 / (b - a)
    return np.kron(rows, rows)


def _block_parts(model: ir.Model, b: BlockStructure) -> tuple[Attention, ir.Node, ir.Node]:
    """(attention, LayerNorm before it, residual Add after it) of a DeiT block."""
    softmax = next(n for n in model.graph if n.name == b.nodes["softmax"])
    a = find_attention(softmax)
    if a is None:
        raise DeployCompError(f"block {b.index}: attention no longer readable")
    if a.score_terms or a.score_tables or b.sequences > 1:
        raise DeployCompError(f"block {b.index}: semantic tokens need plain global attention (no windows or "
                              "position bias): DeiT-style ViTs only")
    ln = trace_to_layernorm(a.q[0].node.inputs[0])
    if ln is None:
        raise DeployCompError(f"block {b.index}: no LayerNorm before the attention")
    adds = [n for n in ln.inputs[0].consumers() if n.op_type == "Add"]
    if len(adds) != 1:
        raise DeployCompError(f"block {b.index}: cannot find the residual Add of the attention")
    return a, ln, adds[0]


def _layernorm_on(b: ChainBuilder, ln: ir.Node, x: ir.Value) -> ir.Value:
    """The same LayerNorm (same scale, bias, axis, epsilon) applied to another tensor."""
    attrs = {k: v.value for k, v in ln.attributes.items()}
    return b.op("LayerNormalization", x, *ln.inputs[1:], **attrs)


def _pool(b: ChainBuilder, patches: ir.Value, grid: int, emb: int, config: SemanticTokenConfig) -> ir.Value:
    side = config.side
    if config.pooling == "avg":
        return b.op("MatMul", b.const("pool_matrix", pooling_matrix(grid, side)), patches)
    x = b.op("Reshape", patches, b.const("grid_shape", np.array([0, grid, grid, emb], np.int64)))
    for axis in (1, 2):  # rows, then columns: a max over a rectangle is separable
        parts = []
        for i, (lo, hi) in enumerate(adaptive_bins(grid, side)):
            part = b.op("Slice", x, b.const(f"a{axis}_{i}_start", np.array([lo], np.int64)),
                        b.const(f"a{axis}_{i}_end", np.array([hi], np.int64)), b.const(f"axis{axis}", np.array([axis], np.int64)))
            parts.append(b.op("ReduceMax", part, b.const(f"reduce_axis{axis}", np.array([axis], np.int64)), keepdims=1))
        x = b.op("Concat", *parts, axis=axis)
    return b.op("Reshape", x, b.const("centres_shape", np.array([0, side * side, emb], np.int64)))


def _cluster(b: ChainBuilder, a: Attention, blk: BlockStructure, queries: ir.Value, keys: ir.Value) -> ir.Value:
    """TokenCluster of the block's projections: queries from ``queries``, keys/values from ``keys``
    (both already layer-normed)."""
    core = AttentionCore.of(a, blk)
    parts = core.projections()
    q = project(b, queries, "q", parts["q"])
    k, v = project(b, keys, "k", parts["k"]), project(b, keys, "v", parts["v"])
    return token_cluster_node(b, q, k, v, blk.heads, core.scale)


def rewrite_semantic_tokens(model: ir.Model, structure: Structure, config: SemanticTokenConfig) -> dict:
    """Rewrite ``model`` in place; returns what changed. The graph then holds TokenCluster nodes
    (domain ``deploycomp``): lower them (``op.lower``) for a backend without the op."""
    if any(b.keys or "fused_attention" in b.nodes for b in structure.blocks):
        raise DeployCompError("the graph already has semantic tokens (cross-attention): rewrite the source model")
    if len(structure.stage_embs) != 1 or any(b.sequences != 1 for b in structure.blocks):
        raise DeployCompError("semantic tokens support DeiT-style ViTs (one token sequence, one stage); "
                              "Swin (per-window semantic tokens) is not supported yet")
    k = config.layer
    if k + 2 > len(structure.blocks):
        raise DeployCompError(f"the generator needs blocks {k + 1}-{k + 2}; the model has {len(structure.blocks)}")
    first, second = structure.blocks[k], structure.blocks[k + 1]
    prefix = config.prefix_tokens
    patches = first.tokens - prefix
    grid = math.isqrt(max(patches, 0))
    if grid * grid != patches or config.side > grid:
        raise DeployCompError(f"block {k + 1} sees {first.tokens} tokens: not {prefix} prefix tokens + a square patch "
                              f"grid that can be pooled to {config.side}x{config.side}")
    graph, emb = model.graph, first.emb
    a1, ln1, add1 = _block_parts(model, first)
    a2, ln2, _ = _block_parts(model, second)
    later = [(blk, _block_parts(model, blk)[0]) for blk in structure.blocks[k + 2:]]
    tokens = ln1.inputs[0]  # X: what enters the generator

    b = ChainBuilder(graph, f"semantic_tokens.block{k}")
    rest = tokens if not prefix else \
        b.op("Slice", tokens, b.const("patch_start", np.array([prefix], np.int64)),
             b.const("patch_end", np.array([INT64_MAX], np.int64)), b.const("axis1", np.array([1], np.int64)))
    centres = _pool(b, rest, grid, emb, config)
    if prefix:  # the cls token / registers stay queries of their own
        head = b.op("Slice", tokens, b.const("prefix_start", np.array([0], np.int64)),
                    b.const("prefix_end", np.array([prefix], np.int64)), b.const("axis1", np.array([1], np.int64)))
        centres = b.op("Concat", head, centres, axis=1)
    ctx = _cluster(b, a1, first, _layernorm_on(b, ln1, centres), ln1.outputs[0])
    b.insert_before(a1.out.node)
    a1.out.node.replace_input_with(0, ctx)
    add1.replace_input_with(list(add1.inputs).index(tokens), centres)

    s1 = ln2.inputs[0]
    b = ChainBuilder(graph, f"semantic_tokens.block{k + 1}")
    keys = _layernorm_on(b, ln2, b.op("Concat", s1, tokens, axis=1))
    ctx = _cluster(b, a2, second, ln2.outputs[0], keys)
    b.insert_before(a2.out.node)
    a2.out.node.replace_input_with(0, ctx)

    for blk, a in later:  # token-count-free attention for the blocks on prefix + s² tokens
        rebuild_attention(model, AttentionCore.of(a, blk))

    RemoveUnusedNodesPass()(model)
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
    clear_intermediate_shapes(model)
    model.opset_imports[DOMAIN] = VERSION
    return {"generator_blocks": [k, k + 1], "semantic_tokens": config.tokens, "tokens_after": config.tokens_after,
            "prefix_tokens": prefix, "tokens_before": first.tokens, "pooling": config.pooling, "attention_rebuilt": [blk.index for blk, _ in later]}
