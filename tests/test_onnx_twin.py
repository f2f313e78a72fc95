"""Bare ONNX ViTs: the torch twin built from the graph (frontend/onnx_twin.py), and pruning and
semantic tokens on graphs exported from models the compiler has never seen.

Every model here is built by its own library (timm with non-default dims, transformers, open_clip,
a FlexViT with per-block dims) and exported by torch's exporters; the compiler sees only the
``.onnx`` file. The twin is checked against the library's module (an independent reference) as
well as against the graph, and the compiled artifacts against torch models the tests build
themselves from the library's weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import deploycomp
from deploycomp.errors import DeployCompError
from deploycomp.frontend import load_source

from .conftest import export, run_ort
from .synthetic_tables import ALPHA, SimulatedDevice, mlp_only, write_synthetic_table
from .test_gate import run_cli

transformers = pytest.importorskip("transformers")

GAIN = 2.0  # weights of std GAIN / sqrt(fan-in): peaked attention, so a wrong q/k or scale shows


TOKEN_TENSORS = ("pos_embed", "cls_token", "reg_token", "position_embeddings", "class_embedding",
                 "positional_embedding", "position_embedding.weight", "distillation_token")


def peaked(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere: matrices of std GAIN/sqrt(fan-in) (attention scores of std ~4:
    at the libraries' init the softmax is nearly uniform and a wrong scale moves the output ~1e-4),
    norm scales around 1, biases, layer scales, tokens and position embeddings of std 0.2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            leaf = name.rpartition(".")[2]
            if name.endswith(TOKEN_TENSORS):
                p.copy_(0.2 * noise)
            elif p.dim() >= 2:
                p.copy_(noise * GAIN / float(np.sqrt(np.prod(p.shape[1:]))))
            elif leaf == "weight" and ("norm" in name or "ln_" in name):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return module.eval()


class Field(torch.nn.Module):
    """A transformers model as an image -> tensor function (what a user exports)."""

    def __init__(self, model, field: str):
        super().__init__()
        self.model, self.field = model, field

    def forward(self, x):
        return getattr(self.model(pixel_values=x), self.field)


def timm_vit(**overrides) -> torch.nn.Module:
    """A timm ViT with dims no preset has (48 wide, 3 heads of 16, MLP 144, 7 classes)."""
    import timm

    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=2, mlp_ratio=3.0, num_classes=7,
                  qkv_bias=False, init_values=0.5, no_embed_class=True, reg_tokens=2)
    return peaked(timm.create_model("vit_small_patch16_224", **{**kwargs, **overrides}))


def hf_vit(image: int = 32, patch: int = 8, hidden: int = 32, mlp: int = 48, layers: int = 2, labels: int = 5,
           act: str = "gelu_new") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                    intermediate_size=mlp, image_size=image, patch_size=patch, num_labels=labels,
                                    hidden_act=act)
    return Field(peaked(transformers.ViTForImageClassification(config)), "logits").eval()


def hf_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=40, image_size=32, patch_size=8, projection_dim=12)
    return Field(peaked(transformers.CLIPVisionModelWithProjection(config)), "image_embeds").eval()


def open_clip_tower() -> torch.nn.Module:
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    return peaked(open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2,
                                                          mlp_ratio=1.5, ls_init_value=0.1, output_dim=12))


def flexvit() -> torch.nn.Module:
    """Every block different, q/k narrower than v: separate q/k/v projections."""
    from deploycomp.latency.arch import BlockArch, ViTArch
    from deploycomp.latency.flexvit import FlexViT

    torch.manual_seed(0)
    blocks = (BlockArch(3, 8, 16, 40, tokens=17), BlockArch(1, 16, 8, 24, tokens=17), BlockArch(2, 8, 8, 64, tokens=17))
    return peaked(FlexViT(ViTArch(32, blocks, img_size=32, patch=8, in_chans=3, num_classes=6)))


MODELS = {"timm": timm_vit, "timm-gap": lambda: timm_vit(class_token=False, global_pool="avg", reg_tokens=4),
          "hf-vit": hf_vit, "hf-clip": hf_clip, "open_clip": open_clip_tower, "flexvit": flexvit}


def images(n: int, size: int = 32, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_out(module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module.eval()(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model kind, exporter) -> (path of the bare .onnx, the library's module)."""
    cache = {}

    def get(kind: str, exporter: str):
        if (kind, exporter) not in cache:
            module = MODELS[kind]()
            path = tmp_path_factory.mktemp(f"{kind}_{exporter}") / "model.onnx"
            export(module, (1, 3, 32, 32), exporter, path)
            cache[kind, exporter] = (path, module)
        return cache[kind, exporter]

    return get


