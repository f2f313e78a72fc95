"""Distillation from stored sparse teacher logits (TinyViT) vs running the teacher live, same recipe and views.

    .venv/bin/python benchmarks/bench_kd.py [--epochs 5] [--topk 5] [--seeds 0,1] [--baseline]

Teacher: the trained proxy DeiT (benchmarks/train_proxy.py, cached). Student: a narrower, shallower
proxy. For each seed, both student runs see identical data order and augmented views (the view
seeds are stored with the logits and checked); they differ only in where the soft targets come
from. Two runs of the same training differ by trajectory noise, so the gap is reported per seed and
averaged over seeds. Finished runs and stored logits in the cache are reused (their timings are
the ones measured when they ran). Results: benchmarks/results/kd_stored_vs_live.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from deploycomp.api import store_logits, train  # noqa: E402
from deploycomp.learn.train import TrainConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from train_proxy import MODEL, RECIPE, cache_dir  # noqa: E402

STUDENT_KWARGS = {"embed_dim": 64, "depth": 4, "num_heads": 2}
RESULTS = Path(__file__).parent / "results" / "kd_stored_vs_live.json"


def stored_logits(work: Path, teacher_weights: Path, epochs: int, topk: int, config: TrainConfig, say) -> tuple[Path, dict]:
    path = work / f"teacher-top{topk}-e{epochs}-s{config.seed}.kd"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        return path, json.loads(sidecar.read_text())
    info = store_logits(MODEL, path, weights=str(teacher_weights), epochs=epochs, topk=topk, seed=config.seed,
                        max_shift=config.max_shift, flip=config.flip)
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    say(f"stored {path}: {info['file_bytes'] / 1e6:.1f} MB in {info['seconds']:.0f} s")
    return path, info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--baseline", action="store_true", help="Also train the student without a teacher.")
    args = parser.parse_args()
    teacher_weights = cache_dir() / "model.safetensors"
    if not teacher_weights.is_file():
        print(f"no trained teacher at {teacher_weights}: run benchmarks/train_proxy.py first", file=sys.stderr)
        return 2
    work = cache_dir().parent / "kd-bench"
    say = lambda line: print(line, flush=True)  # noqa: E731

    per_seed = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        config = TrainConfig(**{**RECIPE.__dict__, "epochs": args.epochs, "seed": seed})
        logits, store = stored_logits(work, teacher_weights, args.epochs, args.topk, config, say)
        runs = {"stored": dict(teacher_logits=str(logits)), "live": dict(teacher=MODEL, teacher_weights=str(teacher_weights))}
        if args.baseline:
            runs["no-teacher"] = {}
        results = {}
        for name, teacher_args in runs.items():
            say(f"--- seed {seed}: student, {name}")
            m = train(MODEL, work / f"{name}-s{seed}", config, model_kwargs=STUDENT_KWARGS, log=say, **teacher_args)
            results[name] = {"test_accuracy": m["test_accuracy"], "train_seconds": m["train_seconds"],
                             "seconds_per_epoch": [r["epoch_seconds"] for r in m["history"]],
                             "accuracy_per_epoch": [r.get("test_accuracy") for r in m["history"]]}
        per_seed.append({"seed": seed, "store": store, "runs": results,
                         "gap_pt": results["stored"]["test_accuracy"] - results["live"]["test_accuracy"],
                         "kd_epoch_speedup": results["live"]["train_seconds"] / results["stored"]["train_seconds"],
                         "speedup_including_store_pass": results["live"]["train_seconds"]
                         / (results["stored"]["train_seconds"] + store["seconds"])})

    def mean(key: str, run: str | None = None) -> float:
        return statistics.mean(s["runs"][run]["test_accuracy"] if run else s[key] for s in per_seed)

    store = per_seed[0]["store"]
    summary = {
        "command": " ".join(["benchmarks/bench_kd.py", *sys.argv[1:]]),
        "teacher": {"model": MODEL, "weights": str(teacher_weights)},
        "student": {"model": MODEL, "model_kwargs": STUDENT_KWARGS},
        "recipe": {**RECIPE.__dict__, "epochs": args.epochs}, "topk": args.topk,
        "bytes_per_sample_per_epoch": store["bytes_per_sample_epoch"],
        "bytes_per_sample_all_epochs": store["file_bytes"] / store["num_samples"],
        "per_seed": per_seed,
        "mean_accuracy": {run: mean("", run) for run in per_seed[0]["runs"]},
        "mean_gap_pt": mean("gap_pt"),
        "mean_kd_epoch_speedup": mean("kd_epoch_speedup"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'seed':<6}{'run':<12}{'top-1 %':>10}{'train s':>10}{'s/epoch':>10}")
    for s in per_seed:
        for name, r in s["runs"].items():
            print(f"{s['seed']:<6}{name:<12}{r['test_accuracy']:>10.2f}{r['train_seconds']:>10.0f}"
                  f"{r['train_seconds'] / args.epochs:>10.0f}")
        print(f"{'':<6}stored - live {s['gap_pt']:+.2f} pt; KD epoch {s['kd_epoch_speedup']:.2f}x faster "
              f"({s['speedup_including_store_pass']:.2f}x counting the store pass of {s['store']['seconds']:.0f} s)")
    print(f"mean over seeds: " + ", ".join(f"{k} {v:.2f} %" for k, v in summary["mean_accuracy"].items())
          + f"; stored - live {summary['mean_gap_pt']:+.2f} pt; {summary['bytes_per_sample_per_epoch']} bytes per "
          f"sample per epoch ({summary['bytes_per_sample_all_epochs']:.0f} for all {args.epochs} epochs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
