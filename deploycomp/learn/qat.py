"""Quantization-aware fine-tuning of an NNCF Q/DQ graph: its quantizers emulated in torch.

NNCF's post-training Q/DQ graph (``passes/quantize.nncf_qdq``, float weights kept behind their
QuantizeLinear) fixes every scale and zero point. :class:`QdqEmulation` puts exactly those
quantizers on a copy of the torch module the graph came from, so that the module computes what the
graph computes, and fine-tuning moves the float weights under them (straight-through estimator:
``torch.fake_quantize_per_*_affine``, whose gradient passes inside the clamp range):

- a quantized ``nn.Linear`` or ``nn.Conv2d`` (its weight initializer carries the torch parameter
  name): the input multiplied by SmoothQuant's factor when NNCF inserted one (its ``Mul`` before the
  activation quantizer), fake-quantized per tensor with the graph's scale and zero point; the weight
  fake-quantized per output channel. The trained parameter is the graph's weight itself (NNCF's,
  the inverse factor folded in), so the emulation quantizes exactly the numbers the graph does
  (dividing a re-multiplied weight flipped one rounding in 37 000 on a proxy DeiT);
- attention's ``q @ k^T`` (the exporter's SDPA scales q and k by sqrt(scale) before the quantizers):
  q and k fake-quantized through the attention's ``q_norm``/``k_norm`` slots (identities in timm's
  ``Attention``) with the scale divided by that factor, which is the same rounding.

Anything else the graph quantizes, or a layer whose parameter or attention module is not found, is
refused: an emulation that misses a quantizer would train against another function. The caller
checks the emulation against ONNX Runtime running the Q/DQ graph before fine-tuning
(``QuantizePass.qat_emulation_ratio``).

After fine-tuning, :func:`write_back` writes every trained parameter into the Q/DQ graph by name
(a folded transpose re-applied; a quantized weight is already the graph's smoothed one); the
scales stay NNCF's, and the graph pipeline continues from that graph (sensitivity, fallback, NNCF's
weight compression, the fidelity gate).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import numpy_helper
from torch import nn

from ..errors import DeployCompError


@dataclass
class Quantizer:
    """One QuantizeLinear/DequantizeLinear pair: scale, zero point, axis (None: per tensor), int range."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    qmin: int
    qmax: int

    def apply(self, x: torch.Tensor, divide: float = 1.0) -> torch.Tensor:
        shape = [1] * x.dim()
        if self.axis is not None:
            shape[self.axis] = -1
        scale = torch.from_numpy(self.scale.astype(np.float32)).reshape(shape) / divide
        zp = torch.from_numpy(self.zero_point.astype(np.float32)).reshape(shape)
        return fake_quantize(x, scale, zp, self.qmin, self.qmax)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear as ONNX defines them (``round(x / scale)``, half to even),
    with the straight-through estimator (gradient 1 where not clamped, 0 where clamped).

    Not ``torch.fake_quantize_per_*_affine``: those multiply by the reciprocal of the scale, which
    rounds an x / scale of k + 0.5 - 1 ulp up instead of down; on a tiny DeiT's patch-embedding
    weights 0.09 % of the integers differed from ONNX Runtime's by one."""
    q = torch.round(x / scale) + zero_point
    inside = (q >= qmin) & (q <= qmax)
    y = (q.clamp(qmin, qmax) - zero_point) * scale
    return y.detach() + (x - x.detach()) * inside


