"""``deploycomp design``: inputs checked, the table found, the design or scaling run, OUT written.

OUT holds ``design.json`` (the record: architecture, budget, prediction, solver statistics),
``report.md`` (the same for a human) and, with ``--from``, ``init.safetensors`` (the large model's
sliced weights). The architecture is registered by name (``registry.py``) so that
``deploycomp train timm:<name>`` trains it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

from ..backends.base import DEFAULT_TARGET
from ..errors import DeployCompError
from ..latency.arch import ViTArch

# The model each grid preset was laid out for: the reference of a relative budget without --from/--reference.
GRID_REFERENCE = {"proxy-fmnist": "deit_fmnist_patch4_28", "deit-base": "deit_base_patch16_224"}


def parse_count(text: str | None, what: str, units: dict[str, float]) -> float | None:
    """'5M', '500k', '1.2G' or a plain number."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]?)\s*", str(text).lower())
    if not m or m.group(2) not in units:
        raise DeployCompError(f"{what} '{text}': give a number, optionally with {'/'.join(u for u in units if u)}")
    value = float(m.group(1)) * units[m.group(2)]
    if value <= 0:
        raise DeployCompError(f"{what} '{text}' must be > 0")
    return value


def parse_depth_range(text: str) -> tuple[int, ...]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)) <= 48:
        raise DeployCompError(f"--depth-range '{text}': give MIN:MAX blocks with 1 <= MIN <= MAX <= 48, e.g. 4:12")
    return tuple(range(int(m.group(1)), int(m.group(2)) + 1))


def _timm_arch(spec: str, weights: str | None):
    from ..frontend.timm_models import build_timm_model
    from .scale import arch_of_vit

    if not spec.startswith("timm:"):
        raise DeployCompError(f"'{spec}': give a timm:<name> model")
    module = build_timm_model(spec.removeprefix("timm:"), Path(weights) if weights else None)
    return module, arch_of_vit(module)


def _geometry(arch: ViTArch) -> dict[str, int]:
    return {"img_size": arch.img_size, "patch": arch.patch, "in_chans": arch.in_chans, "num_classes": arch.num_classes}


