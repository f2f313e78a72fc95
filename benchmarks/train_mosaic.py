"""Train the dense proxy: a small Swin segmenter on Fashion-MNIST mosaics (112 px canvases, 2-5
garments each, labelled per pixel); record mIoU, pixel accuracy and time per seed.

    .venv/bin/python benchmarks/train_mosaic.py --seeds 0,1,2     # the proxy, cached per seed
    .venv/bin/python benchmarks/train_mosaic.py --quick           # the script end to end in ~1 min

Canvases: those of ``--data mosaic-fashion-mnist`` (``learn/mosaic.py``): 12 000 for training with
garments from the Fashion-MNIST training split, 2 000 for testing from its test split. Weights live in
$DEPLOYCOMP_CACHE/mosaic-fmnist/seed<S>/model.safetensors (default ~/.cache/deploycomp): a seed
already trained is reused. Results: benchmarks/results/mosaic_training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from deploycomp.learn.mosaic import MOSAIC_CANVAS, MOSAIC_GARMENTS, MOSAIC_SPLITS, load_mosaic  # noqa: E402
from deploycomp.learn.segment import (MosaicSegmenter, SegmenterConfig, SegmentTrainConfig,  # noqa: E402
                                      evaluate_segmentation, fit_segmentation)

RESULTS = Path(__file__).parent / "results" / "mosaic_training.json"


def cache_dir() -> Path:
    return Path(os.environ.get("DEPLOYCOMP_CACHE", Path.home() / ".cache" / "deploycomp")) / "mosaic-fmnist"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=SegmentTrainConfig().epochs)
    ap.add_argument("--quick", action="store_true", help="tiny sets and one epoch, to check the script")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    full = (MOSAIC_SPLITS["train"][0], MOSAIC_SPLITS["test"][0], args.epochs)
    n_train, n_test, epochs = (256, 64, 1) if args.quick else full
    out = args.out or (Path("/tmp/mosaic_quick.json") if args.quick else RESULTS)
    cache = cache_dir() / ("quick" if args.quick else "")
    torch.set_num_threads(os.cpu_count() or 1)

    t0 = time.monotonic()
    # the canvases of --data mosaic-fashion-mnist, the first n of each split (seeded per canvas)
    train, test = load_mosaic("train").head(n_train), load_mosaic("test").head(n_test)
    data_seconds = time.monotonic() - t0
    print(f"{n_train} + {n_test} canvases in {data_seconds:.1f} s", flush=True)

    config = SegmenterConfig()
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        weights = cache / f"seed{seed}" / "model.safetensors"
        torch.manual_seed(seed)
        model = MosaicSegmenter(config)
        recipe = SegmentTrainConfig(epochs=epochs, seed=seed)
        record_path = weights.with_name("training.json")
        if weights.is_file() and record_path.is_file():
            model.load_state_dict(load_file(weights))
            training = json.loads(record_path.read_text())
            print(f"seed {seed}: reusing {weights}", flush=True)
        else:
            training = fit_segmentation(model, train, test, recipe, say=lambda s: print(f"seed {seed}: {s}", flush=True))
            weights.parent.mkdir(parents=True, exist_ok=True)
            save_file(model.state_dict(), weights)
            record_path.write_text(json.dumps(training, indent=2) + "\n")
        scores = evaluate_segmentation(model, test)
        runs.append({"seed": seed, "weights": str(weights), **scores, "training": training})
        print(f"seed {seed}: test mIoU {scores['miou']:.4f}, pixel accuracy {scores['pixel_accuracy']:.4f}, "
              f"{training['seconds'] / 60:.1f} min of training", flush=True)

    miou = torch.tensor([r["miou"] for r in runs])
    summary = {"command": " ".join(["benchmarks/train_mosaic.py", *sys.argv[1:]]),
               "data": {"canvas": MOSAIC_CANVAS, "garments": MOSAIC_GARMENTS, "train": n_train, "test": n_test,
                        "seconds": data_seconds},
               "model": asdict(config), "params": sum(p.numel() for p in model.parameters()),
               "threads": torch.get_num_threads(), "miou_mean": float(miou.mean()),
               "miou_spread": [float(miou.min()), float(miou.max())], "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"mIoU {summary['miou_mean']:.4f} over {len(runs)} seed(s) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
