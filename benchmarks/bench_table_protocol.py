"""Which table protocol predicts the device? Latency tables of one device against whole models (issue 18).

The proxy's openvino-cpu table at batch 32, profiled with every part timed alone, over-predicted thin
models: the head-to-head's ratio-pruned rows (EMB 96, 8-wide heads, 16-wide MLPs) were predicted at
0.299x and ran at 0.198x. ``profile`` now times a block half as what one more copy of it adds to a
chain (protocol ``chain``, ``latency/profiler.time_part``). This benchmark measures, in one
interleaved run, whole models (FlexViT, random weights, compiled by deploycomp) of:

- the architectures of the head-to-head's trained units found in ``--work`` (every row and seed;
  duplicates once);
- what ``deploycomp design`` lays out for each ``--budgets`` on each table (no data, no calibration);
- ``--random`` random architectures of the grid (half with fewer tokens after a random block);

and predicts each with every table (no calibration), read as the predictor reads it (each part's
grid made monotone) and as profiled (the medians as measured). Each table's models are compiled
and timed on the backend its fingerprint names: a table profiled with ``--static-batch`` judges
artifacts compiled with ``--static-batch`` (their IR's batch fixed, ``backends/openvino.py``), so
its rows are measured on such artifacts. Errors are reported in milliseconds and, what a relative
budget judges, as the ratio to the unpruned proxy (the grid's full architecture, measured in the
same run on the same backend). Output: a table and
``benchmarks/results/latency_table_protocol_<target>_b<batch>_proxy[_<labels>].json``.

    git show c6ce420:latency_tables/openvino-cpu/<table>.json > /tmp/alone.json   # the table profiled alone
    .venv/bin/deploycomp profile --target openvino-cpu --batch 32 --grid proxy-fmnist   # in context
    .venv/bin/python benchmarks/bench_table_protocol.py --table alone=/tmp/alone.json --table context
    .venv/bin/deploycomp profile --target openvino-cpu --batch 32 --grid proxy-fmnist --static-batch
    .venv/bin/python benchmarks/bench_table_protocol.py --table context --table static

(``context`` and ``static``: this host's tables, dynamic and static batch; ``LABEL=PATH``: a file.)
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


def host_tables(target: str, batch: int) -> dict[str, Path]:
    """This host's proxy tables by label: ``context`` (dynamic batch) and ``static``."""
    return {"context": proxy_table(target, batch), "static": proxy_table(target, batch, static_batch=True)}


