"""Frontends: turn what the user names into an ONNX graph plus a reference to verify against.

``timm:<name>`` builds a timm model (random init, or ``--weights``) and exports it; a path to an
``.onnx`` file is read as it is. Either way the result is a :class:`Source`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from ..errors import DeployCompError


@dataclass
class Source:
    name: str
    family: str | None
    model: ir.Model
    input_shape: tuple[int, ...]  # batch 1
    reference: Callable[[np.ndarray], np.ndarray]
    reference_kind: str  # "torch" | "onnx"
    torch_module: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


def load_source(spec: str, weights: str | Path | None = None, model_kwargs: dict | None = None,
                opset: int = 18) -> Source:
    if spec.startswith("timm:"):
        return _load_timm(spec[len("timm:"):], weights, model_kwargs, opset)
    path = Path(spec)
    if path.suffix == ".onnx" or path.is_file():
        if weights is not None:
            raise DeployCompError("--weights applies to timm: models; an .onnx file carries its own weights")
        return load_onnx_file(path)
    raise DeployCompError(f"unknown model '{spec}': give timm:<name> or a path to an .onnx file")


def torch_reference(module) -> Callable[[np.ndarray], np.ndarray]:
    """The reference function of a torch module: images (N,C,H,W float32) -> logits, no autograd."""
    import torch

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return reference


def _load_timm(name: str, weights, model_kwargs, opset: int) -> Source:
    from .export import export_to_onnx
    from .timm_models import build_timm_model, timm_input_shape, timm_spec

    spec = timm_spec(name)
    module = build_timm_model(name, Path(weights) if weights else None, model_kwargs)
    kwargs = model_kwargs or {}
    input_shape = timm_input_shape(spec, kwargs)
    model = export_to_onnx(module, input_shape, opset)
    return Source(f"timm:{name}", spec.family, model, input_shape, torch_reference(module), "torch", module,
                  {"weights": str(weights) if weights else "random-init", "model_kwargs": kwargs, "opset": opset})


def load_onnx_file(path: Path) -> Source:
    import onnx

    from ..backends.ort import OrtCpuBackend

    path = Path(path)
    if not path.is_file():
        raise DeployCompError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - protobuf and checker errors alike mean a bad file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DeployCompError(f"not a valid ONNX model: {path}: {reason}") from None
    model = ir.serde.deserialize_model(proto)
    if len(model.graph.inputs) != 1:
        raise DeployCompError(f"{path}: expected one image input, found {len(model.graph.inputs)}")
    shape = model.graph.inputs[0].shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in list(shape)[1:]):
        raise DeployCompError(f"{path}: expected an image input (batch, C, H, W) with fixed C, H, W; got {shape}")
    original = proto.SerializeToString()
    run = OrtCpuBackend(optimization_level="disable").runner(original)
    return Source(path.name, None, model, (1, *[int(d) for d in list(shape)[1:]]), run, "onnx",
                  meta={"path": str(path), "opset": model.opset_imports.get("", None)})
