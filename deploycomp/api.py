"""The Python API: the same verbs as the CLI (compile, inspect, bench).

>>> import deploycomp
>>> manifest = deploycomp.compile("timm:deit_tiny_patch16_224", "out/")
>>> structure = deploycomp.inspect("out/")
>>> rows = deploycomp.bench("out/", baselines=["deit_tiny"])
"""

from __future__ import annotations

import datetime as _dt
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx_ir as ir

from . import __version__
from .artifact import MANIFEST, atomic_output_dir, check_output_dir, read_manifest, write_json
from .backends.base import get_backend
from .errors import DeployCompError
from .ir.structure import Structure
from .passes.base import DEFAULT_INVARIANTS, CompileContext, Pass, Pipeline

if TYPE_CHECKING:
    from .learn.train import TrainConfig
    from .pruning.schedule import PruneConfig
    from .tokens.stvit import SemanticTokenConfig

Progress = Callable[[str], None]
# Default verification tolerance (relative L2 of the logits) per precision: float32 rewrites are
# exact up to rounding; fp16 measured 5.2e-4 on a tiny DeiT (tests/test_tensorrt.py).
PRECISION_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}


@dataclass
class CompileOptions:
    """Everything ``compile`` can be told; defaults are the embedded default (ort-cpu, fp32)."""

    target: str = "ort-cpu"
    weights: str | None = None
    opset: int = 18
    threads: int | None = None  # intra-op threads of the target session; default: all usable cores
    allow_spinning: bool = False  # ONNX Runtime worker threads spin-wait between runs (measured slower here)
    fuse: bool = False  # ONNX Runtime transformer fusions (see passes/fuse.py: off until it measures faster)
    precision: str = "fp32"  # fp16 / bf16: the precision pass (float32 kept for norms, softmax, I/O)
    tolerance: float | None = None  # relative L2 of the logits vs the reference; None: 1e-4 (fp32), 5e-3 (fp16), 2e-2 (bf16)
    verify_batches: tuple[int, ...] = (1, 3)
    measure_rounds: int = 5  # batch-1 latency of the artifact measured after emitting (0: skip)
    seed: int | None = None  # verification inputs; None draws a fresh seed (recorded in the manifest)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm overrides, e.g. depth, img_size
    data: str | None = None  # labelled data (fashion-mnist or an image folder): top-1 before/after on the target
    eval_samples: int | None = None  # first N test samples only
    prune: "PruneConfig | None" = None  # NViT pruning to a latency budget (needs a timm: source)
    latency_batch: int = 1  # the batch the latency budget is for: picks the latency table
    tables: str = "latency_tables"  # root of the latency tables
    train_samples: int | None = None  # first N training samples for pruning (tests, quick looks)
    semantic_tokens: "SemanticTokenConfig | None" = None  # STViT semantic tokens (needs a timm: DeiT source)
    token_finetune_epochs: int = 0  # fine-tuning after the token rewrite (with --data; pruning has its own)
    token_finetune_lr: float = 5e-4
    token_teacher_logits: str | None = None  # stored top-K teacher logits for that fine-tuning
    token_lowering: str | None = None  # TokenCluster lowering; None: the target's default


def default_passes(options: CompileOptions, prune_pass: Pass | None = None, token_pass: Pass | None = None,
                   lowering: str | None = None) -> list[Pass]:
    from .passes.cleanup import CleanupPass
    from .passes.discover import DiscoverPass
    from .passes.fuse import OrtFusionPass
    from .passes.semantic_tokens import LowerTokenClusterPass
    from .passes.verify import VerifyPass

    passes: list[Pass] = [CleanupPass(), DiscoverPass()]
    if prune_pass is not None:
        passes.append(prune_pass)
    if token_pass is not None:
        passes.append(token_pass)
        if lowering is not None:  # None: the target runs TokenCluster itself (a TensorRT plugin)
            passes.append(LowerTokenClusterPass(lowering))
    if options.fuse:
        passes.append(OrtFusionPass())
    if options.precision != "fp32":
        from .passes.precision import PrecisionPass

        passes.append(PrecisionPass(options.precision))
    passes.append(VerifyPass())
    return passes


