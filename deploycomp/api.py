"""The Python API: the same verbs as the CLI (compile, inspect, bench).

>>> import deploycomp
>>> manifest = deploycomp.compile("timm:deit_tiny_patch16_224", "out/")
>>> structure = deploycomp.inspect("out/")
>>> rows = deploycomp.bench("out/", baselines=["deit_tiny"])
"""

from __future__ import annotations

import datetime as _dt
import secrets
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import __version__
from .artifact import check_output_dir, read_manifest, write_json
from .backends.base import DEFAULT_TARGET
from .errors import DeployCompError, DeployCompWarning
from .latency.precision_choice import AUTO_PRECISIONS

if TYPE_CHECKING:  # the compiler's modules (onnx_ir, torch) are imported where used: a request is checked first
    from .backends.base import Backend
    from .ir.structure import Structure
    from .job import CompileJob
    from .passes.base import Pass
    from .learn.train import TrainConfig
    from .pruning.schedule import PruneConfig
    from .tokens.stvit import SemanticTokenConfig

Progress = Callable[[str], None]
# Default verification tolerance (relative L2 of the logits) per precision: float32 rewrites are
# exact up to rounding; fp16 measured 5.2e-4 on a tiny DeiT (tests/test_tensorrt.py); bf16 keeps
# 8 mantissa bits (2^-8 ~ 4e-3 per rounding, accumulated over a dozen blocks).
PRECISION_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}
# int8 cannot meet a relative L2 bound: its gate is top-1 agreement and cosine with the fp32
# reference on held-out inputs (passes/verify.py). NNCF int8 of random-init DeiT-S on OpenVINO
# measured cosine 0.997 and agreement 8/8 on Gaussian inputs; a broken quantization falls far below.
PRECISIONS = (*PRECISION_TOLERANCE, "int8")


@dataclass
class CompileOptions:
    """Everything ``compile`` can be told; defaults are the embedded default (``DEFAULT_TARGET``, fp32)."""

    target: str = DEFAULT_TARGET
    weights: str | None = None
    opset: int = 18
    threads: int | None = None  # runtime threads of the target; default: all usable cores
    runtime: dict[str, Any] = field(default_factory=dict)  # further target options, e.g. allow_spinning (ort-*)
    fuse: bool = False  # ONNX Runtime transformer fusions (see passes/fuse.py: off until it measures faster)
    precision: str = "fp32"  # fp16 / bf16: as the target runs it (the precision pass, or the runtime's own); int8; auto (with prune: latency/precision_choice.py)
    tolerance: float | None = None  # relative L2 of the logits vs the reference; None: per precision
    verify_batches: tuple[int, ...] = (1, 3)
    measure_rounds: int = 5  # batch-1 latency of the artifact measured after emitting (0: skip)
    seed: int | None = None  # verification inputs; None draws a fresh seed (recorded in the manifest)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm overrides, e.g. depth, img_size
    data: str | None = None  # labelled data (fashion-mnist or an image folder): top-1 before/after on the target
    eval_samples: int | None = None  # first N test samples only
    prune: "PruneConfig | None" = None  # NViT pruning to a latency budget (a bare .onnx gets a torch twin)
    latency_batch: int = 1  # the batch the latency budget is for: picks the latency table
    tables: str = "latency_tables"  # root of the latency tables
    calibrate_rounds: int = 4  # rounds the unpruned model and a narrowed copy are timed to calibrate the latency table (0: trust the table)
    train_samples: int | None = None  # first N training samples for pruning (tests, quick looks)
    semantic_tokens: "SemanticTokenConfig | None" = None  # STViT semantic tokens (DeiT-style: one cls token)
    token_finetune_epochs: int = 0  # fine-tuning after the token rewrite (with --data; pruning has its own)
    token_finetune_lr: float = 5e-4
    token_teacher_logits: str | None = None  # stored top-K teacher logits for that fine-tuning
    token_lowering: str | None = None  # TokenCluster lowering; None: the target's default
    calibration_samples: int = 128  # int8: images NNCF calibrates on (--data training images, else Gaussian)
    fidelity_top1: float = 0.9  # int8 gate: min top-1 agreement with the fp32 reference on held-out inputs
    fidelity_cosine: float = 0.99  # int8 gate: min mean cosine of the outputs
    fidelity_samples: int = 64
    # int8 with --data: max top-1 drop (points) of the artifact on the target vs the fp32 reference, on every
    # given test image (--eval-samples bounds them; one image is 100/N pt). 1.0 pt: issue 16's bound for the
    # joint pruned + int8 artifact (published int8 PTQ of ViT-B lost 2.15 pt)
    max_drop: float = 1.0
    sensitivity_samples: int = 16  # int8: held-out images the per-layer sensitivity runs on (0: none, no fallback)
    max_float_layers: int | None = None  # int8 fallback: most layers kept in float; None: a quarter; 0: no fallback
    # int8 quantization-aware fine-tuning (with --data; nncf Q/DQ targets): the PTQ graph's float weights tuned
    # under its quantizers by distillation from the fp32 model (passes/quantize.py, learn/qat.py); 0: PTQ only
    qat_epochs: int = 0
    qat_lr: float = 1e-4
    qat_teacher_logits: str | None = None  # stored top-K teacher logits for it (deploycomp store-logits)
    # what the model outputs: None takes the source's word (a CLIP tower, hf ViTModel or a timm model
    # with num_classes=0: "embedding"; a classifier: "logits"); set "embedding" for a timm CLIP tower
    # whose head is its projection. An embedding model distils with feature_loss and reports cosine.
    output: str | None = None
    feature_loss: str = "cosine"  # embedding distillation: "cosine" (1 - cos) or "mse" (normalized)


