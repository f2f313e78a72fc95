"""Latency tables per (target, precision) and one budget over width x precision, on synthetic tables.

Known answers (TINY_DEIT of test_prune_compile: 2 blocks, MLP 128 each, MLP chunks of 16): the fp32
table :func:`mlp_only` predicts 0.64 + S ALPHA ms for S MLP channels in all (3.2 ms unpruned); the
int8 table :func:`mlp_only_int8` 0.64 + S ALPHA / 2 (1.92 ms unpruned). A 0.46x budget is relative
to the fp32 source: 1.472 ms. fp32 must keep S <= 83.2 -> S = 80; int8 S <= 166.4 -> S = 160.
"""

from __future__ import annotations

import json

import pytest

from deploycomp.api import CompileOptions, compile
from deploycomp.pruning.schedule import PruneConfig

from .models import DEIT
from .synthetic_tables import ALPHA, SimulatedDevice, mlp_only, mlp_only_int8, write_synthetic_table
from .test_gate import model_args, run_cli
from .test_prune_compile import SIZES, TINY_DEIT, mlp_dims

BASELINE_MS = 0.64 + 256 * ALPHA
INT8_MS = 0.64 + 256 * ALPHA / 2
BUDGET = "0.46x"


@pytest.fixture(scope="module")
def precision_tables(tmp_path_factory):
    """This device's tiny ort-cpu tables: fp32 from mlp_only, int8 from mlp_only_int8."""
    root = tmp_path_factory.mktemp("precision_tables")
    write_synthetic_table(root, mlp_only)
    write_synthetic_table(root, mlp_only_int8, precision="int8")
    return root


def compile_at(tmp_path, tables, precision: str, name: str = "out", **prune):
    config = PruneConfig(**{"steps": 2, "saliency_batches": 2, "batch_size": 8, "group_sizes": SIZES,
                            "budget_rounds": 0, "latency": BUDGET, "kinds": ("mlp",), **prune})
    options = CompileOptions(target="ort-cpu", model_kwargs=dict(TINY_DEIT), prune=config, tables=str(tables),
                             measure_rounds=1, seed=0, precision=precision, sensitivity_samples=0)
    return compile(DEIT, tmp_path / name, options)


def test_the_int8_table_makes_a_budget_need_less_pruning(tmp_path, precision_tables, monkeypatch):
    """The same 0.46x budget of the fp32 source: fp32 keeps 80 MLP channels, int8 160 (its table
    counts the int8 speed toward the budget); the int8 prediction is the int8 table's, its baseline
    the fp32 table's, and the levers split the predicted speed-up into precision x width."""
    SimulatedDevice(mlp_only, int8=mlp_only_int8).install(monkeypatch)
    fp32 = compile_at(tmp_path, precision_tables, "fp32", "fp32")
    int8 = compile_at(tmp_path, precision_tables, "int8", "int8")
    assert sum(mlp_dims(fp32)) == 80 and sum(mlp_dims(int8)) == 160
    p = int8["pruning"]
    assert p["precision"] == "int8" and "-int8-" in p["tables"]["predictions"] and "-fp32-" in p["tables"]["budget"]
    assert p["baseline_predicted_ms"] == pytest.approx(BASELINE_MS, rel=1e-9)
    assert p["target_ms"] == pytest.approx(0.46 * BASELINE_MS, rel=1e-9)
    assert p["predicted_ms"] == pytest.approx(0.64 + 160 * ALPHA / 2, rel=1e-9)
    levers = p["levers"]
    assert levers["precision"] == pytest.approx(BASELINE_MS / INT8_MS, rel=1e-9)
    assert levers["tokens"] == pytest.approx(1.0, rel=1e-9)
    assert levers["width"] == pytest.approx(INT8_MS / (0.64 + 160 * ALPHA / 2), rel=1e-9)
    assert levers["total"] == pytest.approx(levers["precision"] * levers["width"], rel=1e-9)
    # measured (simulated): the int8 artifact against the fp32 source, as the budget is stated
    assert p["latency"]["measured_ratio"] == pytest.approx((0.64 + 160 * ALPHA / 2) / BASELINE_MS, rel=1e-9)
    assert int8["quantization"]["method"].startswith("onnxruntime dynamic int8")
    assert fp32["pruning"]["levers"]["precision"] == pytest.approx(1.0)
    report = (tmp_path / "int8" / "report.md").read_text()
    assert f"precision {BASELINE_MS / INT8_MS:.2f}x, tokens 1.00x, width {INT8_MS / 1.44:.2f}x" in report


