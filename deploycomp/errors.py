"""User-facing errors.

Every problem caused by the user's input (a missing file, a corrupt checkpoint, a graph that is
not a ViT, an unknown target...) is raised as a :class:`DeployCompError`; the CLI prints its
message as one line and exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DeployCompError(Exception):
    """An error in the user's input or environment, reported as one line."""

    exit_code = 2


class NotAViTError(DeployCompError):
    """The ONNX graph does not have the structure of a Vision Transformer."""

    def __init__(self, missing: str):
        super().__init__(f"not a ViT: {missing}")


class VerificationError(DeployCompError):
    """A compiled graph disagrees numerically with its reference: no artifact is emitted."""


class PassFailedError(DeployCompError):
    """A pass broke a precondition, a postcondition or a pipeline invariant."""

    def __init__(self, pass_name: str, reason: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}' failed: {reason}")


class DeployCompWarning(UserWarning):
    """Something the user should know that does not stop the job (e.g. a drifted latency table)."""
