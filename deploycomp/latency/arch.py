"""A ViT architecture as the latency model sees it: per-block dims and token counts.

NViT-style pruning makes every block different (heads, QK and V dim per head, MLP width) while
the embedding dim stays global; semantic tokens reduce the token count mid-network. ``ViTArch``
describes exactly that, and ``FlexViT`` is a torch model of any such architecture (used to
validate predictions against whole exported models).
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class SwinStage:
    """One Swin stage: ``resolution`` x ``resolution`` tokens of width ``emb`` in windows of
    ``window`` x ``window`` (a grid that does not divide into windows is padded, as timm pads it);
    each block's ``tokens`` is the window's (window²), and ``shifts[i]`` says whether block i shifts
    its windows (timm: odd blocks, when the stage has several windows).

    With semantic tokens per window (``tokens/stvit_swin.swin_token_arch``) a block with ``queries``
    attends, per window, from that many queries to its ``tokens`` keys (no bias, no shift) and its
    MLP runs on windows x queries tokens; ``out_resolution`` is then the grid the stage hands on
    (0: its own)."""

    emb: int
    resolution: int
    window: int
    blocks: tuple[BlockArch, ...]
    shifts: tuple[bool, ...] = ()
    out_resolution: int = 0

    @property
    def windows(self) -> int:
        return window_count(self.resolution, self.window)

    @property
    def tokens(self) -> int:
        return self.resolution**2

    @property
    def out_tokens(self) -> int:
        return (self.out_resolution or self.resolution) ** 2

    def mlp_tokens(self, b: BlockArch) -> int:
        """Tokens block ``b``'s MLP runs on: the grid's, or each window's queries."""
        return self.windows * b.queries if b.queries else self.tokens

    def shifted(self, i: int) -> bool:
        return bool(self.shifts[i]) if self.shifts else (i % 2 == 1 and self.windows > 1)


@dataclass(frozen=True)
class SwinArch:
    """A multi-stage (Swin) architecture: per stage its width, grid and window, per block heads /
    QK / V / MLP; patch merging between stages (2x2 neighbours' channels to the next stage's width).
    Pruning makes every stage's width and every block's dims independent."""

    stages: tuple[SwinStage, ...]
    img_size: int = 224
    patch: int = 4
    in_chans: int = 3
    num_classes: int = 1000

    @property
    def emb(self) -> int:
        return self.stages[0].emb

    @property
    def blocks(self) -> tuple[BlockArch, ...]:
        return tuple(b for s in self.stages for b in s.blocks)

    def flops(self) -> float:
        """Matmul FLOPs per image (2 x MACs)."""
        first, last = self.stages[0], self.stages[-1]
        total = 2.0 * first.tokens * first.emb * self.in_chans * self.patch**2 + 2.0 * last.emb * self.num_classes
        for s, stage in enumerate(self.stages):
            for b in stage.blocks:
                total += stage.windows * b.attention_flops(stage.emb) + 4.0 * stage.mlp_tokens(b) * stage.emb * b.mlp_dim
            if s + 1 < len(self.stages):
                total += 2.0 * (stage.out_tokens // 4) * 4 * stage.emb * self.stages[s + 1].emb
        return total

    def to_dict(self) -> dict:
        return asdict(self)


def swin_arch_of(swin) -> SwinArch:
    """The view of a timm SwinTransformer as built (per stage its width, grid and window; per block
    heads, head dims, MLP width and shift), read off the module's own attributes."""
    stages = []
    for stage in swin.layers:
        first = stage.blocks[0]
        blocks, shifts = [], []
        for b in stage.blocks:
            dim = b.attn.qkv.out_features // 3 // b.attn.num_heads
            blocks.append(BlockArch(b.attn.num_heads, dim, dim, b.mlp.fc1.out_features, b.window_size[0] * b.window_size[1]))
            shifts.append(any(b.shift_size))
        stages.append(SwinStage(first.norm1.normalized_shape[0], first.input_resolution[0], first.window_size[0],
                                tuple(blocks), tuple(shifts)))
    embed = swin.patch_embed
    return SwinArch(tuple(stages), img_size=embed.img_size[0], patch=embed.patch_size[0],
                    in_chans=embed.proj.in_channels, num_classes=swin.num_classes)


def swin_stage_geometry(fixed: dict) -> list[tuple[int, int]]:
    """(resolution, window) of each stage of the Swin a grid is laid out for: the patch grid halves
    at every merge, and a window never exceeds its stage's grid (timm clamps it)."""
    res = fixed["img_size"] // fixed["patch"]
    out = []
    for _ in fixed["depths"]:
        out.append((res, min(fixed["window"], res)))
        res //= 2
    return out


def window_count(resolution: int, window: int) -> int:
    """Windows of ``window`` x ``window`` over a ``resolution`` x ``resolution`` grid (padded as timm pads)."""
    return math.ceil(resolution / window) ** 2


def handed_on_geometry(geometry: list[tuple[int, int]], stage: int, side: int) -> list[tuple[int, int]]:
    """(resolution, window) of the stages after ``stage`` when it hands on a ``side`` x ``side`` grid
    (semantic tokens per window, ``tokens/stvit_swin.py``): each merge halves the grid (timm pads an
    odd one) and a stage's window never exceeds its grid. ``geometry`` is the unmodified Swin's
    (``swin_stage_geometry``)."""
    out = []
    for _, window in geometry[stage + 1:]:
        side = math.ceil(side / 2)
        out.append((side, min(window, side)))
    return out


def random_swin_arch(rng: np.random.Generator, grid: dict, fixed: dict) -> SwinArch:
    """A random Swin inside a Swin profiling grid: every stage's width and every block's heads /
    QK / V / MLP drawn independently from its stage's ranges (the validation's architectures)."""

    def draw(values, step):
        lo, hi = min(values), max(values)
        return int(rng.choice(np.arange(hi, lo - 1, -step)))

    stages, previous = [], 0
    for s, ((res, window), depth) in enumerate(zip(swin_stage_geometry(fixed), fixed["depths"])):
        att, mlp = grid[f"window_attention.{s}"], grid[f"mlp.{s}"]
        # wider than the previous stage, as pruning keeps it (stages are told apart by width)
        emb = previous = draw([max(min(att["emb"]), previous + 1), max(att["emb"])], 16 if max(att["emb"]) >= 64 else 4)
        dim_step = 8 if max(att["qk_dim"]) >= 32 else 4
        blocks = tuple(BlockArch(heads=draw(att["heads"], 1), qk_dim=draw(att["qk_dim"], dim_step),
                                 v_dim=draw(att["v_dim"], dim_step),
                                 mlp_dim=draw(mlp["mlp_dim"], 16), tokens=window * window) for _ in range(depth))
        stages.append(SwinStage(emb, res, window, blocks))
    return SwinArch(tuple(stages), img_size=fixed["img_size"], patch=fixed["patch"], in_chans=fixed["in_chans"],
                    num_classes=fixed["num_classes"])