CASES = [("timm", "torchscript"), ("hf-vit", "torchscript"),  # the dynamo exporter alone takes ~8 s per model
         *(pytest.param(k, e, marks=pytest.mark.slow) for k, e in
           [("timm", "dynamo"), ("timm-gap", "dynamo"), ("hf-vit", "dynamo"), ("hf-clip", "torchscript"),
            ("hf-clip", "dynamo"), ("open_clip", "dynamo"), ("open_clip", "torchscript"), ("flexvit", "dynamo")])]


@pytest.mark.parametrize("kind,exporter", CASES)
def test_twin_reproduces_the_graph_and_the_library(exported, kind, exporter):
    """The twin of a bare export computes what the library's module computes (and the graph), is a
    timm VisionTransformer, and every parameter is the graph initializer of its name."""
    from timm.models.vision_transformer import VisionTransformer

    from deploycomp.passes.cleanup import TRANSPOSED_FROM

    path, module = exported(kind, exporter)
    src = load_source(str(path), torch_twin=True)
    twin = src.torch_module
    assert isinstance(twin, VisionTransformer)
    x = images(3)
    want = torch_out(module, x)
    assert rel(torch_out(twin, x), want) < 1e-4
    assert rel(run_ort(path, x), want) < 1e-4
    assert src.meta["torch_twin"]["rel_l2"] < 1e-4 and src.reference_kind == "onnx"
    graph = src.model.graph
    for name, param in twin.named_parameters():
        value = graph.initializers[name]
        perm = value.metadata_props.get(TRANSPOSED_FROM)
        array = param.detach().numpy().T if perm == "1,0" else param.detach().numpy()
        np.testing.assert_array_equal(array, value.const_value.numpy())
    assert rel(run_ort(src.model, x), want) < 1e-4  # the renamed graph still computes the model


def test_twin_dims_per_block_and_scale(exported):
    """Heads, prefix tokens (cls + 2 registers), MLP width and the softmax scale the graph applies."""
    path, _ = exported("timm", "torchscript")
    src = load_source(str(path), torch_twin=True)
    scales = src.meta["torch_twin"]["softmax_scales"]
    assert scales == pytest.approx([16 ** -0.5] * 2, rel=1e-6)
    twin = src.torch_module
    assert [b.attn.num_heads for b in twin.blocks] == [3, 3] and twin.num_prefix_tokens == 3
    assert [b.mlp.fc1.out_features for b in twin.blocks] == [144, 144]


@pytest.mark.slow
def test_twin_of_a_non_uniform_vit(exported):
    path, module = exported("flexvit", "dynamo")
    twin = load_source(str(path), torch_twin=True).torch_module
    dims = [(b.attn.num_heads, b.attn.qk_dim, b.attn.v_dim, b.mlp.fc1.out_features) for b in twin.blocks]
    assert dims == [(3, 8, 16, 40), (1, 16, 8, 24), (2, 8, 8, 64)]


# ---- planted bugs: a twin that does not compute the graph is refused, not used -------------------

def swap_q_and_k(real):
    """Reading the attention: q and k swapped (the fused chunk order, or the separate projections)."""
    from dataclasses import replace

    def wrong(*args, **kwargs):
        spec, a = real(*args, **kwargs)
        if spec.qkv is not None:
            q, k, v = spec.chunk_order
            return replace(spec, chunk_order=(k, q, v)), a
        return replace(spec, q=spec.k, k=spec.q), a

    return wrong


def scale_off(real):
    """The probe reads the softmax scale 30 % too large."""

    def wrong(model, spec):
        real(model, spec)
        for b in spec.blocks:
            b.attn.scale *= 1.3

    return wrong


@pytest.mark.parametrize("bug", ["swap_q_and_k", "scale_off"])
@pytest.mark.parametrize("kind,exporter", [("timm", "torchscript"), ("hf-vit", "torchscript")])
def test_a_wrong_twin_is_refused(exported, monkeypatch, bug, kind, exporter):
    import deploycomp.frontend.onnx_twin as twin_module

    target = {"swap_q_and_k": "_read_attention", "scale_off": "probe"}[bug]
    monkeypatch.setattr(twin_module, target, {"swap_q_and_k": swap_q_and_k, "scale_off": scale_off}[bug](
        getattr(twin_module, target)))
    path, _ = exported(kind, exporter)
    with pytest.raises(DeployCompError, match="does not reproduce it") as info:
        load_source(str(path), torch_twin=True)
    assert len(str(info.value).splitlines()) == 1


