"""The dense proxy's model and its training: a small Swin with a light multi-scale segmentation head,
trained on Fashion-MNIST mosaics (``learn/mosaic.py``) and scored by mean IoU.

The head reads every stage of the backbone (timm's ``features_only`` Swin): each stage is projected
to one width by a 1x1 convolution, upsampled to the first stage's resolution and summed (an FPN
without its top-down convolutions), then classified per position and upsampled to the image. It is
deliberately small: the proxy is there to show what a token rewrite does to spatial detail, so the
head must depend on the backbone's fine stage rather than compensate for it.

Training is a plain loop (AdamW, cosine schedule, per-pixel cross-entropy) rather than
``learn.train.fit``, whose objective, accuracy and teacher logits are per image.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .mosaic import MosaicSet, confusion, mean_iou


@dataclass(frozen=True)
class SegmenterConfig:
    """The backbone is the proxy Swin (``timm:swin_mosaic_patch4_window7_112``, these are its
    defaults): patch 4 and window 7 give stages of 28, 14, 7 tokens a side at 112 px."""

    img_size: int = 112
    in_chans: int = 1
    num_classes: int = 11  # background + 10 garments
    embed_dim: int = 32
    depths: tuple[int, ...] = (2, 2, 2)
    num_heads: tuple[int, ...] = (2, 4, 8)
    window_size: int = 7
    head_width: int = 64


class MosaicSegmenter(torch.nn.Module):
    def __init__(self, config: SegmenterConfig = SegmenterConfig()):
        import timm

        from ..frontend import proxy  # noqa: F401  (registers the proxy Swin)

        super().__init__()
        self.config = config
        self.backbone = timm.create_model(
            "swin_mosaic_patch4_window7_112", pretrained=False, features_only=True,
            img_size=config.img_size, in_chans=config.in_chans, embed_dim=config.embed_dim, depths=config.depths,
            num_heads=config.num_heads, window_size=config.window_size)
        self.lateral = torch.nn.ModuleList(torch.nn.Conv2d(c, config.head_width, 1)
                                           for c in self.backbone.feature_info.channels())
        self.classify = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Conv2d(config.head_width, config.num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> per-pixel class logits [B, classes, H, W]."""
        feats = [f.permute(0, 3, 1, 2) for f in self.backbone(x)]  # timm's Swin features are NHWC
        size = feats[0].shape[-2:]
        fused = sum(F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
                    for lat, f in zip(self.lateral, feats))
        return F.interpolate(self.classify(fused), size=x.shape[-2:], mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class SegmentTrainConfig:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, data: MosaicSet, batch_size: int = 128) -> dict[str, float]:
    """Mean IoU (background and garments) and pixel accuracy of ``model`` on ``data``."""
    model.eval()
    n = data.num_segment_classes
    conf = torch.zeros(n, n, dtype=torch.long)
    for i in range(0, len(data), batch_size):
        logits = model(data.normalize(data.images[i:i + batch_size]))
        conf += confusion(logits.argmax(1), data.masks[i:i + batch_size], n)
    miou, per_class = mean_iou(conf)
    return {"miou": miou, "pixel_accuracy": float(conf.diag().sum() / conf.sum()),
            "per_class_iou": per_class}


def fit_segmentation(model: torch.nn.Module, train: MosaicSet, test: MosaicSet | None, config: SegmentTrainConfig,
                     say: Callable[[str], None] | None = None) -> dict:
    """Train ``model`` in place; returns the recipe, per-epoch loss / test mIoU and seconds."""
    say = say or (lambda s: None)
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * t))

    history, step, t0 = [], 0, time.monotonic()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        losses = []
        for i in range(0, len(train), config.batch_size):
            idx = order[i:i + config.batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(train.normalize(train.images[idx])), train.masks[idx].long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        row = {"epoch": epoch + 1, "loss": sum(losses) / len(losses), "seconds": time.monotonic() - t0}
        if test is not None:
            row.update({k: v for k, v in evaluate_segmentation(model, test).items() if k != "per_class_iou"})
        history.append(row)
        say(f"epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f}"
            + (f", test mIoU {row['miou']:.4f}" if test is not None else "") + f" ({row['seconds']:.0f} s)")
    return {"recipe": asdict(config), "history": history, "seconds": time.monotonic() - t0}
