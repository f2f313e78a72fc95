"""prune: NViT latency-regularized structural pruning to a latency budget (pruning/).

Runs the schedule on the torch module the graph came from (masks keep parameter names), writes the
trained weights into the graph, rewrites the graph to the final plan and re-discovers its
structure. The verification gate that follows compares the rewritten graph with the masked torch
model, so the artifact is checked against exactly what was trained.

**Precision.** The budget is relative to the unpruned model as the user holds it: fp32 on the
target (``ctx.latency_reference``, the fp32 table, calibrated on the unpruned graph timed in fp32).
Pruned architectures are predicted by the table of the compile's precision (``ctx.latency``), so a
lower precision counts toward the budget; that table is calibrated on the unpruned graph in that
precision (quantized as the quantize pass does, for timing) when on-device checks are on, and
otherwise scaled like the fp32 table (the device's drift is shared). On-device checks time the
pruned graph in the compile's precision against the unpruned graph in fp32. The manifest's
``levers`` split the predicted speed-up into precision x tokens x width, in that order.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch

from ..backends.base import fp32_backend as source_backend
from ..backends.base import time_against
from ..errors import DeployCompError, DeployCompWarning
from ..frontend import torch_reference
from ..ir.discover import discover
from ..latency.calibrate import calibration, fitted
from ..latency.predictor import LatencyPredictor
from ..pruning.derived import link_relative_position_biases
from ..pruning.masks import copy_weights_to_graph
from ..pruning.plan import PrunePlan, plan_arch
from ..pruning.rewrite import prune_graph
from ..pruning.schedule import LatencyBudget, PruneConfig, prune
from ..pruning.select import copy_plan, uniform_step
from .base import CompileContext, Pass, PassResult, Rewrite, graph_opset, objective_of, register_pass


def grid_floors(grid: dict, structure=None) -> dict[str, int]:
    """The smallest size of each kind the latency table was profiled at; on a Swin grid, of each
    group at its stage's parts (``stage1.emb``, ``block4.heads``, ...)."""
    if "window_attention.0" in grid:
        # a stage never reaches the previous stage's width: discovery tells stages apart by width, so
        # two adjacent stages of one width would read back as one
        floors, previous = {}, 0
        for s in range(len(structure.stage_embs)):
            floors[f"stage{s}.emb"] = max(min(grid[f"window_attention.{s}"]["emb"]), previous + 1)
            previous = structure.stage_embs[s]
        for b in structure.blocks:
            att, mlp = grid[f"window_attention.{b.stage}"], grid[f"mlp.{b.stage}"]
            for kind, values in (("heads", att["heads"]), ("qk", att["qk_dim"]), ("v", att["v_dim"]),
                                 ("mlp", mlp["mlp_dim"])):
                floors[f"block{b.index}.{kind}"] = min(values)
        return floors
    att, mlp = grid["attention"], grid["mlp"]
    return {"emb": min(att["emb"]), "heads": min(att["heads"]), "qk": min(att["qk_dim"]), "v": min(att["v_dim"]),
            "mlp": min(mlp["mlp_dim"])}


