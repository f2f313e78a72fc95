"""Frontends: turn what the user names into an ONNX graph plus a reference to verify against.

``timm:<name>`` builds a timm model (random init, or ``--weights``) and exports it; ``hf:DIR``,
``hf-config:JSON`` and ``open_clip:<arch>`` build the source library's module and convert it into
timm's ``VisionTransformer`` (frontend/canonical.py), which is exported while the library's own
module stays the reference; a path to an ``.onnx`` file is read as it is, and when a method needs a
torch model (pruning, semantic tokens) it gets a verified torch twin built from the graph
(frontend/onnx_twin.py). Either way the result is a :class:`Source`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import DeployCompError

if TYPE_CHECKING:  # onnx_ir, torch and the model libraries are imported where used (requests are checked first)
    import onnx_ir as ir

    from ..tokens.config import SemanticTokenConfig


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


TORCH_SOURCE_KINDS = ("timm", "hf", "hf-config", "open_clip")
SOURCE_FORMS = "timm:<name>, hf:<dir>, hf-config:<config.json>, open_clip:<arch> or a path to an .onnx file"


def load_source(spec: str, weights: str | Path | None = None, model_kwargs: dict | None = None,
                opset: int = 18, torch_twin: bool = False) -> Source:
    """The source ``spec`` names. ``torch_twin``: a bare ``.onnx`` file also gets a torch module (its
    verified twin, the graph's initializers renamed to its parameter names) for methods that train."""
    if spec.startswith("timm:"):
        return _load_timm(spec[len("timm:"):], weights, model_kwargs, opset)
    if spec.startswith(("hf:", "hf-config:", "open_clip:")):
        return _load_converted(spec, weights, model_kwargs, opset)
    path = Path(spec)
    if path.suffix == ".onnx" or path.is_file():
        if weights is not None:
            raise DeployCompError("--weights applies to timm: and open_clip: models; an .onnx file carries its own weights")
        src = load_onnx_file(path)
        if torch_twin:
            from .onnx_twin import with_torch_twin

            src = with_torch_twin(src)
        return src
    raise DeployCompError(f"unknown model '{spec}': give {SOURCE_FORMS}")


def check_source_spec(spec: str, weights: str | Path | None = None, model_kwargs: dict | None = None) -> None:
    """The cheap checks of a source spec (name known, files present, options that apply, and for
    hf:/hf-config:/open_clip: what their config file says), made before anything is built or
    loaded and, but for a timm: name (timm's registry), without importing torch."""
    kind, _, rest = spec.partition(":")
    if kind in ("hf", "hf-config", "open_clip"):
        if model_kwargs:
            raise DeployCompError(f"--model-arg applies to timm: models; {kind}: reads its architecture from "
                                  f"{'the config' if kind.startswith('hf') else 'open_clip'}")
        if kind.startswith("hf") and weights is not None:
            raise DeployCompError(f"--weights does not apply to {kind}: (hf:DIR reads the directory's safetensors)")
        if weights is not None and not Path(weights).is_file():
            raise DeployCompError(f"weights file not found: {weights}")
        if kind.startswith("hf"):
            from .hf import check_config_file

            check_config_file(kind, Path(rest))
        else:
            from .openclip import check_config

            check_config(rest)
    elif kind == "timm":
        from .timm_models import timm_spec

        timm_spec(rest)
        if weights is not None and not Path(weights).is_file():
            raise DeployCompError(f"weights file not found: {weights}")
    elif not Path(spec).is_file():
        raise DeployCompError(f"model file not found: {spec}" if spec.endswith(".onnx") else
                              f"unknown model '{spec}': give {SOURCE_FORMS}")


def check_compile_request(spec: str, weights: str | Path | None = None, model_kwargs: dict | None = None, *,
                          prune: bool = False, semantic_tokens: "bool | SemanticTokenConfig" = False) -> None:
    """Refuse a compile request that cannot succeed before the graph is loaded or anything is built:
    the source spec's cheap checks, and, for a torch source given a token config, what the token
    rewrite does not support (checked on the model built on the meta device: no weights, well under
    a second once its library is imported). A bare .onnx file asked for pruning or semantic tokens
    is checked when it is loaded: its graph is read for the torch twin (frontend/onnx_twin.py)
    before torch is imported or anything slow runs."""
    check_source_spec(spec, weights, model_kwargs)
    kind, _, rest = spec.partition(":")
    if is_torch_source(spec) and semantic_tokens and not isinstance(semantic_tokens, bool):
        grid = config_patch_grid(kind, rest)
        if grid is not None:  # read from the config file: refused before torch and the library are imported
            semantic_tokens.check_grid(grid)
        from ..tokens.stvit import check_supported

        meta = meta_module(spec, model_kwargs)
        resolved = semantic_tokens.for_model(meta)
        check_supported(meta, resolved)


def is_torch_source(spec: str) -> bool:
    """Whether ``spec`` names a torch model (built by its library) rather than an ONNX file."""
    return spec.partition(":")[0] in TORCH_SOURCE_KINDS


def meta_input_shape(module) -> tuple[int, int, int, int]:
    """The batch-1 input shape of a timm-structured module (``meta_module``'s), from its patch
    embedding: what the source's loader would give, without building it."""
    h, w = module.patch_embed.img_size
    return 1, int(module.patch_embed.proj.in_channels), int(h), int(w)


def config_patch_grid(kind: str, rest: str) -> tuple[int, int] | None:
    """The patch grid an hf:/hf-config:/open_clip: source's config file declares (None: not read
    from a file: timm, or an open_clip name resolved by open_clip itself)."""
    if kind.startswith("hf"):
        from .hf import check_config_file

        raw, arch = check_config_file(kind, Path(rest))
        vision = (raw.get("vision_config") or {}) if arch == "CLIPModel" else raw
        size, patch = vision.get("image_size", 224), vision.get("patch_size", 16 if arch.startswith(("ViT", "DeiT")) else 32)
    elif kind == "open_clip":
        from .openclip import bundled_config

        vision = (bundled_config(rest) or {}).get("vision_cfg")
        if not vision or not vision.get("patch_size"):
            return None
        size, patch = vision.get("image_size", 224), vision["patch_size"]
    else:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    return int(h) // int(patch), int(w) // int(patch)


def meta_module(spec: str, model_kwargs: dict | None = None):
    """The torch module a torch source becomes (timm's model; the canonical timm ViT of an hf: or
    open_clip: source), built on the meta device: its structure without memory or weights, and the
    converters' refusals, in well under a second after the libraries are imported. The same request
    is built once per process (the CLI's early checks and the compile's own ask for it again); callers
    only read it."""
    key = (spec, json.dumps(model_kwargs or {}, sort_keys=True, default=repr))
    if key not in _META_MODULES:
        if len(_META_MODULES) >= 4:
            _META_MODULES.pop(next(iter(_META_MODULES)))
        _META_MODULES[key] = _build_meta_module(spec, model_kwargs)
    return _META_MODULES[key]


_META_MODULES: dict[tuple[str, str], Any] = {}


def _build_meta_module(spec: str, model_kwargs: dict | None):
    kind, _, rest = spec.partition(":")
    if kind == "timm":
        from .timm_models import meta_model

        return meta_model(rest, model_kwargs)
    with _quiet_libraries(hf=kind.startswith("hf")):
        if kind in ("hf", "hf-config"):
            from .hf import meta_canonical

            return meta_canonical(kind, rest)
        from .openclip import meta_canonical

        return meta_canonical(rest)


def _convert(spec: str, weights, model_kwargs):
    """hf:, hf-config: and open_clip: sources: the library's module converted into timm's ViT (checked)."""
    check_source_spec(spec, weights, model_kwargs)
    kind, _, rest = spec.partition(":")
    with _quiet_libraries(hf=kind.startswith("hf")):
        if kind == "hf":
            from .hf import load_hf_dir

            return load_hf_dir(rest)
        if kind == "hf-config":
            from .hf import load_hf_config

            return load_hf_config(rest)
        from .openclip import load_open_clip

        return load_open_clip(rest, weights)


def _load_converted(spec: str, weights, model_kwargs, opset: int) -> Source:
    """hf:, hf-config: and open_clip: sources, converted and exported; the library's module is the reference."""
    from .export import export_to_onnx

    converted = _convert(spec, weights, model_kwargs)
    model = export_to_onnx(converted.module, converted.input_shape, opset)
    return Source(spec, converted.family, model, converted.input_shape, torch_reference(converted.original), "torch",
                  converted.module, {**converted.meta, "opset": opset})


@contextlib.contextmanager
def _quiet_libraries(hf: bool):
    """transformers' progress bars and open_clip's "no pretrained weights" warning say nothing the
    manifest does not record."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    bars = None
    if hf:
        from .canonical import import_optional

        transformers = import_optional("transformers", "hf")
        bars = transformers.utils.logging.is_progress_bar_enabled()
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()  # the load report: missing keys are refused by hf.py
    try:
        yield
    finally:
        root.setLevel(level)
        if hf:
            transformers.utils.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()


def source_reference(source: dict) -> Callable[[np.ndarray], np.ndarray]:
    """The reference function of an artifact's source, rebuilt from its manifest's ``source``
    section without exporting anything: what ``evaluate`` compares an embedding artifact with.

    hf-config: and open_clip: random init is seeded (the same weights every time); timm random init
    is not, so such a source cannot be rebuilt and is refused."""
    spec, weights = source["model"], source.get("weights")
    kind, _, rest = spec.partition(":")
    given = None if weights in (None, "random-init") else weights
    if kind == "timm":
        if given is None:
            raise DeployCompError(f"{spec} was compiled with random weights, which are not stored: there is no source "
                                  "to compare the artifact with (compile it with --weights)")
        from .timm_models import build_timm_model

        return torch_reference(build_timm_model(rest, Path(given), source.get("model_kwargs") or None))
    if kind in ("hf", "hf-config", "open_clip"):
        return torch_reference(_convert(spec, given if kind == "open_clip" else None, None).original)
    return load_onnx_file(Path(source.get("path", spec))).reference


def torch_reference(module) -> Callable[[np.ndarray], np.ndarray]:
    """The reference function of a torch module (or any callable on image tensors): images
    (N,C,H,W float32) -> logits or embedding, no autograd."""
    import torch

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return reference


def _load_timm(name: str, weights, model_kwargs, opset: int) -> Source:
    from .export import export_to_onnx
    from .timm_models import build_timm_model, timm_input_shape, timm_spec

    spec = timm_spec(name)
    if not weights:  # random init, seeded as hf-config and open_clip are: the same artifact from the same command
        import torch

        torch.manual_seed(0)
    module = build_timm_model(name, Path(weights) if weights else None, model_kwargs)
    kwargs = model_kwargs or {}
    input_shape = timm_input_shape(spec, kwargs)
    model = export_to_onnx(module, input_shape, opset)
    return Source(f"timm:{name}", spec.family, model, input_shape, torch_reference(module), "torch", module,
                  {"weights": str(weights) if weights else "random-init", "model_kwargs": kwargs, "opset": opset,
                   "output": timm_output(module)})


def timm_output(module) -> str:
    """What a timm model outputs: its pooled embedding when it has no classifier (num_classes=0),
    else logits. (A timm CLIP tower whose head is its image projection says so with
    ``CompileOptions.output`` / ``--output embedding``: its head looks like any linear classifier.)"""
    return "embedding" if int(getattr(module, "num_classes", 1) or 0) == 0 else "logits"


def load_onnx_file(path: Path) -> Source:
    """A bare .onnx file: its graph, checked, and ONNX Runtime running the file as the reference
    (the session is created on the first call: a graph refused while it is read never needs one)."""
    import onnx
    import onnx_ir as ir

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
    return Source(path.name, None, model, (1, *[int(d) for d in list(shape)[1:]]), _ort_reference(proto.SerializeToString()),
                  "onnx", meta={"path": str(path), "opset": model.opset_imports.get("", None)})


def _ort_reference(original: bytes) -> Callable[[np.ndarray], np.ndarray]:
    """ONNX Runtime (no graph optimizations) running ``original``, its session made on first use."""
    runner = None

    def reference(x: np.ndarray) -> np.ndarray:
        nonlocal runner
        if runner is None:
            from ..backends.ort import OrtCpuBackend

            runner = OrtCpuBackend(optimization_level="disable").runner(original)
        return runner(x)

    return reference
