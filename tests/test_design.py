"""deploycomp design: the MILP finds the true optimum within the budget, caps and the effectiveness
bound hold, infeasible budgets are one clear error, designs register as timm models that train,
and --from slices the large model's weights exactly."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

from deploycomp.errors import DeployCompError
from deploycomp.latency.arch import BlockArch, ViTArch
from deploycomp.latency.predictor import LatencyPredictor
from deploycomp.latency.table import LatencyTable, save_table
from deploycomp.design import objective
from deploycomp.design.model import count_params
from deploycomp.design.solve import Budget, Designer, SearchSpace

GEOMETRY = {"img_size": 28, "patch": 4, "in_chans": 1, "num_classes": 10}  # Fashion-MNIST, 49 patches + cls
TOKENS = 50
GRID = {  # a tiny grid at the proxy's geometry (so designs train on Fashion-MNIST)
    "attention": {"tokens": [5, 50], "emb": [16, 32], "heads": [1, 2], "qk_dim": [4, 8], "v_dim": [4, 8]},
    "mlp": {"tokens": [5, 50], "emb": [16, 32], "mlp_dim": [16, 48]},
    "stem": {"emb": [16, 32]},
    "head": {"tokens": [5, 50], "emb": [16, 32]},
}


def synthetic_ms(part: str, p) -> float:
    """Latency with a per-head overhead, matmul terms and fixed costs: trade-offs worth solving."""
    if part == "attention":
        t, e, h, qk, v = p
        return 0.05 + 0.02 * h + 2e-6 * t * e * h * (2 * qk + v) + 1e-6 * t * t * h * (qk + v)
    if part == "mlp":
        t, e, m = p
        return 0.03 + 3e-6 * t * e * m
    if part == "stem":
        return 0.02 + 1e-4 * p[0]
    return 0.01 + 1e-5 * p[0] * p[1]


def synthetic_table(fp=None) -> LatencyTable:
    t = LatencyTable(fp or {"target": "ort-cpu"}, GRID, dict(GEOMETRY), {"warmup": 0, "repeats": 1, "passes": 1,
                                                                          "grid_name": "test"})
    for part in GRID:
        for point in t.points(part):
            t.add_samples(part, point, [synthetic_ms(part, point)])
    return t


@pytest.fixture(scope="module")
def predictor():
    return LatencyPredictor(synthetic_table())


def arch(emb, dims, tokens=TOKENS) -> ViTArch:
    return ViTArch(emb, tuple(BlockArch(h, qk, v, m, tokens) for h, qk, v, m in dims), **GEOMETRY)


REFERENCE = arch(32, [(2, 8, 8, 48)] * 3)


def test_milp_finds_the_brute_force_optimum(predictor):
    """Every multiset of block choices at every (EMB, depth), scored by the predictor on the whole
    architecture: the MILP's design is feasible and no feasible architecture has more entropy."""
    space = SearchSpace.from_grid(GRID, (2, 3), emb=(16, 32))
    budget = Budget(0.55 * predictor.predict(REFERENCE).total_ms)
    rho = 0.3
    result = Designer(predictor, space, rho=rho).design(budget)
    assert result.predicted_ms <= budget.latency_ms + 1e-9
    assert result.effectiveness <= rho + 1e-9
    blocks = [(h, qk, v, m) for h in space.heads for qk in space.qk for v in space.v for m in space.mlp]
    best = -math.inf
    for emb in space.emb:
        for depth in space.depths:
            for dims in itertools.combinations_with_replacement(blocks, depth):
                a = arch(emb, dims)
                if predictor.predict(a).total_ms <= budget.latency_ms and objective.effectiveness(a) <= rho:
                    best = max(best, objective.entropy(a))
    assert best > -math.inf
    assert result.entropy == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("cap", ["params", "flops"])
def test_caps_are_honoured_and_bind(predictor, cap):
    space = SearchSpace.from_grid(GRID, (2, 4))
    budget = Budget(0.8 * predictor.predict(REFERENCE).total_ms)
    free = Designer(predictor, space).design(budget)
    limit = 0.7 * (free.params if cap == "params" else free.flops)
    capped = Designer(predictor, space).design(Budget(budget.latency_ms, **{cap: limit}))
    assert (capped.params if cap == "params" else capped.flops) <= limit
    assert capped.params == count_params(capped.model_arch)  # the closed form counts the real model
    assert capped.predicted_ms <= budget.latency_ms
    assert capped.entropy < free.entropy  # the cap changed the design


def test_effectiveness_bound_limits_depth(predictor):
    space = SearchSpace.from_grid(GRID, (2, 6))
    budget = Budget(2.0 * predictor.predict(REFERENCE).total_ms)
    loose = Designer(predictor, space, rho=1.0).design(budget)
    tight = Designer(predictor, space, rho=0.3).design(budget)
    assert tight.effectiveness <= 0.3 + 1e-9 < loose.effectiveness
    assert len(tight.arch.blocks) < len(loose.arch.blocks)