# ---- pruning and semantic tokens on bare ONNX files ---------------------------------------------

SIZES = {"emb": 8, "heads": 1, "qk": 4, "v": 4, "mlp": 16}



def test_prune_to_budget_on_a_bare_hf_export(tmp_path, tiny_tables, monkeypatch):
    """A Hugging Face ViTForImageClassification exported by the TorchScript exporter (separate q/k/v,
    MLP 96 = 3x the width, 10 labels, the "tiny" table's geometry), pruned to 0.74x through its bare
    .onnx on the mlp_only table. Known answer: 0.3 + 0.1 + 2 x (0.12 + 96 ALPHA) = 2.56 ms
    unpruned, 0.64 + S ALPHA with S MLP channels kept; 0.74x allows S <= 125.4, so chunks of 16 stop
    at S = 112. The artifact passes the gate and equals the HF module with the removed MLP channels
    zeroed (GELU(0) = 0: zeroing a channel's fc1 row and bias removes it), built here."""
    from deploycomp.pruning.schedule import PruneConfig

    SimulatedDevice(mlp_only).install(monkeypatch)
    module = hf_vit(image=64, patch=16, hidden=32, mlp=96, labels=10, act="gelu")
    path = tmp_path / "vit.onnx"
    export(module, (1, 3, 64, 64), "torchscript", path)
    config = PruneConfig(latency="0.74x", steps=2, saliency_batches=2, batch_size=8, group_sizes=SIZES,
                         budget_rounds=0, kinds=("mlp",))
    manifest = deploycomp.compile(str(path), tmp_path / "out", deploycomp.CompileOptions(
        target="ort-cpu", prune=config, tables=str(tiny_tables), measure_rounds=0, seed=0))
    p = manifest["pruning"]
    assert p["baseline_predicted_ms"] == pytest.approx(0.64 + 192 * ALPHA, rel=1e-9)
    mlp = [b["mlp_dim"] for b in manifest["structure"]["blocks"]]
    assert sum(mlp) == 112 and all(d % 16 == 0 and d >= 32 for d in mlp)
    assert [(b["heads"], b["qk_dim"], b["v_dim"]) for b in manifest["structure"]["blocks"]] == [(2, 16, 16)] * 2
    assert manifest["parity"]["reference"] == "torch (pruned)"
    assert all(c["rel_l2"] < 1e-4 for c in manifest["parity"]["checks"])
    assert manifest["source"]["torch_twin"]["rel_l2"] < 1e-4 and manifest["source"]["family"] == "hf-vit"
    reference = copy.deepcopy(module)
    with torch.no_grad():
        for i, layer in enumerate(reference.model.vit.layers):
            gone = np.setdiff1d(np.arange(96), p["kept"][f"block{i}.mlp"])
            layer.mlp.fc1.weight[gone] = 0
            layer.mlp.fc1.bias[gone] = 0
    x = images(4, 64)
    assert rel(run_ort(tmp_path / "out" / "model.onnx", x), torch_out(reference, x)) < 1e-4


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_semantic_tokens_on_a_bare_timm_export(tmp_path, exporter):
    """A timm ViT with dims no preset has (48 wide, 3 heads, MLP 144, no q/k/v bias, layer scale),
    exported by torch.onnx.export: --semantic-tokens 4 through the bare .onnx; the artifact equals
    STViT's token model built here on the timm module itself. (The TorchScript exporter computes the
    softmax scale from Shape(q) at run time: the twin's probe folds it into a constant the rewrite reads.)"""
    from deploycomp.tokens.stvit import SemanticTokenConfig, SemanticTokenViT

    module = timm_vit(img_size=64, patch_size=16, depth=4, num_classes=10, no_embed_class=False, reg_tokens=0)
    path = tmp_path / "vit.onnx"
    export(module, (1, 3, 64, 64), exporter, path)
    config = SemanticTokenConfig(4, layer=1)
    manifest = deploycomp.compile(str(path), tmp_path / "out", deploycomp.CompileOptions(
        target="ort-cpu", semantic_tokens=config, measure_rounds=0, seed=0))
    assert [b["keys"] > 0 for b in manifest["structure"]["blocks"]] == [False, True, True, False]
    assert manifest["parity"]["reference"] == "torch (semantic tokens)"
    assert all(c["rel_l2"] < 1e-4 for c in manifest["parity"]["checks"])
    x = images(3, 64)
    want = torch_out(SemanticTokenViT(copy.deepcopy(module), config), x)
    assert rel(run_ort(tmp_path / "out" / "model.onnx", x), want) < 1e-4


