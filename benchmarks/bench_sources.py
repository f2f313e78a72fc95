"""Every source family through the compiler's methods, against timm DeiT-B in the same run (issue 17).

Sources, random init at 224 (timing does not depend on weight values; nothing is downloaded):
Hugging Face ViT-B/16 (``hf-config:`` of transformers' ViTForImageClassification defaults, 1000
classes), open_clip ViT-B/16 (``open_clip:ViT-B-16``, the image tower: a 512-wide embedding), timm
``vit_base_patch16_224``, and timm ``deit_base_patch16_224`` as the comparison. For each: the plain
compile, ``--latency 0.5x`` at batch 8 (method ``latency``) and ``--semantic-tokens 16``. All artifacts are then timed
interleaved in one run at batch 8 (shuffled rounds); a method's speedup is the source's plain
compile time / the method's artifact time, per round (median, p10-p90), and is compared with the
speedup the same method gives DeiT-B in the same run (target: within 10 %). Pruning budgets are
checked on the device (the compile's own interleaved check, and this run's ratio; target ±5 % of
0.5). The CLIP tower's fp32 compile is compared with open_clip's own module on fresh images
(target: cosine >= 0.9999). Finally each source family's time-to-refusal of an unsupported graph or
request is measured as the wall time of a fresh ``python -m deploycomp compile`` process (imports
included; target < 3 s).

    .venv/bin/python benchmarks/bench_sources.py                   # the lead's quiet-machine run
    .venv/bin/python benchmarks/bench_sources.py --quick --out /tmp/sources_quick.json   # a dry run in minutes
    .venv/bin/python benchmarks/bench_sources.py --workdir ~/bench-sources --rounds 24   # keep/reuse artifacts

``--quick`` runs the same code end to end on tiny configs (64 px, 2 blocks, a 12-wide CLIP
projection) at batch 2 with one round, to check the script: it profiles a 'tiny'-grid table for
its pruning (one pass, in a temporary directory) and its numbers mean nothing. Pruning at full
size needs the ort-cpu batch-8 table (the one profiled with thread spinning off, so the artifacts
here run with spinning off). The latency grid's head part is profiled with 1000 classes; the
open_clip tower's 512-wide projection is predicted by scaling it by FLOPs (latency/predictor.py,
noted in the pruning's predictions). A compile that is refused is recorded with its one error
line instead of numbers.

Writes benchmarks/results/sources.json and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads must not spin while runtimes are timed

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import deploycomp  # noqa: E402
from deploycomp.artifact import write_json  # noqa: E402
from deploycomp.backends.base import backend_for_manifest  # noqa: E402
from deploycomp.backends.fingerprint import host_fingerprint, usable_cores  # noqa: E402
from deploycomp.bench.harness import measure_interleaved, stats  # noqa: E402
from deploycomp.errors import DeployCompError  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REFERENCE = "timm DeiT-B"
BUDGET = 0.5  # --latency of the full run; --quick uses QUICK_BUDGET: a tiny model sits at the tiny grid's floor
QUICK_BUDGET = 0.9
PRUNE = "latency"  # the method key of the pruned artifact (its budget is in the row)
TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 2, "embed_dim": 32, "num_heads": 2}


def write_sources(workdir: Path, tiny: bool) -> dict[str, tuple[str, dict]]:
    # tiny: the CLIP projection (12) differs from the tiny grid's 10 classes, as ViT-B-16's 512 from 1000
    """label -> (source spec, CompileOptions overrides) of the four sources (configs written to ``workdir``)."""
    import open_clip
    import transformers

    hf = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=64,
              patch_size=16, num_labels=10) if tiny else dict(num_labels=1000)
    config = transformers.ViTConfig(**hf, architectures=["ViTForImageClassification"])
    (workdir / "hf_vit_b16.json").write_text(config.to_json_string())
    clip = "ViT-B-16"
    if tiny:
        cfg = {"embed_dim": 12, "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16,
                                               "patch_size": 16},
               "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}
        (workdir / "bench-tiny-clip.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(workdir / "bench-tiny-clip.json")
        clip = "bench-tiny-clip"
    timm_kwargs = {**TINY_VIT, "num_classes": 10} if tiny else {}
    return {"HF ViT-B/16": (f"hf-config:{workdir / 'hf_vit_b16.json'}", {}),
            "open_clip ViT-B/16": (f"open_clip:{clip}", {}),
            "timm vit_base_patch16_224": ("timm:vit_base_patch16_224", {"model_kwargs": timm_kwargs}),
            REFERENCE: ("timm:deit_base_patch16_224", {"model_kwargs": timm_kwargs})}


def compile_jobs(source: str, overrides: dict, args, workdir: Path, say) -> dict[str, dict]:
    """The three artifacts of one source: method -> {"dir", "manifest", "seconds"} or {"error"}."""
    from deploycomp.pruning.config import PruneConfig
    from deploycomp.tokens.config import SemanticTokenConfig

    common = dict(target=args.target, threads=args.threads, runtime={"allow_spinning": args.spinning},
                  measure_rounds=0, seed=0, tables=str(args.tables), **overrides)
    jobs = {"compile": deploycomp.CompileOptions(**common),
            PRUNE: deploycomp.CompileOptions(**common, prune=PruneConfig(latency=f"{args.budget}x"),
                                                      latency_batch=args.batch),
            "semantic tokens": deploycomp.CompileOptions(**common, semantic_tokens=SemanticTokenConfig(
                tokens=4 if args.tiny else 16))}
    out = {}
    for method, options in jobs.items():
        d = workdir / f"{slug(source)}_{slug(method)}"
        done = d / "bench_compile.json"  # a finished compile of an earlier run in the same --workdir: reused
        if done.exists():
            out[method] = {"dir": d, **json.loads(done.read_text())}
            say(f"compile {source}: {method}: reused from {d}")
            continue
        say(f"compile {source}: {method}")
        t0 = time.perf_counter()
        try:
            manifest = deploycomp.compile(source, d, options)
        except DeployCompError as exc:
            out[method] = {"error": str(exc)}
            say(f"  refused: {exc}")
            continue
        out[method] = {"dir": d, "manifest": manifest, "seconds": time.perf_counter() - t0}
        write_json(done, {"manifest": manifest, "seconds": out[method]["seconds"]})
    return out


def slug(text: str) -> str:
    """A file name of a source spec or method: the same in every run (``hash`` is salted per process)."""
    return "".join(c if c.isalnum() else "_" for c in Path(text).name.replace(".", ""))[-60:]


def profile_tiny_table(root: Path, args, say) -> Path:
    """--quick: the 'tiny' grid profiled on this device at the run's batch (one pass of one repeat:
    enough for the script to prune against, not a measurement)."""
    from deploycomp.backends.base import get_backend
    from deploycomp.latency.profiler import profile

    say(f"profile the tiny grid at batch {args.batch} (--quick)")
    backend = get_backend(args.target, threads=args.threads, allow_spinning=args.spinning)
    profile(backend, root, batch=args.batch, grid="tiny", protocol={"warmup": 1, "repeats": 1, "passes": 1})
    return root


def ratios(num: list[float], den: list[float]) -> dict[str, float]:
    """Per-sample ``num / den`` of two candidates timed in the same rounds: median, p10, p90."""
    n = min(len(num), len(den))
    r = np.asarray(num[:n]) / np.asarray(den[:n])
    return {"median": float(np.median(r)), "p10": float(np.percentile(r, 10)), "p90": float(np.percentile(r, 90))}


def clip_cosine(art: dict, samples: int, seed: int = 2026) -> dict:
    """The CLIP artifact against open_clip's own module (rebuilt from the manifest: seeded random init)
    on fresh Gaussian images: per-image cosine and relative L2."""
    from deploycomp.frontend import source_reference
    from deploycomp.passes.verify import cosine_similarity, relative_l2

    manifest = art["manifest"]
    backend = backend_for_manifest(manifest)
    run = backend.runner(backend.artifact(art["dir"], manifest))
    reference = source_reference(manifest["source"])
    shape = [d if isinstance(d, int) else samples for d in manifest["input"]["shape"]]
    x = np.random.default_rng(seed).standard_normal([samples, *shape[1:]]).astype(np.float32)
    got, want = run(x), np.asarray(reference(x))
    cos = cosine_similarity(got, want)
    return {"samples": samples, "seed": seed, "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "rel_l2": relative_l2(got, want), "verify_pass_cosine_min": min(c["cosine_min"] for c in
                                                                            manifest["parity"]["checks"])}


REFUSAL_CASES = {  # family -> (argv after `compile`, what it is)
    "timm": (["timm:vit_base_patch16_siglip_224"], "an attention-pooling head"),
    "hf": (["hf:{hf_relu}"], "a ViT with a ReLU MLP (weights never read)"),
    "hf-config": (["hf-config:{hf_config}", "--semantic-tokens", "256"], "16x16 tokens of a smaller patch grid"),
    "open_clip": (["open_clip:coca_ViT-B-32"], "CoCa's attentional pooling"),
    "open_clip tokens": (["open_clip:ViT-B-16", "--semantic-tokens", "256"], "16x16 tokens of a 14x14 grid"),
    "onnx": (["{not_vit}"], "an ONNX graph that is not a ViT"),
    "onnx twin": (["{post_norm}", "--latency", "0.5x"], "pruning a post-norm ViT graph (the twin cannot express it)"),
}


def export_post_norm_vit(path: Path) -> Path:
    """A small post-norm ViT (timm ResPostBlock) exported by the TorchScript exporter."""
    import warnings

    import timm
    import torch
    from timm.models.vision_transformer import ResPostBlock

    module = timm.create_model("vit_small_patch16_224", img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                               block_fn=ResPostBlock, num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "b"}})
    return path


def refusal_times(workdir: Path, repeats: int, say) -> dict:
    """Wall seconds of a fresh CLI process from start to its one-line refusal (exit 2), per family."""
    import onnx
    import transformers
    from onnx import TensorProto, helper

    hf_relu = workdir / "hf_relu"
    hf_relu.mkdir(exist_ok=True)
    transformers.ViTConfig(hidden_act="relu", architectures=["ViTForImageClassification"]).to_json_file(
        hf_relu / "config.json")
    (hf_relu / "model.safetensors").write_bytes(b"")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "not_vit",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, 32, 32])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), workdir / "not_vit.onnx")
    fill = {"hf_relu": hf_relu, "hf_config": workdir / "hf_vit_b16.json", "not_vit": workdir / "not_vit.onnx",
            "post_norm": export_post_norm_vit(workdir / "post_norm.onnx")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = {}
    for family, (argv, what) in REFUSAL_CASES.items():
        argv = [a.format(**fill) for a in argv]
        seconds, line, code = [], "", None
        for _ in range(repeats):
            cmd = [sys.executable, "-m", "deploycomp", "compile", *argv, "--target", "ort-cpu", "--no-measure", "-q",
                   "-o", str(workdir / "refused")]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            seconds.append(time.perf_counter() - t0)
            code, line = r.returncode, (r.stderr.strip().splitlines() or [""])[-1]
        say(f"refusal {family}: {np.median(seconds):.2f} s, exit {code}: {line}")
        out[family] = {"what": what, "argv": argv, "seconds": seconds, "median_s": float(np.median(seconds)),
                       "exit": code, "error": line, "one_line_exit_2": code == 2 and line.startswith("error:"),
                       "under_3s": bool(np.median(seconds) < 3.0)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="ort-cpu")
    ap.add_argument("--spinning", action="store_true", help="ort-*: spinning on (the batch-8 table was profiled off)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--tables", type=Path, default=Path("latency_tables"))
    ap.add_argument("--budget", type=float, default=None, help=f"--latency budget (default {BUDGET}; --quick {QUICK_BUDGET})")
    ap.add_argument("--cosine-samples", type=int, default=32)
    ap.add_argument("--refusal-repeats", type=int, default=3)
    ap.add_argument("--quick", "--tiny", dest="tiny", action="store_true",
                    help="tiny configs, batch 2, one round, a freshly profiled tiny-grid table: checks the script, measures nothing")
    ap.add_argument("--refusals-only", action="store_true",
                    help="only the time-to-refusal per source family (seconds; a quiet machine) -> sources_refusals.json")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the artifacts here, and reuse the ones a killed or earlier run finished "
                         "(re-time them with more --rounds without the ~26-min ViT-B pruning compiles)")
    args = ap.parse_args()
    if args.tiny:
        args.rounds, args.iters, args.cosine_samples, args.refusal_repeats, args.batch = 1, 1, 4, 1, 2
    args.budget = args.budget or (QUICK_BUDGET if args.tiny else BUDGET)
    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if args.refusals_only:
        out = args.out or RESULTS / "sources_refusals.json"
        with tempfile.TemporaryDirectory() as tmp:
            write_sources(Path(tmp), tiny=False)  # the hf-config case reads its config
            refusals = refusal_times(Path(tmp), args.refusal_repeats, say)
        write_json(out, {"command": " ".join(shlex.quote(a) for a in sys.argv), "host": host_fingerprint(),
                         "deploycomp_version": deploycomp.__version__, "refusals": refusals})
        print(f"wrote {out}")
        return
    args.out = args.out or RESULTS / "sources.json"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.workdir:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        if args.tiny:
            args.tables = profile_tiny_table(workdir / "tables", args, say)
        sources = write_sources(workdir, args.tiny)
        arts = {label: compile_jobs(spec, overrides, args, workdir, say) for label, (spec, overrides) in sources.items()}
        cands, shape = [], None
        for label, jobs in arts.items():
            for method, art in jobs.items():
                if "error" in art:
                    continue
                backend = backend_for_manifest(art["manifest"], threads=args.threads)
                shape = tuple(d if isinstance(d, int) else 1 for d in art["manifest"]["input"]["shape"])
                cands.append(backend.candidate(f"{label} | {method}", backend.artifact(art["dir"], art["manifest"]), shape))
        say(f"time {len(cands)} artifacts interleaved at batch {args.batch}, {args.rounds} rounds")
        times = measure_interleaved(cands, batch=args.batch, rounds=args.rounds, iters=args.iters, warmup=2)
        clip = arts["open_clip ViT-B/16"]["compile"]
        cosine = clip_cosine(clip, args.cosine_samples) if "error" not in clip else {"error": clip["error"]}
        refusals = refusal_times(workdir, args.refusal_repeats, say)
    rows = {}
    for label, jobs in arts.items():
        row = {"source": sources[label][0], "methods": {}}
        for method, art in jobs.items():
            if "error" in art:
                row["methods"][method] = {"error": art["error"]}
                continue
            key, m = f"{label} | {method}", art["manifest"]
            entry = {"compile_seconds": round(art["seconds"], 1), "gflops_per_image": m["totals"]["gflops_per_image"],
                     "params": m["totals"]["params"], "parity": m["parity"]["checks"], **stats(times[key])}
            base = f"{label} | compile"
            if method != "compile" and base in times:
                entry["speedup"] = ratios(times[base], times[key])
            if method == PRUNE:
                p, budget = m["pruning"], args.budget
                checked = p["budget_checks"][-1]["measured_ratio"]  # the compile's last on-device check
                entry["budget"] = {"target": budget, "compile_measured_ratio": checked,
                                   "compile_check_within_5pct": abs(checked / budget - 1) <= 0.05,
                                   "this_run_ratio": ratios(times[key], times[base]) if base in times else None,
                                   "budget_checks": p.get("budget_checks")}
                if entry["budget"]["this_run_ratio"]:
                    entry["budget"]["this_run_within_5pct"] = abs(entry["budget"]["this_run_ratio"]["median"] / budget - 1) <= 0.05
            row["methods"][method] = entry
        rows[label] = row
    reference = rows[REFERENCE]["methods"]
    for label, row in rows.items():
        for method, entry in row["methods"].items():
            ref = reference.get(method, {})
            if "speedup" in entry and "speedup" in ref:
                rel = entry["speedup"]["median"] / ref["speedup"]["median"]
                entry["vs_deit_b"] = {"deit_b_speedup": ref["speedup"]["median"], "ratio": rel,
                                      "within_10pct": abs(rel - 1) <= 0.10}
    result = {"command": " ".join(shlex.quote(a) for a in sys.argv), "host": {**host_fingerprint(), "threads": args.threads},
              "deploycomp_version": deploycomp.__version__, "seconds": round(time.perf_counter() - t0, 1),
              "quick_dry_run": args.tiny,
              "protocol": {"target": args.target, "spinning": args.spinning, "batch": args.batch, "rounds": args.rounds,
                           "iters_per_round": args.iters, "interleaved": "every artifact of every source in one run",
                           "speedup": "source's plain compile time / method's artifact time, per round: median (p10-p90)",
                           "budget": args.budget,
                           "weights": "random init"},
              "sources": rows, "clip_cosine": cosine, "refusals": refusals}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")


def table(result: dict) -> str:
    lines = ["| source | method | median ms | speedup (p10-p90) | vs DeiT-B | budget (compile / this run) |",
             "|---|---|---|---|---|---|"]
    for label, row in result["sources"].items():
        for method, e in row["methods"].items():
            if "error" in e:
                lines.append(f"| {label} | {method} | refused: {e['error']} | | | |")
                continue
            sp = e.get("speedup")
            sp_text = f"{sp['median']:.2f}x ({sp['p10']:.2f}-{sp['p90']:.2f})" if sp else ""
            vs = e.get("vs_deit_b")
            vs_text = f"{vs['ratio']:.2f} of {vs['deit_b_speedup']:.2f}x" if vs else ""
            b = e.get("budget")
            b_text = (f"{b['compile_measured_ratio']:.3f} / {b['this_run_ratio']['median']:.3f}"
                      if b and b.get("this_run_ratio") else "")
            lines.append(f"| {label} | {method} | {e['median_ms']:.1f} | {sp_text} | {vs_text} | {b_text} |")
    c = result["clip_cosine"]
    lines.append("")
    lines.append("open_clip fp32 compile vs open_clip: " + (f"cosine min {c['cosine_min']:.7f} over {c['samples']} images"
                                                            if "error" not in c else f"refused: {c['error']}"))
    for family, r in result["refusals"].items():
        lines.append(f"refusal {family} ({r['what']}): {r['median_s']:.2f} s, exit {r['exit']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
