"""Every pass module; importing this registers their passes (``base.build_pass`` does it lazily)."""

from . import cleanup, discover, fuse, precision, prune, quantize, semantic_tokens, verify  # noqa: F401
