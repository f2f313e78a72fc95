"""The two CPU runtimes side by side: plain ONNX Runtime, deploycomp ort-cpu, plain OpenVINO,
deploycomp openvino-cpu (all fp32), plus on DeiT-S: OpenVINO + NNCF int8 (the peer a user would
pick), ORT dynamic int8 (its peer), deploycomp ort-cpu and openvino-cpu int8, with 16 semantic
tokens (fp32, and int8 on both runtimes), and ``--latency 0.5x``. ``--static-batch`` adds deploycomp
openvino-cpu ``--static-batch`` (the IR's batch fixed) and, as its fair peer, plain OpenVINO
reshaped to the timed batch, which a user who fixes the shape would run.

Per model, every candidate is timed interleaved in one run at batch 1 and at batch 8 (224x224,
random weights: timing does not depend on weight values). "Plain" is the same exported ONNX given
to the runtime with its defaults (ONNX Runtime: ORT_ENABLE_ALL, spinning on; OpenVINO: LATENCY
hint), threads pinned to the machine's cores, OpenVINO pinned to f32. Candidates whose runtime
spins idle 100 ms after their turn (``Candidate.settle_s``) so they do not slow the next one.
Ratios are per round (candidate / reference in the same round): median and p10-p90 reported.

    .venv/bin/python benchmarks/bench_runtimes.py                       # DeiT-S, DeiT-B, Swin-T
    .venv/bin/python benchmarks/bench_runtimes.py --models deit_small --rounds 3 --no-rewrites   # quick look
    .venv/bin/python benchmarks/bench_runtimes.py --models deit_base,swin_tiny --no-rewrites --static-batch \
        --out benchmarks/results/runtimes_static_batch.json

Writes benchmarks/results/runtimes.json and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads must not spin while runtimes are timed

import argparse  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import deploycomp  # noqa: E402
from deploycomp.api import baseline_name  # noqa: E402
from deploycomp.artifact import read_manifest, write_json  # noqa: E402
from deploycomp.backends.base import backend_for_manifest, get_backend  # noqa: E402
from deploycomp.backends.fingerprint import host_fingerprint, usable_cores  # noqa: E402
from deploycomp.backends.openvino import nncf_int8_ir  # noqa: E402
from deploycomp.backends.ort import dynamic_int8  # noqa: E402
from deploycomp.bench.harness import measure_interleaved, stats  # noqa: E402
from deploycomp.errors import DeployCompError  # noqa: E402
from deploycomp.frontend.export import export_to_onnx  # noqa: E402
from deploycomp.frontend.timm_models import build_timm_model, timm_spec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PLAIN_OF = {"ort-cpu": "ort plain", "openvino-cpu": "openvino plain"}
PLAIN_STATIC = "openvino plain, static batch"


def artifacts_for(name: str, threads: int, workdir: Path, rewrites: bool, say, prune_table: bool,
                  static_batch: int | None = None) -> dict[str, dict]:
    """Compile the deploycomp candidates of one model; {label: {"dir", "manifest", "seconds"}}."""
    jobs = {"deploycomp ort-cpu": deploycomp.CompileOptions(target="ort-cpu"),
            "deploycomp openvino-cpu": deploycomp.CompileOptions(target="openvino-cpu")}
    if static_batch:  # timed at every batch: the backend compiles it for the batch it is fed
        jobs["deploycomp openvino-cpu, static batch"] = deploycomp.CompileOptions(
            target="openvino-cpu", runtime={"static_batch": static_batch})
    if rewrites and name.startswith("deit_small"):
        from deploycomp.pruning.schedule import PruneConfig
        from deploycomp.tokens.stvit import SemanticTokenConfig

        jobs["deploycomp openvino-cpu, 16 semantic tokens"] = deploycomp.CompileOptions(
            target="openvino-cpu", semantic_tokens=SemanticTokenConfig(tokens=16))
        jobs["deploycomp ort-cpu, int8"] = deploycomp.CompileOptions(target="ort-cpu", precision="int8")
        jobs["deploycomp openvino-cpu, int8"] = deploycomp.CompileOptions(target="openvino-cpu", precision="int8")
        jobs["deploycomp openvino-cpu, 16 semantic tokens, int8"] = deploycomp.CompileOptions(
            target="openvino-cpu", semantic_tokens=SemanticTokenConfig(tokens=16), precision="int8")
        # where OpenVINO's int8 does not pay (no VNNI), ONNX Runtime's dynamic int8 still does: its joint artifact
        jobs["deploycomp ort-cpu, 16 semantic tokens, int8"] = deploycomp.CompileOptions(
            target="ort-cpu", semantic_tokens=SemanticTokenConfig(tokens=16), precision="int8")
        if prune_table:
            jobs["deploycomp openvino-cpu, --latency 0.5x"] = deploycomp.CompileOptions(
                target="openvino-cpu", prune=PruneConfig(latency="0.5x"))
    out = {}
    for label, options in jobs.items():
        options.threads, options.measure_rounds, options.seed = threads, 0, 0
        say(f"compile {name}: {label}")
        t0 = time.perf_counter()
        d = workdir / label.replace(" ", "_").replace(",", "").replace("-", "_").replace(".", "")
        try:
            manifest = deploycomp.compile(f"timm:{name}", d, options)
        except DeployCompError as exc:  # a row the compiler refuses is recorded, not the whole run lost
            say(f"  refused: {exc}")
            out[label] = {"refused": str(exc)}
            continue
        out[label] = {"dir": d, "manifest": manifest, "seconds": time.perf_counter() - t0}
    return out


def ratios(a: list[float], b: list[float]) -> dict[str, float]:
    """Speed of ``a`` relative to ``b`` (b time / a time), per paired sample of the same round."""
    r = np.asarray(b[: len(a)]) / np.asarray(a[: len(b)])
    return {"median": float(np.median(r)), "p10": float(np.percentile(r, 10)), "p90": float(np.percentile(r, 90))}


def timed_rows(cands: list, batch: int, rounds: int, iters: int, against: dict, warmup: int = 3) -> dict:
    """Each candidate's time statistics at ``batch``, and its speed against references timed in the
    same interleaved run. ``against``: field -> the reference candidate's name, or a function of the
    candidate's name that gives it; a reference not in the run gives None."""
    times = measure_interleaved(cands, batch=batch, rounds=rounds, iters=iters, warmup=warmup)
    rows = {}
    for c in cands:
        rows[c.name] = stats(times[c.name])
        for field, reference in against.items():
            reference = reference(c.name) if callable(reference) else reference
            rows[c.name][field] = ratios(times[c.name], times[reference]) if reference in times else None
    return rows


