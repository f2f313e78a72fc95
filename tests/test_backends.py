"""The Backend protocol: every target implements it, openvino-cpu end to end, options rebuilt from a
manifest, a pipeline built by hand, and latency-table calibration on a backend with known timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import deploycomp
from deploycomp.api import check_options, plan_compile
from deploycomp.artifact import read_manifest
from deploycomp.backends.base import Backend, backend_for_manifest, backend_names, get_backend
from deploycomp.errors import DeployCompError
from deploycomp.job import CompileJob
from deploycomp.passes.base import build_pass

from .conftest import TINY, input_shape, tiny_module

PROTOCOL = ("check_available", "fingerprint", "options", "runner", "candidate", "time", "time_part", "emit", "artifact")


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_every_target_implements_the_protocol():
    from deploycomp.backends.base import _BACKENDS

    assert {"ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "openvino-cpu"} <= set(backend_names())
    for name, cls in _BACKENDS.items():
        missing = [m for m in PROTOCOL if not callable(getattr(cls, m, None))]
        assert not missing, f"{name} lacks {missing}"
        assert set(cls.precisions) >= {"fp32"} and set(cls.precisions.values()) <= {"graph", "runtime"}
    for name in ("ort-cpu", "openvino-cpu"):  # the ones this machine runs
        backend = get_backend(name)
        assert isinstance(backend, Backend)
        rebuilt = type(backend)(**backend.options())
        assert rebuilt.options() == backend.options()


def test_unknown_runtime_option_is_one_clear_error():
    with pytest.raises(DeployCompError, match="target 'openvino-cpu' has no option allow_spinning"):
        get_backend("openvino-cpu", allow_spinning=True)
    with pytest.raises(DeployCompError, match="unknown OpenVINO performance hint"):
        get_backend("openvino-cpu", performance_hint="FASTEST")


def options(**kw):
    return deploycomp.CompileOptions(model_kwargs=dict(TINY["deit"][1]), measure_rounds=1, seed=0, **kw)


def run_openvino_ir(xml: Path, x: np.ndarray) -> np.ndarray:
    """The IR run by OpenVINO directly (not through deploycomp), in f32."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[0]


def test_openvino_artifact_matches_an_independent_torch_model(tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "out"
    save_file(tiny_module("deit", seed=5).state_dict(), str(tmp_path / "w.safetensors"))
    manifest = deploycomp.compile(f"timm:{TINY['deit'][0]}", out, options(target="openvino-cpu", threads=1,
                                                                         weights=str(tmp_path / "w.safetensors")))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.bin", "model.onnx", "model.xml", "report.md"]
    assert manifest["runtime_options"] == {"threads": 1, "performance_hint": "LATENCY", "precision": "fp32"}
    assert manifest["target"]["backend"] == "openvino" and manifest["target"]["inference_precision"] == "f32"
    module = tiny_module("deit", seed=5)  # built separately here, handed to the compile as a weights file

    x = np.random.default_rng(11).standard_normal((5, *input_shape("deit")[1:])).astype(np.float32)
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).numpy()
    got = run_openvino_ir(out / "model.xml", x)
    assert rel_l2(got, want) < 1e-4
    # control: a model with one weight changed by 1 % is told apart at this tolerance
    with torch.no_grad(), torch.inference_mode():
        module.blocks[0].mlp.fc1.weight.mul_(1.01)
        other = module(torch.from_numpy(x)).numpy()
    assert rel_l2(got, other) > 1e-4
    # evaluate, inspect and bench rebuild the backend from the manifest
    backend = backend_for_manifest(read_manifest(out))
    assert backend.name == "openvino-cpu" and backend.options() == manifest["runtime_options"]
    assert len(deploycomp.inspect(out).blocks) == 2