def check_options(source: str, options: CompileOptions) -> None:
    """Refuse what cannot work before anything slow happens: the flags first, then the source's
    cheap facts (frontend.check_compile_request). No model is loaded and, but for a timm: name or a
    semantic-token request on a torch source, torch is not imported."""
    if options.precision not in (*PRECISIONS, "auto"):
        raise DeployCompError(f"unknown precision '{options.precision}': use one of {', '.join(PRECISIONS)} or auto")
    if options.precision == "auto" and options.prune is None:
        raise DeployCompError("--precision auto picks the precision that meets the latency budget: give --latency")
    lossy = options.precision in ("int8", "auto")  # auto may pick int8
    if lossy and not options.max_drop >= 0:
        raise DeployCompError(f"--max-drop must be >= 0 points, not {options.max_drop}")
    if lossy and (options.max_float_layers or 0) < 0:
        raise DeployCompError(f"--max-float-layers must be >= 0, not {options.max_float_layers}")
    if lossy and options.max_float_layers and not options.sensitivity_samples > 0:
        raise DeployCompError("the int8 fallback (--max-float-layers) ranks layers by sensitivity: sensitivity_samples must be > 0")
    static_batch = options.runtime.get("static_batch")
    if static_batch is not None and options.prune is not None and options.latency_batch != static_batch:
        raise DeployCompError(f"--static-batch {static_batch} fixes the artifact's batch: a latency budget is for "
                              f"that batch, not --latency-batch {options.latency_batch}")
    from .learn.objective import Objective

    Objective(options.output or "logits", options.feature_loss)  # known values, or one line
    if options.qat_epochs:
        if options.precision != "int8":
            raise DeployCompError(f"quantization-aware fine-tuning applies to --precision int8, not {options.precision}")
        if not options.data:
            raise DeployCompError("quantization-aware fine-tuning (--finetune-epochs with --precision int8) needs "
                                  "training data (--data)")
        if options.prune is not None or options.semantic_tokens is not None:
            raise DeployCompError("quantization-aware fine-tuning runs on an int8 compile without --latency or "
                                  "--semantic-tokens (their --finetune-epochs is their own recovery)")
    if options.token_finetune_epochs and not options.data:
        raise DeployCompError("fine-tuning after the token rewrite needs training data (--data)")
    if options.prune is not None and (options.prune.kd_steps or options.prune.finetune_epochs) and not options.data:
        raise DeployCompError("distillation and fine-tuning need training data (--data)")
    from .frontend import check_compile_request, is_torch_source

    check_compile_request(source, options.weights, options.model_kwargs, prune=options.prune is not None,
                          semantic_tokens=options.semantic_tokens or False)
    if options.prune is not None and is_torch_source(source):
        # the tables are keyed by the input geometry, which the model built on the meta device gives:
        # a missing table is refused here, not after the source is built (24 s for a Swin-T)
        from .frontend import meta_input_shape, meta_module

        meta = meta_module(source, options.model_kwargs)
        _latency_tables(meta, meta_input_shape(meta), options)


