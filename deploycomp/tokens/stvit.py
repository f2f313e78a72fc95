"""STViT's semantic tokens on a timm ViT: the torch model the rewritten graph must equal.

Blocks before ``layer`` run on every token. Blocks ``layer`` and ``layer + 1`` form the semantic
token generator, with their own weights (STViT reuses the blocks; no new parameters):

    P  = [prefix; pool(patch grid → s×s)]                    initial cluster centres
    S¹ = P  + Attn(LN₁(P),  LN₁(X))            then S¹ += MLP(LN₂(S¹))
    S² = S¹ + Attn(LN₁(S¹), LN₁([S¹; X]))      then S² += MLP(LN₂(S²))

where X are the tokens entering the generator and Attn is the block's multi-head attention with
queries and keys/values from different token sets (the ``TokenCluster`` op). The prefix tokens
(a cls token and/or registers: timm's ``num_prefix_tokens``, 1 for DeiT, 0 for a GAP ViT without a
cls token) stay queries of their own, so a head that reads the cls token still reads it; a head
that averages the patch tokens (``global_pool='avg'``) then averages the s² semantic tokens, which
replace the patches. Later blocks run on the prefix + s² tokens. Pooling is adaptive max pooling
as in STViT's released code (``avg`` optional). The parameter names are the timm model's own, so
trained weights map onto the graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeployCompError
from .config import POOLINGS, SemanticTokenConfig  # noqa: F401  (imported from here too)
from .op import token_cluster_reference

def token_arch(arch, config: SemanticTokenConfig):
    """The latency model's view of ``arch`` (a ViTArch on all tokens) with semantic tokens."""
    from dataclasses import replace

    k, m = config.layer, config.tokens_after
    n = arch.blocks[k].tokens
    blocks = [*arch.blocks[:k], replace(arch.blocks[k], queries=m), replace(arch.blocks[k + 1], tokens=n + m, queries=m),
              *(replace(b, tokens=m) for b in arch.blocks[k + 2:])]
    return replace(arch, blocks=tuple(blocks))


def check_supported(vit: nn.Module, config: SemanticTokenConfig) -> None:
    """Refuse, with the reason, what the rewrite does not cover. Called on the model built on the
    meta device too (no weights), so a request is refused before anything slow."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    from .stvit_swin import SwinTokenConfig, check_supported_swin

    if isinstance(config, SwinTokenConfig):
        return check_supported_swin(vit, config)
    if config.layer is None:
        raise DeployCompError("internal: resolve the generator layer for the model's depth first")
    if not isinstance(vit, VisionTransformer):
        raise DeployCompError(f"semantic tokens support DeiT-style ViTs (one token sequence); {type(vit).__name__} "
                              "is not one (nor a timm Swin, which gets semantic tokens per window)")
    if isinstance(vit, VisionTransformerDistilled):
        raise DeployCompError("semantic tokens: a distilled DeiT's two heads (cls and distillation token, averaged) "
                              "are not supported; use the model without its distillation head")
    depth = len(vit.blocks)
    if config.layer + 2 > depth:
        raise DeployCompError(f"the generator needs blocks {config.layer + 1}-{config.layer + 2}, the model has {depth}")
    if config.prefix_tokens != vit.num_prefix_tokens:
        raise DeployCompError(f"internal: the token config keeps {config.prefix_tokens} prefix tokens, the model has "
                              f"{vit.num_prefix_tokens} (resolve it with for_model)")
    pool, with_prefix = vit.global_pool, getattr(vit, "pool_include_prefix", False)
    if not (pool == "token" and vit.cls_token is not None) and not (pool == "avg" and not with_prefix):
        raise DeployCompError(f"semantic tokens need a head that reads the cls token or averages the patch tokens; "
                              f"this model pools '{pool}'" + (" including its prefix tokens" if pool == "avg" else ""))
    config.check_grid(tuple(vit.patch_embed.grid_size))
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


def cross_attention(block: nn.Module, queries: torch.Tensor, keys: torch.Tensor, cluster=token_cluster_reference) -> torch.Tensor:
    """The block's attention with queries and keys/values from different token sets (un-normed inputs);
    ``cluster``: the TokenCluster implementation (the reference; the custom op while exporting)."""
    attn = block.attn
    heads = attn.num_heads
    if hasattr(attn, "project"):  # its own q/k/v layout: the torch twin of an ONNX graph (frontend/onnx_twin.py),
        q, k, v = attn.project(block.norm1(queries), block.norm1(keys))  # a pruned Swin's (pruning/torch_prune.py)
        return attn.proj_drop(attn.proj(cluster(q, k, v, heads, float(attn.scale))))
    w, bias = attn.qkv.weight, attn.qkv.bias
    width = w.shape[0] // 3
    wq, wk, wv = w[:width], w[width:2 * width], w[2 * width:]
    bq, bk, bv = (bias[:width], bias[width:2 * width], bias[2 * width:]) if bias is not None else (None, None, None)
    q = F.linear(block.norm1(queries), wq, bq)
    kn = block.norm1(keys)
    out = cluster(q, F.linear(kn, wk, bk), F.linear(kn, wv, bv), heads, float(attn.scale))
    return attn.proj_drop(attn.proj(out))


def generator_block(block: nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    x = queries + block.drop_path1(block.ls1(cross_attention(block, queries, keys)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class SemanticTokenViT(nn.Module):
    """A timm VisionTransformer with STViT's semantic-token generator; same parameters and names."""

    def __init__(self, vit: nn.Module, config: SemanticTokenConfig):
        super().__init__()
        config = config.for_model(vit)
        check_supported(vit, config)
        for name, child in vit.named_children():
            self.add_module(name, child)
        for name, param in vit.named_parameters(recurse=False):
            self.register_parameter(name, param)
        object.__setattr__(self, "_vit", vit)  # for its position embedding; not a submodule twice
        self.config = config
        self.global_pool = vit.global_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Own attributes only (shared with the ViT), so modules swapped in by pruning's masks are used.
        k, p = self.config.layer, self.config.prefix_tokens
        x = self.norm_pre(self.patch_drop(self._vit._pos_embed(self.patch_embed(x))))
        for blk in self.blocks[:k]:
            x = blk(x)
        centres = torch.cat([x[:, :p], pool_patches(x[:, p:], self.config.side, self.config.pooling)], dim=1)
        s1 = generator_block(self.blocks[k], centres, x)
        s = generator_block(self.blocks[k + 1], s1, torch.cat([s1, x], dim=1))
        for blk in self.blocks[k + 2:]:
            s = blk(s)
        s = self.norm(s)
        # timm's heads: the cls token, or the mean of the tokens after the prefix (here the semantic tokens)
        pooled = s[:, 0] if self.global_pool == "token" else s[:, p:].mean(dim=1)
        return self.head(self.head_drop(self.fc_norm(pooled)))
