"""Hugging Face sources: ``hf:DIR`` (config.json + safetensors) and ``hf-config:JSON`` (random init).

transformers builds its own module from the user's files (``from_pretrained`` with
``local_files_only`` and ``use_safetensors``: no hub, no pickled code), which also handles
checkpoints saved under older key names; the module is then converted into timm's
``VisionTransformer`` and checked against it (frontend/canonical.py).

Key mapping (``B`` = ``vit`` / ``deit`` / ``vision_model``, ``L`` = ``B.layers.i`` (ViT/DeiT) or
``B.encoder.layers.i`` (CLIP); timm names on the right):

======================================================  =========================================
ViT / DeiT                                              timm
======================================================  =========================================
B.embeddings.patch_embeddings.projection.{weight,bias}  patch_embed.proj.{weight,bias}
B.embeddings.cls_token                                  cls_token
B.embeddings.distillation_token (DeiT)                  reg_token (one register; WithTeacher: dist_token)
B.embeddings.position_embeddings                        pos_embed
L.attention.{q,k,v}_proj.{weight,bias}                  blocks.i.attn.qkv.{weight,bias} (rows q, k, v)
L.attention.o_proj                                      blocks.i.attn.proj
L.layernorm_before / L.layernorm_after                  blocks.i.norm1 / blocks.i.norm2
L.mlp.fc1 / L.mlp.fc2                                   blocks.i.mlp.fc1 / blocks.i.mlp.fc2
B.layernorm                                             norm
classifier / cls_classifier, distillation_classifier    head, head_dist
======================================================  =========================================

=================================================  ============================================
CLIP vision tower                                  timm
=================================================  ============================================
B.embeddings.class_embedding (D,)                  cls_token (1, 1, D)
B.embeddings.patch_embedding.weight (no bias)      patch_embed.proj.weight (pre-norm: no bias)
B.embeddings.position_embedding.weight (N+1, D)    pos_embed (1, N+1, D)
B.pre_layrnorm                                     norm_pre
L.self_attn.{q,k,v}_proj, L.self_attn.out_proj     blocks.i.attn.qkv (rows q, k, v), blocks.i.attn.proj
L.layer_norm1 / L.layer_norm2, L.mlp.fc1 / fc2     blocks.i.norm1 / norm2, blocks.i.mlp.fc1 / fc2
B.post_layernorm                                   norm (per token; the cls token is pooled)
visual_projection.weight (no bias)                 head.weight, head.bias = 0
=================================================  ============================================

Outputs: ``*ForImageClassification*`` give logits; ``ViTModel`` / ``DeiTModel`` the final-normed
cls token (``last_hidden_state[:, 0]``; ViT's optional tanh pooler is not part of it);
``CLIPVisionModel`` its ``pooler_output`` and ``CLIPVisionModelWithProjection`` (also read from a
whole ``CLIPModel`` directory) its ``image_embeds``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DeployCompError
from .canonical import VitGeometry, build_canonical, check_conversion, import_optional, load_converted

# architecture -> (family, class transformers builds, output)
HF_ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "ViTModel": ("hf-vit", "ViTModel", "embedding"),
    "ViTForImageClassification": ("hf-vit", "ViTForImageClassification", "logits"),
    "DeiTModel": ("hf-deit", "DeiTModel", "embedding"),
    "DeiTForImageClassification": ("hf-deit", "DeiTForImageClassification", "logits"),
    "DeiTForImageClassificationWithTeacher": ("hf-deit", "DeiTForImageClassificationWithTeacher", "logits"),
    "CLIPVisionModel": ("hf-clip", "CLIPVisionModel", "embedding"),
    "CLIPVisionModelWithProjection": ("hf-clip", "CLIPVisionModelWithProjection", "embedding"),
    "CLIPModel": ("hf-clip", "CLIPVisionModelWithProjection", "embedding"),  # its image tower
}
# model_type -> architecture when config.json names none
DEFAULT_ARCHITECTURE = {"vit": "ViTModel", "deit": "DeiTModel", "clip_vision_model": "CLIPVisionModel",
                        "clip": "CLIPModel"}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_python_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


@dataclass
class Converted:
    """A source converted into the canonical timm ViT, with the original it was checked against."""

    family: str
    module: Any  # timm VisionTransformer
    original: Callable  # images -> the source library's output (the compile's reference)
    input_shape: tuple[int, int, int, int]
    output: str  # "logits" | "embedding"
    meta: dict[str, Any]


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeployCompError(f"cannot read Hugging Face config {path}: {exc}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise DeployCompError(f"{path} is not a Hugging Face model config (no model_type)")
    return config


def _architecture(config: dict, where: Path) -> str:
    names = config.get("architectures") or [DEFAULT_ARCHITECTURE.get(config["model_type"], "")]
    arch = names[0]
    if arch not in HF_ARCHITECTURES:
        raise DeployCompError(f"{where}: Hugging Face architecture '{arch or config['model_type']}' is not a supported "
                              f"ViT; supported are {', '.join(HF_ARCHITECTURES)}")
    return arch


def check_config_file(kind: str, path: Path) -> tuple[dict, str]:
    """(raw config, architecture) of ``hf:DIR`` or ``hf-config:JSON``, refused from the files alone
    (no transformers, no torch: a second at most) when they are missing or name an unsupported
    architecture or activation; transformers' module on the meta device checks the rest."""
    if kind == "hf":
        if not (path / "config.json").is_file():
            raise DeployCompError(f"hf:{path}: no config.json (give a local Hugging Face model directory)")
        if not any(path.glob("*.safetensors")):
            raise DeployCompError(f"hf:{path}: no .safetensors weights (only safetensors are read: they run no code); "
                                  "for random init from the config alone use hf-config:<config.json>")
        config_path = path / "config.json"
    else:
        if not path.is_file():
            raise DeployCompError(f"hf-config:{path}: file not found")
        config_path = path
    raw = _read_config(config_path)
    arch = _architecture(raw, path)
    tower = (raw.get("vision_config") or {}) if arch == "CLIPModel" else raw
    act = tower.get("hidden_act")
    if act is not None and act not in HF_ACTIVATIONS:
        raise DeployCompError(f"{arch}: activation '{act}' is not supported ({', '.join(HF_ACTIVATIONS)} are)")
    return raw, arch


