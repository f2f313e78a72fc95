"""semantic_tokens: STViT's semantic-token generator as a graph rewrite (tokens/), and the lowering
of its ``TokenCluster`` op for the target.

The torch model of the rewritten architecture (``SemanticTokenViT``, same parameters as the
source) is fine-tuned first when data and epochs are given (distillation from the unrewritten
model), its weights are written into the graph, the graph is rewritten, and the verification gate
then compares the artifact with that torch model.
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir
import torch

from ..frontend import torch_reference
from ..ir.structure import Structure
from ..tokens.op import LOWERINGS, lower, token_cluster_nodes
from ..tokens.rewrite import rewrite_semantic_tokens
from ..tokens.stvit import SemanticTokenConfig, SemanticTokenViT
from .base import CompileContext, Pass, PassResult


def token_structure(structure: Structure, config: SemanticTokenConfig) -> None:
    """Record the rewrite in the structure: generator blocks and the token count of later blocks."""
    n, m = structure.blocks[config.layer].tokens, 1 + config.tokens
    for b in structure.blocks:
        if b.index in (config.layer, config.layer + 1):
            b.nodes = {**b.nodes, "role": "semantic-token generator"}
            b.keys = n if b.index == config.layer else n + m
        if b.index >= config.layer:
            b.tokens = m


class SemanticTokensPass(Pass):
    name = "semantic_tokens"

    def __init__(self, config: SemanticTokenConfig, module: torch.nn.Module | None, train=None, test=None,
                 finetune_epochs: int = 0, finetune_lr: float = 5e-4, teacher_logits: str | None = None,
                 say: Callable[[str], None] | None = None, rewritten: SemanticTokenViT | None = None, seed: int = 0,
                 teacher: torch.nn.Module | None = None):
        """``module``: the source timm model (wrapped and fine-tuned here, distilled from ``teacher``,
        an untouched copy of it); or ``rewritten``: an already trained SemanticTokenViT (pruning
        trained it) whose weights are in the graph."""
        self.config, self.module, self.train, self.test = config, module, train, test
        self.finetune_epochs, self.finetune_lr, self.teacher_logits = finetune_epochs, finetune_lr, teacher_logits
        self.say, self.rewritten, self.seed, self.teacher = say or (lambda s: None), rewritten, seed, teacher

    def requires(self, model: ir.Model, ctx: CompileContext) -> None:
        assert ctx.structure is not None, "semantic tokens need the discovered structure"
        assert not token_cluster_nodes(model), "the graph already has semantic tokens"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        from ..learn.distill import finetune_with_distillation
        from ..pruning.masks import copy_weights_to_graph

        stvit = self.rewritten
        history = []
        if stvit is None:
            stvit = SemanticTokenViT(self.module, self.config)
            if self.finetune_epochs:
                if self.teacher is None:
                    raise AssertionError("fine-tuning after the rewrite needs the unrewritten model as teacher")
                history = finetune_with_distillation(stvit, self.train, self.test, self.teacher,
                                                     epochs=self.finetune_epochs,
                                                     lr=self.finetune_lr, seed=self.seed,
                                                     teacher_logits=self.teacher_logits, log=self.say).history
            copy_weights_to_graph(stvit, model)
        stvit.eval()
        info = rewrite_semantic_tokens(model, ctx.structure, self.config)
        token_structure(ctx.structure, self.config)
        ctx.reference, ctx.reference_kind = torch_reference(stvit), "torch (semantic tokens)"
        ctx.results["semantic_tokens"] = {**info, "finetune": history}
        return PassResult(model, modified=True, info=info)

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
        assert len(token_cluster_nodes(model)) == 2, "expected two TokenCluster nodes (the generator)"


class LowerTokenClusterPass(Pass):
    """Replace TokenCluster nodes with what the target runs: the standard-op decomposition, or
    ONNX Runtime's fused MultiHeadAttention (``ort-mha``)."""

    name = "lower_token_cluster"

    def __init__(self, how: str):
        assert how in LOWERINGS, how
        self.how = how

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        count = lower(model, self.how)
        return PassResult(model, modified=bool(count), info={"lowering": self.how, "nodes": count})

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
        assert not token_cluster_nodes(model), "TokenCluster nodes left"