def test_openvino_static_batch_fixes_the_ir_batch_and_still_runs_any_batch(tmp_path):
    """--static-batch N: the emitted IR has batch N (OpenVINO itself refuses another batch), the
    manifest rebuilds a backend that compiles every model for the exact batch it is fed, the
    artifact is measured at N, and tables profiled static are tables of their own."""
    import openvino as ov

    from deploycomp.latency.micrographs import mlp_part
    from deploycomp.latency.profiler import device_fingerprint
    from deploycomp.latency.table import mismatches, table_path

    out = tmp_path / "out"
    manifest = deploycomp.compile(f"timm:{TINY['deit'][0]}", out, options(target="openvino-cpu", threads=1,
                                                                         runtime={"static_batch": 3}))
    assert manifest["runtime_options"]["static_batch"] == 3 and manifest["latency"]["batch"] == 3
    assert list(ov.Core().read_model(str(out / "model.xml")).input(0).get_partial_shape().to_shape()) == \
        [3, *input_shape("deit")[1:]]
    import onnx

    x5 = np.random.default_rng(3).standard_normal((5, *input_shape("deit")[1:])).astype(np.float32)
    with pytest.raises(RuntimeError):  # the IR is static: OpenVINO refuses a batch of 5
        run_openvino_ir(out / "model.xml", x5)
    backend = backend_for_manifest(read_manifest(out))
    assert backend.static_batch == 3 and backend.options() == manifest["runtime_options"]
    run = backend.runner(backend.artifact(out, manifest))
    onnx_run = get_backend("ort-cpu", threads=1).runner(onnx.load(str(out / "model.onnx")))
    for x in (x5[:3], x5, x5[:1]):  # its own batch, then others (each compiled for its batch)
        assert rel_l2(run(x), onnx_run(x)) < 1e-4
    # a micro-graph (symbolic batch) is compiled static by a static backend, dynamic otherwise
    part = mlp_part(tokens=5, emb=16, mlp_dim=32)
    static_request = backend.request(backend.read(part), 2)
    assert static_request.get_compiled_model().input(0).get_partial_shape().is_static
    dynamic = get_backend("openvino-cpu", threads=1)
    assert not dynamic.request(dynamic.read(part), 2).get_compiled_model().input(0).get_partial_shape().is_static
    # tables: a static one is named apart and does not pass for the dynamic one, nor back
    fp_static, fp_dynamic = device_fingerprint(backend, 3, "fp32"), device_fingerprint(dynamic, 3, "fp32")
    assert table_path(tmp_path, fp_static).name.endswith("-static.json")
    assert table_path(tmp_path, fp_static) != table_path(tmp_path, fp_dynamic)
    assert mismatches(fp_static, fp_dynamic) == ["static_batch: table 3, device None"]
    with pytest.raises(DeployCompError, match="a static batch is a positive whole number"):
        get_backend("openvino-cpu", static_batch=0)
    from deploycomp.pruning.config import PruneConfig

    with pytest.raises(DeployCompError, match="--static-batch 3 fixes the artifact's batch: a latency budget is for "
                                              "that batch, not --latency-batch 1"):
        check_options(f"timm:{TINY['deit'][0]}", options(target="openvino-cpu", runtime={"static_batch": 3},
                                                         prune=PruneConfig(latency="0.5x")))


