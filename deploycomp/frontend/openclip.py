"""open_clip sources: ``open_clip:<arch>`` (e.g. ``ViT-B-16``), random init or ``--weights``.

open_clip builds the architecture from its bundled config (no hub); ``--weights`` is a state dict
(safetensors, or a ``.pt``/``.bin`` read weights-only) of the whole CLIP model (``visual.*`` keys
are taken, the text tower's ignored), of the image tower alone, or an OpenAI CLIP state dict
(the same ``visual.*`` naming; OpenAI's towers use QuickGELU: give ``open_clip:ViT-B-16-quickgelu``).
The image tower is converted into timm's ``VisionTransformer`` and checked against open_clip's own
module (frontend/canonical.py).

Key mapping (``R`` = ``transformer.resblocks.i``):

=====================================================  =============================================
open_clip VisionTransformer                            timm
=====================================================  =============================================
conv1.weight (no bias)                                 patch_embed.proj.weight (pre-norm: no bias)
class_embedding (D,)                                   cls_token (1, 1, D)
positional_embedding (N+1, D)                          pos_embed (1, N+1, D)
ln_pre                                                 norm_pre
R.ln_1, R.ln_2                                         blocks.i.norm1, blocks.i.norm2
R.attn.in_proj_{weight,bias} (packed q, k, v)          blocks.i.attn.qkv.{weight,bias}
R.attn.out_proj                                        blocks.i.attn.proj
R.ls_1.gamma, R.ls_2.gamma (layer scale)               blocks.i.ls1.gamma, blocks.i.ls2.gamma
R.mlp.c_fc, R.mlp.c_proj                               blocks.i.mlp.fc1, blocks.i.mlp.fc2
ln_post                                                norm (per token), or fc_norm (final_ln_after_pool)
proj (D, E), x @ proj                                  head.weight = proj.T, head.bias = 0
=====================================================  =============================================

The output is the image embedding (``visual(x)``): the cls token (``pool_type='tok'``) or the mean of
the patch tokens (``'avg'``), normed, projected.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DeployCompError
from .canonical import VitGeometry, build_canonical, check_conversion, import_optional, load_converted
from .hf import Converted


# open_clip vision_cfg fields whose truthy value builds a tower the converter refuses (open_clip_geometry)
REFUSED_VISION_FIELDS = {"attentional_pool": "attentional pooling (CoCa)", "output_tokens": "token outputs",
                         "no_ln_pre": "no ln_pre (no_ln_pre)", "qk_norm": "q/k norms", "scaled_cosine_attn":
                         "scaled cosine attention", "scale_heads": "head scaling", "scale_attn_inner": "a norm inside the attention",
                         "scale_attn": "a norm after the attention", "scale_fc": "a norm in the MLP"}


def bundled_config(arch: str) -> dict | None:
    """open_clip's config of ``arch`` read without importing open_clip or torch (its bundled
    ``model_configs/<arch>.json``; open_clip's own registry once it is imported, which also holds
    configs added at run time); None where only open_clip can resolve the name (a hub or local-dir
    name) or it is not installed (``import_optional`` says so on use). An unknown name is refused."""
    import importlib.util
    import sys

    if ":" in arch:
        return None
    if "open_clip" in sys.modules:
        if sys.modules["open_clip"] is None:
            return None  # import blocked
        config = sys.modules["open_clip"].get_model_config(arch)
    else:
        spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / "model_configs" / f"{arch}.json"
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if config is None:
        raise DeployCompError(f"unknown open_clip architecture '{arch}' (open_clip.list_models() names them)")
    return config


def check_config(arch: str) -> None:
    """Refuse ``open_clip:<arch>`` from its config alone (:func:`bundled_config`: no open_clip, no
    torch, a fraction of a second): an unknown name, a ResNet or timm image tower, and the tower
    options the converter does not read. The tower built on the meta device
    (:func:`meta_canonical`) checks the rest."""
    config = bundled_config(arch)
    if config is None:
        return
    vision = config.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        raise DeployCompError(f"open_clip:{arch} has a timm image tower ({vision['timm_model_name']}): "
                              f"give timm:{vision['timm_model_name']} with its weights")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise DeployCompError(f"the open_clip image tower of {arch} is a ModifiedResNet, not a ViT")
    refused = [what for field, what in REFUSED_VISION_FIELDS.items() if vision.get(field)]
    if vision.get("pool_type", "tok") not in ("tok", "avg"):
        refused.append(f"pool_type '{vision['pool_type']}'")
    if refused:
        raise DeployCompError(f"open_clip:{arch}: its image tower has {refused[0]}, which the conversion to a timm "
                              "ViT does not read")


def _vision_config(arch: str):
    """(open_clip module, the architecture's config) with the refusals that need no model."""
    open_clip = import_optional("open_clip", "clip")
    check_config(arch)
    config = open_clip.get_model_config(arch)
    if config is None:
        raise DeployCompError(f"unknown open_clip architecture '{arch}' (open_clip.list_models() names them)")
    return open_clip, config


def meta_canonical(arch: str):
    """The canonical timm ViT of open_clip ``arch`` on the meta device (no memory, no weights):
    open_clip's own tower builder runs on the meta device and the converter's checks and geometry
    run on it, so an unsupported tower (attentional pooling, custom attention, a ResNet) is refused
    here, before anything is built for real."""
    import torch
    from open_clip.model import _build_vision_tower

    _, config = _vision_config(arch)
    try:
        with torch.device("meta"):
            visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False))
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise DeployCompError(f"open_clip could not build {arch}: {exc}") from None
    geometry = open_clip_geometry(visual)
    with torch.device("meta"):
        return build_canonical(geometry)


