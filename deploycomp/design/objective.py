"""DeepMAD's expressiveness and effectiveness, carried over from CNNs to ViT blocks.

DeepMAD (Shen et al., CVPR 2023, arXiv:2303.02165) treats a network as an information-processing
system: the entropy of an L-layer MLP's features grows like the sum over layers of log(width), a
CNN layer's "width" is channels x resolution^2, and the design maximises that entropy subject to
budgets and an *effectiveness* bound rho = L / w_bar <= rho0 (depth over the geometric-mean width),
beyond which a deep, narrow network stops behaving like the Gaussian system the entropy assumes.

For a ViT block (docs/design.md gives the reasoning):

- the feature path is four linear layers: values (H x V), output projection (EMB), fc1 (MLP), fc2
  (EMB); each contributes log(tokens x width), tokens playing the CNN's resolution^2;
- the attention map adds log(tokens x H x QK) (its rank per head is bounded by QK): the QK path
  carries no features forward, so it counts in the entropy but not in the depth L;
- L = 4 layers per block and w_bar the geometric mean of the four feature widths over all blocks.

Every term is a sum over blocks of per-block, per-half constants, which is what makes the design
problem a linear integer programme (``solve.py``).
"""

from __future__ import annotations

import math

from ..latency.arch import ViTArch

LAYERS_PER_BLOCK = 4  # values, output projection, fc1, fc2
DEFAULT_RHO = 0.5  # our reading of DeepMAD's ImageNet setting (docs/design.md); not re-derived for ViTs


def attention_entropy(tokens: int, emb: int, heads: int, qk: int, v: int) -> float:
    """Entropy terms of an attention half on ``tokens`` (query) tokens."""
    return math.log(tokens * heads * qk) + math.log(tokens * heads * v) + math.log(tokens * emb)


def mlp_entropy(tokens: int, emb: int, mlp: int) -> float:
    return math.log(tokens * mlp) + math.log(tokens * emb)


def attention_log_widths(emb: int, heads: int, v: int) -> float:
    """Sum of log feature widths of an attention half (values, projection): the effectiveness bound's share."""
    return math.log(heads * v) + math.log(emb)


def mlp_log_widths(emb: int, mlp: int) -> float:
    return math.log(mlp) + math.log(emb)


def entropy(arch: ViTArch) -> float:
    """DeepMAD-style expressiveness of a ViT (natural log units, up to the constant the paper drops)."""
    return sum(attention_entropy(b.queries or b.tokens, arch.emb, b.heads, b.qk_dim, b.v_dim)
               + mlp_entropy(b.out_tokens, arch.emb, b.mlp_dim) for b in arch.blocks)


def effectiveness(arch: ViTArch) -> float:
    """rho = L / geometric-mean feature width (DeepMAD's effectiveness); smaller is a wider, shallower net."""
    layers = LAYERS_PER_BLOCK * len(arch.blocks)
    log_w = sum(attention_log_widths(arch.emb, b.heads, b.v_dim) + mlp_log_widths(arch.emb, b.mlp_dim)
                for b in arch.blocks)
    return layers / math.exp(log_w / layers)