class QdqGraph:
    """The Q/DQ pairs of an NNCF graph, read from the proto: per MatMul/Gemm input, its quantizer
    and the tensor the QuantizeLinear reads (and what produced that)."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.producer = {out: n for n in proto.graph.node for out in n.output}
        self.inits = {t.name: t for t in proto.graph.initializer}
        consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
        self.consts = consts

    def array(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.consts.get(name)
        if node is not None:
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def quantizer_of(self, tensor: str) -> tuple[Quantizer, str] | None:
        """The quantizer a MatMul input goes through, and the float tensor it quantizes (None: no Q/DQ)."""
        dq = self.producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            raise DeployCompError(f"{dq.name}: its int8 input is not a QuantizeLinear (compressed weights cannot be "
                                  "fine-tuned)")
        scale, zp = self.array(q.input[1]), self.array(q.input[2])
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        info = np.iinfo(zp.dtype)
        return Quantizer(scale, zp, axis if scale.size > 1 else None, int(info.min), int(info.max)), q.input[0]


def check_emulable(module: nn.Module) -> None:
    """Refuse, before any quantization runs, a model whose attention the emulation cannot fake-quantize:
    every attention with a fused ``qkv`` must offer timm's ``q_norm``/``k_norm`` slots (Swin's
    ``WindowAttention`` does not)."""
    for name, sub in module.named_modules():
        if isinstance(getattr(sub, "qkv", None), nn.Linear) and not (hasattr(sub, "q_norm") and hasattr(sub, "k_norm")):
            raise DeployCompError(f"quantization-aware fine-tuning emulates timm ViT attention (q_norm/k_norm); "
                                  f"'{name}' ({type(sub).__name__}) has none: compile int8 without --finetune-epochs")


def _perm(fp32: ir.Model, name: str) -> tuple[int, ...] | None:
    from ..passes.cleanup import TRANSPOSED_FROM

    value = fp32.graph.initializers.get(name)
    perm = value.metadata_props.get(TRANSPOSED_FROM) if value is not None else None
    return tuple(int(p) for p in perm.split(",")) if perm else None


class QdqEmulation:
    """``module`` (changed in place: forwards of the quantized Linears replaced, q/k quantizers set
    in the attention's q_norm/k_norm slots; parameter names unchanged) emulating the Q/DQ graph.

    ``fp32``: the graph before quantization (its initializers' folded-transpose metadata);
    ``names``: MatMul/Gemm node -> torch parameter name or "block i attention q@k" (quantize.layer_names);
    ``attention``: block index -> the torch module path of that block's attention.
    """

    def __init__(self, module: nn.Module, quantized: onnx.ModelProto, fp32: ir.Model, names: dict[str, str],
                 attention: dict[int, str]):
        self.module, self.graph, self.fp32 = module, QdqGraph(quantized), fp32
        # quantized weight's parameter name -> the SmoothQuant factor folded into it (1: none); the parameter
        # holds the graph's (smoothed) weight
        self.smoothing: dict[str, np.ndarray] = {}
        params = dict(module.named_parameters())
        modules = dict(module.named_modules())
        covered = set()
        for node in quantized.graph.node:
            if node.op_type not in ("MatMul", "Gemm", "Conv"):
                continue
            pairs = {i: self.graph.quantizer_of(t) for i, t in enumerate(node.input[:2])}
            if not any(pairs.values()):
                continue
            name = names.get(node.name) or (pairs[1][1] if pairs.get(1) else node.name)  # a Conv: its weight
            if name.endswith("attention q@k"):
                block = int(name.split()[1])
                self._emulate_qk(node, pairs, modules.get(attention.get(block, "")), name)
            elif name in params:
                self._emulate_linear(node, pairs, name, modules.get(name.rpartition(".")[0]))
            else:
                raise DeployCompError(f"quantization-aware fine-tuning cannot emulate the quantized layer '{name}' "
                                      "(no torch parameter or attention module of that name)")
            covered |= {self.graph.producer[node.input[i]].name for i, p in pairs.items() if p}
        every = {n.name for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
        if every - covered:
            raise DeployCompError(f"quantization-aware fine-tuning cannot emulate {len(every - covered)} quantizers "
                                  f"outside MatMul/Gemm inputs (e.g. {sorted(every - covered)[0]})")

    def _emulate_linear(self, node, pairs, name: str, linear: nn.Module | None) -> None:
        if not isinstance(linear, (nn.Linear, nn.Conv2d)) or not name.endswith(".weight"):
            raise DeployCompError(f"quantization-aware fine-tuning emulates nn.Linear and nn.Conv2d layers; "
                                  f"'{name}' is not one")
        (act, act_src), (wq, w_src) = pairs[0], pairs[1]
        if act is None or wq is None or w_src != name:
            raise DeployCompError(f"{node.name}: expected an activation and a weight quantizer on '{name}'")
        # SmoothQuant: the activation quantizer reads x * m (a Mul by a constant); NNCF divided the weight
        # initializer by m along its input axis, and the parameter takes that initializer as it is.
        smooth = np.float32(1.0)
        mul = self.graph.producer.get(act_src)
        if isinstance(linear, nn.Linear) and mul is not None and mul.op_type == "Mul" \
                and self.graph.array(mul.input[1]) is not None:
            smooth = self.graph.array(mul.input[1]).astype(np.float32).reshape(-1)
        perm = _perm(self.fp32, name)
        weight = self.graph.array(name)  # graph layout, smoothed
        torch_layout = weight.transpose(np.argsort(perm)) if perm else weight
        if torch_layout.shape != tuple(linear.weight.shape):
            raise DeployCompError(f"'{name}' {torch_layout.shape} in the graph does not fit the module's "
                                  f"{tuple(linear.weight.shape)}")
        # the channel axis of the weight quantizer, on the torch weight [out, in] (graph axis a is torch
        # axis perm[a] when the cleanup folded a transpose into the initializer)
        graph_axis = wq.axis % weight.ndim
        axis = perm[graph_axis] if perm else graph_axis
        wq = Quantizer(wq.scale, wq.zero_point, axis, wq.qmin, wq.qmax)
        m = torch.as_tensor(smooth)
        with torch.no_grad():  # the module's weight becomes the graph's (smoothed, as NNCF left it)
            linear.weight.copy_(torch.from_numpy(np.array(torch_layout)))
        self.smoothing[name] = np.asarray(smooth)

        def forward(self_, x):
            xq = act.apply(x * m)
            w = wq.apply(self_.weight)
            if isinstance(self_, nn.Conv2d):
                return self_._conv_forward(xq, w, self_.bias)
            return nn.functional.linear(xq, w, self_.bias)

        linear.forward = types.MethodType(forward, linear)

    def _emulate_qk(self, node, pairs, attn: nn.Module | None, name: str) -> None:
        if attn is None or not all(hasattr(attn, s) for s in ("q_norm", "k_norm", "scale")):
            raise DeployCompError(f"quantization-aware fine-tuning cannot emulate {name}: no timm-style attention "
                                  "module (q_norm/k_norm slots) for that block")
        for slot, i in (("q_norm", 0), ("k_norm", 1)):
            quantizer, src = pairs[i]
            mul = self.graph.producer.get(src)
            c = None
            if mul is not None and mul.op_type == "Mul":
                c = next((self.graph.array(t) for t in mul.input if self.graph.array(t) is not None), None)
            c = float(np.asarray(c).reshape(-1)[0]) if c is not None and np.asarray(c).size == 1 else 1.0
            if not np.isclose(c * c, float(attn.scale), rtol=1e-5) and not np.isclose(c, 1.0):
                raise DeployCompError(f"{name}: the graph scales q/k by {c}, not sqrt of the attention's "
                                      f"scale {attn.scale}")
            setattr(attn, slot, FakeQuant(quantizer, c))


class FakeQuant(nn.Module):
    """``q`` as the graph sees it: the graph quantizes ``c * q`` with ``scale``; that is ``c`` times
    ``q`` quantized with ``scale / c`` (the same integers). No parameters."""

    def __init__(self, quantizer: Quantizer, c: float):
        super().__init__()
        self.quantizer, self.c = quantizer, c

    def forward(self, x):
        return self.quantizer.apply(x, divide=self.c)


def write_back(module: nn.Module, quantized: onnx.ModelProto, fp32: ir.Model) -> int:
    """Every parameter of ``module`` into the Q/DQ graph's initializer of the same name (folded transpose
    re-applied); returns the count."""
    inits = {t.name: t for t in quantized.graph.initializer}
    count = 0
    for name, param in module.named_parameters():
        if name not in inits:
            continue
        array = param.detach().cpu()
        perm = _perm(fp32, name)
        array = np.ascontiguousarray((array.permute(perm) if perm else array).numpy())
        old = numpy_helper.to_array(inits[name])
        if array.shape != old.shape:
            raise DeployCompError(f"parameter {name} {array.shape} does not fit initializer {old.shape}")
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(old.dtype), name))
        count += 1
    return count


def read_floats(module: nn.Module, quantized: onnx.ModelProto, fp32: ir.Model, skip: set[str]) -> None:
    """The graph's float parameters (biases NNCF's bias correction changed, norms) into the module, so the
    emulation starts from exactly the PTQ graph."""
    inits = {t.name: t for t in quantized.graph.initializer}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name in skip or name not in inits:
                continue
            array = numpy_helper.to_array(inits[name])
            perm = _perm(fp32, name)
            if perm:
                array = array.transpose(np.argsort(perm))
            if array.shape == tuple(param.shape):
                param.copy_(torch.from_numpy(np.array(array)))
