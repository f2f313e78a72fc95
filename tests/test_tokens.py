"""Semantic tokens (STViT): the TokenCluster op and its lowerings, the torch model, the graph
rewrite through the verification gate, and the refusals."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F

from deploycomp.api import CompileOptions, compile
from deploycomp.errors import DeployCompError
from deploycomp.tokens.op import LOWERINGS, lower, token_cluster_model, token_cluster_nodes, token_cluster_reference
from deploycomp.tokens.rewrite import adaptive_bins, pooling_matrix
from deploycomp.tokens.stvit import SemanticTokenConfig, SemanticTokenViT, cross_attention, pool_patches

from .test_cli import cli

# 64 px / patch 16: a 4x4 grid (16 patches + cls); blocks 1-2 generate, block 3 runs on the tokens
TINY = {"img_size": 64, "patch_size": 16, "embed_dim": 48, "num_heads": 3, "depth": 4, "num_classes": 10}
TINY_ARGS = [arg for k, v in TINY.items() for arg in ("--model-arg", f"{k}={v}")]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("how", LOWERINGS)
@pytest.mark.parametrize("shape", [(2, 5, 37, 3, 24, 20), (1, 17, 197, 6, 64, 64)])
def test_lowerings_agree_with_the_reference(how, shape, seed):
    import onnxruntime as ort

    b, m, n, heads, dq, dv = shape
    scale = dq ** -0.5
    model = token_cluster_model(m, n, heads, dq, dv, scale)
    assert lower(model, how) == 1 and not token_cluster_nodes(model)
    rng = np.random.default_rng(seed)  # seeded: a failure reproduces
    q, k, v = (rng.standard_normal((b, length, heads * d), dtype=np.float32) * 2
               for length, d in ((m, dq), (n, dq), (n, dv)))
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"q": q, "k": k, "v": v})[0]
    want = token_cluster_reference(*map(torch.from_numpy, (q, k, v)), heads, scale).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    wrong = token_cluster_reference(*map(torch.from_numpy, (q, k, v)), heads, scale * 1.5).numpy()
    assert np.linalg.norm(got - wrong) / np.linalg.norm(want) > 1e-2  # the comparison can fail


def test_pooling_bins_follow_torch():
    x = torch.randn(2, 5, 14, 14)
    for side in (1, 3, 4, 14):
        assert len(adaptive_bins(14, side)) == side
        pooled = pooling_matrix(14, side) @ x.flatten(2).transpose(1, 2).numpy()
        want = F.adaptive_avg_pool2d(x, side).flatten(2).transpose(1, 2).numpy()
        np.testing.assert_allclose(pooled, want, rtol=1e-5, atol=1e-6)
    tokens = x.flatten(2).transpose(1, 2)
    np.testing.assert_array_equal(pool_patches(tokens, 4, "max").numpy(),
                                  F.adaptive_max_pool2d(x, 4).flatten(2).transpose(1, 2).numpy())


def test_cross_attention_is_the_blocks_attention_when_queries_are_the_tokens():
    """Splitting timm's fused qkv and its scale: attending from the tokens to themselves is the
    block's own attention."""
    import timm

    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY).eval()
    block = vit.blocks[1]
    x = torch.randn(2, 17, TINY["embed_dim"])
    with torch.no_grad():
        np.testing.assert_allclose(cross_attention(block, x, x).numpy(), block.attn(block.norm1(x)).numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_semantic_token_model_keeps_the_parameter_names():
    import timm

    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY)
    names = [n for n, _ in vit.named_parameters()]
    stvit = SemanticTokenViT(vit, SemanticTokenConfig(tokens=4, layer=1))
    assert [n for n, _ in stvit.named_parameters()] == names
    out = stvit(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 10)


@pytest.mark.slow
@pytest.mark.parametrize("pooling,tokens,lowering", [("max", 9, "reference"), ("avg", 4, "ort-mha")])
def test_compile_with_semantic_tokens_passes_the_gate(tmp_path, pooling, tokens, lowering):
    """4x4 grid pooled to 3x3 (overlapping adaptive bins) or 2x2: the compile passes the gate, every
    later block runs on the tokens, and no TokenCluster node is left for ONNX Runtime. (The artifact
    is compared with SemanticTokenViT in the test itself in tests/test_parity.py.)"""
    options = CompileOptions(model_kwargs=dict(TINY), semantic_tokens=SemanticTokenConfig(tokens, layer=1, pooling=pooling),
                             token_lowering=lowering, measure_rounds=0, seed=0)
    manifest = compile("timm:deit_tiny_patch16_224", tmp_path / "out", options)
    assert manifest["parity"]["reference"] == "torch (semantic tokens)"
    tokens_per_block = [b["tokens"] for b in manifest["structure"]["blocks"]]
    assert tokens_per_block == [17, 1 + tokens, 1 + tokens, 1 + tokens]
    model = ir.load(tmp_path / "out" / "model.onnx")
    assert not token_cluster_nodes(model) and "deploycomp" not in model.opset_imports
    mha = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert len(mha) == (2 if lowering == "ort-mha" else 0)
    assert manifest["totals"]["gflops_per_image"] < 0.9 * _unrewritten_gflops()


