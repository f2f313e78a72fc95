"""STViT's semantic tokens on a timm ViT (DeiT): the torch model the rewritten graph must equal.

Blocks before ``layer`` run on every token. Blocks ``layer`` and ``layer + 1`` form the semantic
token generator, with their own weights (STViT reuses the blocks; no new parameters):

    P  = [cls; pool(patch grid → s×s)]                       initial cluster centres
    S¹ = P  + Attn(LN₁(P),  LN₁(X))            then S¹ += MLP(LN₂(S¹))
    S² = S¹ + Attn(LN₁(S¹), LN₁([S¹; X]))      then S² += MLP(LN₂(S²))

where X are the tokens entering the generator and Attn is the block's multi-head attention with
queries and keys/values from different token sets (the ``TokenCluster`` op). Later blocks run on
the 1 + s² tokens. Pooling is adaptive max pooling as in STViT's released code (``avg``
optional). The parameter names are the timm model's own, so trained weights map onto the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeployCompError
from .op import token_cluster_reference

POOLINGS = ("max", "avg")


@dataclass(frozen=True)
class SemanticTokenConfig:
    """STViT for DeiT: generator in blocks 5-6 of 12 (``layer`` 4, 0-based), 16 semantic tokens, max
    pooling. ``layer=None`` keeps STViT's relative position: a third of the depth (4 of 12, 2 of 6)."""

    tokens: int = 16  # semantic tokens (a square: 4, 9, 16, ...); the cls token is kept besides
    layer: int | None = None  # first generator block (0-based); blocks layer and layer + 1 generate
    pooling: str = "max"

    def __post_init__(self) -> None:
        side = math.isqrt(self.tokens)
        if self.tokens < 1 or side * side != self.tokens:
            raise DeployCompError(f"--semantic-tokens {self.tokens}: give a square number (4, 9, 16, ...) "
                                  "the patch grid is pooled to")
        if self.pooling not in POOLINGS:
            raise DeployCompError(f"unknown token pooling '{self.pooling}': use one of {', '.join(POOLINGS)}")
        if self.layer is not None and self.layer < 0:
            raise DeployCompError("the semantic token generator layer must be >= 0")

    def resolved(self, depth: int) -> "SemanticTokenConfig":
        """The config with ``layer`` fixed for a model of ``depth`` blocks."""
        from dataclasses import replace

        return self if self.layer is not None else replace(self, layer=depth // 3)

    @property
    def side(self) -> int:
        return math.isqrt(self.tokens)


def token_arch(arch, config: SemanticTokenConfig):
    """The latency model's view of ``arch`` (a ViTArch on all tokens) with semantic tokens."""
    from dataclasses import replace

    k, m = config.layer, 1 + config.tokens
    n = arch.blocks[k].tokens
    blocks = [*arch.blocks[:k], replace(arch.blocks[k], queries=m), replace(arch.blocks[k + 1], tokens=n + m, queries=m),
              *(replace(b, tokens=m) for b in arch.blocks[k + 2:])]
    return replace(arch, blocks=tuple(blocks))


def check_supported(vit: nn.Module, config: SemanticTokenConfig) -> None:
    """Refuse, with the reason, what the rewrite does not cover."""
    from timm.models.vision_transformer import VisionTransformer

    if config.layer is None:
        raise DeployCompError("internal: resolve the generator layer for the model's depth first")
    if not isinstance(vit, VisionTransformer):
        raise DeployCompError(f"semantic tokens support DeiT-style ViTs (one token sequence); {type(vit).__name__} "
                              "is not one (Swin: per-window semantic tokens are not supported yet)")
    depth = len(vit.blocks)
    if config.layer + 2 > depth:
        raise DeployCompError(f"the generator needs blocks {config.layer + 1}-{config.layer + 2}, the model has {depth}")
    if vit.num_prefix_tokens != 1 or vit.global_pool != "token":
        raise DeployCompError("semantic tokens need exactly one cls token read by the head (DeiT); this model has "
                              f"{vit.num_prefix_tokens} prefix tokens and pool '{vit.global_pool}'")
    grid = vit.patch_embed.grid_size
    if grid[0] != grid[1] or config.side > grid[0]:
        raise DeployCompError(f"cannot pool a {grid[0]}x{grid[1]} patch grid to {config.side}x{config.side}")
    for i in (config.layer, config.layer + 1):
        attn = vit.blocks[i].attn
        plain = all(isinstance(getattr(attn, m, None), (nn.Identity, type(None))) for m in ("q_norm", "k_norm", "norm"))
        if not plain or getattr(attn, "gate", None) is not None:
            raise DeployCompError(f"block {i}: attention with q/k norms or gates is not supported by the generator")


def pool_patches(patches: torch.Tensor, side: int, pooling: str) -> torch.Tensor:
    """(B, g², C) patch tokens → (B, side², C) initial centres by adaptive pooling of the grid."""
    b, n, c = patches.shape
    g = math.isqrt(n)
    grid = patches.transpose(1, 2).reshape(b, c, g, g)
    pooled = F.adaptive_max_pool2d(grid, side) if pooling == "max" else F.adaptive_avg_pool2d(grid, side)
    return pooled.flatten(2).transpose(1, 2)


def cross_attention(block: nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The block's attention with queries and keys/values from different token sets (un-normed inputs)."""
    attn = block.attn
    heads, c = attn.num_heads, queries.shape[-1]
    if hasattr(attn, "project"):  # the torch twin of an ONNX graph (frontend/onnx_twin.py): its own q/k/v layout
        q, k, v = attn.project(block.norm1(queries), block.norm1(keys))
        return attn.proj_drop(attn.proj(token_cluster_reference(q, k, v, heads, float(attn.scale))))
    w, bias = attn.qkv.weight, attn.qkv.bias
    width = w.shape[0] // 3
    wq, wk, wv = w[:width], w[width:2 * width], w[2 * width:]
    bq, bk, bv = (bias[:width], bias[width:2 * width], bias[2 * width:]) if bias is not None else (None, None, None)
    q = F.linear(block.norm1(queries), wq, bq)
    kn = block.norm1(keys)
    out = token_cluster_reference(q, F.linear(kn, wk, bk), F.linear(kn, wv, bv), heads, float(attn.scale))
    return attn.proj_drop(attn.proj(out))


def generator_block(block: nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    x = queries + block.drop_path1(block.ls1(cross_attention(block, queries, keys)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class SemanticTokenViT(nn.Module):
    """A timm VisionTransformer with STViT's semantic-token generator; same parameters and names."""

    def __init__(self, vit: nn.Module, config: SemanticTokenConfig):
        super().__init__()
        config = config.resolved(len(vit.blocks))
        check_supported(vit, config)
        for name, child in vit.named_children():
            self.add_module(name, child)
        for name, param in vit.named_parameters(recurse=False):
            self.register_parameter(name, param)
        object.__setattr__(self, "_vit", vit)  # for its position embedding; not a submodule twice
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Own attributes only (shared with the ViT), so modules swapped in by pruning's masks are used.
        k = self.config.layer
        x = self.norm_pre(self.patch_drop(self._vit._pos_embed(self.patch_embed(x))))
        for blk in self.blocks[:k]:
            x = blk(x)
        centres = torch.cat([x[:, :1], pool_patches(x[:, 1:], self.config.side, self.config.pooling)], dim=1)
        s1 = generator_block(self.blocks[k], centres, x)
        s = generator_block(self.blocks[k + 1], s1, torch.cat([s1, x], dim=1))
        for blk in self.blocks[k + 2:]:
            s = blk(s)
        return self.head(self.head_drop(self.fc_norm(self.norm(s)[:, 0])))  # the cls token (global_pool "token")
