"""The dense proxy task (learn/mosaic.py): canvases of Fashion-MNIST garments, labelled per pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deploycomp.errors import DeployCompError
from deploycomp.learn.data import ImageSet, load_fashion_mnist
from deploycomp.learn.mosaic import FOREGROUND_THRESHOLD, confusion, majority_class, make_mosaic, mean_iou


def _shapes() -> ImageSet:
    """Three 4x4 'garments' with known foreground: a full square (class 2), a left column (class 5),
    a top row (class 7); pixel value 100 + class, background 0 (and one faint pixel under the
    threshold that must stay background)."""
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    images[0, 0] = 102
    images[1, 0, :, 0] = 105
    images[1, 0, 3, 3] = FOREGROUND_THRESHOLD  # anti-aliasing: not foreground
    images[2, 0, 0, :] = 107
    return ImageSet(images, torch.tensor([2, 5, 7]), (0.0,), (1.0,), tuple(f"c{i}" for i in range(10)), "shapes")


def test_a_canvas_shows_its_garments_in_order_and_labels_every_pixel():
    """On a canvas as small as a garment every garment sits at (0, 0): later garments occlude earlier
    ones exactly where they are foreground. Every canvas is then checked against a replay of its
    draws: the pixel shows the last garment whose foreground covers it, the label is its class + 1,
    elsewhere image and label are 0."""
    source = _shapes()
    mosaic = make_mosaic(source, count=20, canvas=4, garments=(1, 3), seed=5)
    for i in range(20):
        rng = np.random.default_rng([5, i])
        k = int(rng.integers(1, 4))
        picks = rng.integers(0, 3, size=k)
        want_img, want_mask = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
        for j in picks:  # painted in order, by hand
            for y in range(4):
                for x in range(4):
                    v = int(source.images[j, 0, y, x])
                    if v > FOREGROUND_THRESHOLD:
                        want_img[y, x], want_mask[y, x] = v, int(source.labels[j]) + 1
        assert np.array_equal(mosaic.images[i, 0].numpy(), want_img), i
        assert np.array_equal(mosaic.masks[i].numpy(), want_mask), i
    assert mosaic.masks.max() <= 8 and set(np.unique(mosaic.masks.numpy())) <= {0, 3, 6, 8}
    assert (mosaic.images[:, 0][mosaic.masks == 0] == 0).all()


def test_mosaics_are_seeded_per_canvas():
    """The same seed gives the same canvases, however many are made; another seed other ones."""
    source = _shapes()
    a = make_mosaic(source, 6, canvas=12, seed=1)
    b = make_mosaic(source, 3, canvas=12, seed=1)
    c = make_mosaic(source, 6, canvas=12, seed=2)
    assert torch.equal(a.images[:3], b.images) and torch.equal(a.masks[:3], b.masks)
    assert not torch.equal(a.masks, c.masks)
    sub = a.subset([4, 1])
    assert torch.equal(sub.masks, a.masks[[4, 1]]) and torch.equal(sub.labels, a.labels[[4, 1]])


def test_fashion_mnist_mosaic_positions_cover_the_canvas():
    """On the real data (112 px canvases): garments land everywhere (each quadrant has foreground
    somewhere), every label is a class + 1, and the canvas's label is its majority class."""
    source = load_fashion_mnist("test").head(200)
    mosaic = make_mosaic(source, 64, canvas=112, seed=0)
    assert mosaic.images.shape == (64, 1, 112, 112) and mosaic.masks.shape == (64, 112, 112)
    fg = mosaic.masks > 0
    for quadrant in (fg[:, :56, :56], fg[:, :56, 56:], fg[:, 56:, :56], fg[:, 56:, 56:]):
        assert quadrant.any()
    assert 0.05 < fg.float().mean() < 0.6 and int(mosaic.masks.max()) <= 10
    counts = [np.bincount(m[m > 0].numpy(), minlength=11) for m in mosaic.masks]
    assert [int(np.argmax(c[1:])) for c in counts] == mosaic.labels.tolist()


def test_majority_class_breaks_ties_to_the_lower_class():
    masks = torch.tensor([[[0, 3, 3, 5]], [[6, 6, 2, 2]]], dtype=torch.uint8)  # classes 2, 4 / 5, 1 (label - 1)
    assert majority_class(masks, 10).tolist() == [2, 1]