def _unrewritten_gflops() -> float:
    from deploycomp.frontend.export import export_to_onnx
    from deploycomp.ir.shapes import matmul_flops
    import timm

    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY).eval()
    return matmul_flops(export_to_onnx(vit, (1, 3, 64, 64), 18)) / 1e9


@pytest.mark.slow
def test_refusals(tmp_path):
    with pytest.raises(DeployCompError, match="square"):
        SemanticTokenConfig(tokens=10)
    with pytest.raises(DeployCompError, match="pooling"):
        SemanticTokenConfig(pooling="median")
    opts = CompileOptions(model_kwargs=dict(TINY), semantic_tokens=SemanticTokenConfig(4, layer=3), measure_rounds=0)
    with pytest.raises(DeployCompError, match="generator needs blocks"):
        compile("timm:deit_tiny_patch16_224", tmp_path / "a", opts)
    swin = {"img_size": 64, "window_size": 4, "embed_dim": 24, "depths": (2, 2), "num_heads": (2, 2), "num_classes": 10}
    opts = CompileOptions(model_kwargs=swin, semantic_tokens=SemanticTokenConfig(25), measure_rounds=0)
    with pytest.raises(DeployCompError, match="cannot pool a 4x4 window"):  # Swin: tokens per window (test_tokens_swin.py)
        compile("timm:swin_tiny_patch4_window7_224", tmp_path / "b", opts)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_semantic_tokens(tmp_path):
    r = cli("compile", "timm:deit_tiny_patch16_224", *TINY_ARGS, "--semantic-tokens", "4", "--token-layer", "1",
            "--no-measure", "-q", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    r = cli("compile", "timm:deit_tiny_patch16_224", *TINY_ARGS, "--semantic-tokens", "5", "-o", tmp_path / "bad")
    assert r.returncode == 2 and "square" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # a token + pruning compile (~5.5 s)
def test_semantic_tokens_with_pruning_share_one_budget(tmp_path, monkeypatch):
    """``--semantic-tokens`` with ``--latency``: the budget is relative to the unrewritten source, and
    pruning measures the token graph (pruned + rewritten) at every step. On the MLP-only table the
    source (4 blocks, MLP 128) predicts 0.4 + 4 x (0.12 + 1.28) = 6.0 ms; a generator block
    (cross-attention of 5 queries) costs the table's cross-attention part (0.12 ms on this table, at
    any heads). Timing is simulated by the same formula (no live measurement)."""
    import onnx

    from deploycomp.ir.discover import discover
    from deploycomp.pruning.schedule import PruneConfig

    from .synthetic_tables import SimulatedDevice, mlp_only, write_synthetic_table

    write_synthetic_table(tmp_path / "tables", mlp_only)
    device = SimulatedDevice(mlp_only).install(monkeypatch)
    tiny = {**TINY, "embed_dim": 32, "num_heads": 2}
    prune = PruneConfig(latency="0.9x", steps=2, saliency_batches=2, batch_size=8, budget_rounds=1, kinds=("mlp",),
                        group_sizes={"emb": 8, "heads": 1, "qk": 4, "v": 4, "mlp": 16})
    options = CompileOptions(target="ort-cpu", model_kwargs=tiny, prune=prune, tables=str(tmp_path / "tables"), measure_rounds=1, seed=0,
                             semantic_tokens=SemanticTokenConfig(4, layer=1))
    manifest = compile("timm:deit_tiny_patch16_224", tmp_path / "out", options)
    p = manifest["pruning"]
    assert p["rewrites"] == ["semantic_tokens", "lower_token_cluster"] and manifest["semantic_tokens"]["tokens_after"] == 5
    assert [b["tokens"] for b in manifest["structure"]["blocks"]] == [17, 5, 5, 5]
    assert p["baseline_predicted_ms"] == pytest.approx(6.0, rel=1e-9)  # the source, not the token model
    assert p["target_ms"] == pytest.approx(5.4, rel=1e-9) and p["predicted_ms"] <= p["target_ms"]
    generator = 2 * 0.12  # the cross-attention part, times self-attention at its heads over the widest (1 here)
    mlp = sum(b["mlp_dim"] for b in manifest["structure"]["blocks"])
    assert mlp < 512 and p["predicted_ms"] == pytest.approx(0.4 + 2 * 0.12 + generator + 0.01 * mlp, rel=1e-9)
    assert len(p["budget_checks"]) == prune.steps and len(device.timed) == prune.steps + 1
    for graph in device.timed:  # every measured graph is the rewritten one
        structure = discover(ir.serde.deserialize_model(onnx.load_from_string(graph)))
        assert [b.tokens for b in structure.blocks] == [17, 5, 5, 5]


@pytest.mark.slow
def test_semantic_tokens_finetune_with_distillation(tmp_path):
    """``--semantic-tokens`` with ``--finetune-epochs`` and data: the token model is fine-tuned with
    distillation from the unrewritten model, then written into the graph and verified; accuracy is
    reported against the unrewritten model. The fine-tuning is shown to have trained: the artifact
    is no longer SemanticTokenViT of the source's weights (a no-op fine-tune leaves exactly that)."""
    from deploycomp.frontend.timm_models import build_timm_model

    from .models import images, rel, run_artifact, save_weights, torch_out

    torch.manual_seed(2)
    source = build_timm_model("deit_fmnist_patch4_28").eval()
    weights = save_weights(source, tmp_path / "w.safetensors")
    config = SemanticTokenConfig(4)
    options = CompileOptions(weights=weights, data="fashion-mnist", eval_samples=256, train_samples=256,
                             token_finetune_epochs=1, semantic_tokens=config, measure_rounds=0, seed=0)
    manifest = compile("timm:deit_fmnist_patch4_28", tmp_path / "out", options)
    t = manifest["semantic_tokens"]
    assert t["generator_blocks"] == [2, 3] and t["tokens_before"] == 50 and t["tokens_after"] == 5
    assert len(t["finetune"]) == 1 and "test_accuracy" in t["finetune"][0]
    assert manifest["accuracy"]["reference"] == "torch (unrewritten)" and manifest["accuracy"]["samples"] == 256
    x = images(5, {"img_size": 28, "in_chans": 1})
    untrained = SemanticTokenViT(source, config.resolved(6)).eval()
    moved = rel(run_artifact(tmp_path / "out", x), torch_out(untrained, x))
    assert moved > 1e-3, f"the token model did not train (artifact = the untrained rewrite, rel {moved:.2g})"
    with pytest.raises(DeployCompError, match="needs training data"):
        compile("timm:deit_fmnist_patch4_28", tmp_path / "bad",
                CompileOptions(token_finetune_epochs=1, semantic_tokens=SemanticTokenConfig(4), measure_rounds=0))


@pytest.mark.slow
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_inspect_reads_every_block_of_a_token_artifact(tmp_path, lowering):
    """Discovery reads the generator blocks (decomposed, or fused into one node) as cross-attention:
    no block goes missing, and what inspect reports equals what compile recorded."""
    import deploycomp

    options = CompileOptions(model_kwargs={**TINY, "depth": 6}, semantic_tokens=SemanticTokenConfig(4),
                             token_lowering=lowering, measure_rounds=0, seed=0)
    manifest = compile("timm:deit_tiny_patch16_224", tmp_path / "out", options)
    blocks = deploycomp.inspect(tmp_path / "out").blocks
    assert [(b.tokens, b.keys) for b in blocks] == [(17, 0), (17, 0), (5, 17), (5, 22), (5, 0), (5, 0)]
    assert [(b["tokens"], b["keys"], b["gflops"]) for b in manifest["structure"]["blocks"]] == \
        [(b.tokens, b.keys, round(b.flops() / 1e9, 4)) for b in blocks]
    with pytest.raises(DeployCompError, match="already"):
        from deploycomp.passes.base import CompileContext, Pipeline
        from deploycomp.passes.cleanup import CleanupPass
        from deploycomp.passes.discover import DiscoverPass
        from deploycomp.tokens.rewrite import rewrite_semantic_tokens

        model = ir.load(tmp_path / "out" / "model.onnx")
        ctx = CompileContext()
        Pipeline([CleanupPass(), DiscoverPass()])(model, ctx)
        rewrite_semantic_tokens(model, ctx.structure, SemanticTokenConfig(4, layer=2))