@pytest.mark.slow  # two compiles (~2.2 s)
def test_a_pipeline_built_by_hand(tmp_path):
    """No monkeypatching: a job with its own pass list (cleanup, discover, a planted scale, verify)."""
    from .test_compile import PerturbWeight

    job = plan_compile(f"timm:{TINY['deit'][0]}", tmp_path / "ok", options())
    job.passes = [build_pass("cleanup"), build_pass("discover"), build_pass("verify")]
    manifest = job.run()
    assert [p["pass"] for p in manifest["passes"]] == ["cleanup", "discover", "verify"]
    bad = CompileJob(job.source, job.backend, [build_pass("cleanup"), build_pass("discover"), PerturbWeight(1.05),
                                               build_pass("verify")], tmp_path / "bad", job.ctx, job.before)
    with pytest.raises(deploycomp.errors.VerificationError):
        bad.run()
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # another OpenVINO compile (~2.2 s)
def test_openvino_semantic_tokens_match_the_token_model(tmp_path):
    from deploycomp.tokens.stvit import SemanticTokenConfig, SemanticTokenViT

    out = tmp_path / "st"
    tokens = SemanticTokenConfig(tokens=4, layer=0)
    from safetensors.torch import save_file

    save_file(tiny_module("deit", seed=6).state_dict(), str(tmp_path / "w.safetensors"))
    manifest = deploycomp.compile(f"timm:{TINY['deit'][0]}", out, options(target="openvino-cpu", semantic_tokens=tokens,
                                                                         weights=str(tmp_path / "w.safetensors")))
    lowering = next(p for p in manifest["passes"] if p["pass"] == "lower_token_cluster")
    assert lowering["lowering"] == "reference"
    source = tiny_module("deit", seed=6)
    model = SemanticTokenViT(tiny_module("deit", seed=6), tokens.resolved(2)).eval()
    x = np.random.default_rng(3).standard_normal((3, *input_shape("deit")[1:])).astype(np.float32)
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
        unrewritten = source(torch.from_numpy(x)).numpy()
    got = run_openvino_ir(out / "model.xml", x)
    assert rel_l2(got, want) < 1e-4 and rel_l2(got, unrewritten) > 1e-3


@pytest.mark.slow  # another OpenVINO compile (~2 s); the quick tier has the fp32 one
def test_bf16_is_a_runtime_precision_on_openvino(tmp_path):
    from deploycomp.backends.openvino import has_bf16

    if not has_bf16():
        with pytest.raises(DeployCompError, match="needs a CPU with avx512_bf16 or AMX"):
            deploycomp.compile(f"timm:{TINY['deit'][0]}", tmp_path / "bf16", options(target="openvino-cpu", precision="bf16"))
        return
    manifest = deploycomp.compile(f"timm:{TINY['deit'][0]}", tmp_path / "bf16", options(target="openvino-cpu",
                                                                                          precision="bf16"))
    assert manifest["runtime_options"]["precision"] == "bf16" and manifest["target"]["inference_precision"] == "bf16"
    assert "precision" not in [p["pass"] for p in manifest["passes"]]  # the graph stays fp32
    errs = [c["rel_l2"] for c in manifest["parity"]["checks"]]
    assert all(e <= 2e-2 for e in errs) and max(errs) > 1e-5  # really ran in bf16, within its tolerance


def test_a_reference_on_another_backend_is_timed_in_the_same_interleaved_run(monkeypatch):
    """A runtime precision (OpenVINO's bf16 hint) is timed against the fp32 source on the fp32
    backend: both candidates go into one interleaved measurement, each built by its own backend, so
    their ratio is never one of two machine states."""
    import deploycomp.backends.base as base
    from deploycomp.bench.harness import Candidate

    calls = []

    def record(cands, **kw):
        calls.append([(c.name, c.meta["by"]) for c in cands])
        return {c.name: [0.001] for c in cands}

    class Named(base.BackendBase):
        def __init__(self, label):
            self.label = label

        def candidate(self, name, model, input_shape):
            return Candidate(name, "test", lambda batch: (lambda: None), meta={"by": self.label})

    monkeypatch.setattr(base, "measure_interleaved", record)
    low, fp32 = Named("bf16"), Named("fp32")
    out = base.time_against(low, fp32, {"unpruned": b"a", "pruned": b"b"}, "unpruned", (1, 3, 8, 8), 1, 2)
    assert calls == [[("unpruned", "fp32"), ("pruned", "bf16")]] and set(out) == {"unpruned", "pruned"}
    calls.clear()
    base.time_against(low, low, {"unpruned": b"a", "pruned": b"b"}, "unpruned", (1, 3, 8, 8), 1, 2)
    assert calls == [[("unpruned", "bf16"), ("pruned", "bf16")]]