def test_semantic_tokens_on_a_bare_hf_export(tmp_path):
    """Separate q/k/v projections (Hugging Face ViT, TorchScript exporter at opset 17, converted to
    the rewrites' opset 18): the generator's cross-attention reads the twin's own projections.
    Reference: STViT on the HF model converted to timm by frontend/hf.py (checked against
    transformers there), not on the twin."""
    from deploycomp.frontend.hf import convert_hf_module
    from deploycomp.tokens.stvit import SemanticTokenConfig, SemanticTokenViT

    module = hf_vit(image=64, patch=16, hidden=32, mlp=64, layers=4, labels=10, act="gelu")
    path = tmp_path / "vit.onnx"
    export(module, (1, 3, 64, 64), "torchscript", path)
    config = SemanticTokenConfig(4, layer=1)
    manifest = deploycomp.compile(str(path), tmp_path / "out", deploycomp.CompileOptions(
        target="ort-cpu", semantic_tokens=config, measure_rounds=0, seed=0))
    assert all(c["rel_l2"] < 1e-4 for c in manifest["parity"]["checks"])
    timm_module = convert_hf_module(module.model, "ViTForImageClassification", {}).module
    x = images(3, 64)
    want = torch_out(SemanticTokenViT(timm_module, config), x)
    assert rel(run_ort(tmp_path / "out" / "model.onnx", x), want) < 1e-4


# ---- what the twin cannot express: one line, before any slow stage -------------------------------

class Normalized(torch.nn.Module):
    """Image normalization inside the graph, before the patch embedding."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit((x - 0.5) / 0.25)


def post_norm_vit():
    from timm.models.vision_transformer import ResPostBlock

    return timm_vit(img_size=64, patch_size=16, embed_dim=32, num_heads=2, block_fn=ResPostBlock, num_classes=10,
                    init_values=None, no_embed_class=False, reg_tokens=0)


REFUSALS = {  # model, flags, what the one line names
    "post-norm": (post_norm_vit, ["--latency", "0.5x"], "post-norm"),
    "in-graph normalization": (lambda: Normalized(timm_vit(img_size=64, patch_size=16, embed_dim=32, num_heads=2,
                                                           num_classes=10)),
                               ["--semantic-tokens", "4", "--latency", "0.5x"], "in-graph normalization"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_inexpressible_graph_is_refused_before_slow_work(tmp_path, monkeypatch, capsys, case):
    """One ``error:`` line naming the node and what it is, exit 2, nothing written, and neither the
    latency table nor saliency was touched (the refusal comes while the source is loaded)."""
    import deploycomp.api
    import deploycomp.pruning.saliency

    make, flags, what = REFUSALS[case]
    path = tmp_path / "model.onnx"
    export(make(), (1, 3, 64, 64), "torchscript", path)
    touched = []

    def slow(name):
        def record(*args, **kwargs):
            touched.append(name)
            raise AssertionError(f"{name} ran before the refusal")

        return record

    monkeypatch.setattr(deploycomp.api, "_latency_tables", slow("latency table"))
    monkeypatch.setattr(deploycomp.pruning.saliency, "compute_saliency", slow("saliency"))
    write_synthetic_table(tmp_path / "tables", mlp_only)
    code, err = run_cli(monkeypatch, capsys, "compile", path, *flags, "--target", "ort-cpu", "--tables",
                        tmp_path / "tables", "--no-measure", "-q", "-o", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: the torch twin of this ONNX graph cannot express") and what in lines[0], err
    assert "at node '" in lines[0]
    assert not touched and not (tmp_path / "out").exists()


# ---- open_clip's nn.MultiheadAttention (tokens first): rebuilt in (batch, tokens, channels) --------

def open_clip_64(layers: int = 2) -> torch.nn.Module:
    """An open_clip tower at the "tiny" table's geometry: 64 px, patch 16, 32 wide, 2 heads of 16,
    MLP 128, layer scale, a 10-wide projection."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    return peaked(open_clip.transformer.VisionTransformer(image_size=64, patch_size=16, width=32, layers=layers, heads=2,
                                                          mlp_ratio=4.0, ls_init_value=0.1, output_dim=10))


