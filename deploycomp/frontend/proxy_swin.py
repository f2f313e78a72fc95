"""The proxy Swin for the dense task: a small timm SwinTransformer on 112 px Fashion-MNIST mosaics
(``learn/mosaic.py``), registered in timm's registry like the proxy DeiT.

Patch 4 and window 7 give three stages of 28, 14 and 7 tokens a side (a fourth would not divide
into windows). The classification variant (``deploycomp train timm:swin_mosaic_patch4_window7_112
--data mosaic-fashion-mnist``) labels a canvas with its majority garment; the segmenter
(``learn/segment.py``) builds the same backbone with ``features_only=True``.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

MOSAIC_SWIN_ARGS = dict(img_size=112, patch_size=4, window_size=7, in_chans=1, num_classes=10, embed_dim=32,
                        depths=(2, 2, 2), num_heads=(2, 4, 8), mlp_ratio=4.0)

default_cfgs = generate_default_cfgs({
    "swin_mosaic_patch4_window7_112": {"num_classes": 10, "input_size": (1, 112, 112), "mean": (0.2860,),
                                       "std": (0.3530,), "interpolation": "bilinear", "crop_pct": 1.0,
                                       "first_conv": "patch_embed.proj", "classifier": "head.fc",
                                       "license": "apache-2.0"},
})


@register_model
def swin_mosaic_patch4_window7_112(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin (EMB 32, depths 2-2-2, heads 2-4-8, window 7) for 112 px grayscale mosaics."""
    if pretrained:
        raise ValueError("swin_mosaic_patch4_window7_112 has no pretrained weights: train it "
                         "(benchmarks/train_mosaic.py)")
    args = {**MOSAIC_SWIN_ARGS, **kwargs}
    out_indices = args.pop("out_indices", tuple(range(len(args["depths"]))))
    return build_model_with_cfg(SwinTransformer, "swin_mosaic_patch4_window7_112", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **args)
