"""ONNX Runtime thread spinning on vs off for a lone deployed session: separate processes.

Interleaving two sessions in one process measures how spinning workers of one session slow the
other, not what a deployment sees. Here every measurement is its own process that loads one model
with one setting and times it alone; processes alternate on/off (``--repeats`` pairs), so drift
spreads over both settings. The artifact default (``OrtBackend.allow_spinning``) follows from this.

    .venv/bin/python benchmarks/bench_spinning.py                      # DeiT-Tiny and DeiT-S, batch 1 and 8
    .venv/bin/python benchmarks/bench_spinning.py --models deit_tiny --repeats 2

Writes benchmarks/results/spinning.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"

WORKER = """
import sys, time, json
import numpy as np
from deploycomp.backends.base import get_backend
path, spinning, batch, iters = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
run = get_backend("ort-cpu", allow_spinning=spinning).runner(path)
x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
for _ in range(5):
    run(x)
out = []
for _ in range(iters):
    t0 = time.perf_counter(); run(x); out.append((time.perf_counter() - t0) * 1e3)
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="deit_tiny,deit_small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=4, help="on/off process pairs per model and batch")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS / "spinning.json")
    args = ap.parse_args()

    import onnx_ir as ir

    from deploycomp.api import baseline_name
    from deploycomp.backends.fingerprint import host_fingerprint
    from deploycomp.frontend.export import export_to_onnx
    from deploycomp.frontend.timm_models import build_timm_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for alias in args.models.split(","):
            name = baseline_name(alias.strip())
            path = Path(tmp) / f"{name}.onnx"
            ir.save(export_to_onnx(build_timm_model(name), (1, 3, 224, 224)), path)
            for batch in (int(b) for b in args.batches.split(",")):
                samples: dict[str, list[float]] = {"on": [], "off": []}
                process_medians: dict[str, list[float]] = {"on": [], "off": []}
                for rep in range(args.repeats):
                    for setting in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                        proc = subprocess.run([sys.executable, "-c", WORKER, str(path), "1" if setting == "on" else "0",
                                               str(batch), str(args.iters)], capture_output=True, text=True, check=True)
                        times = json.loads(proc.stdout.strip().splitlines()[-1])
                        samples[setting] += times
                        process_medians[setting].append(float(np.median(times)))
                on, off = np.median(samples["on"]), np.median(samples["off"])
                rows.append({"model": name, "batch": batch, "on_median_ms": float(on), "off_median_ms": float(off),
                             "on_p10_p90_ms": [float(np.percentile(samples["on"], q)) for q in (10, 90)],
                             "off_p10_p90_ms": [float(np.percentile(samples["off"], q)) for q in (10, 90)],
                             "process_medians_ms": process_medians, "speed_on_vs_off": float(off / on)})
                print(f"{name} b{batch}: spinning on {on:.2f} ms, off {off:.2f} ms -> on is {off / on:.3f}x", flush=True)
    result = {"command": " ".join(shlex.quote(a) for a in sys.argv), "host": host_fingerprint(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "protocol": {"process_per_measurement": True, "repeats": args.repeats, "iters": args.iters,
                           "order": "alternating on/off per pair"}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
