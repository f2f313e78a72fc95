"""A compile job: the pass manager over the source graph, then the stages after the backend.

``api.plan_compile`` turns options into a ``CompileJob``; tests and tools may build or edit one by
hand (their own pass list, their own context) and ``run`` it.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx_ir as ir

from . import __version__
from .artifact import MANIFEST, atomic_output_dir, model_bytes, write_json
from .ir.structure import Structure
from .passes.base import DEFAULT_INVARIANTS, CompileContext, Pass, Pipeline

if TYPE_CHECKING:
    from .backends.base import Backend
    from .frontend import Source

Progress = Callable[[str], None]


@dataclass
class CompileJob:
    """One compile: a source, a backend, the passes, and where the artifact goes.

    The stages after the pass manager, in order:
    emit (the backend writes the artifact into a staging directory), evaluate (top-1 before/after
    on data; for an embedding model the mean cosine of its embeddings to the source's), measure (the artifact's batch-1 latency), the pruning report, report.md; the
    directory is renamed into place only when every stage succeeded.
    """

    source: "Source"
    backend: "Backend"
    passes: list[Pass]
    output: Path
    ctx: CompileContext
    before: tuple[Callable[[np.ndarray], np.ndarray], str]  # the source's reference (and kind) for top-1 before
    measure_rounds: int = 5
    latency_batch: int = 1
    record: dict[str, Any] = field(default_factory=dict)  # options and calibration, for the manifest
    started: float = field(default_factory=time.monotonic)  # when planning began (``start_compile_meter``)

    def run(self, progress: Progress | None = None) -> dict[str, Any]:
        from .ir.shapes import matmul_flops, param_count
        from .report import render_report

        say = progress or (lambda stage: None)
        ctx, backend = self.ctx, self.backend
        model = Pipeline(self.passes, DEFAULT_INVARIANTS, progress=say)(self.source.model, ctx)
        structure: Structure = ctx.structure

        say("emit")
        manifest: dict[str, Any] = {
            "deploycomp_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"model": self.source.name, "family": structure.family, "reference": self.source.reference_kind,
                       **self.source.meta},
            "target": backend.fingerprint(),
            "runtime_options": backend.options(),
            "input": {"name": model.graph.inputs[0].name, "shape": _dims(model.graph.inputs[0])},
            "output": {"name": model.graph.outputs[0].name, "shape": _dims(model.graph.outputs[0])},
            "totals": {"params": param_count(model), "gflops_per_image": matmul_flops(model) / 1e9},
            "structure": structure.summary(),
            "parity": ctx.results["parity"],
            **{k: ctx.results[k] for k in ("semantic_tokens", "quantization", "latency_calibration", "precision_choice") if k in ctx.results},
            "passes": ctx.log,
            "options": self.record,
        }
        shape = tuple(d if isinstance(d, int) else 1 for d in manifest["input"]["shape"])
        with atomic_output_dir(self.output) as staging:
            manifest.update(backend.emit(model, staging))
            artifact = backend.artifact(staging, manifest)
            if isinstance(artifact, Path):
                manifest["totals"]["artifact_bytes"] = model_bytes(artifact)
            if ctx.test is not None:
                say("evaluate")
                if ctx.output == "embedding":  # no classes: how close the artifact's embeddings stay to the source's
                    manifest["embedding_cosine"] = embedding_cosine(*self.before, backend.runner(artifact), ctx.test)
                else:
                    manifest["accuracy"] = evaluate_compiled(*self.before, backend.runner(artifact), ctx.test)
            if self.measure_rounds:
                say("measure")
                manifest["latency"] = measure_artifact(backend, artifact, model, ctx.fp32_model, shape,
                                                       self.measure_rounds, self.record.get("precision") or "lossy")
            if "pruning" in ctx.results:
                from .pruning.report import finish_pruning_report

                rounds = max(6 * self.measure_rounds, 10) if self.measure_rounds else 0  # 0: measure nothing
                say("measure pruned vs unpruned" if rounds else "pruning report (not measured)")
                manifest["pruning"] = finish_pruning_report(ctx.results["pruning"], ctx.baseline_model, model, artifact,
                                                            structure, manifest, staging, backend, self.latency_batch,
                                                            rounds=rounds)
            manifest["compile"] = {"seconds": round(time.monotonic() - self.started, 1), **peak_memory()}
            manifest["files"]["report"] = "report.md"
            manifest["files"]["manifest"] = MANIFEST
            (staging / "report.md").write_text(render_report(manifest), encoding="utf-8")
            write_json(staging / MANIFEST, manifest)
        return manifest


def start_compile_meter() -> float:
    """Open a new peak-memory window for this process and return the start time, so a compile run
    beside others in one process (a benchmark, a test) reports its own peak. On Linux, writing 5 to
    ``/proc/self/clear_refs`` resets the resident-set high-water mark (``VmHWM``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return time.monotonic()


def peak_memory() -> dict[str, Any]:
    """The peak resident memory of this process since ``start_compile_meter`` (``VmHWM``), or, where
    that cannot be read, the process's lifetime peak (``ru_maxrss``), with the scope it covers."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_rss_mib": round(int(line.split()[1]) / 1024, 1), "peak_rss_scope": "compile"}
    except OSError:
        pass
    import resource
    import sys

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return {"peak_rss_mib": round(kib / 1024, 1), "peak_rss_scope": "process"}


def measure_artifact(backend: "Backend", artifact, model: ir.Model, fp32_model: ir.Model | None,
                     input_shape: tuple[int, ...], rounds: int, precision: str) -> dict[str, Any]:
    """The artifact's latency at batch 1, or at the batch the backend fixes (``static_batch``). At a
    lossy precision (a graph precision left ``fp32_model``,
    the graph before it; a runtime precision runs ``model`` itself at fp32) it is timed interleaved
    with that fp32 graph, and a precision that measures slower than fp32 on this device is a warning:
    int8 without VNNI is (OpenVINO ran 0.79-0.82x its fp32 on an AVX2 EPYC), and a user who asked
    for speed should not get a slower artifact unannounced."""
    from .backends.base import fp32_backend, time_against

    reference = fp32_backend(backend)
    batch = backend.static_batch or 1
    if fp32_model is None and reference is backend:
        return {"batch": batch, **backend.time({"artifact": artifact}, input_shape, batch=batch, rounds=rounds)["artifact"]}
    fp32_graph = model if fp32_model is None else fp32_model
    times = time_against(backend, reference, {"fp32": fp32_graph, "artifact": artifact}, "fp32", input_shape, batch, rounds)
    speedup = times["fp32"]["median_ms"] / times["artifact"]["median_ms"]
    if speedup < 1.0:
        import warnings

        from .backends.fingerprint import int8_dot_saturates
        from .errors import DeployCompWarning

        why = ("; this CPU has no VNNI, so its int8 matrix kernels are slower than its fp32 ones"
               if precision == "int8" and int8_dot_saturates() else "")
        warnings.warn(f"the {precision} artifact measured {1 / speedup:.2f}x the latency of the same graph at fp32 "
                      f"on this device (batch {batch}, medians of {rounds} interleaved rounds){why}; --precision fp32 "
                      "would be faster here", DeployCompWarning, stacklevel=2)
    return {"batch": batch, **times["artifact"], "fp32": times["fp32"], "speedup_vs_fp32": speedup}


def evaluate_compiled(reference, reference_kind: str, artifact_runner, test) -> dict[str, Any]:
    """Top-1 of the reference (torch, or the input graph) and of the artifact on its backend, same samples."""
    from .learn.evaluate import evaluate_runner

    before = evaluate_runner(reference, test)
    after = evaluate_runner(artifact_runner, test)
    return {"data": test.name, "samples": len(test), "reference": reference_kind, "reference_top1": before,
            "artifact_top1": after, "delta_pt": after - before}


def embedding_cosine(reference, reference_kind: str, artifact_runner, test) -> dict[str, Any]:
    """Mean and min per-image cosine of the artifact's embeddings (on its backend) to the reference's
    (the source, before pruning or tokens) on the test images."""
    from .learn.evaluate import runner_cosine

    return {"data": test.name, "reference": reference_kind, **runner_cosine(artifact_runner, reference, test)}


def _dims(value: ir.Value) -> list[int | str]:
    return [d if isinstance(d, int) else str(d) for d in value.shape]
