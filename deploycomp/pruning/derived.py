"""Graph constants computed from torch parameters, linked back to the parameters.

Cleanup folds Swin's relative-position bias — ``table[index]`` viewed as ``(N, N, H)`` and
permuted to ``(1, H, N, N)`` — into one initializer per block, so the graph holds no tensor named
``relative_position_bias_table``. Pruning needs the link both ways: the heads group slices the
folded bias in the graph (head axis third from last), while saliency and masks act on the torch
parameter (column h of the table ``[(2W-1)², H]`` is head h; the index addresses relative
positions, not heads, and is never sliced); and after training, the folded bias must be recomputed
from the trained table before the graph is rewritten.

The link is found once per graph (:func:`link_relative_position_biases`): block i of the graph is
the i-th window attention of the module, and the folded initializer among the block's score terms
must equal the bias computed from its table exactly. It is stored on the initializer as metadata
(``deploycomp.derived_from`` = the attention module's path), like the transposed-parameter mark,
so it survives serialization and is read back without the structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from ..errors import DeployCompError
from ..ir.discover import find_attention
from ..ir.structure import Structure
from ..passes.cleanup import TRANSPOSED_FROM

DERIVED_FROM = "deploycomp.derived_from"
TABLE = "relative_position_bias_table"


def window_attentions(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules with a relative-position bias table and index (timm's Swin ``WindowAttention``,
    and anything shaped like it), in module order, which is execution order for timm's Swin."""
    return [(name, m) for name, m in module.named_modules()
            if isinstance(getattr(m, TABLE, None), nn.Parameter) and hasattr(m, "relative_position_index")]


def relative_position_bias(attention: nn.Module) -> torch.Tensor:
    """``(H, N, N)``: the bias the attention adds to its scores, from its table and index."""
    index = attention.relative_position_index
    n = index.shape[0]
    return attention.relative_position_bias_table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


def link_relative_position_biases(module: nn.Module, model: ir.Model, structure: Structure) -> int:
    """Mark every block's folded bias with the attention module it is computed from; returns how
    many are linked (0 for a model without window attention). Idempotent: a marked tensor is not
    checked again (its values may since have been trained in the module)."""
    attentions = window_attentions(module)
    if not attentions:
        return 0
    if len(attentions) != len(structure.blocks):
        raise DeployCompError(f"the module has {len(attentions)} window attentions, the graph {len(structure.blocks)} "
                              f"blocks: cannot link the relative-position biases")
    softmax = {n.name: n for n in model.graph if n.op_type == "Softmax"}
    linked = 0
    for block, (path, attention) in zip(structure.blocks, attentions):
        a = find_attention(softmax[block.nodes["softmax"]]) if block.nodes.get("softmax") in softmax else None
        if a is None:
            raise DeployCompError(f"block {block.index}: attention not readable to link its position bias")
        if any(t.name == f"{path}.{TABLE}" for t in a.score_tables):
            continue  # not folded: the table itself is in the graph under its parameter name
        if any(t.metadata_props.get(DERIVED_FROM) == path for t in a.score_terms):
            linked += 1
            continue
        with torch.no_grad():
            bias = relative_position_bias(attention).detach().cpu().numpy()
        match = [t for t in a.score_terms if t.const_value.size == bias.size
                 and tuple(t.const_value.shape)[-2:] == bias.shape[-2:]
                 and np.array_equal(t.const_value.numpy().reshape(bias.shape), bias)]
        if len(match) != 1:
            raise DeployCompError(f"block {block.index}: {len(match)} constants of the graph equal the relative-position "
                                  f"bias of '{path}' (expected exactly one)")
        match[0].metadata_props[DERIVED_FROM] = path
        linked += 1
    return linked


@dataclass(frozen=True)
class TorchSlice:
    """Where a graph tensor's axis lives in the torch module: parameter name, its axis in torch
    layout, and the permutation from torch layout to the graph's (None: same layout)."""

    parameter: str
    axis: int
    perm: tuple[int, ...] | None


def torch_slice(model: ir.Model, tensor: str, axis: int) -> TorchSlice:
    """The torch side of axis ``axis`` of graph initializer ``tensor``: a folded transpose maps
    the axis through its permutation; a linked bias maps its head axis to the table's columns."""
    value = model.graph.initializers[tensor]
    path = value.metadata_props.get(DERIVED_FROM)
    if path is not None:
        head_axis = len(value.const_value.shape) - 3
        if axis != head_axis:
            raise DeployCompError(f"'{tensor}' (the relative-position bias of '{path}') is sliced on axis {axis}; "
                                  f"only its head axis {head_axis} maps to the table")
        return TorchSlice(f"{path}.{TABLE}", 1, None)
    perm = value.metadata_props.get(TRANSPOSED_FROM)
    perm = tuple(int(p) for p in perm.split(",")) if perm else None
    return TorchSlice(tensor, perm[axis] if perm is not None else axis, perm)


def refresh_derived(module: nn.Module, model: ir.Model) -> int:
    """Recompute every linked bias of the graph from the module's current table; returns how many."""
    count = 0
    for name, value in model.graph.initializers.items():
        path = value.metadata_props.get(DERIVED_FROM)
        if path is None:
            continue
        with torch.no_grad():
            bias = relative_position_bias(module.get_submodule(path)).detach().cpu().numpy()
        shape = tuple(value.const_value.shape)
        if bias.size != int(np.prod(shape)):
            raise DeployCompError(f"the relative-position bias of '{path}' {bias.shape} does not fit '{name}' {shape}")
        array = np.ascontiguousarray(bias.reshape(shape).astype(value.const_value.numpy().dtype))
        value.const_value = ir.tensor(array, name=name)
        count += 1
    return count