def source_model(alias: str):
    """A timm model by alias (``deit_small``) or name, random init: (name, input shape, torch module,
    its plain ONNX export)."""
    name = baseline_name(alias)
    spec = timm_spec(name)
    shape = (1, spec.in_chans, spec.img_size, spec.img_size)
    module = build_timm_model(name)
    return name, shape, module, export_to_onnx(module, shape)


def run_model(alias: str, threads: int, rounds: int, iters: int, batches: list[int], rewrites: bool, say,
              prune_table: bool, static_batch: bool = False) -> dict:
    name, shape, module, plain = source_model(alias)
    with tempfile.TemporaryDirectory() as tmp:
        arts = artifacts_for(name, threads, Path(tmp), rewrites, say, prune_table, max(batches) if static_batch else None)
        refused = {k: v["refused"] for k, v in arts.items() if "refused" in v}
        arts = {k: v for k, v in arts.items() if "refused" not in v}
        ov_plain = get_backend("openvino-cpu", threads=threads)
        cands = [get_backend("ort-cpu", threads=threads, allow_spinning=True).candidate("ort plain", plain, shape),
                 ov_plain.candidate("openvino plain", plain, shape)]
        if static_batch:
            cands.append(get_backend("openvino-cpu", threads=threads, static_batch=1).candidate(PLAIN_STATIC, plain, shape))
        if rewrites and name.startswith("deit_small"):
            say(f"quantize {name} with NNCF on OpenVINO (the peer)")
            cands.append(ov_plain.candidate("openvino + NNCF int8 (peer)", nncf_int8_ir(module, shape, Path(tmp) / "ov_nncf_int8.xml"),
                                            shape))
            cands.append(get_backend("ort-cpu", threads=threads, allow_spinning=True).candidate(
                "ort dynamic int8 (peer)", dynamic_int8(plain, Path(tmp) / "ort_dynamic_int8.onnx", preprocess=True), shape))
        for label, art in arts.items():
            backend = backend_for_manifest(read_manifest(art["dir"]))
            cands.append(backend.candidate(label, backend.artifact(art["dir"], art["manifest"]), shape))
        out = {"model": name, "refused": refused, "compile_seconds": {k: round(v["seconds"], 1) for k, v in arts.items()},
               "runtime_options": {k: v["manifest"]["runtime_options"] for k, v in arts.items()},
               "pruning": {k: {f: v["manifest"]["pruning"][f] for f in ("latency", "budget_checks", "target_ms",
                                                                        "predicted_ms", "baseline_predicted_ms")}
                           for k, v in arts.items() if "pruning" in v["manifest"]},
               "latency_calibration": {k: v["manifest"]["latency_calibration"] for k, v in arts.items()
                                       if "latency_calibration" in v["manifest"]},
               "batches": {}}
        for batch in batches:
            say(f"time {name} at batch {batch}")
            own_plain = lambda name: PLAIN_OF["openvino-cpu" if "openvino" in name else "ort-cpu"]  # noqa: E731
            against = {"vs_plain_ort": "ort plain", "vs_own_runtime_plain": own_plain}
            if static_batch:
                against["vs_openvino_plain_static"] = PLAIN_STATIC
            out["batches"][str(batch)] = timed_rows(cands, batch, rounds, iters, against)
    return out


