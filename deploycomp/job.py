"""A compile job: the pass manager over the source graph, then the stages after the backend.

``api.plan_compile`` turns options into a ``CompileJob``; tests and tools may build or edit one by
hand (their own pass list, their own context) and ``run`` it.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx_ir as ir

from . import __version__
from .artifact import MANIFEST, atomic_output_dir, write_json
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
            if ctx.test is not None:
                say("evaluate")
                if ctx.output == "embedding":  # no classes: how close the artifact's embeddings stay to the source's
                    manifest["embedding_cosine"] = embedding_cosine(*self.before, backend.runner(artifact), ctx.test)
                else:
                    manifest["accuracy"] = evaluate_compiled(*self.before, backend.runner(artifact), ctx.test)
            if self.measure_rounds:
                say("measure")
                times = backend.time({"artifact": artifact}, shape, batch=1, rounds=self.measure_rounds)
                manifest["latency"] = {"batch": 1, **times["artifact"]}
            if "pruning" in ctx.results:
                from .pruning.report import finish_pruning_report

                say("measure pruned vs unpruned")
                manifest["pruning"] = finish_pruning_report(ctx.results["pruning"], ctx.baseline_model, model, artifact,
                                                            structure, manifest, staging, backend, self.latency_batch,
                                                            rounds=max(6 * self.measure_rounds, 10))
            manifest["files"]["report"] = "report.md"
            manifest["files"]["manifest"] = MANIFEST
            (staging / "report.md").write_text(render_report(manifest), encoding="utf-8")
            write_json(staging / MANIFEST, manifest)
        return manifest


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
