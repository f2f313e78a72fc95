"""torch -> ONNX export with the checks real exporters need.

The dynamo exporter has been seen to fix the batch axis silently (a broadcasting matmul) and to
leave a model at another opset than asked, so both are checked after every export. The exporter's
own optimizer is off: it deduplicates equal initializers across blocks (all-zero biases of a
freshly initialised model become one tensor), which would couple independent structures. The
cleanup pass does the folding instead.

A Conv whose torch module has no bias (CLIP's pre-norm patch embedding) is exported with a computed
all-zero bias (``Expand(0, [C])``); it is dropped, since the cleanup pass would fold it into an
initializer that belongs to no torch parameter, which pruning (gradients per coupled tensor)
cannot map back.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import onnx_ir as ir

from ..errors import DeployCompError

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


def export_to_onnx(module, input_shape: tuple[int, ...], opset: int = 18, custom_translation_table: dict | None = None) -> ir.Model:
    """Export ``module`` with a symbolic batch axis and return the ONNX model in onnx-ir
    (``custom_translation_table``: torch custom ops -> their ONNX functions, as torch.onnx takes it)."""
    import torch

    example = torch.randn(2, *input_shape[1:])
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=opset,
            optimize=False,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            custom_translation_table=custom_translation_table,
        )
    model = program.model
    check_exported(model, opset)
    drop_zero_conv_bias(model, module)
    return model


def drop_zero_conv_bias(model: ir.Model, module) -> int:
    """Remove the bias input of every Conv whose torch module has none (the exporter computes a
    zero one): an exact rewrite; returns how many."""
    modules = dict(module.named_modules())
    dropped = 0
    for node in model.graph:
        if node.op_type != "Conv" or len(node.inputs) < 3 or node.inputs[2] is None or node.inputs[1] is None:
            continue
        conv = modules.get(node.inputs[1].name.removesuffix(".weight"))
        if conv is not None and getattr(conv, "bias", "absent") is None:
            node.resize_inputs(2)
            dropped += 1
    return dropped


def check_exported(model: ir.Model, opset: int) -> None:
    got = model.opset_imports.get("", None)
    if got != opset:
        raise DeployCompError(f"exporter produced opset {got}, asked for {opset}")
    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.shape is None or len(value.shape) == 0 or isinstance(value.shape[0], int):
            raise DeployCompError(
                f"exporter fixed the batch axis of '{value.name}' to {value.shape}; "
                "the artifact must accept any batch size"
            )
