"""Latency and throughput measurement, interleaved so candidates share the machine's drift.

Absolute times drift 20-30 % over minutes on shared machines, so candidates are never timed one
after another: every round runs each candidate (in a shuffled order) a few times, and the
statistics are taken over all rounds. Report medians and spreads, compare ratios.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class Candidate:
    name: str
    kind: str  # e.g. "deploycomp", "ort", "torch"
    make_runner: Callable[[int], Callable[[], Any]]  # batch -> zero-argument callable running one batch
    model: str = ""
    gflops: float | None = None  # per image
    meta: dict[str, Any] = field(default_factory=dict)
    # idle seconds after this candidate's turn: a runtime whose worker threads keep spinning after a
    # run (ONNX Runtime with spinning on keeps a core busy 10-50 ms) would otherwise slow whichever
    # candidate runs next on a 2-core machine; ~100 ms lets it settle
    settle_s: float = 0.0


def stats(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1e3
    return {
        "median_ms": float(np.median(a)),
        "p10_ms": float(np.percentile(a, 10)),
        "p90_ms": float(np.percentile(a, 90)),
        "min_ms": float(a.min()),
        "n": int(a.size),
    }


def measure_interleaved(candidates: list[Candidate], batch: int, rounds: int = 10, iters: int = 3,
                        warmup: int = 2, seed: int = 0, progress: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Per-call wall times (seconds) of each candidate at ``batch``, interleaved round by round
    (each candidate's ``settle_s`` idles after its turn)."""
    runners = {c.name: c.make_runner(batch) for c in candidates}
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    rng = np.random.default_rng(seed)
    names = [c.name for c in candidates]
    settle = {c.name: c.settle_s for c in candidates}
    for _ in range(rounds):
        for idx in rng.permutation(len(names)):
            name = names[idx]
            run = runners[name]
            for _ in range(iters):
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
            if settle[name]:
                time.sleep(settle[name])
        if progress is not None:
            progress()
    return times


def summarize(candidates: list[Candidate], latency: dict[str, list[float]], throughput: dict[str, list[float]] | None,
              tp_batch: int) -> list[dict[str, Any]]:
    rows = []
    for c in candidates:
        lat = stats(latency[c.name])
        row: dict[str, Any] = {"name": c.name, "kind": c.kind, "model": c.model, "latency_b1": lat}
        if throughput is not None:
            t = np.asarray(throughput[c.name])
            ips = tp_batch / t
            row["throughput"] = {"batch": tp_batch, "median_img_s": float(np.median(ips)),
                                 "p10_img_s": float(np.percentile(ips, 10)), "p90_img_s": float(np.percentile(ips, 90))}
        if c.gflops:
            row["gflops_per_image"] = c.gflops
            row["achieved_gflop_s_b1"] = c.gflops / (lat["median_ms"] / 1e3)
        row.update(c.meta)
        rows.append(row)
    return rows


def torch_candidate(name: str, module, input_shape: tuple[int, ...], threads: int, model: str = "",
                    gflops: float | None = None) -> Candidate:
    def make(batch: int):
        import torch

        torch.set_num_threads(threads)
        x = torch.randn(batch, *input_shape[1:])

        def run():
            with torch.inference_mode():
                return module(x)

        return run

    return Candidate(name, kind="torch", make_runner=make, model=model, gflops=gflops, meta={"threads": threads})


def gemm_rate_gflops(n: int = 2048, repeats: int = 5, threads: int | None = None) -> dict[str, float]:
    """The machine's float32 GEMM rate (torch), the ceiling the models are compared to."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3
    return {"n": n, "median_gflop_s": flops / float(np.median(times)) / 1e9, "max_gflop_s": flops / min(times) / 1e9}
