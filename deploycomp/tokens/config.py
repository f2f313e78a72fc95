"""What a semantic-token request says (``--semantic-tokens``, ``--token-layer``,
``--token-pooling``), validated without importing torch, so that a bad request is refused before
anything heavy is loaded. The STViT model and the rewrite are ``stvit.py`` and ``rewrite.py``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DeployCompError

if TYPE_CHECKING:
    from torch import nn

POOLINGS = ("max", "avg")


@dataclass(frozen=True)
class SemanticTokenConfig:
    """STViT for DeiT: generator in blocks 5-6 of 12 (``layer`` 4, 0-based), 16 semantic tokens, max
    pooling. ``layer=None`` keeps STViT's relative position: a third of the depth (4 of 12, 2 of 6)."""

    tokens: int = 16  # semantic tokens (a square: 4, 9, 16, ...); the prefix tokens are kept besides
    layer: int | None = None  # first generator block (0-based); blocks layer and layer + 1 generate
    pooling: str = "max"
    # tokens before the patches (cls, registers) kept as queries: DeiT's one cls token unless the
    # model says otherwise (``for_model`` reads timm's num_prefix_tokens; 0 for a GAP ViT)
    prefix_tokens: int = 1
    # Swin only (``for_model`` turns the request into a ``SwinTokenConfig``: ``tokens`` per window,
    # ``layer`` within this stage); None = the third stage, as STViT-R on Swin-T
    stage: int | None = None
    dense: bool = False  # Swin only: STViT-R's recovery of full resolution (``--dense``)

    def __post_init__(self) -> None:
        side = math.isqrt(self.tokens)
        if self.tokens < 1 or side * side != self.tokens:
            raise DeployCompError(f"--semantic-tokens {self.tokens}: give a square number (4, 9, 16, ...) "
                                  "the patch grid is pooled to")
        if self.pooling not in POOLINGS:
            raise DeployCompError(f"unknown token pooling '{self.pooling}': use one of {', '.join(POOLINGS)}")
        if self.layer is not None and self.layer < 0:
            raise DeployCompError("the semantic token generator layer must be >= 0")
        if self.stage is not None and self.stage < 0:
            raise DeployCompError("--token-stage must be >= 0")
        if self.prefix_tokens < 0:
            raise DeployCompError("prefix tokens must be >= 0")

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Refuse a patch grid (rows, columns) the generator cannot pool to ``side`` x ``side``."""
        if grid[0] != grid[1] or self.side > grid[0]:
            raise DeployCompError(f"cannot pool a {grid[0]}x{grid[1]} patch grid to {self.side}x{self.side}")

    def resolved(self, depth: int) -> "SemanticTokenConfig":
        """The config with ``layer`` fixed for a model of ``depth`` blocks."""
        from dataclasses import replace

        return self if self.layer is not None else replace(self, layer=depth // 3)

    def for_model(self, vit: "nn.Module") -> "SemanticTokenConfig":
        """The config resolved for a timm ViT (or a model built on the meta device): the generator
        layer for its depth and its prefix token count, as the rewrite and the latency model need.
        For a timm Swin, the per-window config (``stvit_swin.SwinTokenConfig``) resolved for it."""
        from dataclasses import replace

        from .stvit_swin import SwinTokenConfig, is_swin

        if is_swin(vit):
            return SwinTokenConfig(self.tokens, self.stage, self.layer, self.pooling, self.dense).resolved(
                tuple(len(s.blocks) for s in vit.layers))
        if self.stage is not None:
            raise DeployCompError("--token-stage applies to Swin (semantic tokens per window of one stage)")
        if self.dense:
            raise DeployCompError("--dense (STViT-R's recovery of full resolution) applies to Swin semantic tokens")

        depth = len(getattr(vit, "blocks", None) or getattr(vit, "layers", None) or [])
        return replace(self.resolved(depth), prefix_tokens=int(getattr(vit, "num_prefix_tokens", self.prefix_tokens)))

    @property
    def tokens_after(self) -> int:
        """Tokens the blocks after the generator see: the prefix tokens and the semantic tokens."""
        return self.prefix_tokens + self.tokens

    @property
    def side(self) -> int:
        return math.isqrt(self.tokens)
