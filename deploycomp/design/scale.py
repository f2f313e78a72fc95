"""TinyViT-style scaling: shrink a given ViT uniformly until it meets the budget, and inherit its weights.

TinyViT (Wu et al., ECCV 2022, arXiv:2207.10666) obtains its small students by contracting a large
model's embedding width, heads, MLP width and depth under computation and parameter constraints,
then distils them. Here one width factor ``s`` scales EMB, the head count and the MLP width of
every block alike (head dims stay), and depth is kept when it fits (``--depth-range`` may clip
it); the largest ``s`` that meets the latency table's prediction and the caps is found by a root
finder (``scipy.optimize.brentq``) on the constraint slack, then snapped to the table's grid.
This is the uniform baseline the DeepMAD design has to beat.

The weight inheritance is ours (TinyViT trains its students from scratch): the small model takes
the first EMB channels, the first heads, the first MLP units and evenly spaced blocks of the large
one. It is exact where it can be: a model whose removed units and blocks contribute nothing (zero
output weights) keeps its function (``tests/test_design.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.optimize import brentq

from ..errors import DeployCompError
from ..latency.arch import BlockArch, ViTArch
from ..latency.predictor import LatencyPredictor
from .model import DesignedViT, count_params
from .solve import Budget, SearchSpace


def arch_of_vit(module) -> ViTArch:
    """The ViTArch of a timm DeiT-style VisionTransformer (one token sequence, cls-token head)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(module, VisionTransformer):
        raise DeployCompError(f"--from scales DeiT-style timm ViTs; {type(module).__name__} is not one")
    if module.num_prefix_tokens != 1 or module.global_pool != "token" or not module.has_class_token:
        raise DeployCompError("--from needs one cls token read by the head (DeiT)")
    blocks = []
    tokens = module.patch_embed.num_patches + 1
    for blk in module.blocks:
        attn = blk.attn
        heads = attn.num_heads
        head_dim = attn.qkv.out_features // (3 * heads)
        blocks.append(BlockArch(heads, head_dim, head_dim, blk.mlp.fc1.out_features, tokens))
    img = module.patch_embed.img_size
    return ViTArch(int(module.pos_embed.shape[-1]), tuple(blocks),  # (embed_dim goes stale when a pruner cuts EMB)
                   img_size=int(img[0]), patch=int(module.patch_embed.patch_size[0]),
                   in_chans=int(module.patch_embed.proj.in_channels), num_classes=int(module.num_classes))


def _snap(value: float, allowed: tuple[int, ...]) -> int:
    """The largest allowed value <= ``value`` (the smallest allowed one if none is)."""
    below = [a for a in allowed if a <= value + 1e-9]
    return max(below) if below else min(allowed)


def kept_blocks(depth: int, keep: int) -> list[int]:
    """Evenly spaced block indices, first and last included."""
    if keep >= depth:
        return list(range(depth))
    return sorted({int(round(i)) for i in np.linspace(0, depth - 1, keep)})


def scaled_arch(src: ViTArch, width: float, depth: int, space: SearchSpace) -> ViTArch:
    """``src`` with EMB, heads and MLP width scaled by ``width`` (head dims kept) and ``depth`` blocks."""
    emb = _snap(width * src.emb, space.emb)
    picked = [src.blocks[i] for i in kept_blocks(len(src.blocks), depth)]
    blocks = tuple(replace(b, heads=_snap(max(1.0, width * b.heads), space.heads), mlp_dim=_snap(width * b.mlp_dim, space.mlp))
                   for b in picked)
    return replace(src, emb=min(emb, src.emb), blocks=blocks)


@dataclass
class ScaleResult:
    arch: ViTArch
    width: float
    predicted_ms: float
    params: int
    flops: float
    blocks: list[int]  # source block of each kept block


