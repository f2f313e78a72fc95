"""Precision on the proxy DeiT (Fashion-MNIST), accuracy side: what int8 and bf16 cost in top-1,
deploycomp's artifacts against the int8 a user would build with the peers' own tools, 3 seeds.

Rows, each scored on all 10 000 test images on its runtime, with top-1 agreement with the fp32
model's predictions:
- deploycomp openvino-cpu int8: NNCF post-training quantization calibrated on the first 128
  training images, fidelity gate, sensitivity and fallback as compile runs them;
- the same + 1 epoch of quantization-aware fine-tuning distilled from the fp32 model
  (``--finetune-epochs 1``), 3 seeds (it trains);
- deploycomp ort-cpu int8 (ONNX Runtime dynamic int8: no calibration);
- deploycomp openvino-cpu bf16;
- peer: OpenVINO + NNCF int8 from the torch model as OpenVINO's guide builds it
  (``nncf_int8_ir``), calibrated on the same 128 training images;
- peer: ONNX Runtime dynamic int8 of the plain export (``quant_pre_process`` first).

Post-training rows are deterministic (fixed calibration images; no sampling), so they run once.

    .venv/bin/python benchmarks/train_proxy.py               # the fp32 proxy, once
    .venv/bin/python benchmarks/bench_precision_proxy.py     # ~15 min on 2 cores

Writes benchmarks/results/precision_proxy.json and prints a table (mean and range over seeds).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploycomp.api import CompileOptions, compile  # noqa: E402
from deploycomp.artifact import read_manifest, write_json  # noqa: E402
from proxy_common import CACHE, MODEL  # noqa: E402

SHAPE = (1, 1, 28, 28)


def predictions(run, data, batch_size: int = 500) -> np.ndarray:
    """Arg-max classes of a numpy runner (normalized images in, logits out) over ``data``."""
    out = []
    for start in range(0, len(data), batch_size):
        x = data.normalize(data.images[start:start + batch_size]).numpy()
        out.append(np.asarray(run(x)).argmax(-1))
    return np.concatenate(out)


def calibration_images(train, samples: int) -> list[np.ndarray]:
    """The first ``samples`` training images, normalized, one per batch: what deploycomp's int8
    calibrates on with ``--data`` (``passes/quantize.calibration_inputs``)."""
    images = train.normalize(train.head(samples).images).numpy()
    return [images[i:i + 1] for i in range(len(images))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=128, help="int8 calibration images")
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision_proxy.json")
    args = ap.parse_args()

    import torch

    from deploycomp.backends.base import backend_for_manifest, get_backend
    from deploycomp.backends.openvino import nncf_int8_ir
    from deploycomp.backends.ort import dynamic_int8
    from deploycomp.frontend.export import export_to_onnx
    from deploycomp.frontend.timm_models import build_timm_model
    from deploycomp.learn.data import load_fashion_mnist

    weights = CACHE / "proxy-fmnist" / "model.safetensors"
    if not weights.is_file():
        sys.exit(f"{weights} not found: run benchmarks/train_proxy.py first")
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
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

    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    ov, ort = get_backend("openvino-cpu"), get_backend("ort-cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = export_to_onnx(module, SHAPE)
        peer_ort = dynamic_int8(plain, tmp / "peer_ort_int8.onnx", preprocess=True)
        rows.append(score("peer: ONNX Runtime dynamic int8", None, ort.runner(peer_ort.read_bytes()), {}))
        ir_path = nncf_int8_ir(module, SHAPE, tmp / "peer_ov_int8.xml", samples=args.samples,
                               calibration=calibration_images(train, args.samples))
        rows.append(score("peer: OpenVINO + NNCF int8", None, ov.runner(ir_path), {}))
        # post-training rows are deterministic (fixed calibration images, no sampling): one run each;
        # QAT trains, so it gets every seed
        jobs = {"deploycomp openvino-cpu bf16": (CompileOptions(target="openvino-cpu", precision="bf16"), seeds[:1]),
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
                extra = {"compile_seconds": round(seconds, 1), "manifest_accuracy": m.get("accuracy"),
                         "quantization": {k: q.get(k) for k in ("method", "calibration", "samples", "quantized_layers",
                                                                "fallback", "qat")} if q else None,
                         "parity": m.get("parity")}
                rows.append(score(name, seed, backend.runner(backend.artifact(out, m)), extra))

    summary = {}
    for name in dict.fromkeys(r["row"] for r in rows):
        d = [r["delta_pt"] for r in rows if r["row"] == name]
        a = [r["agreement_pct"] for r in rows if r["row"] == name]
        summary[name] = {"n": len(d), "delta_pt_mean": float(np.mean(d)), "delta_pt_min": float(np.min(d)),
                         "delta_pt_max": float(np.max(d)), "agreement_pct_mean": float(np.mean(a))}
    print(f"\n| row | seeds | top-1 drop vs fp32 {fp32_top1:.2f} %, mean (range) | agreement with fp32 |")
    print("|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['n']} | {s['delta_pt_mean']:+.2f} ({s['delta_pt_min']:+.2f} to {s['delta_pt_max']:+.2f}) pt "
              f"| {s['agreement_pct_mean']:.2f} % |")
    write_json(args.out, {"model": MODEL, "weights": str(weights), "fp32_top1": fp32_top1, "test_images": len(test),
                          "calibration_samples": args.samples, "seeds": seeds, "summary": summary, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
