"""The canonical torch module every ViT source is converted into: timm's ``VisionTransformer``.

Hugging Face ViT/DeiT/CLIP and open_clip image towers are the same computation as a timm ViT
(pre-norm blocks, fused qkv, GELU-family MLP, cls token and/or registers, a linear head), stored
under other names and layouts. Converting them into one module keeps pruning, semantic tokens and
training on one model family, and the exported graph has timm's initializer names. Each converter
fills a :class:`VitGeometry`, builds the timm module from it, copies the weights under its
documented key mapping, and checks the result against the original library's own module on a
random image (:func:`check_conversion`): a conversion that does not reproduce the source is
refused, never emitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from ..errors import DeployCompError

# Relative L2 between the converted module and the source library's module (fp32).
CONVERSION_TOLERANCE = 1e-4

# Activation names (Hugging Face ``hidden_act`` spelling) -> what timm's Mlp is built with.
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


@dataclass(frozen=True)
class VitGeometry:
    """What a timm ``VisionTransformer`` needs to hold a source's weights exactly."""

    img_size: int | tuple[int, int]
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_classes: int  # 0: the output is the pooled embedding itself
    act: str = "gelu"  # one of ACTIVATIONS
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    pre_norm: bool = False  # a LayerNorm after the embeddings (CLIP's ln_pre / pre_layrnorm)
    class_token: bool = True
    reg_tokens: int = 0  # extra prefix tokens after cls (registers; HF DeiT's distillation token)
    distilled: bool = False  # a second head on the distillation token, outputs averaged (DeiT WithTeacher)
    global_pool: str = "token"  # "token" | "avg" (mean of the patch tokens, prefix tokens excluded)
    fc_norm: bool = False  # the final norm after pooling instead of on every token (matters for "avg")
    layer_scale: bool = False  # per-channel gammas after attention and MLP (open_clip ls_init_value)

    def timm_kwargs(self) -> dict:
        import torch.nn as nn

        act = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "quick_gelu": "quick_gelu"}
        if self.act not in act:
            raise DeployCompError(f"activation '{self.act}' is not supported: use one of {', '.join(ACTIVATIONS)}")
        if self.embed_dim % self.num_heads:
            raise DeployCompError(f"embedding {self.embed_dim} is not a multiple of {self.num_heads} heads")
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    num_classes=self.num_classes, global_pool=self.global_pool, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_dim / self.embed_dim,
                    qkv_bias=self.qkv_bias, init_values=1.0 if self.layer_scale else None,
                    class_token=self.class_token, reg_tokens=self.reg_tokens, pre_norm=self.pre_norm,
                    fc_norm=self.fc_norm, norm_layer=partial(nn.LayerNorm, eps=self.norm_eps), act_layer=act[self.act])


def build_canonical(geometry: VitGeometry):
    """An (uninitialised-weights) timm ViT of ``geometry``; the converter then fills every tensor."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    cls = VisionTransformerDistilled if geometry.distilled else VisionTransformer
    module = cls(**geometry.timm_kwargs())
    hidden = module.blocks[0].mlp.fc1.out_features if geometry.depth else geometry.mlp_dim
    if hidden != geometry.mlp_dim:  # mlp_ratio is a float: refuse a width it cannot reproduce
        raise DeployCompError(f"MLP width {geometry.mlp_dim} cannot be expressed as a ratio of {geometry.embed_dim}")
    return module.eval()


def load_converted(module, state: dict, what: str) -> None:
    """Load a converted state dict into the canonical module with an exact key and shape match.

    A tensor the source does not have but the timm module does is only ever a bias or a layer-scale
    that the source does not apply; the converter passes it explicitly as zeros/ones, so a key still
    missing here is a converter bug, reported as such.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise DeployCompError(f"cannot convert {what} into a timm VisionTransformer: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {mismatched[:3]}")
    module.load_state_dict(state, strict=True)


def check_conversion(original: Callable, converted, input_shape: tuple[int, ...], what: str, seed: int = 0) -> float:
    """Relative L2 between the source library's output and the converted module's on one random
    image batch; refuses the conversion above :data:`CONVERSION_TOLERANCE`."""
    import torch

    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((2, *input_shape[1:])).astype(np.float32))
    with torch.inference_mode():
        want = original(x).float()
        got = converted(x).float()
    if want.shape != got.shape:
        raise DeployCompError(f"converted {what} gives shape {tuple(got.shape)}, the source {tuple(want.shape)}")
    rel = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-30))
    if not rel <= CONVERSION_TOLERANCE:
        raise DeployCompError(f"converted {what} does not reproduce the source: relative L2 {rel:.2e} > "
                              f"{CONVERSION_TOLERANCE:g}")
    return rel


def import_optional(module: str, extra: str):
    """Import an optional stack (transformers, open_clip) or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DeployCompError(f"this source needs the optional package '{module}' ({exc}): "
                              f"pip install 'deploycomp[{extra}]'") from None