def compile(source: str, output: str | Path, options: CompileOptions | None = None,
            progress: Progress | None = None) -> dict[str, Any]:
    """Compile ``source`` (``timm:<name>`` or a ``.onnx`` path) into a verified artifact at ``output``."""
    from .frontend import check_compile_request, load_source
    from .report import render_report

    options = options or CompileOptions()
    if options.precision not in PRECISION_TOLERANCE:
        raise DeployCompError(f"unknown precision '{options.precision}': use one of {', '.join(PRECISION_TOLERANCE)}")
    if options.precision == "bf16" and options.target == "ort-cpu":
        raise DeployCompError("ONNX Runtime's CPU provider has no bf16 MatMul kernels: use --precision fp16 on ort-cpu")
    if options.precision != "fp32" and options.prune is not None:
        raise DeployCompError("--latency pruning predicts with fp32 latency tables: compile it at --precision fp32")
    check_compile_request(source, options.weights, options.model_kwargs, prune=options.prune is not None,
                          semantic_tokens=options.semantic_tokens)  # before anything is loaded
    say = progress or (lambda stage: None)
    output = Path(output)
    backend = get_backend(options.target, threads=options.threads, allow_spinning=options.allow_spinning)
    check_output_dir(output)

    say("load")
    src = load_source(source, options.weights, options.model_kwargs, options.opset)
    test_data = load_eval_data(options.data, src.input_shape, options.eval_samples) if options.data else None
    ctx = CompileContext(
        family=src.family, reference=src.reference, reference_kind=src.reference_kind, backend=backend,
        verify_batches=tuple(options.verify_batches),
        tolerance=options.tolerance if options.tolerance is not None else PRECISION_TOLERANCE[options.precision],
        seed=options.seed if options.seed is not None else secrets.randbelow(2**31),
    )
    prune_pass = token_pass = None
    tokens = _resolve_tokens(src, options.semantic_tokens) if options.semantic_tokens is not None else None
    lowering = options.token_lowering or getattr(backend, "token_cluster_lowering", "reference")
    if options.prune is not None:  # with tokens: one budget for both axes, pruning trains the token model
        src, prune_pass = _prune_setup(src, options, backend, test_data, say, tokens, lowering or "reference")
    if tokens is not None and prune_pass is not None:
        from .passes.semantic_tokens import SemanticTokensPass

        token_pass = SemanticTokensPass(tokens, None, say=say, rewritten=prune_pass.module)
    elif tokens is not None:
        src, token_pass = _tokens_setup(src, options, tokens, test_data, say)
    passes = default_passes(options, prune_pass, token_pass, lowering)
    model = Pipeline(passes, DEFAULT_INVARIANTS, progress=say)(src.model, ctx)
    structure: Structure = ctx.structure

    say("emit")
    from .ir.shapes import matmul_flops, param_count

    manifest: dict[str, Any] = {
        "deploycomp_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"model": src.name, "family": structure.family, "reference": src.reference_kind, **src.meta},
        "target": backend.fingerprint(),
        "input": {"name": model.graph.inputs[0].name, "shape": _dims(model.graph.inputs[0])},
        "output": {"name": model.graph.outputs[0].name, "shape": _dims(model.graph.outputs[0])},
        "totals": {"params": param_count(model), "gflops_per_image": matmul_flops(model) / 1e9},
        "structure": structure.summary(),
        "parity": ctx.results["parity"],
        **({"semantic_tokens": ctx.results["semantic_tokens"]} if "semantic_tokens" in ctx.results else {}),
        "passes": ctx.log,
        "options": {k: v for k, v in asdict(options).items() if k not in ("weights", "model_kwargs")},
    }
    with atomic_output_dir(output) as staging:
        manifest.update(backend.emit(model, staging))
        if options.data:
            say("evaluate")
            manifest["accuracy"] = evaluate_compiled(src.reference, src.reference_kind,
                                                     backend.runner(staging / manifest["files"]["model"]), test_data)
        if options.measure_rounds:
            say("measure")
            manifest["latency"] = measure_artifact(staging / manifest["files"]["model"], manifest, options.measure_rounds,
                                                   backend)
        if prune_pass is not None:
            from .pruning.report import finish_pruning_report

            say("measure pruned vs unpruned")
            manifest["pruning"] = finish_pruning_report(ctx.results, structure, manifest, staging,
                                                        options.latency_batch, rounds=max(6 * options.measure_rounds, 10))
        manifest["files"]["report"] = "report.md"
        manifest["files"]["manifest"] = MANIFEST
        (staging / "report.md").write_text(render_report(manifest), encoding="utf-8")
        write_json(staging / MANIFEST, manifest)
    return manifest


