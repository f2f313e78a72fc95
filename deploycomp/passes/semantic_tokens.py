"""semantic_tokens: STViT's semantic-token generator as a graph rewrite (tokens/), and the lowering
of its ``TokenCluster`` op for the target.

The torch model of the rewritten architecture (``SemanticTokenViT``, same parameters as the
source) is fine-tuned first when data and epochs are given (distillation from the unrewritten
model: its class probabilities, or for a model that outputs an embedding its embedding under a
feature loss), its weights are written into the graph, the graph is rewritten, and the
verification gate then compares the artifact with that torch model.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from ..frontend import torch_reference
from ..ir.structure import Structure
from ..tokens.op import LOWERINGS, lower, token_cluster_nodes
from ..tokens.rewrite import rewrite_semantic_tokens
from ..tokens.stvit import SemanticTokenConfig, SemanticTokenViT, token_arch
from .base import CompileContext, PassResult, Rewrite, objective_of, register_pass


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
    def wrap_module(self, module: torch.nn.Module) -> SemanticTokenViT:
        return module if isinstance(module, SemanticTokenViT) else SemanticTokenViT(module, self.config)

    def rewrite_arch(self, arch):
        return token_arch(arch, self.config)

    def rewrite_graph(self, model: ir.Model) -> None:
        from ..ir.discover import discover

        rewrite_semantic_tokens(model, discover(model), self.config)

    def requires(self, model: ir.Model, ctx: CompileContext) -> None:
        assert ctx.structure is not None, "semantic tokens need the discovered structure"
        assert ctx.module is not None, "semantic tokens rewrite the torch model too: the source must be a torch model"
        assert not token_cluster_nodes(model), "the graph already has semantic tokens"
        if self.finetune_epochs:
            assert ctx.train is not None and ctx.teacher is not None, "fine-tuning needs training data and a teacher"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        from ..learn.distill import finetune_with_distillation
        from ..pruning.masks import copy_weights_to_graph

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

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
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
