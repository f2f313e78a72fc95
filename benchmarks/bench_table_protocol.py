"""Parts alone or in context? Two latency tables of one device against whole models (issue 18).

The proxy's openvino-cpu table at batch 32, profiled with every part timed alone, over-predicted thin
models: the head-to-head's ratio-pruned rows (EMB 96, 8-wide heads, 16-wide MLPs) were predicted at
0.299x and ran at 0.198x. ``profile`` now times a block half as what one more copy of it adds to a
chain (protocol ``chain``, ``latency/profiler.time_part``). This benchmark measures, in one
interleaved run, whole models (FlexViT, random weights, compiled by deploycomp) of:

- the architectures of the head-to-head's trained units found in ``--work`` (every row and seed;
  duplicates once);
- what ``deploycomp design`` lays out for each ``--budgets`` on each table (no data, no calibration);
- ``--random`` random architectures of the grid (half with fewer tokens after a random block);

and predicts each with both tables as profiled (no calibration). Errors are reported in
milliseconds and, what a relative budget judges, as the ratio to the unpruned proxy (the grid's
full architecture, measured in the same run). Output: a table and
``benchmarks/results/latency_table_protocol_<target>_b<batch>_proxy.json``.

    git show HEAD~1:latency_tables/openvino-cpu/<table>.json > /tmp/alone.json   # the table profiled alone
    .venv/bin/deploycomp profile --target openvino-cpu --batch 32 --grid proxy-fmnist   # in context
    .venv/bin/python benchmarks/bench_table_protocol.py --alone /tmp/alone.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploycomp.artifact import write_json  # noqa: E402
from deploycomp.latency.arch import BlockArch, ViTArch  # noqa: E402
from deploycomp.latency.calibrate import full_arch  # noqa: E402
from deploycomp.latency.predictor import LatencyPredictor  # noqa: E402
from deploycomp.latency.table import load_table  # noqa: E402
from deploycomp.latency.validate import random_archs_for, validate  # noqa: E402
from deploycomp.frontend import proxy  # noqa: E402,F401  (registers the proxy with timm)
from proxy_common import CACHE, MODEL, proxy_table  # noqa: E402


def unit_archs(work: Path, fixed: dict) -> dict[str, ViTArch]:
    """name -> architecture of every compiled unit under ``work`` (from its manifest's structure),
    at the table grid's input geometry ``fixed``."""
    geometry = {k: fixed[k] for k in ("img_size", "patch", "in_chans", "num_classes")}
    out: dict[str, ViTArch] = {}
    for manifest in sorted(work.glob("*/artifact/manifest.json")):
        s = json.loads(manifest.read_text())["structure"]
        blocks = tuple(BlockArch(b["heads"], b["qk_dim"], b["v_dim"], b["mlp_dim"], b["tokens"]) for b in s["blocks"])
        out[manifest.parent.parent.name] = ViTArch(s["stage_embs"][0], blocks, **geometry)
    return out


def designed(budget: str, table: Path, batch: int) -> ViTArch:
    from deploycomp.design.command import run_design
    from deploycomp.design.model import arch_from_json

    with tempfile.TemporaryDirectory() as tmp:
        record = run_design(Path(tmp) / "design", latency=budget, batch=batch, table=table, reference=MODEL,
                            depth_range="4:12", force=True)
    return arch_from_json(record["arch"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alone", type=Path, required=True, help="the table profiled with parts alone (old protocol)")
    ap.add_argument("--context", type=Path, default=None, help="the table profiled in context (default: this host's)")
    ap.add_argument("--target", default="openvino-cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budgets", default="0.3x,0.5x")
    ap.add_argument("--random", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--work", type=Path, default=CACHE / "design-bench")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from deploycomp.backends.base import get_backend

    backend = get_backend(args.target)
    context_path = args.context or proxy_table(args.target, args.batch)
    tables = {"alone": load_table(args.alone, force=True), "context": load_table(context_path, force=True)}
    if tables["context"].protocol.get("chain", 1) < 2 or tables["alone"].protocol.get("chain", 1) > 1:
        raise SystemExit("--alone must be a table profiled with parts alone, --context one profiled in context")
    predictors = {k: LatencyPredictor(t) for k, t in tables.items()}

    distinct: dict[str, tuple[str, ViTArch]] = {}  # one unit per architecture (seeds often repeat one)
    for name, arch in unit_archs(args.work, tables["context"].fixed).items():
        distinct.setdefault(json.dumps(arch.to_dict(), sort_keys=True), (name, arch))
    archs: dict[str, ViTArch] = dict(distinct.values())
    for budget in args.budgets.split(","):
        for k, t in tables.items():
            archs[f"design {budget} on the {k} table"] = designed(budget, t.path, args.batch)
    for i, arch in enumerate(random_archs_for(tables["context"], args.random, seed=2026)):
        archs[f"random {i}"] = arch
    print(f"{len(archs)} architectures; measuring {args.rounds} rounds on {args.target} b{args.batch}", flush=True)
    report = validate(tables["context"], backend, list(archs.values()), rounds=args.rounds,
                      progress=lambda s: print(f"  {s}", flush=True))

    full = full_arch(tables["context"])
    full_predicted = {k: p.predict(full).total_ms for k, p in predictors.items()}
    full_ms = report["calibration"]["anchors"][0]["measured_ms"]
    assert report["calibration"]["anchors"][0]["anchor"].startswith("the grid's full architecture")
    rows, errs = [], {k: {"ms": [], "ratio": []} for k in tables}
    for (name, arch), r in zip(archs.items(), report["rows"]):
        meas = r["measured"]["median_ms"]
        row = {"name": name, "emb": arch.emb, "arch": arch.to_dict(), "measured_ms": meas,
               "measured_spread_ms": [r["measured"]["p10_ms"], r["measured"]["p90_ms"]],
               "measured_ratio": meas / full_ms}
        for k, p in predictors.items():
            ms = p.predict(arch).total_ms
            ratio = ms / full_predicted[k]
            row[f"{k}_ms"], row[f"{k}_ratio"] = ms, ratio
            row[f"{k}_ms_err_pct"] = (ms / meas - 1) * 100
            row[f"{k}_ratio_err_pct"] = (ratio / row["measured_ratio"] - 1) * 100
            errs[k]["ms"].append(abs(row[f"{k}_ms_err_pct"]))
            errs[k]["ratio"].append(abs(row[f"{k}_ratio_err_pct"]))
        rows.append(row)
    summary = {k: {"median_abs_ms_err_pct": float(np.median(e["ms"])), "max_abs_ms_err_pct": float(np.max(e["ms"])),
                   "median_abs_ratio_err_pct": float(np.median(e["ratio"])),
                   "max_abs_ratio_err_pct": float(np.max(e["ratio"])),
                   "full_predicted_ms": full_predicted[k]}
               for k, e in errs.items()}

    print(f"\nunpruned proxy (the grid's full architecture): measured {full_ms:.2f} ms; predicted "
          + ", ".join(f"{k} {s['full_predicted_ms']:.2f} ms" for k, s in summary.items()))
    print(f"{'model':<36} {'EMB':>4} {'ms':>6} {'ratio':>6} | {'alone: ratio':>12} {'err':>6} | {'context: ratio':>14} {'err':>6}")
    for r in rows:
        print(f"{r['name'][:36]:<36} {r['emb']:>4} {r['measured_ms']:>6.2f} {r['measured_ratio']:>6.3f} | "
              f"{r['alone_ratio']:>12.3f} {r['alone_ratio_err_pct']:>+5.0f}% | {r['context_ratio']:>14.3f} "
              f"{r['context_ratio_err_pct']:>+5.0f}%")
    for k, s in summary.items():
        print(f"{k:>8}: |error| of the ratio median {s['median_abs_ratio_err_pct']:.1f} % max "
              f"{s['max_abs_ratio_err_pct']:.1f} %; of ms median {s['median_abs_ms_err_pct']:.1f} % max "
              f"{s['max_abs_ms_err_pct']:.1f} %")
    out = args.out or ROOT / "benchmarks" / "results" / f"latency_table_protocol_{args.target}_b{args.batch}_proxy.json"
    write_json(out, {"target": args.target, "batch": args.batch, "fingerprint": report["fingerprint"],
                     "tables": {k: str(t.path) for k, t in tables.items()},
                     "protocols": {k: t.protocol for k, t in tables.items()},
                     "full_measured_ms": full_ms, "rounds": args.rounds, "summary": summary, "rows": rows,
                     "calibration_anchors_not_used": report["calibration"]})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
