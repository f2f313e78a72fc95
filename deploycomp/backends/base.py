"""Backend registry: a target compiles the IR into an artifact and runs it.

A backend is what ``--target`` names. It must be able to (1) say whether it can run here,
(2) fingerprint the device, (3) run an ONNX model for verification, profiling and bench, and
(4) write the deployable artifact. Backends register themselves by name like timm's models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import onnx_ir as ir

from ..errors import DeployCompError

Runner = Callable[[np.ndarray], np.ndarray]


class Backend(Protocol):
    name: str

    def check_available(self) -> None:
        """Raise DeployCompError saying what is missing if this target cannot run here."""

    def fingerprint(self) -> dict[str, Any]: ...

    def runner(self, model: ir.Model | bytes | Path) -> Runner: ...

    def emit(self, model: ir.Model, out_dir: Path) -> dict[str, Any]:
        """Write the artifact files into ``out_dir``; return what the manifest should record."""


_BACKENDS: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str):
    def deco(factory):
        _BACKENDS[name] = factory
        return factory

    return deco


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str, **options) -> Backend:
    from . import ort, tensorrt  # noqa: F401  (register their targets; tensorrt imports TensorRT only when used)

    if name not in _BACKENDS:
        raise DeployCompError(f"unknown target '{name}': available targets are {', '.join(backend_names())}")
    backend = _BACKENDS[name](**options)
    backend.check_available()
    return backend