def test_mean_iou_by_hand():
    """3 classes, 6 pixels. target 0 0 1 1 2 2, pred 0 1 1 1 2 0:
    class 0: inter 1, union 3 (target 2 + pred 2 - 1) -> 1/3; class 1: inter 2, union 3 -> 2/3;
    class 2: inter 1, union 2 -> 1/2; mean 1/2. A class in neither is left out, not counted 0."""
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    miou, per_class = mean_iou(confusion(pred, target, 3))
    assert per_class == pytest.approx([1 / 3, 2 / 3, 1 / 2]) and miou == pytest.approx(0.5)
    miou4, per4 = mean_iou(confusion(pred, target, 4))
    assert per4[3] is None and miou4 == pytest.approx(0.5)
    perfect, _ = mean_iou(confusion(target, target, 3))
    assert perfect == 1.0
    # accumulated over batches = computed at once
    both = confusion(pred[:3], target[:3], 3) + confusion(pred[3:], target[3:], 3)
    assert torch.equal(both, confusion(pred, target, 3))


def test_impossible_mosaics_are_refused():
    with pytest.raises(DeployCompError, match="cannot make a mosaic"):
        make_mosaic(_shapes(), 2, canvas=3)
    with pytest.raises(DeployCompError, match="cannot make a mosaic"):
        make_mosaic(_shapes(), 2, canvas=8, garments=(3, 2))


@pytest.mark.slow
def test_the_segmenter_learns_the_mosaic():
    """A tiny two-stage Swin segmenter, trained for a few epochs on 56 px mosaics, finds the garments
    on held-out canvases far better than its untrained self: foreground IoU (any garment vs
    background; a few hundred canvases teach where garments are long before which garment each one
    is), pixel accuracy, and a training loss that fell. An untrained model can score by chance
    (background is most pixels), so the bar is a gain over it, not an absolute level alone."""
    from deploycomp.learn.mosaic import confusion, mean_iou
    from deploycomp.learn.segment import (MosaicSegmenter, SegmentTrainConfig, SegmenterConfig,
                                          evaluate_segmentation, fit_segmentation)

    source = load_fashion_mnist("train").head(500)
    train, test = make_mosaic(source, 384, canvas=56, garments=(1, 2), seed=0), \
        make_mosaic(source, 64, canvas=56, garments=(1, 2), seed=1)
    torch.manual_seed(0)
    model = MosaicSegmenter(SegmenterConfig(img_size=56, embed_dim=16, depths=(1, 1), num_heads=(1, 2), head_width=16))
    assert model(test.normalize(test.images[:2])).shape == (2, 11, 56, 56)

    def foreground_iou() -> float:
        with torch.no_grad():
            garment = model.eval()(test.normalize(test.images)).argmax(1) > 0
        return mean_iou(confusion(garment, test.masks > 0, 2))[1][1]

    before, fg_before = evaluate_segmentation(model, test), foreground_iou()
    result = fit_segmentation(model, train, test, SegmentTrainConfig(epochs=4, batch_size=32, lr=3e-3, warmup_steps=5))
    after, fg_after = evaluate_segmentation(model, test), foreground_iou()
    history = result["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert fg_after > max(0.6, fg_before + 0.1), (fg_before, fg_after)
    assert after["pixel_accuracy"] > max(0.8, before["pixel_accuracy"]), (before, after)


@pytest.mark.slow
def test_the_classification_variant_trains_and_compiles(tmp_path):
    """``--data mosaic-fashion-mnist`` is the mosaic's splits; the proxy Swin registered in timm
    trains on it (a canvas's majority garment) through the ordinary trainer and compiles as a Swin,
    verified against its trained torch model."""
    import deploycomp
    from deploycomp.frontend.timm_models import timm_spec
    from deploycomp.learn.data import load_data
    from deploycomp.learn.mosaic import MosaicSet
    from deploycomp.learn.train import TrainConfig

    test = load_data("mosaic-fashion-mnist", "test")
    assert isinstance(test, MosaicSet) and test.images.shape == (2000, 1, 112, 112)
    assert torch.equal(test.masks[:3], make_mosaic(load_fashion_mnist("test"), 3, 112, (2, 5), seed=1).masks)
    spec = timm_spec("swin_mosaic_patch4_window7_112")
    assert (spec.family, spec.img_size, spec.in_chans) == ("swin", 112, 1)
    from deploycomp.api import train

    metrics = train("timm:swin_mosaic_patch4_window7_112", tmp_path / "run",
                    TrainConfig(epochs=1, batch_size=32, warmup_epochs=0.1, seed=0),
                    data="mosaic-fashion-mnist", train_subset=96, test_subset=32)
    assert metrics["test_accuracy"] is not None
    weights = tmp_path / "run" / "model.safetensors"
    manifest = deploycomp.compile("timm:swin_mosaic_patch4_window7_112", tmp_path / "out",
                                  deploycomp.CompileOptions(target="ort-cpu", weights=str(weights), measure_rounds=0))
    assert manifest["structure"]["family"] == "swin"
    assert all(c["rel_l2"] < 1e-4 for c in manifest["parity"]["checks"])