@pytest.mark.slow  # a compile each (~2.5 s); calibration is quick in the second-anchor test
@pytest.mark.parametrize("drift", [1.0, 1.5])
def test_the_table_is_calibrated_on_the_unpruned_model(tmp_path, monkeypatch, drift):
    """compile --latency times the unpruned source and scales the table to predict it as measured:
    the scale is recorded, and a drift beyond the bound warns (with a prediction error of a
    runtime that fuses parts, the same mechanism corrects it)."""
    import warnings

    from deploycomp.errors import DeployCompWarning
    from deploycomp.latency.calibrate import DRIFT_WARN
    from deploycomp.pruning.schedule import PruneConfig

    from .models import DEIT, PRUNE_DEIT
    from .synthetic_tables import SimulatedDevice, flops_like, write_synthetic_table

    write_synthetic_table(tmp_path / "tables", flops_like)
    SimulatedDevice(flops_like, drift=drift).install(monkeypatch)
    prune = PruneConfig(latency="0.8x", steps=1, saliency_batches=1, batch_size=4, budget_rounds=0, method="magnitude")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = deploycomp.compile(DEIT, tmp_path / "out", deploycomp.CompileOptions(
            target="ort-cpu", model_kwargs=PRUNE_DEIT, prune=prune, tables=str(tmp_path / "tables"), measure_rounds=0,
            calibrate_rounds=1, seed=0))
    cal, p = manifest["latency_calibration"], manifest["pruning"]
    assert cal["anchor"] == "the unpruned source model" and cal["scale"] == pytest.approx(drift, rel=1e-6)
    assert cal["predicted_ms"] * drift == pytest.approx(cal["measured_ms"]) == pytest.approx(p["baseline_predicted_ms"])
    warned = [w for w in caught if issubclass(w.category, DeployCompWarning) and "re-profile" in str(w.message)]
    assert len(warned) == (1 if drift > DRIFT_WARN else 0)


@pytest.mark.slow  # profiles a tiny grid and compiles twice (~5 s quiet, ~17 s under load)
def test_openvino_profile_and_prune_to_a_table_budget(tmp_path):
    """profile --target openvino-cpu fills a table through the backend's own timing, and --latency
    on openvino-cpu prunes to the table's prediction (no on-device rounds: nothing here depends on
    the machine being quiet) and verifies through OpenVINO."""
    from deploycomp.latency.profiler import profile
    from deploycomp.pruning.schedule import PruneConfig

    backend = get_backend("openvino-cpu")
    table = profile(backend, tmp_path / "tables", batch=1, grid="tiny", protocol={"warmup": 1, "repeats": 2, "passes": 1})
    assert table.complete and table.fingerprint["target"] == "openvino-cpu"
    assert table.fingerprint["inference_precision"] == "f32" and table.path.parent.name == "openvino-cpu"
    # the budget below must not depend on how quiet the machine was while profiling: the measured
    # entries are replaced by a monotone cost model (ms ~ FLOPs) under the same fingerprint
    from deploycomp.latency.table import save_table

    for part in table.parts:
        for point in table.points(part):
            table.entries[part][",".join(map(str, point))] = {"samples_ms": []}
            table.add_samples(part, point, [0.05 + 1e-6 * float(np.prod(point))] * 2)
    table.path.unlink()  # save_table merges with the file's samples: start from none
    save_table(table, table.path)
    tiny = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "num_heads": 2, "depth": 2, "num_classes": 10}
    prune = PruneConfig(latency="0.6x", steps=2, saliency_batches=1, batch_size=4, budget_rounds=0, method="magnitude")
    # (no calibration: on a tiny model the device's fixed overheads would make a two-anchor curve
    # decide whether 0.6x is reachable; calibration is tested on SimulatedDevice)
    manifest = deploycomp.compile("timm:deit_tiny_patch16_224", tmp_path / "out", deploycomp.CompileOptions(
        target="openvino-cpu", model_kwargs=tiny, prune=prune, tables=str(tmp_path / "tables"), measure_rounds=1,
        calibrate_rounds=0, seed=0))
    p = manifest["pruning"]
    assert p["predicted_ms"] <= p["target_ms"] < p["baseline_predicted_ms"]
    assert manifest["source"]["latency_table"] == str(table.path)
    assert all(c["rel_l2"] <= 1e-4 for c in manifest["parity"]["checks"])
    assert (tmp_path / "out" / "model.xml").is_file()
    # an absolute budget is judged against the unpruned model measured on the device, not the table
    absolute = PruneConfig(latency="1000ms", steps=1, saliency_batches=1, batch_size=4, budget_rounds=1)
    with pytest.raises(DeployCompError, match="not below the unpruned model's measured .* ms at batch 1 on openvino-cpu"):
        deploycomp.compile("timm:deit_tiny_patch16_224", tmp_path / "abs", deploycomp.CompileOptions(
            target="openvino-cpu", model_kwargs=tiny, prune=absolute, tables=str(tmp_path / "tables"),
            calibrate_rounds=0, seed=0))
    assert not (tmp_path / "abs").exists()


