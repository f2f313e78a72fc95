"""Small helpers for building nodes into an existing onnx-ir graph (rewrites insert short chains)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def add_const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer under a name not yet used."""
    while name in graph.initializers:
        name += "_"
    array = np.ascontiguousarray(array)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


class ChainBuilder:
    """Collects new nodes named ``<prefix>.<op>_<n>``; ``insert_before(anchor)`` puts them in the graph."""

    def __init__(self, graph: ir.Graph, prefix: str):
        self.graph, self.prefix, self.nodes = graph, prefix, []

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", outputs: int = 1,
           **attrs) -> ir.Value | tuple[ir.Value, ...]:
        node = ir.node(op_type, list(inputs), attributes=attrs, domain=domain, num_outputs=outputs,
                       name=f"{self.prefix}.{op_type.lower()}_{len(self.nodes)}")
        for i, out in enumerate(node.outputs):
            out.name = node.name if outputs == 1 else f"{node.name}.{i}"
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def const(self, name: str, array) -> ir.Value:
        return add_const(self.graph, f"{self.prefix}.{name}", np.asarray(array))

    def insert_before(self, anchor: ir.Node) -> None:
        self.graph.insert_before(anchor, self.nodes)
        self.nodes = []
