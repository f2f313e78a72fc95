"""Swin-T at 224 (random weights, speed only): per-window semantic tokens (STViT-R's design), with
and without its recovery of full resolution, and windowed pruning, on both CPU runtimes, every
candidate timed interleaved in one run.

Rows per target (ort-cpu, openvino-cpu): deploycomp's unmodified compile; ``--semantic-tokens N``
(N tokens per 7x7 window in Swin-T's third stage, the stage STViT-R applies them to); the same with
``--dense`` (the recovery step, so the stage outputs its full grid again); ``--latency 0.5x``
(windowed-attention and per-stage embedding pruning) and the combination. A row the compiler refuses
(no Swin-T latency table for the target; semantic tokens together with a latency budget, which
pruning's on-device checks cannot build yet) is recorded with its one-line refusal, not left out.
Where this host has a ``swin-t`` latency table for the target and batch, each semantic-token row's
measured speed-up over the unmodified compile is set against the table's prediction of the design
(``tokens/stvit_swin.swin_token_arch``). Plain ONNX
Runtime and plain OpenVINO of the same export are the references. Ratios are per round (reference
time / candidate time): median and p10-p90, as in ``bench_runtimes.py``.

    .venv/bin/python benchmarks/bench_swin.py --latency-batch 8   # ~21 min here (AVX2 EPYC), 14 of them the pruning compile
    .venv/bin/python benchmarks/bench_swin.py --rounds 2 --batches 1 --targets ort-cpu   # check the script

Writes benchmarks/results/swin.json and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads must not spin while runtimes are timed

import argparse  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench_runtimes import source_model, timed_rows  # noqa: E402  (benchmarks/ is the script's directory)

import deploycomp  # noqa: E402
from deploycomp.artifact import write_json  # noqa: E402
from deploycomp.backends.base import backend_for_manifest, get_backend  # noqa: E402
from deploycomp.backends.fingerprint import host_fingerprint, usable_cores  # noqa: E402
from deploycomp.errors import DeployCompError  # noqa: E402
from deploycomp.pruning.config import PruneConfig  # noqa: E402
from deploycomp.tokens.config import SemanticTokenConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODEL = "swin_tiny_patch4_window7_224"
PLAIN = {"ort-cpu": "ort plain", "openvino-cpu": "openvino plain"}


def jobs(tokens: int) -> dict[str, dict]:
    """Row label -> CompileOptions fields beyond the target."""
    return {"unmodified": {},
            f"{tokens} semantic tokens per window": {"semantic_tokens": SemanticTokenConfig(tokens=tokens)},
            f"{tokens} tokens per window + recovery (--dense)": {
                "semantic_tokens": SemanticTokenConfig(tokens=tokens, dense=True)},
            "--latency 0.5x (windowed pruning)": {"prune": PruneConfig(latency="0.5x")},
            f"--latency 0.5x + {tokens} tokens per window": {"prune": PruneConfig(latency="0.5x"),
                                                              "semantic_tokens": SemanticTokenConfig(tokens=tokens)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="ort-cpu,openvino-cpu")
    ap.add_argument("--tokens", type=int, default=9, help="semantic tokens per window (a square)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--latency-batch", type=int, default=1,
                    help="the batch the --latency 0.5x rows' budget is for (picks the swin-t table)")
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "swin.json")
    args = ap.parse_args()
    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    _, shape, _, plain = source_model(MODEL)
    targets = [t.strip() for t in args.targets.split(",")]
    compiles, cands = {}, []
    for target in targets:
        cands.append(get_backend(target, threads=args.threads, **({"allow_spinning": True} if target.startswith("ort") else {}))
                     .candidate(PLAIN[target], plain, shape))
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets:
            for row, fields in jobs(args.tokens).items():
                label = f"deploycomp {target}, {row}"
                say(f"compile {label}")
                options = deploycomp.CompileOptions(target=target, threads=args.threads, measure_rounds=0, seed=0,
                                                    latency_batch=args.latency_batch, **fields)
                out = Path(tmp) / f"a{len(compiles)}"
                start = time.perf_counter()
                try:
                    manifest = deploycomp.compile(f"timm:{MODEL}", out, options)
                except DeployCompError as exc:
                    compiles[label] = {"refused": str(exc)}
                    say(f"  refused: {exc}")
                    continue
                compiles[label] = {"seconds": round(time.perf_counter() - start, 1), "parity": manifest["parity"],
                                   "gflops_per_image": manifest["totals"]["gflops_per_image"],
                                   "semantic_tokens": manifest.get("semantic_tokens"),
                                   "pruning": {k: manifest["pruning"][k] for k in ("latency", "predicted_ms")}
                                   if "pruning" in manifest else None}
                backend = backend_for_manifest(manifest, threads=args.threads)
                cands.append(backend.candidate(label, backend.artifact(out, manifest), shape))
        batches = {}
        for batch in [int(b) for b in args.batches.split(",")]:
            say(f"time {len(cands)} candidates at batch {batch}")
            target = lambda name: next(t for t in targets if t in name or PLAIN[t] == name)  # noqa: E731
            batches[str(batch)] = timed_rows(cands, batch, args.rounds, args.iters, warmup=2, against={
                "vs_plain_ort": "ort plain", "vs_own_runtime_plain": lambda name: PLAIN[target(name)],
                "vs_deploycomp_unmodified": lambda name: f"deploycomp {target(name)}, unmodified"})
    predictions = {target: {b: predicted_speedups(target, int(b), args.tokens, args.threads, rows)
                            for b, rows in batches.items()} for target in targets}
    result = {"command": shlex.join(sys.argv), "host": {**host_fingerprint(), "threads": args.threads},
              "deploycomp_version": deploycomp.__version__, "seconds": round(time.perf_counter() - t0, 1),
              "model": MODEL, "weights": "random init (speed only)",
              "protocol": {"rounds": args.rounds, "iters_per_round": args.iters, "interleaved": True,
                           "ratios": "per round, reference time / candidate time: median (p10-p90)"},
              "compiles": compiles, "batches": batches, "predictions": predictions}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    lines = ["| batch | candidate | median ms (p10-p90) | vs its runtime's plain | vs deploycomp unmodified |",
             "|---|---|---|---|---|"]
    for batch, rows in batches.items():
        for label, r in rows.items():
            a, b = r["vs_own_runtime_plain"], r["vs_deploycomp_unmodified"]
            lines.append(f"| {batch} | {label} | {r['median_ms']:.1f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f}) | "
                         f"{a['median']:.2f}x ({a['p10']:.2f}-{a['p90']:.2f}) | "
                         + (f"{b['median']:.2f}x ({b['p10']:.2f}-{b['p90']:.2f}) |" if b else "|"))
    for label, c in compiles.items():
        if "refused" in c:
            lines.append(f"| - | {label} | refused: {c['refused']} | | |")
    for target, per_batch in predictions.items():
        for batch, rows in per_batch.items():
            if "missing" in rows:
                lines.append(f"| {batch} | {target}: no prediction | {rows['missing']} | | |")
            for label, r in rows.items():
                if label != "missing":
                    lines.append(f"| {batch} | {label} | predicted {r['predicted_speedup']:.2f}x, measured "
                                 f"{r['measured_speedup']:.2f}x: error {r['error_pct']:+.1f} % | | |")
    print("\n".join(lines))
    print(f"wrote {args.out}")


def predicted_speedups(target: str, batch: int, tokens: int, threads: int, rows: dict) -> dict:
    """The swin-t latency table's speed-up of each semantic-token row over the unmodified Swin-T
    (the design read block by block, ``swin_token_arch``; unscaled: a ratio of one table's
    predictions, so the device's drift cancels) next to the measured one (median per round):
    error = measured / predicted - 1. ``{"missing": ...}`` where this host has no such table."""
    from timm import create_model

    from deploycomp.latency.arch import swin_arch_of
    from deploycomp.latency.predictor import LatencyPredictor
    from deploycomp.latency.profiler import find_table
    from deploycomp.tokens.stvit_swin import swin_token_arch

    try:
        table = find_table(target, batch, "swin-t", Path(__file__).resolve().parents[1] / "latency_tables", threads=threads)
    except DeployCompError as exc:
        return {"missing": str(exc)}
    path, predictor = table.path, LatencyPredictor(table)
    swin = create_model(MODEL, pretrained=False)
    arch = swin_arch_of(swin)
    base = predictor.predict(arch, scale=1.0).total_ms
    out = {}
    for row, fields in jobs(tokens).items():
        label = f"deploycomp {target}, {row}"
        config = fields.get("semantic_tokens")
        if config is None or "prune" in fields or label not in rows:
            continue
        view = swin_token_arch(arch, config.for_model(swin))
        predicted = base / predictor.predict(view, scale=1.0).total_ms
        measured = rows[label]["vs_deploycomp_unmodified"]["median"]
        out[label] = {"predicted_speedup": predicted, "measured_speedup": measured,
                      "error_pct": 100 * (measured / predicted - 1), "table": str(path)}
    return out


if __name__ == "__main__":
    main()
