"""semantic_tokens: STViT's semantic-token generator as a graph rewrite (tokens/), and the lowering
of its ``TokenCluster`` op for the target.

The torch model of the rewritten architecture (``SemanticTokenViT``, same parameters as the
source) is fine-tuned first when data and epochs are given (distillation from the unrewritten
model: its class probabilities, or for a model that outputs an embedding its embedding under a
feature loss), its weights are written into the graph, the graph is rewritten, and the
verification gate then compares the artifact with that torch model.

A timm Swin (per-window semantic tokens, ``tokens/stvit_swin.py``) takes another route: the graph
is not rewritten in place but exported again from the torch model of the design
(``SemanticTokenSwin``, the source's own parameters) and cleaned like the source graph; the
verification gate compares it with that torch model all the same. Its attention on semantic tokens is
``TokenCluster`` nodes all the same (a torch custom op while exporting: ``tokens/export_op.py``),
lowered for the target by the next pass.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from ..frontend import torch_reference
from ..ir.structure import Structure
from ..tokens.op import LOWERINGS, lower, token_cluster_nodes
from ..tokens.rewrite import rewrite_semantic_tokens
from ..tokens.stvit import SemanticTokenConfig, SemanticTokenViT, token_arch
from ..tokens.stvit_swin import SemanticTokenSwin, SwinTokenConfig, swin_token_arch
from .base import CompileContext, PassResult, Rewrite, graph_opset, objective_of, register_pass


def swin_token_structure(structure: Structure, stvit: SemanticTokenSwin) -> None:
    """Record the per-window rewrite in a Swin's structure: per block, tokens per window, windows,
    and the keys of the generator blocks (the geometry ``SemanticTokenSwin`` runs)."""
    import math

    config, by_stage = stvit.config, {}
    for b in structure.blocks:
        by_stage.setdefault(b.stage, []).append(b)
    stages = sorted(by_stage)
    semantic = stages[config.stage]
    blocks = by_stage[semantic]
    for j, b in enumerate(blocks):
        if config.dense and j == len(blocks) - 1:  # the recovery: the window's tokens over its semantic tokens
            b.keys = config.tokens
            b.nodes = {**b.nodes, "role": "semantic-token recovery"}
        elif j >= config.layer:
            window = b.tokens
            b.tokens = config.tokens
            if j < config.layer + config.generator:
                b.keys = window if j == config.layer else window + config.tokens
                b.nodes = {**b.nodes, "role": "semantic-token generator"}
    if config.dense:  # the next stages run on their own grids
        return
    swin_stage = stvit.layers[config.stage]
    grid = [r // w * config.side for r, w in zip(swin_stage.blocks[0].input_resolution, swin_stage.blocks[0].window_size)]
    for i, stage in enumerate(stages[config.stage + 1:], config.stage + 1):
        grid = [math.ceil(g / 2) for g in grid]
        for b, blk in zip(by_stage[stage], stvit.layers[i].blocks):
            window = [min(w, g) for w, g in zip(blk.window_size, grid)]
            b.tokens = window[0] * window[1]
            b.sequences = math.ceil(grid[0] / window[0]) * math.ceil(grid[1] / window[1])


def token_structure(structure: Structure, config: SemanticTokenConfig) -> None:
    """Record the rewrite in the structure: generator blocks and the token count of later blocks."""
    n, m = structure.blocks[config.layer].tokens, config.tokens_after
    for b in structure.blocks:
        if b.index in (config.layer, config.layer + 1):
            b.nodes = {**b.nodes, "role": "semantic-token generator"}
            b.keys = n if b.index == config.layer else n + m
        if b.index >= config.layer:
            b.tokens = m


@register_pass
class SemanticTokensPass(Rewrite):
    name = "semantic_tokens"

    def __init__(self, config: SemanticTokenConfig, finetune_epochs: int = 0, finetune_lr: float = 5e-4,
                 teacher_logits: str | None = None, seed: int = 0):
        """``finetune_epochs``: distillation from the unrewritten model (the context's teacher) on the
        context's training data before the graph is rewritten."""
        self.config, self.finetune_epochs, self.finetune_lr = config, finetune_epochs, finetune_lr
        self.teacher_logits, self.seed = teacher_logits, seed

    # the views pruning keeps when it searches both axes under one budget
    def wrap_module(self, module: torch.nn.Module) -> SemanticTokenViT | SemanticTokenSwin:
        if isinstance(module, (SemanticTokenViT, SemanticTokenSwin)):
            return module
        if isinstance(self.config, SwinTokenConfig):
            return SemanticTokenSwin(module, self.config)
        return SemanticTokenViT(module, self.config)

    def rewrite_arch(self, arch):
        if isinstance(self.config, SwinTokenConfig):
            return swin_token_arch(arch, self.config)
        return token_arch(arch, self.config)

    @property
    def exports_design(self) -> bool:  # Swin: the graph is exported from the design's torch model
        return isinstance(self.config, SwinTokenConfig)

    def rewrite_graph(self, model: ir.Model) -> None:
        from ..ir.discover import discover

        rewrite_semantic_tokens(model, discover(model), self.config)

    def export_design(self, module: SemanticTokenSwin, input_shape: tuple[int, ...], opset: int,
                      ctx: CompileContext) -> ir.Model:
        """The design's torch model exported (its cross-attention as TokenCluster nodes) and cleaned."""
        from ..frontend.export import export_to_onnx
        from ..tokens.export_op import cluster_as_op, custom_translation_table
        from .cleanup import CleanupPass

        module.eval()
        with cluster_as_op(module):
            exported = export_to_onnx(module, input_shape, opset, custom_translation_table())
        return CleanupPass().run(exported, ctx).model

    def cut_design(self, module: SemanticTokenSwin, structure, plan) -> SemanticTokenSwin:
        """The design cut in torch (separate q/k/v, sliced position-bias tables): what pruning's
        trials time and what this pass then exports."""
        from ..pruning.torch_prune import swin_from_timm

        return swin_from_timm(module, structure, plan)

    def requires(self, model: ir.Model, ctx: CompileContext) -> None:
        assert ctx.structure is not None, "semantic tokens need the discovered structure"
        assert ctx.module is not None, "semantic tokens rewrite the torch model too: the source must be a torch model"
        assert not token_cluster_nodes(model), "the graph already has semantic tokens"
        if self.finetune_epochs:
            assert ctx.train is not None and ctx.teacher is not None, "fine-tuning needs training data and a teacher"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        from ..learn.distill import finetune_with_distillation
        from ..pruning.masks import copy_weights_to_graph

        if isinstance(self.config, SwinTokenConfig):
            return self._run_swin(model, ctx)
        trained = isinstance(ctx.module, SemanticTokenViT)  # pruning trained the token model and wrote its weights
        stvit = self.wrap_module(ctx.module)
        history = []
        if not trained:
            if self.finetune_epochs:
                history = finetune_with_distillation(stvit, ctx.train, ctx.test, ctx.teacher,
                                                     epochs=self.finetune_epochs, lr=self.finetune_lr, seed=self.seed,
                                                     teacher_logits=self.teacher_logits, log=ctx.say,
                                                     objective=objective_of(ctx)).history
            copy_weights_to_graph(stvit, model)
        stvit.eval()
        info = rewrite_semantic_tokens(model, ctx.structure, self.config)
        token_structure(ctx.structure, self.config)
        ctx.module = stvit
        ctx.reference, ctx.reference_kind = torch_reference(stvit), "torch (semantic tokens)"
        ctx.results["semantic_tokens"] = {**info, "finetune": history}
        return PassResult(model, modified=True, info=info)

    def _run_swin(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        """Swin: the design's torch model (fine-tuned when asked, unless pruning trained it and cut it to
        its plan), exported and cleaned in place of the graph."""
        from ..learn.distill import finetune_with_distillation

        trained = isinstance(ctx.module, SemanticTokenSwin)  # pruning trained the design and sliced it to its plan
        stvit = self.wrap_module(ctx.module)
        history = []
        if self.finetune_epochs and not trained:
            history = finetune_with_distillation(stvit, ctx.train, ctx.test, ctx.teacher, epochs=self.finetune_epochs,
                                                 lr=self.finetune_lr, seed=self.seed, teacher_logits=self.teacher_logits,
                                                 log=ctx.say, objective=objective_of(ctx)).history
        exported = self.export_design(stvit, ctx.input_shape, graph_opset(model), ctx)
        exported.graph.name = model.graph.name
        swin_token_structure(ctx.structure, stvit)
        ctx.module = stvit
        ctx.reference, ctx.reference_kind = torch_reference(stvit), "torch (semantic tokens per window)"
        cfg = stvit.config
        info = {"route": "re-exported from the torch model of the design", "stage": cfg.stage,
                "generator_blocks": [cfg.layer, cfg.layer + cfg.generator - 1], "semantic_tokens_per_window": cfg.tokens,
                "pooling": cfg.pooling, "recovery": cfg.dense}
        ctx.results["semantic_tokens"] = {**info, "finetune": history}
        return PassResult(exported, modified=True, info=info)

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
        if isinstance(self.config, SwinTokenConfig):  # generator + later blocks of the stage, per window
            assert token_cluster_nodes(model), "expected TokenCluster nodes (the generator)"
            return
        assert len(token_cluster_nodes(model)) == 2, "expected two TokenCluster nodes (the generator)"


@register_pass
class LowerTokenClusterPass(Rewrite):
    """Replace TokenCluster nodes with what the target runs: the standard-op decomposition, or
    ONNX Runtime's fused MultiHeadAttention (``ort-mha``)."""

    name = "lower_token_cluster"

    def __init__(self, how: str):
        assert how in LOWERINGS, how
        self.how = how

    def rewrite_graph(self, model: ir.Model) -> None:
        lower(model, self.how)

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        count = lower(model, self.how)
        return PassResult(model, modified=bool(count), info={"lowering": self.how, "nodes": count})

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
        assert not token_cluster_nodes(model), "TokenCluster nodes left"
