"""A ViT architecture as the latency model sees it: per-block dims and token counts.

NViT-style pruning makes every block different (heads, QK and V dim per head, MLP width) while
the embedding dim stays global; semantic tokens reduce the token count mid-network. ``ViTArch``
describes exactly that, and ``FlexViT`` is a torch model of any such architecture (used to
validate predictions against whole exported models).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BlockArch:
    heads: int
    qk_dim: int
    v_dim: int
    mlp_dim: int
    tokens: int  # sequence length the block runs on (cls included); the keys for cross-attention
    queries: int = 0  # > 0: cross-attention of this many queries over ``tokens`` keys (STViT's generator),
    #                   and the MLP runs on the queries

    @property
    def out_tokens(self) -> int:
        return self.queries or self.tokens

    def attention_flops(self, emb: int) -> float:
        """Matmul FLOPs of the attention half for one image (2 x MACs)."""
        n, m, h = self.tokens, self.queries or self.tokens, self.heads
        return 2.0 * (m * emb * h * self.qk_dim + n * emb * h * (self.qk_dim + self.v_dim) + h * m * n * (self.qk_dim + self.v_dim)
                      + m * h * self.v_dim * emb)


@dataclass(frozen=True)
class ViTArch:
    emb: int
    blocks: tuple[BlockArch, ...]
    img_size: int = 224
    patch: int = 16
    in_chans: int = 3
    num_classes: int = 1000

    @property
    def patches(self) -> int:
        return (self.img_size // self.patch) ** 2

    def flops(self) -> float:
        """Matmul FLOPs per image (2 x MACs), the quantity a FLOPs-based latency model uses."""
        e = self.emb
        total = 2.0 * self.patches * e * self.in_chans * self.patch**2 + 2.0 * e * self.num_classes
        for b in self.blocks:
            total += b.attention_flops(e) + 4.0 * b.out_tokens * e * b.mlp_dim
        return total

    def to_dict(self) -> dict:
        return asdict(self)


def width_steps(grid: dict) -> dict[str, int]:
    """The steps random and anchor architectures take their widths in: coarse on a full-size grid
    (EMB 64, QK / V 8, MLP 64), fine on the tiny test grids."""
    att, mlp = grid["attention"], grid["mlp"]
    return {"emb": 64 if max(mlp["emb"]) >= 256 else 8, "heads": 1, "qk_dim": 8 if max(att["qk_dim"]) >= 32 else 4,
            "v_dim": 8 if max(att["v_dim"]) >= 32 else 4, "mlp_dim": 64 if max(mlp["mlp_dim"]) >= 1024 else 16}


def random_arch(rng: np.random.Generator, grid: dict, depth: int = 12, reduce_tokens: bool = False,
                img_size: int = 224, patch: int = 16, num_classes: int = 1000, in_chans: int = 3) -> ViTArch:
    """A random non-uniform architecture inside a profiling grid (NViT-like: global EMB, every
    block's heads / QK / V / MLP drawn independently; optionally fewer tokens after a random block)."""
    att, mlp = grid["attention"], grid["mlp"]

    def draw(values, step):
        return int(rng.choice(np.arange(min(values), max(values) + 1, step)))

    patches = (img_size // patch) ** 2
    step = width_steps(grid)
    emb = draw(grid["mlp"]["emb"], step["emb"])
    cut = int(rng.integers(depth // 4, 3 * depth // 4 + 1)) if reduce_tokens else depth
    reduced = draw([min(att["tokens"]), patches], 1) if reduce_tokens else patches + 1
    blocks = tuple(
        BlockArch(heads=draw(att["heads"], 1), qk_dim=draw(att["qk_dim"], step["qk_dim"]),
                  v_dim=draw(att["v_dim"], step["v_dim"]), mlp_dim=draw(mlp["mlp_dim"], step["mlp_dim"]),
                  tokens=patches + 1 if i < cut else reduced)
        for i in range(depth))
    return ViTArch(emb, blocks, img_size=img_size, patch=patch, in_chans=in_chans, num_classes=num_classes)