def table_arg(spec: str, target: str, batch: int) -> tuple[str, Path]:
    label, _, path = spec.partition("=")
    if path:
        return label, Path(path)
    known = host_tables(target, batch)
    if label not in known:
        raise SystemExit(f"--table {spec}: give LABEL=PATH, or one of {', '.join(known)} (this host's tables)")
    return label, known[label]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="append", required=True,
                    help="LABEL=PATH, or context/static (this host's proxy tables); repeat to compare")
    ap.add_argument("--target", default="openvino-cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budgets", default="0.3x,0.5x")
    ap.add_argument("--random", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--work", type=Path, default=CACHE / "design-bench")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from deploycomp.backends.base import get_backend

    tables = {label: load_table(path, force=True) for label, path in
              (table_arg(spec, args.target, args.batch) for spec in args.table)}
    predictors = {k: LatencyPredictor(t) for k, t in tables.items()}
    as_profiled = {k: LatencyPredictor(t, monotone=False) for k, t in tables.items()}  # the medians as measured
    first = next(iter(tables.values()))

    distinct: dict[str, tuple[str, ViTArch]] = {}  # one unit per architecture (seeds often repeat one)
    for name, arch in unit_archs(args.work, first.fixed).items():
        distinct.setdefault(json.dumps(arch.to_dict(), sort_keys=True), (name, arch))
    archs: dict[str, ViTArch] = dict(distinct.values())
    for budget in args.budgets.split(","):
        for k, t in tables.items():
            archs[f"design {budget} on the {k} table"] = designed(budget, t.path, args.batch)
    for i, arch in enumerate(random_archs_for(first, args.random, seed=2026)):
        archs[f"random {i}"] = arch

    # one measurement per backend the tables name (dynamic or static batch), each with its full model
    measured: dict[int | None, dict] = {}
    for k, t in tables.items():
        static = t.fingerprint.get("static_batch")
        if static not in measured:
            backend = get_backend(args.target, static_batch=static)
            print(f"{len(archs)} architectures; measuring {args.rounds} rounds on {args.target} b{args.batch}"
                  f"{' static' if static else ''}", flush=True)
            measured[static] = validate(t, backend, list(archs.values()), rounds=args.rounds,
                                        progress=lambda s: print(f"  {s}", flush=True))
            anchor = measured[static]["calibration"]["anchors"][0]
            assert anchor["anchor"].startswith("the grid's full architecture")

    full = full_arch(first)
    # per table, once: the unpruned proxy as measured on the table's backend and as predicted both ways
    summary = {k: {"full_measured_ms": measured[t.fingerprint.get("static_batch")]["calibration"]["anchors"][0]["measured_ms"],
                   "full_predicted_ms": predictors[k].predict(full).total_ms,
                   "full_predicted_as_profiled_ms": as_profiled[k].predict(full).total_ms} for k, t in tables.items()}
    rows, errs = [], {k: {"ms": [], "ratio": [], "ms_as_profiled": [], "ratio_as_profiled": []} for k in tables}
    for i, (name, arch) in enumerate(archs.items()):
        row = {"name": name, "emb": arch.emb, "arch": arch.to_dict()}
        for k, t in tables.items():
            meas = measured[t.fingerprint.get("static_batch")]["rows"][i]["measured"]
            ms, s = predictors[k].predict(arch).total_ms, summary[k]
            row[k] = {"measured_ms": meas["median_ms"], "measured_spread_ms": [meas["p10_ms"], meas["p90_ms"]],
                      "measured_ratio": meas["median_ms"] / s["full_measured_ms"], "predicted_ms": ms,
                      "predicted_ratio": ms / s["full_predicted_ms"]}
            row[k]["ms_err_pct"] = (ms / meas["median_ms"] - 1) * 100
            row[k]["ratio_err_pct"] = (row[k]["predicted_ratio"] / row[k]["measured_ratio"] - 1) * 100
            raw_ms = as_profiled[k].predict(arch).total_ms
            row[k]["as_profiled_ms_err_pct"] = (raw_ms / meas["median_ms"] - 1) * 100
            row[k]["as_profiled_ratio_err_pct"] = (raw_ms / s["full_predicted_as_profiled_ms"] / row[k]["measured_ratio"] - 1) * 100
            for e in ("ms", "ratio"):
                errs[k][e].append(abs(row[k][f"{e}_err_pct"]))
                errs[k][f"{e}_as_profiled"].append(abs(row[k][f"as_profiled_{e}_err_pct"]))
        rows.append(row)
    for k, e in errs.items():
        for name, errors in e.items():  # ms, ratio: as the predictor reads the table (monotone); *_as_profiled: raw medians
            summary[k][f"median_abs_{name}_err_pct"] = float(np.median(errors))
            summary[k][f"max_abs_{name}_err_pct"] = float(np.max(errors))

    print("\nunpruned proxy (the grid's full architecture): " + "; ".join(
        f"{k}: measured {s['full_measured_ms']:.2f} ms, predicted {s['full_predicted_ms']:.2f} ms" for k, s in summary.items()))
    print(f"{'model':<36} {'EMB':>4} | " + " | ".join(f"{k + ': ms':>12} {'ratio':>6} {'pred':>6} {'err':>5}" for k in tables))
    for r in rows:
        print(f"{r['name'][:36]:<36} {r['emb']:>4} | " + " | ".join(
            f"{r[k]['measured_ms']:>12.2f} {r[k]['measured_ratio']:>6.3f} {r[k]['predicted_ratio']:>6.3f} "
            f"{r[k]['ratio_err_pct']:>+4.0f}%" for k in tables))
    for k, s in summary.items():
        for how, tail in (("monotone", ""), ("as profiled", "_as_profiled")):
            print(f"{k:>8} {how:>11}: |error| of the ratio median {s[f'median_abs_ratio{tail}_err_pct']:.1f} % max "
                  f"{s[f'max_abs_ratio{tail}_err_pct']:.1f} %; of ms median {s[f'median_abs_ms{tail}_err_pct']:.1f} % max "
                  f"{s[f'max_abs_ms{tail}_err_pct']:.1f} %")
    out = args.out or ROOT / "benchmarks" / "results" / \
        f"latency_table_protocol_{args.target}_b{args.batch}_proxy_{'-'.join(tables)}.json"
    write_json(out, {"target": args.target, "batch": args.batch,
                     "fingerprints": {k: t.fingerprint for k, t in tables.items()},
                     "tables": {k: str(t.path) for k, t in tables.items()},
                     "protocols": {k: t.protocol for k, t in tables.items()},
                     "rounds": args.rounds, "summary": summary, "rows": rows,
                     "calibration_anchors_not_used": {("static" if s else "dynamic"): r["calibration"]
                                                      for s, r in measured.items()}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
