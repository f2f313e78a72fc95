"""Image data held in memory as uint8 tensors: Fashion-MNIST from its Debian package, or a folder.

Both loaders return an :class:`ImageSet`; the trainer and evaluators only ever see that. Keeping
the raw uint8 pixels (not normalized floats) keeps Fashion-MNIST at 47 MB and lets augmentation
be an exact, seeded integer shift/flip that a teacher pass and a student pass reproduce bit for bit.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import DeployCompError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Per-channel statistics of the Fashion-MNIST training split (pixels scaled to [0, 1]).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


@dataclass
class ImageSet:
    """A labelled image set in memory: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float32, scaled to [0, 1] then standardized per channel."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def head(self, n: int | None) -> "ImageSet":
        """The first ``n`` samples (all of them when ``n`` is None or larger than the set), named
        ``set[:n]``; a head of a head is a head of the set, and is named so (manifests record it)."""
        if not n or n >= len(self):
            return self
        base = self.name.rsplit("[:", 1)[0] if self.name.endswith("]") and "[:" in self.name else self.name
        return replace(self.subset(range(n)), name=f"{base}[:{n}]")

    def subset(self, indices) -> "ImageSet":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return replace(self, images=self.images[idx], labels=self.labels[idx], name=f"{self.name}[{len(idx)}]")


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: big-endian magic (0, 0, dtype=0x08 uint8, ndim), dims, data."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DeployCompError(f"data file not found: {path}") from None
    except (OSError, EOFError) as exc:
        raise DeployCompError(f"corrupt data file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DeployCompError(f"corrupt data file {path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4")) if len(raw) >= header else ()
    if len(dims) != ndim or len(raw) - header != int(np.prod(dims)):
        raise DeployCompError(f"corrupt data file {path}: header says {dims}, file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> ImageSet:
    """Fashion-MNIST ``train`` (60 000) or ``test`` (10 000) as 1x28x28 uint8 images."""
    if split not in FASHION_MNIST_FILES:
        raise DeployCompError(f"unknown Fashion-MNIST split '{split}': use train or test")
    # $DEPLOYCOMP_FASHION_MNIST: the four .gz files elsewhere (a machine without the Debian
    # package, such as a lent GPU machine that receives them with the working tree)
    root = Path(root if root is not None else os.environ.get("DEPLOYCOMP_FASHION_MNIST", FASHION_MNIST_DIR))
    images_file, labels_file, count = FASHION_MNIST_FILES[split]
    if not (root / images_file).is_file() or not (root / labels_file).is_file():
        raise DeployCompError(
            f"Fashion-MNIST not found in {root}: install the Debian package {FASHION_MNIST_PACKAGE} "
            f"(apt-get install {FASHION_MNIST_PACKAGE}; ./scripts/setup.sh does it)")
    images = read_idx(root / images_file)
    labels = read_idx(root / labels_file)
    if images.shape != (count, 28, 28) or labels.shape != (count,) or labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DeployCompError(f"corrupt Fashion-MNIST {split} split in {root}: images {images.shape}, labels {labels.shape}")
    return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                    FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_CLASSES, f"fashion-mnist/{split}")


def load_image_folder(root: str | Path, img_size: int, in_chans: int = 3,
                      mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> ImageSet:
    """A user's ``root/<class>/<image>`` folder (torchvision's ImageFolder), resized to ``img_size``.

    Images are resized (shorter side) and centre-cropped, as timm evaluates. Mean/std default to
    ImageNet's for RGB, 0.5 for grayscale.
    """
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise DeployCompError(f"image folder not found: {root}")
    to_tensor = transforms.Compose([
        transforms.Grayscale(1) if in_chans == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.Resize(img_size),
        transforms.CenterCrop(img_size),
        transforms.PILToTensor(),
    ])
    try:
        folder = datasets.ImageFolder(str(root), transform=to_tensor)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DeployCompError(f"not an image folder ({root}/<class>/<image>): {exc}") from None
    images, labels = [], []
    for i in range(len(folder)):
        try:
            image, label = folder[i]
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a broken file
            raise DeployCompError(f"unreadable image {folder.samples[i][0]}: {exc}") from None
        images.append(image)
        labels.append(label)
    if mean is None:
        mean = (0.485, 0.456, 0.406) if in_chans == 3 else (0.5,) * in_chans
        std = (0.229, 0.224, 0.225) if in_chans == 3 else (0.5,) * in_chans
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.long), tuple(mean), tuple(std),
                    tuple(folder.classes), f"folder:{root}")


def load_data(spec: str, split: str, img_size: int = 28, in_chans: int = 1) -> ImageSet:
    """``fashion-mnist``, ``mosaic-fashion-mnist`` (the dense proxy's canvases, ``learn/mosaic.py``) or
    a folder; a folder with ``train/`` and ``val/`` (or ``test/``) uses them per split."""
    if spec in ("fashion-mnist", "fmnist"):
        return load_fashion_mnist(split)
    if spec == "mosaic-fashion-mnist":
        from .mosaic import load_mosaic

        return load_mosaic(split)
    root = Path(spec)
    names = ("train",) if split == "train" else ("val", "test")
    for name in names:
        if (root / name).is_dir():
            return load_image_folder(root / name, img_size, in_chans)
    return load_image_folder(root, img_size, in_chans)


def check_geometry(data: ImageSet, input_shape: tuple[int, ...]) -> None:
    """The data's C x H x W must be what the model takes (no silent resizing of a benchmark set)."""
    have = tuple(data.images.shape[1:])
    want = tuple(int(d) for d in input_shape[1:])
    if have != want:
        raise DeployCompError(f"data {data.name} has {'x'.join(map(str, have))} images; the model takes "
                              f"{'x'.join(map(str, want))}")


# ---- seeded augmentation -------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def view_seeds(base_seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """One 63-bit seed per (run seed, epoch, sample index): splitmix64, vectorized.

    Stored teacher logits record this seed; a student recomputes it and gets the same view.
    """
    x = (indices.numpy().astype(np.uint64)
         + np.uint64((base_seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9) & _MASK64))
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(1)).astype(np.int64))


def augment(images: torch.Tensor, seeds: torch.Tensor, max_shift: int = 2, flip: bool = True) -> torch.Tensor:
    """Shift by up to ``max_shift`` pixels (zero fill) and flip horizontally, both drawn from ``seeds``."""
    b, c, h, w = images.shape
    span = 2 * max_shift + 1
    s = seeds.clone()
    dy = s % span - max_shift
    dx = (s // span) % span - max_shift
    do_flip = ((s // (span * span)) % 2 == 1) & flip
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    rows = torch.arange(h).view(1, h) + max_shift - dy.view(b, 1)
    cols = torch.arange(w).view(1, w) + max_shift - dx.view(b, 1)
    cols = torch.where(do_flip.view(b, 1), cols.flip(1), cols)
    batch = torch.arange(b).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(b, h, 1), cols.view(b, 1, w)]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
