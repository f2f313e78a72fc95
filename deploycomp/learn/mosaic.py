"""The dense proxy task: Fashion-MNIST garments placed on a larger canvas, every pixel labelled.

A token rewrite that merges tokens (semantic tokens) can keep classification accuracy while it
destroys spatial detail; STViT-R's recovery step exists for dense outputs. Judging that needs a
dense task, and this project downloads nothing at run time, so the task is built from the
Fashion-MNIST package already installed: each canvas holds a few garments at random positions,
later ones occluding earlier ones; a pixel's label is the class of the garment visible there
(``class + 1``) or background (0). Everything is drawn from ``numpy.random.default_rng([seed, i])``
per canvas, so a canvas does not depend on how many others were made or in which order.

The classification variant labels a canvas with the class that covers most of its pixels.
The metric is the mean intersection-over-union over the classes present (:func:`mean_iou`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import DeployCompError
from .data import ImageSet

BACKGROUND = 0
# uint8 intensity above which a Fashion-MNIST pixel belongs to the garment: its backgrounds are 0
# with faint anti-aliasing at the garment's edge
FOREGROUND_THRESHOLD = 32


@dataclass
class MosaicSet(ImageSet):
    """An :class:`ImageSet` of canvases with per-pixel ``masks`` (uint8 [N, H, W]: 0 background,
    ``c + 1`` garment class ``c``); ``labels`` is each canvas's majority garment class."""

    masks: torch.Tensor

    @property
    def num_segment_classes(self) -> int:
        return len(self.classes) + 1

    def subset(self, indices) -> "MosaicSet":
        return replace(super().subset(indices), masks=self.masks[torch.as_tensor(indices, dtype=torch.long)])


def make_mosaic(source: ImageSet, count: int, canvas: int = 112, garments: tuple[int, int] = (2, 5),
                seed: int = 0) -> MosaicSet:
    """``count`` canvases of ``canvas`` x ``canvas`` pixels, each with ``garments`` (min, max) garments
    drawn from ``source`` (uniformly, with replacement) at uniform positions inside the canvas."""
    n_src, chans, h, w = source.images.shape
    lo, hi = garments
    if canvas < max(h, w) or not 1 <= lo <= hi or count < 1 or n_src == 0:
        raise DeployCompError(f"cannot make a mosaic of {count} {canvas}px canvases with {lo}-{hi} garments of "
                              f"{h}x{w} from {n_src} images")
    src = source.images.numpy()
    src_labels = source.labels.numpy()
    images = np.zeros((count, chans, canvas, canvas), dtype=np.uint8)
    masks = np.zeros((count, canvas, canvas), dtype=np.uint8)
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        k = int(rng.integers(lo, hi + 1))
        picks = rng.integers(0, n_src, size=k)
        ys, xs = rng.integers(0, canvas - h + 1, size=k), rng.integers(0, canvas - w + 1, size=k)
        for j, y, x in zip(picks, ys, xs):
            garment = src[j]
            fg = garment.max(axis=0) > FOREGROUND_THRESHOLD
            images[i, :, y:y + h, x:x + w][:, fg] = garment[:, fg]
            masks[i, y:y + h, x:x + w][fg] = src_labels[j] + 1
    masks_t = torch.from_numpy(masks)
    return MosaicSet(torch.from_numpy(images), majority_class(masks_t, len(source.classes)), source.mean, source.std,
                     source.classes, f"mosaic{canvas}/{source.name}/seed{seed}", masks_t)


# ``--data mosaic-fashion-mnist``: split -> (canvases, seed, Fashion-MNIST split the garments come from)
MOSAIC_DATA = "mosaic-fashion-mnist"
MOSAIC_SPLITS = {"train": (12_000, 0, "train"), "test": (2_000, 1, "test")}
MOSAIC_CANVAS, MOSAIC_GARMENTS = 112, (2, 5)


def load_mosaic(split: str) -> MosaicSet:
    """The dense proxy's ``train`` or ``test`` split (garments from the same Fashion-MNIST split)."""
    from .data import load_fashion_mnist

    if split not in MOSAIC_SPLITS:
        raise DeployCompError(f"unknown {MOSAIC_DATA} split '{split}': use train or test")
    count, seed, source = MOSAIC_SPLITS[split]
    return make_mosaic(load_fashion_mnist(source), count, MOSAIC_CANVAS, MOSAIC_GARMENTS, seed)


def majority_class(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per canvas the garment class covering most pixels (ties: the lower class)."""
    n = masks.shape[0]
    flat = masks.reshape(n, -1).long()
    counts = torch.zeros(n, num_classes + 1, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    return counts[:, 1:].argmax(dim=1)


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, num_classes] pixel counts, rows the true class, columns the predicted one."""
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(conf: torch.Tensor) -> tuple[float, list[float | None]]:
    """Mean IoU over the classes that occur in the targets or the predictions of a confusion matrix
    (accumulate :func:`confusion` over batches first); a class in neither is left out (None)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    per_class = [float(i / u) if u > 0 else None for i, u in zip(inter, union)]
    present = [v for v in per_class if v is not None]
    return (float(np.mean(present)) if present else float("nan")), per_class
