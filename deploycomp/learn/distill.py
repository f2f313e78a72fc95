"""Knowledge distillation as in TinyViT: the teacher's sparse soft labels, stored once, read back.

A one-off pass runs the teacher on exactly the augmented views the student will see (the view
seed is derived from (run seed, epoch, sample index) and stored with each record) and keeps the
top-K softmax probabilities (fp16) and class indices (int16). Records have a fixed size, so a
rank reads its samples by seeking. Training rebuilds a dense target by spreading the missing mass
1 - sum(top-K) uniformly over the other classes.

A model that outputs an embedding (a CLIP image tower, a ViT without a classifier) has no classes
to soften: its distillation matches the source's embedding itself (:class:`EmbeddingTeacher`, a
cosine or normalized-MSE feature loss), and labels play no part. :class:`Objective` says which of
the two a compile distils with; it is decided by the source (``Source.meta["output"]``), never by
the shape of an output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DeployCompError
from .data import ImageSet, augment, view_seeds
from .objective import FEATURE_LOSSES, OUTPUTS, Objective  # noqa: F401  (imported from here too)

MAGIC = b"DCKDLOG1"
ALIGN = 64


def records_offset(header_bytes: int) -> int:
    """Records start after magic, header length and JSON header, aligned to ``ALIGN`` bytes."""
    return -(-(len(MAGIC) + 4 + header_bytes) // ALIGN) * ALIGN


def record_dtype(topk: int) -> np.dtype:
    return np.dtype([("seed", "<i8"), ("prob", "<f2", (topk,)), ("index", "<i2", (topk,))])


@dataclass(frozen=True)
class ViewSpec:
    """What decides the augmented view of sample i in epoch e; stored logits are only valid for it."""

    seed: int
    max_shift: int = 2
    flip: bool = True

    def seeds(self, epoch: int, indices: torch.Tensor) -> torch.Tensor:
        return view_seeds(self.seed, epoch, indices)

    def view(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return augment(images, seeds, self.max_shift, self.flip)


def dense_targets(prob: torch.Tensor, index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Top-K probabilities [B, K] at ``index`` -> dense [B, C]; the missing mass spread evenly."""
    prob = prob.float()
    k = prob.shape[1]
    rest = (1.0 - prob.sum(1, keepdim=True)).clamp_min(0.0) / max(num_classes - k, 1)
    out = rest.expand(-1, num_classes).clone() if k < num_classes else torch.zeros(prob.shape[0], num_classes)
    return out.scatter_(1, index.long(), prob)


def store_teacher_logits(teacher: torch.nn.Module, data: ImageSet, path: str | Path, *, epochs: int,
                         view: ViewSpec, topk: int, batch_size: int = 128,
                         progress: Callable[[int, int], None] | None = None) -> dict:
    """Run ``teacher`` on every sample's view in each of ``epochs`` epochs; write the top-K file atomically."""
    path = Path(path)
    n = len(data)
    teacher.eval()
    with torch.inference_mode():
        num_classes = int(teacher(data.normalize(data.images[:1])).shape[1])
    if not 0 < topk <= num_classes or num_classes > np.iinfo(np.int16).max:
        raise DeployCompError(f"top-K must be in 1..{num_classes} (got {topk})")
    header = {"format": 1, "num_samples": n, "num_classes": num_classes, "topk": topk, "epochs": epochs,
              "seed": view.seed, "max_shift": view.max_shift, "flip": view.flip, "data": data.name}
    blob = json.dumps(header).encode()
    offset = records_offset(len(blob))
    dtype = record_dtype(topk)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(blob).to_bytes(4, "little") + blob)
            f.truncate(offset + dtype.itemsize * epochs * n)  # zero-filled: padding and records
        records = np.memmap(tmp, dtype=dtype, mode="r+", offset=offset, shape=(epochs, n))
        done, total = 0, epochs * n
        with torch.inference_mode():
            for epoch in range(epochs):
                for start in range(0, n, batch_size):
                    idx = torch.arange(start, min(start + batch_size, n))
                    seeds = view.seeds(epoch, idx)
                    probs = teacher(data.normalize(view.view(data.images[idx], seeds))).softmax(-1)
                    top = probs.topk(topk, dim=1)
                    rec = records[epoch, start:start + len(idx)]
                    rec["seed"] = seeds.numpy()
                    rec["prob"] = top.values.numpy().astype(np.float16)
                    rec["index"] = top.indices.numpy().astype(np.int16)
                    done += len(idx)
                    if progress:
                        progress(done, total)
        records.flush()
        del records
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {**header, "bytes_per_sample_epoch": dtype.itemsize, "file_bytes": path.stat().st_size}


