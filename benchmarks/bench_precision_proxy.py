"""Precision on the proxy DeiT (Fashion-MNIST), accuracy side: what int8 and bf16 cost in top-1,
deploycomp's artifacts against the int8 a user would build with the peers' own tools, 3 seeds.

Rows, each scored on all 10 000 test images on its runtime, with top-1 agreement with the fp32
model's predictions:
- deploycomp openvino-cpu int8: NNCF post-training quantization calibrated on the first 128
  training images, fidelity gate, sensitivity and fallback as compile runs them;
- the same + 1 epoch of quantization-aware fine-tuning distilled from the fp32 model
  (``--finetune-epochs 1``), 3 seeds (it trains);
- deploycomp ort-cpu int8 (ONNX Runtime dynamic int8: no calibration);
- deploycomp openvino-cpu fp32 and bf16;
- peer: OpenVINO + NNCF int8 from the torch model as OpenVINO's guide builds it
  (``nncf_int8_ir``), calibrated on the same 128 training images;
- peer: ONNX Runtime dynamic int8 of the plain export (``quant_pre_process`` first).

Post-training rows are deterministic (fixed calibration images; no sampling), so they run once.

    .venv/bin/python benchmarks/train_proxy.py               # the fp32 proxy, once
    .venv/bin/python benchmarks/bench_precision_proxy.py     # ~15 min on 2 cores

Every row's artifact (the first seed's) is then timed interleaved with plain ONNX Runtime and plain
OpenVINO fp32 at batch 32 and 1 (speed = plain ORT time / row time per round, median and p10-p90).

Writes benchmarks/results/precision_proxy.json, a Pareto plot precision_proxy.png (top-1 against
speed) and prints a table (mean and range over seeds). ``--joint joint_proxy.json`` (repeatable)
adds the rows with semantic tokens and pruning that ``bench_tokens_proxy.py`` measured, each in its
own interleaved run against the same plain ONNX Runtime; ``--replot --joint ...`` redraws only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploycomp.api import CompileOptions, compile  # noqa: E402
from deploycomp.artifact import read_manifest, write_json  # noqa: E402
from proxy_common import CACHE, MODEL, SHAPE, peer_candidates  # noqa: E402


def predictions(run, data, batch_size: int = 500) -> np.ndarray:
    """Arg-max classes of a numpy runner (normalized images in, logits out) over ``data``."""
    out = []
    for start in range(0, len(data), batch_size):
        x = data.normalize(data.images[start:start + batch_size]).numpy()
        out.append(np.asarray(run(x)).argmax(-1))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=128, help="int8 calibration images")
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (3 calls each)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision_proxy.json")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from --out's JSON")
    ap.add_argument("--joint", type=Path, action="append", default=[],
                    help="a bench_tokens_proxy.py JSON (tokens + pruning [+ precision]) to plot beside the rows "
                         "without them (repeatable; read with --replot too)")
    args = ap.parse_args()
    joint = joint_points(args.joint)
    if args.replot:
        result = json.loads(args.out.read_text())
        plot(result["summary"], result["fp32_top1"], args.out.with_suffix(".png"), joint)
        return

    import torch

    from bench_runtimes import timed_rows  # benchmarks/ is the script's directory

    from deploycomp.backends.base import backend_for_manifest, get_backend
    from deploycomp.backends.fingerprint import host_fingerprint
    from deploycomp.frontend.export import export_to_onnx
    from deploycomp.frontend.timm_models import build_timm_model
    from deploycomp.learn.data import load_fashion_mnist

    weights = CACHE / "proxy-fmnist" / "model.safetensors"
    if not weights.is_file():
        sys.exit(f"{weights} not found: run benchmarks/train_proxy.py first")
    test = load_fashion_mnist("test")
    module = build_timm_model(MODEL.removeprefix("timm:"), weights).eval()
    with torch.inference_mode():
        fp32 = predictions(lambda x: module(torch.from_numpy(x)).numpy(), test)
    labels = test.labels.numpy()
    fp32_top1 = float((fp32 == labels).mean() * 100)
    print(f"fp32 proxy: top-1 {fp32_top1:.2f} %", flush=True)

    def score(name: str, seed: int | None, run, extra: dict) -> dict:
        pred = predictions(run, test)
        row = {"row": name, "seed": seed, "top1": float((pred == labels).mean() * 100),
               "agreement_pct": float((pred == fp32).mean() * 100), **extra}
        row["delta_pt"] = row["top1"] - fp32_top1
        print(f"  {name} seed {seed}: top-1 {row['top1']:.2f} % ({row['delta_pt']:+.2f} pt), "
              f"agreement {row['agreement_pct']:.2f} %", flush=True)
        return row

    rows, candidates = [], []
    seeds = [int(s) for s in args.seeds.split(",")]
    ort = get_backend("ort-cpu", allow_spinning=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = export_to_onnx(module, SHAPE)
        candidates.append(ort.candidate("plain ORT fp32", plain, SHAPE))
        for name, (backend, peer) in peer_candidates(module, plain, tmp, args.samples).items():
            rows.append(score(name, None, backend.runner(peer), {}))
            candidates.append(backend.candidate(name, peer, SHAPE))
        # post-training rows are deterministic (fixed calibration images, no sampling): one run each;
        # QAT trains, so it gets every seed
        jobs = {"deploycomp openvino-cpu fp32": (CompileOptions(target="openvino-cpu"), seeds[:1]),
                "deploycomp openvino-cpu bf16": (CompileOptions(target="openvino-cpu", precision="bf16"), seeds[:1]),
                "deploycomp openvino-cpu int8": (CompileOptions(target="openvino-cpu", precision="int8"), seeds[:1]),
                "deploycomp ort-cpu int8": (CompileOptions(target="ort-cpu", precision="int8"), seeds[:1]),
                f"deploycomp openvino-cpu int8 + QAT {args.qat_epochs} epoch": (
                    CompileOptions(target="openvino-cpu", precision="int8", qat_epochs=args.qat_epochs), seeds)}
        for name, (options, job_seeds) in jobs.items():
            for seed in job_seeds:
                options.weights, options.data, options.seed = str(weights), "fashion-mnist", seed
                options.calibration_samples, options.measure_rounds = args.samples, 0
                out = tmp / f"{name.replace(' ', '_').replace('+', '')}_s{seed}"
                t0 = time.perf_counter()
                compile(MODEL, out, options)
                seconds = time.perf_counter() - t0
                m = read_manifest(out)
                backend = backend_for_manifest(m)
                q = m.get("quantization", {})
                extra = {"compile_seconds": round(seconds, 1), "peak_rss_mib": m["compile"]["peak_rss_mib"],
                         "artifact_bytes": m["totals"]["artifact_bytes"], "manifest_accuracy": m.get("accuracy"),
                         "quantization": {k: q.get(k) for k in ("method", "calibration", "samples", "quantized_layers",
                                                                "fallback", "qat")} if q else None,
                         "parity": m.get("parity")}
                rows.append(score(name, seed, backend.runner(backend.artifact(out, m)), extra))
                if seed == job_seeds[0]:  # speed does not depend on the seed's weights: one artifact per row
                    candidates.append(backend.candidate(name, backend.artifact(out, m), SHAPE))
        timing = {}
        for batch in (32, 1):
            print(f"time {len(candidates)} candidates at batch {batch}", flush=True)
            timing[str(batch)] = timed_rows(candidates, batch, args.rounds, 3, {"vs_plain_ort": "plain ORT fp32"})

    summary = {}
    for name in dict.fromkeys(r["row"] for r in rows):
        d = [r["delta_pt"] for r in rows if r["row"] == name]
        a = [r["agreement_pct"] for r in rows if r["row"] == name]
        speed = {b: timing[b][name]["vs_plain_ort"] for b in timing if name in timing[b]}
        summary[name] = {"n": len(d), "top1_mean": float(np.mean([r["top1"] for r in rows if r["row"] == name])),
                         "delta_pt_mean": float(np.mean(d)), "delta_pt_min": float(np.min(d)),
                         "delta_pt_max": float(np.max(d)), "agreement_pct_mean": float(np.mean(a)), "speed": speed}
    print(f"\n| row | seeds | top-1 drop vs fp32 {fp32_top1:.2f} %, mean (range) | agreement with fp32 "
          "| speed vs plain ORT fp32, batch 32 | batch 1 |")
    print("|---|---|---|---|---|---|")
    for name, s in summary.items():
        sp = " | ".join(f"{s['speed'][b]['median']:.2f}x ({s['speed'][b]['p10']:.2f}-{s['speed'][b]['p90']:.2f})"
                        for b in ("32", "1"))
        print(f"| {name} | {s['n']} | {s['delta_pt_mean']:+.2f} ({s['delta_pt_min']:+.2f} to {s['delta_pt_max']:+.2f}) pt "
              f"| {s['agreement_pct_mean']:.2f} % | {sp} |")
    write_json(args.out, {"model": MODEL, "weights": str(weights), "fp32_top1": fp32_top1, "test_images": len(test),
                          "calibration_samples": args.samples, "seeds": seeds, "host": host_fingerprint(),
                          "protocol": {"rounds": args.rounds, "iters_per_round": 3, "interleaved": True,
                                       "ratios": "per round, median (p10-p90)"},
                          "summary": summary, "timing": timing, "rows": rows})
    plot(summary, fp32_top1, args.out.with_suffix(".png"), joint)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def joint_points(paths: list[Path]) -> list[dict]:
    """One point per row of each ``bench_tokens_proxy.py`` JSON: its mean top-1 change over seeds
    (and range) and its mean speed vs plain ORT fp32 at batch 32 (and range over seeds), each
    measured in that JSON's own interleaved run against the same plain ORT."""
    points = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for name, s in data["summary"].items():
            if "speed_vs_plain_ort_b32_mean" not in s:
                sys.exit(f"{path}: no speed against plain ONNX Runtime at batch 32 (a run before it was timed)")
            group = [r for r in data["rows"][1:] if r["row"].split(" seed ")[0] == name]
            speed = [r["speed_vs_plain_ort_b32"] for r in group]
            points.append({"label": f"deploycomp {data['target']} {data['precision']} + {data['semantic_tokens']} tokens "
                                    f"+ pruning at {data['combined_budget']} ({s['n']} seed{'s' if s['n'] > 1 else ''})",
                           "delta": s["delta_pt_mean"], "delta_range": (s["delta_pt_min"], s["delta_pt_max"]),
                           "speed": float(np.mean(speed)), "speed_range": (min(speed), max(speed))})
    return points


