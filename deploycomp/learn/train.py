"""The trainer: one recipe for training from scratch, fine-tuning and distillation.

Plain AdamW (timm's parameter groups: no weight decay on norms, biases, embeddings), per-step
linear warm-up then cosine decay (timm's scheduler), seeded shift/flip augmentation, label
smoothing, and optionally a teacher (stored top-K logits or a live model; for a model that
outputs an embedding, the live source's embedding under a feature loss, without labels). Runs
alone or under ``torchrun`` (on the CPU), or alone on a CUDA device (``device``: a lent GPU trains
the proxy in minutes; the weights come back as the same safetensors); checkpoints atomically every ``save_every_s`` seconds and at each
epoch end, and resumes mid-epoch to the same weights an uninterrupted run reaches.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from ..errors import DeployCompError
from .checkpoint import load_checkpoint, save_checkpoint, save_weights
from .data import ImageSet
from .distill import ViewSpec
from .distributed import World
from .evaluate import evaluate_module, module_cosine

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"


@dataclass
class TrainConfig:
    """The recipe; the defaults are the proxy DeiT's (benchmarks/train_proxy.py)."""

    epochs: int = 20
    batch_size: int = 128  # global: split over ranks
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    max_shift: int = 2
    flip: bool = True
    seed: int = 0
    kd_weight: float = 1.0  # share of the loss from the teacher's soft targets when a teacher is given
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    save_every_s: float = 60.0
    max_steps: int | None = None  # stop after this many optimizer steps in this call (tests, time limits)
    device: str = "cpu"  # where the model trains: cpu, cuda, cuda:N (not part of the recipe: a run may resume elsewhere)

    @property
    def view(self) -> ViewSpec:
        return ViewSpec(self.seed, self.max_shift, self.flip)


# The fields that must agree for a checkpoint to be resumed by a run.
RECIPE_KEYS = ("epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "weight_decay", "label_smoothing",
               "max_shift", "flip", "seed", "kd_weight")


class Teacher(Protocol):
    """Soft class targets mixed with the labels (``uses_labels``), or an embedding target alone."""

    uses_labels: bool

    def targets(self, epoch: int, indices: torch.Tensor, seeds: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device) -> "Teacher":
        """Return targets on ``device`` (a live teacher runs there)."""
        ...


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    train_seconds: float = 0.0

    @property
    def test_accuracy(self) -> float | None:
        """The last evaluated top-1 of a finished run."""
        if not self.finished:
            return None
        return next((r["test_accuracy"] for r in reversed(self.history) if "test_accuracy" in r), None)


