"""Structure discovery on graphs from both exporters, checked numerically where possible."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

import deploycomp
from deploycomp.errors import NotAViTError
from deploycomp.ir.discover import discover
from deploycomp.passes.base import CompileContext
from deploycomp.passes.cleanup import CleanupPass

from .conftest import TINY_EXPECTED, export, input_shape, run_ort

# the Swin dynamo export (~5 s on 2 cores) runs in the slow tier only
CASES = [pytest.param(f, e, marks=pytest.mark.slow) if (f, e) == ("swin", "dynamo") else (f, e)
         for f in ("deit", "swin") for e in ("dynamo", "torchscript")]
# the coupled-slices check on Swin (~3 s) in the slow tier; the quick tier checks it on DeiT
COUPLED_CASES = [pytest.param(f, e, marks=pytest.mark.slow) if f == "swin" else (f, e)
                 for f in ("deit", "swin") for e in ("dynamo", "torchscript")]


def cleaned(path) -> ir.Model:
    model = ir.load(path)
    CleanupPass().run(model, CompileContext())
    return model


@pytest.mark.parametrize("family,exporter", CASES)
def test_block_table(exported, family, exporter):
    path, _ = exported(family, exporter)
    structure = deploycomp.inspect(path)
    got = [(b.stage, b.emb, b.heads, b.qk_dim, b.v_dim, b.mlp_dim, b.tokens, b.sequences) for b in structure.blocks]
    assert got == TINY_EXPECTED[family]
    assert structure.family == ("swin" if family == "swin" else "timm-vit")
    assert structure.stage_embs == sorted({row[1] for row in TINY_EXPECTED[family]})
    for kind in ("heads", "qk", "v", "mlp"):
        assert len(structure.groups(kind)) == len(got)
    assert len(structure.groups("emb")) == len(structure.stage_embs)


def test_emb_groups_cover_the_residual_stream_deit(exported):
    path, _ = exported("deit", "dynamo")
    s = discover(cleaned(path))
    tensors = {sl.tensor for sl in s.slices("stage0.emb")}
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight",
                "norm.bias", "head.weight"}
    for b in range(2):
        expected |= {f"blocks.{b}.{n}" for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                                 "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                                                 "mlp.fc1.weight", "mlp.fc2.weight", "mlp.fc2.bias")}
    assert tensors == expected


@pytest.mark.slow  # exports the tiny Swin with dynamo (~4 s)
def test_emb_groups_follow_swin_patch_merging(exported):
    path, _ = exported("swin", "dynamo")
    s = discover(cleaned(path))
    s0 = {sl.tensor: sl for sl in s.slices("stage0.emb")}
    s1 = {sl.tensor: sl for sl in s.slices("stage1.emb")}
    red = "layers.1.downsample.reduction.weight"
    # the merging LayerNorm and the reduction's input see 4 neighbours x 32 channels
    assert s0["layers.1.downsample.norm.weight"].unit_len == 4 and s0["layers.1.downsample.norm.weight"].inner_stride == 32
    assert s0[red].unit_len == 4 and red in s1 and s1[red].axis != s0[red].axis
    assert {"patch_embed.proj.weight", "patch_embed.norm.weight"} <= set(s0)
    assert {"norm.weight", "head.fc.weight", "layers.1.blocks.1.mlp.fc2.bias"} <= set(s1)
    assert not any(t.startswith("layers.1.blocks") for t in s0)
    # the relative position bias of every block is a head-coupled tensor
    for b in range(4):
        heads = s.blocks[b].heads
        shapes = [s.graph.nodes[f"tensor:{sl.tensor}"]["shape"] for sl in s.slices(f"block{b}.heads")]
        assert any(len(sh) >= 3 and sh[sl_axis] == heads for sh, sl_axis in
                   ((sh, sl.axis) for sh, sl in zip(shapes, s.slices(f"block{b}.heads")) if sl.unit_len == 1))


def _zeroed(model: ir.Model, slices, unit: int) -> ir.Model:
    """A copy of ``model`` with ``unit`` of the given slices set to zero."""
    proto = ir.serde.serialize_model(model)
    copy = ir.serde.deserialize_model(proto)
    for sl in slices:
        value = copy.graph.initializers[sl.tensor]
        arr = np.moveaxis(value.const_value.numpy().copy(), sl.axis, 0)
        arr[sl.indices(unit)] = 0
        value.const_value = ir.tensor(np.ascontiguousarray(np.moveaxis(arr, 0, sl.axis)), name=sl.tensor)
    return copy


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("family,exporter", COUPLED_CASES)
def test_coupled_slices_index_the_right_channels(exported, family, exporter):
    """Two different sets of coupled slices that must have the same effect do.

    Zeroing head h's v rows == zeroing head h's columns of the output projection; zeroing MLP unit
    i in fc1 (GELU(0) = 0) == zeroing it in fc2; zeroing QK channel j in q == zeroing it in k.
    A wrong offset or stride makes the two differ.
    """
    path, _ = exported(family, exporter)
    model = cleaned(path)
    s = discover(model)
    x = np.random.default_rng(1).standard_normal((2, *input_shape(family)[1:])).astype(np.float32)
    base = run_ort(model, x)
    last = s.blocks[-1]
    for b in (s.blocks[0], last):
        H, d = b.heads, b.qk_dim
        nodes = {n.name: n for n in model.graph}
        proj_weight = nodes[b.nodes["proj"]].inputs[1].name
        fc2_weight = nodes[b.nodes["fc2"]].inputs[1].name
        heads = s.slices(f"block{b.index}.heads")
        proj_w = [sl for sl in heads if sl.tensor == proj_weight]
        v_part = [sl for sl in heads if sl.offset == 2 * H * d]
        assert len(proj_w) == 1 and len(v_part) == 2  # weight and bias
        unit = H - 1
        a, c = run_ort(_zeroed(model, v_part, unit), x), run_ort(_zeroed(model, proj_w, unit), x)
        assert _rel(a, base) > 1e-4 and _rel(a, c) < 1e-5

        mlp = s.slices(f"block{b.index}.mlp")
        fc2 = [sl for sl in mlp if sl.tensor == fc2_weight]
        fc1 = [sl for sl in mlp if sl not in fc2]
        assert len(fc1) == 2 and len(fc2) == 1
        a, c = run_ort(_zeroed(model, fc1, 5), x), run_ort(_zeroed(model, fc2, 5), x)
        assert _rel(a, base) > 1e-6 and _rel(a, c) < 1e-5

        qk = s.slices(f"block{b.index}.qk")
        q_part = [sl for sl in qk if sl.offset == 0]
        k_part = [sl for sl in qk if sl.offset == H * d]
        a, c = run_ort(_zeroed(model, q_part, 3), x), run_ort(_zeroed(model, k_part, 3), x)
        assert _rel(a, base) > 1e-6 and _rel(a, c) < 1e-5


def _export_plain(module, shape, path):
    with torch.no_grad():
        torch.onnx.export(module.eval(), (torch.randn(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    return path


def test_cnn_is_not_a_vit(tmp_path):
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10))
    path = _export_plain(cnn, (1, 3, 16, 16), tmp_path / "cnn.onnx")
    with pytest.raises(NotAViTError, match="not a ViT: no self-attention"):
        deploycomp.inspect(path)


class SeparateQKV(torch.nn.Module):
    """A one-block ViT written like Hugging Face's: separate q/k/v projections, heads of 8."""

    def __init__(self, with_mlp: bool = True, dim: int = 32, heads: int = 4):
        super().__init__()
        self.h = heads
        self.embed = torch.nn.Conv2d(3, dim, 4, 4)
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.o = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 48), torch.nn.GELU(), torch.nn.Linear(48, dim)) if with_mlp else None
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        y = self.norm1(t)
        q, k, v = (p(y).reshape(b, n, self.h, c // self.h).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-2, -1) * (c // self.h) ** -0.5, dim=-1)
        t = t + self.o((a @ v).transpose(1, 2).reshape(b, n, c))
        if self.mlp is not None:
            t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


def test_separate_qkv_projections(tmp_path):
    path = _export_plain(SeparateQKV(), (1, 3, 16, 16), tmp_path / "sep.onnx")
    s = deploycomp.inspect(path)
    (b,) = s.blocks
    assert (b.emb, b.heads, b.qk_dim, b.v_dim, b.mlp_dim, b.tokens, b.fused_qkv) == (32, 4, 8, 8, 48, 16, False)
    # heads group: q, k, v weights + biases and the output projection
    assert len(s.slices("block0.heads")) == 7


def test_attention_without_mlp_is_not_a_vit(tmp_path):
    path = _export_plain(SeparateQKV(with_mlp=False), (1, 3, 16, 16), tmp_path / "attn.onnx")
    with pytest.raises(NotAViTError, match="not a ViT: block 0 has no MLP"):
        deploycomp.inspect(path)


# --- what real exporters emit from the libraries users hold (tiny configs built by the libraries) ---

TINY_LIB = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=32,
                patch_size=8, num_labels=5)
TIMM_TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


class _Field(torch.nn.Module):
    """A transformers model as an image -> tensor function (the output a user exports)."""

    def __init__(self, model, field: str):
        super().__init__()
        self.model, self.field = model, field

    def forward(self, x):
        return getattr(self.model(pixel_values=x), self.field)


def _perturb(module):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def _library_model(kind: str):
    """(module, expected family, expected (emb, heads, qk, v, mlp, tokens) per block)."""
    if kind.startswith("hf"):
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        arch, config, field, family, tokens = {
            "hf-vit": ("ViTForImageClassification", "ViTConfig", "logits", "hf-vit", 17),
            "hf-deit": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", "logits", "hf-deit", 18),
            "hf-clip": ("CLIPVisionModelWithProjection", "CLIPVisionConfig", "image_embeds", "hf-clip", 17),
        }[kind]
        model = getattr(transformers, arch)(getattr(transformers, config)(**TINY_LIB))
        return _Field(_perturb(model), field), family, [(32, 2, 16, 16, 48, tokens)] * 2
    if kind == "open_clip":  # nn.MultiheadAttention (packed in_proj), layer scale, output projection
        open_clip = pytest.importorskip("open_clip")
        torch.manual_seed(0)
        tower = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2,
                                                        mlp_ratio=1.5, ls_init_value=0.1, output_dim=12)
        return _perturb(tower), "open_clip", [(32, 2, 16, 16, 48, 17)] * 2
    import timm

    name, tokens = {"timm-layerscale": ("deit3_small_patch16_224", 17),  # layer scale, no_embed_class
                    "timm-registers-gap": ("vit_base_patch16_reg4_gap_256", 20),  # 4 registers, no cls, avg pool
                    "timm-clip": ("vit_base_patch16_clip_quickgelu_224", 17)}[kind]  # pre-norm, QuickGELU
    torch.manual_seed(0)
    module = timm.create_model(name, **TIMM_TINY, **({"num_classes": 12} if kind == "timm-clip" else {}))
    return _perturb(module), "timm-vit", [(32, 2, 16, 16, 128, tokens)] * 2


