"""What a pruning request says (the budget, the method, the recipe), validated without importing
torch or onnx, so that the command line refuses a bad request before anything heavy is loaded.
The schedule that carries it out is ``schedule.py``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import DeployCompError

METHODS = ("hessian", "magnitude", "uniform")

# Chunk sizes per kind (NViT: EMB 16, heads 2 of 12, QK 8, V 8, MLP 16). One head per chunk here:
# the models we prune have 3-12 heads, and the table prices each head count.
DEFAULT_GROUP_SIZES: dict[str, int] = {"emb": 16, "heads": 1, "qk": 8, "v": 8, "mlp": 16}

# The official code divides each kind's per-batch sum by a constant before squaring, so that kinds
# with very different numbers of coupled weights rank on one scale. EMB is shared by every block of
# a stage: None means "divide by the number of blocks in the stage" (12 for DeiT-B, as upstream).
NVIT_DIVISORS: dict[str, float | None] = {"emb": None, "heads": 12.0, "qk": 2.0, "v": 2.0, "mlp": 1.0}
# Without divisors, (sum g*w)^2 is the Fisher estimate of the loss change when the unit's gate
# goes from 1 to 0: already one scale for every kind.
UNIT_DIVISORS: dict[str, float | None] = {"emb": 1.0, "heads": 1.0, "qk": 1.0, "v": 1.0, "mlp": 1.0}
SALIENCY_NORMS = {"nvit": NVIT_DIVISORS, "none": UNIT_DIVISORS}
SELECTIONS = ("additive", "ratio")


@dataclass(frozen=True)
class LatencyBudget:
    """``0.5x`` (a fraction of the unpruned model's predicted latency) or ``12ms`` (absolute)."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> "LatencyBudget":
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(x|ms)\s*", str(text).lower())
        if not m:
            raise DeployCompError(f"latency budget '{text}': give a fraction like 0.5x or a time like 12ms")
        value, unit = float(m.group(1)), m.group(2)
        if value <= 0 or (unit == "x" and value >= 1):
            raise DeployCompError(f"latency budget '{text}': a fraction must lie in (0, 1), a time must be > 0")
        return cls(value, unit == "x")

    def target_ms(self, baseline_ms: float) -> float:
        return self.value * baseline_ms if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value:g}x" if self.relative else f"{self.value:g}ms"


@dataclass
class PruneConfig:
    """The pruning recipe. Defaults: NViT's method, 5 steps, no training (add ``kd_steps`` and
    ``finetune_epochs`` with data for accuracy)."""

    latency: str = "0.5x"
    method: str = "hessian"
    # how chunks are ranked: ratio (importance share per latency share, the knapsack greedy; default) or
    # additive (NViT's importance share - eta x latency share). NViT's rule with eta = 1 lost 6.7 pt to
    # ratio on the proxy at 0.3x: with tiny importance shares its latency term decides alone
    # (pruning/select.py, docs/ARCHITECTURE.md).
    selection: str = "ratio"
    eta: float = 1.0  # additive only: weight of the latency share against the importance share (0: latency-blind)
    # Per-kind divisors before squaring: none (the plain Fisher estimate; default) or nvit (upstream's
    # DeiT-B constants: on the proxy they pushed every block to one head, -12.6 pt vs -1.7 pt).
    saliency_norm: str = "none"
    group_sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_GROUP_SIZES))
    kinds: tuple[str, ...] = ("emb", "heads", "qk", "v", "mlp")
    steps: int = 5
    saliency_batches: int = 4  # NViT averages ~100; 4 x 32 keeps a DeiT-S compile under 5 min on 2 cores
    batch_size: int = 32
    kd_steps: int = 0  # optimizer steps of distillation from the unpruned model after each pruning step
    kd_lr: float = 2e-4
    finetune_epochs: int = 0  # recovery fine-tuning after the last step (distillation)
    finetune_lr: float = 5e-4
    teacher_logits: str | None = None  # stored top-K logits for the fine-tuning (else a live teacher)
    budget_rounds: int = 3  # extra steps while the measured ratio is over a relative budget (0: trust the table)
    budget_tolerance: float = 0.02  # measured ratio may exceed the budget by this fraction
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DeployCompError(f"unknown pruning method '{self.method}': use one of {', '.join(METHODS)}")
        LatencyBudget.parse(self.latency)
        if self.selection not in SELECTIONS:
            raise DeployCompError(f"unknown selection rule '{self.selection}': use {' or '.join(SELECTIONS)}")
        if self.saliency_norm not in SALIENCY_NORMS:
            raise DeployCompError(f"unknown saliency normalization '{self.saliency_norm}': use {', '.join(SALIENCY_NORMS)}")
        bad = set(self.kinds) - set(DEFAULT_GROUP_SIZES)
        if bad:
            raise DeployCompError(f"unknown group kinds {sorted(bad)}: use {', '.join(DEFAULT_GROUP_SIZES)}")
