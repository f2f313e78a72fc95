"""timm model registry: the ViT families deploycomp compiles from a model name.

A registry entry says which family a timm name belongs to (structure discovery and the report
use it) and its input resolution. Weights come from a user's state dict file, never from a hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DeployCompError


@dataclass(frozen=True)
class TimmModelSpec:
    name: str
    family: str  # "deit" | "vit" | "swin"
    img_size: int = 224
    in_chans: int = 3


TIMM_MODELS: dict[str, TimmModelSpec] = {
    spec.name: spec
    for spec in (
        TimmModelSpec("deit_tiny_patch16_224", "deit"),
        TimmModelSpec("deit_small_patch16_224", "deit"),
        TimmModelSpec("deit_base_patch16_224", "deit"),
        TimmModelSpec("swin_tiny_patch4_window7_224", "swin"),
        TimmModelSpec("swin_small_patch4_window7_224", "swin"),
        TimmModelSpec("deit_fmnist_patch4_28", "deit", img_size=28, in_chans=1),  # frontend/proxy.py
    )
}


def timm_input_shape(spec: TimmModelSpec, model_kwargs: dict[str, Any] | None = None) -> tuple[int, int, int, int]:
    """(1, C, H, W) the model takes, after constructor overrides (img_size, in_chans)."""
    kwargs = model_kwargs or {}
    img = kwargs.get("img_size", spec.img_size)
    h, w = (img, img) if isinstance(img, int) else tuple(img)
    return (1, int(kwargs.get("in_chans", spec.in_chans)), int(h), int(w))


def timm_spec(name: str) -> TimmModelSpec:
    try:
        return TIMM_MODELS[name]
    except KeyError:
        from ..design.registry import design_spec  # architectures written by `deploycomp design`

        spec = design_spec(name)
        if spec is not None:
            return spec
        raise DeployCompError(
            f"unknown model 'timm:{name}': supported are "
            + ", ".join(f"timm:{n}" for n in TIMM_MODELS)
        ) from None


def build_timm_model(name: str, weights: Path | None = None, model_kwargs: dict[str, Any] | None = None):
    """Create a timm model (random init, no download) and load a state dict strictly if given."""
    import timm

    from . import proxy  # noqa: F401  (registers the proxy model with timm)

    spec = timm_spec(name)
    kwargs = dict(model_kwargs or {})
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