def table(result: dict) -> str:
    static = any("vs_openvino_plain_static" in r for m in result["models"] for rows in m["batches"].values()
                 for r in rows.values())
    lines = ["| model | batch | candidate | median ms (p10-p90) | vs plain ORT | vs its runtime's plain |"
             + (" vs plain OpenVINO, static batch |" if static else ""), "|---|---|---|---|---|---|" + ("---|" if static else "")]
    for m in result["models"]:
        for batch, rows in m["batches"].items():
            for label, r in rows.items():
                cols = [r["vs_plain_ort"], r["vs_own_runtime_plain"]] + ([r["vs_openvino_plain_static"]] if static else [])
                lines.append(f"| {m['model']} | {batch} | {label} | {r['median_ms']:.1f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f}) | "
                             + " | ".join(f"{c['median']:.2f}x ({c['p10']:.2f}-{c['p90']:.2f})" if c else "-" for c in cols) + " |")
    return "\n".join(lines)


def timing_arguments(description: str, models: str, rounds: int) -> argparse.ArgumentParser:
    """The options every interleaved runtime benchmark takes (this one, ``bench_precision.py``)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", default=models)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--iters", type=int, default=3)
    return ap


def main() -> None:
    ap = timing_arguments(__doc__.splitlines()[0], "deit_small,deit_base,swin_tiny", rounds=10)
    ap.add_argument("--no-rewrites", action="store_true", help="skip the DeiT-S semantic-token, int8 and pruned artifacts")
    ap.add_argument("--no-prune", action="store_true", help="skip the DeiT-S --latency 0.5x artifact (needs an "
                    "openvino-cpu latency table at batch 1)")
    ap.add_argument("--static-batch", action="store_true", help="add deploycomp openvino-cpu --static-batch and plain "
                    "OpenVINO reshaped to the timed batch")
    ap.add_argument("--out", type=Path, default=RESULTS / "runtimes.json")
    args = ap.parse_args()
    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    models = [run_model(m.strip(), args.threads, args.rounds, args.iters, [int(b) for b in args.batches.split(",")],
                        not args.no_rewrites, say, not args.no_prune, args.static_batch) for m in args.models.split(",")]
    result = {"command": " ".join(shlex.quote(a) for a in sys.argv), "host": {**host_fingerprint(), "threads": args.threads},
              "deploycomp_version": deploycomp.__version__, "seconds": round(time.perf_counter() - t0, 1),
              "protocol": {"rounds": args.rounds, "iters_per_round": args.iters, "interleaved": True,
                           "settle_s_after_spinning_candidates": 0.1, "ratios": "per round, median (p10-p90)"},
              "models": models}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