@pytest.mark.slow  # NNCF calibration on images, two compiles (~26 s quiet, ~80 s under load)
def test_int8_on_openvino_passes_the_fidelity_gate_and_a_broken_quantization_does_not(tmp_path):
    """NNCF int8 as Q/DQ ONNX, run by OpenVINO, calibrated on real images and gated on held-out ones;
    then the same compile with the quantized weights scrambled must be refused, leaving nothing."""
    import onnx_ir as ir

    from deploycomp.passes.base import PassResult
    from deploycomp.passes.quantize import QuantizePass

    opts = dict(model_kwargs={"depth": 2}, measure_rounds=1, seed=0, target="openvino-cpu", precision="int8",
                data="fashion-mnist", calibration_samples=32, fidelity_samples=32)
    save_dir = tmp_path / "ok"
    job = plan_compile("timm:deit_fmnist_patch4_28", save_dir, deploycomp.CompileOptions(**opts))
    manifest = job.run()
    parity, quant = manifest["parity"], manifest["quantization"]
    assert parity["gate"] == "fidelity" and parity["agreement_gated"] and parity["inputs"].startswith("fashion-mnist/test")
    assert parity["cosine"] >= 0.99 and parity["top1_agreement"] >= 0.9 and parity["rel_l2"] > 1e-4  # lossy, but close
    assert quant["calibration"].startswith("fashion-mnist/train") and "warning" not in quant
    qdq = ir.load(save_dir / "model.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph) >= 8  # every block's matmuls
    # the artifact was timed interleaved with the graph as it was before quantization (fp32)
    assert not any(n.op_type == "QuantizeLinear" for n in job.ctx.fp32_model.graph)
    from deploycomp.ir.shapes import param_count  # int8 weights are weights; scales and zero points are not

    # (NNCF's SmoothQuant multipliers, per channel, count too: under 1 %)
    assert manifest["totals"]["params"] == pytest.approx(param_count(job.ctx.fp32_model), rel=0.01)
    lat = manifest["latency"]
    assert lat["speedup_vs_fp32"] == pytest.approx(lat["fp32"]["median_ms"] / lat["median_ms"])
    assert "the same graph at fp32, interleaved" in (save_dir / "report.md").read_text()

    class ScrambledQuantize(QuantizePass):
        def run(self, model, ctx):
            result = super().run(model, ctx)
            for value in result.model.graph.initializers.values():  # int8 weights shuffled
                arr = value.const_value.numpy() if value.const_value is not None else None
                if arr is not None and arr.dtype == np.int8 and arr.size > 64:
                    value.const_value = ir.tensor(np.random.default_rng(0).permutation(arr.ravel()).reshape(arr.shape),
                                                  name=value.name)
            return PassResult(result.model, True)

    bad = plan_compile("timm:deit_fmnist_patch4_28", tmp_path / "bad", deploycomp.CompileOptions(**opts))
    bad.passes = [ScrambledQuantize(samples=32) if p.name == "quantize" else p for p in bad.passes]
    with pytest.raises(deploycomp.errors.VerificationError, match="fidelity gate failed"):
        bad.run()
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # an int8 compile with its fidelity gate (~4.5 s)
def test_int8_on_ort_cpu_is_dynamic_and_gated(tmp_path):
    import onnx_ir as ir

    manifest = deploycomp.compile(f"timm:{TINY['deit'][0]}", tmp_path / "x", options(target="ort-cpu", precision="int8"))
    assert manifest["quantization"]["method"].startswith("onnxruntime dynamic int8")
    assert manifest["parity"]["gate"] == "fidelity" and manifest["parity"]["cosine"] >= 0.99
    graph = ir.load(tmp_path / "x" / "model.onnx")
    assert sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.graph) >= 8
    with pytest.raises(DeployCompError, match="target 'ort-cpu' runs precisions fp32, fp16, int8, not 'bf16'"):
        deploycomp.compile(f"timm:{TINY['deit'][0]}", tmp_path / "y", options(target="ort-cpu", precision="bf16"))
    assert not (tmp_path / "y").exists()