def _resolve_tokens(src, config: "SemanticTokenConfig") -> "SemanticTokenConfig":
    from .tokens.stvit import check_supported

    if src.torch_module is None:
        raise DeployCompError("--semantic-tokens rewrites and fine-tunes the model: give timm:<name>, not an .onnx file")
    config = config.resolved(len(getattr(src.torch_module, "blocks", None) or getattr(src.torch_module, "layers", [])))
    check_supported(src.torch_module, config)
    return config


def _prune_setup(src, options: CompileOptions, backend, test, say, tokens=None, lowering: str = "reference"):
    """The prune pass for a timm source: its latency table, training data, and an unpruned copy of
    the module as the "before" reference (the pass prunes the source module in place; with semantic
    tokens it prunes their torch model, which shares the source's parameters)."""
    import copy

    from .frontend import Source, torch_reference
    from .latency.predictor import LatencyPredictor
    from .latency.profiler import device_fingerprint, grid_for
    from .latency.table import load_table, table_path
    from .learn.data import load_data
    from .passes.prune import PrunePass

    if src.torch_module is None:
        raise DeployCompError("--latency pruning trains the model: give timm:<name> (with --weights), not an .onnx file")
    module = src.torch_module
    geometry = {"img_size": src.input_shape[-1], "patch": int(module.patch_embed.patch_size[0]),
                "in_chans": src.input_shape[1], "num_classes": int(module.num_classes)}
    grid = grid_for(geometry)
    fp = device_fingerprint(backend, options.latency_batch, "fp32")
    path = table_path(Path(options.tables), fp, grid)
    if not path.is_file():
        raise DeployCompError(f"no latency table for this device at batch {options.latency_batch} and grid {grid}: "
                              f"run `deploycomp profile --target {options.target} --batch {options.latency_batch} "
                              f"--grid {grid}` (expected {path})")
    predictor = LatencyPredictor(load_table(path, fp))
    train = None
    if options.data:
        train = load_data(options.data, "train", img_size=geometry["img_size"], in_chans=geometry["in_chans"])
        train = train.head(options.train_samples)
    original = copy.deepcopy(module).eval()
    src = Source(src.name, src.family, src.model, src.input_shape, torch_reference(original), "torch (unpruned)", module,
                 {**src.meta, "latency_table": str(path)})
    if tokens is not None:
        from .tokens.stvit import SemanticTokenViT

        module = SemanticTokenViT(module, tokens)
    return src, PrunePass(options.prune, module, predictor, geometry, train, test, say, options.latency_batch,
                          measure_rounds=max(6 * options.measure_rounds, 10), tokens=tokens,
                          teacher=original if tokens is not None else None, token_lowering=lowering)


def _tokens_setup(src, options: CompileOptions, tokens, test, say):
    """The semantic-token pass for a timm DeiT source: training data for its fine-tuning, and the
    unrewritten model as the "before" reference."""
    import copy

    from .frontend import Source, torch_reference
    from .learn.data import load_data
    from .passes.semantic_tokens import SemanticTokensPass

    if options.token_finetune_epochs and not options.data:
        raise DeployCompError("fine-tuning after the token rewrite needs training data (--data)")
    train = None
    if options.token_finetune_epochs:
        train = load_data(options.data, "train", img_size=src.input_shape[-1], in_chans=src.input_shape[1])
        train = train.head(options.train_samples)
    original = copy.deepcopy(src.torch_module).eval()  # the "before" reference and the distillation teacher
    token_pass = SemanticTokensPass(tokens, src.torch_module, train, test, options.token_finetune_epochs,
                                    options.token_finetune_lr, options.token_teacher_logits, say, seed=options.seed or 0,
                                    teacher=original)
    src = Source(src.name, src.family, src.model, src.input_shape, torch_reference(original), "torch (unrewritten)",
                 src.torch_module, src.meta)
    return src, token_pass


