"""discover: read the ViT structure off the graph (analysis only, the graph is unchanged)."""

from __future__ import annotations

import onnx_ir as ir

from ..ir.discover import discover
from .base import CompileContext, Pass, PassResult, register_pass


@register_pass
class DiscoverPass(Pass):
    name = "discover"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        structure = discover(model, family=ctx.family)  # without a family: detected from the graph
        ctx.structure = structure
        return PassResult(model, modified=False, info={"blocks": len(structure.blocks),
                                                       "groups": len(structure.groups())})

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
        assert ctx.structure is not None and ctx.structure.blocks, "no blocks discovered"
        for _, data in ctx.structure.graph.nodes(data=True):
            if data["type"] == "tensor":
                assert data["name"] in model.graph.initializers, f"coupled tensor {data['name']} is not an initializer"