def run_design(output: Path, *, latency: str, target: str = DEFAULT_TARGET, batch: int = 1, params: str | None = None,
               flops: str | None = None, depth_range: str = "4:12", source: str | None = None,
               weights: str | None = None, reference: str | None = None, semantic_tokens: int | None = None,
               rho: float | None = None, grid: str | None = None, tables: Path = Path("latency_tables"),
               table: Path | None = None, force: bool = False, name: str | None = None, threads: int | None = None,
               static_batch: bool = False, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from ..latency.predictor import LatencyPredictor
    from ..latency.profiler import FIXED, GRIDS, find_table, grid_for
    from ..pruning.schedule import LatencyBudget
    from . import objective
    from .registry import check_name, design_record, save_design
    from .solve import Budget, Designer, SearchSpace

    # cheap checks first
    lat_budget = LatencyBudget.parse(latency)
    param_cap = parse_count(params, "--params", {"": 1, "k": 1e3, "m": 1e6, "g": 1e9})
    flop_cap = parse_count(flops, "--flops", {"": 1, "k": 1e3, "m": 1e6, "g": 1e9})
    depths = parse_depth_range(depth_range)
    rho = objective.DEFAULT_RHO if rho is None else rho
    if rho <= 0:
        raise DeployCompError(f"--rho {rho}: the effectiveness bound must be > 0")
    if name is not None:
        check_name(name)
    if grid is not None and grid not in GRIDS:
        raise DeployCompError(f"unknown grid '{grid}': use one of {', '.join(GRIDS)}")
    if source and semantic_tokens:
        raise DeployCompError("--semantic-tokens applies to a designed architecture, not to --from scaling")
    if weights and not source:
        raise DeployCompError("--weights are the --from model's weights: give --from timm:<name>")
    if semantic_tokens is not None:
        from ..tokens.stvit import SemanticTokenConfig

        SemanticTokenConfig(tokens=semantic_tokens)  # a square, > 0

    module = src_arch = ref_arch = None
    ref_name = None
    if source:
        module, src_arch = _timm_arch(source, weights)
        from .scale import check_sliceable

        check_sliceable(module)
        ref_arch, ref_name = src_arch, source
    elif reference:
        _, ref_arch = _timm_arch(reference, None)
        ref_name = reference
    if ref_arch is not None:
        model_grid = grid_for(_geometry(ref_arch))
        if grid is not None and grid != model_grid:
            raise DeployCompError(f"{ref_name} has the input geometry of grid {model_grid}, not {grid}")
        grid = model_grid
    grid = grid or "deit-base"
    if "window" in FIXED.get(grid, {}):
        raise DeployCompError(f"design lays out single-stage ViTs; grid {grid} is a Swin grid")
    lat_table = find_table(target, batch, grid, tables, table=table, force=force, threads=threads,
                           static_batch=static_batch)
    predictor = LatencyPredictor(lat_table)
    if lat_budget.relative:
        if ref_arch is None:
            default = GRID_REFERENCE.get(lat_table.protocol.get("grid_name", grid))
            if default is None:
                raise DeployCompError(f"a relative budget needs a reference model on grid {grid}: give --reference timm:<name>")
            _, ref_arch = _timm_arch(f"timm:{default}", None)
            ref_name = f"timm:{default}"
    ref_ms = predictor.predict(ref_arch).total_ms if ref_arch is not None else None
    budget = Budget(lat_budget.target_ms(ref_ms) if lat_budget.relative else lat_budget.value,
                    None if param_cap is None else int(param_cap), flop_cap)
    space = SearchSpace.from_grid(lat_table.grid, depths)

    t0 = time.perf_counter()
    from .model import arch_digest

    if source:
        from .scale import scale_uniform, slice_vit

        scaled = scale_uniform(predictor, src_arch, budget, space)
        arch = model_arch = scaled.arch
        kind = "tinyvit-scale"
        solver = {"method": "scipy.optimize.brentq on the width factor", "width_factor": round(scaled.width, 5),
                  "source_blocks": scaled.blocks, "seconds": round(time.perf_counter() - t0, 3)}
        name = name or f"scaled_{source.removeprefix('timm:')}_{arch_digest(arch)}"
    else:
        designer = Designer(predictor, space, rho=rho, semantic_tokens=semantic_tokens)
        result = designer.design(budget)
        arch, model_arch = result.arch, result.model_arch
        kind = "deepmad"
        top = sorted(result.candidates, key=lambda c: -c["entropy"])[:8]
        solver = {"method": "scipy.optimize.milp (HiGHS): LP bounds for every (EMB, depth), MILPs in bound order until "
                            "none can win", "lp_bounds": result.lp_bounds, "milps": result.milps,
                  "seconds": round(result.solve_seconds, 3), "search_space_size": float(space.size()), "best_per_emb_depth": top}
        name = name or f"design_{arch_digest(model_arch)}"
    check_name(name)
    pred = predictor.predict(arch)
    from .model import count_params

    info = {
        "kind": kind,
        "target": target, "batch": batch, "latency_table": str(lat_table.path), "grid": grid,
        "budget": {"latency": str(lat_budget), "latency_ms": budget.latency_ms, "params": budget.params,
                   "flops": budget.flops, "reference": ref_name, "reference_predicted_ms": ref_ms},
        "predicted": {"total_ms": pred.total_ms, "stem_ms": pred.stem_ms, "head_ms": pred.head_ms,
                      "attention_ms": pred.attention_ms, "mlp_ms": pred.mlp_ms, "outside_grid": pred.outside_grid,
                      "fraction_of_reference": pred.total_ms / ref_ms if ref_ms else None},
        "params": count_params(model_arch), "gflops": arch.flops() / 1e9,
        "entropy": objective.entropy(arch), "effectiveness": objective.effectiveness(arch),
        "rho_bound": rho if kind == "deepmad" else None,
        "semantic_tokens": ({"tokens": semantic_tokens, "latency_view": arch.to_dict()} if semantic_tokens else None),
        "source": {"model": source, "weights": weights or ("random-init" if source else None)},
        "solver": solver,
        "train": f"deploycomp train timm:{name} -o runs/{name} --teacher-logits TEACHER.kd"
                 + (f" --weights {Path(output) / 'init.safetensors'}" if source else ""),
    }
    record = design_record(name, model_arch, info)
    output = Path(output)
    registry_path = save_design(record, output)
    if source:
        from ..learn.checkpoint import save_weights

        save_weights(output / "init.safetensors", slice_vit(module, model_arch, scaled.blocks))
    from .registry import register

    register(name, model_arch)
    (output / "report.md").write_text(report_markdown(record), encoding="utf-8")
    say(f"registered timm:{name} ({registry_path})")
    return record


def report_markdown(r: dict[str, Any]) -> str:
    a, p, b = r["arch"], r["predicted"], r["budget"]
    title = "DeepMAD design" if r["kind"] == "deepmad" else "TinyViT-style uniform scaling"
    ref = (f" = {b['latency']} of {b['reference']} ({b['reference_predicted_ms']:.4g} ms predicted)"
           if b["reference"] and b["latency"].endswith("x") else "")
    lines = [
        f"# {title}: timm:{r['name']}", "",
        f"- target {r['target']}, batch {r['batch']}, table `{r['latency_table']}`",
        f"- budget: {b['latency_ms']:.4g} ms{ref}"
        + (f", params <= {b['params'] / 1e6:.4g} M" if b["params"] else "")
        + (f", FLOPs <= {b['flops'] / 1e9:.4g} G" if b["flops"] else ""),
        f"- predicted latency {p['total_ms']:.4g} ms" + (f" ({p['fraction_of_reference']:.3f}x of the reference)"
                                                          if p["fraction_of_reference"] else ""),
        f"- {r['params'] / 1e6:.4g} M params, {r['gflops']:.4g} GFLOPs per image, EMB {a['emb']}, depth {len(a['blocks'])}",
        f"- entropy {r['entropy']:.2f}, effectiveness rho {r['effectiveness']:.3f}"
        + (f" (bound {r['rho_bound']:g})" if r["rho_bound"] else ""),
        f"- solver: {r['solver']['method']}, {r['solver']['seconds']} s",
    ]
    if p["outside_grid"]:
        lines.append(f"- outside the table's grid (extrapolated): {', '.join(p['outside_grid'])}")
    if r["semantic_tokens"]:
        lines.append(f"- latency includes {r['semantic_tokens']['tokens']} semantic tokens (STViT generator at a third "
                     "of the depth); the registered model runs on all tokens")
    lines += ["", "| block | heads | QK | V | MLP | tokens | attention ms | MLP ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    view = r["semantic_tokens"]["latency_view"]["blocks"] if r["semantic_tokens"] else a["blocks"]
    for i, (blk, am, mm) in enumerate(zip(view, p["attention_ms"], p["mlp_ms"])):
        tok = f"{blk['queries']}/{blk['tokens']}" if blk["queries"] else str(blk["tokens"])
        lines.append(f"| {i} | {blk['heads']} | {blk['qk_dim']} | {blk['v_dim']} | {blk['mlp_dim']} | {tok} | {am:.4f} | {mm:.4f} |")
    lines += ["", f"Train it: `{r['train']}`", ""]
    return "\n".join(lines)
