"""The pass contract and the pipeline that runs passes.

Modelled on torch.fx's pass manager: a pass states its preconditions (``requires``), does one
job (``run(model, ctx) -> PassResult``) and states its postconditions (``ensures``). The pipeline
runs passes in order, checks graph-wide invariants after each one, and when anything breaks it
names the pass that broke it. The graph is an ``onnx_ir.Model`` that passes edit in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import onnx_ir as ir

from ..errors import DeployCompError, PassFailedError


@dataclass
class PassResult:
    model: ir.Model
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompileContext:
    """State shared by the passes of one compile: what they need and what they found."""

    family: str | None = None
    # Reference outputs for verification: x (N,C,H,W float32) -> logits, from the model the
    # graph came from (torch module, or the input ONNX graph run unoptimized).
    reference: Callable[[Any], Any] | None = None
    reference_kind: str = "none"
    backend: Any = None
    structure: Any = None  # deploycomp.ir.structure.Structure, set by the discover pass
    verify_batches: tuple[int, ...] = (1, 3)
    tolerance: float = 1e-4
    seed: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)


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