def make_backend(options: CompileOptions) -> "Backend":
    """The target with its runtime options; a precision the runtime runs itself becomes one of them."""
    from .backends.base import get_backend

    runtime = {**options.runtime, "threads": options.threads}
    backend = get_backend(options.target, **runtime)
    if options.precision == "auto":  # resolved once the latency tables are read (plan_compile)
        return backend
    how = backend.precisions.get(options.precision)
    if how is None:
        raise DeployCompError(f"target '{options.target}' runs precisions {', '.join(backend.precisions)}, "
                              f"not '{options.precision}'")
    if how == "runtime" and options.precision != "fp32":
        backend = get_backend(options.target, **runtime, precision=options.precision)
    return backend


def default_passes(options: CompileOptions, backend: "Backend", tokens: "SemanticTokenConfig | None" = None) -> list[Pass]:
    """The pass list ``compile`` runs for ``options`` on ``backend``, each built from its config."""
    from .passes.base import build_pass

    passes = [build_pass("cleanup"), build_pass("discover")]
    rewrites: list[Pass] = []
    if tokens is not None:
        rewrites.append(build_pass("semantic_tokens", config=tokens, finetune_epochs=options.token_finetune_epochs,
                                   finetune_lr=options.token_finetune_lr, teacher_logits=options.token_teacher_logits,
                                   seed=options.seed or 0))
        lowering = options.token_lowering or backend.token_cluster_lowering
        if lowering is not None:  # None: the target runs TokenCluster itself (a TensorRT plugin)
            rewrites.append(build_pass("lower_token_cluster", how=lowering))
    if options.prune is not None:  # with tokens: one budget for both axes, pruning trains the token model
        passes.append(build_pass("prune", config=options.prune, rewrites=rewrites, latency_batch=options.latency_batch,
                                 measure_rounds=max(6 * options.measure_rounds, 10),
                                 calibrate_rounds=options.calibrate_rounds, precision=options.precision))
    passes += rewrites
    if options.fuse:
        passes.append(build_pass("ort_fusion"))
    if options.precision == "int8":
        passes.append(build_pass("quantize", samples=options.calibration_samples, method=backend.int8_quantizer,
                                 sensitivity_samples=options.sensitivity_samples,
                                 max_float_layers=options.max_float_layers, qat_epochs=options.qat_epochs,
                                 qat_lr=options.qat_lr, qat_teacher_logits=options.qat_teacher_logits))
    elif options.precision != "fp32" and backend.precisions[options.precision] == "graph":
        passes.append(build_pass("precision", dtype=options.precision))
    passes.append(build_pass("verify"))
    return passes


