"""The pass contract and the pipeline that runs passes.

Modelled on torch.fx's pass manager: a pass states its preconditions (``requires``), does one
job (``run(model, ctx) -> PassResult``) and states its postconditions (``ensures``). The pipeline
runs passes in order, checks graph-wide invariants after each one, and when anything breaks it
names the pass that broke it. The graph is an ``onnx_ir.Model`` that passes edit in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from ..errors import DeployCompError, PassFailedError

if TYPE_CHECKING:
    import torch

    from ..backends.base import Backend
    from ..ir.structure import Structure
    from ..latency.predictor import LatencyPredictor
    from ..learn.data import ImageSet


@dataclass
class PassResult:
    model: ir.Model
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompileContext:
    """What the passes of one compile need and what they found, typed.

    ``module`` is the torch model the graph currently computes, with the graph's initializer names
    as parameter names (a pass that trains or rewrites the model updates it); ``teacher`` is a
    frozen copy of the source for distillation; ``reference`` is what verification compares with.
    """

    family: str | None = None
    # x (N,C,H,W float32) -> logits: the torch module the graph came from, or the input ONNX graph
    # run unoptimized; a rewrite that changes the function (pruning, tokens) replaces it
    reference: Callable[[np.ndarray], np.ndarray] | None = None
    reference_kind: str = "none"
    backend: "Backend | None" = None
    structure: "Structure | None" = None  # set by the discover pass
    module: "torch.nn.Module | None" = None
    teacher: "torch.nn.Module | None" = None
    input_shape: tuple[int, ...] | None = None  # batch 1
    train: "ImageSet | None" = None  # labelled data for passes that train
    test: "ImageSet | None" = None
    latency: "LatencyPredictor | None" = None  # the target's latency table, calibrated to the device now
    # the fp32 table when the compile's precision is another (a budget is relative to the fp32 source)
    latency_reference: "LatencyPredictor | None" = None
    baseline_model: ir.Model | None = None  # the graph before latency-changing rewrites (timed against the result)
    # the graph just before a lossy graph precision (int8 Q/DQ, fp16/bf16), timed against the artifact:
    # whether the precision pays on this CPU (OpenVINO's int8 ran 0.8x its fp32 on one without VNNI)
    fp32_model: ir.Model | None = None
    verify_batches: tuple[int, ...] = (1, 3)
    tolerance: float = 1e-4
    # a lossy precision's gate instead of the tolerance: {"top1_agreement", "cosine", "samples"}
    fidelity: dict[str, float] | None = None
    seed: int = 0
    # what the model outputs, as its source says: "logits" (classes) or "embedding" (a CLIP tower,
    # a ViT without a classifier); an embedding model distils with ``feature_loss`` and has no top-1
    output: str = "logits"
    feature_loss: str = "cosine"
    say: Callable[[str], None] = field(default=lambda stage: None)
    log: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)  # per-pass sections of the manifest


def objective_of(ctx: CompileContext):
    """The distillation objective of the compile's model (learn.distill.Objective)."""
    from ..learn.objective import Objective

    return Objective(ctx.output, ctx.feature_loss)


class Pass:
    """One graph transformation or analysis. Subclasses set ``name`` and implement ``run``."""

    name: str = "pass"

    def requires(self, model: ir.Model, ctx: CompileContext) -> None:
        """Raise an ``AssertionError`` (or DeployCompError) if the pass cannot run on ``model``."""

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, model: ir.Model, ctx: CompileContext) -> None:
        """Raise an ``AssertionError`` if the pass did not leave what it promised."""


Invariant = Callable[[ir.Model, CompileContext], None]