def train_device(name: str, world: World = World()) -> torch.device:
    """The torch device ``name`` names, or one line saying why it cannot train here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeployCompError(f"unknown training device '{name}': use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeployCompError(f"training runs on cpu or cuda, not '{name}'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeployCompError(f"--device {name}: this torch sees no CUDA device (torch {torch.__version__}); "
                                  "train with --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeployCompError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        if world.size > 1:
            raise DeployCompError("distributed training (torchrun) runs on the CPU; on a GPU train in one process")
    return device


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def fit(model: torch.nn.Module, train: ImageSet, test: ImageSet | None, config: TrainConfig, *,
        out_dir: str | Path | None = None, teacher: Teacher | None = None, world: World = World(),
        resume: bool = True, run_info: dict[str, Any] | None = None, log: Callable[[str], None] | None = None,
        progress: Callable[[int, int, dict], None] | None = None,
        after_step: Callable[[], None] | None = None) -> TrainResult:
    """Train ``model`` in place. With ``out_dir``, checkpoint there and resume from it if present.

    ``run_info`` (model name, data, teacher, ...) is stored in the checkpoint; a resume must match it
    and the recipe, so a run directory can never silently continue a different run.
    ``after_step`` runs after every optimizer step (pruning uses it to keep removed units at zero).
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    device = train_device(config.device, world)
    if config.batch_size % world.size:
        raise DeployCompError(f"batch size {config.batch_size} does not split over {world.size} processes")
    steps_per_epoch = len(train) // config.batch_size
    if steps_per_epoch == 0:
        raise DeployCompError(f"{len(train)} training samples are fewer than one batch of {config.batch_size}")
    total_steps = steps_per_epoch * config.epochs
    say = log if (log and world.is_main) else (lambda msg: None)
    # a teacher without labels (EmbeddingTeacher) makes this feature distillation: no label loss,
    # and the test score is the mean cosine to the teacher's embedding instead of top-1
    features = teacher is not None and not getattr(teacher, "uses_labels", True)
    model.to(device)
    if teacher is not None:
        teacher = teacher.to(device)

    def park() -> None:  # callers export and compile the model (and reuse a live teacher) on the CPU
        model.to("cpu")
        if teacher is not None:
            teacher.to(torch.device("cpu"))

    optimizer = create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=config.min_lr,
                                  warmup_t=int(config.warmup_epochs * steps_per_epoch), warmup_lr_init=config.lr * 1e-3,
                                  t_in_epochs=False)
    result = TrainResult()
    start_epoch, start_step = 0, 0
    ckpt_path = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        saved = {k: state["config"].get(k) for k in RECIPE_KEYS}
        if saved != {k: getattr(config, k) for k in RECIPE_KEYS}:
            raise DeployCompError(f"{ckpt_path} was trained with another recipe {saved}; use a new output directory")
        if state.get("run_info", {}) != (run_info or {}):
            raise DeployCompError(f"{ckpt_path} belongs to another run {state.get('run_info')}; use a new output directory")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_step = state["epoch"], state["step"]
        result.history, result.train_seconds = list(state["history"]), float(state["train_seconds"])
        say(f"{ckpt_path}: finished run, reused" if start_epoch >= config.epochs else
            f"resumed from {ckpt_path} at epoch {start_epoch + 1} step {start_step}/{steps_per_epoch}")

    net = model
    if world.size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)

    def checkpoint(epoch: int, step: int) -> None:
        if ckpt_path is not None and world.is_main:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "epoch": epoch, "step": step, "history": result.history,
                                        "train_seconds": result.train_seconds, "config": asdict(config),
                                        "run_info": run_info or {}})

    steps_run = 0
    last_save = time.monotonic()
    for epoch in range(start_epoch, config.epochs):
        order = epoch_order(config.seed, epoch, len(train))
        first = start_step if epoch == start_epoch else 0
        model.train()
        loss_sum, seen, t_epoch = torch.zeros((), device=device), 0, time.monotonic()
        for step in range(first, steps_per_epoch):
            if config.max_steps is not None and steps_run >= config.max_steps:
                result.train_seconds += time.monotonic() - t_epoch
                checkpoint(epoch, step)
                park()
                return result
            t0 = time.monotonic()
            idx = world.shard(order[step * config.batch_size:(step + 1) * config.batch_size])
            seeds = config.view.seeds(epoch, idx)
            x = train.normalize(config.view.view(train.images[idx], seeds)).to(device)
            labels = train.labels[idx].to(device)
            out = net(x)
            if features:  # an embedding model: matched to the teacher's embedding, labels unused
                loss = teacher.loss(out, teacher.targets(epoch, idx, seeds, x))
            else:
                loss = F.cross_entropy(out, labels, label_smoothing=config.label_smoothing)
                if teacher is not None and config.kd_weight > 0:
                    kd = teacher.loss(out, teacher.targets(epoch, idx, seeds, x))
                    loss = config.kd_weight * kd + (1.0 - config.kd_weight) * loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            steps_run += 1
            scheduler.step_update(epoch * steps_per_epoch + step + 1)
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
            result.train_seconds += time.monotonic() - t0
            if progress and world.is_main:
                progress(epoch * steps_per_epoch + step + 1, total_steps,
                         {"epoch": epoch + 1, "loss": float(loss_sum) / seen})
            if time.monotonic() - last_save >= config.save_every_s:
                checkpoint(epoch, step + 1)
                last_save = time.monotonic()
        row: dict[str, Any] = {"epoch": epoch + 1,
                               "train_loss": float(world.sum(loss_sum.cpu())) / max(1, int(world.sum(torch.tensor(seen)))),
                               "epoch_seconds": time.monotonic() - t_epoch, "train_seconds": result.train_seconds,
                               "lr": optimizer.param_groups[0]["lr"]}
        if test is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            if features:
                row["test_cosine"] = module_cosine(model, teacher.module, test, world=world)
            else:
                row["test_accuracy"] = evaluate_module(model, test, world=world)
        result.history.append(row)
        say(_epoch_line(row, config.epochs, result.train_seconds))
        checkpoint(epoch + 1, 0)
        last_save = time.monotonic()
    result.finished = True
    park()
    if out_dir is not None and world.is_main:
        save_weights(Path(out_dir) / WEIGHTS, model)
    return result


def _epoch_line(row: dict, epochs: int, seconds: float) -> str:
    eta = seconds / row["epoch"] * (epochs - row["epoch"])
    acc = f"  test top-1 {row['test_accuracy']:.2f} %" if "test_accuracy" in row else ""
    acc += f"  test cosine to the teacher {row['test_cosine']:.5f}" if "test_cosine" in row else ""
    return (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}{acc}  "
            f"{row['epoch_seconds']:.0f} s/epoch  elapsed {seconds / 60:.1f} min  eta {eta / 60:.1f} min")
