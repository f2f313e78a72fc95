"""prune: NViT latency-regularized structural pruning to a latency budget (pruning/).

Runs the schedule on the torch module the graph came from (masks keep parameter names), writes the
trained weights into the graph, rewrites the graph to the final plan and re-discovers its
structure. The verification gate that follows compares the rewritten graph with the masked torch
model, so the artifact is checked against exactly what was trained.
"""

from __future__ import annotations

from typing import Callable

import onnx
import onnx_ir as ir
import torch

from ..frontend import torch_reference
from ..ir.discover import discover
from ..ir.structure import Structure
from ..latency.predictor import LatencyPredictor
from ..learn.data import ImageSet
from ..pruning.masks import copy_weights_to_graph
from ..pruning.plan import PrunePlan, plan_arch
from ..pruning.report import measure_pair
from ..pruning.rewrite import prune_graph
from ..pruning.schedule import PruneConfig, prune
from ..tokens.rewrite import rewrite_and_lower
from ..tokens.stvit import SemanticTokenConfig, token_arch
from .base import CompileContext, Pass, PassResult


def grid_floors(grid: dict) -> dict[str, int]:
    """The smallest size of each kind the latency table was profiled at."""
    att, mlp = grid["attention"], grid["mlp"]
    return {"emb": min(att["emb"]), "heads": min(att["heads"]), "qk": min(att["qk_dim"]), "v": min(att["v_dim"]),
            "mlp": min(mlp["mlp_dim"])}


class PrunePass(Pass):
    name = "prune"

    def __init__(self, config: PruneConfig, module: torch.nn.Module, predictor: LatencyPredictor,
                 geometry: dict[str, int], train: ImageSet | None = None, test: ImageSet | None = None,
                 say: Callable[[str], None] | None = None, latency_batch: int = 1, measure_rounds: int = 30,
                 tokens: "SemanticTokenConfig | None" = None, teacher: torch.nn.Module | None = None,
                 token_lowering: str = "reference"):
        """With ``tokens``, ``module`` is the SemanticTokenViT of ``teacher`` (the source): the budget
        covers both axes (predicted with the token architecture, measured on the rewritten graph
        against the source graph)."""
        self.config, self.module, self.predictor, self.geometry = config, module, predictor, geometry
        self.tokens, self.teacher, self.token_lowering = tokens, teacher, token_lowering
        self.train, self.test, self.say = train, test, say
        self.latency_batch, self.measure_rounds = latency_batch, measure_rounds

    def predict(self, structure: Structure, plan: PrunePlan, tokens: bool = True) -> float:
        arch = plan_arch(structure, plan, **self.geometry)
        if tokens and self.tokens is not None:
            arch = token_arch(arch, self.tokens)
        return self.predictor.predict(arch).total_ms

    def requires(self, model: ir.Model, ctx: CompileContext) -> None:
        assert ctx.structure is not None, "prune needs the discovered structure"
        for name in (sl.tensor for g in ctx.structure.groups() for sl in ctx.structure.slices(g)):
            assert name in model.graph.initializers, f"coupled tensor {name} missing"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        structure = ctx.structure
        unpruned = ir.serde.serialize_model(model).SerializeToString()
        ctx.results["unpruned_model"] = unpruned
        g = self.geometry
        shape = (1, g["in_chans"], g["img_size"], g["img_size"])

        def measure(plan: PrunePlan) -> float:
            """The plan's graph (current weights) timed against the unpruned graph on the target."""
            trial = ir.serde.deserialize_model(onnx.load_from_string(unpruned))
            copy_weights_to_graph(self.module, trial)
            prune_graph(trial, structure, plan)
            if self.tokens is not None:
                rewrite_and_lower(trial, self.tokens, self.token_lowering)
            times = measure_pair(unpruned, ir.serde.serialize_model(trial).SerializeToString(), shape,
                                 ctx.backend.session_config, self.latency_batch, self.measure_rounds)
            return times["pruned"]["median_ms"] / times["unpruned"]["median_ms"]

        outcome = prune(self.module, model, structure, lambda plan: self.predict(structure, plan), self.config,
                        shape, self.train, self.test, self.say,
                        measure if self.config.budget_rounds and ctx.backend is not None else None,
                        grid_floors(self.predictor.table.grid), teacher=self.teacher,
                        baseline_ms=self.predict(structure, PrunePlan(), tokens=False))
        copy_weights_to_graph(self.module, model)
        rewrite = prune_graph(model, structure, outcome.plan)
        ctx.structure = discover(model, family=structure.family)
        ctx.structure.family = structure.family
        ctx.reference, ctx.reference_kind = torch_reference(self.module), "torch (pruned)"
        self.expected = {b.index: tuple(len(outcome.plan.kept(structure, f"block{b.index}.{k}"))
                                        for k in ("heads", "qk", "v", "mlp")) for b in structure.blocks}
        self.expected_emb = [len(outcome.plan.kept(structure, f"stage{s}.emb")) for s in range(len(structure.stage_embs))]
        ctx.results["pruning"] = {
            "arch": plan_arch(structure, outcome.plan, **self.geometry).to_dict(),
            "semantic_tokens": None if self.tokens is None else vars(self.tokens),
            "config": {**vars(self.config)},
            "original": structure.table(),
            "baseline_predicted_ms": outcome.baseline_ms, "target_ms": outcome.target_ms,
            "predicted_ms": outcome.predicted_ms, "steps": outcome.steps, "finetune": outcome.finetune,
            "seconds": outcome.seconds, "rewrite": rewrite, "budget_checks": outcome.measured,
            "kept": {g: outcome.plan.kept(structure, g).tolist() for g in structure.groups()},
        }
        return PassResult(model, modified=True, info={"predicted_ms": round(outcome.predicted_ms, 4),
                                                      "baseline_ms": round(outcome.baseline_ms, 4)})

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
        for b in ctx.structure.blocks:  # the graph reads back as the plan's architecture: no stale dims
            assert (b.heads, b.qk_dim, b.v_dim, b.mlp_dim) == self.expected[b.index], f"block {b.index} dims"
        assert ctx.structure.stage_embs == self.expected_emb, "embedding dims"
