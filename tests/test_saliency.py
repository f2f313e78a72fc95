"""NViT saliency: a unit's sum of g*w over its coupled slices is the derivative of the loss w.r.t. a gate on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from deploycomp.frontend.export import export_to_onnx
from deploycomp.passes.base import CompileContext, Pipeline
from deploycomp.passes.cleanup import CleanupPass
from deploycomp.passes.discover import DiscoverPass
from deploycomp.pruning.saliency import compute_saliency, parameter_slices

from .conftest import input_shape, tiny_module


@pytest.fixture(scope="module")
def deit():
    module = tiny_module("deit").double()
    model = export_to_onnx(tiny_module("deit"), input_shape("deit"), 18)
    ctx = CompileContext(family="deit")
    model = Pipeline([CleanupPass(), DiscoverPass()])(model, ctx)
    return module, model, ctx.structure


def check_unit_sums(module, structure, slices, x, y) -> int:
    """Saliency's per-unit sums equal the gate derivative of two random units of every group
    (the module's gradients must already hold ``x, y``); returns how many units were checked."""
    rng = np.random.default_rng(0)
    checked = 0
    for group in structure.groups():
        units = structure.graph.nodes[group]["units"]
        sums = sum(item.unit_sums() for item in slices[group])
        for unit in rng.choice(units, size=min(2, units), replace=False):
            expected = gate_derivative(module, slices[group], int(unit), x, y)
            assert float(sums[unit]) == pytest.approx(expected, rel=1e-6, abs=1e-12), (group, unit)
            checked += 1
    return checked


def gate_derivative(module, slices, unit, x, y):
    """d loss / d alpha at alpha = 1, where alpha scales every coupled slice of the unit."""
    alpha = torch.ones((), dtype=torch.float64, requires_grad=True)
    params = {n: p.detach() for n, p in module.named_parameters()}
    masks: dict[str, torch.Tensor] = {}
    for item in slices:
        name = next(n for n, p in module.named_parameters() if p is item.parameter)
        shape = item.parameter.shape if item.perm is None else tuple(item.parameter.shape[i] for i in item.perm)
        mask = masks.get(name)
        mask = torch.zeros(shape, dtype=torch.float64) if mask is None else mask
        index = [slice(None)] * len(shape)
        index[item.slice.axis] = torch.as_tensor(item.slice.indices(unit))
        mask[tuple(index)] = 1.0
        masks[name] = mask
    perms = {next(n for n, p in module.named_parameters() if p is item.parameter): item.perm for item in slices}
    for name, mask in masks.items():  # once per tensor: a fused qkv weight carries three slices of a head
        if perms[name] is not None:
            mask = mask.permute(tuple(np.argsort(perms[name])))
        params[name] = params[name] * (1 + (alpha - 1) * mask)
    loss = torch.nn.functional.cross_entropy(functional_call(module, params, (x,)), y)
    (grad,) = torch.autograd.grad(loss, alpha)
    return float(grad)


def test_unit_sums_are_gate_derivatives(deit):
    module, model, structure = deit
    torch.manual_seed(0)
    x = torch.randn(3, *input_shape("deit")[1:], dtype=torch.float64)
    y = torch.randint(0, 1000, (3,))
    slices = parameter_slices(structure, model, module)
    module.zero_grad()
    torch.nn.functional.cross_entropy(module(x), y).backward()
    kinds = {structure.graph.nodes[g]["kind"] for g in structure.groups()}
    assert kinds == {"emb", "heads", "qk", "v", "mlp"}
    checked = check_unit_sums(module, structure, slices, x, y)
    assert checked >= 2 * len(structure.groups()) - 1


def test_saliency_is_the_mean_of_squared_scaled_sums(deit):
    module, model, structure = deit
    torch.manual_seed(1)
    batches = [(torch.randn(2, *input_shape("deit")[1:], dtype=torch.float64), torch.randint(0, 1000, (2,)))
               for _ in range(2)]
    loss = torch.nn.functional.cross_entropy
    sal = compute_saliency(module, structure, model, batches, loss)
    slices = parameter_slices(structure, model, module)
    per_batch = []
    for x, y in batches:
        module.zero_grad()
        loss(module(x), y).backward()
        per_batch.append({g: sum(i.unit_sums() for i in slices[g]) for g in slices})
    module.zero_grad(set_to_none=True)
    for group, value in sal.items():
        kind = structure.graph.nodes[group]["kind"]
        div = {"emb": 2.0, "heads": 12.0, "qk": 2.0, "v": 2.0, "mlp": 1.0}[kind]  # 2 blocks share the EMB
        expected = np.mean([(b[group].numpy() / div) ** 2 for b in per_batch], axis=0)
        assert np.allclose(value, expected, rtol=1e-9), group
        assert value.shape == (structure.graph.nodes[group]["units"],) and (value > 0).all()