def plan_compile(source: str, output: str | Path, options: CompileOptions | None = None,
                 progress: Progress | None = None) -> CompileJob:
    """Turn options into a job: check them, build the backend, load the source and data, load and
    the latency table when a pass needs one, and build the passes."""
    import copy

    from .frontend import load_source, torch_reference
    from .job import CompileJob, start_compile_meter
    from .passes.base import CompileContext

    started = start_compile_meter()
    options = options or CompileOptions()
    check_options(source, options)
    say = progress or (lambda stage: None)
    output = Path(output)
    backend = make_backend(options)
    if options.qat_epochs and not backend.int8_quantizer.startswith("nncf"):
        raise DeployCompError(f"quantization-aware fine-tuning tunes the weights under a Q/DQ graph's quantizers; "
                              f"{options.target}'s int8 is {backend.int8_quantizer} (no fixed scales): use "
                              "openvino-cpu or tensorrt")
    check_output_dir(output)

    say("load")
    src = load_source(source, options.weights, options.model_kwargs, options.opset,
                      torch_twin=options.prune is not None or options.semantic_tokens is not None or options.qat_epochs > 0)
    tokens = _resolve_tokens(src, options.semantic_tokens) if options.semantic_tokens is not None else None
    if options.qat_epochs:
        from .learn.qat import check_emulable

        check_emulable(src.torch_module)  # before the data, the calibration and NNCF
    output_kind = options.output or src.meta.get("output", "logits")  # (``output`` is the artifact directory)
    src.meta = {**src.meta, "output": output_kind}
    stored = options.token_teacher_logits or options.qat_teacher_logits or (
        options.prune.teacher_logits if options.prune is not None else None)
    if output_kind == "embedding" and stored:
        raise DeployCompError(f"{source} outputs an embedding: its distillation matches the source's embedding, "
                              "stored teacher logits (class probabilities) do not apply")
    latency_tables = _latency_tables(src.torch_module, src.input_shape, options) if options.prune is not None else None
    choice = None
    if options.precision == "auto":
        from .latency.precision_choice import choose_precision, source_arch

        arch = source_arch(src.model, src.torch_module, src.input_shape)
        choice = choose_precision(latency_tables, arch, options.prune.latency)
        options = replace(options, precision=choice["precision"])
        backend = make_backend(options)
        latency_tables = {p: latency_tables[p] for p in ("fp32", options.precision)}
    ctx = CompileContext(
        family=src.family, reference=src.reference, reference_kind=src.reference_kind, backend=backend,
        module=src.torch_module, input_shape=src.input_shape, verify_batches=tuple(options.verify_batches),
        tolerance=options.tolerance if options.tolerance is not None else PRECISION_TOLERANCE.get(options.precision, 0.0),
        fidelity=None if options.precision != "int8" else {"top1_agreement": options.fidelity_top1,
                                                          "cosine": options.fidelity_cosine,
                                                          "samples": options.fidelity_samples,
                                                          "max_drop": options.max_drop},
        seed=options.seed if options.seed is not None else secrets.randbelow(2**31), say=say,
        output=output_kind, feature_loss=options.feature_loss,
    )
    ctx.test = load_eval_data(options.data, src.input_shape, options.eval_samples) if options.data else None
    before = (src.reference, src.reference_kind)
    if options.prune is not None or tokens is not None:  # these train the source module in place
        ctx.teacher = copy.deepcopy(src.torch_module).eval()
        before = (torch_reference(ctx.teacher), "torch (unpruned)" if options.prune is not None else "torch (unrewritten)")
        ctx.reference = before[0]
        needs_train = options.data and (options.prune is not None or options.token_finetune_epochs)
        if needs_train:
            from .learn.data import load_data

            ctx.train = load_data(options.data, "train", img_size=src.input_shape[-1],
                                  in_chans=src.input_shape[1]).head(options.train_samples)
    if options.precision == "int8":
        calibrated = backend.int8_quantizer.startswith("nncf")  # ort-dynamic needs no calibration images
        if options.data:  # calibration images, then the per-layer sensitivity's (both from the training split)
            from .learn.data import load_data

            ctx.train = ctx.train or load_data(options.data, "train", img_size=src.input_shape[-1],
                                               in_chans=src.input_shape[1]).head(
                options.train_samples if options.qat_epochs else
                options.calibration_samples * calibrated + options.sensitivity_samples)
        elif calibrated:
            import warnings

            from .passes.quantize import SYNTHETIC_WARNING

            warnings.warn(SYNTHETIC_WARNING, DeployCompWarning, stacklevel=2)
    record = {k: v for k, v in asdict(options).items() if k not in ("weights", "model_kwargs")}
    if choice is not None:
        record["precision_requested"] = "auto"
        ctx.results["precision_choice"] = choice
    if latency_tables is not None:
        ctx.latency, table_path = latency_tables[options.precision]
        if options.precision != "fp32":
            ctx.latency_reference = latency_tables["fp32"][0]
        src.meta = {**src.meta, "latency_table": str(table_path)}
    return CompileJob(src, backend, default_passes(options, backend, tokens), output, ctx, before,
                      options.measure_rounds, options.latency_batch, record, started)


