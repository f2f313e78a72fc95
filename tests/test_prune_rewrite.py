"""The pruning rewrite on the ONNX graph, checked three ways.

1. Removing units whose weights are exactly zero leaves the outputs unchanged (every group kind,
   heads / QK / V / MLP / EMB at once; for EMB the reference normalizes over the kept channels,
   which is what the masked torch model computes).
2. The same plan applied to the torch model (sliced into a FlexViT) and exported gives the same
   outputs as the rewritten graph, and its re-discovered structure has the plan's dims.
3. Stale shape constants cannot hide: the rewritten graph runs at several batch sizes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from deploycomp.backends.base import get_backend
from deploycomp.frontend.export import export_to_onnx
from deploycomp.ir.discover import discover
from deploycomp.passes.base import CompileContext, Pipeline
from deploycomp.passes.cleanup import CleanupPass
from deploycomp.passes.discover import DiscoverPass
from deploycomp.passes.verify import relative_l2
from deploycomp.pruning.masks import PlanMasks, copy_weights_to_graph
from deploycomp.pruning.plan import plan_arch
from deploycomp.pruning.rewrite import prune_graph
from deploycomp.pruning.torch_prune import flexvit_from_timm

from .conftest import input_shape, tiny_module
from .models import random_plan


def cleaned(module, family: str):
    model = export_to_onnx(module, input_shape(family), 18)
    ctx = CompileContext(family=family)
    return Pipeline([CleanupPass(), DiscoverPass()])(model, ctx), ctx.structure


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return get_backend("ort-cpu").runner(ir.serde.serialize_model(model).SerializeToString())(x)




def test_removing_zeroed_units_of_every_kind_leaves_outputs_unchanged():
    module = tiny_module("deit")
    model, structure = cleaned(module, "deit")
    rng = np.random.default_rng(0)
    plan = random_plan(structure, rng)
    masks = PlanMasks(module, model, structure, plan)
    masks.apply()  # zero the removed slices; LayerNorms normalize over the kept channels
    copy_weights_to_graph(module, model)
    x = rng.standard_normal((3, *input_shape("deit")[1:])).astype(np.float32)
    with torch.no_grad():
        reference = module(torch.from_numpy(x)).numpy()
    info = prune_graph(model, structure, plan)
    assert info["attention_rebuilt"] == [0, 1] and info["stem_constants"] >= 1
    assert relative_l2(run(model, x), reference) <= 1e-5
    assert relative_l2(run(model, x[:1]), reference[:1]) <= 1e-5

    found = discover(model)  # no stale heads / head dims: the graph reads as the plan's architecture
    for b in found.blocks:
        assert (b.emb, b.heads, b.qk_dim, b.v_dim, b.mlp_dim) == (
            len(plan.keep["stage0.emb"]), *(len(plan.keep[f"block{b.index}.{k}"]) for k in ("heads", "qk", "v", "mlp")))
    assert not found.blocks[0].fused_qkv


@pytest.mark.slow  # the control of the every-kind test above (~2 s)
def test_zeroing_is_what_removal_means():
    """Control: with the units *not* zeroed, removing them does change the outputs."""
    module = tiny_module("deit")
    model, structure = cleaned(module, "deit")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *input_shape("deit")[1:])).astype(np.float32)
    before = run(model, x)
    prune_graph(model, structure, random_plan(structure, rng, kinds=("heads",)))
    assert relative_l2(run(model, x), before) > 1e-3


@pytest.mark.slow  # two exports (~3.5 s)
def test_same_plan_on_torch_model_exports_to_the_same_outputs():
    module = tiny_module("deit", seed=3)
    model, structure = cleaned(module, "deit")
    rng = np.random.default_rng(2)
    plan = random_plan(structure, rng)
    arch = plan_arch(structure, plan, img_size=32, patch=8, in_chans=3, num_classes=1000)
    flex = flexvit_from_timm(module, structure, plan, arch)
    exported, _ = cleaned(flex, "deit")
    prune_graph(model, structure, plan)
    x = rng.standard_normal((2, *input_shape("deit")[1:])).astype(np.float32)
    with torch.no_grad():
        torch_out = flex(torch.from_numpy(x)).numpy()
    assert relative_l2(run(exported, x), torch_out) <= 1e-5
    assert relative_l2(run(model, x), torch_out) <= 1e-5


@pytest.mark.slow
def test_swin_prunes_mlp():
    """MLP units of a Swin (windowed attention, patch merging) whose weights are zero: removing
    them leaves the outputs unchanged. Windowed heads/QK/V and per-stage embeddings:
    tests/test_prune_swin.py."""
    module = tiny_module("swin")
    model, structure = cleaned(module, "swin")
    rng = np.random.default_rng(0)
    plan = random_plan(structure, rng, kinds=("mlp",))
    PlanMasks(module, model, structure, plan).apply()
    copy_weights_to_graph(module, model)
    x = rng.standard_normal((2, *input_shape("swin")[1:])).astype(np.float32)
    with torch.no_grad():
        reference = module(torch.from_numpy(x)).numpy()
    info = prune_graph(model, structure, plan)
    assert info["attention_rebuilt"] == []
    assert relative_l2(run(model, x), reference) <= 1e-5
