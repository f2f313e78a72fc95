"""Does ONNX Runtime on this CPU prefer dims that are multiples of 8/16? (chunk sizes, measured)

Times the latency micro-graphs of a DeiT-S block (197 tokens, EMB 384) for every width in a small
window below the original: MLP hidden 1504..1536, QK/V per head 56..64 (6 heads), EMB 368..384.
All variants of one part are interleaved in one run (shuffled every round). If aligned widths were
faster, the latency of an aligned width would sit below the line through its unaligned neighbours;
the script reports, per part, the median latency of aligned (multiple of 16 / 8) and unaligned
widths relative to a linear fit over all of them.

    .venv/bin/python benchmarks/bench_group_sizes.py     # ~3 min; writes benchmarks/results/group_sizes.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploycomp.artifact import write_json  # noqa: E402
from deploycomp.backends.base import get_backend  # noqa: E402
from deploycomp.bench.harness import Candidate, measure_interleaved, stats  # noqa: E402
from deploycomp.latency import micrographs  # noqa: E402

PARTS = {
    "mlp_hidden": (lambda w: micrographs.mlp_part(197, 384, w), range(1504, 1537, 2), 16),
    "qk_dim": (lambda w: micrographs.attention_part(197, 384, 6, w, 64), range(48, 65), 8),
    "v_dim": (lambda w: micrographs.attention_part(197, 384, 6, 64, w), range(48, 65), 8),
    "emb": (lambda w: micrographs.mlp_part(197, w, 1536), range(352, 385, 2), 16),
}


def candidate(name: str, proto, backend, batch_shape) -> Candidate:
    def make(batch: int):
        sess = backend.session(proto.SerializeToString())
        x = np.random.default_rng(0).standard_normal((batch, *batch_shape)).astype(np.float32)
        feed = {sess.get_inputs()[0].name: x}
        return lambda: sess.run(None, feed)

    return Candidate(name, "part", make)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "group_sizes.json")
    args = ap.parse_args()
    backend = get_backend("ort-cpu")
    report = {"fingerprint": backend.fingerprint(), "rounds": args.rounds, "parts": {}}
    for part, (build, widths, align) in PARTS.items():
        widths = list(widths)
        cands = []
        for w in widths:
            proto = build(w)
            shape = (197, w if part == "emb" else 384)
            cands.append(candidate(str(w), proto, backend, shape))
        times = measure_interleaved(cands, batch=1, rounds=args.rounds, iters=3, warmup=2)
        med = np.array([stats(times[str(w)])["median_ms"] for w in widths])
        x = np.array(widths, dtype=float)
        fit = np.polyval(np.polyfit(x, med, 1), x)
        resid = med / fit
        aligned = np.array([w % align == 0 for w in widths])
        row = {"align": align, "widths": widths, "median_ms": med.tolist(), "relative_to_fit": resid.tolist(),
               "aligned_median_rel": float(np.median(resid[aligned])),
               "unaligned_median_rel": float(np.median(resid[~aligned]))}
        report["parts"][part] = row
        print(f"{part:11} aligned(x{align}) {row['aligned_median_rel']:.3f}  unaligned {row['unaligned_median_rel']:.3f}  "
              f"(latency / linear fit; {len(widths)} widths {widths[0]}..{widths[-1]})", flush=True)
        for w, m, r in zip(widths, med, resid):
            print(f"    {w:5d} {m:8.3f} ms  {r:6.3f}{'  *' if w % align == 0 else ''}")
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