@pytest.mark.slow
def test_prune_heads_on_a_bare_open_clip_export(tmp_path, monkeypatch):
    """open_clip's nn.MultiheadAttention runs tokens first ((N, B, C), heads flattened to 2-D for the
    output projection); the twin's reader rebuilds it in (batch, tokens, channels) with the same
    weights, so heads, QK and V prune like any ViT's. On the attention_heavy table at 0.6x the
    attention must shrink (H·(QK+V) from 64 to at most ~26 per block). The artifact equals open_clip's
    own module with the removed channels zeroed, built here: a removed head's v rows (its output
    is then zero), a removed QK dim's q rows in every head (the softmax scale is kept), a removed V
    dim's v rows, a removed MLP channel's c_fc row (QuickGELU/GELU(0) = 0)."""
    from deploycomp.pruning.schedule import PruneConfig

    from .synthetic_tables import attention_heavy

    SimulatedDevice(attention_heavy).install(monkeypatch)
    write_synthetic_table(tmp_path / "tables", attention_heavy)
    module = open_clip_64()
    path = tmp_path / "clip.onnx"
    export(module, (1, 3, 64, 64), "torchscript", path)
    config = PruneConfig(latency="0.6x", steps=2, saliency_batches=2, batch_size=8, group_sizes=SIZES,
                         budget_rounds=0, kinds=("heads", "qk", "v", "mlp"))
    manifest = deploycomp.compile(str(path), tmp_path / "out", deploycomp.CompileOptions(
        target="ort-cpu", prune=config, tables=str(tmp_path / "tables"), measure_rounds=0, seed=0))
    assert manifest["source"]["torch_twin"]["attention_rebuilt"] == [0, 1]
    blocks = manifest["structure"]["blocks"]
    assert sum(b["heads"] * (b["qk_dim"] + b["v_dim"]) for b in blocks) < 2 * 2 * 32
    assert all(c["rel_l2"] < 1e-4 for c in manifest["parity"]["checks"])
    kept = manifest["pruning"]["kept"]
    reference = copy.deepcopy(module)
    c, d = 32, 16
    with torch.no_grad():
        for i, block in enumerate(reference.transformer.resblocks):
            rows = {"q": [], "v": []}
            for h in np.setdiff1d(np.arange(2), kept[f"block{i}.heads"]):
                rows["v"] += [h * d + j for j in range(d)]
            for j in np.setdiff1d(np.arange(d), kept[f"block{i}.qk"]):
                rows["q"] += [h * d + j for h in range(2)]
            for j in np.setdiff1d(np.arange(d), kept[f"block{i}.v"]):
                rows["v"] += [h * d + j for h in range(2)]
            for role, offset in (("q", 0), ("v", 2 * c)):
                block.attn.in_proj_weight[[offset + r for r in rows[role]]] = 0
                block.attn.in_proj_bias[[offset + r for r in rows[role]]] = 0
            gone = np.setdiff1d(np.arange(128), kept[f"block{i}.mlp"])
            block.mlp.c_fc.weight[gone] = 0
            block.mlp.c_fc.bias[gone] = 0
    x = images(4, 64)
    assert rel(run_ort(tmp_path / "out" / "model.onnx", x), torch_out(reference, x)) < 1e-4


def test_semantic_tokens_on_a_bare_open_clip_export(tmp_path):
    """--semantic-tokens 4 through a bare open_clip export (tokens-first attention rebuilt by the
    twin's reader): the artifact equals STViT's token model built on the open_clip tower converted
    to timm by frontend/openclip.py (checked against open_clip there), not on the twin."""
    from deploycomp.frontend.openclip import convert_open_clip_visual
    from deploycomp.tokens.stvit import SemanticTokenConfig, SemanticTokenViT

    module = open_clip_64(layers=4)
    path = tmp_path / "clip.onnx"
    export(module, (1, 3, 64, 64), "torchscript", path)
    config = SemanticTokenConfig(4, layer=1)
    manifest = deploycomp.compile(str(path), tmp_path / "out", deploycomp.CompileOptions(
        target="ort-cpu", semantic_tokens=config, measure_rounds=0, seed=0))
    assert manifest["source"]["torch_twin"]["attention_rebuilt"] == [0, 1, 2, 3]
    assert all(c["rel_l2"] < 1e-4 for c in manifest["parity"]["checks"])
    want = torch_out(SemanticTokenViT(convert_open_clip_visual(copy.deepcopy(module)).module, config), images(3, 64))
    assert rel(run_ort(tmp_path / "out" / "model.onnx", images(3, 64)), want) < 1e-4
