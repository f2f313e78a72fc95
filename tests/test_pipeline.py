"""The pass contract: a broken precondition, postcondition or invariant names the pass."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from deploycomp.errors import PassFailedError
from deploycomp.passes.base import DEFAULT_INVARIANTS, CompileContext, Pass, PassResult, Pipeline
from deploycomp.passes.cleanup import CleanupPass


class FixBatch(Pass):
    name = "fix_batch"

    def run(self, model, ctx):
        value = model.graph.inputs[0]
        value.shape = ir.Shape([1, *list(value.shape)[1:]])
        return PassResult(model, True)


class Broken(Pass):
    name = "broken_graph"

    def run(self, model, ctx):
        out = model.graph.outputs[0]
        node = ir.Node("", "NoSuchOp", [out], num_outputs=1)
        model.graph.append(node)
        model.graph.outputs[0] = node.outputs[0]
        node.outputs[0].name = "bogus"
        return PassResult(model, True)


class Crashes(Pass):
    name = "crashes"

    def run(self, model, ctx):
        raise ValueError("boom")


class PromisesTooMuch(Pass):
    name = "promises"

    def run(self, model, ctx):
        return PassResult(model, False)

    def ensures(self, model, ctx):
        assert ctx.structure is not None, "structure was not set"


class NeedsStructure(Pass):
    name = "needs_structure"

    def requires(self, model, ctx):
        assert ctx.structure is not None, "run discover first"

    def run(self, model, ctx):  # pragma: no cover - never reached
        return PassResult(model, False)


@pytest.mark.parametrize("bad,message", [
    (FixBatch(), "pass 'fix_batch' failed: invariant batch_axis_is_symbolic broken"),
    (Broken(), "pass 'broken_graph' failed: invariant .* broken"),
    (Crashes(), "pass 'crashes' failed: ValueError: boom"),
    (PromisesTooMuch(), "pass 'promises' failed: postcondition broken: structure was not set"),
    (NeedsStructure(), "pass 'needs_structure' failed: precondition broken: run discover first"),
])
def test_pipeline_names_the_pass(exported, bad, message):
    path, _ = exported("deit", "dynamo")
    model = ir.load(path)
    ctx = CompileContext()
    with pytest.raises(PassFailedError, match=message) as info:
        Pipeline([CleanupPass(), bad], DEFAULT_INVARIANTS)(model, ctx)
    assert info.value.pass_name == bad.name
    assert [entry["pass"] for entry in ctx.log] == ["cleanup"]  # the passes before it ran and were logged


def test_cleanup_unshares_deduplicated_initializers(tmp_path):
    """torch.onnx.export's default optimizer merges equal tensors (the zero biases of a fresh
    model) across blocks; cleanup gives each reader its own copy so blocks stay independent."""
    import timm
    import torch

    from deploycomp.ir.discover import discover

    from .conftest import TINY

    name, kwargs = TINY["deit"]
    module = timm.create_model(name, pretrained=False, **kwargs).eval()
    program = torch.onnx.export(module, (torch.randn(2, 3, 32, 32),), dynamo=True, optimize=True,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    model = program.model
    shared = [v.name for v in model.graph.initializers.values() if len(v.uses()) > 1 and v.const_value.size > 1]
    assert shared, "the exporter no longer deduplicates; this test needs another source of shared tensors"
    ctx = CompileContext()
    Pipeline([CleanupPass()], DEFAULT_INVARIANTS)(model, ctx)
    assert ctx.log[0]["initializers_unshared"] >= len(shared)
    for value in model.graph.initializers.values():
        if value.const_value is not None and value.const_value.size > 1:
            assert len(value.uses()) <= 1, value.name
    assert all(n.op_type not in ("Constant", "Identity") for n in model.graph)
    structure = discover(model)
    # no tensor is claimed by the groups of two different blocks
    for tensor, data in structure.graph.nodes(data=True):
        if data["type"] == "tensor":
            blocks = {structure.graph.nodes[g].get("block") for g in structure.graph.predecessors(tensor)} - {None}
            assert len(blocks) <= 1, tensor


def test_export_checks_batch_axis_and_opset(exported):
    from deploycomp.errors import DeployCompError
    from deploycomp.frontend.export import check_exported

    path, _ = exported("deit", "dynamo")
    model = ir.load(path)
    check_exported(model, 18)
    with pytest.raises(DeployCompError, match="exporter produced opset 18, asked for 17"):
        check_exported(model, 17)
    value = model.graph.inputs[0]
    value.shape = ir.Shape([1, *list(value.shape)[1:]])
    with pytest.raises(DeployCompError, match="exporter fixed the batch axis of 'pixel_values'"):
        check_exported(model, 18)
