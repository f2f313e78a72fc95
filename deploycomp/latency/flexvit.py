"""FlexViT: a torch ViT with independent per-block dims and token counts (any ``ViTArch``).

DeiT's structure (cls token, learned position embedding, pre-norm blocks, exact GELU) with q, k and
v as separate projections, so QK and V dims per head can differ, as after NViT pruning. A token
reduction keeps the first ``tokens`` tokens (a static slice), standing in for semantic tokens.
Attention is written out (matmul, softmax, matmul) so that the export matches the latency table's
micro-graphs; ``fused_attention=True`` runs torch's ``scaled_dot_product_attention`` instead, for
timing the architecture in torch on a GPU (written out, the unpruned DeiT-S/B ran at 0.56-0.59x
timm's DeiT on an H200, docs/gpu.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import BlockArch, ViTArch


class FlexAttention(nn.Module):
    def __init__(self, emb: int, b: BlockArch, fused: bool = False):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim, self.fused = b.heads, b.qk_dim, b.v_dim, fused
        self.q = nn.Linear(emb, b.heads * b.qk_dim)
        self.k = nn.Linear(emb, b.heads * b.qk_dim)
        self.v = nn.Linear(emb, b.heads * b.v_dim)
        self.proj = nn.Linear(b.heads * b.v_dim, emb)
        self.scale = b.qk_dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q(x).reshape(B, N, self.heads, self.qk_dim).transpose(1, 2)
        k = self.k(x).reshape(B, N, self.heads, self.qk_dim).transpose(1, 2)
        v = self.v(x).reshape(B, N, self.heads, self.v_dim).transpose(1, 2)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, self.heads * self.v_dim))


class FlexBlock(nn.Module):
    def __init__(self, emb: int, b: BlockArch, fused_attention: bool = False):
        super().__init__()
        self.tokens = b.tokens
        self.norm1, self.norm2 = nn.LayerNorm(emb, eps=1e-6), nn.LayerNorm(emb, eps=1e-6)
        self.attn = FlexAttention(emb, b, fused_attention)
        self.mlp = nn.Sequential(nn.Linear(emb, b.mlp_dim), nn.GELU(), nn.Linear(b.mlp_dim, emb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.tokens:
            x = x[:, : self.tokens]
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FlexViT(nn.Module):
    def __init__(self, arch: ViTArch, fused_attention: bool = False):
        super().__init__()
        e = arch.emb
        self.arch = arch
        self.patch_embed = nn.Conv2d(arch.in_chans, e, arch.patch, arch.patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, e) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, arch.patches + 1, e) * 0.02)
        self.blocks = nn.ModuleList(FlexBlock(e, b, fused_attention) for b in arch.blocks)
        self.norm = nn.LayerNorm(e, eps=1e-6)
        self.head = nn.Linear(e, arch.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
