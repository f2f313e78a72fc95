"""What distillation matches for a model, as a request names it (``--output-kind``,
``--feature-loss``): checked without importing torch, so a bad value is refused before anything
heavy is loaded. The teachers and losses themselves are in ``distill.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DeployCompError

if TYPE_CHECKING:
    import torch

    from .distill import EmbeddingTeacher, LiveTeacher

OUTPUTS = ("logits", "embedding")
FEATURE_LOSSES = ("cosine", "mse")


@dataclass(frozen=True)
class Objective:
    """What distillation matches for a model: the source's class probabilities (``logits``) or its
    embedding (``embedding``, with ``feature_loss``)."""

    output: str = "logits"
    feature_loss: str = "cosine"

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise DeployCompError(f"unknown model output '{self.output}': use one of {', '.join(OUTPUTS)}")
        if self.feature_loss not in FEATURE_LOSSES:
            raise DeployCompError(f"unknown feature loss '{self.feature_loss}': use one of {', '.join(FEATURE_LOSSES)}")

    @property
    def embedding(self) -> bool:
        return self.output == "embedding"

    def live_teacher(self, module: "torch.nn.Module") -> "LiveTeacher | EmbeddingTeacher":
        from .distill import EmbeddingTeacher, LiveTeacher

        return EmbeddingTeacher(module, self.feature_loss) if self.embedding else LiveTeacher(module)
