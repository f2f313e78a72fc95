"""Semantic tokens on the proxy DeiT (Fashion-MNIST): accuracy after fine-tuning, alone and
combined with NViT pruning at one latency budget, and the measured speed of both.

The proxy sees 7x7 = 49 patch tokens; 4 semantic tokens is DeiT's 196 -> 16 reduction. The
generator sits at a third of the depth as in STViT (blocks 3-4 of 6). Each row is a real
``deploycomp compile`` (verified against its torch model, scored on all 10 000 test images on
ort-cpu); the unrewritten graph and the artifacts are then timed interleaved in one run, beside
the same graph in plain ONNX Runtime (``speed_vs_plain_ort_b*``: the base of ``bench_precision_proxy.py``)
and what a user would pick instead (``proxy_common.PEERS``: plain OpenVINO fp32, ONNX Runtime dynamic
int8, OpenVINO + NNCF int8, each built with its runtime's own tools; ``peers`` in the JSON and
``speed_vs_nncf_int8_b*`` per row), all in the same interleaved run.

    .venv/bin/python benchmarks/train_proxy.py           # the teacher, once
    .venv/bin/python benchmarks/bench_tokens_proxy.py    # both rows (resumes per row)
    # CLI of the first row (the combined rows add --latency 0.3x --latency-batch 32 --selection additive [--eta 0]):
    #   deploycomp compile timm:deit_fmnist_patch4_28 --weights ~/.cache/deploycomp/proxy-fmnist/model.safetensors \
    #     --data fashion-mnist --semantic-tokens 4 --finetune-epochs 5 --teacher-logits <stored logits> -o out/st4

Writes benchmarks/results/tokens_proxy.json.

The joint artifact of the precision issue (tokens + pruning + int8 at a tenth of the fp32 proxy's
latency at batch 32; the budget is relative to the fp32 source, the int8 latency table predicts the
pruned model, ``passes/prune.py``), three seeds (pruning's saliency batches, distillation and
fine-tuning differ per seed):

    .venv/bin/python benchmarks/bench_tokens_proxy.py --rows tokens+prune-eta0 --latency 0.1x \
        --target ort-cpu --precision int8 --seeds 0,1,2 --out benchmarks/results/joint_proxy.json

Each seed's top-1 is the artifact's on all 10 000 test images run by the target runtime (the
manifest's accuracy section); the table prints every seed and the mean and range over seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploycomp.api import CompileOptions, compile  # noqa: E402
from deploycomp.artifact import read_manifest, write_json  # noqa: E402
from deploycomp.backends.fingerprint import host_fingerprint  # noqa: E402
from proxy_common import (CACHE, MODEL, PEER_NNCF_INT8, PLAIN_ORT, peer_speeds, ratio_fields, speed_vs,  # noqa: E402
                          teacher_and_logits, time_against_source)


def main() -> None:
    from deploycomp.pruning.schedule import PruneConfig
    from deploycomp.tokens.stvit import SemanticTokenConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (stored top-5 teacher logits)")
    ap.add_argument("--latency", default="0.3x", help="budget of the combined row (tokens + pruning)")
    ap.add_argument("--batch", type=int, default=32, help="batch the budget is for (latency table)")
    ap.add_argument("--rows", default="tokens,tokens+prune,tokens+prune-eta0",
                    help="tokens (alone), tokens+prune (NViT, eta 1), tokens+prune-eta0 (latency-blind selection)")
    ap.add_argument("--target", default="ort-cpu")
    ap.add_argument("--precision", default="fp32", help="the artifacts' precision (int8: the joint artifact)")
    ap.add_argument("--seeds", default="0", help="compile seeds, comma-separated (one artifact per row and seed)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tokens_proxy.json")
    args = ap.parse_args()

    weights, logits = teacher_and_logits(args.epochs)
    work = CACHE / "tokens-bench"
    work.mkdir(parents=True, exist_ok=True)

    tokens = SemanticTokenConfig(args.tokens)
    artifacts = {}
    seeds = [int(s) for s in args.seeds.split(",")]
    for row, seed in ((r, s) for r in args.rows.split(",") for s in seeds):
        suffix = "" if row == "tokens" else f"-{args.latency}-b{args.batch}"
        variant = "".join([f"-{args.target}" if args.target != "ort-cpu" else "",
                           f"-{args.precision}" if args.precision != "fp32" else "", f"-s{seed}" if seed else ""])
        out = work / f"{row.removesuffix('-eta0')}-st{args.tokens}-e{args.epochs}{suffix}{'-eta0' if row.endswith('eta0') else ''}{variant}"
        common = dict(target=args.target, precision=args.precision, weights=str(weights), data="fashion-mnist",
                      semantic_tokens=tokens, seed=seed)
        if row == "tokens":
            options = CompileOptions(**common, token_finetune_epochs=args.epochs, token_teacher_logits=str(logits),
                                     measure_rounds=0)
        else:
            prune = PruneConfig(latency=args.latency, selection="additive", eta=0.0 if row.endswith("eta0") else 1.0,
                                steps=5,
                                saliency_batches=16, batch_size=64, kd_steps=50,
                                finetune_epochs=args.epochs, teacher_logits=str(logits), budget_rounds=3, seed=seed)
            options = CompileOptions(**common, prune=prune, latency_batch=args.batch, measure_rounds=5)
        if (out / "manifest.json").is_file():
            print(f"{row}: reusing {out}", flush=True)
        else:
            print(f"{row}: compiling -> {out}", flush=True)
            compile(MODEL, out, options, progress=lambda msg, n=row: print(f"  {n}: {msg}", flush=True))
        artifacts[f"{row} seed {seed}" if len(seeds) > 1 else row] = out

    rows, peers = measure_all(artifacts, weights, args.batch, args.rounds)
    report = {"model": MODEL, "semantic_tokens": args.tokens, "finetune_epochs": args.epochs,
              "teacher_logits": "top-5, stored", "combined_budget": args.latency, "budget_batch": args.batch,
              "target": args.target, "precision": args.precision, "seeds": seeds, "host": host_fingerprint(),
              "rounds": args.rounds, "peers": peers, "rows": rows, "summary": summarize(rows)}
    b = args.batch
    print(f"\n{'row':22} {'GFLOPs':>7} {f'b{b} ratio':>10} {'p10-p90':>12} {'b1 ratio':>9} "
          f"{'vs plain ORT':>12} {'vs NNCF int8':>12} {'top-1':>6} {'before':>7} {'delta':>6}")
    for r in rows[1:]:
        lo, hi = r[f"ratio_b{b}_p10_p90"]
        print(f"{r['row']:22} {r['gflops']:7.4f} {r[f'ratio_b{b}']:10.3f} {lo:5.3f}-{hi:5.3f} "
              f"{r['ratio_b1']:9.3f} {r[f'speed_vs_plain_ort_b{b}']:11.2f}x {r[f'speed_vs_nncf_int8_b{b}']:11.2f}x "
              f"{r['top1']:6.2f} {r['top1_before']:7.2f} {r['delta_pt']:+6.2f}")
    for name, p in peers.items():
        print(f"{name:38} b{b} {p[f'ratio_b{b}']:.3f} of the source, {p[f'speed_vs_plain_ort_b{b}']:.2f}x plain ORT "
              f"(b1 {p['speed_vs_plain_ort_b1']:.2f}x)")
    if len(seeds) > 1:
        print(f"\n{'row':22} {'seeds':>5} {'top-1 mean':>10} {'delta mean (range)':>24} {'b' + str(args.batch) + ' ratio mean':>15}")
        for name, s in report["summary"].items():
            print(f"{name:22} {s['n']:5d} {s['top1_mean']:10.2f} {s['delta_pt_mean']:+7.2f} ({s['delta_pt_min']:+.2f} to "
                  f"{s['delta_pt_max']:+.2f}) {s[f'ratio_b{args.batch}_mean']:15.3f}")
    write_json(args.out, report)
    print(f"wrote {args.out}")


def summarize(rows: list[dict]) -> dict:
    """Per row over its seeds: top-1 and its drop (mean, min, max) and the mean measured ratios."""
    import numpy as np

    out = {}
    for name in dict.fromkeys(r["row"].split(" seed ")[0] for r in rows[1:]):
        group = [r for r in rows[1:] if r["row"].split(" seed ")[0] == name]
        delta = [r["delta_pt"] for r in group]
        out[name] = {"n": len(group), "top1_mean": float(np.mean([r["top1"] for r in group])),
                     "delta_pt_mean": float(np.mean(delta)), "delta_pt_min": float(np.min(delta)),
                     "delta_pt_max": float(np.max(delta)),
                     **{k + "_mean": float(np.mean([r[k] for r in group])) for k in group[0]
                        if k.startswith(("ratio_b", "speed_vs_plain_ort_b", "speed_vs_nncf_int8_b")) and not k.endswith("p90")}}
    return out


def measure_all(artifacts: dict[str, Path], weights: Path, batch: int, rounds: int) -> tuple[list[dict], dict]:
    """The source graph, every artifact and the peers, interleaved, at ``batch`` and at batch 1: the
    artifacts' rows and the peers' speeds."""
    from deploycomp.bench.harness import stats

    timing, base = time_against_source(artifacts, weights, batch, rounds, peers=True)
    peers = peer_speeds(timing, base)
    rows = [{"row": "source", **{f"b{b}": stats(timing[b]["source"]) for b in timing}}]
    for name, path in artifacts.items():
        m = read_manifest(path)
        acc = m["accuracy"]
        row = {"row": name, "artifact": str(path), "gflops": m["totals"]["gflops_per_image"], "params": m["totals"]["params"],
               "top1_before": acc["reference_top1"], "top1": acc["artifact_top1"], "delta_pt": acc["delta_pt"],
               "reference": acc["reference"], "structure": m["structure"]["blocks"],
               "artifact_bytes": m["totals"].get("artifact_bytes"), "compile": m.get("compile"),
               "precision": m["options"]["precision"], "quantization": (m.get("quantization") or {}).get("method"),
               "semantic_tokens": m.get("semantic_tokens"), "pruning_latency": m.get("pruning", {}).get("latency"),
               "parity": m["parity"]["checks"]}
        for b in timing:
            row.update(ratio_fields(timing[b][name], base[b], b))
            # speed vs plain ORT fp32 (medians), the base of bench_precision_proxy.py's plot, and vs the best peer
            row[f"speed_vs_plain_ort_b{b}"] = speed_vs(timing, name, PLAIN_ORT, b)
            row[f"speed_vs_nncf_int8_b{b}"] = speed_vs(timing, name, PEER_NNCF_INT8, b)
        rows.append(row)
    return rows, peers


if __name__ == "__main__":
    main()
