"""NViT's Hessian-aware saliency of every structural unit, from torch gradients.

For a unit S of a group (one head, one QK channel of every head, one V channel, one MLP neuron,
one embedding channel), NViT's importance collapses to ``(sum_{s in S} g_s * w_s)^2``: the
products of gradient and weight summed over *every* coupled tensor slice of the unit, then
squared, per batch, and averaged over batches. That sum is exactly the derivative of the loss
with respect to a gate scaling all of the unit's weights at 1 (tested), which is why a unit's
coupled slices must be complete.

The gradients come from the torch module the graph was exported from: the cleanup pass keeps the
torch parameter names on the ONNX initializers (and records a folded transpose), so a
:class:`~deploycomp.ir.structure.ChannelSlice` of an initializer maps to the parameter directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import numpy as np
import onnx_ir as ir
import torch

from ..errors import DeployCompError
from ..ir.structure import ChannelSlice, Structure
from .config import NVIT_DIVISORS, SALIENCY_NORMS, UNIT_DIVISORS  # noqa: F401  (per-kind divisors, imported from here too)
from .derived import link_relative_position_biases, torch_slice


@dataclass
class ParameterSlice:
    """A coupled slice read from a torch parameter: ``perm`` maps torch layout to the ONNX tensor's."""

    parameter: torch.nn.Parameter
    perm: tuple[int, ...] | None
    slice: ChannelSlice
    units: int

    def __post_init__(self) -> None:
        self.index = torch.as_tensor(np.stack([self.slice.indices(u) for u in range(self.units)]))

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of ``values`` (a tensor in the parameter's torch layout) over each unit's slice -> [units]."""
        if self.perm is not None:
            values = values.permute(self.perm)
        axis = self.slice.axis
        per_index = values.sum(dim=[d for d in range(values.dim()) if d != axis]) if values.dim() > 1 else values
        return per_index[self.index].sum(dim=1)

    def unit_sums(self) -> torch.Tensor:
        """sum(g * w) over the slice's indices of each unit -> [units]."""
        return self.per_unit(self.parameter.grad * self.parameter.detach())


def parameter_slices(structure: Structure, model: ir.Model, module: torch.nn.Module) -> dict[str, list[ParameterSlice]]:
    """Every group's coupled slices as torch parameter slices; a slice without a parameter is an error."""
    params = dict(module.named_parameters())
    link_relative_position_biases(module, model, structure)  # Swin: a head's bias is its table column
    out: dict[str, list[ParameterSlice]] = {}
    for group in structure.groups():
        units = structure.graph.nodes[group]["units"]
        items = []
        for sl in structure.slices(group):
            where = torch_slice(model, sl.tensor, sl.axis)
            if where.parameter not in params:
                raise DeployCompError(f"saliency of {group} needs the gradient of '{where.parameter}', which is not a "
                                      f"parameter of the torch model (a constant folded from several parameters?)")
            if where.parameter != sl.tensor:  # a folded constant: the same units on the parameter's axis
                sl = replace(sl, tensor=where.parameter, axis=where.axis)
            items.append(ParameterSlice(params[where.parameter], where.perm, sl, units))
        out[group] = items
    return out


@dataclass
class SaliencyAccumulator:
    """Accumulates per-unit ``(sum g*w / divisor)^2`` over batches; ``mean()`` is NViT's importance."""

    structure: Structure
    slices: dict[str, list[ParameterSlice]]
    divisors: dict[str, float | None] = field(default_factory=lambda: dict(NVIT_DIVISORS))
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0

    def divisor(self, group: str) -> float:
        data = self.structure.graph.nodes[group]
        value = self.divisors.get(data["kind"], 1.0)
        if value is None:  # a shared embedding: the number of blocks that read it
            value = float(sum(1 for b in self.structure.blocks if b.stage == data.get("stage", 0)))
        return float(value)

    def add_batch(self) -> None:
        """Read the gradients of the last backward pass."""
        for group, items in self.slices.items():
            total = sum(item.unit_sums() for item in items)
            score = (total.double() / self.divisor(group)) ** 2
            self.sums[group] = self.sums.get(group, 0) + score
        self.batches += 1

    def mean(self) -> dict[str, np.ndarray]:
        if not self.batches:
            raise DeployCompError("no calibration batches were run")
        return {g: (s / self.batches).numpy() for g, s in self.sums.items()}


def compute_saliency(module: torch.nn.Module, structure: Structure, model: ir.Model,
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     divisors: dict[str, float | None] | None = None) -> dict[str, np.ndarray]:
    """Per-unit importance of every group over ``batches`` of (input, target)."""
    acc = SaliencyAccumulator(structure, parameter_slices(structure, model, module),
                              dict(divisors) if divisors is not None else dict(NVIT_DIVISORS))
    was_training = module.training
    module.eval()  # no dropout / drop-path noise in the criterion
    try:
        for x, target in batches:
            module.zero_grad(set_to_none=False)
            loss_fn(module(x), target).backward()
            acc.add_batch()
    finally:
        module.train(was_training)
        module.zero_grad(set_to_none=True)
    return acc.mean()


def magnitude_importance(module: torch.nn.Module, structure: Structure, model: ir.Model) -> dict[str, np.ndarray]:
    """The magnitude (L1) baseline: mean |w| over every coupled slice of each unit (mean, not sum,
    so that units of groups with many coupled weights, such as EMB, rank on the same scale)."""
    out = {}
    with torch.no_grad():
        for group, items in parameter_slices(structure, model, module).items():
            total, count = 0, 0
            for item in items:
                total = total + item.per_unit(item.parameter.detach().abs()).double()
                count += item.index.shape[1] * (item.parameter.numel() // item.parameter.shape[
                    item.perm[item.slice.axis] if item.perm is not None else item.slice.axis])
            out[group] = (total / count).numpy()
    return out
