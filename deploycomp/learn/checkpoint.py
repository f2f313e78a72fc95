"""Training checkpoints: written atomically (temp file + rename), read back without running code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import DeployCompError


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """A reader never sees a half-written file: a crash leaves the previous checkpoint in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DeployCompError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad or unsafe file
        raise DeployCompError(f"corrupt or unsafe checkpoint {path}: {str(exc).splitlines()[0]}") from None


def save_weights(path: Path, module: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    """The deployable weights as safetensors (what ``deploycomp compile --weights`` reads)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
