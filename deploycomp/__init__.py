"""deploycomp: a hardware-aware deployment compiler for Vision Transformers."""

__version__ = "0.1.0"

from .api import CompileOptions, bench, compile, inspect  # noqa: E402

__all__ = ["CompileOptions", "bench", "compile", "inspect", "__version__"]