def test_semantic_tokens_enter_the_latency(predictor):
    space = SearchSpace.from_grid(GRID, (3, 4))
    budget = Budget(0.6 * predictor.predict(REFERENCE).total_ms)
    plain = Designer(predictor, space, rho=1.0).design(budget)
    tokens = Designer(predictor, space, semantic_tokens=4, rho=1.0).design(budget)
    assert tokens.predicted_ms <= budget.latency_ms
    assert any(b.queries == 5 for b in tokens.arch.blocks)  # the generator: 4 semantic tokens + cls
    assert all(b.tokens == TOKENS and not b.queries for b in tokens.model_arch.blocks)
    assert count_params(tokens.model_arch) > count_params(plain.model_arch)  # fewer tokens buy wider blocks


def test_infeasible_budget_is_one_clear_error(predictor):
    space = SearchSpace.from_grid(GRID, (2, 4))
    with pytest.raises(DeployCompError, match=r"no architecture in the search space meets latency <= 0\.1 ms.*"
                                              r"least the space reaches .* ms"):
        Designer(predictor, space).design(Budget(0.1))
    with pytest.raises(DeployCompError, match="params <= 0.001 M"):
        Designer(predictor, space).design(Budget(10.0, params=1000))


def test_uniform_scaling_is_the_widest_that_fits(predictor):
    from deploycomp.design.scale import scale_uniform, scaled_arch

    space = SearchSpace.from_grid(GRID, (2, 4))
    src = arch(32, [(2, 8, 8, 48)] * 4)
    budget = Budget(0.5 * predictor.predict(src).total_ms)  # lands between grid steps of the MLP
    r = scale_uniform(predictor, src, budget, space)
    assert r.predicted_ms <= budget.latency_ms and len(r.arch.blocks) == 4
    assert len({(b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in r.arch.blocks}) == 1  # uniform
    assert all(b.qk_dim == 8 for b in r.arch.blocks)  # head dims kept
    w = r.width  # every width is the largest grid value <= width x the source's
    assert r.arch.emb == max(e for e in space.emb if e <= w * 32)
    assert r.arch.blocks[0].mlp_dim == max(m for m in space.mlp if m <= w * 48)
    assert r.arch.blocks[0].heads == max([1] + [h for h in space.heads if h <= w * 2])
    wider = next(scaled_arch(src, w, 4, space) for w in np.linspace(r.width, 1.0, 500)
                 if scaled_arch(src, w, 4, space) != r.arch)
    assert predictor.predict(wider).total_ms > budget.latency_ms  # the next grid step does not fit


def _tiny_vit(depth=4, emb=32, heads=4, mlp_ratio=2.0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=emb, depth=depth,
                             num_heads=heads, mlp_ratio=mlp_ratio).eval()


def _rel_l2(a, b) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_slicing_is_exact_where_it_can_be():
    from deploycomp.design.scale import arch_of_vit, kept_blocks, slice_vit

    vit = _tiny_vit()
    x = torch.randn(3, 1, 28, 28)
    full = arch_of_vit(vit)
    assert (full.emb, len(full.blocks), full.blocks[0]) == (32, 4, BlockArch(4, 8, 8, 64, TOKENS))
    with torch.no_grad():
        assert _rel_l2(slice_vit(vit, full, list(range(4)))(x), vit(x)) <= 1e-4  # identity slice
        # make what the small model drops contribute nothing: then it computes the same function
        keep = kept_blocks(4, 2)
        assert keep == [0, 3]
        small = ViTArch(32, tuple(BlockArch(2, 8, 8, 32, TOKENS) for _ in keep), **GEOMETRY)
        for i, blk in enumerate(vit.blocks):
            if i not in keep:
                for lin in (blk.attn.proj, blk.mlp.fc2):
                    lin.weight.zero_()
                    lin.bias.zero_()
            blk.attn.proj.weight[:, 2 * 8:] = 0  # heads 2, 3
            blk.mlp.fc2.weight[:, 32:] = 0  # MLP units 32..63
        sliced = slice_vit(vit, small, keep)
        assert _rel_l2(sliced(x), vit(x)) <= 1e-4
        # a narrower EMB is not exact (LayerNorm statistics change), but every weight is the leading slice
        narrow = ViTArch(16, small.blocks, **GEOMETRY)
        sl = slice_vit(vit, narrow, keep)
        b, src = sl.blocks[1], vit.blocks[3]
        assert torch.equal(b.attn.k.weight, src.attn.qkv.weight[32:48, :16])
        assert torch.equal(b.attn.v.bias, src.attn.qkv.bias[64:80])
        assert torch.equal(b.mlp[2].weight, src.mlp.fc2.weight[:16, :32])
        assert torch.equal(sl.pos_embed, vit.pos_embed[..., :16])


def test_design_registers_a_timm_model_that_trains(tmp_path, monkeypatch, predictor):
    """run_design on a table file -> a name any process resolves from the registry -> one training step."""
    from deploycomp.api import train
    from deploycomp.design import registry
    from deploycomp.design.command import run_design
    from deploycomp.frontend.timm_models import build_timm_model, timm_spec
    from deploycomp.learn.train import TrainConfig

    monkeypatch.setenv("DEPLOYCOMP_DESIGNS", str(tmp_path / "designs"))
    table = tmp_path / "table.json"
    save_table(synthetic_table(_device_fp()), table)
    budget_ms = 0.7 * predictor.predict(REFERENCE).total_ms
    record = run_design(tmp_path / "out", latency=f"{budget_ms}ms", target="ort-cpu", table=table, depth_range="2:4",
                        name="design_test")
    assert record["predicted"]["total_ms"] <= budget_ms
    assert (tmp_path / "out" / "design.json").is_file() and "timm:design_test" in (tmp_path / "out" / "report.md").read_text()
    monkeypatch.setattr(registry, "_REGISTERED", {})  # as a fresh process: found through the registry file
    assert timm_spec("design_test").img_size == 28
    model = build_timm_model("design_test")
    assert [(b.attn.heads, b.attn.qk_dim, b.attn.v_dim, b.mlp[0].out_features) for b in model.blocks] == [
        (b["heads"], b["qk_dim"], b["v_dim"], b["mlp_dim"]) for b in record["arch"]["blocks"]]
    metrics = train("timm:design_test", tmp_path / "run", TrainConfig(epochs=1, batch_size=32, max_steps=1),
                    train_subset=64, test_subset=32, threads=1)
    assert metrics["history"] == [] and (tmp_path / "run" / "checkpoint.pt").is_file()
    with pytest.raises(DeployCompError, match="unknown model 'timm:design_nope'"):
        timm_spec("design_nope")


def _device_fp():
    from deploycomp.backends.base import get_backend
    from deploycomp.latency.profiler import device_fingerprint

    return device_fingerprint(get_backend("ort-cpu"), 1, "fp32")


def test_cli_infeasible_budget_exits_2_and_from_writes_sliced_init(tmp_path, monkeypatch, capsys):
    """The command in this process (``invoke_cli``); exit code 2 of a real process is test_cli.py's."""
    from safetensors.torch import load_file

    from deploycomp.frontend.timm_models import build_timm_model
    from deploycomp.learn.checkpoint import save_weights

    from .conftest import invoke_cli

    table = tmp_path / "table.json"
    save_table(synthetic_table(_device_fp()), table)
    monkeypatch.setenv("DEPLOYCOMP_DESIGNS", str(tmp_path / "designs"))
    code, _, err = invoke_cli(monkeypatch, capsys, "design", "--target", "ort-cpu", "--latency", "0.01ms", "--table", table,
                              "--depth-range", "2:4", "-o", tmp_path / "none")
    assert code == 2
    assert err.strip().startswith("error: no architecture in the search space meets latency <= 0.01 ms")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "none").exists()

    source = build_timm_model("deit_fmnist_patch4_28")  # EMB 96, 4 heads x 24, MLP 384: wider than the grid
    save_weights(tmp_path / "big.safetensors", source)
    code, _, err = invoke_cli(monkeypatch, capsys, "design", "--target", "ort-cpu", "--from", "timm:deit_fmnist_patch4_28",
                              "--weights", tmp_path / "big.safetensors", "--latency", "0.5x", "--table", table, "--depth-range", "2:4",
                              "--name", "scaled_test", "-o", tmp_path / "scaled")
    assert code == 0, err
    init = load_file(str(tmp_path / "scaled" / "init.safetensors"))
    emb = init["pos_embed"].shape[-1]
    assert emb <= 32 and torch.equal(init["pos_embed"], source.pos_embed[..., :emb].detach())
    assert torch.equal(init["blocks.0.mlp.0.weight"], source.blocks[0].mlp.fc1.weight[: init["blocks.0.mlp.0.weight"].shape[0], :emb].detach())


@pytest.mark.parametrize("kwargs, message", [
    ({"latency": "2x"}, "a fraction must lie in"),
    ({"latency": "0.5x", "params": "lots"}, "--params 'lots'"),
    ({"latency": "0.5x", "flops": "-1G"}, "--flops '-1G'"),
    ({"latency": "0.5x", "depth_range": "6:3"}, "--depth-range '6:3'"),
    ({"latency": "0.5x", "rho": 0.0}, "--rho 0.0"),
    ({"latency": "0.5x", "name": "Bad-Name"}, "design name 'Bad-Name'"),
    ({"latency": "0.5x", "name": "deit_tiny_patch16_224"}, "is a built-in timm model"),
    ({"latency": "0.5x", "grid": "nope"}, "unknown grid 'nope'"),
    ({"latency": "0.5x", "semantic_tokens": 5}, "give a square number"),
    ({"latency": "0.5x", "weights": "w.safetensors"}, "--weights are the --from model's weights"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, kwargs, message):
    from deploycomp.design.command import run_design

    with pytest.raises(DeployCompError, match=re.escape(message)):
        run_design(tmp_path / "out", table=tmp_path / "missing.json", **kwargs)  # the table is never looked at
    assert not (tmp_path / "out").exists()