def load_open_clip(arch: str, weights: str | Path | None = None, seed: int = 0) -> Converted:
    """The image tower of open_clip architecture ``arch``, converted and checked."""
    import torch

    open_clip, _ = _vision_config(arch)
    meta_canonical(arch)  # refuses an unsupported tower before the real (slow) build
    torch.manual_seed(seed)
    try:
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DeployCompError(f"open_clip could not build {arch}: {exc}") from None
    visual = model.visual.eval()
    del model  # the text tower is not needed
    if weights is not None:
        _load_visual_weights(visual, Path(weights))
    return convert_open_clip_visual(visual, {"weights": str(weights) if weights else "random-init",
                                             "arch": arch})


def _load_visual_weights(visual, path: Path) -> None:
    from .timm_models import load_state_dict, load_strict

    state = load_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):  # a whole CLIP (open_clip or OpenAI): the image tower
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    load_strict(visual, state, path)


def open_clip_geometry(visual) -> VitGeometry:
    """The checks an open_clip image tower must pass to be converted, and the geometry of the timm
    ViT that holds it. Reads only module types and shapes, so it runs on a meta-device tower too."""
    import torch.nn as nn
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise DeployCompError(f"the open_clip image tower is a {type(visual).__name__}, not a ViT")
    if visual.attn_pool is not None:
        raise DeployCompError("open_clip tower with attentional pooling (CoCa) is not supported")
    if visual.pool_type not in ("tok", "avg") or getattr(visual, "output_tokens", False):
        raise DeployCompError(f"open_clip pool_type '{visual.pool_type}' (or token outputs) is not supported: "
                              "the output must be one pooled embedding")
    blocks = list(visual.transformer.resblocks)
    for i, b in enumerate(blocks):
        if type(b) is not ResidualAttentionBlock or hasattr(b, "ln_1_kv"):
            raise DeployCompError(f"open_clip block {i} is a {type(b).__name__} (custom attention: q/k norms, "
                                  "scaled cosine or head scaling); only the standard residual block converts")
        if b.attn.in_proj_weight is None or b.attn.in_proj_bias is None:
            raise DeployCompError(f"open_clip block {i}: attention without a packed biased in_proj is not supported")
    first = blocks[0]
    gelu = first.mlp.gelu
    if isinstance(gelu, QuickGELU):
        act = "quick_gelu"
    elif isinstance(gelu, nn.GELU):
        act = "gelu_tanh" if gelu.approximate == "tanh" else "gelu"
    else:
        raise DeployCompError(f"open_clip activation {type(gelu).__name__} is not supported")
    if any(type(b.mlp.gelu) is not type(gelu) for b in blocks):
        raise DeployCompError("open_clip blocks with different activations are not supported")
    layer_scale = not isinstance(first.ls_1, nn.Identity)
    if visual.conv1.bias is not None:
        raise DeployCompError("open_clip patch embedding with a bias is not supported")
    pre_norm = not isinstance(visual.ln_pre, nn.Identity)
    if not pre_norm:
        raise DeployCompError("open_clip tower without ln_pre (no_ln_pre) is not supported yet")
    d = visual.conv1.out_channels
    img, patch = visual.image_size, visual.patch_size
    geometry = VitGeometry(img_size=tuple(img), patch_size=patch[0], in_chans=visual.conv1.in_channels,
                           embed_dim=d, depth=len(blocks), num_heads=first.attn.num_heads,
                           mlp_dim=first.mlp.c_fc.out_features,
                           num_classes=visual.proj.shape[1] if visual.proj is not None else 0, act=act,
                           norm_eps=first.ln_1.eps, pre_norm=True,
                           global_pool="token" if visual.pool_type == "tok" else "avg",
                           fc_norm=bool(visual.final_ln_after_pool), layer_scale=layer_scale)
    if patch[0] != patch[1]:
        raise DeployCompError(f"open_clip patch {patch} is not square")
    return geometry


