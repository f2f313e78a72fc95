"""The torch side of a pruning plan: the source module with the plan's units masked to zero.

Iterative pruning trains between steps, so it needs a model of the current architecture that
still has the source's parameter names (saliency maps ONNX initializers to torch parameters by
name). Masking gives exactly that: every coupled slice of a removed unit is zero and stays zero
after each optimizer step, which makes the module compute what the sliced graph computes —
except for LayerNorm, whose statistics would still count removed embedding channels. The
embedding's LayerNorms are therefore replaced by :class:`MaskedLayerNorm`, which normalizes
over the kept channels only (the same parameters, so names and state dicts do not change); Swin's
patch-merging LayerNorm over four neighbours' channels keeps a stage's channel in all four slots.
Swin's relative-position bias is folded into a graph constant; its table is the parameter that
is masked (``derived.py``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from ..errors import DeployCompError
from ..ir.structure import Structure
from ..passes.cleanup import TRANSPOSED_FROM
from .derived import link_relative_position_biases, refresh_derived, torch_slice
from .plan import PrunePlan


class MaskedLayerNorm(nn.Module):
    """LayerNorm over the channels where ``keep`` is 1; removed channels output 0."""

    def __init__(self, norm: nn.LayerNorm | "MaskedLayerNorm", keep: torch.Tensor):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.register_buffer("keep", keep.to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = self.keep.sum()
        mean = (x * self.keep).sum(-1, keepdim=True) / count
        centred = (x - mean) * self.keep
        var = (centred * centred).sum(-1, keepdim=True) / count
        y = centred * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


def _perm(model: ir.Model, name: str) -> tuple[int, ...] | None:
    perm = model.graph.initializers[name].metadata_props.get(TRANSPOSED_FROM)
    return tuple(int(p) for p in perm.split(",")) if perm else None


class PlanMasks:
    """Zero masks (in torch layout) for every parameter a plan touches, and the masked LayerNorms."""

    def __init__(self, module: nn.Module, model: ir.Model, structure: Structure, plan: PrunePlan):
        self.module = module
        params = dict(module.named_parameters())
        self.masks: dict[str, torch.Tensor] = {}
        link_relative_position_biases(module, model, structure)  # Swin: folded biases -> their tables
        for (tensor, axis), indices in plan.removed_indices(structure).items():
            where = torch_slice(model, tensor, axis)
            name = where.parameter
            if name not in params:
                raise DeployCompError(f"the plan removes slices of '{name}', which is not a parameter of the module")
            mask = self.masks.setdefault(name, torch.ones_like(params[name], dtype=torch.bool))
            index = [slice(None)] * mask.dim()
            index[where.axis] = torch.as_tensor(indices)
            mask[tuple(index)] = False
        self.emb_keep = {}
        for s, emb in enumerate(structure.stage_embs):
            keep = np.zeros(emb, dtype=bool)
            keep[plan.kept(structure, f"stage{s}.emb")] = True
            self.emb_keep[s] = keep
        self._norm_stage = {sl.tensor: structure.graph.nodes[g].get("stage", 0)
                            for g in structure.groups("emb") for sl in structure.slices(g)}

    def apply(self) -> None:
        """Zero the removed slices (call after every optimizer step) and mask the LayerNorm statistics."""
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, mask in self.masks.items():
                params[name].mul_(mask)
        self._mask_layernorms()

    def _mask_layernorms(self) -> None:
        for name, norm in list(self.module.named_modules()):
            if not isinstance(norm, (nn.LayerNorm, MaskedLayerNorm)) or norm.weight is None:
                continue
            stage = self._norm_stage.get(f"{name}.weight")
            if stage is None:
                continue
            keep = self.emb_keep[stage]
            if keep.all() and isinstance(norm, nn.LayerNorm):
                continue
            width = norm.weight.shape[-1]
            if width % keep.size:
                raise DeployCompError(f"LayerNorm '{name}' of width {width} does not fit its stage's embedding "
                                      f"width {keep.size}")
            # patch merging normalizes the 2x2 neighbours' channels concatenated, slot-major (slot · C + c):
            # channel c is kept in every slot
            keep = np.tile(keep, width // keep.size)
            parent = self.module.get_submodule(name.rpartition(".")[0]) if "." in name else self.module
            setattr(parent, name.rpartition(".")[2], MaskedLayerNorm(norm, torch.from_numpy(keep)))


def copy_weights_to_graph(module: nn.Module, model: ir.Model) -> int:
    """Write the module's current parameters into the graph's initializers of the same names
    (undoing nothing: a folded transpose is re-applied), and recompute the constants folded from
    them (Swin's relative-position biases, once linked). The module is the single source of truth."""
    count = 0
    for name, param in module.named_parameters():
        value = model.graph.initializers.get(name)
        if value is None:
            continue
        array = param.detach().cpu()
        perm = _perm(model, name)
        if perm is not None:
            array = array.permute(perm)
        array = np.ascontiguousarray(array.numpy())
        if tuple(array.shape) != tuple(value.const_value.shape):
            raise DeployCompError(f"parameter {name} {tuple(array.shape)} does not fit initializer {tuple(value.const_value.shape)}")
        value.const_value = ir.tensor(array, name=name)
        count += 1
    return count + refresh_derived(module, model)
