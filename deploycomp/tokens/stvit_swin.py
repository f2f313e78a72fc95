"""Semantic tokens per window on a timm SwinTransformer (STViT-R's Swin design, simplified to reuse
the Swin's own blocks): the torch model the compiled artifact must equal.

Read from STViT-R's released code (github.com/changsn/STViT-R, files ``models/swin_transformer.py``
(its ``Deit`` stage replacing Swin-T's third stage) and ``models/layers.py`` (``SemanticAttentionBlock``,
``Block``, ``Attention``), ``models/multi_scale.py`` (the adaptive max pooling)). There, in the third
stage, one block keeps full windowed attention, the next pools each w×w window to s×s semantic
tokens (adaptive max pooling) refined by attention from them to the window's tokens, the one after
refines them again with the tokens as keys, and the later blocks attend among the semantic tokens.

Here, in stage ``stage`` (default the third, as the paper does on Swin-T; any stage of a small Swin),
with blocks ``layer`` and ``layer + 1`` of that stage as the generator (their own weights, no new
parameters), per window of w×w tokens X (windows of the unshifted partition):

    P  = adaptive_max_pool(X → s×s)                            M = s² initial centres
    S¹ = P  + Attn(LN₁(P),  LN₁(X))            then S¹ += MLP(LN₂(S¹))       (block ``layer``)
    S² = S¹ + Attn(LN₁(S¹), LN₁([S¹; X]))      then S² += MLP(LN₂(S²))       (block ``layer + 1``)

A stage too short for two generator blocks (with ``dense``, a stage of two blocks: the generator
and the recovery) has a generator of one block (S¹ only). Attn is the block's window attention with queries and keys/values from different token sets (the
``TokenCluster`` op's meaning). Later blocks of the stage run self-attention among each window's M
semantic tokens. The stage's output is the semantic grid (rows of windows × s, columns × s, each
window's s×s tokens in place of its w×w), and the next stages run on that smaller grid.

Relative-position bias and shifted windows, decided as STViT-R does: its semantic-token attention
(``models/layers.py`` ``Attention`` with ``relative_pos=False``, the default of its configs, and
``Block(local=True)`` windows that are never shifted) has neither, so neither the generator blocks
nor the later blocks of the stage add the Swin block's bias table or shift their windows (an odd,
shifted block used as a generator or semantic block runs unshifted). Where this design departs from
STViT-R, for a rewrite that reuses the Swin's weights: the first generator block's keys are the
window's w² tokens (STViT-R: a 10×10 neighbourhood and the pooled tokens, hard-wired to Swin-T at
224, no residual but a layer scale), the second block attends per window (STViT-R: to all tokens),
and the later blocks are all per window (STViT-R alternates per-window and whole-grid attention).

Recovery (``dense``, STViT-R's last block of the stage: ``x = blk(x, semantic_token)`` in its
``Deit.forward``): the stage's last block then takes each window's w² tokens X (those that entered
the generator) as queries and the window's M semantic tokens S as keys/values,

    R = X + Attn(LN₁(X), LN₁(S))               then R += MLP(LN₂(R))       (the stage's last block)

so the stage outputs its full grid again and the next stages run unchanged. STViT-R's recovery
attends to all semantic tokens of the image; here to the window's (the same per-window choice as
above), without bias or shift.

Without recovery, later stages keep their blocks but see a smaller grid: a block whose window is larger than the grid
uses the grid as its window and no shift (Swin's own rule, timm's ``_calc_window_shift``), with the
bias of the same relative offsets read from its table (no interpolation), a grid that does not
divide into windows is padded as timm pads it. On an unchanged grid that is timm's block exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DeployCompError
from .config import POOLINGS
from .op import token_cluster_reference
from .stvit import cross_attention


@dataclass(frozen=True)
class SwinTokenConfig:
    """Semantic tokens per window of one Swin stage (``SemanticTokenConfig.for_model`` builds it for a
    Swin). ``tokens``: M per window, a square s² with s ≤ window; ``stage``: 0-based, None = the third
    (the last of a smaller Swin); ``layer``: first generator block in the stage, None = 1 (STViT-R keeps
    the stage's first block on all tokens) when the stage has 3 or more blocks, else 0."""

    tokens: int = 4
    stage: int | None = None
    layer: int | None = None
    pooling: str = "max"
    dense: bool = False  # STViT-R's recovery: the stage's last block restores full resolution
    generator: int | None = None  # generator blocks: 2 (STViT-R), 1 where the stage has no room for 2

    def __post_init__(self) -> None:
        side = math.isqrt(self.tokens)
        if self.tokens < 1 or side * side != self.tokens:
            raise DeployCompError(f"--semantic-tokens {self.tokens}: give a square number (4, 9, ...) of tokens per window")
        if self.pooling != "max":
            raise DeployCompError(f"Swin semantic tokens pool by adaptive max (STViT-R), not '{self.pooling}'")
        if self.stage is not None and self.stage < 0 or self.layer is not None and self.layer < 0:
            raise DeployCompError("the semantic token stage and layer must be >= 0")

    @property
    def side(self) -> int:
        return math.isqrt(self.tokens)

    def resolved(self, depths: tuple[int, ...]) -> "SwinTokenConfig":
        from dataclasses import replace

        stage = self.stage if self.stage is not None else min(2, len(depths) - 1)
        if stage >= len(depths):
            raise DeployCompError(f"--token-stage {stage}: the Swin has stages 0-{len(depths) - 1}")
        layer = self.layer if self.layer is not None else (1 if depths[stage] >= 3 else 0)
        generator = min(2, depths[stage] - layer - self.dense)
        return replace(self, stage=stage, layer=layer, generator=generator)


def swin_token_arch(arch, config: SwinTokenConfig):
    """The latency model's view (``latency.arch.SwinArch``) of ``arch`` with semantic tokens per
    window, block for block as ``SemanticTokenSwin`` runs them: the blocks before ``layer`` on the
    whole window; the generator's M queries over the window's w² keys, then over w² + M; the later
    blocks' M over M; with ``dense`` the last block's w² queries over the M. Without recovery the
    stage hands on its semantic grid and each later stage runs on half the previous grid, its window
    clamped to it and unshifted when one window covers it (``grid_block``)."""
    from dataclasses import replace

    from ..latency.arch import handed_on_geometry

    config = config.resolved(tuple(len(st.blocks) for st in arch.stages))
    stages = list(arch.stages)
    st = stages[config.stage]
    full, m = st.window * st.window, config.tokens
    blocks = list(st.blocks)
    for j in range(config.layer, len(blocks)):
        if config.dense and j == len(blocks) - 1:
            keys, queries = m, full
        else:
            keys = full if j == config.layer else full + m if j < config.layer + config.generator else m
            queries = m
        blocks[j] = replace(blocks[j], tokens=keys, queries=queries)
    side = 0 if config.dense else (st.resolution // st.window) * config.side
    stages[config.stage] = replace(st, blocks=tuple(blocks), out_resolution=side)
    geometry = [(later.resolution, later.window) for later in stages]
    for k, (res, window) in enumerate(handed_on_geometry(geometry, config.stage, side) if side else [],
                                      start=config.stage + 1):
        later = stages[k]
        shifts = tuple(later.shifted(i) and res > window for i in range(len(later.blocks)))
        stages[k] = replace(later, resolution=res, window=window, shifts=shifts,
                            blocks=tuple(replace(b, tokens=window * window) for b in later.blocks))
    return replace(arch, stages=tuple(stages))


def is_swin(module: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(module, SwinTransformer)


def check_supported_swin(swin: nn.Module, config: SwinTokenConfig) -> None:
    """Refuse, in one line, what the per-window design does not cover (works on the meta device)."""
    from timm.models.swin_transformer import SwinTransformer

    if not isinstance(swin, SwinTransformer):
        raise DeployCompError(f"per-window semantic tokens support timm's SwinTransformer, not {type(swin).__name__}")
    if config.stage is None or config.layer is None or config.generator is None:
        raise DeployCompError("internal: resolve the Swin token config for the model first")
    stage = swin.layers[config.stage]
    depth = len(stage.blocks)
    if config.generator < 1:
        raise DeployCompError(f"stage {config.stage} has {depth} blocks: none left from block {config.layer + 1} for the "
                              "generator" + (" and the recovery (--dense)" if config.dense else ""))
    blk = stage.blocks[0]
    grid, window = tuple(blk.input_resolution), tuple(blk.window_size)
    if grid[0] % window[0] or grid[1] % window[1]:
        raise DeployCompError(f"stage {config.stage}: its {grid[0]}x{grid[1]} grid does not divide into "
                              f"{window[0]}x{window[1]} windows")
    if config.side > min(window):
        raise DeployCompError(f"cannot pool a {window[0]}x{window[1]} window to {config.side}x{config.side} semantic tokens")
    if getattr(swin.head.global_pool, "pool_type", None) != "avg":
        raise DeployCompError("per-window semantic tokens need Swin's average-pooled head")


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """The [start, end) input range of each adaptive-pooling output (torch's rule)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def pool_windows(windows: torch.Tensor, side: int) -> torch.Tensor:
    """(N, w, w, C) windows → (N, side², C) by adaptive max pooling, as row and column maxima over
    torch's bins (exactly ``F.adaptive_max_pool2d``; exports to Slice/ReduceMax)."""
    rows = torch.cat([windows[:, a:b].amax(1, keepdim=True) for a, b in adaptive_bins(windows.shape[1], side)], 1)
    both = torch.cat([rows[:, :, a:b].amax(2, keepdim=True) for a, b in adaptive_bins(windows.shape[2], side)], 2)
    return both.flatten(1, 2)


def partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, wh, ww, C), windows row-major (timm's window_partition)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window[0], window[0], w // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0], window[1], c)


def reverse(windows: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B·rows·cols, sh, sw, C) → (B, rows·sh, cols·sw, C): each window's tokens back in its place."""
    _, sh, sw, c = windows.shape
    x = windows.reshape(-1, rows, cols, sh, sw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, rows * sh, cols * sw, c)


def _ffn(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.drop_path2(block.mlp(block.norm2(x)))


def generator_block(block: nn.Module, queries: torch.Tensor, keys: torch.Tensor, cluster=token_cluster_reference) -> torch.Tensor:
    """A Swin block with queries and keys/values from different token sets, per window; no bias, no shift."""
    return _ffn(block, queries + block.drop_path1(cross_attention(block, queries, keys, cluster)))


def bias_for(attn: nn.Module, window: tuple[int, int]) -> torch.Tensor:
    """(heads, A, A) relative-position bias of a ``window`` (≤ the table's window) read from the
    table at the same offsets; the table's own bias when ``window`` is its window."""
    big = attn.window_size
    ys, xs = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    index = (ys[:, None] - ys[None, :] + big[0] - 1) * (2 * big[1] - 1) + (xs[:, None] - xs[None, :] + big[1] - 1)
    area = window[0] * window[1]
    return attn.relative_position_bias_table[index.flatten().to(attn.relative_position_bias_table.device)].view(
        area, area, -1).permute(2, 0, 1)


def shift_mask(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(nW, A, A) 0/-100 mask of shifted windows over a padded grid (timm's ``get_attn_mask``)."""
    img = torch.zeros(1, *padded, 1)
    cnt = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            img[:, h[0]:h[1], w[0]:w[1], :] = cnt
            cnt += 1
    ids = partition(img, window).reshape(-1, window[0] * window[1])
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def grid_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm Swin block on a (B, H, W, C) grid it may not have been built for: the window shrinks to
    the grid (and then no shift), the bias is read from the table at the same offsets, a grid not
    divisible into windows is padded (as timm pads). Equals ``block(x)`` on the block's own grid."""
    b, h, w, c = x.shape
    ws, ss = tuple(block.window_size), tuple(block.shift_size)
    window = (min(ws[0], h), min(ws[1], w))
    shift = (0 if h <= ws[0] else ss[0], 0 if w <= ws[1] else ss[1])
    attn = block.attn
    y = block.norm1(x)
    if any(shift):
        y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    ph, pw = (window[0] - h % window[0]) % window[0], (window[1] - w % window[1]) % window[1]
    y = nn.functional.pad(y, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    win = partition(y, window).reshape(-1, window[0] * window[1], c)
    n = win.shape[1]
    if hasattr(attn, "project"):  # a pruned Swin's attention (QK may differ from V)
        q, k, v = (t.reshape(win.shape[0], n, attn.num_heads, -1).transpose(1, 2) for t in attn.project(win, win))
    else:
        q, k, v = attn.qkv(win).reshape(win.shape[0], n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q * attn.scale) @ k.transpose(-2, -1) + bias_for(attn, window).unsqueeze(0)
    if any(shift):
        mask = shift_mask((hp, wp), window, shift).to(scores)
        scores = (scores.view(-1, mask.shape[0], attn.num_heads, n, n) + mask[None, :, None]).view(-1, attn.num_heads, n, n)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(win.shape[0], n, -1)
    out = attn.proj_drop(attn.proj(out))
    y = reverse(out.view(-1, *window, c), hp // window[0], wp // window[1])[:, :h, :w]
    if any(shift):
        y = torch.roll(y, shifts=shift, dims=(1, 2))
    x = x + block.drop_path1(y)
    return _ffn(block, x.reshape(b, -1, c)).reshape(b, h, w, c)


class SemanticTokenSwin(nn.Module):
    """A timm SwinTransformer with per-window semantic tokens in one stage; same parameters and names."""

    def __init__(self, swin: nn.Module, config: SwinTokenConfig):
        super().__init__()
        config = config.resolved(tuple(len(s.blocks) for s in swin.layers))
        check_supported_swin(swin, config)
        for name, child in swin.named_children():
            self.add_module(name, child)
        self.config = config
        self.cluster = token_cluster_reference  # the TokenCluster op's meaning; the custom op while exporting

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        x = self.patch_embed(x)
        for i, stage in enumerate(self.layers):
            if i < cfg.stage:
                x = stage(x)
                continue
            x = stage.downsample(x)
            if i > cfg.stage:  # on the semantic grid
                for blk in stage.blocks:
                    x = grid_block(blk, x)
                continue
            blocks = stage.blocks
            for blk in blocks[:cfg.layer]:
                x = blk(x)
            window = tuple(blocks[0].window_size)
            rows, cols = x.shape[1] // window[0], x.shape[2] // window[1]
            windows = partition(x, window)  # (B·nW, wh, ww, C)
            tokens = windows.flatten(1, 2)
            s = generator_block(blocks[cfg.layer], pool_windows(windows, cfg.side), tokens, self.cluster)
            if cfg.generator == 2:
                s = generator_block(blocks[cfg.layer + 1], s, torch.cat([s, tokens], 1), self.cluster)
            semantic = blocks[cfg.layer + cfg.generator:len(blocks) - cfg.dense]
            for blk in semantic:
                s = generator_block(blk, s, s, self.cluster)
            if cfg.dense:  # STViT-R's recovery: each window's tokens attend to its semantic tokens
                x = reverse(generator_block(blocks[-1], tokens, s, self.cluster).reshape(windows.shape), rows, cols)
            else:
                x = reverse(s.reshape(-1, cfg.side, cfg.side, s.shape[-1]), rows, cols)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
