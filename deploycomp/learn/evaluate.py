"""Top-1 accuracy of a torch module or of a compiled artifact on its real backend."""

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
    with torch.inference_mode():
        pred = predictions(module, shard, batch_size)
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
