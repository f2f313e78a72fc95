"""The deploycomp command end to end on a tiny model, and every bad input: one line, exit 2, nothing left."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import TINY, tiny_module

DEIT = f"timm:{TINY['deit'][0]}"
DEIT_ARGS = [arg for k, v in TINY["deit"][1].items() for arg in ("--model-arg", f"{k}={v}")]


def cli(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "deploycomp.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
def test_compile_inspect_bench(tmp_path):
    out = tmp_path / "out"
    r = cli("compile", DEIT, *DEIT_ARGS, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "deploycomp report" in r.stdout and "passed" in r.stdout
    r = cli("inspect", out)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.strip().startswith("│")]
    assert len(rows) == 2 and all("192" in row and "768" in row for row in rows)
    r = cli("inspect", out, "--groups")
    assert "block0.heads (heads, 3 units)" in r.stdout
    r = cli("bench", out, "--baselines", "deit_tiny", *DEIT_ARGS, "--rounds", "2", "--iters", "1", "--batch", "2")
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "bench.json").read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == [f"deploycomp:{DEIT}", "torch:deit_tiny_patch16_224", "ort:deit_tiny_patch16_224",
                         "openvino:deit_tiny_patch16_224"]
    for row in result["rows"]:
        assert row["latency_b1"]["n"] == 2 and row["latency_b1"]["median_ms"] > 0
        assert row["throughput"]["batch"] == 2 and row["throughput"]["median_img_s"] > 0
    assert "deploycomp:" in r.stdout


@pytest.mark.slow
def test_help_is_there():
    r = cli("--help")
    assert r.returncode == 0
    for verb in ("compile", "inspect", "bench"):
        assert verb in r.stdout
    r = cli("compile", "--help")
    assert "--weights" in r.stdout and "--target" in r.stdout


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    module = tiny_module("deit")
    good = d / "good.pth"
    torch.save(module.state_dict(), good)
    (d / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    from safetensors.torch import save_file

    save_file(module.state_dict(), str(d / "good.safetensors"))
    (d / "truncated.safetensors").write_bytes((d / "good.safetensors").read_bytes()[:1000])
    state = module.state_dict()
    torch.save({("renamed." + k): v for k, v in state.items()}, d / "wrong_keys.pth")
    shapes = dict(state)
    shapes["head.weight"] = torch.zeros(10, shapes["head.weight"].shape[1])
    torch.save(shapes, d / "wrong_shapes.pth")
    save_file({("renamed." + k): v.contiguous() for k, v in state.items()}, str(d / "wrong_keys.safetensors"))
    save_file({k: v.contiguous() for k, v in shapes.items()}, str(d / "wrong_shapes.safetensors"))
    (d / "garbage.onnx").write_bytes(b"this is not a protobuf")
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    cnn(torch.randn(1, 3, 8, 8))
    torch.onnx.export(cnn.eval(), (torch.randn(1, 3, 8, 8),), str(d / "cnn.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "b"}})
    return d


BAD = {
    "missing weights": (["--weights", "{d}/nope.pth"], "weights file not found"),
    "truncated pth": (["--weights", "{d}/truncated.pth"], "corrupt or unreadable checkpoint"),
    "truncated safetensors": (["--weights", "{d}/truncated.safetensors"], "corrupt or unreadable checkpoint"),
    "wrong keys": (["--weights", "{d}/wrong_keys.pth"], "missing keys .*unexpected keys"),
    "wrong shapes": (["--weights", "{d}/wrong_shapes.pth"], r"shape mismatch head.weight \(10, 192\) vs \(1000, 192\)"),
    "wrong keys safetensors": (["--weights", "{d}/wrong_keys.safetensors"], "missing keys .*unexpected keys"),
    "wrong shapes safetensors": (["--weights", "{d}/wrong_shapes.safetensors"],
                                 r"shape mismatch head.weight \(10, 192\) vs \(1000, 192\)"),
    "eta without the additive score": (["--latency", "0.5x", "--eta", "0"],
                                       "--eta weighs NViT's additive score; --selection ratio does not use it"),
    "unknown selection rule": (["--latency", "0.5x", "--selection", "largest"],
                               "unknown selection rule 'largest': use additive or ratio"),
    "unknown target": (["--target", "tpu-v9"], "unknown target 'tpu-v9': available targets are openvino-cpu, ort-cpu, ort-cuda, ort-trt, tensorrt"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_timm_inputs(tmp_path, bad_files, case):
    import re

    extra, message = BAD[case]
    out = tmp_path / "out"
    r = cli("compile", DEIT, *DEIT_ARGS, *(a.format(d=bad_files) for a in extra), "-o", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("model,message", [
    ("timm:vit_no_such_model_224", "unknown model 'timm:vit_no_such_model_224': not in timm's registry"),
    ("timm:vit_base_patch16_siglip_224", "timm:vit_base_patch16_siglip_224 cannot be compiled: attention-pooling head"),
    ("{d}/missing.onnx", "model file not found"),
    ("{d}/garbage.onnx", "not a valid ONNX model"),
    ("{d}/cnn.onnx", "not a ViT: no self-attention"),
])
def test_bad_models(tmp_path, bad_files, model, message):
    out = tmp_path / "out"
    r = cli("compile", model.format(d=bad_files), "-o", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_inspect_non_vit(bad_files):
    r = cli("inspect", bad_files / "cnn.onnx")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: not a ViT:")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["/proc/deploycomp-test/out", "{tmp}/file/out"])
def test_unwritable_output(tmp_path, where):
    (tmp_path / "file").write_text("a file, not a directory")
    r = cli("compile", DEIT, *DEIT_ARGS, "-o", where.format(tmp=tmp_path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip().startswith("error: output directory is not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    r = cli("compile", DEIT, *DEIT_ARGS, "-o", out)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


@pytest.mark.slow
def test_profile_tiny_grid_then_refuse_another_device(tmp_path):
    r = cli("profile", "--target", "ort-cpu", "--grid", "tiny", "--tables", tmp_path, "--threads", "1")
    assert r.returncode == 0, r.stderr
    (table,) = (tmp_path / "ort-cpu").glob("*.json")
    data = json.loads(table.read_text())
    assert data["complete"] and data["fingerprint"]["threads"] == 1
    data["fingerprint"]["cpu_model"] = "Another CPU"
    table.write_text(json.dumps(data))
    r = cli("profile", "--target", "ort-cpu", "--grid", "tiny", "--tables", tmp_path, "--threads", "1")
    assert r.returncode == 2 and "measured on another device (cpu_model" in r.stderr


def test_profile_force_uses_a_table_of_another_device(tmp_path, monkeypatch, capsys):
    """A table at this device's path whose fingerprint names another CPU: ``profile`` refuses it with
    one error; ``profile --force`` uses it as it is (nothing re-measured, the file unchanged)."""
    from .synthetic_tables import mlp_only, write_synthetic_table
    from .test_gate import run_cli

    path = write_synthetic_table(tmp_path, mlp_only, threads=1)
    data = json.loads(path.read_text())
    data["fingerprint"]["cpu_model"] = "Another CPU"
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    code, err = run_cli(monkeypatch, capsys, "profile", "--target", "ort-cpu", "--grid", "tiny", "--tables", tmp_path, "--threads", "1")
    assert code == 2 and err.strip().startswith("error: latency table") and "cpu_model: table 'Another CPU'" in err
    code, err = run_cli(monkeypatch, capsys, "profile", "--target", "ort-cpu", "--grid", "tiny", "--tables", tmp_path, "--threads", "1",
                        "--force")
    assert code == 0, err
    assert path.read_bytes() == before and sorted(p.name for p in (tmp_path / "ort-cpu").iterdir()) == \
        sorted([path.name, path.name + ".lock"])


def _table_of_another_isa(tmp_path):
    """A synthetic tiny-grid table of this device, but stamped with another instruction set."""
    from .synthetic_tables import mlp_only, write_synthetic_table

    data = json.loads(write_synthetic_table(tmp_path, mlp_only, threads=1).read_text())
    data["fingerprint"]["isa"] = "avx512-vnni-bf16" if data["fingerprint"]["isa"] != "avx512-vnni-bf16" else "avx2"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    return other, ("profile", "--target", "ort-cpu", "--grid", "tiny", "--threads", "1", "--table", other)


def test_profile_validates_a_named_table_only_with_validate_and_another_cpus_only_forced(tmp_path, monkeypatch, capsys):
    """``profile --table FILE --validate N`` times FILE's predictions on this machine; a table of
    another instruction set is refused unless forced, and ``--table`` alone is refused."""
    from .test_gate import run_cli

    _, args = _table_of_another_isa(tmp_path)
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "--table names a table to validate on this device: give --validate N" in err
    code, err = run_cli(monkeypatch, capsys, *args, "--validate", "1", "--json", tmp_path / "v.json")
    assert code == 2 and "measured on another device (isa: table" in err and not (tmp_path / "v.json").exists()


@pytest.mark.slow  # compiles and times one architecture against four anchors (~40 s)
def test_profile_validates_another_cpus_table_when_forced(tmp_path, monkeypatch, capsys):
    from .test_gate import run_cli

    other, args = _table_of_another_isa(tmp_path)
    code, err = run_cli(monkeypatch, capsys, *args, "--validate", "1", "--json", tmp_path / "v.json", "--force")
    assert code == 0, err
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["table"] == str(other) and report["n"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--dtype", "fp16"], "runs precisions fp32, bf16, int8, not 'fp16'"),
    (["--grid", "huge"], "unknown grid 'huge'"),
    (["--target", "tpu"], "unknown target 'tpu'"),
])
def test_profile_bad_options(tmp_path, args, message):
    r = cli("profile", "--tables", tmp_path, *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.rglob("*.json"))


# Each source family's refusal of a bad flag or of a model / graph the compiler cannot express,
# decided from the flags, the config file or the graph alone. {d}: the test's files.
TORCH_FREE_REFUSALS = {
    "timm: bad flags": (["timm:deit_tiny_patch16_224", "--precision", "auto"], "give --latency"),
    "timm: not a square": (["timm:deit_tiny_patch16_224", "--semantic-tokens", "15"], "give a square number"),
    "hf: unsupported architecture": (["hf:{d}/swin"], "'SwinModel' is not a supported ViT"),
    "hf-config: unsupported activation": (["hf-config:{d}/relu.json"], "activation 'relu' is not supported"),
    "hf-config: bad flags": (["hf-config:{d}/relu.json", "--model-arg", "depth=2"], "--model-arg applies to timm"),
    "hf-config: tokens beyond the grid": (["hf-config:{d}/vit.json", "--semantic-tokens", "256"],
                                          "cannot pool a 4x4 patch grid to 16x16"),
    "open_clip: ResNet tower": (["open_clip:RN50"], "ModifiedResNet, not a ViT"),
    "open_clip: attentional pooling": (["open_clip:coca_ViT-B-32", "--semantic-tokens", "16"], "attentional pooling"),
    "open_clip: tokens beyond the grid": (["open_clip:ViT-B-16", "--semantic-tokens", "256"],
                                          "cannot pool a 14x14 patch grid to 16x16"),
    "onnx: post-norm graph": (["{d}/post_norm.onnx", "--latency", "0.5x", "--target", "ort-cpu"], "post-norm"),
    "onnx: bad flags": (["{d}/post_norm.onnx", "--semantic-tokens", "4", "--feature-loss", "l1"], "unknown feature loss 'l1'"),
    "onnx: not a ViT": (["{d}/cnn.onnx", "--target", "ort-cpu"], "not a ViT"),
}


@pytest.mark.slow
def test_refusals_import_no_torch(tmp_path):
    """The CLI checks a request before it imports the compiler's heavy modules: for every source
    family, a bad flag and a model or graph it cannot express are refused in one line, exit 2,
    nothing written, and torch was never imported (the refusal reads the flags, the hf config.json,
    open_clip's bundled config file or the graph's structure; a plain compile builds only the passes it
    runs). About imports, not speed: importing
    torch (and timm) is most of a slow refusal's time. One fresh process runs every case."""
    import importlib.util

    import timm
    from timm.models.vision_transformer import ResPostBlock

    from .conftest import export

    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed")
    d = tmp_path / "files"
    (d / "swin").mkdir(parents=True)
    (d / "swin" / "config.json").write_text(json.dumps({"model_type": "swin", "architectures": ["SwinModel"]}))
    (d / "swin" / "model.safetensors").write_bytes(b"")
    (d / "relu.json").write_text(json.dumps({"model_type": "vit", "hidden_act": "relu", "hidden_size": 32}))
    (d / "vit.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTForImageClassification"],
                                            "image_size": 64, "patch_size": 16}))
    post_norm = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                  block_fn=ResPostBlock, num_classes=4).eval()
    export(post_norm, (1, 3, 32, 32), "torchscript", d / "post_norm.onnx")
    export(torch.nn.Conv2d(3, 4, 3).eval(), (1, 3, 32, 32), "torchscript", d / "cnn.onnx")
    cases = {name: [a.format(d=d) for a in args] + ["-o", str(tmp_path / "out")]
             for name, (args, _) in TORCH_FREE_REFUSALS.items()}
    code = ("import contextlib, io, json, sys\nfrom deploycomp.cli import main\nresults = {}\n"
            f"for name, args in {cases!r}.items():\n"
            "    sys.argv, err = ['deploycomp', 'compile', *args], io.StringIO()\n"
            "    try:\n        with contextlib.redirect_stderr(err):\n            main()\n"
            "    except SystemExit as exc:\n        results[name] = [exc.code, err.getvalue(), 'torch' in sys.modules]\n"
            "print(json.dumps(results))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert list(results) == list(TORCH_FREE_REFUSALS), r.stdout
    for name, (exit_code, err, torch_imported) in results.items():
        lines = err.strip().splitlines()
        assert exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert TORCH_FREE_REFUSALS[name][1] in lines[0], (name, err)
        assert not torch_imported, f"{name}: torch was imported before the refusal"
    assert not (tmp_path / "out").exists()