def convert_open_clip_visual(visual, meta: dict | None = None) -> Converted:
    """Convert an ``open_clip.transformer.VisionTransformer`` into the canonical timm ViT, checked."""
    import torch

    geometry = open_clip_geometry(visual)
    blocks = list(visual.transformer.resblocks)
    d, img, layer_scale = geometry.embed_dim, visual.image_size, geometry.layer_scale
    state = {"patch_embed.proj.weight": visual.conv1.weight, "cls_token": visual.class_embedding.reshape(1, 1, d),
             "pos_embed": visual.positional_embedding.unsqueeze(0),
             "norm_pre.weight": visual.ln_pre.weight, "norm_pre.bias": visual.ln_pre.bias}
    for i, b in enumerate(blocks):
        p = f"blocks.{i}"
        state.update({f"{p}.norm1.weight": b.ln_1.weight, f"{p}.norm1.bias": b.ln_1.bias,
                      f"{p}.attn.qkv.weight": b.attn.in_proj_weight, f"{p}.attn.qkv.bias": b.attn.in_proj_bias,
                      f"{p}.attn.proj.weight": b.attn.out_proj.weight, f"{p}.attn.proj.bias": b.attn.out_proj.bias,
                      f"{p}.norm2.weight": b.ln_2.weight, f"{p}.norm2.bias": b.ln_2.bias,
                      f"{p}.mlp.fc1.weight": b.mlp.c_fc.weight, f"{p}.mlp.fc1.bias": b.mlp.c_fc.bias,
                      f"{p}.mlp.fc2.weight": b.mlp.c_proj.weight, f"{p}.mlp.fc2.bias": b.mlp.c_proj.bias})
        if layer_scale:
            state.update({f"{p}.ls1.gamma": b.ls_1.gamma, f"{p}.ls2.gamma": b.ls_2.gamma})
    final = "fc_norm" if geometry.fc_norm else "norm"
    state.update({f"{final}.weight": visual.ln_post.weight, f"{final}.bias": visual.ln_post.bias})
    if visual.proj is not None:
        state.update({"head.weight": visual.proj.T, "head.bias": torch.zeros(visual.proj.shape[1])})
    module = build_canonical(geometry)
    load_converted(module, state, "open_clip VisionTransformer")
    input_shape = (1, visual.conv1.in_channels, int(img[0]), int(img[1]))
    rel = check_conversion(visual, module, input_shape, "open_clip image tower")
    return Converted("open_clip", module, visual, input_shape, "embedding",
                     {**(meta or {}), "converted_from": "open_clip VisionTransformer", "conversion_rel_l2": rel,
                      "output": "embedding"})