def load_eval_data(data: str, input_shape: tuple[int, ...], samples: int | None = None):
    """The labelled test split the compile report scores, checked against the model's input geometry."""
    from .learn.data import check_geometry, load_data

    test = load_data(data, "test", img_size=input_shape[-1], in_chans=input_shape[1])
    check_geometry(test, input_shape)
    return test.head(samples)


def evaluate_compiled(reference, reference_kind: str, artifact_runner, test) -> dict[str, Any]:
    """Top-1 of the reference (torch, or the input graph) and of the artifact on its backend, same samples."""
    from .learn.evaluate import evaluate_runner

    before = evaluate_runner(reference, test)
    after = evaluate_runner(artifact_runner, test)
    return {"data": test.name, "samples": len(test), "reference": reference_kind, "reference_top1": before,
            "artifact_top1": after, "delta_pt": after - before}


def measure_artifact(model_path: Path, manifest: dict, rounds: int, backend=None) -> dict[str, Any]:
    """Batch-1 latency of the artifact: with its recorded ONNX Runtime session options, or timed by
    the backend's own runner (TensorRT: the engine file, CUDA events)."""
    from .bench.harness import measure_interleaved, ort_candidate, stats

    shape = tuple(d if isinstance(d, int) else 1 for d in manifest["input"]["shape"])
    if "session_options" not in manifest:
        engine = Path(model_path).parent / manifest["files"].get("engine", Path(model_path).name)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        return {"batch": 1, **stats([ms / 1e3 for ms in backend.runner(engine).time(x, repeats=10 * rounds)])}
    cand = ort_candidate("artifact", "deploycomp", Path(model_path).read_bytes(), shape, manifest["session_options"])
    times = measure_interleaved([cand], batch=1, rounds=rounds, iters=3, warmup=2)
    return {"batch": 1, **stats(times["artifact"])}


def inspect(path: str | Path) -> Structure:
    """The ViT structure of an ONNX file or an artifact directory, as the compiler sees it."""
    from .frontend import load_onnx_file
    from .passes.cleanup import CleanupPass
    from .passes.discover import DiscoverPass

    path = Path(path)
    if path.is_dir():
        manifest = read_manifest(path)
        path = path / manifest["files"]["model"]
    src = load_onnx_file(path)
    ctx = CompileContext()
    Pipeline([CleanupPass(), DiscoverPass()], DEFAULT_INVARIANTS)(src.model, ctx)
    return ctx.structure


BASELINE_ALIASES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
}


def baseline_name(alias: str) -> str:
    from .frontend.timm_models import timm_spec

    name = BASELINE_ALIASES.get(alias.removeprefix("timm:"), alias.removeprefix("timm:"))
    return timm_spec(name).name


