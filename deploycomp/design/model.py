"""The torch model of a designed architecture: FlexViT with timm's initialisation and weight-decay rules.

A designed ViT has independent per-block dims (heads, QK and V per head, MLP), which timm's
VisionTransformer cannot hold (one head count, one MLP ratio, fused qkv); the latency package's
``FlexViT`` can, and exports to the graph the compiler discovers. Training it from scratch needs
what timm gives its own ViTs: truncated-normal weights (std 0.02, zero biases) and no weight decay
on the position embedding and cls token.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..errors import DeployCompError
from ..latency.arch import BlockArch, ViTArch
from ..latency.flexvit import FlexViT


class DesignedViT(FlexViT):
    """A FlexViT of ``arch``, initialised the way timm initialises a DeiT trained from scratch."""

    def __init__(self, arch: ViTArch):
        if any(b.queries for b in arch.blocks) or len({b.tokens for b in arch.blocks}) > 1:
            raise DeployCompError("a designed model runs every block on all tokens; semantic tokens are added "
                                  "by `deploycomp compile --semantic-tokens`")
        super().__init__(arch)
        self.num_classes = arch.num_classes
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's optimizer factory reads this: embeddings are not decayed (as for timm's ViT)."""
        return {"pos_embed", "cls_token"}


def arch_to_json(arch: ViTArch) -> dict[str, Any]:
    return arch.to_dict()


def arch_from_json(data: dict[str, Any]) -> ViTArch:
    try:
        blocks = tuple(BlockArch(**b) for b in data["blocks"])
        return ViTArch(int(data["emb"]), blocks, int(data["img_size"]), int(data["patch"]), int(data["in_chans"]),
                       int(data["num_classes"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DeployCompError(f"not a designed architecture: {exc}") from None


def arch_digest(arch: ViTArch) -> str:
    """A short content hash: the same architecture always gets the same default name."""
    import hashlib

    return hashlib.sha256(json.dumps(arch_to_json(arch), sort_keys=True).encode()).hexdigest()[:8]


def count_params(arch: ViTArch) -> int:
    """Parameters of ``DesignedViT(arch)`` in closed form (the solver's parameter cap is linear in these)."""
    return fixed_params(arch) + sum(attention_params(arch.emb, b.heads, b.qk_dim, b.v_dim) + mlp_params(arch.emb, b.mlp_dim)
                                    for b in arch.blocks)


def fixed_params(arch: ViTArch) -> int:
    """Stem (patch conv, cls, position embedding), final norm and classifier."""
    e = arch.emb
    return (e * arch.in_chans * arch.patch**2 + e) + e + (arch.patches + 1) * e + 2 * e + (e * arch.num_classes
                                                                                           + arch.num_classes)


def attention_params(emb: int, heads: int, qk: int, v: int) -> int:
    """norm1, q, k, v and the output projection."""
    return 2 * emb + 2 * (emb * heads * qk + heads * qk) + (emb * heads * v + heads * v) + (heads * v * emb + emb)


def mlp_params(emb: int, mlp: int) -> int:
    """norm2, fc1, fc2."""
    return 2 * emb + (emb * mlp + mlp) + (mlp * emb + emb)
