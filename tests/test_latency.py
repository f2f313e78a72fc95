"""Latency tables: micro-graph fidelity, profiling with resume, device refusal, prediction."""

from __future__ import annotations

import collections
import json
import sys
import threading

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from deploycomp.backends.base import get_backend
from deploycomp.errors import DeployCompError
from deploycomp.frontend.export import export_to_onnx
from deploycomp.latency import micrographs
from deploycomp.latency.arch import BlockArch, ViTArch
from deploycomp.latency.flexvit import FlexViT
from deploycomp.latency.predictor import LatencyPredictor
from deploycomp.latency.profiler import CHAINED_KINDS, GRIDS, device_fingerprint, profile
from deploycomp.latency.table import LatencyTable, load_table, part_kind, save_table, table_path
from deploycomp.passes.base import CompileContext
from deploycomp.passes.cleanup import CleanupPass

COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "Softmax", "LayerNormalization", "Erf", "Transpose", "Mul", "Div", "Add")
TINY_ARCH = ViTArch(32, (BlockArch(2, 8, 16, 64, 17), BlockArch(1, 16, 8, 32, 5)), img_size=64, patch=16,
                    num_classes=10)


def _compute_ops(ops) -> collections.Counter:
    return collections.Counter(op for op in ops if op in COMPUTE_OPS)


def test_micrographs_have_the_ops_of_the_compiled_graph():
    """Chaining the profiled parts gives the compute ops of the real export, op for op."""
    import torch

    torch.manual_seed(0)
    model = export_to_onnx(FlexViT(TINY_ARCH).eval(), (1, 3, 64, 64))
    CleanupPass().run(model, CompileContext())
    exported = _compute_ops(n.op_type for n in model.graph)
    parts = [micrographs.stem_part(32, 64, 16, 3), micrographs.head_part(5, 32, 10)]
    for b in TINY_ARCH.blocks:
        parts += [micrographs.attention_part(b.tokens, 32, b.heads, b.qk_dim, b.v_dim),
                  micrographs.mlp_part(b.tokens, 32, b.mlp_dim)]
    built = _compute_ops(n.op_type for p in parts for n in p.graph.node)
    assert built == exported


@pytest.mark.slow  # compiles a token model to compare ops (~2.5 s)
def test_cross_attention_micrograph_has_the_ops_of_the_generator(tmp_path):
    """Each generator block of a semantic-token compile has the cross-attention part's compute ops:
    the nodes the rewrite adds, plus what it reuses from the block (the LayerNorm before the
    attention, the output projection and the residual Add)."""
    import deploycomp
    from deploycomp.tokens.stvit import SemanticTokenConfig

    kwargs = {"img_size": 64, "patch_size": 16, "embed_dim": 48, "num_heads": 3, "depth": 4, "num_classes": 10}
    deploycomp.compile("timm:deit_tiny_patch16_224", tmp_path / "st", deploycomp.CompileOptions(
        target="openvino-cpu", model_kwargs=kwargs, semantic_tokens=SemanticTokenConfig(4, layer=1), measure_rounds=0,
        seed=0))
    graph = ir.load(tmp_path / "st" / "model.onnx").graph
    reused = collections.Counter({"LayerNormalization": 1, "MatMul": 1, "Add": 2})
    part = _compute_ops(n.op_type for n in micrographs.cross_attention_part(5, 17, 48, 3, 16, 16).graph.node)
    for block in (1, 2):
        added = _compute_ops(n.op_type for n in graph if n.name.startswith(f"semantic_tokens.block{block}."))
        assert added + reused == part, block


def test_cross_attention_micrograph_computes_token_cluster():
    """The part's TokenCluster, lowered either way, is cross-attention of the first rows over all."""
    from deploycomp.tokens.op import lower, token_cluster_numpy

    from .conftest import run_ort

    part = micrographs.cross_attention_part(5, 17, 32, 2, 8, 16, lowering=None)
    w = {}
    for t in part.graph.initializer:  # weights large enough that the attention is far from uniform
        if t.name.startswith("w_"):
            w[t.name] = onnx.numpy_helper.to_array(t) * 40
            t.CopyFrom(onnx.numpy_helper.from_array(w[t.name], t.name))
    x = np.random.default_rng(1).standard_normal((2, 17, 32)).astype(np.float32)
    outs = []
    for how in ("reference", "ort-mha"):
        model = ir.from_proto(part)
        assert lower(model, how) == 1
        outs.append(run_ort(model, x))
    wq, bq, wk, bk, wv, bv, wo, bo = w.values()  # creation order: q, k, v, output projections
    ln = lambda t: (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)  # noqa: E731
    p = x[:, :5]
    want = p + token_cluster_numpy(ln(p) @ wq + bq, ln(x) @ wk + bk, ln(x) @ wv + bv, 2, 8**-0.5) @ wo + bo
    wrong = p + token_cluster_numpy(p @ wq + bq, ln(x) @ wk + bk, ln(x) @ wv + bv, 2, 8**-0.5) @ wo + bo
    for out in outs:
        assert out.shape == (2, 5, 32) and np.linalg.norm(out - want) / np.linalg.norm(want) < 1e-5
    assert np.linalg.norm(wrong - want) / np.linalg.norm(want) > 1e-2  # the comparison can fail


