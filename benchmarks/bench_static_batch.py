"""What does OpenVINO's dynamic batch axis cost? The same artifacts, as emitted (batch dynamic) and
reshaped to the timed batch before compiling (the backend's ``static_batch`` option, what
``compile --static-batch`` emits), in one interleaved run.

Why: the proxy's openvino-cpu table profiled in context predicts composed micro-graphs within a few
percent, yet compiled small models ran ~10 % slower relative to the unpruned proxy than it predicts
(``bench_table_protocol.py``). The emitted artifacts keep the batch axis dynamic (one artifact
serves any batch); this measures how much of that gap is the dynamic shape.

    .venv/bin/python benchmarks/bench_static_batch.py ~/.cache/deploycomp/design-bench/*-0.3x-s0/artifact \\
        out/deit_tiny --batches 1,8,32

Output: a table and ``benchmarks/results/static_batch_openvino-cpu.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploycomp.artifact import read_manifest, write_json  # noqa: E402
from deploycomp.backends.base import get_backend  # noqa: E402
from deploycomp.bench.harness import measure_interleaved, stats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="+", type=Path, help="openvino-cpu artifact directories")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "static_batch_openvino-cpu.json")
    args = ap.parse_args()

    backend = get_backend("openvino-cpu")
    static = get_backend("openvino-cpu", static_batch=1)  # compiles each model for the batch it is timed at
    models = []
    for art in args.artifacts:
        m = read_manifest(art)
        if m["target"]["target"] != "openvino-cpu":
            raise SystemExit(f"{art}: an {m['target']['target']} artifact; this measures openvino-cpu artifacts")
        shape = tuple(1 if isinstance(d, str) else int(d) for d in m["input"]["shape"])
        models.append((art.parent.name if art.name == "artifact" else art.name, art / m["files"]["model"], shape))
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        cands = []
        for name, xml, shape in models:
            cands += [backend.candidate(f"{name} dynamic", xml, shape), static.candidate(f"{name} static", xml, shape)]
        times = measure_interleaved(cands, batch, rounds=args.rounds, iters=3)
        for name, xml, shape in models:
            dyn, sta = stats(times[f"{name} dynamic"]), stats(times[f"{name} static"])
            results.append({"model": name, "input": list(shape), "batch": batch, "dynamic": dyn, "static": sta,
                            "static_speedup": dyn["median_ms"] / sta["median_ms"]})
            print(f"b{batch:<3} {name:<28} dynamic {dyn['median_ms']:8.2f} ms  static {sta['median_ms']:8.2f} ms  "
                  f"{results[-1]['static_speedup']:.3f}x", flush=True)
    write_json(args.out, {"target": "openvino-cpu", "runtime_options": backend.options(),
                          "fingerprint": backend.fingerprint(), "rounds": args.rounds, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