def plot(summary: dict, fp32_top1: float, path: Path, joint: list[dict] = ()) -> None:
    """Top-1 change against the fp32 proxy (mean over seeds) against measured speed at batch 32
    (median, p10-p90 bar), one point per row; ``joint`` points (tokens + pruning, from their own
    runs: bars span their seeds) beside them, on a log speed axis. Without them the y axis spans
    the issue's accuracy budget (fp32 - 1 pt) so 0.1 pt looks its size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    rows = sorted(((n, s) for n, s in summary.items() if "32" in s["speed"]), key=lambda r: r[1]["speed"]["32"]["median"])
    colors = plt.get_cmap("tab10").colors
    for i, (name, s) in enumerate(rows):
        sp = s["speed"]["32"]
        x, y = sp["median"], s["delta_pt_mean"]
        peer = name.startswith(("peer", "plain"))
        ax.errorbar(x, y, xerr=[[x - sp["p10"]], [sp["p90"] - x]], fmt="s" if peer else "o", capsize=2, lw=0.8,
                    ms=7, color=colors[i % len(colors)], label=name + (f" ({s['n']} seeds)" if s["n"] > 1 else ""))
    for j, p in enumerate(joint):
        x, y = p["speed"], p["delta"]
        ax.errorbar(x, y, xerr=[[x - p["speed_range"][0]], [p["speed_range"][1] - x]],
                    yerr=[[y - p["delta_range"][0]], [p["delta_range"][1] - y]], fmt="D", capsize=2, lw=0.8, ms=7,
                    color=colors[(len(rows) + j) % len(colors)], label=p["label"])
    ax.axhline(0.0, color="#cc4444", lw=0.8, ls="--", label=f"fp32 torch ({fp32_top1:.2f} %)")
    ax.axhline(-0.3, color="#cc4444", lw=0.6, ls=":", label="-0.3 pt (int8 target)")
    if joint:
        ax.axhline(-1.0, color="#cc4444", lw=0.6, ls="-.", label="-1.0 pt (joint target at 0.1x)")
        ax.set_xscale("log")
        ticks = [t for t in (1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30) if t <= 1.3 * max(p["speed_range"][1] for p in joint)]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.minorticks_off()
        low = min([-1.2] + [p["delta_range"][0] - 0.2 for p in joint])
        ax.set_ylim(low, 0.6)
    else:
        ax.set_ylim(-1.0, 0.6)
    ax.set_xlabel("speed vs plain ONNX Runtime fp32, batch 32 (median, p10-p90; diamonds: range over seeds)", fontsize=9)
    ax.set_ylabel("top-1 change vs the fp32 proxy on 10 000 test images (pt, mean of seeds)")
    ax.set_title("Proxy DeiT (Fashion-MNIST) on this CPU: precision, tokens, pruning (squares: peers, plain runtimes)",
                 fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

if __name__ == "__main__":
    main()
