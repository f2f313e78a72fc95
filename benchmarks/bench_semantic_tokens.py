"""Semantic tokens on ort-cpu: throughput of DeiT with 16 semantic tokens vs the unrewritten
artifact, and the TokenCluster lowerings (standard-op decomposition vs ONNX Runtime's fused
MultiHeadAttention) alone and in the model.

Random weights (speed only). Every artifact is a real ``deploycomp compile`` (verified against
its torch reference); all candidates are timed interleaved in one run (shuffled order each round).

    .venv/bin/python benchmarks/bench_semantic_tokens.py                  # DeiT-S, batch 8
    # the same artifact from the CLI:
    #   deploycomp compile timm:deit_small_patch16_224 --semantic-tokens 16 -o out/deit_s_st16

Writes benchmarks/results/semantic_tokens_deit.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploycomp.api import CompileOptions, compile  # noqa: E402
from deploycomp.artifact import write_json  # noqa: E402
from deploycomp.backends.fingerprint import host_fingerprint  # noqa: E402
from deploycomp.backends.base import backend_for_manifest  # noqa: E402
from deploycomp.bench.harness import Candidate, measure_interleaved, stats  # noqa: E402
from deploycomp.tokens.op import LOWERINGS, lower, token_cluster_model  # noqa: E402
from deploycomp.tokens.stvit import SemanticTokenConfig  # noqa: E402


def op_candidates(backend, shapes: list[tuple[int, int, int, int]]) -> list[Candidate]:
    """One TokenCluster graph per (M, N, H, D) and lowering (queries: the first M of N tokens), on ``backend``."""
    cands = []
    for m, n, heads, d in shapes:
        for how in LOWERINGS:
            model = token_cluster_model(m, n, heads, d, d, d ** -0.5, single_input=True)
            lower(model, how)
            cands.append(backend.candidate(f"op M{m} N{n} {how}", model, (1, n, heads * d)))
    return cands


def predicted_ratio(manifest: dict, args) -> dict | None:
    """What this device's latency table predicts for the rewrite (generator blocks: its cross-attention
    part, or FLOPs-scaled self-attention in a table without it)."""
    from deploycomp.errors import DeployCompError
    from deploycomp.latency.arch import BlockArch, ViTArch
    from deploycomp.latency.predictor import LatencyPredictor
    from deploycomp.latency.profiler import find_table
    from deploycomp.tokens.stvit import token_arch

    blocks = manifest["structure"]["blocks"]
    arch = ViTArch(blocks[0]["emb"], tuple(BlockArch(b["heads"], b["qk_dim"], b["v_dim"], b["mlp_dim"], b["tokens"])
                                           for b in blocks))
    try:
        predictor = LatencyPredictor(find_table("ort-cpu", args.batch, "deit-base", ROOT / "latency_tables"))
    except DeployCompError as exc:
        return {"error": str(exc)}
    base = predictor.predict(arch).total_ms
    rewritten = predictor.predict(token_arch(arch, SemanticTokenConfig(args.tokens, args.layer))).total_ms
    return {"unrewritten_ms": base, "rewritten_ms": rewritten, "ratio": rewritten / base, "batch": args.batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--target", default="ort-cpu", help="ort-cpu or openvino-cpu (the op lowerings are timed on it)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/semantic_tokens_deit[_<target>].json")
    args = ap.parse_args()

    manifests, cands = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("unrewritten", None, None)] + [(f"st{args.tokens} {how}", SemanticTokenConfig(args.tokens, args.layer), how)
                                                  for how in LOWERINGS]
        for name, tokens, how in variants:
            print(f"compile {name}", flush=True)
            out = Path(tmp) / name.replace(" ", "_")
            m = compile(f"timm:{args.model}", out, CompileOptions(target=args.target, semantic_tokens=tokens, token_lowering=how,
                                                                  measure_rounds=0))
            manifests[name] = m
            shape = tuple(d if isinstance(d, int) else 1 for d in m["input"]["shape"])
            backend = backend_for_manifest(m)
            cands.append(backend.candidate(name, backend.artifact(out, m), shape))
            cands[-1].kind = "deploycomp"
        emb = {"deit_tiny_patch16_224": (3, 64), "deit_small_patch16_224": (6, 64), "deit_base_patch16_224": (12, 64)}
        heads, d = emb.get(args.model, (6, 64))
        n = manifests["unrewritten"]["structure"]["blocks"][0]["tokens"]
        ops = op_candidates(backend, [(1 + args.tokens, n, heads, d), (1 + args.tokens, n + 1 + args.tokens, heads, d)])
        print(f"measure {len(cands)} models and {len(ops)} op graphs at batch {args.batch}, {args.rounds} rounds", flush=True)
        times = measure_interleaved(cands + ops, batch=args.batch, rounds=args.rounds, iters=2, warmup=3)

    base = np.asarray(times["unrewritten"])
    rows = []
    for c in cands + ops:
        t = np.asarray(times[c.name])
        row = {"name": c.name, "batch": args.batch, **stats(t), "img_per_s": args.batch / float(np.median(t))}
        if c.kind == "deploycomp":
            m = manifests[c.name]
            row.update(gflops_per_image=m["totals"]["gflops_per_image"], parity_max_rel_l2=max(x["rel_l2"] for x in m["parity"]["checks"]),
                       speedup_vs_unrewritten=float(np.median(base) / np.median(t)),
                       speedup_p10_p90=[float(np.percentile(base, 10) / np.percentile(t, 10)),
                                        float(np.percentile(base, 90) / np.percentile(t, 90))])
        rows.append(row)
    for how in LOWERINGS[1:]:
        for r in rows:
            if r["name"].startswith("op ") and r["name"].endswith(how):
                ref = next(x for x in rows if x["name"] == r["name"].replace(how, "reference"))
                r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"]
    result = {"model": args.model, "predicted": predicted_ratio(manifests["unrewritten"], args), "semantic_tokens": args.tokens, "generator_layer": args.layer, "batch": args.batch,
              "rounds": args.rounds, "host": host_fingerprint(), "rows": rows,
              "command": f".venv/bin/python benchmarks/bench_semantic_tokens.py --model {args.model} --tokens {args.tokens} "
                         f"--batch {args.batch} --rounds {args.rounds} --target {args.target}", "target": args.target}
    print(f"\n{'candidate':32s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'img/s':>8s} {'x unrewr.':>9s} {'x ref':>6s}")
    for r in rows:
        print(f"{r['name']:32s} {r['median_ms']:10.2f} {r['p10_ms']:8.2f} {r['p90_ms']:8.2f} {r['img_per_s']:8.1f} "
              f"{r.get('speedup_vs_unrewritten', float('nan')):9.2f} {r.get('speedup_vs_reference', float('nan')):6.2f}")
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        "semantic_tokens_deit.json" if args.target == "ort-cpu" else f"semantic_tokens_deit_{args.target}.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