class StoredTeacher:
    """Soft targets read from a top-K file (memory-mapped; each rank touches only its samples)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            with open(path, "rb") as f:
                head = f.read(len(MAGIC) + 4)
                if len(head) < len(MAGIC) + 4 or head[:len(MAGIC)] != MAGIC:
                    raise DeployCompError(f"not a deploycomp teacher-logits file: {path}")
                header_bytes = int.from_bytes(head[len(MAGIC):], "little")
                self.header = json.loads(f.read(header_bytes))
        except FileNotFoundError:
            raise DeployCompError(f"teacher logits file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DeployCompError(f"corrupt teacher logits file (header): {path}") from None
        h = self.header
        dtype = record_dtype(h["topk"])
        offset = records_offset(header_bytes)
        expected = offset + dtype.itemsize * h["epochs"] * h["num_samples"]
        if path.stat().st_size != expected:
            raise DeployCompError(f"corrupt teacher logits file {path}: {path.stat().st_size} bytes, expected {expected}")
        self.records = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(h["epochs"], h["num_samples"]))
        self.path, self.device = path, torch.device("cpu")

    uses_labels = True

    def to(self, device: torch.device) -> "StoredTeacher":
        self.device = torch.device(device)
        return self

    @property
    def view(self) -> ViewSpec:
        return ViewSpec(self.header["seed"], self.header["max_shift"], self.header["flip"])

    def loss(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(logits, soft)

    def check_compatible(self, data: ImageSet, view: ViewSpec, epochs: int) -> None:
        h = self.header
        if h["num_samples"] != len(data) or view != self.view:
            raise DeployCompError(
                f"teacher logits {self.path} were stored for {h['num_samples']} samples of {h['data']} with "
                f"{self.view}; this run has {len(data)} samples of {data.name} with {view}")
        if epochs > h["epochs"]:
            raise DeployCompError(f"teacher logits {self.path} cover {h['epochs']} epochs; this run trains {epochs}")

    def targets(self, epoch: int, indices: torch.Tensor, seeds: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rec = self.records[epoch, indices.numpy()]
        if not np.array_equal(rec["seed"], seeds.numpy()):
            raise DeployCompError(f"teacher logits {self.path} do not match this run's augmentation seeds")
        return dense_targets(torch.from_numpy(rec["prob"].astype(np.float32)),
                             torch.from_numpy(rec["index"].astype(np.int64)), self.header["num_classes"]).to(self.device)


def soft_cross_entropy(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's logits against the teacher's class probabilities (batch mean)."""
    return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()




def embedding_loss(student: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Feature distillation loss between embeddings (batch first), batch mean.

    ``cosine``: 1 - cos(student, target) per sample, the similarity a CLIP embedding is used by
    (retrieval, zero-shot) and blind to its scale. ``mse``: the squared error divided by the
    target's mean square, so that the loss (and a learning rate tuned on it) does not depend on
    the embedding's scale.
    """
    s, t = student.flatten(1), target.flatten(1)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
    if kind == "mse":
        return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
    raise DeployCompError(f"unknown feature loss '{kind}': use one of {', '.join(FEATURE_LOSSES)}")


class LiveTeacher:
    """Soft targets from running the teacher on the student's batch (the slow path stored logits replace)."""

    uses_labels = True  # the loss mixes these soft targets with the labels' cross-entropy

    def __init__(self, module: torch.nn.Module):
        self.module = module.eval()

    def to(self, device: torch.device) -> "LiveTeacher":
        self.module.to(device)
        return self

    def targets(self, epoch: int, indices: torch.Tensor, seeds: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x).softmax(-1)

    def loss(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(logits, soft)


class EmbeddingTeacher:
    """The source's embedding of the student's batch as the target (feature distillation): no
    softmax, no labels; the loss is :func:`embedding_loss`."""

    uses_labels = False

    def __init__(self, module: torch.nn.Module, kind: str = "cosine"):
        if kind not in FEATURE_LOSSES:
            raise DeployCompError(f"unknown feature loss '{kind}': use one of {', '.join(FEATURE_LOSSES)}")
        self.module, self.kind = module.eval(), kind

    def to(self, device: torch.device) -> "EmbeddingTeacher":
        self.module.to(device)
        return self

    def targets(self, epoch: int, indices: torch.Tensor, seeds: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x)

    def loss(self, embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return embedding_loss(embedding, target, self.kind)


def finetune_with_distillation(module: torch.nn.Module, train: ImageSet, test: ImageSet | None, teacher: torch.nn.Module,
                               *, epochs: int, lr: float, seed: int, teacher_logits: str | None = None,
                               after_step: Callable[[], None] | None = None, log: Callable[[str], None] | None = None,
                               objective: Objective = Objective()):
    """Recovery fine-tuning after a rewrite (pruning, semantic tokens): distillation from the source
    model, from stored top-K logits when given (the views then follow the stored recipe) or live.
    An embedding model (``objective.embedding``) distils the live source's embedding (feature loss)."""
    from .train import TrainConfig, fit

    if teacher_logits and objective.embedding:
        raise DeployCompError("stored teacher logits are class probabilities; a model that outputs an embedding "
                              "distils from the source's embedding (drop the teacher logits)")
    stored = StoredTeacher(teacher_logits) if teacher_logits else None
    view = stored.view if stored else None
    recipe = TrainConfig(epochs=epochs, batch_size=128, lr=lr, warmup_epochs=0.2, seed=view.seed if view else seed,
                         max_shift=view.max_shift if view else 2, flip=view.flip if view else True)
    if stored:
        stored.check_compatible(train, recipe.view, recipe.epochs)
    live = objective.live_teacher(teacher)
    if log:
        log(f"fine-tune {epochs} epochs ({'stored' if stored else 'live'} teacher"
            f"{', ' + objective.feature_loss + ' feature loss' if objective.embedding else ''})")
    return fit(module, train, test, recipe, teacher=stored or live, after_step=after_step, log=log)
