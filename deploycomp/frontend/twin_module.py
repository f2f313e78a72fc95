"""The torch module of a bare ONNX ViT's twin (frontend/onnx_twin.py reads the graph into a
:class:`~deploycomp.frontend.onnx_twin.TwinSpec`; this module builds the torch model it describes).
Kept apart so that reading a graph, and refusing one the twin cannot express, imports no torch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import DeployCompError
from .onnx_twin import AttentionSpec, NormSpec, TwinSpec, _transposed


def _activation_layer(name: str) -> type[nn.Module]:
    from timm.layers import get_act_layer

    return get_act_layer(name)



class TwinAttention(nn.Module):
    """Multi-head self-attention as the graph computes it: one fused qkv projection (its q, k, v
    chunks in the graph's order) or three, any heads and q/k and v widths per head, and the
    graph's softmax scale. ``num_heads``, ``scale``, ``proj`` and ``proj_drop`` are named as in
    timm's ``Attention``; :meth:`project` gives q, k, v for the semantic-token generator."""

    def __init__(self, emb: int, spec: AttentionSpec):
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = spec.heads, spec.qk_dim, spec.v_dim
        self.head_dim = spec.qk_dim
        self.scale = float(spec.scale)
        widths = {"q": spec.heads * spec.qk_dim, "k": spec.heads * spec.qk_dim, "v": spec.heads * spec.v_dim}
        self.chunk_order = spec.chunk_order
        if spec.qkv is not None:
            self.qkv = nn.Linear(emb, sum(widths.values()), bias=spec.qkv.bias is not None)
            sizes = {pos: widths[role] for role, pos in zip("qkv", spec.chunk_order)}
            starts = np.cumsum([0] + [sizes[p] for p in range(3)])
            self._rows = {role: (int(starts[pos]), int(starts[pos + 1])) for role, pos in zip("qkv", spec.chunk_order)}
        else:
            for role in "qkv":
                lin = getattr(spec, role)
                setattr(self, role, nn.Linear(emb, widths[role], bias=lin.bias is not None))
        self.proj = nn.Linear(widths["v"], emb, bias=spec.proj.bias is not None)
        self.proj_drop = nn.Identity()
        self.q_norm = self.k_norm = self.norm = nn.Identity()

    def project(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q from ``queries``, k and v from ``keys`` (both normed), each (B, tokens, heads·dim)."""
        if self.chunk_order is None:
            return self.q(queries), self.k(keys), self.v(keys)
        if queries is keys:
            out = self.qkv(queries)
            return tuple(out[..., lo:hi] for lo, hi in (self._rows[r] for r in "qkv"))
        w, b = self.qkv.weight, self.qkv.bias
        parts = []
        for role, x in zip("qkv", (queries, keys, keys)):
            lo, hi = self._rows[role]
            parts.append(F.linear(x, w[lo:hi], b[lo:hi] if b is not None else None))
        return tuple(parts)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("the twin of a graph's attention takes no mask")
        B, N, _ = x.shape
        q, k, v = self.project(x, x)
        q = q.reshape(B, N, self.num_heads, self.qk_dim).transpose(1, 2)
        k = k.reshape(B, N, self.num_heads, self.qk_dim).transpose(1, 2)
        v = v.reshape(B, N, self.num_heads, self.v_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, self.num_heads * self.v_dim)))


class OnnxTwinViT(VisionTransformer):
    """timm's ``VisionTransformer`` holding a graph's weights in the graph's shapes: the prefix
    tokens and position embedding are reshaped where they are used (a CLIP class embedding is
    ``(E,)``, a Hugging Face one ``(1, 1, E)``); blocks carry :class:`TwinAttention` and MLPs of
    their own widths."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, _, E = x.shape
        if self.pos_embed is not None and self.no_embed_class:
            x = x + self.pos_embed.reshape(1, -1, E)
        prefix = [t.reshape(1, -1, E).expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        if self.pos_embed is not None and not self.no_embed_class:
            x = x + self.pos_embed.reshape(1, -1, E)
        return self.pos_drop(x)


def _layernorm(emb: int, n: NormSpec | None) -> nn.Module:
    return nn.LayerNorm(emb, eps=n.eps, bias=n.bias is not None) if n is not None else nn.Identity()


def _layer_scale(emb: int, gamma: str | None) -> nn.Module:
    from timm.layers import LayerScale

    return LayerScale(emb) if gamma is not None else nn.Identity()


def build_twin(model: ir.Model, spec: TwinSpec) -> OnnxTwinViT:
    """The twin module with every parameter filled from the graph (``spec`` probed)."""
    from timm.layers import Mlp

    emb, graph = spec.emb, model.graph
    registers = sum(t for _, t in spec.prefix) - (1 if spec.class_token else 0)
    with torch.device("meta"):
        twin = OnnxTwinViT(
            img_size=spec.img_size, patch_size=spec.patch, in_chans=spec.in_chans,
            num_classes=spec.head.out_dim if spec.head is not None else 0, global_pool=spec.pool, embed_dim=emb,
            depth=len(spec.blocks), num_heads=1, mlp_ratio=1.0, class_token=spec.class_token, reg_tokens=registers,
            pos_embed="learn" if spec.pos is not None else "none", no_embed_class=spec.pos_on_patches,
            pool_include_prefix=spec.pool_include_prefix, weight_init="skip")
        twin.patch_embed.proj = nn.Conv2d(spec.in_chans, emb, spec.patch, spec.patch, bias=spec.conv_bias is not None)
        twin.norm_pre = _layernorm(emb, spec.norm_pre)
        for blk, b in zip(twin.blocks, spec.blocks):
            blk.norm1, blk.norm2 = _layernorm(emb, b.norm1), _layernorm(emb, b.norm2)
            blk.attn = TwinAttention(emb, b.attn)
            blk.ls1, blk.ls2 = _layer_scale(emb, b.ls1), _layer_scale(emb, b.ls2)
            blk.mlp = Mlp(emb, b.fc1.out_dim, act_layer=_activation_layer(b.act),
                          bias=(b.fc1.bias is not None, b.fc2.bias is not None))
        twin.norm, twin.fc_norm = _layernorm(emb, spec.norm), _layernorm(emb, spec.fc_norm)
        if spec.head is not None:
            linear = nn.Linear(emb, spec.head.out_dim, bias=spec.head.bias is not None)
            twin.head = nn.Sequential(linear, nn.Tanh()) if spec.head_act == "tanh" else linear
    transposed = _transposed(spec)
    for name, tensor in spec.names.items():
        array = graph.initializers[tensor].const_value.numpy()
        array = array.T if name in transposed else array
        owner, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(owner) if owner else twin, leaf,
                nn.Parameter(torch.tensor(np.ascontiguousarray(array), dtype=torch.float32)))
    empty = [n for n, p in [*twin.named_parameters(), *twin.named_buffers()] if p.is_meta]
    if empty:
        raise DeployCompError(f"internal: the twin's {empty[0]} was not filled from the graph")
    return twin.eval()
