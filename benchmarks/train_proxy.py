"""Train the proxy DeiT (timm:deit_fmnist_patch4_28) on Fashion-MNIST from scratch; record accuracy and time.

    .venv/bin/python benchmarks/train_proxy.py            # ~45 min on 2 cores, cached afterwards
    torchrun --standalone --nproc_per_node 2 benchmarks/train_proxy.py   # same recipe under DDP
    python benchmarks/train_proxy.py --device cuda        # same recipe on a GPU (scripts/gpu_check.py)

The run lives in $DEPLOYCOMP_CACHE/proxy-fmnist (default ~/.cache/deploycomp): an interrupted run
resumes from its last checkpoint, a finished one is reused. The weights are then usable as
``deploycomp compile timm:deit_fmnist_patch4_28 --weights <cache>/proxy-fmnist/model.safetensors``.
Results: benchmarks/results/proxy_training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from deploycomp.api import train  # noqa: E402
from deploycomp.learn.train import TrainConfig  # noqa: E402

MODEL = "timm:deit_fmnist_patch4_28"
RECIPE = TrainConfig(epochs=20, batch_size=128, lr=1e-3, min_lr=1e-5, warmup_epochs=1.0, weight_decay=0.05,
                     label_smoothing=0.1, max_shift=2, flip=True, seed=0)
RESULTS = Path(__file__).parent / "results" / "proxy_training.json"


def cache_dir() -> Path:
    return Path(os.environ.get("DEPLOYCOMP_CACHE", Path.home() / ".cache" / "deploycomp")) / "proxy-fmnist"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=cache_dir())
    parser.add_argument("--epochs", type=int, default=RECIPE.epochs)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    config = TrainConfig(**{**RECIPE.__dict__, "epochs": args.epochs, "device": args.device})
    metrics = train(MODEL, args.out, config, log=lambda line: print(line, flush=True))
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {"command": " ".join(["benchmarks/train_proxy.py", *sys.argv[1:]]), "weights": str(args.out / "model.safetensors"),
                   "minutes": metrics["train_seconds"] / 60, **metrics}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"test top-1 {metrics['test_accuracy']:.2f} % after {metrics['train_seconds'] / 60:.1f} min of training "
              f"({metrics['world_size']} process(es)); weights {args.out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
