"""Sources: Hugging Face directories and configs, open_clip towers and timm's registry, each converted
into timm's VisionTransformer and checked against the original library's own module (tiny configs
built with the real libraries)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import deploycomp
from deploycomp.errors import DeployCompError
from deploycomp.frontend import check_source_spec, load_source
from deploycomp.frontend.timm_models import live_timm_spec, timm_spec

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

TINY_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=32,
               patch_size=8, num_labels=5)
HF_CASES = {  # architecture -> (config class, extra config, output field)
    "ViTModel": ("ViTConfig", {}, "cls"),
    "ViTForImageClassification": ("ViTConfig", {"hidden_act": "gelu_new"}, "logits"),
    "DeiTModel": ("DeiTConfig", {}, "cls"),
    "DeiTForImageClassification": ("DeiTConfig", {}, "logits"),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", {}, "logits"),
    "CLIPVisionModel": ("CLIPVisionConfig", {}, "pooler_output"),
    "CLIPVisionModelWithProjection": ("CLIPVisionConfig", {"projection_dim": 12}, "image_embeds"),
}


def _perturbed(module, seed: int = 0):
    """Non-trivial norms, biases and tokens, so that a wrongly mapped tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def _hf_model(arch: str, seed: int = 0):
    config_cls, extra, _ = HF_CASES[arch]
    torch.manual_seed(seed)
    return _perturbed(getattr(transformers, arch)(getattr(transformers, config_cls)(**TINY_HF, **extra)), seed)