def compile(source: str, output: str | Path, options: CompileOptions | None = None,
            progress: Progress | None = None) -> dict[str, Any]:
    """Compile ``source`` (``timm:<name>`` or a ``.onnx`` path) into a verified artifact at ``output``."""
    return plan_compile(source, output, options, progress).run(progress)


def _resolve_tokens(src, config: "SemanticTokenConfig") -> "SemanticTokenConfig":
    from .tokens.stvit import check_supported

    config = config.for_model(src.torch_module)  # the generator layer and the prefix tokens of this model
    check_supported(src.torch_module, config)
    return config


def _latency_tables(module, input_shape: tuple[int, ...], options: CompileOptions) -> dict[str, tuple[Any, Path]]:
    """Precision -> (predictor, path) of the target's latency tables for the geometry of ``module``
    (the source's torch model, or the same built on the meta device): fp32 (what a budget is
    relative to) and the compile's precision, or with ``--precision auto`` every candidate the target
    runs and has a table for. The prune pass calibrates them on the device."""

    from .latency.predictor import LatencyPredictor
    from .latency.profiler import device_fingerprint, grid_for
    from .latency.table import load_table, table_path
    from .passes.prune import geometry_of

    grid = grid_for(geometry_of(module, input_shape))
    auto = options.precision == "auto"
    out = {}
    for precision in AUTO_PRECISIONS if auto else dict.fromkeys(("fp32", options.precision)):
        try:
            backend = make_backend(replace(options, precision=precision))
        except DeployCompError:
            if auto:  # a precision this target or CPU does not run is no candidate
                continue
            raise
        fp = device_fingerprint(backend, options.latency_batch, precision)
        path = table_path(Path(options.tables), fp, grid)
        if not path.is_file():
            if auto and precision != "fp32":
                continue
            flag = ("" if precision == "fp32" else f" --precision {precision}") + \
                   (" --static-batch" if options.runtime.get("static_batch") else "")
            others = sorted(p.name for p in path.parent.glob(path.name.replace(f"-{fp['isa']}-", "-*-", 1)))
            elsewhere = f"; tables of this CPU model with other instruction sets ({', '.join(others)}) do not " \
                        "predict this one" if others else ""
            raise DeployCompError(f"no latency table for this device at batch {options.latency_batch}, precision "
                                  f"{precision} and grid {grid}: run `deploycomp profile --target {options.target} --batch "
                                  f"{options.latency_batch} --grid {grid}{flag}` (expected {path}){elsewhere}")
        table = load_table(path, fp)
        if hasattr(module, "layers"):  # Swin: refused here, before any work, by a table without Swin parts
            from .latency.predictor import check_swin_table

            check_swin_table(table)
        out[precision] = (LatencyPredictor(table), path)
    return out


