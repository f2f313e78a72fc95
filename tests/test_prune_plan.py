"""Pruning plans on the ONNX graph: removing MLP units whose weights are zero leaves the outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from deploycomp.backends.base import get_backend
from deploycomp.errors import DeployCompError
from deploycomp.frontend.export import export_to_onnx
from deploycomp.passes.base import CompileContext, Pipeline
from deploycomp.passes.cleanup import CleanupPass
from deploycomp.passes.discover import DiscoverPass
from deploycomp.passes.verify import relative_l2
from deploycomp.pruning.plan import PrunePlan, slice_initializers

from .conftest import input_shape, tiny_module


def cleaned(family: str):
    model = export_to_onnx(tiny_module(family), input_shape(family), 18)
    ctx = CompileContext(family=family)
    return Pipeline([CleanupPass(), DiscoverPass()])(model, ctx), ctx.structure


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return get_backend("ort-cpu").runner(ir.serde.serialize_model(model).SerializeToString())(x)


@pytest.mark.parametrize("family", ["deit", pytest.param("swin", marks=pytest.mark.slow)])
def test_removing_zeroed_mlp_units_leaves_outputs_unchanged(family):
    model, structure = cleaned(family)
    rng = np.random.default_rng(0)
    plan = PrunePlan()
    for group in structure.groups("mlp"):
        units = structure.graph.nodes[group]["units"]
        plan.keep[group] = np.sort(rng.choice(units, size=units // 2, replace=False))
    # Zero every coupled slice of the removed units: the reference the pruned graph must reproduce.
    for (name, axis), indices in plan.removed_indices(structure).items():
        value = model.graph.initializers[name]
        array = value.const_value.numpy().copy()
        index = [slice(None)] * array.ndim
        index[axis] = indices
        array[tuple(index)] = 0.0
        value.const_value = ir.tensor(array, name=name)
    x = rng.standard_normal((2, *input_shape(family)[1:])).astype(np.float32)
    before = run(model, x)
    changed = slice_initializers(model, structure, plan)
    assert changed == 3 * len(structure.blocks)  # fc1 weight and bias, fc2 weight
    for group in structure.groups("mlp"):
        for sl in structure.slices(group):
            assert model.graph.initializers[sl.tensor].const_value.shape[sl.axis] == len(plan.keep[group]), sl
    after = run(model, x)
    assert relative_l2(after, before) <= 1e-5


def test_plan_refuses_bad_unit_lists():
    _, structure = cleaned("deit")
    group = structure.groups("heads")[0]
    for keep in ([], [2, 1], [0, 0], [0, 99]):
        with pytest.raises(DeployCompError, match=group):
            PrunePlan({group: np.array(keep, dtype=np.int64)}).removed_indices(structure)