def test_fused_attention_flexvit_computes_the_written_out_one():
    """The GPU check times FlexViTs with scaled_dot_product_attention: the same function as the
    written-out (exported) form, QK != V per head and a token cut included."""
    import torch

    torch.manual_seed(0)
    written, fused = FlexViT(TINY_ARCH).eval(), FlexViT(TINY_ARCH, fused_attention=True).eval()
    fused.load_state_dict(written.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = written(x), fused(x)
    assert float((a - b).norm() / a.norm()) < 1e-5


def test_micrographs_run_at_any_batch():
    from .conftest import run_ort

    for part, x in ((micrographs.attention_part(17, 32, 2, 8, 16), (3, 17, 32)),
                    (micrographs.mlp_part(5, 32, 64), (2, 5, 32)),
                    (micrographs.stem_part(32, 64, 16, 3), (2, 3, 64, 64)),
                    (micrographs.head_part(5, 32, 10), (2, 5, 32))):
        out = run_ort(ir.serde.deserialize_model(part), np.random.default_rng(0).standard_normal(x).astype(np.float32))
        assert out.shape[0] == x[0] and np.isfinite(out).all()


@pytest.fixture()
def backend():
    return get_backend("ort-cpu", threads=1)


def test_block_halves_are_profiled_in_context_the_stem_and_head_alone(tmp_path, backend, monkeypatch):
    """A chain of copies computes the part applied copy after copy, and the table stores what one
    more copy adds (the per-call overhead a micro-graph pays at its edges cancels); parts that do
    not chain are timed alone."""
    from .conftest import run_ort

    part = micrographs.attention_part(5, 32, 2, 8, 8)
    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    twice = run_ort(ir.serde.deserialize_model(part), run_ort(ir.serde.deserialize_model(part), x))
    chained = micrographs.chained(part, 2)
    assert sum(n.op_type == "Softmax" for n in chained.graph.node) == 2
    np.testing.assert_allclose(run_ort(ir.serde.deserialize_model(chained), x), twice, rtol=1e-5, atol=1e-6)

    def fake_time(self, model, x, warmup, repeats):  # 1.0 ms at the edges, 0.25 ms a Softmax/Erf/Conv/Gemm
        body = sum(n.op_type in ("Softmax", "Erf", "Conv", "Gemm") for n in model.graph.node)
        return [1.0 + 0.25 * body] * repeats

    monkeypatch.setattr(type(backend), "time_part", fake_time)
    table = profile(backend, tmp_path, grid="tiny", protocol={"warmup": 0, "repeats": 2, "passes": 1})
    assert table.protocol["chain"] == 2
    for kind, ms in (("attention", 0.25), ("mlp", 0.25), ("stem", 1.25), ("head", 1.25)):
        assert {table.median(kind, p) for p in table.points(kind)} == {ms}, kind


def test_profile_resumes_and_refuses_other_devices(tmp_path, backend):
    protocol = {"warmup": 1, "repeats": 1, "passes": 2}  # a warm-up: block halves are chained minus alone
    seen = []

    class Killed(Exception):
        pass

    def kill_after(done, total):
        seen.append((done, total))
        if done == 7:
            raise Killed

    with pytest.raises(Killed):
        profile(backend, tmp_path, grid="tiny", protocol=protocol, save_every_s=0, progress=kill_after)
    path = table_path(tmp_path, device_fingerprint(backend, 1, "fp32"), "tiny")
    partial = load_table(path, device_fingerprint(backend, 1, "fp32"))
    assert not partial.complete
    measured = sum(len(e["samples_ms"]) for part in partial.entries.values() for e in part.values())
    assert measured == 6  # points 1..6 were saved before the kill at the 7th

    resumed = []
    table = profile(backend, tmp_path, grid="tiny", protocol=protocol, save_every_s=0,
                    progress=lambda done, total: resumed.append(done))
    assert resumed[0] == 6 and table.complete
    total = seen[0][1]
    assert resumed[-1] == total
    on_disk = json.loads(path.read_text())
    assert on_disk["complete"] and on_disk["fingerprint"]["batch"] == 1 and on_disk["profiling_seconds"] > 0
    for name, part in on_disk["entries"].items():
        for entry in part.values():
            # a block half is (chain - alone), clamped at 0: under load a sample can be 0
            chained = part_kind(name) in CHAINED_KINDS
            assert len(entry["samples_ms"]) == 2 and (entry["median_ms"] >= 0 if chained else entry["median_ms"] > 0)

    other = dict(table.fingerprint, cpu_model="Some Other CPU", threads=64)
    with pytest.raises(DeployCompError, match="measured on another device .*cpu_model.*threads"):
        load_table(path, other)
    assert load_table(path, other, force=True).complete


@pytest.mark.parametrize("flags, isa", [(["avx2", "fma"], "avx2"), (["avx2", "avx_vnni", "fma"], "avx2-vnni"),
                                        (["avx2", "avx512f", "fma"], "avx512"),
                                        (["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "fma"], "avx512-vnni-bf16"),
                                        (["avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"], "avx512-vnni-bf16-amx"),
                                        (["asimd"], "neon"), ([], "generic")])
def test_instruction_set_names(flags, isa):
    from deploycomp.backends.fingerprint import isa_of

    assert isa_of(flags) == isa


def test_a_table_of_the_same_cpu_model_with_another_instruction_set_is_refused_and_named_apart(tmp_path):
    """Two CPUs both reporting "AMD EPYC", one with AVX-512 + VNNI and one with AVX2 only, ran DeiT-S
    3x apart: a table of one does not predict the other, and profiling one must not overwrite the other's."""
    fp = {"target": "ort-cpu", "cpu_model": "AMD EPYC", "cpu_flags": ["avx2", "avx512f", "avx512_vnni", "fma"],
          "cores": 2, "threads": 2, "allow_spinning": True, "backend": "onnxruntime", "backend_version": "1.0",
          "provider": "CPUExecutionProvider", "batch": 1, "dtype": "fp32"}
    protocol = {"passes": 1, "repeats": 1}
    old = LatencyTable(fp, {}, {}, protocol, {})  # written before "isa" was recorded: read from its flags
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old.to_json()))
    assert load_table(path).fingerprint["isa"] == "avx512-vnni"
    avx2 = {**fp, "cpu_flags": ["avx2", "fma"], "isa": "avx2"}
    with pytest.raises(DeployCompError, match="measured on another device .*isa: table 'avx512-vnni', device 'avx2'"):
        load_table(path, avx2)
    assert table_path(tmp_path, avx2) != table_path(tmp_path, {**fp, "isa": "avx512-vnni"})
    assert "-avx2-" in table_path(tmp_path, avx2).name


def test_concurrent_saves_do_not_corrupt(tmp_path, backend):
    """Three writers, each measuring its own third of the points and saving after every point (as
    concurrent profiles of one table do): every point of every writer must survive, which needs the
    lock (no lost read-merge-write), the merge (a writer's file does not drop the others' points)
    and the atomic rename (no torn file for a reader)."""
    fp = device_fingerprint(backend, 1, "fp32")
    path = tmp_path / "t.json"
    grid = GRIDS["tiny"]
    writers = 3
    template = LatencyTable(fp, grid, {"img_size": 64, "patch": 16, "in_chans": 3, "num_classes": 10},
                            {"warmup": 0, "repeats": 1, "passes": 1})
    points = [(part, p) for part in ("mlp", "attention", "head", "stem") for p in template.points(part)]
    value = {p: 1.0 + i for i, p in enumerate(points)}  # distinct per point: a mix-up shows
    errors = []

    def writer(w):
        try:
            t = LatencyTable(fp, grid, dict(template.fixed), dict(template.protocol))
            for i, (part, point) in enumerate(points):
                if i % writers == w:
                    t.add_samples(part, point, [value[part, point]])
                    save_table(t, path)
                    load_table(path, fp)  # a reader never sees a torn file
        except Exception as exc:  # noqa: BLE001 - reported below, with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: an unlocked read-merge-write loses points
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors
    table = load_table(path, fp)
    for part, point in points:
        assert table.samples(part, point) == [value[part, point]], (part, point)
    assert not list(tmp_path.glob("*.tmp"))


def _synthetic_table(fp) -> LatencyTable:
    """A table whose entries are a multilinear function of the keys: interpolation must be exact."""
    grid = GRIDS["tiny"]
    t = LatencyTable(fp, grid, {"img_size": 64, "patch": 16, "in_chans": 3, "num_classes": 10},
                     {"warmup": 0, "repeats": 1, "passes": 1})
    for part in grid:
        for point in t.points(part):
            t.add_samples(part, point, [0.1 + 0.001 * float(np.prod(point)) + 0.01 * sum(point)])
    return t


def test_predictor_sums_interpolated_parts(backend):
    t = _synthetic_table(device_fingerprint(backend, 1, "fp32"))
    pred = LatencyPredictor(t)
    f = lambda *p: 0.1 + 0.001 * float(np.prod(p)) + 0.01 * sum(p)  # noqa: E731
    arch = ViTArch(48, (BlockArch(2, 12, 10, 80, 17), BlockArch(1, 8, 16, 48, 9)), img_size=64, patch=16,
                   num_classes=10)
    p = pred.predict(arch)
    want = f(48) + f(9, 48) + f(17, 48, 2, 12, 10) + f(17, 48, 80) + f(9, 48, 1, 8, 16) + f(9, 48, 48)
    assert p.total_ms == pytest.approx(want, rel=1e-9)
    assert p.outside_grid == []
    far = ViTArch(128, arch.blocks, img_size=64, patch=16, num_classes=10)
    assert any("emb=128" in o for o in pred.predict(far).outside_grid)
    with pytest.raises(DeployCompError, match="profiles 64px/16 inputs"):
        pred.predict(ViTArch(48, arch.blocks))


def test_predictor_reads_each_part_monotone_in_every_axis(backend):
    """A noisy dip in one entry (a wider MLP timed cheaper than a narrower one) is not read as a
    cheap point: the predictor reads the grid's least-squares monotone fit, axis by axis; a grid
    monotone as profiled is read as it is, and ``monotone=False`` reads the medians."""
    from deploycomp.latency.predictor import as_monotone

    t = _synthetic_table(device_fingerprint(backend, 1, "fp32"))  # increasing in every key
    arch = ViTArch(48, (BlockArch(2, 12, 10, 80, 17),), img_size=64, patch=16, num_classes=10)
    before = LatencyPredictor(t).predict(arch).total_ms
    assert before == pytest.approx(LatencyPredictor(t, monotone=False).predict(arch).total_ms, rel=1e-12)
    lo, hi = (17, 32, 32), (17, 32, 128)  # plant: the wider MLP measured at a third of the narrower's cost
    t.entries["mlp"][",".join(map(str, hi))]["median_ms"] = t.median("mlp", lo) / 3
    raw, read = LatencyPredictor(t, monotone=False), LatencyPredictor(t)
    assert raw.part_ms("mlp", hi) < raw.part_ms("mlp", lo)
    assert read.part_ms("mlp", hi) >= read.part_ms("mlp", lo) - 1e-12
    assert read.part_ms("mlp", (17, 32, 80)) > raw.part_ms("mlp", (17, 32, 80))  # no cheap point between them
    assert read.part_ms("attention", (17, 48, 2, 12, 10)) == raw.part_ms("attention", (17, 48, 2, 12, 10))
    rng = np.random.default_rng(0)
    for _ in range(20):
        fitted = as_monotone(rng.random((3, 4, 2, 5)))
        assert all((np.diff(fitted, axis=a) >= -1e-12).all() for a in range(4))


def test_predictor_reads_the_cross_attention_part(backend):
    """A generator block costs the cross-attention part at (queries, keys, EMB), times what its own
    heads cost relative to the part's reference heads in self-attention over the same keys; a table
    profiled before the part existed falls back to FLOPs-scaled self-attention."""
    from dataclasses import replace

    t = _synthetic_table(device_fingerprint(backend, 1, "fp32"))
    f = lambda *p: 0.1 + 0.001 * float(np.prod(p)) + 0.01 * sum(p)  # noqa: E731
    gen = BlockArch(2, 12, 10, 80, 17, queries=5)
    arch = ViTArch(48, (gen, BlockArch(1, 8, 16, 48, 5)), img_size=64, patch=16, num_classes=10)
    ref = (2, 16, 16)  # the tiny grid's widest heads
    rest = f(48) + f(5, 48) + f(5, 48, 80) + f(5, 48, 1, 8, 16) + f(5, 48, 48)
    cross = f(5, 17, 48) * f(17, 48, 2, 12, 10) / f(17, 48, *ref)
    p = LatencyPredictor(t).predict(arch)
    assert p.total_ms == pytest.approx(rest + cross, rel=1e-9) and p.outside_grid == []

    t.grid = {k: v for k, v in t.grid.items() if k != "cross_attention"}  # an older table: FLOPs-scaled
    flops = f(17, 48, 2, 12, 10) * gen.attention_flops(48) / replace(gen, queries=0).attention_flops(48)
    assert LatencyPredictor(t).predict(arch).total_ms == pytest.approx(rest + flops, rel=1e-9)


def test_a_part_added_to_the_grid_is_all_that_is_profiled(tmp_path, backend, monkeypatch):
    """Resuming a complete table whose preset gained a part kind keeps every other part's samples."""
    import deploycomp.latency.profiler as profiler

    protocol = {"warmup": 0, "repeats": 1, "passes": 1}
    full = profiler.GRIDS["tiny"]
    monkeypatch.setitem(profiler.GRIDS, "tiny", {k: v for k, v in full.items() if k != "cross_attention"})
    old = profile(backend, tmp_path, grid="tiny", protocol=protocol)
    assert old.complete and "cross_attention" not in old.entries
    monkeypatch.setitem(profiler.GRIDS, "tiny", full)
    progress = []
    new = profile(backend, tmp_path, grid="tiny", protocol=protocol, progress=lambda done, total: progress.append((done, total)))
    cross_points = len(new.points("cross_attention"))
    assert new.complete and progress[0] == (progress[-1][1] - cross_points, progress[-1][1])
    for part, points in old.entries.items():
        assert {k: e["samples_ms"] for k, e in new.entries[part].items()} == {k: e["samples_ms"] for k, e in points.items()}


def test_incomplete_table_is_refused(backend):
    t = _synthetic_table(device_fingerprint(backend, 1, "fp32"))
    t.entries["mlp"].pop(next(iter(t.entries["mlp"])))
    with pytest.raises(DeployCompError, match="incomplete"):
        LatencyPredictor(t)


@pytest.mark.slow
def test_validate_compiles_and_measures(tmp_path, backend):
    from deploycomp.latency.validate import random_archs, validate

    protocol = {"warmup": 1, "repeats": 2, "passes": 1}
    table = profile(backend, tmp_path, grid="tiny", protocol=protocol)
    archs = random_archs(2, seed=1, grid=table.grid, img_size=64, patch=16, num_classes=10, depth=3)
    assert archs[0].blocks[-1].tokens == 17 and archs[1].blocks[-1].tokens < 17
    report = validate(table, backend, archs, rounds=2, iters=1)
    assert report["n"] == 2 and len(report["rows"]) == 2
    for row in report["rows"]:
        assert row["measured"]["median_ms"] > 0 and row["predicted_ms"] > 0 and row["outside_grid"] == []
    assert report["table_model"]["median_ape_pct"] >= 0
    cal = report["calibration"]  # the grid's full architecture and three mid-width ones, measured in the same run
    assert cal["scale"] == pytest.approx(cal["measured_ms"] / cal["predicted_ms"])
    assert [a["anchor"].split(" (")[0] for a in cal["anchors"]] == [
        "the grid's full architecture", "a uniform mid-width architecture", "a non-uniform narrower architecture",
        "a non-uniform wider architecture"]
    assert "EMB 64, 4 blocks" in cal["anchor"] and "EMB 32, 4 blocks" in cal["anchors"][1]["anchor"]
    widths = [{(b["heads"], b["qk_dim"], b["v_dim"], b["mlp_dim"]) for b in a["arch"]["blocks"]} for a in cal["anchors"]]
    assert [len(w) for w in widths[:2]] == [1, 1] and min(len(w) for w in widths[2:]) > 1  # uniform, then not
    x = np.log([a["predicted_ms"] for a in cal["anchors"]])
    slope, intercept = np.polyfit(x, np.log([a["scale"] for a in cal["anchors"]]), 1)
    for row in report["rows"]:  # every row scaled by the anchors' least-squares line, clamped to their range
        line = np.exp(intercept + slope * np.clip(np.log(row["predicted_ms"]), x.min(), x.max()))
        assert row["calibrated_ms"] / row["predicted_ms"] == pytest.approx(line, rel=1e-6)


# -- Swin: per-stage windowed attention, MLP and patch merging -------------------------------------

def _swin_micro_arch(**stage1):
    """A pruned tiny Swin (the ``swin-micro`` grid: 14x14 in four 7x7 windows, then 7x7): widths and
    dims between grid points, so every part is interpolated."""
    from deploycomp.latency.arch import SwinArch, SwinStage

    s0 = SwinStage(28, 14, 7, (BlockArch(2, 12, 10, 80, 49), BlockArch(1, 8, 16, 96, 49)))
    s1 = SwinStage(stage1.get("emb", 56), 7, 7, (BlockArch(3, 12, 8, 160, 49), BlockArch(2, 16, 12, 200, 49)))
    return SwinArch((s0, s1), img_size=56, patch=4, num_classes=10)


def test_predictor_sums_the_swin_parts_per_stage(backend):
    """A Swin = stem + per block the windowed attention (4 windows of 49 in stage 0, block 1 shifted;
    one window in stage 1) and the MLP at its stage's tokens and width + the patch merging + head;
    on a multilinear synthetic table the interpolated sum is the formula's, written out by hand."""
    from dataclasses import replace

    from .synthetic_tables import swin_flops_like, synthetic_table

    pred = LatencyPredictor(synthetic_table(swin_flops_like, grid="swin-micro"))
    arch = _swin_micro_arch()
    att = lambda w, e, h, qk, v, shift: 0.02 + 4e-6 * w * 49 * e * h * (qk + v) + 0.01 * shift  # noqa: E731
    mlp = lambda t, e, m: 0.02 + 2e-6 * t * e * m  # noqa: E731
    want = (0.05 + 1e-3 * 28                                                      # stem
            + att(4, 28, 2, 12, 10, 0) + mlp(196, 28, 80) + att(4, 28, 1, 8, 16, 1) + mlp(196, 28, 96)
            + 0.01 + 1e-6 * 196 * 28 * 56                                         # patch merging 28 -> 56
            + att(1, 56, 3, 12, 8, 0) + mlp(49, 56, 160) + att(1, 56, 2, 16, 12, 0) + mlp(49, 56, 200)
            + 0.01 + 1e-5 * 49 * 56)                                              # head
    p = pred.predict(arch)
    assert p.total_ms == pytest.approx(want, abs=1e-4)  # the table stores samples to 1e-5 ms
    assert p.outside_grid == [] and len(p.attention_ms) == 4 and len(p.merging_ms) == 1
    assert pred.predict(arch, scale=2.0).total_ms == pytest.approx(2 * p.total_ms, rel=1e-9)
    # 4 classes where the grid has 10: only the head changes, by FLOPs (final LayerNorm over 49 x 56
    # at ~8 flops an element + 2 x 56 x classes): (21952 + 448) / (21952 + 1120)
    four = pred.predict(replace(arch, num_classes=4))
    assert four.head_ms == pytest.approx(p.head_ms * 22400 / 23072, rel=1e-9)
    assert four.total_ms - four.head_ms == pytest.approx(p.total_ms - p.head_ms, rel=1e-12)
    assert any(o.startswith("head.num_classes=4: the table's 10-class head") for o in four.outside_grid)
    # stage 1 wider than its grid: flagged, not silently read off another stage's sizes
    assert any("window_attention.1.emb=80" in o for o in pred.predict(_swin_micro_arch(emb=80)).outside_grid)
    with pytest.raises(DeployCompError, match="Swin stages"):
        pred.predict(replace(arch, stages=(replace(arch.stages[0], window=2), arch.stages[1])))
    # a DeiT table has no Swin parts: one line
    with pytest.raises(DeployCompError, match="has no Swin parts") as err:
        LatencyPredictor(_synthetic_table(device_fingerprint(backend, 1, "fp32"))).predict(
            replace(arch, img_size=64, patch=16))
    assert "\n" not in str(err.value)


def test_predictor_reads_the_swin_semantic_token_design(backend):
    """Semantic tokens per window in stage 0 of the tiny Swin (four 7x7 windows, M = 4): the
    generator's M queries over 49 then 53 keys per window, read from the window cross-attention part
    at the stage's widest heads (2 x 16 / 16) scaled by the block's own heads through the window
    attention, the MLP on 4 x 4 tokens; the 4x4 semantic grid merges to 2x2 and stage 1 runs there in
    one 2x2 window (tokens 4), as does the head. The sum is the formula's, written out by hand."""
    from deploycomp.tokens.stvit_swin import SwinTokenConfig, swin_token_arch

    from .synthetic_tables import swin_flops_like, synthetic_table

    pred = LatencyPredictor(synthetic_table(swin_flops_like, grid="swin-micro"))
    view = swin_token_arch(_swin_micro_arch(), SwinTokenConfig(tokens=4, stage=0))
    s0, s1 = view.stages
    assert [(b.queries, b.tokens) for b in s0.blocks] == [(4, 49), (4, 53)] and s0.out_resolution == 4
    assert (s1.resolution, s1.window, s1.windows, s1.shifts) == (2, 2, 1, (False, False))
    att = lambda w, t, e, h, qk, v: 0.02 + 4e-6 * w * t * e * h * (qk + v)  # noqa: E731
    cross = lambda q, t, e, h, qk, v: ((0.03 + 1e-6 * 4 * (q + t) * e)  # noqa: E731
                                       * att(4, 49, e, h, qk, v) / att(4, 49, e, 2, 16, 16))
    mlp = lambda t, e, m: 0.02 + 2e-6 * t * e * m  # noqa: E731
    want = (0.05 + 1e-3 * 28                                                      # stem
            + cross(4, 49, 28, 2, 12, 10) + mlp(16, 28, 80) + cross(4, 53, 28, 1, 8, 16) + mlp(16, 28, 96)
            + 0.01 + 1e-6 * 16 * 28 * 56                                          # patch merging of the 4x4 grid
            + att(1, 4, 56, 3, 12, 8) + mlp(4, 56, 160) + att(1, 4, 56, 2, 16, 12) + mlp(4, 56, 200)
            + 0.01 + 1e-5 * 4 * 56)                                               # head on 2x2
    p = pred.predict(view)
    assert p.total_ms == pytest.approx(want, abs=1e-4)
    assert p.outside_grid == []
    assert p.total_ms < pred.predict(_swin_micro_arch()).total_ms
    # with the recovery the stage hands on its full grid: the last block's 49 queries over the 4
    dense = swin_token_arch(_swin_micro_arch(), SwinTokenConfig(tokens=4, stage=0, dense=True))
    assert [(b.queries, b.tokens) for b in dense.stages[0].blocks] == [(4, 49), (49, 4)]
    assert dense.stages[1] == _swin_micro_arch().stages[1]
    assert pred.predict(dense).outside_grid == []
    # a token stage the grid did not profile: one line naming the part
    with pytest.raises(DeployCompError, match="no window_cross_attention.1 part") as err:
        pred.predict(swin_token_arch(_swin_micro_arch(), SwinTokenConfig(tokens=4, stage=1)))
    assert "\n" not in str(err.value)


def test_window_cross_attention_part_runs_both_ways(backend):
    """The micro-graph of a semantic block per window: M queries over more keys (generator) and the
    recovery's w² queries over M keys, each the first rows of its window; output shapes as the
    design's, and it is the same op pattern as the DeiT generator part folded per window."""
    import onnxruntime as ort

    from deploycomp.latency.micrographs import window_cross_attention_part

    for queries, keys in ((4, 53), (49, 4)):
        model = window_cross_attention_part(4, queries, keys, 32, 2, 8, 8)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((3, 4, max(queries, keys), 32)).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        assert y.shape == (3, 4, queries, 32)
        # a change in window 1 of image 0 reaches only that window
        x2 = x.copy()
        x2[0, 1] += 1.0
        (y2,) = sess.run(None, {"x": x2})
        assert np.array_equal(y2[1:], y[1:]) and np.array_equal(y2[0, [0, 2, 3]], y[0, [0, 2, 3]])


def test_profile_swin_parts_resumes_per_part(tmp_path, backend, monkeypatch):
    """A tiny Swin grid profiled for real: every part kind is measured and runs (inputs shaped per
    part), and a grid that gained a stage's part re-profiles only that part."""
    import deploycomp.latency.profiler as profiler

    protocol = {"warmup": 0, "repeats": 1, "passes": 1}
    full = {**profiler.GRIDS["swin-micro"]}
    # widths at their smallest, token counts at their largest (a stage's own grid; the smaller ones are
    # the semantic-token design's)
    small = {part: {k: v if k == "shift" else v[-1:] if k in ("tokens", "windows", "queries") else v[:1]
                    for k, v in keys.items()} for part, keys in full.items()}
    partial = {k: v for k, v in small.items() if k != "patch_merging.0"}
    monkeypatch.setitem(profiler.GRIDS, "swin-micro", partial)
    old = profile(backend, tmp_path, grid="swin-micro", protocol=protocol)
    assert old.complete and "patch_merging.0" not in old.entries
    monkeypatch.setitem(profiler.GRIDS, "swin-micro", small)
    progress = []
    new = profile(backend, tmp_path, grid="swin-micro", protocol=protocol,
                  progress=lambda done, total: progress.append((done, total)))
    assert new.complete and progress[0] == (progress[-1][1] - 1, progress[-1][1])
    assert {p.split(".")[0] for p in new.parts} == {"window_attention", "mlp", "patch_merging", "swin_stem", "swin_head",
                                                    "window_cross_attention"}
    assert len(new.points("window_attention.0")) == 2  # unshifted and shifted
    for part, points in old.entries.items():
        assert new.entries[part] == points
    arch = LatencyPredictor(new).predict(_smallest(new))
    assert arch.total_ms > 0 and arch.outside_grid == []


def _smallest(table):
    """The Swin at every stage's first grid point (the grid's smallest)."""
    from deploycomp.latency.arch import SwinArch, SwinStage, swin_stage_geometry

    fixed, stages = table.fixed, []
    for s, ((res, window), depth) in enumerate(zip(swin_stage_geometry(fixed), fixed["depths"])):
        att, mlp = table.grid[f"window_attention.{s}"], table.grid[f"mlp.{s}"]
        block = BlockArch(att["heads"][0], att["qk_dim"][0], att["v_dim"][0], mlp["mlp_dim"][0], window * window)
        stages.append(SwinStage(att["emb"][0], res, window, (block,) * depth))
    return SwinArch(tuple(stages), img_size=fixed["img_size"], patch=fixed["patch"], num_classes=fixed["num_classes"])


@pytest.mark.slow
def test_validate_compiles_and_measures_random_swins(tmp_path, backend):
    """The validation on a Swin grid: random Swins (torch slices of a timm Swin at the grid's full
    widths) are compiled, measured with the grid's full Swin as the calibration anchor, and predicted
    inside the grid."""
    from deploycomp.latency.arch import SwinArch
    from deploycomp.latency.validate import random_archs_for, validate

    table = profile(backend, tmp_path, grid="swin-micro", protocol={"warmup": 1, "repeats": 1, "passes": 1})
    archs = random_archs_for(table, 2, seed=1)
    assert all(isinstance(a, SwinArch) for a in archs) and archs[0] != archs[1]
    report = validate(table, backend, archs[:1], rounds=2, iters=1)  # one Swin compiled and measured suffices here
    assert report["n"] == 1 and "EMB 32, 4 blocks" in report["calibration"]["anchor"]
    for row in report["rows"]:
        assert row["measured"]["median_ms"] > 0 and row["predicted_ms"] > 0 and row["outside_grid"] == []
        assert [len(st["blocks"]) for st in row["arch"]["stages"]] == [2, 2]


def test_swin_floors_keep_each_stage_in_its_grid_and_above_the_previous_stage():
    """Pruning floors on a Swin grid are per group: each stage's width, heads, head dims and MLP at
    its own stage's smallest grid point, and a stage's width above the previous stage's (two adjacent
    stages of one width would read back as one stage); random validation Swins obey the same."""
    from types import SimpleNamespace

    from deploycomp.latency.profiler import FIXED, GRIDS
    from deploycomp.latency.validate import random_archs_for
    from deploycomp.passes.prune import grid_floors

    blocks = [SimpleNamespace(index=i, stage=s) for i, s in enumerate([0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3])]
    floors = grid_floors(GRIDS["swin-t"], SimpleNamespace(stage_embs=[96, 192, 384, 768], blocks=blocks))
    assert [floors[f"stage{s}.emb"] for s in range(4)] == [24, 97, 193, 385]
    assert (floors["block0.heads"], floors["block11.mlp"], floors["block5.qk"], floors["block5.mlp"]) == (1, 384, 8, 192)
    table = SimpleNamespace(fixed=FIXED["swin-t"], grid=GRIDS["swin-t"])
    for arch in random_archs_for(table, 20, seed=3):
        embs = [st.emb for st in arch.stages]
        assert embs == sorted(set(embs)) and embs[0] >= 24 and embs[-1] <= 768, embs
