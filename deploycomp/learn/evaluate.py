"""Top-1 accuracy of a torch module or of a compiled artifact on its real backend; for a model that
outputs an embedding (no classes), the mean cosine of its embeddings to a reference's on the data."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import ImageSet
from .distributed import World


def predictions(run: Callable[[torch.Tensor], torch.Tensor], data: ImageSet, batch_size: int = 500) -> torch.Tensor:
    out = []
    for start in range(0, len(data), batch_size):
        out.append(run(data.normalize(data.images[start:start + batch_size])).argmax(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def evaluate_module(module: torch.nn.Module, data: ImageSet, batch_size: int = 500, world: World = World()) -> float:
    """Top-1 in percent; under DDP each rank scores its shard and the counts are summed."""
    shard = data.subset(torch.arange(world.rank, len(data), world.size)) if world.size > 1 else data
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    with torch.inference_mode():
        pred = predictions(lambda x: module(x.to(device)).cpu(), shard, batch_size)
    module.train(was_training)
    correct = world.sum(torch.tensor([float((pred == shard.labels).sum()), float(len(shard))]))
    return 100.0 * float(correct[0]) / float(correct[1])


def evaluate_runner(run: Callable[[np.ndarray], np.ndarray], data: ImageSet, batch_size: int = 500) -> float:
    """Top-1 in percent of a backend runner (numpy in, logits out)."""
    pred = predictions(lambda x: torch.from_numpy(np.asarray(run(x.numpy()))), data, batch_size)
    return 100.0 * float((pred == data.labels).sum()) / len(data)


def evaluate_artifact(artifact: str | Path, data: ImageSet, batch_size: int = 500) -> float:
    """Top-1 of a compiled artifact, run by the backend and runtime options its manifest records."""
    from ..artifact import read_manifest
    from ..backends.base import backend_for_manifest

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    backend = backend_for_manifest(manifest)
    return evaluate_runner(backend.runner(backend.artifact(artifact, manifest)), data, batch_size)


def cosine_sums(run: Callable[[torch.Tensor], torch.Tensor], reference: Callable[[torch.Tensor], torch.Tensor],
                data: ImageSet, batch_size: int = 500) -> tuple[float, float, int]:
    """(sum, min, count) of the per-image cosine between ``run``'s and ``reference``'s outputs."""
    total, low, count = 0.0, 1.0, 0
    for start in range(0, len(data), batch_size):
        x = data.normalize(data.images[start:start + batch_size])
        a, b = run(x).flatten(1).double(), reference(x).flatten(1).double()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)
        total, low, count = total + float(cos.sum()), min(low, float(cos.min())), count + len(cos)
    return total, low, count


def module_cosine(module: torch.nn.Module, reference: torch.nn.Module, data: ImageSet, batch_size: int = 500,
                  world: World = World()) -> float:
    """Mean per-image cosine of ``module``'s embedding to ``reference``'s; under DDP summed over ranks."""
    shard = data.subset(torch.arange(world.rank, len(data), world.size)) if world.size > 1 else data
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    with torch.inference_mode():
        total, _, count = cosine_sums(lambda x: module(x.to(device)).cpu(), lambda x: reference(x.to(device)).cpu(),
                                      shard, batch_size)
    module.train(was_training)
    sums = world.sum(torch.tensor([total, float(count)], dtype=torch.float64))
    return float(sums[0]) / float(sums[1])


def runner_cosine(run: Callable[[np.ndarray], np.ndarray], reference: Callable[[np.ndarray], np.ndarray],
                  data: ImageSet, batch_size: int = 500) -> dict:
    """Mean and min per-image cosine of a runner's embeddings (an artifact on its backend) to a
    reference function's (the source model), both numpy in, numpy out."""
    def wrap(f):
        return lambda x: torch.from_numpy(np.asarray(f(x.numpy())))

    total, low, count = cosine_sums(wrap(run), wrap(reference), data, batch_size)
    return {"mean_cosine": total / count, "min_cosine": low, "samples": count}


def artifact_cosine(artifact: str | Path, reference: Callable[[np.ndarray], np.ndarray], data: ImageSet,
                    batch_size: int = 500) -> dict:
    """Mean/min per-image cosine of a compiled artifact's embeddings (on the backend its manifest
    records) to ``reference``'s (the source model)."""
    from ..artifact import read_manifest
    from ..backends.base import backend_for_manifest

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    backend = backend_for_manifest(manifest)
    return runner_cosine(backend.runner(backend.artifact(artifact, manifest)), reference, data, batch_size)
