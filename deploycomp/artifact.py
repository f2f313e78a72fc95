"""Writing an artifact directory atomically.

Everything is written into a hidden staging directory next to the destination and renamed into
place only when complete, so a failed or interrupted compile never leaves a partial artifact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import DeployCompError

MANIFEST = "manifest.json"


def check_output_dir(out: Path) -> None:
    """Fail early, before any work, if ``out`` cannot be created or replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DeployCompError(f"output path exists and is not a directory: {out}")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise DeployCompError(f"output directory {out} is not empty and holds no deploycomp artifact; refusing to overwrite")
    parent = out.resolve().parent
    try:  # a real probe: permission bits do not tell for root, read-only mounts or /proc
        parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".probe", dir=parent))
    except OSError as exc:
        raise DeployCompError(f"output directory is not writable: {out} ({exc.strerror})") from None
    if out.is_dir() and not os.access(out, os.W_OK):
        raise DeployCompError(f"output directory is not writable: {out}")


@contextlib.contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces ``out``, on failure it is removed."""
    out = Path(out).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise DeployCompError(f"cannot write to {out.parent}: {exc.strerror}") from None
    try:
        yield staging
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n", encoding="utf-8")


def _jsonable(obj: Any):
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def model_bytes(model: Path) -> int:
    """Bytes of what a runtime loads: an .onnx with any external data, or an IR's .xml + .bin (or
    an engine file alone)."""
    model = Path(model)
    files = [model, model.with_suffix(".bin")] if model.suffix == ".xml" else [model, *model.parent.glob(model.name + ".data")]
    return sum(f.stat().st_size for f in files if f.exists())


def read_manifest(artifact: Path) -> dict:
    artifact = Path(artifact)
    path = artifact / MANIFEST if artifact.is_dir() else artifact
    if not path.is_file():
        raise DeployCompError(f"no deploycomp artifact at {artifact} (missing {MANIFEST})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DeployCompError(f"corrupt manifest {path}: {exc}") from None
