"""The proxy DeiT for accuracy work: a timm VisionTransformer on 28x28 grayscale Fashion-MNIST.

No pretrained weights are reachable here, so the project trains its own model on a real data set
(benchmarks/train_proxy.py). It is registered in timm's model registry, so ``timm.create_model``
and ``deploycomp compile timm:deit_fmnist_patch4_28 --weights ...`` treat it like any DeiT.
Patch 4 gives 7x7 = 49 patch tokens + cls (patch 2, DeiT's 14x14 geometry, costs 3.2-3.4x more per
training step here, benchmarks/bench_proxy_geometry.py: too slow for the one-hour training budget).
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

PROXY_ARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6,
                  num_heads=4, mlp_ratio=4.0)

# timm's pretrained-config registry: input geometry and normalization (no weights to download).
default_cfgs = generate_default_cfgs({
    "deit_fmnist_patch4_28": {"num_classes": 10, "input_size": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,),
                              "interpolation": "bilinear", "crop_pct": 1.0, "first_conv": "patch_embed.proj",
                              "classifier": "head", "license": "apache-2.0"},
})


@register_model
def deit_fmnist_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-style ViT (cls token, learned position embedding, pre-norm): 96 wide, 6 deep, 4 heads x 24."""
    if pretrained:
        raise ValueError("deit_fmnist_patch4_28 has no pretrained weights: train it (benchmarks/train_proxy.py)")
    return build_model_with_cfg(VisionTransformer, "deit_fmnist_patch4_28", pretrained, **{**PROXY_ARGS, **kwargs})


from . import proxy_swin  # noqa: E402,F401  (the dense proxy's Swin, registered with the proxy DeiT)