@pytest.mark.slow  # NNCF on a torch model (~2.3 s)
def test_the_openvino_int8_peer_runs_int8_kernels(tmp_path):
    """The OpenVINO + NNCF peer in bench is what an OpenVINO user makes (convert_model from torch,
    then NNCF): its compiled model must run the linear layers in int8. Built from our ONNX export
    instead, OpenVINO ran 48 of DeiT-Tiny's 49 in f32 and the peer measured like fp32."""
    import collections

    from deploycomp.backends.openvino import nncf_int8_ir

    from .models import timm_deit

    shape = (1, 3, 64, 64)
    module = timm_deit({"img_size": 64, "patch_size": 16, "embed_dim": 48, "num_heads": 3, "depth": 2, "num_classes": 10})
    backend = get_backend("openvino-cpu")
    xml = nncf_int8_ir(module, shape, tmp_path / "peer.xml", samples=4)
    runtime = backend.compiled(xml).get_runtime_model()
    kinds = collections.Counter(op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ordered_ops()
                                if op.get_rt_info()["layerType"].astype(str) == "FullyConnected")
    assert sum(kinds.values()) == 2 * 4 + 1 and set(kinds) <= {"i8", "u8"}, kinds


def test_the_ort_int8_peer_quantizes_every_linear_layer(tmp_path):
    """The ORT dynamic int8 peer in bench is what an ORT user makes from the raw export: ORT's
    quantization pre-processing, then ``quantize_dynamic``. Without the pre-processing, the export's
    weights reach the MatMuls through Transposes and none was quantized: the peer measured like fp32."""
    import collections

    import onnx

    from deploycomp.backends.ort import dynamic_int8
    from deploycomp.frontend.export import export_to_onnx

    from .models import timm_deit

    shape = (1, 3, 64, 64)
    module = timm_deit({"img_size": 64, "patch_size": 16, "embed_dim": 48, "num_heads": 3, "depth": 2, "num_classes": 10})
    peer = onnx.load(dynamic_int8(export_to_onnx(module, shape), tmp_path / "peer.onnx", preprocess=True))
    ops = collections.Counter(n.op_type for n in peer.graph.node)
    assert ops["MatMulInteger"] == 2 * 4 + 1, ops  # qkv, proj, fc1, fc2 per block, and the head


def test_calibration_interpolates_between_anchors_in_log_log():
    """Exact at each anchor, a power law between them reproduced exactly, constant beyond them
    (never extrapolated); one anchor is a constant scale."""
    from deploycomp.latency.calibrate import Calibration

    def drift(ms):
        return 0.4 * ms**0.2

    cal = Calibration.of([(400.0, 400.0 * drift(400.0)), (100.0, 100.0 * drift(100.0))])
    assert cal.predicted_ms == (100.0, 400.0)
    for ms in (100.0, 173.0, 250.0, 400.0):
        assert cal.scale_at(ms) == pytest.approx(drift(ms), rel=1e-9)
    assert cal.scale_at(20.0) == pytest.approx(drift(100.0)) and cal.scale_at(4000.0) == pytest.approx(drift(400.0))
    assert Calibration.of([(50.0, 60.0)]).scale_at(7.0) == pytest.approx(1.2)


