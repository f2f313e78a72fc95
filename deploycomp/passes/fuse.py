"""ort_fusion: ONNX Runtime's transformer fusions (LayerNorm, GELU, SkipLayerNorm, attention).

ONNX Runtime's ``optimize_model(model_type='vit')`` rewrites subgraphs into its contrib ops. On CPU
it fuses LayerNorm/GELU for timm exports but no attention, and ONNX Runtime's own session-level
optimizer (ORT_ENABLE_ALL) already does the same fusions at load time. The pass is therefore off by
default; ``benchmarks/bench_baselines.py`` measures it against the plain artifact so the default
follows the numbers.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging

import onnx_ir as ir

from .base import CompileContext, Pass, PassResult, register_pass


@register_pass
class OrtFusionPass(Pass):
    name = "ort_fusion"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        from onnxruntime.transformers.optimizer import optimize_model

        before = collections.Counter(n.op_type for n in model.graph)
        proto = ir.serde.serialize_model(model)
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            optimized = optimize_model(proto, model_type="vit", num_heads=0, hidden_size=0, opt_level=0)
        fused = ir.serde.deserialize_model(optimized.model)
        for domain in {n.domain for n in fused.graph} - {"", "ai.onnx"}:
            fused.opset_imports.setdefault(domain, 1)  # the optimizer uses contrib ops without importing them
        after = collections.Counter(n.op_type for n in fused.graph)
        new_ops = {op: n for op, n in after.items() if before.get(op, 0) < n}
        return PassResult(fused, modified=bool(new_ops), info={"fused_ops": new_ops})
