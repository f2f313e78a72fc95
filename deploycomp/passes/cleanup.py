"""cleanup: fold constants and drop dead nodes, keeping every weight a tensor of its own.

Folding is onnxscript's constant folder plus onnx-ir's common passes. Two things are ours:
transposed parameters (``Transpose(W)`` before a MatMul, as exporters emit for ``nn.Linear``)
are folded into an initializer that keeps the parameter's name, so a tensor in the graph can be
traced back to the torch parameter; and an initializer read by several nodes is split into one
copy per reader, because structure discovery and pruning slice each block's tensors on their own
(exporters' deduplication merges e.g. all-zero biases of different blocks).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer as optimizer

from .base import CompileContext, Pass, PassResult, register_pass

TRANSPOSED_FROM = "deploycomp.transposed_from"
# Fold constant subgraphs up to 1M elements: precomputed relative-position biases and shift masks
# (Swin: up to heads x 49 x 49 per block) are then plain initializers, cheaper to run and to slice.
FOLD_INPUT_LIMIT = 1 << 20


@register_pass
class CleanupPass(Pass):
    name = "cleanup"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        before = model.graph.num_nodes()
        common.InlinePass()(model)
        common.IdentityEliminationPass()(model)
        folded = fold_parameter_transposes(model)
        for _ in range(3):  # folding exposes more folding once dead nodes are gone
            folded_now = optimizer.fold_constants_ir(model, onnx_shape_inference=True, input_size_limit=FOLD_INPUT_LIMIT)
            common.RemoveUnusedNodesPass()(model)
            if not folded_now.modified:
                break
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.CommonSubexpressionEliminationPass()(model)
        common.RemoveUnusedNodesPass()(model)
        unshared = unshare_initializers(model)
        common.NameFixPass()(model)
        common.TopologicalSortPass()(model)
        after = model.graph.num_nodes()
        return PassResult(
            model,
            modified=True,
            info={"nodes_removed": before - after, "transposes_folded": folded, "initializers_unshared": unshared},
        )

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
        for node in model.graph:
            assert node.op_type != "Constant", "a Constant node was left unlifted"


def fold_parameter_transposes(model: ir.Model) -> int:
    """Replace ``Transpose(initializer)`` by the transposed initializer, keeping its name."""
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or src.const_value is None or len(src.uses()) != 1:
            continue
        array = src.const_value.numpy()
        perm_attr = node.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else list(range(array.ndim))[::-1]
        name = src.name
        out = node.outputs[0]
        graph.remove(node, safe=False)
        graph.initializers.pop(name)
        new = ir.Value(name=name, shape=ir.Shape(array.transpose(perm).shape), type=src.type,
                       const_value=ir.tensor(np.ascontiguousarray(array.transpose(perm)), name=name))
        new.metadata_props[TRANSPOSED_FROM] = ",".join(map(str, perm))
        graph.register_initializer(new)
        out.replace_all_uses_with(new)
        if out.is_graph_output():
            raise AssertionError("a parameter transpose is a graph output")
        count += 1
    return count


def unshare_initializers(model: ir.Model, min_elements: int = 2) -> int:
    """Give every reader of a shared (non-scalar) initializer its own copy."""
    graph = model.graph
    count = 0
    for name, value in list(graph.initializers.items()):
        if value.const_value is None or value.const_value.size < min_elements:
            continue
        uses = value.uses()
        if len(uses) < 2:
            continue
        array = value.const_value.numpy()
        for k, (node, idx) in enumerate(uses[1:], start=1):
            new_name = f"{name}__{k}"
            while new_name in graph.initializers:
                new_name += "_"
            copy = ir.Value(name=new_name, shape=value.shape, type=value.type,
                            const_value=ir.tensor(array.copy(), name=new_name))
            graph.register_initializer(copy)
            node.replace_input_with(idx, copy)
            count += 1
    return count
