"""The same plan applied to the torch model: a timm VisionTransformer sliced into a FlexViT.

This is the independent check of the ONNX rewrite (``tests/test_prune_rewrite.py``): slicing
torch parameters by the plan and exporting must give what rewriting the graph gives.
"""

from __future__ import annotations

import torch

from ..ir.structure import Structure
from ..latency.arch import ViTArch
from ..latency.flexvit import FlexViT
from .plan import PrunePlan


def flexvit_from_timm(module, structure: Structure, plan: PrunePlan, arch: ViTArch) -> FlexViT:
    """A FlexViT of ``arch`` holding the plan's kept slices of a timm DeiT's weights."""
    keep = {g: torch.as_tensor(plan.kept(structure, g)) for g in structure.groups()}
    e = keep["stage0.emb"]
    out = FlexViT(arch).eval()
    with torch.no_grad():
        out.patch_embed.weight.copy_(module.patch_embed.proj.weight[e])
        out.patch_embed.bias.copy_(module.patch_embed.proj.bias[e])
        out.cls_token.copy_(module.cls_token[..., e])
        out.pos_embed.copy_(module.pos_embed[..., e])
        for i, (src, dst) in enumerate(zip(module.blocks, out.blocks)):
            b = structure.blocks[i]
            heads, qk, v, mlp = (keep[f"block{i}.{k}"] for k in ("heads", "qk", "v", "mlp"))
            qk_rows = (heads[:, None] * b.qk_dim + qk[None, :]).reshape(-1)
            v_rows = (heads[:, None] * b.v_dim + v[None, :]).reshape(-1)
            width = b.heads * b.qk_dim
            w, bias = src.attn.qkv.weight, src.attn.qkv.bias
            for lin, rows in ((dst.attn.q, qk_rows), (dst.attn.k, qk_rows + width), (dst.attn.v, v_rows + 2 * width)):
                lin.weight.copy_(w[rows][:, e])
                lin.bias.copy_(bias[rows])
            dst.attn.scale = b.qk_dim**-0.5  # NViT keeps the source's softmax scale
            dst.attn.proj.weight.copy_(src.attn.proj.weight[e][:, v_rows])
            dst.attn.proj.bias.copy_(src.attn.proj.bias[e])
            for a, c in ((src.norm1, dst.norm1), (src.norm2, dst.norm2)):
                c.weight.copy_(a.weight[e])
                c.bias.copy_(a.bias[e])
            dst.mlp[0].weight.copy_(src.mlp.fc1.weight[mlp][:, e])
            dst.mlp[0].bias.copy_(src.mlp.fc1.bias[mlp])
            dst.mlp[2].weight.copy_(src.mlp.fc2.weight[e][:, mlp])
            dst.mlp[2].bias.copy_(src.mlp.fc2.bias[e])
        out.norm.weight.copy_(module.norm.weight[e])
        out.norm.bias.copy_(module.norm.bias[e])
        out.head.weight.copy_(module.head.weight[:, e])
        out.head.bias.copy_(module.head.bias)
    return out
