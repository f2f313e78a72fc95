"""Predict the latency of any ViT architecture from a latency table.

latency(arch) = stem(EMB) + sum over blocks of attention(tokens, EMB, H, QK, V) + mlp(tokens,
EMB, MLP) + head(tokens, EMB), each part interpolated multilinearly over its grid (NViT keys its
table by EMB, H, QK, V, MLP; ours adds the token count, which semantic tokens change mid-network).
STViT's generator blocks (cross-attention of M queries over N keys) read the table's cross-attention
part, profiled at the attention grid's widest heads over (M, N, EMB), times what the block's own
heads cost relative to those in self-attention over the same keys:

    cross(M, N, E, H, QK, V) = cross(M, N, E) * attention(N, E, H, QK, V) / attention(N, E, H*, QK*, V*)

(keys clamped to the attention grid). A table profiled before that part existed falls back to the
self-attention over the keys scaled by the FLOPs ratio (the proxy measured that 10 % optimistic).

A Swin (``SwinArch``) reads a Swin grid's parts, each stage's at that stage's windows and tokens:

    latency = swin_stem(EMB_0) + sum over stages s of [sum over its blocks of
              window_attention.s(windows_s, window tokens, EMB_s, H, QK, V, shifted) + mlp.s(tokens_s, EMB_s, MLP)]
              + sum over merges of patch_merging.s(tokens_s, EMB_s, EMB_s+1) + swin_head(tokens_last, EMB_last)

With semantic tokens per window (``SwinStage.out_resolution``, blocks with ``queries``), a stage's
generator, semantic and recovery blocks read ``window_cross_attention.s`` (windows, queries, keys,
EMB_s) at the stage's widest heads, scaled to the block's heads by ``window_attention.s`` as above;
their MLP runs on windows x queries tokens, and the later stages on the smaller grid the stage hands
on (their windows clamped to it), each part at its own tokens.

Each part's grid is read as monotone: no width, token count or head count costs less than a
smaller one (``as_monotone``: each axis in turn projected by scipy's isotonic regression; one sweep
leaves every axis monotone, since that projection keeps an order between rows). A part of 0.1-0.5
ms timed in context is the difference of two noisy times, and a solver that maximises width under
the table's prediction picks exactly the points the noise made cheap: on the proxy's openvino-cpu
b32 static table (its parts 0.1-0.6 ms) the projection cut the largest whole-model error from 14.3
to 9.9 % (21 models, ``benchmarks/bench_table_protocol.py``), while the full-size tables, monotone
as measured, predict their validation models as before (median and p90 within 0.3 pt).

The head part is profiled with the grid's class count (1000 for deit-base). A model whose head
has another width (a CLIP tower's 512-wide projection, an embedding without a head) gets the
table's head scaled by FLOPs (:func:`head_scale`) and the prediction says so in ``outside_grid``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy.interpolate import RegularGridInterpolator

from ..errors import DeployCompError
from .arch import SwinArch, ViTArch, swin_stage_geometry
from .calibrate import Calibration
from .table import LatencyTable, cross_reference, part_keys


@dataclass
class Prediction:
    total_ms: float
    stem_ms: float
    head_ms: float
    attention_ms: list[float]
    mlp_ms: list[float]
    outside_grid: list[str]
    merging_ms: list[float] = field(default_factory=list)  # Swin's patch merging, one per stage boundary

    def scaled(self, scale: float) -> "Prediction":
        return Prediction(self.total_ms * scale, self.stem_ms * scale, self.head_ms * scale,
                          [a * scale for a in self.attention_ms], [m * scale for m in self.mlp_ms], self.outside_grid,
                          [m * scale for m in self.merging_ms])


def as_monotone(values: np.ndarray) -> np.ndarray:
    """``values`` made non-decreasing along every axis: the least-squares monotone fit along each
    axis in turn (scipy's ``isotonic_regression``). The fit preserves order between rows (rows
    ``a <= b`` fit to ``fit(a) <= fit(b)``), so an axis made monotone stays so while the next is fitted."""
    from scipy.optimize import isotonic_regression

    out = np.asarray(values, dtype=float)
    for axis in range(out.ndim):
        if out.shape[axis] < 2:
            continue
        rows = np.moveaxis(out, axis, -1)
        fitted = np.stack([isotonic_regression(r).x for r in rows.reshape(-1, rows.shape[-1])])
        out = np.moveaxis(fitted.reshape(rows.shape), -1, axis)
    return out


class LatencyPredictor:
    def __init__(self, table: LatencyTable, calibration: Calibration | float = 1.0, monotone: bool = True):
        """``calibration``: measured / predicted for whole models timed now (``latency/calibrate.py``),
        one constant or a curve over predicted ms: the device's drift since profiling and what the
        runtime gains across parts; predictions are scaled by it. ``monotone``: read each part's grid
        as monotone (the module docstring); False reads the medians as profiled."""
        if not table.complete:
            raise DeployCompError(f"latency table {table.path} is incomplete: resume `deploycomp profile` first")
        self.table = table
        self.calibration = (calibration if isinstance(calibration, Calibration)
                            else Calibration((1.0,), (float(calibration),)))
        self._interp = {}
        self._cache: dict[tuple, float] = {}
        for part in table.parts:
            keys = part_keys(part)
            axes = [np.asarray(table.grid[part][k], dtype=float) for k in keys]
            values = np.empty([len(a) for a in axes])
            for point in table.points(part):
                idx = tuple(table.grid[part][k].index(v) for k, v in zip(keys, point))
                values[idx] = table.median(part, point)
            self._interp[part] = RegularGridInterpolator(axes, as_monotone(values) if monotone else values, method="linear",
                                                         bounds_error=False, fill_value=None)

    def part_ms(self, part: str, point) -> float:
        key = (part, tuple(int(v) for v in point))
        if key not in self._cache:  # pruning asks for the same parts thousands of times
            self._cache[key] = float(self._interp[part](np.asarray([point], dtype=float))[0])
        return self._cache[key]

    def _outside(self, part: str, point) -> list[str]:
        out = []
        for k, v in zip(part_keys(part), point):
            lo, hi = min(self.table.grid[part][k]), max(self.table.grid[part][k])
            if not lo <= v <= hi:
                out.append(f"{part}.{k}={v} outside [{lo}, {hi}]")
        return out

    def cross_attention_ms(self, b, e: int) -> tuple[float, list[str]]:
        """A generator block's attention half (``b.queries`` over ``b.tokens`` keys), unscaled."""
        self_pt = (b.tokens, e, b.heads, b.qk_dim, b.v_dim)
        if "cross_attention" not in self.table.parts:  # FLOPs-scaled self-attention over the keys
            return (self.part_ms("attention", self_pt) * b.attention_flops(e)
                    / replace(b, queries=0).attention_flops(e)), self._outside("attention", self_pt)
        keys = min(b.tokens, max(self.table.grid["attention"]["tokens"]))
        ref = cross_reference(self.table.grid)
        heads_ratio = self.part_ms("attention", (keys, e, b.heads, b.qk_dim, b.v_dim)) / self.part_ms("attention", (keys, e, *ref))
        cross_pt = (b.queries, b.tokens, e)
        return (self.part_ms("cross_attention", cross_pt) * heads_ratio,
                self._outside("cross_attention", cross_pt) + self._outside("attention", (keys, e, b.heads, b.qk_dim, b.v_dim)))

    def _check_geometry(self, arch: ViTArch | SwinArch) -> None:
        fixed = self.table.fixed
        if (arch.img_size, arch.patch, arch.in_chans) != (fixed["img_size"], fixed["patch"], fixed["in_chans"]):
            raise DeployCompError(f"latency table profiles {fixed['img_size']}px/{fixed['patch']} inputs with "
                                  f"{fixed['in_chans']} channels; the architecture has {arch.img_size}px/{arch.patch}, "
                                  f"{arch.in_chans} channels")

    def _head_ms(self, part: str, tokens: int, emb: int, classes: int, outside: list[str]) -> float:
        """The head part at (tokens, EMB); a head of another class count than the grid's is the
        table's scaled by FLOPs (:func:`head_scale`), and ``outside`` says so."""
        point, table_classes = (tokens, emb), self.table.fixed["num_classes"]
        outside.extend(self._outside(part, point))
        ms = self.part_ms(part, point)
        if classes != table_classes:
            ratio = head_scale(tokens, emb, classes, table_classes)
            ms *= ratio
            outside.append(f"head.num_classes={classes}: the table's {table_classes}-class head "
                           f"scaled by FLOPs ({ratio:.3f}x)")
        return ms

    def predict(self, arch: ViTArch | SwinArch, scale: float | None = None) -> Prediction:
        """Predicted latency; ``scale`` (a measured now/at-profile-time ratio; default: the
        predictor's calibration at the raw prediction) corrects for device drift."""
        self._check_geometry(arch)
        raw = self.predict_swin(arch) if isinstance(arch, SwinArch) else self.predict_vit(arch)
        return raw.scaled(self.calibration.scale_at(raw.total_ms) if scale is None else scale)

    def predict_vit(self, arch: ViTArch) -> Prediction:
        """A plain ViT's latency as the table says (unscaled; see the module docstring)."""
        e = arch.emb
        outside = self._outside("stem", (e,))
        attn, mlp = [], []
        for b in arch.blocks:
            a_pt, m_pt = (b.tokens, e, b.heads, b.qk_dim, b.v_dim), (b.out_tokens, e, b.mlp_dim)
            if b.queries:
                a_ms, out = self.cross_attention_ms(b, e)
            else:
                a_ms, out = self.part_ms("attention", a_pt), self._outside("attention", a_pt)
            outside += out + self._outside("mlp", m_pt)
            attn.append(a_ms)
            mlp.append(self.part_ms("mlp", m_pt))
        last = arch.blocks[-1].out_tokens if arch.blocks else arch.patches + 1
        stem = self.part_ms("stem", (e,))
        head = self._head_ms("head", last, e, arch.num_classes, outside)
        return Prediction(stem + head + sum(attn) + sum(mlp), stem, head, attn, mlp, sorted(set(outside)))

    def predict_swin(self, arch: SwinArch) -> Prediction:
        """A Swin's latency from the table's per-stage Swin parts (unscaled; see the module docstring)."""
        check_swin_table(self.table)
        fixed = self.table.fixed
        geometry = [(st.resolution, st.window) for st in arch.stages]
        profiled = swin_stage_geometry(fixed)
        reduced = next((s + 1 for s, st in enumerate(arch.stages) if st.out_resolution), len(geometry))
        if len(geometry) != len(profiled) or geometry[:reduced] != profiled[:reduced]:
            raise DeployCompError(f"latency table {self.table.path} profiles Swin stages (grid, window) "
                                  f"{profiled}; the architecture has {geometry}")
        outside: list[str] = []

        def ms(part: str, point: tuple[int, ...]) -> float:
            outside.extend(self._outside(part, point))
            return self.part_ms(part, point)

        attn, mlp, merging = [], [], []
        for s, st in enumerate(arch.stages):
            for i, b in enumerate(st.blocks):
                if b.queries:
                    attn.append(self._window_cross_ms(s, st, b, outside))
                else:
                    attn.append(ms(f"window_attention.{s}", (st.windows, b.tokens, st.emb, b.heads, b.qk_dim, b.v_dim,
                                                             int(st.shifted(i)))))
                mlp.append(ms(f"mlp.{s}", (st.mlp_tokens(b), st.emb, b.mlp_dim)))
            if s + 1 < len(arch.stages):
                merging.append(ms(f"patch_merging.{s}", (st.out_tokens, st.emb, arch.stages[s + 1].emb)))
        last = arch.stages[-1]
        stem = ms("swin_stem", (arch.emb,))
        head = self._head_ms("swin_head", last.out_tokens, last.emb, arch.num_classes, outside)
        return Prediction(stem + head + sum(attn) + sum(mlp) + sum(merging), stem, head, attn, mlp,
                          sorted(set(outside)), merging)

    def _window_cross_ms(self, s: int, st, b, outside: list[str]) -> float:
        """A block of a Swin stage with semantic tokens: per window, ``b.queries`` over ``b.tokens``
        keys, read at the stage's widest heads and scaled to the block's heads by the stage's
        window attention over a whole window (unshifted), as ``cross_attention_ms`` does for a DeiT."""
        part = f"window_cross_attention.{s}"
        if part not in self.table.parts:
            raise DeployCompError(f"latency table {self.table.path} has no {part} part (Swin semantic tokens in "
                                  f"stage {s}): profile a grid with it, e.g. `deploycomp profile --grid swin-t`")
        full, ref = st.window * st.window, cross_reference(self.table.grid, f"window_attention.{s}")
        own = (st.windows, full, st.emb, b.heads, b.qk_dim, b.v_dim, 0)
        heads_ratio = (self.part_ms(f"window_attention.{s}", own)
                       / self.part_ms(f"window_attention.{s}", (st.windows, full, st.emb, *ref, 0)))
        point = (st.windows, b.queries, b.tokens, st.emb)
        outside.extend(self._outside(part, point) + self._outside(f"window_attention.{s}", own))
        return self.part_ms(part, point) * heads_ratio


def has_swin_parts(table: LatencyTable) -> bool:
    return "swin_stem" in table.grid and "window" in table.fixed


def check_swin_table(table: LatencyTable) -> None:
    """A Swin needs a table profiled on a Swin grid; refused in one line otherwise."""
    if not has_swin_parts(table):
        raise DeployCompError(f"latency table {table.path} (grid {table.protocol.get('grid_name')}) has no Swin parts "
                              "(windowed attention, patch merging): profile a Swin grid, e.g. `deploycomp profile "
                              "--grid swin-t`")


def head_scale(tokens: int, emb: int, classes: int, table_classes: int) -> float:
    """What a head of ``classes`` outputs costs relative to the table's ``table_classes``, by FLOPs:
    the classifier's 2·EMB·classes plus the final LayerNorm over every token (~8 flops an element:
    mean, variance, normalize, scale and shift), which does not depend on the class count. Only the
    head's width differs from the profiled micro-graph (same ops, same tokens and EMB), so the
    ratio of its work is what is left to scale (the head is a small part of a ViT's latency)."""
    norm = 8.0 * tokens * emb
    return (norm + 2.0 * emb * classes) / (norm + 2.0 * emb * table_classes)
