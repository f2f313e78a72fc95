"""FlexViT: a torch ViT with independent per-block dims and token counts (any ``ViTArch``).

DeiT's structure (cls token, learned position embedding, pre-norm blocks, exact GELU) with q, k and
v as separate projections, so QK and V dims per head can differ, as after NViT pruning. A token
reduction keeps the first ``tokens`` tokens (a static slice), standing in for semantic tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import BlockArch, ViTArch


class FlexAttention(nn.Module):
    def __init__(self, emb: int, b: BlockArch):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim = b.heads, b.qk_dim, b.v_dim
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
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.heads * self.v_dim))


class FlexBlock(nn.Module):
    def __init__(self, emb: int, b: BlockArch):
        super().__init__()
        self.tokens = b.tokens
        self.norm1, self.norm2 = nn.LayerNorm(emb, eps=1e-6), nn.LayerNorm(emb, eps=1e-6)
        self.attn = FlexAttention(emb, b)
        self.mlp = nn.Sequential(nn.Linear(emb, b.mlp_dim), nn.GELU(), nn.Linear(b.mlp_dim, emb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.tokens:
            x = x[:, : self.tokens]
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FlexViT(nn.Module):
    def __init__(self, arch: ViTArch):
        super().__init__()
        e = arch.emb
        self.arch = arch
        self.patch_embed = nn.Conv2d(arch.in_chans, e, arch.patch, arch.patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, e) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, arch.patches + 1, e) * 0.02)
        self.blocks = nn.ModuleList(FlexBlock(e, b) for b in arch.blocks)
        self.norm = nn.LayerNorm(e, eps=1e-6)
        self.head = nn.Linear(e, arch.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
