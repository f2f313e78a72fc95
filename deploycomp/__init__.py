"""deploycomp: a hardware-aware deployment compiler for Vision Transformers."""

__version__ = "0.1.0"

__all__ = ["CompileOptions", "bench", "compile", "inspect", "__version__"]


def __getattr__(name: str):
    """The API's verbs, imported on first use: ``python -m deploycomp`` (the CLI) checks a request
    before the compiler's heavy modules (onnx, torch, the runtimes) are loaded."""
    if name in ("CompileOptions", "bench", "compile", "inspect"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'deploycomp' has no attribute '{name}'")