def geometry_of(module: torch.nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """The input geometry and class count a latency table is keyed by."""
    geometry = {"img_size": input_shape[-1], "patch": int(module.patch_embed.patch_size[0]),
                "in_chans": input_shape[1], "num_classes": int(module.num_classes)}
    if hasattr(module, "layers"):  # Swin: which blocks shift their windows
        geometry["shifts"] = tuple(bool(np.any(np.asarray(blk.shift_size))) for stage in module.layers
                                   for blk in stage.blocks)
    return geometry


@register_pass
class PrunePass(Pass):
    name = "prune"

    def __init__(self, config: PruneConfig, rewrites: Sequence[Rewrite] = (), latency_batch: int = 1,
                 measure_rounds: int = 30, calibrate_rounds: int = 4, precision: str = "fp32"):
        """``rewrites``: passes applied after pruning that change latency (semantic tokens and their
        lowering). The budget covers them: the latency model sees their architecture, the torch
        model they wrap is what is trained, and every on-device check times the pruned graph with
        them applied against the unpruned source graph. ``calibrate_rounds``: rounds the unpruned
        graph and a uniformly and a non-uniformly narrowed copy near the budget are timed to scale the latency table to
        the device now (``latency/calibrate.py``; 0 trusts the table as profiled). ``precision``: what
        the artifact runs in after the later passes (the precision ``ctx.latency`` was profiled at)."""
        self.config, self.rewrites, self.precision = config, list(rewrites), precision
        self.latency_batch, self.measure_rounds, self.calibrate_rounds = latency_batch, measure_rounds, calibrate_rounds

    def requires(self, model: ir.Model, ctx: CompileContext) -> None:
        assert ctx.structure is not None, "prune needs the discovered structure"
        assert ctx.module is not None, "pruning trains the torch model: the source must be a torch model"
        assert ctx.latency is not None, "pruning to a budget needs the target's latency table"
        for name in (sl.tensor for g in ctx.structure.groups() for sl in ctx.structure.slices(g)):
            assert name in model.graph.initializers, f"coupled tensor {name} missing"

    def in_precision(self, model, backend, input_shape) -> bytes:
        """``model`` (serialized fp32 graph) as the compile's precision will leave it, for timing."""
        if self.precision == "int8":
            import tempfile

            import numpy as np

            from .quantize import quantize_for_latency

            x = [np.random.default_rng(k).standard_normal(input_shape).astype(np.float32) for k in range(4)]
            with tempfile.TemporaryDirectory(prefix="deploycomp-prune-int8-") as tmp:
                return quantize_for_latency(model, backend.int8_quantizer, x, tmp).SerializeToString()
        if self.precision != "fp32" and backend.precisions.get(self.precision) == "graph":
            from .precision import convert_precision

            return ir.to_proto(convert_precision(ir.serde.deserialize_model(onnx.load_from_string(model)),
                                                 self.precision)).SerializeToString()
        return model  # fp32, or a runtime precision: the backend runs it

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        structure, predictor = ctx.structure, ctx.latency
        reference = ctx.latency_reference or predictor  # the fp32 table: what the budget is relative to
        lowered = reference is not predictor
        geometry = geometry_of(ctx.module, ctx.input_shape)
        shape = (1, *ctx.input_shape[1:])
        # Swin's folded position biases are marked with their tables before the graph is copied
        # for trials, so every copy recomputes them from the trained module
        link_relative_position_biases(ctx.module, model, structure)
        unpruned = ir.to_proto(model).SerializeToString()
        ctx.baseline_model = ir.serde.deserialize_model(onnx.load_from_string(unpruned))  # timed against the result
        module = ctx.module
        for r in self.rewrites:
            module = r.wrap_module(module)
        # a rewrite that exports its graph from the design's torch model (Swin's semantic tokens): trial
        # graphs and the result come from that model sliced to the plan
        exporter = next((r for r in self.rewrites if r.exports_design), None)

        def predict(plan: PrunePlan, rewritten: bool = True, by=None) -> float:
            arch = plan_arch(structure, plan, **geometry)
            for r in self.rewrites if rewritten else ():
                arch = r.rewrite_arch(arch)
            return (by or predictor).predict(arch).total_ms

        fp32_backend = source_backend(ctx.backend) if ctx.backend is not None else None

        def time_against_unpruned(graph: bytes) -> float:
            """``graph`` in the compile's precision timed against the unpruned graph in fp32."""
            graph = self.in_precision(graph, ctx.backend, shape)
            times = time_against(ctx.backend, fp32_backend, {"unpruned": unpruned, "pruned": graph}, "unpruned",
                                 shape, self.latency_batch, self.measure_rounds)
            return times["pruned"]["median_ms"] / times["unpruned"]["median_ms"]

        def measure(plan: PrunePlan) -> float:
            """The plan's graph (current weights, rewrites applied, in the compile's precision) timed
            against the unpruned graph."""
            if exporter is not None:
                trial = exporter.export_design(exporter.cut_design(module, structure, plan), ctx.input_shape,
                                               graph_opset(model), ctx)
            else:
                trial = ir.serde.deserialize_model(onnx.load_from_string(unpruned))
                copy_weights_to_graph(module, trial)
                prune_graph(trial, structure, plan)
            for r in self.rewrites:
                if r is not exporter:
                    r.rewrite_graph(trial)
            return time_against_unpruned(ir.to_proto(trial).SerializeToString())

        config, absolute = self.config, None
        budget = LatencyBudget.parse(config.latency)
        judge_on_device = not budget.relative and config.budget_rounds and ctx.backend is not None
        ms = None
        if ctx.backend is not None and (self.calibrate_rounds or judge_on_device):
            rounds = self.measure_rounds if judge_on_device else self.calibrate_rounds
            models = {"unpruned": unpruned}
            if self.calibrate_rounds:  # more anchors, near where the pruned model will land
                source_ms = predict(PrunePlan(), rewritten=False, by=reference)
                fraction = budget.target_ms(source_ms) / source_ms if not budget.relative else budget.value
                narrowed_plans = {key: self.narrowed_anchor(structure, lambda plan: predict(plan, rewritten=False, by=reference),
                                                            fraction, grid_floors(predictor.table.grid, structure), seed)
                                  for key, seed in (("uniformly", None), ("non-uniformly", 0))}
                for key, plan in narrowed_plans.items():
                    narrowed = ir.serde.deserialize_model(onnx.load_from_string(unpruned))
                    prune_graph(narrowed, structure, plan)
                    models[key] = ir.to_proto(narrowed).SerializeToString()
            times = fp32_backend.time(models, shape, self.latency_batch, rounds)
            ms = times["unpruned"]["median_ms"]
        full = plan_arch(structure, PrunePlan(), **geometry)
        if self.calibrate_rounds and ms is not None:  # the tables scaled to predict the anchors as measured now
            anchors = {"unpruned": ("the unpruned source model", full),
                       **{key: (f"the source narrowed {key} near the budget", plan_arch(structure, plan, **geometry))
                          for key, plan in narrowed_plans.items()}}
            cal = self.calibrate(reference, anchors, times)
            ctx.results["latency_calibration"] = cal
            ctx.latency_reference = reference = LatencyPredictor(reference.table, fitted(cal))
            curve = cal["scale"]  # a lower precision without checks: the source's drift, shared
            if lowered and config.budget_rounds and ctx.backend is not None:  # anchored on the source in its precision
                low_times = ctx.backend.time({k: self.in_precision(g, ctx.backend, shape) for k, g in models.items()},
                                             shape, self.latency_batch, max(self.calibrate_rounds, 1))
                low = self.calibrate(predictor, {k: (f"{name} in {self.precision}", arch)
                                                 for k, (name, arch) in anchors.items()}, low_times)
                cal["precision"] = {self.precision: low}
                curve = fitted(low)
                if "warning" in low:
                    warnings.warn(low["warning"], DeployCompWarning, stacklevel=2)
            elif lowered:
                cal["precision"] = {self.precision: {"scale": curve, "anchor": "the fp32 calibration (no on-device checks)"}}
            ctx.latency = predictor = LatencyPredictor(predictor.table, curve) if lowered else reference
            if "warning" in cal:
                warnings.warn(cal["warning"], DeployCompWarning, stacklevel=2)
        if judge_on_device:
            # an absolute budget is judged on the device: the unpruned graph is measured now and the
            # budget becomes the fraction of it that the on-device checks then close on
            if budget.value >= ms:
                raise DeployCompError(f"the budget {budget} is not below the unpruned model's measured {ms:.2f} ms "
                                      f"at batch {self.latency_batch} on {ctx.backend.name}: nothing to prune")
            config = replace(config, latency=f"{budget.value / ms:.6g}x")
            absolute = {"budget_ms": budget.value, "unpruned_measured_ms": ms, "as_fraction": budget.value / ms}
        outcome = prune(module, model, structure, predict, config, shape, ctx.train, ctx.test, ctx.say,
                        measure if config.budget_rounds and ctx.backend is not None else None,
                        grid_floors(predictor.table.grid, structure), teacher=ctx.teacher if self.rewrites else None,
                        baseline_ms=predict(PrunePlan(), rewritten=False, by=reference), objective=objective_of(ctx))
        copy_weights_to_graph(module, model)
        rewrite = prune_graph(model, structure, outcome.plan)
        if exporter is not None:  # the design cut to its plan: the model the token pass exports
            module = exporter.cut_design(module, structure, outcome.plan)
        ctx.structure = discover(model, family=structure.family)
        ctx.structure.family = structure.family
        ctx.module = module
        ctx.reference, ctx.reference_kind = torch_reference(module), "torch (pruned)"
        self.expected = {b.index: tuple(len(outcome.plan.kept(structure, f"block{b.index}.{k}"))
                                        for k in ("heads", "qk", "v", "mlp")) for b in structure.blocks}
        self.expected_emb = [len(outcome.plan.kept(structure, f"stage{s}.emb")) for s in range(len(structure.stage_embs))]
        arch = plan_arch(structure, outcome.plan, **geometry)
        precision_only = predict(PrunePlan(), rewritten=False)
        with_tokens = predict(PrunePlan())
        ctx.results["pruning"] = {
            "precision": self.precision,
            "tables": {"budget": str(reference.table.path), "predictions": str(predictor.table.path)},
            # predicted speed-up of each lever, applied in this order (their product is the total)
            "levers": {"precision": outcome.baseline_ms / precision_only, "tokens": precision_only / with_tokens,
                       "width": with_tokens / outcome.predicted_ms, "total": outcome.baseline_ms / outcome.predicted_ms,
                       "order": "precision, then tokens, then width; ratios of predicted latencies"},
            "arch": arch.to_dict(),
            "rewrites": [r.name for r in self.rewrites],
            "config": {**vars(self.config)},
            "absolute_budget": absolute,
            "original": structure.table(),
            "baseline_predicted_ms": outcome.baseline_ms, "target_ms": outcome.target_ms,
            "predicted_ms": outcome.predicted_ms, "steps": outcome.steps, "finetune": outcome.finetune,
            "seconds": outcome.seconds, "rewrite": rewrite, "budget_checks": outcome.measured,
            "kept": {g: outcome.plan.kept(structure, g).tolist() for g in structure.groups()},
        }
        return PassResult(model, modified=True, info={"predicted_ms": round(outcome.predicted_ms, 4),
                                                      "baseline_ms": round(outcome.baseline_ms, 4)})

    @staticmethod
    def calibrate(predictor: LatencyPredictor, anchors: dict, times: dict) -> dict:
        """The calibration record of ``anchors`` (timed model -> (name, architecture), the unpruned
        source first) as ``predictor``'s table predicts them raw and ``times`` measured them."""
        raw = LatencyPredictor(predictor.table)
        return calibration([(name, raw.predict(arch).total_ms, times[key]["median_ms"], arch.to_dict())
                            for key, (name, arch) in anchors.items()])

    @staticmethod
    def narrowed_anchor(structure, predict, fraction: float, floors: dict[str, int], seed: int | None) -> PrunePlan:
        """The source narrowed to about ``fraction`` of its predicted latency (kept in 0.25-0.8 so it
        stays apart from the source): a calibration anchor near the budget. Without a ``seed``
        uniformly (EMB, heads, MLP: the DeiT family's scaling); with one, non-uniformly as pruning
        narrows: every group (EMB, and each block's heads, QK, V and MLP) keeps the common ratio
        times its own seeded factor in [0.6, 1.4]. Which units go does not matter for timing."""
        full = copy_plan(structure, PrunePlan())
        groups = structure.groups()
        zeros = {g: np.zeros(structure.graph.nodes[g]["units"]) for g in groups}
        target = min(0.8, max(0.25, fraction)) * predict(full)
        if seed is None:
            return uniform_step(structure, full, zeros, predict, target, floors=floors, best_effort=True).plan
        factors = dict(zip(groups, np.random.default_rng(seed).uniform(0.6, 1.4, len(groups)).tolist()))
        return uniform_step(structure, full, zeros, predict, target, floors=floors, best_effort=True,
                            kinds=("emb", "heads", "qk", "v", "mlp"), factors=factors).plan

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
        for b in ctx.structure.blocks:  # the graph reads back as the plan's architecture: no stale dims
            assert (b.heads, b.qk_dim, b.v_dim, b.mlp_dim) == self.expected[b.index], f"block {b.index} dims"
        assert ctx.structure.stage_embs == self.expected_emb, "embedding dims"