_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: the pass is built by ``build_pass(cls.name, **config)``."""
    _PASSES[cls.name] = cls
    return cls


def build_pass(name: str, **config) -> Pass:
    """The pass ``name`` built from its config (its constructor's keyword arguments)."""
    import importlib

    from .registered import PASS_MODULES, import_all

    if name in PASS_MODULES:
        importlib.import_module(f"{__package__}.{PASS_MODULES[name]}")  # registers the pass
    else:
        import_all()
    if name not in _PASSES:
        raise DeployCompError(f"unknown pass '{name}': registered passes are {', '.join(sorted(_PASSES))}")
    return _PASSES[name](**config)


def graph_opset(model: ir.Model) -> int:
    """The default-domain opset ``model`` imports (an export of it again uses the same)."""
    return next((v for k, v in model.opset_imports.items() if k in ("", "ai.onnx")), 18)


class Rewrite(Pass):
    """A pass that another pass may apply before it measures latency (pruning with semantic tokens).

    Besides ``run`` on the compile's graph it says how it changes the three views pruning keeps:
    the graph alone (a trial copy, weights already in it), the latency model's architecture, and
    the torch model that is trained. A rewrite that cannot act on a graph (``exports_design``: Swin's
    semantic tokens) makes its graph from the torch model of the design instead (``export_design``),
    and says how that model is cut to a pruning plan (``cut_design``)."""

    exports_design = False

    def rewrite_graph(self, model: ir.Model) -> None:
        """The rewrite alone, on a graph whose weights are already final (no training, no context)."""
        raise NotImplementedError

    def export_design(self, module, input_shape: tuple[int, ...], opset: int, ctx: "CompileContext") -> ir.Model:
        """The graph of ``module`` (the design's torch model, as ``wrap_module`` made it) with this rewrite."""
        raise NotImplementedError

    def cut_design(self, module, structure, plan):
        """``module`` (the design's torch model) with the units that ``plan`` drops removed."""
        raise NotImplementedError

    def rewrite_arch(self, arch):
        return arch

    def wrap_module(self, module):
        return module


class Pipeline:
    """Runs passes in order; after each, every invariant must hold or the pass is named."""

    def __init__(self, passes: Sequence[Pass], invariants: Sequence[Invariant] = (), progress=None):
        self.passes = list(passes)
        self.invariants = list(invariants)
        self.progress = progress  # callable(pass_name) called before each pass

    def __call__(self, model: ir.Model, ctx: CompileContext) -> ir.Model:
        for p in self.passes:
            if self.progress is not None:
                self.progress(p.name)
            start = time.perf_counter()
            self._check(p, "precondition", p.requires, model, ctx)
            try:
                result = p.run(model, ctx)
            except DeployCompError:
                raise
            except AssertionError as exc:
                raise PassFailedError(p.name, str(exc) or "assertion failed") from exc
            except Exception as exc:  # a bug in the pass: name it, keep the cause chained
                raise PassFailedError(p.name, f"{type(exc).__name__}: {exc}") from exc
            model = result.model
            self._check(p, "postcondition", p.ensures, model, ctx)
            for invariant in self.invariants:
                self._check(p, f"invariant {invariant.__name__}", invariant, model, ctx)
            ctx.log.append(
                {
                    "pass": p.name,
                    "modified": result.modified,
                    "seconds": round(time.perf_counter() - start, 3),
                    "nodes": model.graph.num_nodes(),
                    **result.info,
                }
            )
        return model

    @staticmethod
    def _check(p: Pass, what: str, check, model, ctx) -> None:
        try:
            check(model, ctx)
        except DeployCompError:
            raise
        except Exception as exc:
            raise PassFailedError(p.name, f"{what} broken: {exc or type(exc).__name__}") from exc


# ---------------------------------------------------------------------------------------------
# Invariants every pass must keep.


def graph_is_valid_onnx(model: ir.Model, ctx: CompileContext) -> None:
    """The ONNX checker accepts the graph (types, opsets, topological order)."""
    import onnx

    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=False)


def batch_axis_is_symbolic(model: ir.Model, ctx: CompileContext) -> None:
    """The artifact must accept any batch size: inputs and outputs keep a symbolic axis 0."""
    for value in (*model.graph.inputs, *model.graph.outputs):
        shape = value.shape
        assert shape is not None and len(shape) > 0, f"'{value.name}' has no shape"
        assert not isinstance(shape[0], int), f"batch axis of '{value.name}' became fixed ({shape})"


def single_input_single_output(model: ir.Model, ctx: CompileContext) -> None:
    assert len(model.graph.inputs) == 1, f"expected one image input, found {len(model.graph.inputs)}"
    assert len(model.graph.outputs) == 1, f"expected one logits output, found {len(model.graph.outputs)}"


DEFAULT_INVARIANTS: tuple[Invariant, ...] = (
    single_input_single_output,
    batch_axis_is_symbolic,
    graph_is_valid_onnx,
)
