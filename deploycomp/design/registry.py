"""Designed architectures as timm models, found by name in a designs directory.

``deploycomp design`` writes ``OUT/design.json`` and a copy ``<designs dir>/<name>.json``; any
later process (``deploycomp train timm:<name>``, ``compile``, ``evaluate``) resolves the name
there and registers a timm entry point that builds the ``DesignedViT``, as ``frontend/proxy.py``
registers the proxy DeiT. The designs directory is ``$DEPLOYCOMP_DESIGNS`` if set, else
``$XDG_DATA_HOME/deploycomp/designs`` (``~/.local/share/deploycomp/designs``): like timm's own
model cache, it outlives the output directory, so a design is trained by its name alone.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import DeployCompError
from ..latency.arch import ViTArch

SCHEMA = "deploycomp.design"
VERSION = 1
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{2,80}$")
_REGISTERED: dict[str, ViTArch] = {}


def designs_dir() -> Path:
    env = os.environ.get("DEPLOYCOMP_DESIGNS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "deploycomp" / "designs"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise DeployCompError(f"design name '{name}': use 3-81 lowercase letters, digits and '_', starting with a "
                              "letter (it becomes a timm model name)")
    import timm

    if timm.is_model(name) and find_design(name) is None:  # timm's own model, not an earlier design
        raise DeployCompError(f"design name '{name}' is a built-in timm model; choose another")
    return name


def design_record(name: str, arch: ViTArch, info: dict[str, Any]) -> dict[str, Any]:
    from .model import arch_to_json

    return {"schema": SCHEMA, "version": VERSION, "name": name, "arch": arch_to_json(arch), **info}


def save_design(record: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/design.json`` and the registry copy (atomically); return the registry path."""
    from ..artifact import write_json

    check_name(record["name"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "design.json", record)
    reg = designs_dir()
    try:
        reg.mkdir(parents=True, exist_ok=True)
        tmp = reg / f".{record['name']}.json.tmp"
        write_json(tmp, record)
        tmp.replace(reg / f"{record['name']}.json")
    except OSError as exc:
        raise DeployCompError(f"cannot write the design registry {reg}: {exc} (set DEPLOYCOMP_DESIGNS)") from None
    return reg / f"{record['name']}.json"


def load_design(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeployCompError(f"unreadable design {path}: {exc}") from None
    if data.get("schema") != SCHEMA or data.get("version") != VERSION:
        raise DeployCompError(f"{path}: not a deploycomp design (version {VERSION})")
    return data


def find_design(name: str) -> ViTArch | None:
    """The architecture registered under ``name``, or None if no design has that name (decided
    without importing torch: a timm name's refusal must stay fast)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if not NAME_RE.match(name):
        return None
    path = designs_dir() / f"{name}.json"
    if not path.is_file():
        return None
    from .model import arch_from_json

    return register(name, arch_from_json(load_design(path)["arch"]))


def register(name: str, arch: ViTArch) -> ViTArch:
    """Register ``name`` as a timm entry point building ``DesignedViT(arch)`` (once per process)."""
    from timm.models import register_model

    if _REGISTERED.get(name) == arch:
        return arch

    def entry(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
        from .model import DesignedViT

        if pretrained:
            raise ValueError(f"{name} is a designed architecture without pretrained weights: train it")
        kwargs.pop("cache_dir", None)  # timm's download bookkeeping, meaningless here
        if kwargs:
            raise TypeError(f"a designed architecture takes no constructor arguments, got {sorted(kwargs)}")
        return DesignedViT(arch)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    import warnings

    with warnings.catch_warnings():  # re-registering a changed design of the same name is expected
        warnings.simplefilter("ignore")
        register_model(entry)
    _REGISTERED[name] = arch
    return arch


def design_spec(name: str):
    """A ``TimmModelSpec`` for a registered design (family deit: one token sequence, cls head)."""
    from ..frontend.timm_models import TimmModelSpec

    arch = find_design(name)
    if arch is None:
        return None
    return TimmModelSpec(name, "deit", img_size=arch.img_size, in_chans=arch.in_chans)