@pytest.mark.slow  # two compiles (~3 s); the quick tier keeps the int8-table budget
def test_auto_picks_int8_when_its_table_is_faster(tmp_path, precision_tables, monkeypatch):
    """--precision auto with fp32 and int8 tables: int8 predicts the source at 0.6x of fp32, so it is
    chosen (fp32 would need twice the pruning), the compile runs the int8 path (the quantize pass and
    its gate), and the answer is int8's: 160 MLP channels."""
    SimulatedDevice(mlp_only, int8=mlp_only_int8).install(monkeypatch)
    manifest = compile_at(tmp_path, precision_tables, "auto")
    choice = manifest["precision_choice"]
    assert choice["precision"] == "int8" and set(choice["candidates"]) == {"fp32", "int8"}
    assert choice["candidates"]["int8"]["ratio_to_fp32"] == pytest.approx(INT8_MS / BASELINE_MS, rel=1e-9)
    assert manifest["options"]["precision"] == "int8" and manifest["options"]["precision_requested"] == "auto"
    assert "quantization" in manifest and manifest["pruning"]["precision"] == "int8"
    assert sum(mlp_dims(manifest)) == 160


@pytest.mark.slow
def test_auto_keeps_fp32_without_a_faster_table(tmp_path, monkeypatch):
    """Only an fp32 table (or an int8 one no faster): auto stays fp32, no quantization."""
    SimulatedDevice(mlp_only, int8=mlp_only).install(monkeypatch)
    write_synthetic_table(tmp_path / "tables", mlp_only)
    write_synthetic_table(tmp_path / "tables", mlp_only, precision="int8")
    manifest = compile_at(tmp_path, tmp_path / "tables", "auto")
    assert manifest["precision_choice"]["precision"] == "fp32" and "quantization" not in manifest
    assert sum(mlp_dims(manifest)) == 80


@pytest.mark.slow  # a compile up to the refusal (~2.4 s); test_precision_refusals is quick
def test_a_table_of_another_precision_is_refused(tmp_path, monkeypatch, capsys):
    """The fp32 table copied to where the int8 table belongs: its fingerprint says fp32, so compile
    --precision int8 refuses it (one line, exit 2, nothing written) instead of predicting int8 with it."""
    fp32 = write_synthetic_table(tmp_path / "tables", mlp_only)
    int8 = write_synthetic_table(tmp_path / "tables", mlp_only_int8, precision="int8")
    assert "-int8-" in int8.name and "-fp32-" in fp32.name
    assert json.loads(int8.read_text())["fingerprint"]["dtype"] == "int8"
    int8.write_text(fp32.read_text())
    code, err = run_cli(monkeypatch, capsys, "compile", DEIT, *model_args(TINY_DEIT), "--target", "ort-cpu",
                        "--latency", BUDGET, "--precision", "int8", "--tables", tmp_path / "tables", "--no-measure",
                        "-q", "-o", tmp_path / "out")
    assert code == 2 and "dtype: table 'fp32', device 'int8'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_precision_refusals(tmp_path, monkeypatch, capsys):
    """A precision the target does not run is refused by profile in one line; auto needs a budget;
    a missing int8 table names the profile command."""
    code, err = run_cli(monkeypatch, capsys, "profile", "--target", "ort-cpu", "--precision", "bf16", "--grid", "tiny",
                        "--tables", tmp_path / "t")
    assert code == 2 and "runs precisions" in err and "'bf16'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()
    code, err = run_cli(monkeypatch, capsys, "compile", DEIT, *model_args(TINY_DEIT), "--target", "ort-cpu",
                        "--precision", "auto", "-q", "-o", tmp_path / "out")
    assert code == 2 and "give --latency" in err
    write_synthetic_table(tmp_path / "tables", mlp_only)
    code, err = run_cli(monkeypatch, capsys, "compile", DEIT, *model_args(TINY_DEIT), "--target", "ort-cpu",
                        "--latency", BUDGET, "--precision", "int8", "--tables", tmp_path / "tables", "-q", "-o",
                        tmp_path / "out")
    assert code == 2 and "no latency table" in err and "precision int8" in err and "--precision int8" in err
    assert not (tmp_path / "out").exists()


