"""The same plan applied to the torch model: a timm VisionTransformer sliced into a FlexViT, a
timm SwinTransformer sliced in place (windowed attention, MLPs, per-stage embeddings).

This is the independent check of the ONNX rewrite (``tests/test_prune_rewrite.py``,
``tests/test_prune_swin.py``): slicing torch parameters by the plan, with index arithmetic of its
own, must give what rewriting the graph gives.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import DeployCompError
from ..ir.structure import Structure
from ..latency.arch import ViTArch
from ..latency.flexvit import FlexViT
from .masks import MaskedLayerNorm
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


class SlicedWindowAttention(nn.Module):
    """timm's Swin ``WindowAttention`` cut to a plan's kept units, written out in torch on its own:
    separate q/k/v projections (QK may differ from V per head), the bias table's kept head columns
    with the same relative-position index, the source's softmax scale, the window mask as timm adds it.
    ``project`` gives the semantic-token design (``tokens/stvit_swin.py``) its q/k/v from two token sets."""

    def __init__(self, src: nn.Module, heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, emb: torch.Tensor):
        super().__init__()
        full = src.num_heads
        dim = src.qkv.out_features // (3 * full)
        self.num_heads, self.qk_dim, self.v_dim, self.scale = len(heads), len(qk), len(v), src.scale
        qk_rows = (heads[:, None] * dim + qk[None, :]).reshape(-1)
        v_rows = (heads[:, None] * dim + v[None, :]).reshape(-1)
        w, b = src.qkv.weight.detach(), src.qkv.bias.detach()
        self.q, self.k, self.v = (_linear(w[rows][:, emb], b[rows]) for rows in
                                  (qk_rows, qk_rows + full * dim, v_rows + 2 * full * dim))
        self.proj = _linear(src.proj.weight.detach()[emb][:, v_rows], src.proj.bias.detach()[emb])
        self.relative_position_bias_table = nn.Parameter(src.relative_position_bias_table.detach()[:, heads].clone())
        self.register_buffer("relative_position_index", src.relative_position_index.clone(), persistent=False)
        self.window_size = tuple(src.window_size)
        self.proj_drop = nn.Identity()

    def project(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q from ``queries``, k and v from ``keys`` (both normed), each (B, tokens, heads·dim)."""
        return self.q(queries), self.k(keys), self.v(keys)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, n, _ = x.shape

        def split(t: torch.Tensor, dim: int) -> torch.Tensor:
            return t.reshape(batch, n, self.num_heads, dim).transpose(1, 2)

        q = split(self.q(x), self.qk_dim) * self.scale
        k, v = split(self.k(x), self.qk_dim), split(self.v(x), self.v_dim)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = q @ k.transpose(-2, -1) + bias.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(-1, windows, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, -1))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _layernorm(src: "nn.LayerNorm | MaskedLayerNorm", keep: torch.Tensor) -> nn.LayerNorm:
    out = nn.LayerNorm(len(keep), eps=src.eps)
    with torch.no_grad():
        out.weight.copy_(src.weight[keep])
        out.bias.copy_(src.bias[keep])
    return out


def swin_from_timm(module: nn.Module, structure: Structure, plan: PrunePlan) -> nn.Module:
    """A copy of a timm ``SwinTransformer`` holding the plan's kept slices of its weights: per block
    heads / QK / V (``SlicedWindowAttention``) and MLP, and per stage the embedding channels — the
    patch embedding, every LayerNorm, and patch merging, whose LayerNorm and reduction read the 2x2
    neighbours' channels concatenated (slot-major: index = slot · C + c), so a channel kept in a
    stage is kept in all four slots. ``module`` may be one pruning trained (removed units masked to
    zero, LayerNorms masked) and may be Swin's semantic-token design (``SemanticTokenSwin``, the same
    children): the copy is then that design, cut to the plan."""
    keep = {g: torch.as_tensor(plan.kept(structure, g)) for g in structure.groups()}
    out = copy.deepcopy(module).eval()
    blocks = [blk for stage in out.layers for blk in stage.blocks]
    if len(blocks) != len(structure.blocks):
        raise DeployCompError(f"the module has {len(blocks)} Swin blocks, the structure {len(structure.blocks)}")
    emb = [keep[f"stage{s}.emb"] for s in range(len(structure.stage_embs))]
    with torch.no_grad():
        conv = out.patch_embed.proj
        new = nn.Conv2d(conv.in_channels, len(emb[0]), conv.kernel_size, conv.stride, conv.padding)
        new.weight.copy_(conv.weight[emb[0]])
        new.bias.copy_(conv.bias[emb[0]])
        out.patch_embed.proj = new
        if isinstance(out.patch_embed.norm, (nn.LayerNorm, MaskedLayerNorm)):  # (masked: a model pruning trained)
            out.patch_embed.norm = _layernorm(out.patch_embed.norm, emb[0])
        for s, stage in enumerate(out.layers):
            if s > 0 and not isinstance(stage.downsample, nn.Identity):
                c = structure.stage_embs[s - 1]
                merged = torch.cat([slot * c + emb[s - 1] for slot in range(4)])
                stage.downsample.norm = _layernorm(stage.downsample.norm, merged)
                red = stage.downsample.reduction
                stage.downsample.reduction = _linear(red.weight[emb[s]][:, merged],
                                                     red.bias[emb[s]] if red.bias is not None else None)
        for b, blk in zip(structure.blocks, blocks):
            e = emb[b.stage]
            heads, qk, v, mlp = (keep[f"block{b.index}.{k}"] for k in ("heads", "qk", "v", "mlp"))
            blk.attn = SlicedWindowAttention(blk.attn, heads, qk, v, e)
            blk.norm1, blk.norm2 = _layernorm(blk.norm1, e), _layernorm(blk.norm2, e)
            fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
            blk.mlp.fc1 = _linear(fc1.weight[mlp][:, e], fc1.bias[mlp])
            blk.mlp.fc2 = _linear(fc2.weight[e][:, mlp], fc2.bias[e])
        out.norm = _layernorm(out.norm, emb[-1])
        fc = out.head.fc
        out.head.fc = _linear(fc.weight[:, emb[-1]], fc.bias)
    return out.eval()