def bench(artifact: str | Path | None = None, baselines: list[str] = (), *, threads: int | None = None,
          rounds: int = 10, iters: int = 3, throughput_batch: int = 8, kinds: tuple[str, ...] = ("torch", "ort"),
          output_json: str | Path | None = None, model_kwargs: dict | None = None,
          progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Measure the artifact and baselines interleaved in one run: batch-1 latency and batch-N throughput.

    ``kinds`` picks the baseline flavours: ``torch`` (timm in torch eager) and ``ort`` (the plain
    export in ONNX Runtime with default session options).
    """
    from .backends.fingerprint import host_fingerprint, usable_cores
    from .bench.harness import measure_interleaved, ort_candidate, summarize, torch_candidate
    from .frontend.export import export_to_onnx
    from .frontend.timm_models import build_timm_model, timm_input_shape, timm_spec
    from .ir.shapes import matmul_flops

    threads = threads or usable_cores()
    candidates = []
    if artifact is not None:
        manifest = read_manifest(Path(artifact))
        model_path = Path(artifact) / manifest["files"]["model"]
        shape = tuple(d if isinstance(d, int) else 1 for d in manifest["input"]["shape"])
        config = {**manifest["session_options"], "intra_op_threads": threads}
        candidates.append(ort_candidate(f"deploycomp:{manifest['source']['model']}", "deploycomp", model_path.read_bytes(),
                                        shape, config, manifest["source"]["model"], manifest["totals"]["gflops_per_image"]))
    for alias in baselines:
        name = baseline_name(alias)
        spec = timm_spec(name)
        module = build_timm_model(name, model_kwargs=model_kwargs)
        shape = timm_input_shape(spec, model_kwargs)
        onnx_model = export_to_onnx(module, shape)
        gflops = matmul_flops(onnx_model) / 1e9
        if "torch" in kinds:
            candidates.append(torch_candidate(f"torch:{name}", module, shape, threads, name, gflops))
        if "ort" in kinds:
            config = {"intra_op_threads": threads, "optimization_level": "all", "providers": ["CPUExecutionProvider"]}
            candidates.append(ort_candidate(f"ort:{name}", "ort", ir.serde.serialize_model(onnx_model).SerializeToString(),
                                            shape, config, name, gflops))
    if not candidates:
        raise DeployCompError("nothing to bench: give an artifact directory and/or --baselines")

    tick = (lambda phase: (lambda: progress(phase, rounds))) if progress else (lambda phase: None)
    latency = measure_interleaved(candidates, batch=1, rounds=rounds, iters=iters, progress=tick("batch 1"))
    throughput = measure_interleaved(candidates, batch=throughput_batch, rounds=rounds, iters=max(1, iters - 1),
                                     progress=tick(f"batch {throughput_batch}"))
    rows = summarize(candidates, latency, throughput, throughput_batch)
    result = {
        "deploycomp_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {**host_fingerprint(), "threads": threads},
        "protocol": {"rounds": rounds, "iters_per_round": iters, "interleaved": True, "throughput_batch": throughput_batch},
        "rows": rows,
    }
    if output_json is not None:
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(output_json).with_suffix(".json.tmp")
        write_json(tmp, result)
        tmp.replace(output_json)
    return result


def _dims(value: ir.Value) -> list[int | str]:
    return [d if isinstance(d, int) else str(d) for d in value.shape]



def train(model: str, out: str | Path, config: "TrainConfig | None" = None, *, data: str = "fashion-mnist",
          weights: str | None = None, model_kwargs: dict | None = None, teacher_logits: str | None = None,
          teacher: str | None = None, teacher_weights: str | None = None, train_subset: int | None = None,
          test_subset: int | None = None, threads: int | None = None, resume: bool = True,
          log: Callable[[str], None] | None = None, progress=None) -> dict[str, Any]:
    """Train or fine-tune ``timm:<name>`` on ``data`` into ``out`` (checkpoint, weights, metrics).

    Runs alone or under ``torchrun`` (DDP). A teacher is either stored top-K logits
    (``teacher_logits``, TinyViT) or a live model (``teacher`` + ``teacher_weights``).
    """
    import time

    import torch

    from .backends.fingerprint import host_fingerprint, usable_cores
    from .frontend.timm_models import build_timm_model, timm_input_shape, timm_spec
    from .learn.data import load_data
    from .learn.distill import LiveTeacher, StoredTeacher
    from .learn.distributed import close_world, init_world
    from .learn.train import METRICS, TrainConfig, fit

    config = config or TrainConfig()
    name = model.removeprefix("timm:")
    spec = timm_spec(name)
    world = init_world()
    try:
        torch.set_num_threads(threads or max(1, usable_cores() // world.size))
        torch.manual_seed(config.seed)
        module = build_timm_model(name, Path(weights) if weights else None, model_kwargs)
        kwargs = model_kwargs or {}
        _, chans, img, _ = timm_input_shape(spec, kwargs)
        train_set = load_data(data, "train", img, chans).head(train_subset)
        test_set = load_data(data, "test", img, chans).head(test_subset)
        source = None
        if teacher_logits and teacher:
            raise DeployCompError("give stored teacher logits or a live teacher, not both")
        if teacher_logits:
            source = StoredTeacher(teacher_logits)
            source.check_compatible(train_set, config.view, config.epochs)
        elif teacher:
            source = LiveTeacher(build_timm_model(teacher.removeprefix("timm:"), Path(teacher_weights) if teacher_weights else None))
        run_info = {"model": f"timm:{name}", "model_kwargs": {k: str(v) for k, v in kwargs.items()},
                    "init_weights": str(weights), "data": data, "train_samples": len(train_set),
                    "teacher": teacher_logits and f"stored:{teacher_logits}" or (teacher and f"live:{teacher}") or ""}
        t0 = time.monotonic()
        result = fit(module, train_set, test_set, config, out_dir=out, teacher=source, world=world,
                     resume=resume, run_info=run_info, log=log, progress=progress)
        metrics = {
            "deploycomp_version": __version__, **run_info, "model_kwargs": kwargs, "init_weights": weights,
            "test_samples": len(test_set),
            "config": asdict(config), "world_size": world.size, "threads_per_process": torch.get_num_threads(),
            "host": host_fingerprint(), "finished": result.finished, "test_accuracy": result.test_accuracy,
            "train_seconds": result.train_seconds, "wall_seconds_this_call": time.monotonic() - t0,
            "history": result.history,
        }
        if world.is_main:
            write_json(Path(out) / METRICS, metrics)
        return metrics
    finally:
        close_world(world)


def store_logits(teacher: str, out: str | Path, *, weights: str | None = None, data: str = "fashion-mnist",
                 epochs: int, topk: int = 5, seed: int = 0, max_shift: int = 2, flip: bool = True,
                 train_subset: int | None = None, model_kwargs: dict | None = None, progress=None) -> dict[str, Any]:
    """Store ``teacher``'s top-K probabilities for every training view of ``epochs`` epochs (TinyViT)."""
    import time

    import torch

    from .backends.fingerprint import usable_cores
    from .frontend.timm_models import build_timm_model, timm_input_shape, timm_spec
    from .learn.data import load_data
    from .learn.distill import ViewSpec, store_teacher_logits

    name = teacher.removeprefix("timm:")
    spec = timm_spec(name)
    torch.set_num_threads(usable_cores())
    module = build_timm_model(name, Path(weights) if weights else None, model_kwargs)
    _, chans, img, _ = timm_input_shape(spec, model_kwargs)
    train_set = load_data(data, "train", img, chans).head(train_subset)
    t0 = time.monotonic()
    info = store_teacher_logits(module, train_set, out, epochs=epochs, view=ViewSpec(seed, max_shift, flip), topk=topk,
                                progress=progress)
    return {**info, "seconds": time.monotonic() - t0}


def evaluate(model: str, *, data: str = "fashion-mnist", weights: str | None = None, samples: int | None = None,
             model_kwargs: dict | None = None) -> dict[str, Any]:
    """Top-1 on the test split: an artifact directory on its backend, or ``timm:<name>`` in torch."""
    from .learn.evaluate import evaluate_artifact, evaluate_module

    if model.startswith("timm:"):
        from .frontend.timm_models import build_timm_model, timm_input_shape, timm_spec

        spec = timm_spec(model.removeprefix("timm:"))
        module = build_timm_model(spec.name, Path(weights) if weights else None, model_kwargs)
        test = load_eval_data(data, timm_input_shape(spec, model_kwargs), samples)
        return {"model": model, "data": test.name, "samples": len(test), "runtime": "torch",
                "top1": evaluate_module(module, test)}
    manifest = read_manifest(Path(model))
    shape = tuple(d if isinstance(d, int) else 1 for d in manifest["input"]["shape"])
    test = load_eval_data(data, shape, samples)
    return {"model": model, "data": test.name, "samples": len(test), "runtime": manifest["target"]["target"],
            "top1": evaluate_artifact(model, test)}