# one point per part (NNCF costs 1.4-2.5 s per micro-graph here): the table, not the timing, is checked
ONE_POINT = {"attention": {"tokens": [5], "emb": [32], "heads": [2], "qk_dim": [8], "v_dim": [8]},
             "mlp": {"tokens": [5], "emb": [32], "mlp_dim": [64]}, "stem": {"emb": [32]},
             "head": {"tokens": [5], "emb": [32]}, "cross_attention": {"queries": [2], "tokens": [5], "emb": [32]}}


def fc_precisions(backend, model) -> set[str]:
    """Runtime precision of every FullyConnected layer OpenVINO compiled ``model`` into."""
    runtime = backend.compiled(model).get_runtime_model()
    return {op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"}


@pytest.mark.slow
def test_profile_int8_on_openvino_quantizes_micrographs_into_an_int8_table(tmp_path, monkeypatch):
    """``profile --precision int8`` on openvino-cpu: the table's name and fingerprint say int8 (and
    NNCF); every part with a MatMul was timed as a quantized graph that OpenVINO runs with int8
    FullyConnected kernels; each point was quantized once although timed twice and although the
    profile was killed and resumed (the cache beside the table); the cache is gone when the table is
    complete. The fp32 table of the same grid is another file."""
    import deploycomp.passes.quantize as quantize
    from deploycomp.backends.base import get_backend
    from deploycomp.latency import profiler

    monkeypatch.setitem(profiler.GRIDS, "tiny", ONE_POINT)
    backend = get_backend("openvino-cpu", threads=1)
    real_quantize = quantize.quantize_for_latency
    quantized, timed = [], []

    def counting(model, method, inputs, workdir):
        quantized.append(method)
        return real_quantize(model, method, inputs, workdir)

    def recording(self, model, x, warmup, repeats):
        if len(timed) == 7 and not killed:
            killed.append(True)
            raise KeyboardInterrupt  # the profile is killed in its second pass
        has_matmul = any(n.op_type == "MatMul" for n in model.graph.node)
        timed.append(fc_precisions(self, model) if has_matmul else None)
        return [1.0] * repeats

    killed: list[bool] = []
    monkeypatch.setattr(quantize, "quantize_for_latency", counting)
    monkeypatch.setattr(type(backend), "time_part", recording)
    protocol = {"warmup": 0, "repeats": 1, "passes": 2}
    with pytest.raises(KeyboardInterrupt):
        profiler.profile(backend, tmp_path, grid="tiny", dtype="int8", protocol=protocol, save_every_s=0.0)
    path = profiler.table_path(tmp_path, profiler.device_fingerprint(backend, 1, "int8"), "tiny")
    assert all(kinds <= {"i8", "u8"} for kinds in timed if kinds is not None), timed  # no float FullyConnected
    assert path.with_suffix(".micrographs").is_dir() and len(quantized) == 5
    table = profiler.profile(backend, tmp_path, grid="tiny", dtype="int8", protocol=protocol)
    assert table.complete and table.fingerprint["dtype"] == "int8" and table.fingerprint["quantizer"] == "nncf"
    assert table.path == path and "-int8-" in path.name and path.parent.name == "openvino-cpu"
    assert len(quantized) == len(table.parts) == 5  # once per point: pass 2 and the resumed run read the cache
    assert len(timed) == 2 * (len(table.parts) + 2)  # two passes; attention and MLP alone and chained
    with_matmuls = [kinds for kinds in timed if kinds is not None]
    assert len(with_matmuls) >= 2 * 3 and all(kinds <= {"i8", "u8"} for kinds in with_matmuls), timed
    assert not path.with_suffix(".micrographs").exists()
    fp32 = profiler.table_path(tmp_path, profiler.device_fingerprint(backend, 1, "fp32"), "tiny")
    assert fp32 != path and "-fp32-" in fp32.name


@pytest.mark.slow
def test_validating_an_int8_table_measures_int8_models(tmp_path, monkeypatch):
    """``profile --validate`` of an int8 table compiles its random architectures (and the anchor) at
    int8 on the target, so the table is checked against what it predicts: int8 models."""
    import onnx

    from deploycomp.backends.base import get_backend
    from deploycomp.latency import validate as validation
    from deploycomp.latency.validate import random_archs, validate

    from .synthetic_tables import synthetic_table

    table = synthetic_table(mlp_only_int8, precision="int8")
    archs = random_archs(1, seed=1, grid=table.grid, img_size=64, patch=16, num_classes=10, depth=2)
    real, ops = validation.measure_models, []

    def recording(backend, paths, *args, **kwargs):
        ops.extend({n.op_type for n in onnx.load(str(p)).graph.node} for p in paths)
        return real(backend, paths, *args, **kwargs)

    monkeypatch.setattr(validation, "measure_models", recording)
    monkeypatch.setattr("deploycomp.latency.calibrate.full_arch", lambda t: archs[0])  # 2 blocks, not the grid's 4: speed
    report = validate(table, get_backend("ort-cpu"), archs, rounds=1, iters=1)
    assert report["fingerprint"]["dtype"] == "int8" and len(ops) == 5  # the arch and the four calibration anchors
    assert all("MatMulInteger" in o for o in ops)


@pytest.mark.slow
def test_on_device_checks_anchor_the_int8_table_on_the_quantized_source(tmp_path, precision_tables, monkeypatch):
    """With on-device checks, the int8 table is calibrated on the unpruned model quantized and timed:
    on a device where int8 runs 1.25x slower than its table (fp32 as profiled), the int8 scale is
    1.25, so step 1 of 2 aims at 2.4 - 0.928 / 2 = 1.936 ms = 1.25 (0.64 + S ALPHA / 2): S = 176 (with
    the fp32 scale it would aim at 1.696 ms: S = 208); the checks time the quantized pruned graph
    against the fp32 source, and the end is 1.25 (0.64 + S ALPHA / 2) <= 1.472: S = 96."""
    slow_int8 = lambda part, point: 1.25 * mlp_only_int8(part, point)  # noqa: E731
    device = SimulatedDevice(mlp_only, int8=slow_int8).install(monkeypatch)
    manifest = compile_at(tmp_path, precision_tables, "int8", budget_rounds=2)
    cal = manifest["latency_calibration"]
    assert cal["scale"] == pytest.approx(1.0) and cal["precision"]["int8"]["scale"] == pytest.approx(1.25)
    p = manifest["pruning"]
    first = p["steps"][0]
    assert first["target_ms"] == pytest.approx(1.936, rel=1e-9)
    assert sum(v for g, v in first["kept"].items() if g.endswith(".mlp")) == 176
    assert sum(mlp_dims(manifest)) == 96
    checks = p["budget_checks"]
    assert checks[0]["measured_ratio"] == pytest.approx(1.25 * (0.64 + 176 * ALPHA / 2) / BASELINE_MS, rel=1e-9)
    assert all(b"MatMulInteger" in blob for blob in device.timed)  # every pruned graph timed was int8


def test_auto_prefers_the_fastest_table_then_the_least_lossy_that_needs_no_pruning():
    """choose_precision over fp32 / bf16 / int8 tables predicting the source at 1, 0.7 and 0.6 of fp32
    (every part scaled): a 0.5x budget needs pruning under all three, int8 least; a 0.75x budget is met
    unpruned by bf16 and int8, and bf16, the less lossy, is chosen."""
    from deploycomp.latency.precision_choice import choose_precision
    from deploycomp.latency.calibrate import full_arch
    from deploycomp.latency.predictor import LatencyPredictor

    from .synthetic_tables import flops_like, synthetic_table

    tables = {p: (LatencyPredictor(synthetic_table(lambda part, point, f=f: f * flops_like(part, point), precision=p)),
                  f"{p}.json") for p, f in (("fp32", 1.0), ("bf16", 0.7), ("int8", 0.6))}
    arch = full_arch(tables["fp32"][0].table)
    choice = choose_precision(tables, arch, "0.5x")
    assert choice["precision"] == "int8" and "least pruning" in choice["why"]
    assert choice["candidates"]["bf16"]["ratio_to_fp32"] == pytest.approx(0.7, rel=1e-5)  # samples keep 5 decimals
    choice = choose_precision(tables, arch, "0.75x")
    assert choice["precision"] == "bf16" and "without pruning" in choice["why"]
