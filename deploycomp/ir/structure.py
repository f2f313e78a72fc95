"""The ViT structure the compiler sees: per-block dims and NViT's coupled groups.

NViT prunes five kinds of structure: the embedding dim (EMB, shared by every block of a stage),
and per block the attention heads (H), the QK dim per head, the V dim per head and the MLP hidden
dim. Removing one *unit* of a group (one head, one channel) removes a set of slices from several
tensors at once; those slices are "coupled". They are stored as a networkx graph: one node per
group, one node per initializer, and an edge per coupled slice carrying a :class:`ChannelSlice`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import networkx as nx
import numpy as np

@dataclass(frozen=True)
class ChannelSlice:
    """Which indices along ``axis`` of initializer ``tensor`` belong to each unit of a group.

    Unit ``u`` covers ``offset + u * unit_stride + k * inner_stride`` for ``k < unit_len``: a head
    of size d is (unit_stride=d, inner_stride=1, unit_len=d); QK channel j of every head is
    (unit_stride=1, inner_stride=d, unit_len=H).
    """

    tensor: str
    axis: int
    offset: int = 0
    unit_stride: int = 1
    inner_stride: int = 1
    unit_len: int = 1

    def indices(self, unit: int) -> np.ndarray:
        return self.offset + unit * self.unit_stride + np.arange(self.unit_len) * self.inner_stride

    def all_indices(self, units: int) -> np.ndarray:
        return np.concatenate([self.indices(u) for u in range(units)]) if units else np.zeros(0, int)


@dataclass
class BlockStructure:
    """One transformer block as found in the graph."""

    index: int
    stage: int
    emb: int
    heads: int
    qk_dim: int  # per head
    v_dim: int  # per head
    mlp_dim: int
    tokens: int  # tokens per attention sequence (a window for Swin)
    sequences: int  # attention sequences per image (windows for Swin, 1 for DeiT)
    fused_qkv: bool
    nodes: dict[str, str] = field(default_factory=dict)  # role -> node name in the graph
    keys: int = 0  # > 0: the attention's keys/values come from this many other tokens (STViT's generator)

    def flops(self) -> int:
        """Multiply-accumulates x2 of the block's matrix products for one image."""
        n, s, e = self.tokens, self.sequences, self.emb
        nk = self.keys or n
        h, dqk, dv, m = self.heads, self.qk_dim, self.v_dim, self.mlp_dim
        proj = n * e * h * dqk + nk * e * h * (dqk + dv) + n * h * dv * e
        attn = h * n * nk * (dqk + dv)
        mlp = 2 * n * e * m
        return 2 * s * (proj + attn + mlp)


@dataclass
class Structure:
    family: str
    blocks: list[BlockStructure]
    stage_embs: list[int]
    graph: nx.MultiDiGraph

    def groups(self, kind: str | None = None) -> list[str]:
        return [n for n, d in self.graph.nodes(data=True) if d.get("type") == "group" and (kind is None or d["kind"] == kind)]

    def slices(self, group: str) -> list[ChannelSlice]:
        return [d["slice"] for _, _, d in self.graph.out_edges(group, data=True)]

    def table(self) -> list[dict]:
        return [
            {k: v for k, v in asdict(b).items() if k not in ("nodes",)} | {"gflops": round(b.flops() / 1e9, 4)}
            for b in self.blocks
        ]

    def summary(self) -> dict:
        return {
            "family": self.family,
            "num_blocks": len(self.blocks),
            "stage_embs": self.stage_embs,
            "blocks": self.table(),
            "groups": {
                g: {**{k: v for k, v in self.graph.nodes[g].items() if k != "type"},
                    "slices": [asdict(s) for s in self.slices(g)]}
                for g in self.groups()
            },
        }


class StructureGraphBuilder:
    """Accumulates groups and their coupled slices into a networkx graph."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.graph = nx.MultiDiGraph()  # a fused qkv tensor carries several slices of one group
        self.shapes = shapes

    def group(self, name: str, kind: str, units: int, **attrs) -> str:
        self.graph.add_node(name, type="group", kind=kind, units=units, **attrs)
        return name

    def couple(self, group: str, sl: ChannelSlice) -> None:
        shape = self.shapes[sl.tensor]
        axis = sl.axis % len(shape)
        sl = ChannelSlice(sl.tensor, axis, sl.offset, sl.unit_stride, sl.inner_stride, sl.unit_len)
        units = self.graph.nodes[group]["units"]
        top = int(sl.all_indices(units).max()) if units else -1
        if top >= shape[axis]:
            raise ValueError(f"slice of {sl.tensor} axis {axis} reaches {top} >= {shape[axis]}")
        node = f"tensor:{sl.tensor}"
        self.graph.add_node(node, type="tensor", name=sl.tensor, shape=tuple(shape))
        self.graph.add_edge(group, node, slice=sl)