def _dir_config(directory: Path):
    """(architecture, transformers config) of a local model directory, refused early when missing
    or unsupported; only config files are read."""
    raw, arch = check_config_file("hf", directory)
    transformers = import_optional("transformers", "hf")
    cls = getattr(transformers, HF_ARCHITECTURES[arch][1])
    try:
        config = cls.config_class.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DeployCompError(f"hf:{directory}: transformers could not read its config: {reason}") from None
    if arch == "CLIPModel":  # the tower's config, with the projection width the whole model declares
        config.projection_dim = raw.get("projection_dim", config.projection_dim)
    return arch, config


def _file_config(path: Path):
    """(architecture, transformers config) of a config.json given alone (hf-config:)."""
    raw, arch = check_config_file("hf-config", path)
    transformers = import_optional("transformers", "hf")
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        cfg = transformers.AutoConfig.for_model(raw["model_type"], **fields)
    except (ValueError, KeyError, TypeError) as exc:
        raise DeployCompError(f"hf-config:{path}: {exc}") from None
    if arch == "CLIPModel":  # the image tower and its projection, as from_pretrained reads them
        vision = cfg.vision_config
        vision.projection_dim = cfg.projection_dim
        cfg = vision
    return arch, cfg


def meta_canonical(kind: str, path: str | Path):
    """The canonical timm ViT of ``hf:DIR`` / ``hf-config:JSON`` on the meta device (no memory, no
    weights): transformers' module is built on the meta device from the config and the converter's
    checks and geometry run on it, so an unsupported model is refused before its weights are read."""
    arch, config = _dir_config(Path(path)) if kind == "hf" else _file_config(Path(path))
    return _meta_canonical(arch, config)


def _meta_canonical(arch: str, config):
    import torch

    transformers = import_optional("transformers", "hf")
    with torch.device("meta"):
        model = getattr(transformers, HF_ARCHITECTURES[arch][1])(config)
    _, geometry, _ = _hf_parts(model, arch)
    with torch.device("meta"):
        return build_canonical(geometry)