def load_eval_data(data: str, input_shape: tuple[int, ...], samples: int | None = None):
    """The labelled test split the compile report scores, checked against the model's input geometry."""
    from .learn.data import check_geometry, load_data

    test = load_data(data, "test", img_size=input_shape[-1], in_chans=input_shape[1])
    check_geometry(test, input_shape)
    return test.head(samples)


def inspect(path: str | Path) -> Structure:
    """The ViT structure of an ONNX file or an artifact directory, as the compiler sees it."""
    from .frontend import load_onnx_file
    from .passes.base import DEFAULT_INVARIANTS, CompileContext, Pipeline
    from .passes.cleanup import CleanupPass
    from .passes.discover import DiscoverPass

    path = Path(path)
    if path.is_dir():
        manifest = read_manifest(path)
        path = path / manifest["files"].get("onnx", manifest["files"]["model"])
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


# bench baseline flavours: torch eager, each runtime's plain conversion, and the int8 its user would make
BASELINE_KINDS = ("torch", "ort", "openvino", "ort-int8", "openvino-int8")


def baseline_name(alias: str) -> str:
    from .frontend.timm_models import timm_spec

    name = BASELINE_ALIASES.get(alias.removeprefix("timm:"), alias.removeprefix("timm:"))
    return timm_spec(name).name


