"""Does a latency table's one-block micro-graph time what the block costs inside a whole model?

A table predicts a ViT as stem + head + the sum of per-block attention and MLP micro-graphs
(``latency/micrographs.py``), each timed alone. Two ways that can go wrong, measured here on
DeiT-S dimensions (197 tokens, EMB 384, 6 heads x 64, MLP 1536) at batch 8, ONNX Runtime and
OpenVINO (fp32), every candidate interleaved in one run:

- **form**: the micro-graphs (separate q/k/v MatMuls, a Mul-scaled q) may fuse differently from
  the exporter's block (packed qkv, the SDPA decomposition). Compared: attention + MLP
  micro-graphs vs one block inside an exported model, ``(t(depth 2) - t(depth 0)) / 2``.
- **cache**: a micro-graph timed alone keeps its one block's weights (7 MB) cache-resident; a
  whole model streams 12 blocks' (85 MB). Compared: per-block cost ``(t(d) - t(0)) / d`` at
  depths 1, 2, 4 and 12 (distinct random weights per depth).

    .venv/bin/python benchmarks/bench_parts_vs_model.py            # ~4 min on 2 cores

Writes benchmarks/results/parts_vs_model.json and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads must not spin while runtimes are timed

import argparse  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import deploycomp  # noqa: E402
from deploycomp.artifact import write_json  # noqa: E402
from deploycomp.backends.base import get_backend  # noqa: E402
from deploycomp.backends.fingerprint import host_fingerprint, usable_cores  # noqa: E402
from deploycomp.bench.harness import measure_interleaved, stats  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEPTHS = (0, 1, 2, 4, 12)
TOKENS, EMB, HEADS, HEAD_DIM, MLP = 197, 384, 6, 64, 1536


def write_models(tmp: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """label -> (ONNX path, input shape): DeiT-S trunks by depth, and the two micro-graphs."""
    import onnx
    import onnx_ir as ir
    import timm
    import torch

    from deploycomp.frontend.export import export_to_onnx
    from deploycomp.latency.micrographs import attention_part, mlp_part

    models = {}
    for depth in DEPTHS:
        torch.manual_seed(depth)
        module = timm.create_model("deit_small_patch16_224", depth=depth).eval()
        path = tmp / f"depth{depth}.onnx"
        ir.save(export_to_onnx(module, (1, 3, 224, 224), 18), path)
        models[f"depth {depth}"] = (str(path), (1, 3, 224, 224))
    for name, proto in (("attention part", attention_part(TOKENS, EMB, HEADS, HEAD_DIM, HEAD_DIM)),
                        ("mlp part", mlp_part(TOKENS, EMB, MLP))):
        path = tmp / f"{name.replace(' ', '_')}.onnx"
        onnx.save(proto, path)
        models[name] = (str(path), (1, TOKENS, EMB))
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=["ort-cpu", "openvino-cpu"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "parts_vs_model.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = write_models(Path(tmp))
        cands = []
        for target in args.targets:
            # ORT with spinning off: the tables are profiled that way, and no candidate slows the next
            options = {"allow_spinning": False} if target.startswith("ort") else {}
            backend = get_backend(target, threads=args.threads, **options)
            cands += [backend.candidate(f"{target} | {label}", path, shape) for label, (path, shape) in models.items()]
        times = measure_interleaved(cands, batch=args.batch, rounds=args.rounds, iters=args.iters, warmup=2)
    timed = {k: stats(v) for k, v in times.items()}
    median = {k: v["median_ms"] for k, v in timed.items()}
    per_target = {}
    for target in args.targets:
        t = lambda label: median[f"{target} | {label}"]  # noqa: E731
        block = {d: (t(f"depth {d}") - t("depth 0")) / d for d in DEPTHS if d}
        parts = t("attention part") + t("mlp part")
        per_target[target] = {"per_block_ms_by_depth": block, "micrographs_ms": parts,
                              "block_in_model_over_micrographs": block[2] / parts,
                              "depth12_over_depth1_per_block": block[12] / block[1]}
    result = {"command": " ".join(shlex.quote(a) for a in sys.argv), "host": {**host_fingerprint(), "threads": args.threads},
              "deploycomp_version": deploycomp.__version__,
              "protocol": {"batch": args.batch, "rounds": args.rounds, "iters_per_round": args.iters,
                           "interleaved": "every candidate of every target in one run", "weights": "random init",
                           "shape": {"tokens": TOKENS, "emb": EMB, "heads": HEADS, "head_dim": HEAD_DIM, "mlp": MLP}},
              "times": timed, "targets": per_target}
    write_json(args.out, result)
    print("| target | block in model ms | micrographs ms | model / parts | per-block ms at depth 1 / 2 / 4 / 12 |")
    print("|---|---|---|---|---|")
    for target, r in per_target.items():
        b = r["per_block_ms_by_depth"]
        print(f"| {target} | {b[2]:.1f} | {r['micrographs_ms']:.1f} | {r['block_in_model_over_micrographs']:.2f} | "
              + " / ".join(f"{b[d]:.1f}" for d in DEPTHS if d) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