def _hf_output(model, arch: str, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    field = HF_CASES[arch][2]
    return out.last_hidden_state[:, 0] if field == "cls" else getattr(out, field)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _images(n: int = 3, shape=(3, 32, 32), seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


@pytest.mark.parametrize("arch", [a if a == "ViTForImageClassification"
                                  else pytest.param(a, marks=pytest.mark.slow) for a in HF_CASES])  # ~2 s each
def test_hf_dir_converts_to_timm_and_matches_transformers(tmp_path, arch):
    """hf:DIR: the converted timm module and its ONNX export reproduce transformers' own module."""
    from timm.models.vision_transformer import VisionTransformer

    model = _hf_model(arch)
    model.save_pretrained(tmp_path)
    src = load_source(f"hf:{tmp_path}")
    assert isinstance(src.torch_module, VisionTransformer)
    assert src.input_shape == (1, 3, 32, 32) and src.family in ("hf-vit", "hf-deit", "hf-clip")
    x = _images()
    with torch.no_grad():
        want = _hf_output(model, arch, torch.from_numpy(x)).numpy()
        got = src.torch_module(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-5
    assert _rel(src.reference(x), want) < 1e-6  # the reference is transformers' module itself
    from tests.conftest import run_ort

    assert _rel(run_ort(src.model, x), want) < 1e-4
    assert src.meta["output"] == ("logits" if "Classification" in arch else "embedding")


@pytest.mark.slow  # (~2.3 s)
def test_hf_clip_model_dir_gives_its_image_tower(tmp_path):
    """A whole CLIPModel directory is read as CLIPVisionModelWithProjection (image embeddings)."""
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    config = transformers.CLIPConfig(text_config=text, vision_config={k: v for k, v in TINY_HF.items() if k != "num_labels"},
                                     projection_dim=12)
    torch.manual_seed(0)
    model = _perturbed(transformers.CLIPModel(config))
    model.save_pretrained(tmp_path)
    src = load_source(f"hf:{tmp_path}")
    x = _images()
    with torch.no_grad():
        want = model.get_image_features(pixel_values=torch.from_numpy(x))
        want = getattr(want, "pooler_output", want).numpy()
    assert _rel(src.torch_module(torch.from_numpy(x)).detach().numpy(), want) < 1e-5


def test_timm_random_init_is_the_same_on_every_load():
    """A random-init timm source is seeded (as hf-config and open_clip are): the same command gives
    the same weights, so its int8 gate and its numbers reproduce (unseeded, one tiny DeiT's int8
    top-1 agreement read 0.875, 1.0 and 0.969 on three loads)."""
    torch.manual_seed(1234)  # whatever the global state was
    first = load_source("timm:deit_tiny_patch16_224", model_kwargs={"depth": 1, "img_size": 32, "patch_size": 16})
    torch.rand(7)
    second = load_source("timm:deit_tiny_patch16_224", model_kwargs={"depth": 1, "img_size": 32, "patch_size": 16})
    a, b = first.torch_module.state_dict(), second.torch_module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # ~1.5-2.5 s each
@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_hf_config_random_init(tmp_path, kind):
    if kind == "vit":
        config = transformers.ViTConfig(**TINY_HF, architectures=["ViTForImageClassification"])
    else:  # a whole CLIPModel config: its image tower with the model's projection width
        text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50,
                    eos_token_id=2)
        vision = {k: v for k, v in TINY_HF.items() if k != "num_labels"}
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=5,
                                         architectures=["CLIPModel"])
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    src = load_source(f"hf-config:{path}")
    assert src.meta["weights"] == "random-init"
    assert src.meta["output"] == ("logits" if kind == "vit" else "embedding")
    x = _images()
    assert src.reference(x).shape == (3, 5)
    assert _rel(src.torch_module(torch.from_numpy(x)).detach().numpy(), src.reference(x)) < 1e-5


def test_conversion_check_refuses_a_wrong_mapping(monkeypatch):
    """The load-time numerical check catches a converter that maps a tensor wrongly (k and v swapped)."""
    from deploycomp.frontend import hf

    real = hf._qkv

    def swapped(attn, q, k, v, prefix, state):
        real(attn, q, v, k, prefix, state)

    monkeypatch.setattr(hf, "_qkv", swapped)
    with pytest.raises(DeployCompError, match="does not reproduce the source"):
        hf.convert_hf_module(_hf_model("ViTForImageClassification"), "ViTForImageClassification", {})


def test_hf_checkpoint_with_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_model("ViTForImageClassification").save_pretrained(tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    state = load_file(str(weights))
    del state["classifier.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(DeployCompError, match="does not fit ViTForImageClassification: missing keys"):
        load_source(f"hf:{tmp_path}")


def test_hf_refusals_are_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "beit", "architectures": ["BeitModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(DeployCompError, match="'BeitModel' is not a supported ViT"):
        load_source(f"hf:{tmp_path}")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(DeployCompError, match="no .safetensors weights"):
        load_source(f"hf:{tmp_path}")
    with pytest.raises(DeployCompError, match="no config.json"):
        load_source(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(DeployCompError, match="--weights does not apply"):
        check_source_spec(f"hf:{tmp_path}", weights="w.safetensors")


def test_missing_optional_package_is_one_clear_error(tmp_path, monkeypatch):
    _hf_model("ViTModel").save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(DeployCompError, match=r"pip install 'deploycomp\[hf\]'"):
        load_source(f"hf:{tmp_path}")
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(DeployCompError, match=r"pip install 'deploycomp\[clip\]'"):
        load_source("open_clip:ViT-B-16")


OPEN_CLIP_TINY = {  # arch -> vision_cfg overrides (and quick_gelu)
    "dc-tiny-tok": ({}, False),
    "dc-tiny-quickgelu": ({}, True),
    "dc-tiny-ls-avg": ({"ls_init_value": 0.1, "pool_type": "avg", "final_ln_after_pool": True}, False),
}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """Register tiny open_clip architectures (open_clip's own config mechanism)."""
    d = tmp_path_factory.mktemp("open_clip_cfg")
    for name, (vision, quick) in OPEN_CLIP_TINY.items():
        cfg = {"embed_dim": 12, "quick_gelu": quick,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8,
                              "mlp_ratio": 1.5, **vision},
               "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}
        (d / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return d


@pytest.mark.slow  # ~2 s each; open_clip's conversion stays quick in test_each_family_compiles_verified
@pytest.mark.parametrize("arch", list(OPEN_CLIP_TINY))
def test_open_clip_weights_convert_and_match(tiny_open_clip, tmp_path, arch):
    """open_clip:<arch> --weights (a whole CLIP state dict): the image tower, converted, matches open_clip."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = _perturbed(open_clip.create_model(arch, pretrained=None))
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    src = load_source(f"open_clip:{arch}", weights=path)
    x = _images()
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(x)).numpy()
        got = src.torch_module(torch.from_numpy(x)).numpy()
    assert want.shape == (3, 12)
    assert _rel(got, want) < 1e-5
    assert _rel(src.reference(x), want) < 1e-6
    if OPEN_CLIP_TINY[arch][0].get("ls_init_value"):
        assert src.torch_module.blocks[0].ls1.gamma.abs().max() > 0.15  # the gammas were copied, not left at init


@pytest.mark.slow  # (~2 s)
def test_open_clip_openai_style_state_dict(tiny_open_clip, tmp_path):
    """An OpenAI CLIP state dict (visual.* keys next to the text tower's, plus metadata scalars),
    read weights-only from a .pt file."""
    torch.manual_seed(2)
    model = _perturbed(open_clip.create_model("dc-tiny-quickgelu", pretrained=None))
    state = {**model.state_dict(), "input_resolution": torch.tensor(32)}
    torch.save(state, tmp_path / "openai.pt")
    src = load_source("open_clip:dc-tiny-quickgelu", weights=tmp_path / "openai.pt")
    x = _images()
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(x)).numpy()
    assert _rel(src.torch_module(torch.from_numpy(x)).detach().numpy(), want) < 1e-5


def test_open_clip_refusals(tiny_open_clip, tmp_path):
    with pytest.raises(DeployCompError, match="unknown open_clip architecture 'nope'"):
        load_source("open_clip:nope")
    with pytest.raises(DeployCompError, match="timm image tower"):
        load_source("open_clip:ViT-B-16-SigLIP")
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(DeployCompError, match="does not fit VisionTransformer: missing keys"):
        load_source("open_clip:dc-tiny-tok", weights=tmp_path / "bad.pt")


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_base_patch16_clip_quickgelu_224",
                                  "vit_base_patch16_reg4_gap_256", "vit_small_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "vit_base_patch16_gap_224"])
def test_timm_registry_accepts_vit_family(name):
    spec = timm_spec(name)
    assert spec.name == name and spec.family in ("vit", "deit")


@pytest.mark.parametrize("name,reason", [
    ("vit_base_patch16_siglip_224", "attention-pooling head"),
    ("vit_base_patch16_rpn_224", "ResPostBlock"),
    ("vit_small_patch16_18x2_224", "ParallelThingsBlock"),
    ("vit_giant_patch14_dinov2", "GluMlp|SwiGLU"),
    ("resnet18", "not a ViT or Swin"),
    ("no_such_model", "not in timm's registry"),
])
@pytest.mark.parametrize("spec_of", [timm_spec, live_timm_spec], ids=["snapshot", "live"])
def test_timm_registry_refuses_what_it_cannot_express(name, reason, spec_of):
    with pytest.raises(DeployCompError, match=reason):
        spec_of(name)


def test_the_timm_registry_snapshot_is_current_and_agrees_with_timm(monkeypatch):
    """The committed verdicts are for the installed timm and the current checks, cover every name
    timm registers in the modules read, and agree with the live check on a sample; a stale snapshot
    is ignored. If this fails after a change of ``unsupported_part``, re-run
    ``scripts/snapshot_timm_registry.py`` (also after a timm upgrade, or refusals are slow again)."""
    import random
    from importlib import metadata

    import timm

    from deploycomp.frontend import timm_models as tm

    snap = json.loads(tm.SNAPSHOT.read_text())
    assert snap["checks"] == tm.checks_version()
    # timm is not pinned: installed elsewhere at another version, the snapshot must be ignored
    # (the end of this test), and its names are compared only for the version it was written for
    assert snap["timm"] == metadata.version("timm") or tm.registry_snapshot() == {}
    if snap["timm"] != metadata.version("timm"):
        return
    assert sorted(snap["models"]) == sorted({n for m in tm.TIMM_MODULES if not m.startswith("proxy")
                                             for n in timm.list_models(module=m)})
    refused = sorted(n for n, v in snap["models"].items() if "refusal" in v)
    accepted = sorted(n for n, v in snap["models"].items() if "spec" in v)
    assert len(refused) > 10 and len(accepted) > 10
    rng = random.Random(0)
    for name in rng.sample(refused, 6) + rng.sample(accepted, 6) + ["vit_base_patch16_siglip_224"]:
        assert tm.live_verdict(name) == json.loads(json.dumps(snap["models"][name])), name
    tm.registry_snapshot.cache_clear()
    monkeypatch.setattr(tm.metadata, "version", lambda package: "0.0.0")
    try:
        assert tm.registry_snapshot() == {}  # another timm: every name is checked live
    finally:
        tm.registry_snapshot.cache_clear()


def test_an_unsupported_timm_name_is_refused_without_importing_timm(tmp_path):
    """From the snapshot: one error line, exit 2, nothing written, and neither timm nor torch was
    imported (importing timm alone takes ~3 s)."""
    import subprocess

    code = ("import sys\nfrom deploycomp.cli import main\n"
            f"sys.argv = ['deploycomp', 'compile', 'timm:vit_base_patch16_siglip_224', '-o', {str(tmp_path / 'out')!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    print('exit', exc.code, 'timm' in sys.modules, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    from deploycomp.frontend.timm_models import registry_snapshot

    live = str(not registry_snapshot())  # a snapshot for another timm version: checked live, importing timm
    assert r.stdout.split() == ["exit", "2", live, live], (r.stdout, r.stderr)
    assert len(lines) == 1 and "attention-pooling head" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_timm_overrides_are_checked_before_building():
    with pytest.raises(DeployCompError, match="q/k norms"):
        load_source("timm:vit_small_patch16_224", model_kwargs={"qk_norm": True, "depth": 1})


TIMM_TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


@pytest.mark.parametrize("source", [  # a compile each (~2-3 s): open_clip in the quick tier
    *(pytest.param(f"hf:{n}", marks=pytest.mark.slow) for n in ("ViTForImageClassification",
                                                                 "CLIPVisionModelWithProjection")),
    "open_clip:dc-tiny-ls-avg", *(pytest.param(f"timm:{n}", marks=pytest.mark.slow) for n in (
        "deit3_small_patch16_224", "vit_base_patch16_reg4_gap_256", "vit_base_patch16_clip_quickgelu_224")),
])
def test_each_family_compiles_verified(tiny_open_clip, tmp_path, source):
    """compile end to end: the artifact reproduces the source library's module (verify pass) and
    the manifest names the family and the conversion."""
    kind, _, name = source.partition(":")
    kwargs = None
    if kind == "hf":
        _hf_model(name).save_pretrained(tmp_path / "hf")
        source = f"hf:{tmp_path / 'hf'}"
    elif kind == "timm":
        kwargs = TIMM_TINY
    m = deploycomp.compile(source, tmp_path / "out",
                           deploycomp.CompileOptions(threads=2, measure_rounds=0, model_kwargs=kwargs))
    assert all(c["rel_l2"] < 1e-4 for c in m["parity"]["checks"])
    assert [b["heads"] for b in m["structure"]["blocks"]] == [2, 2]
    if kind != "timm":
        assert m["source"]["conversion_rel_l2"] < 1e-4 and m["source"]["family"] in ("hf-vit", "hf-clip", "open_clip")
    if m["source"].get("output") == "embedding":  # CLIP towers: verified by cosine to the source embedding too
        assert all(0.9999 <= c["cosine_min"] <= 1 + 1e-9 for c in m["parity"]["checks"])
        assert "(cosine >= " in (tmp_path / "out" / "report.md").read_text()


def test_cosine_similarity_per_sample():
    from deploycomp.passes.verify import cosine_similarity

    e = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]], np.float32)
    a = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [-1.0, -1.0, 0.0]], np.float32)
    np.testing.assert_allclose(cosine_similarity(a, e), [1.0, 0.0, -1.0], atol=1e-12)


@pytest.mark.parametrize("flags", [{"prune": "0.5x"}, {"semantic_tokens": 4}])
def test_methods_on_a_corrupt_onnx_file_are_refused_before_the_table(tmp_path, monkeypatch, flags):
    """--latency / --semantic-tokens on a bare .onnx build its torch twin while loading
    (tests/test_onnx_twin.py); a file that is not ONNX is one line, before the latency table."""
    import deploycomp.api
    from deploycomp.tokens.stvit import SemanticTokenConfig

    def must_not_run(*a, **k):
        raise AssertionError("the latency table was loaded before the source was checked")

    monkeypatch.setattr(deploycomp.api, "_latency_tables", must_not_run)
    (tmp_path / "m.onnx").write_bytes(b"not read")
    from deploycomp.pruning.schedule import PruneConfig

    opts = {"prune": PruneConfig(flags["prune"]) if "prune" in flags else None,
            "semantic_tokens": SemanticTokenConfig(flags["semantic_tokens"]) if "semantic_tokens" in flags else None}
    with pytest.raises(DeployCompError, match="not a valid ONNX model"):
        deploycomp.compile(str(tmp_path / "m.onnx"), tmp_path / "out", deploycomp.CompileOptions(**opts))
    assert not (tmp_path / "out").exists()


def test_exported_conv_without_bias_has_no_computed_bias():
    """A pre-norm (CLIP) patch embedding has no bias; the export must not carry the exporter's
    computed zero bias, which would become a tensor with no torch parameter behind it."""
    import timm

    from deploycomp.frontend.export import export_to_onnx

    module = timm.create_model("vit_base_patch16_clip_224", **TIMM_TINY).eval()
    model = export_to_onnx(module, (1, 3, 32, 32))
    (conv,) = [n for n in model.graph if n.op_type == "Conv"]
    assert len(conv.inputs) == 2


@pytest.mark.slow  # ~23 s per source on 2 cores (a prune and a token compile each)
@pytest.mark.parametrize("source", ["hf:CLIPVisionModelWithProjection", "open_clip:dc-probe-ls"])
def test_converted_sources_prune_and_tokenize(tiny_open_clip, tiny_tables, tmp_path, source, monkeypatch):
    """--latency and --semantic-tokens run on converted sources (pre-norm, projection head, layer
    scale), and the artifacts verify against the torch models they were trained from. The on-device
    budget checks time the converted graphs on a simulated device (the tiny table's formula), so
    how far pruning goes does not depend on the machine's load."""
    from deploycomp.pruning.schedule import PruneConfig
    from deploycomp.tokens.stvit import SemanticTokenConfig

    from .synthetic_tables import SimulatedDevice, mlp_only

    device = SimulatedDevice(mlp_only).install(monkeypatch)

    kind, _, name = source.partition(":")
    if kind == "hf":
        torch.manual_seed(0)
        config = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=128, image_size=64, patch_size=16, projection_dim=10)
        _perturbed(transformers.CLIPVisionModelWithProjection(config)).save_pretrained(tmp_path / "hf")
        source = f"hf:{tmp_path / 'hf'}"
    else:
        cfg = {"embed_dim": 10, "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16,
                                               "patch_size": 16, "ls_init_value": 0.1},
               "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}
        (tiny_open_clip / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(tiny_open_clip / f"{name}.json")
    pruned = deploycomp.compile(source, tmp_path / "pruned", deploycomp.CompileOptions(
        target="ort-cpu", prune=PruneConfig("0.7x"), tables=str(tiny_tables), measure_rounds=1,
        calibrate_rounds=0))
    assert device.timed  # the budget was checked on the (simulated) device
    before = 2 * (2 * 16 * 2 + 16 * 2 + 128)  # heads x (qk + v) x dims + mlp, summed over the blocks
    after = sum(b["heads"] * (b["qk_dim"] + b["v_dim"]) + b["mlp_dim"] for b in pruned["structure"]["blocks"])
    assert after < before
    assert all(c["rel_l2"] < 1e-4 and c["cosine_min"] > 0.9999 for c in pruned["parity"]["checks"])
    tokens = deploycomp.compile(source, tmp_path / "tokens", deploycomp.CompileOptions(
        semantic_tokens=SemanticTokenConfig(4, layer=0), measure_rounds=0))
    assert any(b["keys"] for b in tokens["structure"]["blocks"])
    assert all(c["rel_l2"] < 1e-4 for c in tokens["parity"]["checks"])


def test_cli_refuses_methods_on_a_missing_onnx_before_importing_torch(tmp_path):
    """The CLI checks the request first: one error line, exit 2, and torch was never imported."""
    import subprocess

    code = ("import sys\nfrom deploycomp.cli import main\n"
            f"sys.argv = ['deploycomp', 'compile', {str(tmp_path / 'm.onnx')!r}, '--latency', '0.5x', "
            f"'-o', {str(tmp_path / 'out')!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    print('exit', exc.code, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.stdout.split() == ["exit", "2", "False"], (r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: model file not found"), r.stderr
    assert not (tmp_path / "out").exists()


def test_token_rewrite_limits_are_refused_before_loading_a_timm_model(tmp_path, monkeypatch):
    """A timm model whose head the token rewrite does not cover (a distilled DeiT's two heads) cannot
    take semantic tokens: refused from the meta-device model, before any weights are built or exported.
    (Registers and GAP heads are covered: tests/test_embeddings.py.)"""
    import deploycomp.frontend as frontend
    from deploycomp.tokens.stvit import SemanticTokenConfig

    def must_not_load(*a, **k):
        raise AssertionError("the model was built before the request was checked")

    monkeypatch.setattr(frontend, "load_source", must_not_load)
    with pytest.raises(DeployCompError, match="distilled DeiT's two heads"):
        deploycomp.compile("timm:deit_tiny_distilled_patch16_224", tmp_path / "out",
                           deploycomp.CompileOptions(semantic_tokens=SemanticTokenConfig(4), model_kwargs=TIMM_TINY))
