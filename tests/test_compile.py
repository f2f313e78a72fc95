"""compile end to end through the API: parity, manifest, the verification gate, weights, ONNX input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import deploycomp
from deploycomp.errors import DeployCompError, VerificationError
from deploycomp.passes.base import Pass, PassResult
from deploycomp.passes.verify import relative_l2

from .conftest import TINY, input_shape, run_ort, tiny_module


def options(family, **kw):
    """ort-cpu: these tests run the artifact's model.onnx with ONNX Runtime (openvino-cpu's IR is
    checked in test_backends.py)."""
    return deploycomp.CompileOptions(target="ort-cpu", model_kwargs=dict(TINY[family][1]), measure_rounds=1, **kw)


@pytest.mark.parametrize("family", ["deit", pytest.param("swin", marks=pytest.mark.slow)])
def test_artifact_matches_torch(tmp_path, family):
    """The artifact's model.onnx, run here by ONNX Runtime at batch sizes verification did not use,
    equals the torch model built here from the same weights; the same model with one weight 1 % off
    does not (the comparison can fail). The manifest's own parity numbers are not trusted."""
    from safetensors.torch import save_file

    from .models import perturbed

    module = tiny_module(family, seed=4)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    out = tmp_path / "out"
    manifest = deploycomp.compile(f"timm:{TINY[family][0]}", out, options(family, weights=str(weights)))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "report.md"]
    wrong = perturbed(module)
    for batch in (5, 7):
        x = np.random.default_rng(batch).standard_normal((batch, *input_shape(family)[1:])).astype(np.float32)
        with torch.inference_mode():
            want, control = module(torch.from_numpy(x)).numpy(), wrong(torch.from_numpy(x)).numpy()
        got = run_ort(out / "model.onnx", x)
        err = relative_l2(got, want)
        assert got.shape == (batch, 1000) and err <= 1e-4, (batch, err)
        assert relative_l2(got, control) > max(1e-4, 10 * err), batch
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["parity"] == manifest["parity"] and manifest["parity"]["reference"] == "torch"
    assert [c["batch"] for c in manifest["parity"]["checks"]] == [1, 3]
    tgt = manifest["target"]
    for key in ("cpu_model", "cores", "threads", "backend_version", "target"):
        assert tgt[key]
    assert manifest["runtime_options"]["optimization_level"] == "all"
    assert manifest["deploycomp_version"] == deploycomp.__version__
    assert len(manifest["structure"]["blocks"]) == (2 if family == "deit" else 4)
    assert manifest["latency"]["median_ms"] > 0
    assert manifest["totals"]["artifact_bytes"] == (out / "model.onnx").stat().st_size
    cost = manifest["compile"]
    assert cost["seconds"] > 0 and cost["peak_rss_mib"] > 50 and cost["peak_rss_scope"] == "compile"
    assert f"peak memory {cost['peak_rss_mib']:.0f} MiB" in (out / "report.md").read_text()


def test_compile_peak_memory_is_its_own():
    """The peak-memory window restarts per compile: an allocation before it does not count, one
    inside it does (a benchmark compiles many models in one process)."""
    from deploycomp.job import peak_memory, start_compile_meter

    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    del big
    start_compile_meter()
    before = peak_memory()["peak_rss_mib"]
    big = np.ones(400 * 2**20 // 8)
    inside = peak_memory()["peak_rss_mib"]
    del big
    assert inside - before > 350, (before, inside)
    start_compile_meter()
    assert peak_memory()["peak_rss_mib"] < inside - 350


@pytest.mark.slow  # a compile each (~1.7 s); weights files reach a compile quickly in test_backends.py (openvino vs torch)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_are_loaded_and_verified(tmp_path, suffix):
    module = tiny_module("deit", seed=3)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(module.state_dict(), str(path))
    else:
        torch.save({"model": module.state_dict()}, path)
    out = tmp_path / "out"
    deploycomp.compile(f"timm:{TINY['deit'][0]}", out, options("deit", weights=str(path)))
    x = np.random.default_rng(0).standard_normal((2, *input_shape("deit")[1:])).astype(np.float32)
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).numpy()
    got = run_ort(out / "model.onnx", x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_onnx_file_input(tmp_path, exported):
    path, module = exported("swin", "torchscript")
    out = tmp_path / "out"
    manifest = deploycomp.compile(str(path), out, deploycomp.CompileOptions(measure_rounds=0))
    assert manifest["parity"]["reference"] == "onnx"
    assert manifest["structure"]["family"] == "swin"
    x = np.random.default_rng(0).standard_normal((2, *input_shape("swin")[1:])).astype(np.float32)
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).numpy()
    got = run_ort(out / "model.onnx", x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


class PerturbWeight(Pass):
    """A wrong rewrite: scales one weight, as a buggy pass would."""

    name = "perturb"

    def __init__(self, scale):
        self.scale = scale

    def run(self, model, ctx):
        import onnx_ir as ir

        value = next(v for n, v in model.graph.initializers.items() if n.endswith("fc1.weight"))
        value.const_value = ir.tensor(value.const_value.numpy() * self.scale, name=value.name)
        return PassResult(model, True)


def with_planted_bug(job, scale: float):
    """The job's own pipeline with a wrong rewrite planted right before the verification gate."""
    job.passes = job.passes[:-1] + [PerturbWeight(scale), job.passes[-1]]
    return job


@pytest.mark.slow  # the gate is quick in test_gate.py (~1.9 s)
def test_verification_gate_refuses_a_wrong_rewrite(tmp_path):
    from deploycomp import api

    out = tmp_path / "out"
    job = with_planted_bug(api.plan_compile(f"timm:{TINY['deit'][0]}", out, options("deit")), 1.01)
    with pytest.raises(VerificationError, match="relative L2 error .* > 0.0001"):
        job.run()
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left behind either


def test_failed_compile_keeps_the_previous_artifact(tmp_path):
    from deploycomp import api

    out = tmp_path / "out"
    deploycomp.compile(f"timm:{TINY['deit'][0]}", out, options("deit"))
    before = (out / "manifest.json").read_text()
    with pytest.raises(VerificationError):
        with_planted_bug(api.plan_compile(f"timm:{TINY['deit'][0]}", out, options("deit")), 2.0).run()
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow  # another compile (~2.2 s)
def test_ort_fusion_pass_is_verified(tmp_path):
    manifest = deploycomp.compile(f"timm:{TINY['deit'][0]}", tmp_path / "out", options("deit", fuse=True))
    fusion = next(p for p in manifest["passes"] if p["pass"] == "ort_fusion")
    assert fusion["modified"] and fusion["fused_ops"]
    assert all(c["rel_l2"] <= 1e-4 for c in manifest["parity"]["checks"])


def test_output_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DeployCompError, match="not a directory"):
        deploycomp.compile(f"timm:{TINY['deit'][0]}", f, options("deit"))
