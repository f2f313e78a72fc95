"""A pruning plan: which units of each structural group survive, and the initializer slicing it implies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..errors import DeployCompError
from ..ir.structure import Structure

if TYPE_CHECKING:
    from ..latency.arch import SwinArch, ViTArch


@dataclass
class PrunePlan:
    """``keep[group]`` = sorted unit indices kept; groups not named keep every unit."""

    keep: dict[str, np.ndarray] = field(default_factory=dict)

    def kept(self, structure: Structure, group: str) -> np.ndarray:
        units = structure.graph.nodes[group]["units"]
        kept = np.asarray(self.keep.get(group, np.arange(units)), dtype=np.int64)
        if kept.size == 0:
            raise DeployCompError(f"plan removes every unit of {group}")
        if np.any(np.diff(kept) <= 0) or kept[0] < 0 or kept[-1] >= units:
            raise DeployCompError(f"plan for {group} must list distinct units in 0..{units - 1} in increasing order")
        return kept

    def removed_indices(self, structure: Structure) -> dict[tuple[str, int], np.ndarray]:
        """(tensor, axis) -> indices to delete: the union over every group's removed units."""
        out: dict[tuple[str, int], set[int]] = {}
        for group in structure.groups():
            units = structure.graph.nodes[group]["units"]
            gone = np.setdiff1d(np.arange(units), self.kept(structure, group))
            for sl in structure.slices(group):
                key = (sl.tensor, sl.axis)
                out.setdefault(key, set()).update(int(i) for u in gone for i in sl.indices(int(u)))
        return {k: np.array(sorted(v), dtype=np.int64) for k, v in out.items() if v}


def slice_initializers(model: ir.Model, structure: Structure, plan: PrunePlan) -> int:
    """Delete the plan's indices from every coupled initializer in place (names kept); returns tensors changed."""
    changed = set()
    for (name, axis), indices in plan.removed_indices(structure).items():
        value = model.graph.initializers[name]
        array = np.delete(value.const_value.numpy(), indices, axis=axis)
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=name)
        value.shape = ir.Shape(array.shape)
        changed.add(name)
    if changed:
        clear_intermediate_shapes(model)
    return len(changed)


def clear_intermediate_shapes(model: ir.Model) -> None:
    """Forget the recorded shapes of computed values: after slicing they are stale, and a runtime
    that trusts them rejects the graph. Graph inputs/outputs and initializers keep theirs."""
    keep = {id(v) for v in (*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values())}
    for node in model.graph:
        for value in node.outputs:
            if id(value) not in keep:
                value.shape = None


def plan_arch(structure: Structure, plan: PrunePlan, *, img_size: int, patch: int, in_chans: int,
              num_classes: int, shifts: tuple[bool, ...] | None = None) -> ViTArch | SwinArch:
    """The architecture a plan leaves: a ``ViTArch`` for a single-stage ViT, a ``SwinArch`` for a
    multi-stage one (``shifts``: which blocks shift their windows, from the module; default timm's
    rule, odd blocks of a stage with several windows)."""
    from ..latency.arch import BlockArch, SwinArch, SwinStage, ViTArch

    def block(b) -> BlockArch:
        return BlockArch(*(len(plan.kept(structure, f"block{b.index}.{k}")) for k in ("heads", "qk", "v", "mlp")),
                         tokens=b.tokens)

    if len(structure.stage_embs) == 1:
        return ViTArch(len(plan.kept(structure, "stage0.emb")), tuple(block(b) for b in structure.blocks),
                       img_size=img_size, patch=patch, in_chans=in_chans, num_classes=num_classes)
    stages = []
    for s in range(len(structure.stage_embs)):
        blocks = [b for b in structure.blocks if b.stage == s]
        window, windows = _side(blocks[0].tokens), _side(blocks[0].sequences)
        stages.append(SwinStage(len(plan.kept(structure, f"stage{s}.emb")), windows * window, window,
                                tuple(block(b) for b in blocks),
                                tuple(bool(shifts[b.index]) for b in blocks) if shifts is not None else ()))
    return SwinArch(tuple(stages), img_size=img_size, patch=patch, in_chans=in_chans, num_classes=num_classes)


def _side(square: int) -> int:
    side = int(round(square**0.5))
    if side * side != square:
        raise DeployCompError(f"a Swin stage with {square} tokens or windows per side² is not a square grid")
    return side