# every library through torchscript in the quick tier; the dynamo exports (~2-4 s each) in the slow tier
# (the quick tier reads dynamo exports in test_block_table[deit-dynamo])
LIBRARY_CASES = [pytest.param(k, e, marks=pytest.mark.slow) if e == "dynamo" else (k, e)
                 for k in ("hf-vit", "hf-deit", "hf-clip", "open_clip", "timm-layerscale", "timm-registers-gap",
                           "timm-clip") for e in ("torchscript", "dynamo")]


@pytest.fixture(scope="module")
def library_exports(tmp_path_factory):
    cache = {}

    def get(kind: str, exporter: str):
        if (kind, exporter) not in cache:
            module, family, table = _library_model(kind)
            path = tmp_path_factory.mktemp(f"{kind}_{exporter}") / "model.onnx"
            export(module, (1, 3, 32, 32), exporter, path)
            cache[kind, exporter] = (path, module, family, table)
        return cache[kind, exporter]

    return get


def _tensor_of(model: ir.Model, node_name: str, bias: bool = False) -> str | None:
    from deploycomp.ir.discover import as_projection

    proj = as_projection(next(n for n in model.graph if n.name == node_name))
    t = proj.bias if bias else proj.weight
    return t.name if t is not None else None


@pytest.mark.parametrize("kind,exporter", LIBRARY_CASES)
def test_library_exports_are_read_and_coupled(library_exports, kind, exporter):
    """Hugging Face ViT/DeiT/CLIP, open_clip (packed in_proj, layer scale, projection) and timm
    variants (layer scale, registers without cls under GAP, pre-norm CLIP), from both exporters:
    the block table is right, the source family is named, every float tensor with an embedding-wide
    axis belongs to a group, and coupled slices index the right channels (zeroing head h's v rows
    == zeroing its columns of the output projection; MLP unit i in fc1 == in fc2; QK channel j in
    q == in k)."""
    path, _, family, table = library_exports(kind, exporter)
    model = cleaned(path)
    s = discover(model)
    assert [(b.emb, b.heads, b.qk_dim, b.v_dim, b.mlp_dim, b.tokens) for b in s.blocks] == table
    assert s.family == family

    emb = s.stage_embs[0]
    coupled = {n.removeprefix("tensor:") for n, d in s.graph.nodes(data=True) if d["type"] == "tensor"}
    emb_wide = {n for n, v in model.graph.initializers.items() if v.const_value is not None
                and v.const_value.dtype == ir.DataType.FLOAT and emb in v.const_value.shape and v.const_value.size > 1}
    assert emb_wide - coupled == set()
    gammas = [n for n in model.graph.initializers if "gamma" in n or ".ls" in n]
    assert set(gammas) <= {sl.tensor for sl in s.slices("stage0.emb")}

    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    base = run_ort(model, x)
    for b in s.blocks:
        H = b.heads
        heads = s.slices(f"block{b.index}.heads")
        proj_w = [sl for sl in heads if sl.tensor == _tensor_of(model, b.nodes["proj"])]
        v_tensors = {_tensor_of(model, b.nodes["v"]), _tensor_of(model, b.nodes["v"], bias=True)}
        qk_offsets = {sl.offset for sl in s.slices(f"block{b.index}.qk")}
        v_part = [sl for sl in heads if sl.tensor in v_tensors and (not b.fused_qkv or sl.offset not in qk_offsets)]
        assert len(proj_w) == 1 and len(v_part) == 2
        a, c = run_ort(_zeroed(model, v_part, H - 1), x), run_ort(_zeroed(model, proj_w, H - 1), x)
        assert _rel(a, base) > 1e-4 and _rel(a, c) < 1e-5

        mlp = s.slices(f"block{b.index}.mlp")
        fc2 = [sl for sl in mlp if sl.tensor == _tensor_of(model, b.nodes["fc2"])]
        fc1 = [sl for sl in mlp if sl not in fc2]
        assert len(fc1) == 2 and len(fc2) == 1
        a, c = run_ort(_zeroed(model, fc1, 5), x), run_ort(_zeroed(model, fc2, 5), x)
        assert _rel(a, base) > 1e-6 and _rel(a, c) < 1e-5

        qk = s.slices(f"block{b.index}.qk")
        q_tensors = {_tensor_of(model, b.nodes["q"]), _tensor_of(model, b.nodes["q"], bias=True)}
        q_off = min(sl.offset for sl in qk)
        q_part = [sl for sl in qk if sl.tensor in q_tensors and sl.offset == q_off]
        k_part = [sl for sl in qk if sl not in q_part]
        assert len(q_part) == len(k_part) == 2
        a, c = run_ort(_zeroed(model, q_part, 3), x), run_ort(_zeroed(model, k_part, 3), x)
        assert _rel(a, base) > 1e-6 and _rel(a, c) < 1e-5


def test_inspect_names_the_detected_family(library_exports):
    path, _, family, _ = library_exports("hf-vit", "torchscript")
    assert deploycomp.inspect(path).family == "hf-vit"