def load_hf_dir(directory: str | Path) -> Converted:
    """``hf:DIR``: the model transformers builds from a local directory, converted and checked."""
    directory = Path(directory)
    arch, config = _dir_config(directory)
    _meta_canonical(arch, config)  # refuses an unsupported model before its weights are read
    cls = getattr(import_optional("transformers", "hf"), HF_ARCHITECTURES[arch][1])
    try:
        model, info = cls.from_pretrained(str(directory), local_files_only=True, use_safetensors=True,
                                          output_loading_info=True, config=config)
    except (OSError, ValueError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DeployCompError(f"hf:{directory}: transformers could not load it: {reason}") from None
    broken = [k for k in ("missing_keys", "mismatched_keys") if info.get(k)]
    if broken:  # transformers would fill these with random values and only warn
        raise DeployCompError(f"hf:{directory}: the checkpoint does not fit {cls.__name__}: "
                              + "; ".join(f"{k.replace('_', ' ')} {sorted(map(str, info[k]))[:3]}" for k in broken))
    return convert_hf_module(model.eval(), arch, {"weights": str(directory)})


def load_hf_config(path: str | Path, seed: int = 0) -> Converted:
    """``hf-config:JSON``: random init (transformers' own, seeded) from a config file alone."""
    import torch

    path = Path(path)
    arch, cfg = _file_config(path)
    _meta_canonical(arch, cfg)  # refuses an unsupported model before the (slow) random init
    torch.manual_seed(seed)
    model = getattr(import_optional("transformers", "hf"), HF_ARCHITECTURES[arch][1])(cfg).eval()
    return convert_hf_module(model, arch, {"weights": "random-init", "config": str(path)})


def _hf_parts(model, arch: str):
    """The converter's checks, then (state dict under timm's names, geometry, the original's output
    function) of a transformers module. Reads types, shapes and references only: runs on a
    meta-device module too."""
    family = HF_ARCHITECTURES[arch][0]
    config = model.config
    act = HF_ACTIVATIONS.get(config.hidden_act)
    if act is None:
        raise DeployCompError(f"{arch}: activation '{config.hidden_act}' is not supported "
                              f"({', '.join(HF_ACTIVATIONS)} are)")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        raise DeployCompError(f"{arch}: heads x head_dim {config.num_attention_heads} x {head_dim} != hidden size "
                              f"{config.hidden_size}; the canonical ViT splits the embedding into heads")
    img = config.image_size
    common = dict(img_size=img if isinstance(img, int) else tuple(img), patch_size=int(config.patch_size),
                  in_chans=int(config.num_channels), embed_dim=config.hidden_size, depth=config.num_hidden_layers,
                  num_heads=config.num_attention_heads, mlp_dim=config.intermediate_size, act=act,
                  norm_eps=config.layer_norm_eps)
    if family == "hf-clip":
        return _clip_state(model, common)
    return _vit_state(model, arch, common)


def convert_hf_module(model, arch: str, meta: dict) -> Converted:
    """Convert a transformers ViT/DeiT/CLIP module (``arch``) into the canonical timm ViT, checked."""
    family, _, output = HF_ARCHITECTURES[arch]
    config = model.config
    state, geometry, original = _hf_parts(model, arch)
    module = build_canonical(geometry)
    load_converted(module, state, arch)
    img = config.image_size
    h, w = (img, img) if isinstance(img, int) else img
    input_shape = (1, int(config.num_channels), int(h), int(w))
    rel = check_conversion(original, module, input_shape, arch)
    return Converted(family, module, original, input_shape, output,
                     {**meta, "converted_from": f"transformers {arch}", "conversion_rel_l2": rel, "output": output})


def _qkv(attn, q: str, k: str, v: str, prefix: str, state: dict) -> None:
    import torch

    parts = [getattr(attn, n) for n in (q, k, v)]
    state[f"{prefix}.qkv.weight"] = torch.cat([p.weight for p in parts])
    if parts[0].bias is not None:
        state[f"{prefix}.qkv.bias"] = torch.cat([p.bias for p in parts])


def _linear(layer, name: str, state: dict, bias_len: int | None = None) -> None:
    import torch

    state[f"{name}.weight"] = layer.weight
    if layer.bias is not None:
        state[f"{name}.bias"] = layer.bias
    elif bias_len is not None:  # the timm layer has a bias the source does not apply
        state[f"{name}.bias"] = torch.zeros(bias_len)


def _norm(layer, name: str, state: dict) -> None:
    state[f"{name}.weight"] = layer.weight
    state[f"{name}.bias"] = layer.bias


def _vit_state(model, arch: str, common: dict):
    deit = arch.startswith("DeiT")
    backbone = getattr(model, "deit" if deit else "vit", model)
    emb = backbone.embeddings
    distilled = arch == "DeiTForImageClassificationWithTeacher"
    head = getattr(model, "cls_classifier" if distilled else "classifier", None)
    num_classes = head.out_features if hasattr(head, "out_features") else 0
    geometry = VitGeometry(**common, num_classes=num_classes, qkv_bias=bool(getattr(model.config, "qkv_bias", True)),
                           reg_tokens=1 if deit and not distilled else 0, distilled=distilled)
    state: dict = {}
    _linear(emb.patch_embeddings.projection, "patch_embed.proj", state)
    state["cls_token"] = emb.cls_token
    if deit:
        state["dist_token" if distilled else "reg_token"] = emb.distillation_token
    state["pos_embed"] = emb.position_embeddings
    for i, layer in enumerate(backbone.layers):
        _block(f"blocks.{i}", layer.attention, layer.attention.o_proj, layer.layernorm_before, layer.layernorm_after,
               layer.mlp, state)
    _norm(backbone.layernorm, "norm", state)
    if num_classes:
        _linear(head, "head", state)
    if distilled:
        _linear(model.distillation_classifier, "head_dist", state)

    if arch.endswith("Model"):
        def original(x):
            return model(pixel_values=x).last_hidden_state[:, 0]
    else:
        def original(x):
            return model(pixel_values=x).logits
    return state, geometry, original


def _block(prefix: str, attention, out_proj, norm1, norm2, mlp, state: dict) -> None:
    """One pre-norm encoder layer (separate q/k/v projections, fc1/fc2 MLP) under timm's block names."""
    _qkv(attention, "q_proj", "k_proj", "v_proj", f"{prefix}.attn", state)
    _linear(out_proj, f"{prefix}.attn.proj", state)
    _norm(norm1, f"{prefix}.norm1", state)
    _norm(norm2, f"{prefix}.norm2", state)
    _linear(mlp.fc1, f"{prefix}.mlp.fc1", state)
    _linear(mlp.fc2, f"{prefix}.mlp.fc2", state)


def _clip_state(model, common: dict):
    tower = getattr(model, "vision_model", model)
    emb = tower.embeddings
    projection = getattr(model, "visual_projection", None)
    geometry = VitGeometry(**common, num_classes=projection.out_features if projection is not None else 0,
                           pre_norm=True)
    d = common["embed_dim"]
    state: dict = {"patch_embed.proj.weight": emb.patch_embedding.weight,
                   "cls_token": emb.class_embedding.reshape(1, 1, d),
                   "pos_embed": emb.position_embedding.weight.unsqueeze(0)}
    if emb.patch_embedding.bias is not None:
        raise DeployCompError("CLIP patch embedding with a bias: the canonical pre-norm ViT has none")
    _norm(tower.pre_layrnorm, "norm_pre", state)
    for i, layer in enumerate(tower.encoder.layers):
        _block(f"blocks.{i}", layer.self_attn, layer.self_attn.out_proj, layer.layer_norm1, layer.layer_norm2,
               layer.mlp, state)
    _norm(tower.post_layernorm, "norm", state)
    if projection is not None:
        _linear(projection, "head", state, bias_len=projection.out_features)

        def original(x):
            return model(pixel_values=x).image_embeds
    else:
        def original(x):
            return model(pixel_values=x).pooler_output
    return state, geometry, original
