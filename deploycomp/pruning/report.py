"""What a pruned compile reports: NViT's per-block redistribution view, params, FLOPs, predicted vs
measured latency (the unpruned and the pruned graph timed interleaved in one run), and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ..ir.shapes import matmul_flops, param_count
from ..ir.structure import Structure

PLOT = "pruning.png"


def block_rows(original: list[dict], pruned: Structure) -> list[dict]:
    return [{"block": o["index"], **{k: [o[k], getattr(p, k)] for k in ("heads", "qk_dim", "v_dim", "mlp_dim")},
             "gflops": [o["gflops"], round(p.flops() / 1e9, 4)]}
            for o, p in zip(original, pruned.blocks)]


def plot_blocks(rows: list[dict], emb: tuple[int, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    x = np.array([r["block"] for r in rows])
    for ax, (key, title) in zip(axes, (("heads", "heads"), ("qk_dim", "QK dim / head"), ("v_dim", "V dim / head"),
                                       ("mlp_dim", "MLP hidden"))):
        ax.bar(x, [r[key][0] for r in rows], color="#d0d7e1", label="original")
        ax.bar(x, [r[key][1] for r in rows], color="#2f6db5", width=0.6, label="pruned")
        ax.set_title(title)
        ax.set_xlabel("block")
        ax.set_xticks(x)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"per-block dims after pruning (EMB {emb[0]} -> {emb[1]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish_pruning_report(section: dict[str, Any], unpruned: ir.Model, pruned: ir.Model, artifact, structure: Structure,
                          manifest: dict[str, Any], staging: Path, backend, batch: int, rounds: int) -> dict[str, Any]:
    """Measure (the unpruned graph against the emitted ``artifact``, interleaved on ``backend``, for
    ``rounds``; 0 times nothing: the compile was asked not to measure), tabulate and plot; returns the
    manifest's ``pruning`` section (the plot is written to ``staging``)."""
    info = dict(section)
    latency: dict[str, Any] = {"batch": batch, "predicted_ratio": info["predicted_ms"] / info["baseline_predicted_ms"]}
    if rounds:
        from ..backends.base import fp32_backend, time_against

        shape = tuple(d if isinstance(d, int) else 1 for d in manifest["input"]["shape"])
        # the unpruned source as the user holds it (fp32), the artifact as it runs (a runtime precision too)
        measured = time_against(backend, fp32_backend(backend), {"unpruned": unpruned, "pruned": artifact}, "unpruned",
                                shape, batch, rounds)
        latency.update(unpruned=measured["unpruned"], pruned=measured["pruned"],
                       measured_ratio=measured["pruned"]["median_ms"] / measured["unpruned"]["median_ms"])
    original = info.pop("original")
    rows = block_rows(original, structure)
    info.update({
        "blocks": rows,
        "emb": [original[0]["emb"], structure.blocks[0].emb],
        "params": [param_count(unpruned), param_count(pruned)],
        "gflops_per_image": [matmul_flops(unpruned) / 1e9, matmul_flops(pruned) / 1e9],
        "latency": latency,
    })
    plot_blocks(rows, tuple(info["emb"]), staging / PLOT)
    manifest["files"]["plot"] = PLOT
    return info
