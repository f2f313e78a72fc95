"""Semantic tokens per window on Swin (tokens/stvit_swin.py, STViT-R's design): the torch model's
parts against timm's Swin and torch's pooling, the exported design (TokenCluster nodes, both
lowerings) against the torch model through ONNX Runtime, the compile through the gate on ort-cpu and
openvino-cpu, and the refusals (one line, before anything slow)."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F

from deploycomp.api import CompileOptions, check_options, compile
from deploycomp.errors import DeployCompError
from deploycomp.tokens.config import SemanticTokenConfig
from deploycomp.tokens.stvit_swin import (SemanticTokenSwin, SwinTokenConfig, generator_block, grid_block, partition,
                                          pool_windows, reverse)

SWIN = "timm:swin_tiny_patch4_window7_224"
# 64 px / patch 4: stages of 16x16 and 8x8 tokens, windows of 4x4 (a shifted block in each stage)
TINY_SWIN = {"img_size": 64, "window_size": 4, "embed_dim": 24, "depths": (2, 2), "num_heads": (2, 2), "num_classes": 10}


def tiny_swin(seed: int = 0, **kwargs) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(SWIN.split(":")[1], pretrained=False, **{**TINY_SWIN, **kwargs}).eval()
    with torch.no_grad():  # peaked attention (timm's 0.02 init gives near-uniform attention, blind to a
        # wrong scale), non-zero biases and bias tables: a dropped or misplaced term shows
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
            elif p.dim() == 2:
                p.normal_(0, 2 / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_grid_block_is_timms_block_on_its_own_grid():
    """Every block (unshifted and shifted, with its bias table and shift mask) of both stages."""
    swin = tiny_swin()
    with torch.no_grad():
        for stage in swin.layers:
            for blk in stage.blocks:
                x = torch.randn(2, *blk.input_resolution, blk.norm1.normalized_shape[0])
                assert rel(grid_block(blk, x), blk(x)) < 1e-6


def test_grid_block_on_a_smaller_grid_reads_the_bias_at_the_same_offsets():
    """On a grid smaller than its window, a block is timm's block built for that grid (window = grid,
    no shift) whose smaller bias table holds the big table's entries of the same offsets."""
    import timm.models.swin_transformer as tsw

    swin = tiny_swin()
    big = swin.layers[1].blocks[1]  # a shifted block, window 4
    g, w, heads, dim = 3, 4, 2, big.norm1.normalized_shape[0]
    small = tsw.SwinTransformerBlock(dim, (g, g), num_heads=heads, window_size=w, shift_size=w // 2).eval()
    assert tuple(small.window_size) == (g, g) and not any(small.shift_size)
    small.load_state_dict({k: v for k, v in big.state_dict().items() if "relative_position_bias_table" not in k},
                          strict=False)
    table = big.attn.relative_position_bias_table.view(2 * w - 1, 2 * w - 1, heads)
    with torch.no_grad():
        small.attn.relative_position_bias_table.copy_(table[w - g:w + g - 1, w - g:w + g - 1].reshape(-1, heads))
        x = torch.randn(2, g, g, dim)
        assert rel(grid_block(big, x), small(x)) < 1e-6


def test_pooling_and_window_layout():
    """Windows pooled as torch's adaptive max pooling (overlapping bins: 7 -> 3), windows laid out as
    timm's window_partition, and put back in place."""
    from timm.models.swin_transformer import window_partition

    w = torch.randn(6, 7, 7, 5)
    want = F.adaptive_max_pool2d(w.permute(0, 3, 1, 2), 3).flatten(2).transpose(1, 2)
    assert torch.equal(pool_windows(w, 3), want)
    x = torch.randn(2, 8, 12, 5)
    assert torch.equal(partition(x, (4, 4)), window_partition(x, (4, 4)))
    assert torch.equal(reverse(partition(x, (4, 4)), 2, 3), x)


def test_first_generator_block_with_a_token_per_position_is_the_blocks_window_attention():
    """M = w² (pooling is then the identity) and a zero bias table: the first generator block (an
    unshifted block) is timm's block on the stage's grid, window by window."""
    swin = tiny_swin()
    blk = swin.layers[1].blocks[0]
    with torch.no_grad():
        blk.attn.relative_position_bias_table.zero_()
        x = torch.randn(2, 8, 8, 48)
        windows = partition(x, (4, 4))
        s = generator_block(blk, pool_windows(windows, 4), windows.flatten(1, 2))
        assert rel(reverse(s.reshape(-1, 4, 4, 48), 2, 2), blk(x)) < 1e-6


def _attend(blk, queries, keys):
    """Written out: the block's qkv split, multi-head softmax(scale·q·kᵀ)·v, its output projection."""
    attn, c = blk.attn, queries.shape[-1]
    w, b = attn.qkv.weight, attn.qkv.bias
    heads = attn.num_heads
    q = F.linear(blk.norm1(queries), w[:c], b[:c])
    k, v = F.linear(blk.norm1(keys), w[c:2 * c], b[c:2 * c]), F.linear(blk.norm1(keys), w[2 * c:], b[2 * c:])
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
    return attn.proj(out)


def _block(blk, queries, keys):
    x = queries + _attend(blk, queries, keys)
    return x + blk.mlp(blk.norm2(x))


def semantic_stage_by_hand(blocks, x, w, s, dense, generator=2):
    """The design's stage (from its first generator block on), window by window in a loop."""
    b, h, wd, c = x.shape
    out = torch.zeros(b, h, wd, c) if dense else torch.zeros(b, h // w * s, wd // w * s, c)
    for r in range(h // w):
        for col in range(wd // w):
            grid = x[:, r * w:(r + 1) * w, col * w:(col + 1) * w]
            tokens = grid.reshape(b, w * w, c)
            sem = F.adaptive_max_pool2d(grid.permute(0, 3, 1, 2), s).flatten(2).transpose(1, 2)
            sem = _block(blocks[0], sem, tokens)
            if generator == 2:
                sem = _block(blocks[1], sem, torch.cat([sem, tokens], 1))
            for blk in blocks[generator:len(blocks) - dense]:
                sem = _block(blk, sem, sem)
            if dense:
                out[:, r * w:(r + 1) * w, col * w:(col + 1) * w] = _block(blocks[-1], tokens, sem).reshape(b, w, w, c)
            else:
                out[:, r * s:(r + 1) * s, col * s:(col + 1) * s] = sem.reshape(b, s, s, c)
    return out


@pytest.mark.parametrize("dense,tokens,depth", [(False, 4, 3), (False, 9, 3), (True, 4, 3), (True, 4, 2)])
def test_semantic_stage_is_the_design_written_out_window_by_window(dense, tokens, depth):
    """The last stage (3 blocks: generator, generator, a semantic block or the recovery; 2 blocks with
    --dense: a one-block generator and the recovery) against the design computed in a loop over
    windows with torch's own pooling and attention."""
    swin = tiny_swin(depths=(2, depth))
    model = SemanticTokenSwin(swin, SwinTokenConfig(tokens, stage=1, layer=0, dense=dense)).eval()
    assert model.config.generator == (1 if dense and depth == 2 else 2)
    seen = {}
    model.layers[1].downsample.register_forward_hook(lambda m, i, o: seen.setdefault("in", o))
    model.norm.register_forward_hook(lambda m, i, o: seen.setdefault("out", i[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        want = semantic_stage_by_hand(list(model.layers[1].blocks), seen["in"], 4, math.isqrt(tokens), dense,
                                      model.config.generator)
    assert seen["out"].shape == want.shape
    assert rel(seen["out"], want) < 1e-5


def test_semantic_tokens_stay_in_their_window():
    """Changing one window of the stage's input changes only that window's semantic tokens."""
    swin = tiny_swin()
    model = SemanticTokenSwin(swin, SwinTokenConfig(4, stage=0)).eval()
    grab = {}
    model.layers[1].downsample.register_forward_hook(lambda m, i, o: grab.setdefault("x", []).append(i[0]))
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[:, :, 16:32, 32:48] += 1.0  # patch rows 4-7, columns 8-11: window (1, 2) of stage 0's 4x4 windows
    with torch.no_grad():
        model(x), model(y)
    a, b = grab["x"]  # the semantic grid, 8x8: each window's 2x2 tokens in its place
    changed = (a - b).abs().amax(-1)[0] > 0
    assert changed[2:4, 4:6].all() and changed.sum() == 4


@pytest.mark.parametrize("tokens,stage,dense,depths", [(4, 0, False, (2, 2)), (9, 0, False, (2, 2)), (4, 1, False, (2, 3)),
                                                       (4, 0, True, (2, 2)), (4, 1, True, (2, 3))])
def test_latency_view_is_the_design_by_its_matmul_flops(tokens, stage, dense, depths):
    """``swin_token_arch`` (what the latency table is read at) describes the model that runs: its
    matmul FLOPs (attention per window over its queries and keys, MLPs on the tokens they see,
    patch merging of the grid the stage hands on, windows of later stages on that grid, padded
    where it does not divide: 9 tokens hand on a 12x12 grid, stage 1 runs 6x6 in four padded 4x4
    windows) equal torch's count of the design's forward pass, as the unmodified view equals timm's."""
    from torch.utils.flop_counter import FlopCounterMode

    from deploycomp.latency.arch import swin_arch_of
    from deploycomp.tokens.stvit_swin import swin_token_arch

    def counted(module) -> int:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            module(torch.randn(1, 3, 64, 64))
        return fc.get_total_flops()

    swin = tiny_swin(depths=depths)
    arch = swin_arch_of(swin)
    assert arch.flops() == counted(swin)
    config = SwinTokenConfig(tokens, stage=stage, dense=dense)
    view = swin_token_arch(arch, config)
    assert view.flops() == counted(SemanticTokenSwin(swin, config).eval()) < arch.flops()


def test_the_model_keeps_the_parameter_names():
    swin = tiny_swin()
    names = [n for n, _ in swin.named_parameters()]
    model = SemanticTokenSwin(swin, SwinTokenConfig(4))
    assert [n for n, _ in model.named_parameters()] == names
    assert model.config.stage == 1 and model.config.layer == 0  # the last stage of a 2-stage Swin
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["reference", "ort-mha"])
def test_exported_design_is_the_torch_model(how):
    """The design exported with TokenCluster nodes (both lowerings), run by ONNX Runtime, equals the
    torch model; semantic tokens in stage 0, so stage 1 runs on a smaller grid."""
    import onnxruntime as ort

    from deploycomp.frontend.export import export_to_onnx
    from deploycomp.tokens.export_op import cluster_as_op, custom_translation_table
    from deploycomp.tokens.op import lower, token_cluster_nodes

    model = SemanticTokenSwin(tiny_swin(), SwinTokenConfig(4, stage=0)).eval()
    with cluster_as_op(model):
        graph = export_to_onnx(model, (1, 3, 64, 64), 18, custom_translation_table())
    assert len(token_cluster_nodes(graph)) == 2  # the stage's two blocks are the generator
    assert lower(graph, how) == 2
    sess = ort.InferenceSession(ir.serde.serialize_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64), dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert rel(sess.run(None, {sess.get_inputs()[0].name: x})[0], want) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("stage,dense,depths", [(0, False, (2, 2)), (1, True, (2, 3))])
def test_the_design_of_a_pruned_swin_is_the_masked_design(stage, dense, depths):
    """Pruning under one budget with Swin's semantic tokens trains the design with the removed units
    masked to zero (``PlanMasks``) and then cuts it to its plan (``swin_from_timm``, separate q/k/v
    of their own widths) for export: both compute the same, on every group (EMB of both stages,
    heads, QK, V, MLP), on the unchanged and the semantic grid and through the recovery. The design
    cut to another plan does not (the comparison can fail)."""
    import copy

    from deploycomp.frontend.export import export_to_onnx
    from deploycomp.passes.base import CompileContext, Pipeline
    from deploycomp.passes.cleanup import CleanupPass
    from deploycomp.passes.discover import DiscoverPass
    from deploycomp.pruning.masks import PlanMasks
    from deploycomp.pruning.torch_prune import swin_from_timm

    from .models import random_plan

    source = tiny_swin(depths=depths)
    ctx = CompileContext(family="swin")
    model = Pipeline([CleanupPass(), DiscoverPass()])(export_to_onnx(source, (1, 3, 64, 64), 18), ctx)
    config = SwinTokenConfig(4, stage=stage, layer=0 if dense else None, dense=dense)
    masked = SemanticTokenSwin(copy.deepcopy(source), config).eval()
    plan, other = (random_plan(ctx.structure, np.random.default_rng(seed)) for seed in (1, 2))
    PlanMasks(masked, model, ctx.structure, plan).apply()
    sliced, control = (swin_from_timm(masked, ctx.structure, p) for p in (plan, other))
    assert isinstance(sliced, SemanticTokenSwin) and sliced.layers[0].blocks[0].attn.num_heads == 1
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 3, 64, 64), dtype=np.float32))
    with torch.no_grad():
        want, got, wrong = masked(x), sliced(x), control(x)
    assert rel(got, want) < 1e-5 and rel(wrong, want) > 1e-2


@pytest.mark.slow
def test_compile_dense_recovers_the_full_grid(tmp_path):
    """--dense: the stage's last block recovers its grid; the artifact passes the gate (ort-cpu)."""
    weights = tmp_path / "swin.pth"
    torch.save(tiny_swin(depths=(2, 3)).state_dict(), weights)
    options = CompileOptions(target="ort-cpu", model_kwargs={**TINY_SWIN, "depths": (2, 3)}, measure_rounds=0, seed=0,
                             weights=str(weights), semantic_tokens=SemanticTokenConfig(4, layer=0, dense=True))
    manifest = compile(SWIN, tmp_path / "out", options)
    assert manifest["semantic_tokens"]["recovery"] and manifest["parity"]["reference"] == "torch (semantic tokens per window)"
    blocks = manifest["structure"]["blocks"]
    assert [(b["tokens"], b["sequences"]) for b in blocks] == [(16, 16)] * 2 + [(4, 4)] * 2 + [(16, 4)]
    assert [b["keys"] for b in blocks] == [0, 0, 16, 20, 4]  # generator: the window, then + its tokens; recovery: M


@pytest.mark.slow
@pytest.mark.parametrize("target,stage", [("ort-cpu", 0), ("openvino-cpu", None)])
def test_compile_swin_with_semantic_tokens_passes_the_gate(tmp_path, target, stage):
    weights = tmp_path / "swin.pth"  # peaked attention: the gate sees a wrong scale
    torch.save(tiny_swin().state_dict(), weights)
    options = CompileOptions(target=target, model_kwargs=dict(TINY_SWIN), measure_rounds=0, seed=0, weights=str(weights),
                             semantic_tokens=SemanticTokenConfig(4, stage=stage))
    manifest = compile(SWIN, tmp_path / "out", options)
    assert manifest["parity"]["reference"] == "torch (semantic tokens per window)"
    assert manifest["semantic_tokens"]["stage"] == (stage if stage is not None else 1)
    tokens = [(b["tokens"], b["sequences"]) for b in manifest["structure"]["blocks"]]
    # stage 0: 16 windows of 4 tokens, then stage 1 on a 4x4 grid: one window of 16; or stage 1: 4 windows of 4
    assert tokens == ([(4, 16), (4, 16), (16, 1), (16, 1)] if stage == 0 else [(16, 16), (16, 16), (4, 4), (4, 4)])
    model = ir.load(tmp_path / "out" / "model.onnx")
    assert "deploycomp" not in model.opset_imports


@pytest.mark.parametrize("config,kwargs,match", [
    (SemanticTokenConfig(25), {}, "cannot pool a 4x4 window to 5x5"),
    (SemanticTokenConfig(4, stage=2), {}, "--token-stage 2: the Swin has stages 0-1"),
    (SemanticTokenConfig(4, stage=0, layer=2), {}, "stage 0 has 2 blocks: none left from block 3 for the generator"),
    (SemanticTokenConfig(4, pooling="avg"), {}, "adaptive max"),
    (SemanticTokenConfig(4), {"img_size": 48}, "does not divide into 4x4 windows"),
    (SemanticTokenConfig(4, layer=1, dense=True), {}, "none left from block 2 for the generator and the recovery"),
])
def test_refusals_are_one_line_before_anything_is_built(tmp_path, config, kwargs, match):
    options = CompileOptions(model_kwargs={**TINY_SWIN, **kwargs}, semantic_tokens=config, measure_rounds=0)
    with pytest.raises(DeployCompError, match=match) as e:
        check_options(SWIN, options)  # the meta-device model: no weights, no export
    assert "\n" not in str(e.value)


def test_latency_without_a_table_and_a_deit_token_stage_are_refused(tmp_path):
    """--latency with Swin semantic tokens composes (``test_prune_swin.py``); without a table for the
    model's geometry it is refused in one line before anything is built."""
    from deploycomp.pruning.config import PruneConfig

    options = CompileOptions(model_kwargs=dict(TINY_SWIN), semantic_tokens=SemanticTokenConfig(4), tables=str(tmp_path),
                             prune=PruneConfig(latency="0.5x"), measure_rounds=0)
    with pytest.raises(DeployCompError, match="no latency grid preset covers") as e:
        check_options(SWIN, options)
    assert "\n" not in str(e.value)
    deit = {"img_size": 64, "patch_size": 16, "embed_dim": 48, "num_heads": 3, "depth": 4, "num_classes": 10}
    options = CompileOptions(model_kwargs=deit, semantic_tokens=SemanticTokenConfig(4, stage=1), measure_rounds=0)
    with pytest.raises(DeployCompError, match="--token-stage applies to Swin"):
        check_options("timm:deit_tiny_patch16_224", options)
    options = CompileOptions(model_kwargs=deit, semantic_tokens=SemanticTokenConfig(4, dense=True), measure_rounds=0)
    with pytest.raises(DeployCompError, match="--dense .* applies to Swin"):
        check_options("timm:deit_tiny_patch16_224", options)


def test_cli_dense_needs_semantic_tokens(monkeypatch, capsys, tmp_path):
    from .conftest import invoke_cli

    code, _, err = invoke_cli(monkeypatch, capsys, "compile", SWIN, "--dense", "-o", tmp_path / "out")
    assert code == 2 and "--dense" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