def scale_uniform(predictor: LatencyPredictor, src: ViTArch, budget: Budget, space: SearchSpace) -> ScaleResult:
    """The widest uniform shrink of ``src`` meeting ``budget``, at the deepest depth of ``space`` that allows one."""

    def slack(width: float, depth: int) -> float:
        arch = scaled_arch(src, width, depth, space)
        over = predictor.predict(arch).total_ms / budget.latency_ms
        if budget.params is not None:
            over = max(over, count_params(arch) / budget.params)
        if budget.flops is not None:
            over = max(over, arch.flops() / budget.flops)
        return over - 1.0

    depths = sorted({min(max(len(src.blocks), min(space.depths)), max(space.depths))} |
                    {d for d in space.depths if d <= len(src.blocks)}, reverse=True)
    lo = 1e-3  # scales to the grid's floor
    for depth in depths:
        if slack(lo, depth) > 0:
            continue  # even the narrowest model of this depth is over budget
        width = 1.0 if slack(1.0, depth) <= 0 else brentq(lambda s: slack(s, depth), lo, 1.0, xtol=1e-5)
        for _ in range(100):  # the root may sit just on the infeasible side of a grid step
            if slack(width, depth) <= 0:
                break
            width = max(lo, width - 2e-5)
        else:
            raise AssertionError(f"internal: no feasible width below the root {width} at depth {depth}")
        arch = scaled_arch(src, width, depth, space)
        return ScaleResult(arch, width, predictor.predict(arch).total_ms, count_params(arch), arch.flops(),
                           kept_blocks(len(src.blocks), depth))
    raise DeployCompError(f"scaling down cannot meet {budget.describe()}: the narrowest uniform model at depth "
                          f"{min(depths)} is over budget; raise the budget or lower --depth-range")


def slice_vit(module, arch: ViTArch, blocks: list[int]) -> DesignedViT:
    """A DesignedViT of ``arch`` holding the leading slices of a timm ViT's weights (blocks ``blocks``)."""
    out = DesignedViT(arch).eval()
    e = arch.emb
    with torch.no_grad():
        out.patch_embed.weight.copy_(module.patch_embed.proj.weight[:e])
        out.patch_embed.bias.copy_(module.patch_embed.proj.bias[:e])
        out.cls_token.copy_(module.cls_token[..., :e])
        out.pos_embed.copy_(module.pos_embed[..., :e])
        for src_index, dst, b in zip(blocks, out.blocks, arch.blocks):
            src = module.blocks[src_index]
            width = src.attn.qkv.out_features // 3
            hd = width // src.attn.num_heads
            if (b.qk_dim, b.v_dim) != (hd, hd):
                raise DeployCompError(f"slicing keeps head dims: block {src_index} has {hd}, asked {b.qk_dim}/{b.v_dim}")
            rows = torch.arange(b.heads * hd)  # the first heads, whole
            w, bias = src.attn.qkv.weight, src.attn.qkv.bias
            for k, lin in enumerate((dst.attn.q, dst.attn.k, dst.attn.v)):
                lin.weight.copy_(w[rows + k * width, :e])
                lin.bias.copy_(bias[rows + k * width])
            dst.attn.scale = src.attn.scale
            dst.attn.proj.weight.copy_(src.attn.proj.weight[:e, : b.heads * hd])
            dst.attn.proj.bias.copy_(src.attn.proj.bias[:e])
            for a, c in ((src.norm1, dst.norm1), (src.norm2, dst.norm2)):
                c.weight.copy_(a.weight[:e])
                c.bias.copy_(a.bias[:e])
            m = b.mlp_dim
            dst.mlp[0].weight.copy_(src.mlp.fc1.weight[:m, :e])
            dst.mlp[0].bias.copy_(src.mlp.fc1.bias[:m])
            dst.mlp[2].weight.copy_(src.mlp.fc2.weight[:e, :m])
            dst.mlp[2].bias.copy_(src.mlp.fc2.bias[:e])
        out.norm.weight.copy_(module.norm.weight[:e])
        out.norm.bias.copy_(module.norm.bias[:e])
        out.head.weight.copy_(module.head.weight[:, :e])
        out.head.bias.copy_(module.head.bias)
    return out


def check_sliceable(module) -> None:
    """Refuse what ``slice_vit`` does not map: layer scale, q/k norms, a pre-norm, a non-linear head."""
    for i, blk in enumerate(module.blocks):
        for name in ("ls1", "ls2"):
            if not isinstance(getattr(blk, name, torch.nn.Identity()), torch.nn.Identity):
                raise DeployCompError(f"--from: block {i} has layer scale, which the designed model does not hold")
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(blk.attn, name, torch.nn.Identity()), torch.nn.Identity):
                raise DeployCompError(f"--from: block {i} attention has {name}, which the designed model does not hold")
    if not isinstance(getattr(module, "norm_pre", torch.nn.Identity()), torch.nn.Identity):
        raise DeployCompError("--from: the model has a pre-norm, which the designed model does not hold")
    if not isinstance(module.head, torch.nn.Linear):
        raise DeployCompError("--from: the model's head is not one linear layer")
