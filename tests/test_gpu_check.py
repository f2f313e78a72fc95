"""scripts/gpu_check.py without a GPU: its dry run (checks 1-2 at tiny sizes, CPU only) passes, and its
launch validation catches a wrong argument list. Keeps the GPU script from rotting between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploycomp.kernels import trt_plugin as tp
from deploycomp.kernels import trt_standin as ts

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run_script(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a fresh interpreter running checks 1-2 (~9 s quiet, ~36 s under load)
def test_dry_run_passes(tmp_path):
    proc = run_script("--dry-run", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["passed"] is True
    checks = {c["check"]: c for c in report["checks"]}
    assert sorted(checks) == [1, 2] and all(c["status"] == "passed" for c in checks.values())
    kernel = checks[1]["cases"]
    assert len(kernel) == 8 and all(r["passed"] for r in kernel)
    assert {r["entry"] for r in kernel} == {"launcher", "aot"} and {r["dtype"] for r in kernel} == {"float32", "float16"}
    assert any(r["shape"].get("layout") == "fused" for r in kernel)
    validated = [r for r in checks[2]["cases"] if not r.get("interpreted")]
    interpreted = [r for r in checks[2]["cases"] if r.get("interpreted")]
    assert len(validated) == len(interpreted) == 4
    for r in validated:
        assert r["problems"] == [] and r["ptxas"] == "assembled" and r["params"] == 3 + 11 + 1
        assert r["ptx_isa"] == "8.0"  # no driver here: the documented floor for sm_90
    assert all(r["passed"] and r["max_abs_err"] <= r["tolerance"] for r in interpreted)
    assert "overall: **passed**" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow  # two fresh interpreters (~2 s)
def test_refusals(tmp_path):
    r = run_script("--dry-run", "--checks", "3", tmp_path, timeout=60)
    assert r.returncode == 2 and "dry run has checks 1-2" in r.stderr
    import torch

    if not torch.cuda.is_available():
        r = run_script(tmp_path, timeout=120)
        assert r.returncode == 2 and r.stderr.strip() == "error: no CUDA GPU visible to torch; on a CPU use --dry-run"


def test_launch_validation_catches_a_wrong_argument_list(gpu_check, monkeypatch):
    """The validation of check 2 refuses swapped int32 scalars and a wrong grid (the checks bite)."""
    monkeypatch.setattr(tp, "_REGISTERED", {})
    shape = gpu_check.DRY_PLUGIN_SHAPES[0]
    with ts.installed():
        tp.register(90)
        descs = [ts.TensorDesc((shape["b"], t, shape["h"] * d), ts.float16, constant_axes=(2,))
                 for t, d in ((shape["m"], shape["dq"]), (shape["n"], shape["dq"]), (shape["n"], shape["dv"]))]
        out = (ts.TensorDesc((shape["b"], shape["m"], shape["h"] * shape["dv"]), ts.float16, constant_axes=(2,)),)
        name, ptx, params, extra = tp._aot(*descs, shape["h"], shape["dq"] ** -0.5, out, 0)
    assert gpu_check.validate_launch(90, shape, "float16", name, ptx, params, extra)["problems"] == []
    swapped = ts.SymIntExprs.from_tuple([extra[0], extra[1], extra[2], extra[3], extra[4], extra[6], extra[5],
                                         *extra[7:]])  # k's batch and token strides exchanged
    problems = gpu_check.validate_launch(90, shape, "float16", name, ptx, params, swapped)["problems"]
    assert len(problems) == 1 and problems[0].startswith("int32 scalars")
    params.grid_y = 1
    problems = gpu_check.validate_launch(90, shape, "float16", name, ptx, params, extra)["problems"]
    assert len(problems) == 1 and problems[0].startswith("grid")


def test_model_check_bookkeeping_on_cpu(gpu_check, tmp_path):
    """Check 4's variants and speed-up bookkeeping, on CPU in float32 at batch 1 with a plain timer
    (the GPU run uses bf16, CUDA graphs and batches 1/64/256)."""
    import time

    import torch

    def cpu_ms(model, batch):
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            t0 = time.perf_counter()
            assert model(x).shape == (batch, 1000)
            return (time.perf_counter() - t0) * 1e3

    rec = gpu_check.Recorder(tmp_path / "check4.json", 4, dry=True)
    assert gpu_check.check_models(rec, device="cpu", dtype="float32", batches=(1,), timer=cpu_ms,
                                  names=("deit_small_patch16_224",)) == "done"
    rows = {r["variant"]: r for r in rec.data["cases"]}
    assert sorted(rows) == sorted(["timm DeiT", "FlexViT unpruned", "FlexViT unpruned, written-out attention",
                                   "STViT 16 tokens"] + [
        f"FlexViT {b} {m} plan" for b in ("0.5x", "0.3x") for m in ("magnitude", "uniform")])
    for label, r in rows.items():
        base = rows[r["baseline"]]["ms"]
        assert r["speedup"] == pytest.approx(base / r["ms"])
    assert rows["FlexViT 0.3x uniform plan"]["baseline"] == "FlexViT unpruned"
    assert rows["STViT 16 tokens"]["baseline"] == "timm DeiT"


def test_a_check_past_its_timeout_is_stopped_and_reported(gpu_check, tmp_path):
    """A 0.05 s timeout: no check's worker (a fresh interpreter importing torch and triton) gets that
    far, so the run must be stopped and reported whatever the machine's speed (3 s was passed once
    imports got lazier)."""
    result = gpu_check.run_check(1, tmp_path, True, timeout=0.05)
    assert result["status"] == "timeout" and result["seconds"] < 10
    assert "0.05 s timeout" in result["notes"][-1]


def test_training_check_on_cpu(gpu_check, tmp_path):
    """Check 5's equivalence part with the CPU standing in for the GPU: the same weights and batches
    end at the same weights, and they moved (a trainer that ignored the device would also pass here;
    what the GPU run adds is the device)."""
    rec = gpu_check.Recorder(tmp_path / "check5.json", 5, dry=True)
    assert gpu_check.check_training(rec, device="cpu", proxy=False) == "passed"
    (row,) = rec.data["cases"]
    assert row["moved_l2"] > 1e-3 and row["apart_l2"] == 0.0 and row["steps"] == 24
