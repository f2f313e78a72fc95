"""The ``deploycomp`` command line (typer + rich).

Every user error is one line on stderr and exit code 2; ``--debug`` keeps the traceback.
"""

from __future__ import annotations

import os

# torch's OpenMP threads must not spin while ONNX Runtime is being timed in the same process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import ast  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markdown import Markdown  # noqa: E402
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from .backends.base import DEFAULT_TARGET, backend_names  # noqa: E402
from .errors import DeployCompError  # noqa: E402

TARGETS_HELP = ", ".join(f"{n} (default)" if n == DEFAULT_TARGET else n for n in backend_names())

app = typer.Typer(
    help="deploycomp: compile Vision Transformers (timm DeiT/Swin, ViT ONNX graphs) into fast, verified "
    "artifacts for a target device. Start with:  deploycomp compile timm:deit_tiny_patch16_224 -o out/",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}

COMPILE_STAGES = ["load", "cleanup", "discover", "prune", "semantic_tokens", "lower_token_cluster", "ort_fusion", "precision", "quantize", "verify",
                  "emit", "evaluate", "measure", "measure pruned vs unpruned"]


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")):
    STATE["debug"] = debug


def _parse_model_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise DeployCompError(f"--model-arg takes KEY=VALUE, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


@app.command("compile")
def compile_cmd(
    model: str = typer.Argument(..., help="timm:<name> (e.g. timm:deit_small_patch16_224), hf:<dir>, hf-config:<config.json>, open_clip:<arch>, or a ViT .onnx file."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write (replaced atomically)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="State dict (.safetensors or .pth, weights only) for a timm model."),
    target: str = typer.Option(DEFAULT_TARGET, "--target", help=f"Target backend: {TARGETS_HELP}."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads of the target (default: all cores)."),
    spinning: Optional[bool] = typer.Option(None, "--spinning/--no-spinning", help="ort-* targets: let ONNX Runtime worker threads spin-wait (default: on, measured faster for a lone session; see docs/ARCHITECTURE.md)."),
    static_batch: Optional[int] = typer.Option(None, "--static-batch", help="openvino-cpu: fix the artifact's input batch to N (the IR's shape; faster than a dynamic batch, most for small models). With --latency the budget is for batch N, judged by a table profiled with --static-batch."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset to export at."),
    fuse: bool = typer.Option(False, "--fuse/--no-fuse", help="Apply ONNX Runtime's transformer fusions (off: not measurably faster on CPU)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32; fp16 (ort-*, tensorrt: the precision pass keeps float32 for norms, softmax and I/O); bf16 (openvino-cpu on a CPU with avx512_bf16/AMX, tensorrt); int8 (openvino-cpu: NNCF post-training quantization to Q/DQ, calibrated on --data or synthetic images, behind a fidelity gate); auto (with --latency: the precision whose latency table needs the least pruning to meet the budget)."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max relative L2 error of the logits vs the reference (default 1e-4 fp32, 5e-3 fp16, 2e-2 bf16)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the verification inputs (default: fresh)."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="timm constructor override KEY=VALUE (repeatable), e.g. depth=6."),
    no_measure: bool = typer.Option(False, "--no-measure", help="Skip measuring the artifact's latency (with --latency: and the pruned-vs-unpruned timing; the report gives the predicted ratio)."),
    data: Optional[str] = typer.Option(None, "--data", help="Labelled data for top-1 before/after on the target: fashion-mnist or an image folder (DIR/<class>/<img>, or DIR/val/...)."),
    eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help="Evaluate on the first N test samples only (default: all)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Do not print the report."),
    latency: Optional[str] = typer.Option(None, "--latency", help="Prune (NViT) to a latency budget: 0.5x of the unpruned model's predicted latency, or 12ms."),
    latency_batch: Optional[int] = typer.Option(None, "--latency-batch", help="Batch size the budget is for (selects the latency table; default: --static-batch, else 1)."),
    prune_method: str = typer.Option("hessian", "--prune-method", help="hessian (NViT), magnitude (L1 baseline) or uniform (width scaling baseline)."),
    selection: str = typer.Option("ratio", "--selection", help="How pruning ranks chunks: ratio (importance share per latency share, the knapsack greedy) or additive (NViT: importance share - eta x latency share)."),
    eta: Optional[float] = typer.Option(None, "--eta", help="With --selection additive: importance share minus eta x latency share (default 1; 0: latency-blind)."),
    saliency_norm: str = typer.Option("none", "--saliency-norm", help="Per-kind saliency divisors: none (plain Fisher estimate) or nvit (upstream's DeiT-B constants)."),
    calib_batch: int = typer.Option(32, "--calib-batch", help="Batch size of the calibration and distillation batches."),
    budget_rounds: int = typer.Option(3, "--budget-rounds", help="Check a relative budget on the device up to N times, pruning on while the measured ratio is over it (0: trust the table)."),
    calibrate_rounds: int = typer.Option(4, "--calibrate-rounds", help="Time the unpruned model and a uniformly and a non-uniformly narrowed copy near the budget N rounds to scale the latency table to the device now (0: trust the table as profiled)."),
    prune_steps: int = typer.Option(5, "--prune-steps", help="Pruning steps toward the budget."),
    prune_groups: str = typer.Option("emb,heads,qk,v,mlp", "--prune-groups", help="Group kinds to prune (comma-separated)."),
    saliency_batches: int = typer.Option(4, "--saliency-batches", help="Calibration batches per importance estimate."),
    kd_steps: int = typer.Option(0, "--kd-steps", help="Distillation steps from the unpruned model after each pruning step (needs --data)."),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", help="Recovery fine-tuning epochs with distillation (needs --data): after pruning, after the semantic-token rewrite, or, for --precision int8 alone, quantization-aware fine-tuning of the int8 graph's weights under its quantizers."),
    teacher_logits: Optional[Path] = typer.Option(None, "--teacher-logits", help="Stored top-K teacher logits for the fine-tuning (deploycomp store-logits)."),
    train_samples: Optional[int] = typer.Option(None, "--train-samples", help="Use the first N training samples for pruning (default: all)."),
    tables: Path = typer.Option(Path("latency_tables"), "--tables", help="Root directory of the latency tables."),
    semantic_tokens: Optional[int] = typer.Option(None, "--semantic-tokens", help="STViT: run the blocks after the generator on N semantic tokens (+cls); N square, e.g. 16. Swin: N semantic tokens per window of one stage (STViT-R), e.g. 4 or 9."),
    dense: bool = typer.Option(False, "--dense", help="Swin semantic tokens: STViT-R's recovery in the stage's last block (each window's tokens attend to its semantic tokens), so the backbone keeps its full-resolution grids for dense tasks."),
    token_stage: Optional[int] = typer.Option(None, "--token-stage", help="Swin: the stage (0-based) with semantic tokens per window (default: the third, as STViT-R on Swin-T; the last of a smaller Swin). --token-layer then counts blocks in that stage."),
    token_layer: Optional[int] = typer.Option(None, "--token-layer", help="First of the two generator blocks, 0-based (default: a third of the depth, STViT's 4 = blocks 5-6 of 12)."),
    token_pooling: str = typer.Option("max", "--token-pooling", help="Initial centres by adaptive max (STViT's code) or avg pooling of the patch grid."),
    token_lowering: Optional[str] = typer.Option(None, "--token-lowering", help="How the TokenCluster op runs: reference (standard ops) or ort-mha (ONNX Runtime's fused attention); default: the target's."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="int8 with --data: refuse the artifact when its top-1 on the test images (all, or --eval-samples), run by the target, is more than this many points below the fp32 reference's."),
    max_float_layers: Optional[int] = typer.Option(None, "--max-float-layers", help="int8 accuracy-aware fallback: when the quantized graph misses the fidelity gate, keep at most N of its most sensitive MatMul/Gemm layers in float (default: a quarter of them; 0: no fallback)."),
    output_kind: Optional[str] = typer.Option(None, "--output-kind", help="What the model outputs: logits or embedding (default: the source's word: CLIP towers, hf ViTModel and timm models with num_classes=0 give an embedding). An embedding model distils with a feature loss and is scored by cosine to the source."),
    feature_loss: str = typer.Option("cosine", "--feature-loss", help="Distillation loss of an embedding model: cosine (1 - cos) or mse (normalized by the source embedding's mean square)."),
):
    """Compile a model into a verified artifact: model.onnx + manifest.json + report.md (+ pruning.png)."""
    # The request is checked before the compiler's heavy modules (torch, the model libraries, the
    # runtimes) are imported: a bad flag, an unknown or unsupported model is refused in a second or two.
    from .api import CompileOptions, check_options, compile as do_compile
    from .pruning.config import PruneConfig
    from .tokens.config import SemanticTokenConfig

    prune = None
    if eta is not None and selection != "additive":
        raise DeployCompError(f"--eta weighs NViT's additive score; --selection {selection} does not use it: "
                              "give --selection additive too")
    if latency is not None:
        prune = PruneConfig(latency=latency, method=prune_method, eta=1.0 if eta is None else eta, selection=selection, saliency_norm=saliency_norm, steps=prune_steps,
                            kinds=tuple(k.strip() for k in prune_groups.split(",") if k.strip()),
                            saliency_batches=saliency_batches, batch_size=calib_batch, kd_steps=kd_steps, finetune_epochs=finetune_epochs,
                            teacher_logits=str(teacher_logits) if teacher_logits else None, budget_rounds=budget_rounds)
    # --finetune-epochs: pruning's recovery, else the semantic tokens', else int8's quantization-aware fine-tuning
    qat = precision == "int8" and prune is None and semantic_tokens is None
    tokens = None
    if dense and semantic_tokens is None:
        raise DeployCompError("--dense is STViT-R's recovery of Swin semantic tokens: give --semantic-tokens too")
    if semantic_tokens is not None:
        tokens = SemanticTokenConfig(tokens=semantic_tokens, layer=token_layer, pooling=token_pooling, stage=token_stage, dense=dense)
    options = CompileOptions(target=target, weights=str(weights) if weights else None, opset=opset, threads=threads,
                             runtime={k: v for k, v in (("allow_spinning", spinning), ("static_batch", static_batch)) if v is not None},
                             fuse=fuse, precision=precision, tolerance=tolerance, seed=seed, model_kwargs=_parse_model_args(model_arg),
                             measure_rounds=0 if no_measure else 5, data=data, eval_samples=eval_samples,
                             prune=prune, latency_batch=latency_batch or static_batch or 1, tables=str(tables), train_samples=train_samples,
                             calibrate_rounds=calibrate_rounds,
                             semantic_tokens=tokens, token_lowering=token_lowering,
                             token_finetune_epochs=0 if prune or qat else finetune_epochs,
                             token_teacher_logits=None if prune or qat or not teacher_logits else str(teacher_logits),
                             qat_epochs=finetune_epochs if qat else 0,
                             qat_teacher_logits=str(teacher_logits) if qat and teacher_logits else None,
                             max_drop=max_drop, max_float_layers=max_float_layers, output=output_kind,
                             feature_loss=feature_loss)
    check_options(model, options)  # before the progress bar: a refusal is one line
    stages = [s for s in COMPILE_STAGES if (s != "ort_fusion" or fuse) and (not s.startswith("measure") or not no_measure)
              and (s != "evaluate" or data) and ("prune" not in s and "pruned" not in s and "latency table" not in s or latency)
              and ("token" not in s or semantic_tokens) and (s != "precision" or precision not in ("fp32", "int8")) and (s != "quantize" or precision in ("int8", "auto"))]
    with _progress() as progress:
        task = progress.add_task("compile", total=len(stages))

        def step(stage: str) -> None:
            if stage not in stages:  # a message from inside a stage (pruning steps, epochs)
                progress.update(task, description=f"compile: {stage}")
                return
            progress.update(task, completed=stages.index(stage), description=f"compile: {stage}")

        manifest = do_compile(model, output, options, progress=step)
        progress.update(task, completed=len(stages), description="compile: done")
    if not quiet:
        console.print(Markdown((Path(output) / manifest["files"]["report"]).read_text(encoding="utf-8")))
    console.print(f"[green]wrote[/green] {output}/ ({', '.join(manifest['files'].values())})")


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="A ViT .onnx file or an artifact directory."),
    groups: bool = typer.Option(False, "--groups", help="Also list NViT's coupled groups and their tensor slices."),
):
    """Print the ViT structure the compiler sees: per block EMB, heads, QK/V dim per head, MLP dim."""
    from .api import inspect as do_inspect

    structure = do_inspect(path)
    table = Table(title=f"{path}: {structure.family}, {len(structure.blocks)} blocks, EMB per stage {structure.stage_embs}")
    for col in ("block", "stage", "EMB", "heads", "QK/head", "V/head", "MLP", "tokens", "seq", "GFLOPs"):
        table.add_column(col, justify="right")
    for row in structure.table():
        table.add_row(*(str(row[k]) for k in ("index", "stage", "emb", "heads", "qk_dim", "v_dim", "mlp_dim", "tokens",
                                              "sequences", "gflops")))
    console.print(table)
    if groups:
        for g in structure.groups():
            data = structure.graph.nodes[g]
            slices = "; ".join(f"{s.tensor}[axis {s.axis}]" for s in structure.slices(g))
            console.print(f"[bold]{g}[/bold] ({data['kind']}, {data['units']} units): {slices}")


@app.command("bench")
def bench_cmd(
    artifact: Optional[Path] = typer.Argument(None, help="Artifact directory written by compile (optional)."),
    baselines: str = typer.Option("", "--baselines", help="Comma-separated timm baselines: deit_tiny,deit_small,deit_base,swin_tiny,swin_small."),
    kinds: str = typer.Option("torch,ort,openvino", "--kinds", help="Baseline flavours: torch (eager), ort (plain export in ONNX Runtime), openvino (plain export in OpenVINO, fp32), ort-int8 (ORT dynamic int8), openvino-int8 (NNCF int8 on OpenVINO)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads for every candidate (default: all cores)."),
    rounds: int = typer.Option(10, "--rounds", help="Interleaved rounds; each runs every candidate --iters times."),
    iters: int = typer.Option(3, "--iters", help="Runs per candidate per round."),
    batch: int = typer.Option(8, "--batch", help="Batch size of the throughput measurement."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Where to write the JSON results (default: <artifact>/bench.json, else bench.json)."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="timm constructor override KEY=VALUE for the baselines (repeatable)."),
):
    """Measure latency (batch 1: median, p90) and throughput (batch N) of an artifact and baselines, interleaved."""
    from .api import bench as do_bench

    names = [b.strip() for b in baselines.split(",") if b.strip()]
    json_out = json_out or ((artifact / "bench.json") if artifact else Path("bench.json"))
    with _progress() as progress:
        tasks = {}

        def tick(phase: str, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(f"bench {phase}", total=total)
            progress.advance(tasks[phase])

        result = do_bench(artifact, names, threads=threads, rounds=rounds, iters=iters, throughput_batch=batch,
                          kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()), output_json=json_out,
                          model_kwargs=_parse_model_args(model_arg), progress=tick)
    console.print(bench_table(result))
    console.print(f"[green]wrote[/green] {json_out}")


@app.command("profile")
def profile_cmd(
    target: str = typer.Option(DEFAULT_TARGET, "--target", help=f"Target backend to profile: {TARGETS_HELP}."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads (default: all cores)."),
    spinning: Optional[bool] = typer.Option(None, "--spinning/--no-spinning", help="ort-* targets: profile with ONNX Runtime's spin-waiting threads (default: on, as artifacts run; match your deployment)."),
    batch: int = typer.Option(1, "--batch", help="Batch size the table is measured at."),
    static_batch: bool = typer.Option(False, "--static-batch", help="openvino-cpu: time the parts compiled for exactly --batch, as artifacts compiled with --static-batch run (a table of its own)."),
    dtype: str = typer.Option("fp32", "--precision", "--dtype", help="Precision the parts run in: fp32, int8 (quantized as the compiler quantizes for this target), bf16 (openvino-cpu with avx512_bf16/AMX), fp16 (ort-*): one table per precision."),
    grid: str = typer.Option("deit-base", "--grid", help="Grid preset: deit-base (224 px DeiT: EMB<=768, H<=12, QK/V<=64, MLP<=3072, tokens<=197), proxy-fmnist (the 28 px proxy DeiT), swin-t (224 px Swin-T/S, per stage), tiny or swin-micro (tests)."),
    tables: Path = typer.Option(Path("latency_tables"), "--tables", help="Root directory of the latency tables."),
    validate: int = typer.Option(0, "--validate", help="After profiling, validate on N random architectures (compile + measure)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation architectures."),
    force: bool = typer.Option(False, "--force", help="Use a table even if its device fingerprint does not match."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Where to write the validation report (JSON)."),
    table_file: Optional[Path] = typer.Option(None, "--table", help="Validate this table file on this device instead of profiling (with --force: another device's table, to see how far it predicts this one)."),
):
    """Measure the ViT parts on this device into latency_tables/<target>/<device>.json (resumable)."""
    from .backends.base import get_backend
    from .latency.profiler import device_fingerprint, profile
    from .latency.table import load_table, table_path

    from .latency.profiler import check_precision

    options = {"threads": threads, "allow_spinning": spinning, "static_batch": batch if static_batch else None}
    probe = get_backend(target, **options)
    if probe.precisions.get(dtype) == "runtime" and dtype != "fp32":  # the runtime's own option (OpenVINO bf16)
        options["precision"] = dtype
    backend = get_backend(target, **options) if "precision" in options else probe
    check_precision(backend, dtype)  # one line, before any profiling
    if table_file is not None and not validate:
        raise DeployCompError("--table names a table to validate on this device: give --validate N")
    path = table_file or table_path(tables, device_fingerprint(backend, batch, dtype), grid)
    if table_file is not None:
        table = load_table(path, device_fingerprint(backend, batch, dtype), force=force)
    elif force and path.is_file():
        table = load_table(path, force=True)
    else:
        with _progress() as progress:
            task = progress.add_task(f"profile {target} b{batch} {dtype}", total=None)
            table = profile(backend, tables, batch=batch, dtype=dtype, grid=grid,
                            progress=lambda done, total: progress.update(task, completed=done, total=total))
        console.print(f"[green]table[/green] {table.path} ({table.profiling_seconds:.1f} s of profiling)")
    if validate:
        from .latency.validate import random_archs_for, validate as run_validation

        if table_file is None:  # a named table was read and checked above
            table = load_table(table.path or path, device_fingerprint(backend, batch, dtype), force=force)
        archs = random_archs_for(table, validate, seed)
        with _progress() as progress:
            task = progress.add_task("validate", total=None)
            report = run_validation(table, backend, archs, rounds=8, progress=lambda s: progress.update(task, description=f"validate: {s}"))
        console.print(validation_table(report))
        json_out = json_out or Path(f"latency_validation_b{batch}.json")
        from .artifact import write_json

        write_json(json_out, report)
        console.print(f"[green]wrote[/green] {json_out}")


@app.command("design")
def design_cmd(
    output: Path = typer.Option(..., "-o", "--output", help="Directory for design.json, report.md (and init.safetensors with --from)."),
    latency: str = typer.Option(..., "--latency", help="Latency budget: 5ms, or 0.3x of the reference model's predicted latency."),
    target: str = typer.Option(DEFAULT_TARGET, "--target", help="Target whose latency table the budget is judged by."),
    batch: int = typer.Option(1, "--batch", help="Batch size the budget is for (selects the latency table)."),
    static_batch: bool = typer.Option(False, "--static-batch", help="openvino-cpu: judge by the table profiled with --static-batch (for an artifact compiled with --static-batch)."),
    params: Optional[str] = typer.Option(None, "--params", help="Parameter cap, e.g. 5M or 800k."),
    flops: Optional[str] = typer.Option(None, "--flops", help="FLOPs cap per image (2 x MACs), e.g. 1.2G."),
    depth_range: str = typer.Option("4:12", "--depth-range", help="Blocks the design may have, MIN:MAX."),
    source: Optional[str] = typer.Option(None, "--from", help="Scale this timm:<name> down uniformly (TinyViT-style) instead of designing."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights of the --from model (sliced into init.safetensors)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="timm:<name> a relative budget is a fraction of (default: the grid's model)."),
    semantic_tokens: Optional[int] = typer.Option(None, "--semantic-tokens", help="Budget for STViT semantic tokens (M, a square) from a third of the depth."),
    rho: Optional[float] = typer.Option(None, "--rho", help="DeepMAD effectiveness bound: depth-in-layers / mean width <= rho (default 0.5)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Latency grid preset (default: from the --from/--reference model, else deit-base)."),
    tables: Path = typer.Option(Path("latency_tables"), "--tables", help="Root directory of the latency tables."),
    table: Optional[Path] = typer.Option(None, "--table", help="A latency table file to use instead of looking one up."),
    force: bool = typer.Option(False, "--force", help="Use a table even if its device fingerprint does not match."),
    name: Optional[str] = typer.Option(None, "--name", help="timm name to register the architecture under (default: from its content)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads the table was profiled with (default: all cores)."),
):
    """Design a ViT for a latency budget from the device's latency table (DeepMAD, no data), or scale one down (--from)."""
    from .design.command import run_design

    record = run_design(output, latency=latency, target=target, batch=batch, params=params, flops=flops,
                        depth_range=depth_range, source=source, weights=str(weights) if weights else None,
                        reference=reference, semantic_tokens=semantic_tokens, rho=rho, grid=grid, tables=tables,
                        table=table, force=force, name=name, threads=threads, static_batch=static_batch)
    p, a = record["predicted"], record["arch"]
    frac = f" ({p['fraction_of_reference']:.3f}x)" if p["fraction_of_reference"] else ""
    console.print(f"[green]timm:{record['name']}[/green]: EMB {a['emb']}, depth {len(a['blocks'])}, "
                  f"{record['params'] / 1e6:.3g} M params, predicted {p['total_ms']:.4g} ms{frac} "
                  f"<= {record['budget']['latency_ms']:.4g} ms; solved in {record['solver']['seconds']} s")
    console.print(f"wrote {output}/design.json, report.md; train it: {record['train']}", markup=False, highlight=False)


@app.command("train")
def train_cmd(
    model: str = typer.Argument(..., help="timm:<name>, e.g. timm:deit_fmnist_patch4_28 (the proxy DeiT)."),
    out: Path = typer.Option(..., "-o", "--out", help="Run directory: checkpoint.pt (resumable), model.safetensors, metrics.json."),
    data: str = typer.Option("fashion-mnist", "--data", help="fashion-mnist or an image folder (DIR/train, DIR/val)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Initial weights (fine-tuning)."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="timm constructor override KEY=VALUE (repeatable)."),
    epochs: int = typer.Option(20, "--epochs"),
    batch_size: int = typer.Option(128, "--batch-size", help="Global batch, split over torchrun processes."),
    lr: float = typer.Option(1e-3, "--lr"),
    weight_decay: float = typer.Option(0.05, "--weight-decay"),
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs"),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing"),
    seed: int = typer.Option(0, "--seed", help="Seeds init, data order and augmentation views."),
    teacher_logits: Optional[Path] = typer.Option(None, "--teacher-logits", help="Stored top-K teacher logits (deploycomp store-logits)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Live teacher timm:<name> (slower than stored logits)."),
    teacher_weights: Optional[Path] = typer.Option(None, "--teacher-weights", help="Weights of the live teacher."),
    kd_weight: float = typer.Option(1.0, "--kd-weight", help="Share of the loss from the teacher's soft targets."),
    train_subset: Optional[int] = typer.Option(None, "--train-subset", help="Use the first N training samples."),
    test_subset: Optional[int] = typer.Option(None, "--test-subset", help="Evaluate on the first N test samples."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop (checkpointed) after N steps in this call."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads per process (default: cores / processes)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/checkpoint.pt if present."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda[:N] for one process on a GPU (torchrun runs on the CPU)."),
):
    """Train or fine-tune a model (alone or under torchrun -m deploycomp train ...), with optional distillation."""
    from .api import train as do_train
    from .learn.train import TrainConfig

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                         label_smoothing=label_smoothing, seed=seed, kd_weight=kd_weight, max_steps=max_steps,
                         device=device)
    main_rank = os.environ.get("RANK", "0") == "0"
    with _progress() as progress:
        task = progress.add_task("train", total=None, visible=main_rank)

        def tick(step: int, total: int, info: dict) -> None:
            progress.update(task, completed=step, total=total, description=f"epoch {info['epoch']} loss {info['loss']:.4f}")

        metrics = do_train(model, out, config, data=data, weights=str(weights) if weights else None,
                           model_kwargs=_parse_model_args(model_arg), teacher_logits=str(teacher_logits) if teacher_logits else None,
                           teacher=teacher, teacher_weights=str(teacher_weights) if teacher_weights else None,
                           train_subset=train_subset, test_subset=test_subset, threads=threads, resume=resume,
                           log=lambda line: progress.console.print(line, markup=False, highlight=False), progress=tick)
    if main_rank:
        state = "finished" if metrics["finished"] else "stopped (resume with the same command)"
        acc = f", test top-1 {metrics['test_accuracy']:.2f} %" if metrics["test_accuracy"] is not None else ""
        console.print(f"[green]{state}[/green]{acc}; {metrics['train_seconds'] / 60:.1f} min of training; wrote {out}/")


@app.command("store-logits")
def store_logits_cmd(
    teacher: str = typer.Argument(..., help="Teacher timm:<name>."),
    out: Path = typer.Option(..., "-o", "--out", help="Teacher logits file to write (atomically)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Teacher weights."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="timm constructor override KEY=VALUE (repeatable)."),
    data: str = typer.Option("fashion-mnist", "--data", help="fashion-mnist or an image folder."),
    epochs: int = typer.Option(..., "--epochs", help="Epochs of the student run the records must cover."),
    topk: int = typer.Option(5, "--topk", help="Probabilities kept per sample (TinyViT's default: 100 of 1000 classes)."),
    seed: int = typer.Option(0, "--seed", help="The student run's --seed (decides the augmentation views)."),
    train_subset: Optional[int] = typer.Option(None, "--train-subset", help="Use the first N training samples."),
):
    """Store a teacher's top-K softmax (fp16) per sample and epoch, for distillation without the teacher (TinyViT)."""
    from .api import store_logits

    with _progress() as progress:
        task = progress.add_task("store-logits", total=None)
        info = store_logits(teacher, out, weights=str(weights) if weights else None, data=data, epochs=epochs, topk=topk,
                            seed=seed, train_subset=train_subset, model_kwargs=_parse_model_args(model_arg),
                            progress=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(f"[green]wrote[/green] {out}: {info['num_samples']} samples x {info['epochs']} epochs, top-{info['topk']}, "
                  f"{info['bytes_per_sample_epoch']} bytes per sample and epoch, {info['file_bytes'] / 1e6:.1f} MB, "
                  f"{info['seconds']:.0f} s")


@app.command("evaluate")
def evaluate_cmd(
    model: str = typer.Argument(..., help="An artifact directory (run on its target) or timm:<name> (torch)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights of a timm model."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="timm constructor override KEY=VALUE (repeatable)."),
    data: str = typer.Option("fashion-mnist", "--data", help="fashion-mnist or an image folder."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Use the first N test samples."),
):
    """Top-1 accuracy on the test split, of a compiled artifact on its backend or of a timm model in torch;
    for an artifact that outputs an embedding, the mean cosine of its embeddings to the source model's."""
    from .api import evaluate

    result = evaluate(model, data=data, weights=str(weights) if weights else None, samples=samples,
                      model_kwargs=_parse_model_args(model_arg))
    if "mean_cosine" in result:
        console.print(f"{model}: embedding cosine to the source {result['reference']}: mean {result['mean_cosine']:.6f}, "
                      f"min {result['min_cosine']:.6f} on {result['samples']} samples of {result['data']} "
                      f"({result['runtime']})", markup=False, highlight=False)
    else:
        console.print(f"{model}: top-1 {result['top1']:.2f} % on {result['samples']} samples of {result['data']} ({result['runtime']})")


@app.command("selftest")
def selftest_cmd(
    target: str = typer.Option("tensorrt", "--target", help="Target to check on this machine's GPU (tensorrt)."),
    batch: int = typer.Option(2, "--batch", help="Batch size of the comparison and the timing."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16 (the precision pass, then the engine)."),
    rounds: int = typer.Option(50, "--rounds", help="Timed runs per engine (CUDA events)."),
):
    """Build tiny engines (a tiny DeiT, and a TokenCluster node as the AOT plugin), compare them with the CPU reference, time them."""
    if target != "tensorrt":
        raise DeployCompError(f"selftest supports --target tensorrt, not '{target}'")
    from .backends.tensorrt import selftest

    rows = selftest(batch=batch, precision=precision, rounds=rounds)
    table = Table(title=f"deploycomp selftest --target {target}: {rows[0]['gpu']} (sm_{rows[0]['arch']}), "
                        f"TensorRT {rows[0]['backend_version']}, {precision}, batch {batch}")
    for col in ("case", "rel L2", "tolerance", "median ms", "p90 ms", "result"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        table.add_row(r["case"], f"{r['rel_l2']:.2e}", f"{r['tolerance']:.0e}", f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}",
                      "[green]passed[/green]" if r["passed"] else "[red]FAILED[/red]")
    console.print(table)
    if not all(r["passed"] for r in rows):
        raise typer.Exit(1)


def validation_table(report: dict) -> Table:
    t, c, f = report["table_model"], report["table_model_calibrated"], report["flops_model"]
    scales = ", ".join(f"{a['scale']:.3f}" for a in report["calibration"]["anchors"])
    table = Table(title=f"{report['n']} random architectures, batch {report['fingerprint']['batch']}: error median / p90 - "
                        f"table {t['median_ape_pct']:.1f} / {t['p90_ape_pct']:.1f} %, table calibrated "
                        f"(anchor scales {scales}): {c['median_ape_pct']:.1f} / {c['p90_ape_pct']:.1f} %, "
                        f"FLOPs (best constant) {f['median_ape_pct']:.1f} / {f['p90_ape_pct']:.1f} %")
    for col in ("#", "GFLOPs", "min tokens", "measured ms (p10-p90)", "table ms", "error %", "calibrated ms", "error %",
                "FLOPs ms"):
        table.add_column(col, justify="right")
    for i, r in enumerate(report["rows"]):
        m = r["measured"]
        table.add_row(str(i), f"{r['gflops']:.2f}", str(min(b["tokens"] for b in r["arch"].get("blocks")
                                                            or [b for st in r["arch"]["stages"] for b in st["blocks"]])),
                      f"{m['median_ms']:.2f} ({m['p10_ms']:.2f}-{m['p90_ms']:.2f})", f"{r['predicted_ms']:.2f}",
                      f"{r['ape_pct']:.1f}", f"{r['calibrated_ms']:.2f}", f"{r['calibrated_ape_pct']:.1f}",
                      f"{r['flops_predicted_ms']:.2f}")
    return table


def bench_table(result: dict) -> Table:
    host = result["host"]
    tb = result["protocol"]["throughput_batch"]
    table = Table(title=f"{host['cpu_model']}, {host['threads']} threads; interleaved, {result['protocol']['rounds']} rounds")
    for col in ("candidate", "b1 median ms", "b1 p90 ms", f"b{tb} img/s (p10-p90)", "GFLOP/s b1"):
        table.add_column(col, justify="right" if col != "candidate" else "left")
    for r in result["rows"]:
        lat, tp = r["latency_b1"], r.get("throughput", {})
        table.add_row(r["name"], f"{lat['median_ms']:.2f}", f"{lat['p90_ms']:.2f}",
                      f"{tp.get('median_img_s', 0):.1f} ({tp.get('p10_img_s', 0):.1f}-{tp.get('p90_img_s', 0):.1f})",
                      f"{r['achieved_gflop_s_b1']:.1f}" if "achieved_gflop_s_b1" in r else "-")
    return table


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True)


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings (``DeployCompWarning``) as one ``warning: ...`` line; others as Python prints them."""
    from .errors import DeployCompWarning

    if issubclass(category, DeployCompWarning):
        err_console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        app()  # click's standalone mode reports usage errors itself (exit 2)
    except DeployCompError as exc:
        if STATE["debug"]:
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
