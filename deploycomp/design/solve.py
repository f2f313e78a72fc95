"""DeepMAD's mathematical programme for a ViT, solved as a mixed-integer linear programme.

For a fixed embedding width EMB and depth d, every quantity the design is judged by is a sum of
per-block terms that depend only on that block's choice of attention (heads, QK, V) and MLP width:
the entropy (``objective.py``), the effectiveness bound's log-widths, the latency table's
prediction (the predictor sums per-part latencies), parameters and FLOPs. Blocks that run on the
same tokens are interchangeable, so the programme counts how many blocks of each token group take
each option (integer variables) instead of giving every block its own binaries: a handful of
hundred integers, solved by HiGHS through ``scipy.optimize.milp``. EMB and d are the outer loop
(tens of MILPs); the best entropy over them wins.

Options that another option beats on every criterion (faster, more entropy, more width, fewer
parameters and FLOPs) can never be in an optimum and are dropped before solving.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import DeployCompError
from ..latency.arch import BlockArch, ViTArch
from ..latency.predictor import LatencyPredictor
from . import objective
from .model import attention_params, fixed_params, mlp_params


@dataclass(frozen=True)
class Budget:
    latency_ms: float
    params: int | None = None
    flops: float | None = None  # per image, ViTArch.flops() units (2 x MACs)

    def describe(self) -> str:
        parts = [f"latency <= {self.latency_ms:.4g} ms"]
        if self.params is not None:
            parts.append(f"params <= {self.params / 1e6:.4g} M")
        if self.flops is not None:
            parts.append(f"FLOPs <= {self.flops / 1e9:.4g} G")
        return ", ".join(parts)


@dataclass(frozen=True)
class SearchSpace:
    """The values each structural parameter may take: inside the latency table's grid (no extrapolation)."""

    emb: tuple[int, ...]
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    qk: tuple[int, ...]
    v: tuple[int, ...]
    mlp: tuple[int, ...]

    @classmethod
    def from_grid(cls, grid: dict, depths: tuple[int, ...], emb: tuple[int, ...] | None = None) -> "SearchSpace":
        """Steps of the table's own resolution: EMB 8 or 64, QK/V 4 or 8, MLP 16 or 64 (small or DeiT-size grids)."""
        att, mlp = grid["attention"], grid["mlp"]

        def values(axis, step):
            return tuple(range(min(axis), max(axis) + 1, step))

        big = max(mlp["emb"]) >= 256
        emb_axis = sorted(set(att["emb"]) & set(mlp["emb"]) & set(grid["stem"]["emb"]))
        embs = emb or values(emb_axis, 64 if big else 8)
        dim_step = 8 if max(att["qk_dim"]) >= 32 else 4
        return cls(tuple(embs), tuple(depths), values(att["heads"], 1), values(att["qk_dim"], dim_step),
                   values(att["v_dim"], dim_step), values(mlp["mlp_dim"], 64 if max(mlp["mlp_dim"]) >= 1024 else 16))

    def size(self) -> int:
        per_block = len(self.heads) * len(self.qk) * len(self.v) * len(self.mlp)
        return sum(len(self.emb) * per_block**d for d in self.depths)


@dataclass
class DesignResult:
    arch: ViTArch  # the latency model's view (with semantic tokens when requested)
    model_arch: ViTArch  # the trainable model: every block on all tokens
    predicted_ms: float
    entropy: float
    effectiveness: float
    params: int
    flops: float
    milps: int  # integer programmes solved (the others were cut by their LP bound)
    lp_bounds: int
    solve_seconds: float
    candidates: list[dict[str, Any]] = field(default_factory=list)  # best per (EMB, depth)


@dataclass
class _Options:
    """One token group's choices for one half (attention or MLP), as parallel arrays."""

    dims: list[tuple[int, ...]]
    latency: np.ndarray
    entropy: np.ndarray
    log_width: np.ndarray
    params: np.ndarray
    flops: np.ndarray

    def pareto(self) -> "_Options":
        """Drop options beaten on every criterion by another one (never optimal)."""
        # larger is better for every column after the sign flip
        score = np.stack([-self.latency, self.entropy, self.log_width, -self.params, -self.flops], axis=1)
        keep = []
        for i in range(len(score)):
            better_eq = np.all(score >= score[i], axis=1)
            strictly = np.any(score > score[i], axis=1)
            if not np.any(better_eq & strictly):
                keep.append(i)
        # identical options: keep the first only
        _, first = np.unique(score[keep], axis=0, return_index=True)
        idx = [keep[j] for j in sorted(first)]
        return _Options([self.dims[i] for i in idx], self.latency[idx], self.entropy[idx], self.log_width[idx],
                        self.params[idx], self.flops[idx])


