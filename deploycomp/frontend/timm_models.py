"""timm models by name: every ViT and Swin in timm's own registry that deploycomp can read.

Names come from timm's registry (``timm.list_models``), not from a list kept here: a name is
accepted when timm registers it in one of :data:`TIMM_MODULES` and the model it builds has only
parts that structure discovery and the exported graph can express (:func:`unsupported_part`).
That is checked on the *meta* device (no memory, no weights: about 0.1 s), so an unsupported name
is refused in one line before any slow work. Weights come from a user's state dict file, never
from a hub.

Importing timm alone takes about 3 s (it imports torch and, eagerly, torchvision), longer than a
refusal should. So every verdict on timm's own names is also kept in ``timm_registry.json``, a
snapshot written by ``scripts/snapshot_timm_registry.py`` for one timm version and one version of
the checks (a hash of :func:`unsupported_part`'s source). When both match what runs, a name in the
snapshot is answered from it without importing timm; otherwise, and for names timm does not ship
(the proxies, designs), the live check runs. ``tests/test_sources.py`` re-derives a sample of it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import DeployCompError

# timm module -> the family name deploycomp reports
TIMM_MODULES = {"vision_transformer": "vit", "deit": "deit", "swin_transformer": "swin", "proxy": "deit", "proxy_swin": "swin"}


@dataclass(frozen=True)
class TimmModelSpec:
    name: str
    family: str  # "deit" | "vit" | "swin"
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3


def timm_input_shape(spec: TimmModelSpec, model_kwargs: dict[str, Any] | None = None) -> tuple[int, int, int, int]:
    """(1, C, H, W) the model takes, after constructor overrides (img_size, in_chans)."""
    kwargs = model_kwargs or {}
    img = kwargs.get("img_size", spec.img_size)
    h, w = (img, img) if isinstance(img, int) else tuple(img)
    return (1, int(kwargs.get("in_chans", spec.in_chans)), int(h), int(w))


def supported_timm_models() -> list[str]:
    """Every timm name in the supported modules (whether each one converts is checked on use)."""
    import timm

    from . import proxy  # noqa: F401  (registers the proxy model with timm)

    return sorted(n for module in TIMM_MODULES for n in timm.list_models(module=module))


SNAPSHOT = Path(__file__).with_name("timm_registry.json")


def checks_version() -> str:
    """A hash of the checks a snapshot's verdicts came from: a changed check invalidates them."""
    return hashlib.sha256(inspect.getsource(unsupported_part).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def registry_snapshot() -> dict[str, Any]:
    """The snapshot's verdicts by name when it was written for the installed timm and these checks,
    else {} (the live check then runs)."""
    try:
        snap = json.loads(SNAPSHOT.read_text())
    except (OSError, ValueError):
        return {}
    current = snap.get("timm") == metadata.version("timm") and snap.get("checks") == checks_version()
    return snap["models"] if current else {}


def live_verdict(name: str) -> dict[str, Any]:
    """What the snapshot records for ``name``: its spec, or the refusal's reason."""
    try:
        return {"spec": asdict(live_timm_spec(name))}
    except DeployCompError as exc:
        return {"refusal": str(exc)}


@lru_cache(maxsize=64)
def timm_spec(name: str) -> TimmModelSpec:
    """The spec of timm model ``name``, or a one-line refusal (unknown name, or a part that the
    compiler cannot express), decided without building weights; from the registry snapshot when it
    is current (no timm import), else live."""
    from ..design.registry import design_spec  # architectures written by `deploycomp design`

    designed = design_spec(name)
    if designed is not None:
        return designed
    verdict = registry_snapshot().get(name)
    if verdict is None:
        return live_timm_spec(name)
    if "refusal" in verdict:
        raise DeployCompError(verdict["refusal"])
    spec = dict(verdict["spec"])
    if isinstance(spec["img_size"], list):
        spec["img_size"] = tuple(spec["img_size"])
    return TimmModelSpec(**spec)


def live_timm_spec(name: str) -> TimmModelSpec:
    """``timm_spec`` decided by timm itself: its registry and the model built on the meta device."""
    import timm
    from timm.models import get_pretrained_cfg

    from . import proxy  # noqa: F401
    if not timm.is_model(name):
        raise DeployCompError(f"unknown model 'timm:{name}': not in timm's registry "
                              f"(deploycomp reads timm's {', '.join(m for m in TIMM_MODULES if not m.startswith('proxy'))} models)")
    module_name = next((m for m in TIMM_MODULES if timm.models.is_model_in_modules(name, [m])), None)
    if module_name is None:
        raise DeployCompError(f"timm:{name} is not a ViT or Swin that deploycomp reads (timm module "
                              f"'{timm.models.get_arch_name(name)}'); supported are timm's "
                              f"{', '.join(m for m in TIMM_MODULES if not m.startswith('proxy'))} models")
    meta = meta_model(name)
    reason = unsupported_part(meta)
    if reason:
        raise DeployCompError(f"timm:{name} cannot be compiled: {reason}")
    cfg = get_pretrained_cfg(name)
    img = tuple(meta.patch_embed.img_size) if hasattr(meta, "patch_embed") and meta.patch_embed.img_size else None
    if img is None and cfg is not None:
        img = tuple(cfg.input_size[1:])
    in_chans = meta.patch_embed.proj.in_channels
    return TimmModelSpec(name, TIMM_MODULES[module_name], img[0] if img[0] == img[1] else img, int(in_chans))


def meta_model(name: str, kwargs: dict[str, Any] | None = None):
    """timm model ``name`` built on the meta device: its structure without memory or weights."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **(kwargs or {}))
    except TypeError as exc:
        raise DeployCompError(f"bad model arguments for timm:{name}: {exc}") from None


def unsupported_part(model) -> str | None:
    """Why ``model`` (a timm module) cannot be compiled, or None: the parts structure discovery,
    the pruning rewrite and the exported graph do not express."""
    import torch.nn as nn
    from timm.layers import Mlp, PatchEmbed
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if isinstance(model, SwinTransformer):
        return None
    if not isinstance(model, VisionTransformer):
        return f"{type(model).__name__} is not a timm VisionTransformer"
    if type(model.patch_embed) is not PatchEmbed or not isinstance(model.patch_embed.proj, nn.Conv2d):
        return f"patch embedding {type(model.patch_embed).__name__} is not a plain Conv (hybrid CNN stems are not read)"
    if getattr(model, "attn_pool", None) is not None:
        return f"attention-pooling head (global_pool='{model.global_pool}')"
    if model.global_pool not in ("token", "avg", ""):
        return f"global_pool '{model.global_pool}' (token and avg are read)"
    if getattr(model, "dynamic_img_size", False):
        return "dynamic image size (position embeddings resampled at run time)"
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower() and not isinstance(m, nn.LayerNorm)]
    if norms:
        return f"{type(norms[0]).__name__} layers (LayerNorm is read)"
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            return f"block {i} is a {type(block).__name__} (parallel or post-norm blocks are not read)"
        attn = block.attn
        if type(attn) is not Attention:
            return f"block {i} attention is a {type(attn).__name__}"
        if any(not isinstance(getattr(attn, n, None), (nn.Identity, type(None))) for n in ("q_norm", "k_norm", "norm")):
            return f"block {i} has q/k norms or a norm inside the attention"
        if type(block.mlp) is not Mlp or not isinstance(getattr(block.mlp, "norm", None), (nn.Identity, type(None))):
            return f"block {i} MLP is a {type(block.mlp).__name__} (gated or normed MLPs are not read)"
    return None


def build_timm_model(name: str, weights: Path | None = None, model_kwargs: dict[str, Any] | None = None):
    """Create a timm model (random init, no download) and load a state dict strictly if given."""
    import timm

    from . import proxy  # noqa: F401  (registers the proxy model with timm)

    spec = timm_spec(name)
    kwargs = dict(model_kwargs or {})
    if kwargs:  # overrides can add parts (class_token=False, qk_norm=True, ...): check them first, cheaply
        reason = unsupported_part(meta_model(name, kwargs))
        if reason:
            raise DeployCompError(f"timm:{name} with {kwargs} cannot be compiled: {reason}")
    try:
        model = timm.create_model(spec.name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise DeployCompError(f"bad model arguments for timm:{name}: {exc}") from None
    if weights is not None:
        state = load_state_dict(weights)
        load_strict(model, state, weights)
    return model.eval()


def load_state_dict(path: Path) -> dict:
    """Read a state dict without running code from the file (safetensors or weights-only torch.load)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DeployCompError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeployCompError(f"corrupt or unreadable checkpoint {path}: {reason}") from None
    # Training checkpoints often wrap the weights ({"model": ...}, {"state_dict": ...}).
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise DeployCompError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def load_strict(model, state: dict, path: Path) -> None:
    """Load with an exact key and shape match; report the first offenders in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_few(mismatched)}")
    if problems:
        raise DeployCompError(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