def bench(artifact: str | Path | None = None, baselines: list[str] = (), *, threads: int | None = None,
          rounds: int = 10, iters: int = 3, throughput_batch: int = 8,
          kinds: tuple[str, ...] = ("torch", "ort", "openvino"), output_json: str | Path | None = None,
          model_kwargs: dict | None = None, progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Measure the artifact and baselines interleaved in one run: batch-1 latency and batch-N throughput.

    The artifact runs on the backend and options its manifest records (threads overridden by
    ``threads``). ``kinds`` picks the baseline flavours: ``torch`` (timm in torch eager), ``ort``
    (the plain export in ONNX Runtime with its default session options, spinning on) and
    ``openvino`` (the plain export in OpenVINO, fp32), and the int8 a user of each runtime would
    make without deploycomp: ``ort-int8`` (ONNX Runtime's dynamic quantization) and
    ``openvino-int8`` (NNCF post-training quantization, transformer preset, Gaussian calibration).
    """
    import shutil
    import tempfile

    from .backends.base import backend_for_manifest, get_backend
    from .backends.fingerprint import host_fingerprint, usable_cores
    from .backends.openvino import nncf_int8_ir
    from .backends.ort import dynamic_int8
    from .bench.harness import measure_interleaved, summarize, torch_candidate
    from .frontend.export import export_to_onnx
    from .frontend.timm_models import build_timm_model, timm_input_shape, timm_spec
    from .ir.shapes import matmul_flops

    unknown = sorted(set(kinds) - set(BASELINE_KINDS))
    if unknown:
        raise DeployCompError(f"unknown baseline kind {', '.join(unknown)}: use {', '.join(BASELINE_KINDS)}")
    threads = threads or usable_cores()
    tmp = Path(tempfile.mkdtemp(prefix="deploycomp-bench-"))
    peers = {  # kind -> (backend, the model as that peer prepares it from the export or the torch module)
        "ort": lambda m, module, shape, name: (get_backend("ort-cpu", threads=threads, allow_spinning=True), m),
        "openvino": lambda m, module, shape, name: (get_backend("openvino-cpu", threads=threads), m),
        "ort-int8": lambda m, module, shape, name: (get_backend("ort-cpu", threads=threads, allow_spinning=True),
                                                    dynamic_int8(m, tmp / f"{name}-ort-int8.onnx", preprocess=True)),
        "openvino-int8": lambda m, module, shape, name: (get_backend("openvino-cpu", threads=threads),
                                                         nncf_int8_ir(module, shape, tmp / f"{name}-openvino-int8.xml")),
    }
    candidates = []
    if artifact is not None:
        manifest = read_manifest(Path(artifact))
        backend = backend_for_manifest(manifest, threads=threads)
        shape = tuple(d if isinstance(d, int) else 1 for d in manifest["input"]["shape"])
        cand = backend.candidate(f"deploycomp:{manifest['source']['model']}", backend.artifact(Path(artifact), manifest),
                                 shape)
        cand.kind, cand.model, cand.gflops = f"deploycomp {backend.name}", manifest["source"]["model"], \
            manifest["totals"]["gflops_per_image"]
        candidates.append(cand)
    for alias in baselines:
        name = baseline_name(alias)
        spec = timm_spec(name)
        module = build_timm_model(name, model_kwargs=model_kwargs)
        shape = timm_input_shape(spec, model_kwargs)
        onnx_model = export_to_onnx(module, shape)
        gflops = matmul_flops(onnx_model) / 1e9
        if "torch" in kinds:
            candidates.append(torch_candidate(f"torch:{name}", module, shape, threads, name, gflops))
        for kind in (k for k in kinds if k in peers):
            backend, prepared = peers[kind](onnx_model, module, shape, name)
            cand = backend.candidate(f"{kind}:{name}", prepared, shape)
            cand.kind, cand.model, cand.gflops = f"{kind} plain", name, gflops
            candidates.append(cand)
    if not candidates:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DeployCompError("nothing to bench: give an artifact directory and/or --baselines")

    tick = (lambda phase: (lambda: progress(phase, rounds))) if progress else (lambda phase: None)
    try:
        latency = measure_interleaved(candidates, batch=1, rounds=rounds, iters=iters, progress=tick("batch 1"))
        throughput = measure_interleaved(candidates, batch=throughput_batch, rounds=rounds, iters=max(1, iters - 1),
                                         progress=tick(f"batch {throughput_batch}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
    from .learn.train import METRICS, TrainConfig, fit, train_device

    config = config or TrainConfig()
    name = model.removeprefix("timm:")
    spec = timm_spec(name)
    world = init_world()
    try:
        device = train_device(config.device, world)  # refused before the data and the model are built
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
            "host": host_fingerprint(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "finished": result.finished, "test_accuracy": result.test_accuracy,
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
    """Top-1 on the test split: an artifact directory on its backend, or ``timm:<name>`` in torch.
    An artifact whose model outputs an embedding has no top-1: it is scored by the mean cosine of
    its embeddings to its source model's (rebuilt from the manifest) on the test images."""
    from .learn.evaluate import evaluate_artifact, evaluate_module

    if model.startswith("timm:"):
        from .frontend import timm_output
        from .frontend.timm_models import build_timm_model, timm_input_shape, timm_spec

        spec = timm_spec(model.removeprefix("timm:"))
        module = build_timm_model(spec.name, Path(weights) if weights else None, model_kwargs)
        if timm_output(module) == "embedding":
            raise DeployCompError(f"{model} outputs an embedding (num_classes=0): there is no top-1; compile it and "
                                  "evaluate the artifact (cosine to the source)")
        test = load_eval_data(data, timm_input_shape(spec, model_kwargs), samples)
        return {"model": model, "data": test.name, "samples": len(test), "runtime": "torch",
                "top1": evaluate_module(module, test)}
    manifest = read_manifest(Path(model))
    shape = tuple(d if isinstance(d, int) else 1 for d in manifest["input"]["shape"])
    if manifest["source"].get("output") == "embedding":
        from .frontend import source_reference
        from .learn.evaluate import artifact_cosine

        reference = source_reference(manifest["source"])  # refused before the data is read if it cannot be rebuilt
        test = load_eval_data(data, shape, samples)
        return {"model": model, "data": test.name, "runtime": manifest["target"]["target"], "output": "embedding",
                "reference": manifest["source"]["model"], **artifact_cosine(model, reference, test)}
    test = load_eval_data(data, shape, samples)
    return {"model": model, "data": test.name, "samples": len(test), "runtime": manifest["target"]["target"],
            "top1": evaluate_artifact(model, test)}