def block_layout(arch: ViTArch) -> list[tuple[int, BlockArch]]:
    """Consecutive blocks with the same token counts, as (count, template block)."""
    groups: list[tuple[int, BlockArch]] = []
    for b in arch.blocks:
        if groups and (groups[-1][1].tokens, groups[-1][1].queries) == (b.tokens, b.queries):
            groups[-1] = (groups[-1][0] + 1, groups[-1][1])
        else:
            groups.append((1, b))
    return groups


class Designer:
    """Builds and solves the programme for one latency table and search space."""

    def __init__(self, predictor: LatencyPredictor, space: SearchSpace, rho: float = objective.DEFAULT_RHO,
                 semantic_tokens: int | None = None):
        if rho <= 0:
            raise DeployCompError(f"--rho {rho}: the effectiveness bound must be > 0")
        self.predictor, self.space, self.rho = predictor, space, rho
        self.semantic_tokens = semantic_tokens
        fixed = predictor.table.fixed
        self.geometry = dict(img_size=fixed["img_size"], patch=fixed["patch"], in_chans=fixed["in_chans"],
                             num_classes=fixed["num_classes"])
        self._options: dict[tuple, tuple[_Options, _Options]] = {}

    # -- the pieces ---------------------------------------------------------------------------
    def template(self, emb: int, depth: int) -> ViTArch:
        """A depth-``depth`` architecture with placeholder dims and the token layout of the design."""
        probe = ViTArch(emb, (), **self.geometry)
        b = BlockArch(self.space.heads[0], self.space.qk[0], self.space.v[0], self.space.mlp[0], probe.patches + 1)
        arch = ViTArch(emb, (b,) * depth, **self.geometry)
        if self.semantic_tokens:
            from ..tokens.stvit import SemanticTokenConfig, token_arch

            config = SemanticTokenConfig(tokens=self.semantic_tokens).resolved(depth)
            if config.layer + 2 > depth:
                return None
            arch = token_arch(arch, config)
        return arch

    def options(self, emb: int, block: BlockArch) -> tuple[_Options, _Options]:
        key = (emb, block.tokens, block.queries)
        if key not in self._options:
            self._options[key] = (self._attention_options(emb, block).pareto(), self._mlp_options(emb, block).pareto())
        return self._options[key]

    def _one_block(self, emb: int, block: BlockArch):
        return self.predictor.predict(ViTArch(emb, (block,), **self.geometry))

    def _part_ms(self, part: str, points: list[tuple[int, ...]]) -> np.ndarray:
        """Latencies of many self-attention or MLP points at once: the predictor's own interpolator
        (the values ``part_ms`` returns one by one, ~100x faster in one call; ``design`` checks the
        final architecture's ``predict`` against the programme's sum)."""
        return np.asarray(self.predictor._interp[part](np.asarray(points, dtype=float)), dtype=float)

    def _attention_options(self, emb: int, block: BlockArch) -> _Options:
        dims = [(h, qk, v) for h in self.space.heads for qk in self.space.qk for v in self.space.v]
        blocks = [replace(block, heads=h, qk_dim=qk, v_dim=v) for h, qk, v in dims]
        q = block.queries or block.tokens
        lat = self._part_ms("attention", [(block.tokens, emb, h, qk, v) for h, qk, v in dims])
        if block.queries:
            # STViT's generator: today's predictor scales the self-attention over the keys by the FLOPs
            # ratio; if two probes disagree with that (a profiled cross-attention), ask it block by block
            lat = lat * np.asarray([b.attention_flops(emb) / replace(b, queries=0).attention_flops(emb) for b in blocks])
            probes = (0, len(blocks) - 1)
            if not all(math.isclose(lat[i], self._one_block(emb, blocks[i]).attention_ms[0], rel_tol=1e-9) for i in probes):
                lat = np.asarray([self._one_block(emb, b).attention_ms[0] for b in blocks])
        ent = [objective.attention_entropy(q, emb, h, qk, v) for h, qk, v in dims]
        logw = [objective.attention_log_widths(emb, h, v) for h, qk, v in dims]
        par = [attention_params(emb, h, qk, v) for h, qk, v in dims]
        fl = [b.attention_flops(emb) for b in blocks]
        return _Options(dims, *(np.asarray(a, dtype=float) for a in (lat, ent, logw, par, fl)))

    def _mlp_options(self, emb: int, block: BlockArch) -> _Options:
        t = block.out_tokens
        dims = [(m,) for m in self.space.mlp]
        lat = self._part_ms("mlp", [(t, emb, m) for m in self.space.mlp])
        ent = [objective.mlp_entropy(t, emb, m) for m in self.space.mlp]
        logw = [objective.mlp_log_widths(emb, m) for m in self.space.mlp]
        par = [mlp_params(emb, m) for m in self.space.mlp]
        fl = [4.0 * t * emb * m for m in self.space.mlp]
        return _Options(dims, *(np.asarray(a, dtype=float) for a in (lat, ent, logw, par, fl)))

    def fixed_costs(self, arch: ViTArch) -> tuple[float, int, float]:
        """Latency, parameters and FLOPs outside the blocks (stem, final norm, head)."""
        pred = self.predictor.predict(arch)
        e = arch.emb
        flops = 2.0 * arch.patches * e * arch.in_chans * arch.patch**2 + 2.0 * e * arch.num_classes
        return pred.stem_ms + pred.head_ms, fixed_params(arch), flops

    # -- one programme -------------------------------------------------------------------------
    def _programme(self, emb: int, depth: int, budget: Budget | None):
        """Columns and constraints of the MILP at this EMB and depth (``budget`` None: only the
        one-option-per-half and effectiveness rows)."""
        arch = self.template(emb, depth)
        if arch is None:
            return None
        groups = block_layout(arch)
        fixed_ms, fixed_par, fixed_fl = self.fixed_costs(arch)
        cols: list[tuple[int, str, _Options]] = []
        for g, (count, block) in enumerate(groups):
            att, mlp = self.options(emb, block)
            cols += [(g, "attention", att), (g, "mlp", mlp)]
        sizes = [len(o.dims) for _, _, o in cols]
        n = sum(sizes)

        def stack(attr):
            return np.concatenate([getattr(o, attr) for _, _, o in cols])

        rows, lo, hi = [], [], []
        start = 0
        for (g, _, _), size in zip(cols, sizes):  # every block takes exactly one option per half
            row = np.zeros(n)
            row[start:start + size] = 1.0
            rows.append(row)
            lo.append(groups[g][0])
            hi.append(groups[g][0])
            start += size
        layers = objective.LAYERS_PER_BLOCK * depth  # effectiveness: L / exp(mean log width) <= rho
        rows.append(stack("log_width"))
        lo.append(layers * math.log(layers / self.rho))
        hi.append(np.inf)
        if budget is not None:
            for attr, cap, fixed in (("latency", budget.latency_ms, fixed_ms), ("params", budget.params, fixed_par),
                                     ("flops", budget.flops, fixed_fl)):
                if cap is not None:
                    rows.append(stack(attr))
                    lo.append(-np.inf)
                    hi.append(cap - fixed)
        upper = np.concatenate([np.full(size, groups[g][0]) for (g, _, _), size in zip(cols, sizes)])
        return dict(arch=arch, groups=groups, cols=cols, sizes=sizes, stack=stack, n=n,
                    fixed={"latency": fixed_ms, "params": fixed_par, "flops": fixed_fl},
                    bounds=Bounds(np.zeros(n), upper), constraints=LinearConstraint(np.array(rows), lo, hi))

    def solve_one(self, emb: int, depth: int, budget: Budget) -> tuple[float, ViTArch, float] | None:
        """The entropy-maximal architecture of this EMB and depth within the budget, or None."""
        prog = self._programme(emb, depth, budget)
        if prog is None:
            return None
        res = milp(-prog["stack"]("entropy"), integrality=np.ones(prog["n"]), bounds=prog["bounds"],
                   constraints=prog["constraints"], options={"mip_rel_gap": 1e-6})
        if res.status != 0 or res.x is None:  # 2: infeasible; anything else without a solution: treat so too
            return None
        counts = np.rint(res.x).astype(int)
        latency = float(counts @ prog["stack"]("latency")) + prog["fixed"]["latency"]
        return float(-res.fun), self._assemble(prog["arch"], prog["groups"], prog["cols"], prog["sizes"], counts), latency

    def bound(self, emb: int, depth: int, budget: Budget) -> float | None:
        """The LP relaxation's entropy: no integer design of this EMB and depth exceeds it (None: infeasible)."""
        prog = self._programme(emb, depth, budget)
        if prog is None:
            return None
        res = milp(-prog["stack"]("entropy"), bounds=prog["bounds"], constraints=prog["constraints"])
        return None if res.status != 0 else float(-res.fun)

    def least(self, emb: int, depth: int, quantity: str) -> float | None:
        """The least latency / params / FLOPs any architecture of this EMB and depth reaches within
        the effectiveness bound (None if none is within it)."""
        prog = self._programme(emb, depth, None)
        if prog is None:
            return None
        res = milp(prog["stack"](quantity), integrality=np.ones(prog["n"]), bounds=prog["bounds"],
                   constraints=prog["constraints"])
        return None if res.status != 0 else float(res.fun) + prog["fixed"][quantity]

    def _assemble(self, arch: ViTArch, groups, cols, sizes, counts) -> ViTArch:
        """Blocks from the option counts; within a group, widths non-decreasing (DeepMAD's guideline)."""
        chosen: dict[tuple[int, str], list[tuple[int, ...]]] = {}
        start = 0
        for (g, half, opts), size in zip(cols, sizes):
            picks = []
            for i, c in enumerate(counts[start:start + size]):
                picks += [opts.dims[i]] * int(c)
            chosen[(g, half)] = sorted(picks, key=lambda d: (math.prod(d[::2]) if half == "attention" else d[0], d))
            start += size
        blocks = []
        for g, (count, block) in enumerate(groups):
            for (h, qk, v), (m,) in zip(chosen[(g, "attention")], chosen[(g, "mlp")]):
                blocks.append(replace(block, heads=h, qk_dim=qk, v_dim=v, mlp_dim=m))
        return replace(arch, blocks=tuple(blocks))

    # -- the whole design ----------------------------------------------------------------------
    def design(self, budget: Budget) -> DesignResult:
        """Branch and bound over (EMB, depth): MILPs in order of their LP bounds, until no bound can
        beat the best design found (exact: a skipped programme cannot contain a better one)."""
        t0 = time.perf_counter()
        bounds = []
        for emb in self.space.emb:
            for depth in self.space.depths:
                b = self.bound(emb, depth, budget)
                if b is not None:
                    bounds.append((b, emb, depth))
        bounds.sort(key=lambda x: -x[0])
        best, candidates, milps = None, [], 0
        for b, emb, depth in bounds:
            if best is not None and b <= best[0] + 1e-9:
                break
            milps += 1
            found = self.solve_one(emb, depth, budget)
            if found is None:
                continue
            value, arch, milp_ms = found
            ms = self.predictor.predict(arch).total_ms
            if not math.isclose(ms, milp_ms, rel_tol=1e-6):
                raise AssertionError(f"internal: the programme's latency {milp_ms} ms is not the predictor's {ms} ms")
            candidates.append({"emb": emb, "depth": depth, "entropy": round(value, 4), "lp_bound": round(b, 4),
                               "predicted_ms": round(ms, 5)})
            if best is None or value > best[0] + 1e-9:
                best = (value, arch)
        seconds = time.perf_counter() - t0
        if best is None:
            raise DeployCompError(self.infeasible_message(budget))
        value, arch = best
        pred = self.predictor.predict(arch)
        model_arch = replace(arch, blocks=tuple(replace(b, tokens=arch.patches + 1, queries=0) for b in arch.blocks))
        from .model import count_params

        return DesignResult(arch, model_arch, pred.total_ms, objective.entropy(arch), objective.effectiveness(arch),
                            count_params(model_arch), arch.flops(), milps, len(bounds), seconds, candidates)

    def infeasible_message(self, budget: Budget) -> str:
        """Why nothing fits: the least latency, parameters and FLOPs reachable within the effectiveness bound."""
        depth = min(self.space.depths)  # the shallowest is the cheapest and the easiest to keep effective
        lows = {}
        for q in ("latency", "params", "flops"):
            vals = [v for v in (self.least(emb, depth, q) for emb in self.space.emb) if v is not None]
            if vals:
                lows[q] = min(vals)
        if not lows:
            return (f"no architecture of depth {self.space.depths[0]}-{self.space.depths[-1]} in the search space keeps "
                    f"effectiveness rho <= {self.rho:g}" + (" and leaves room for the semantic token generator"
                                                          if self.semantic_tokens else "") + "; raise --rho")
        return (f"no architecture in the search space meets {budget.describe()} with effectiveness rho <= {self.rho:g}: "
                f"the least the space reaches there (depth {depth}, each quantity on its own) is {lows['latency']:.4g} ms, "
                f"{lows['params'] / 1e6:.4g} M params, {lows['flops'] / 1e9:.4g} GFLOPs; raise the budget, lower "
                "--depth-range or raise --rho")