def test_calibration_on_several_anchors_is_their_least_squares_line():
    """Several noisy anchors: the scale follows the least-squares line through their log scales (so
    one noisy anchor moves it by its share, not all the way), held constant beyond them."""
    from deploycomp.latency.calibrate import Calibration

    noise = {30.0: 1.08, 60.0: 0.93, 90.0: 1.0, 200.0: 1.0}  # log-noise summing to ~0 around scale 1.1
    cal = Calibration.of([(p, p * 1.1 * n) for p, n in noise.items()])
    x, y = np.log(list(noise)), np.log(1.1 * np.array(list(noise.values())))
    slope, intercept = np.polyfit(x, y, 1)
    for ms in (30.0, 45.0, 120.0, 200.0):
        assert cal.scale_at(ms) == pytest.approx(np.exp(intercept + slope * np.log(ms)), rel=1e-9)
    assert cal.scale_at(5.0) == pytest.approx(cal.scale_at(30.0)) and cal.scale_at(900.0) == pytest.approx(cal.scale_at(200.0))
    assert abs(cal.scale_at(30.0) / 1.1 - 1) < 0.05  # not the 8 % of its own noisy anchor
    assert Calibration.of([(50.0, 60.0), (50.0, 50.0)]).scale_at(7.0) == pytest.approx((1.2 * 1.0) ** 0.5)


def test_a_drift_that_depends_on_size_is_calibrated_by_the_second_anchor(tmp_path, monkeypatch):
    """On a device that runs small models relatively faster than the table says (ort-cpu at batch 8:
    the full DeiT-B at 1.02x the table, 20 smaller models at 0.94x), the unpruned source alone
    calibrates the wrong scale for the pruned model. compile times a uniformly and a non-uniformly
    narrowed copy near the budget as well, so the calibrated prediction of the pruned artifact
    matches the device."""
    import onnx

    from deploycomp.latency.arch import BlockArch, ViTArch
    from deploycomp.latency.predictor import LatencyPredictor
    from deploycomp.latency.table import load_table
    from deploycomp.pruning.schedule import PruneConfig

    from .models import DEIT, PRUNE_DEIT
    from .synthetic_tables import SimulatedDevice, flops_like, write_synthetic_table

    write_synthetic_table(tmp_path / "tables", flops_like)
    device = SimulatedDevice(flops_like, drift=lambda ms: ms**0.25).install(monkeypatch)
    prune = PruneConfig(latency="0.5x", steps=1, saliency_batches=1, batch_size=4, budget_rounds=0, method="magnitude")
    manifest = deploycomp.compile(DEIT, tmp_path / "out", deploycomp.CompileOptions(
        target="ort-cpu", model_kwargs=PRUNE_DEIT, prune=prune, tables=str(tmp_path / "tables"), measure_rounds=0,
        calibrate_rounds=1, seed=0))
    cal = manifest["latency_calibration"]
    source, uniform, non_uniform = cal["anchors"]
    for narrowed in (uniform, non_uniform):
        assert 0.3 < narrowed["predicted_ms"] / source["predicted_ms"] < 0.7, narrowed  # near the 0.5x budget
    dims = [{(b["heads"], b["qk_dim"], b["v_dim"], b["mlp_dim"]) for b in a["arch"]["blocks"]} for a in (uniform, non_uniform)]
    assert len(dims[0]) == 1 and len(dims[1]) > 1  # every block alike, then blocks that differ
    assert any(b["qk_dim"] < source["arch"]["blocks"][0]["qk_dim"] for b in non_uniform["arch"]["blocks"])
    artifact = onnx.load(tmp_path / "out" / "model.onnx").SerializeToString()
    on_device = device.device_ms(artifact)
    arch = manifest["pruning"]["arch"]
    arch = ViTArch(arch["emb"], tuple(BlockArch(**b) for b in arch["blocks"]),
                   **{k: arch[k] for k in ("img_size", "patch", "in_chans", "num_classes")})
    raw = LatencyPredictor(load_table(Path(manifest["source"]["latency_table"]))).predict(arch).total_ms
    assert abs(raw * source["scale"] / on_device - 1) > 0.05  # the planted one-anchor calibration would miss
    assert manifest["pruning"]["predicted_ms"] == pytest.approx(on_device, rel=0.02)
