"""Precision as a lever, against the peers a user would pick: DeiT-S and DeiT-B at batch 1 and 8,
random weights (speed only), every candidate timed interleaved in one run per model.

Candidates: plain ONNX Runtime fp32 (the reference), plain OpenVINO fp32, the peers' own int8
(OpenVINO + NNCF post-training int8 built the way OpenVINO's guide does it, ONNX Runtime dynamic
int8), and deploycomp artifacts: int8 on openvino-cpu and ort-cpu, bf16 on openvino-cpu (where the
CPU runs it natively), 16 semantic tokens + int8, and the joint budget ``--latency 0.1x`` at batch 8
with ``--precision auto`` (width x precision) and with ``--semantic-tokens 16 --precision int8``
(width x tokens x precision). int8 here is calibrated on synthetic images (no --data): its speed is
real, its accuracy is not measured here (the proxy DeiT's accuracy rows are another run).

Each deploycomp artifact is compiled by the CLI in its own process, so its row records the
compile's wall time and **peak memory** (the child's max RSS from ``os.wait4``), and the artifact's
**bytes** (what the runtime loads: the IR's .xml + .bin, or the .onnx) next to the fp32 source's.
Timing and ratios are those of ``bench_runtimes.py`` (per round, median and p10-p90).

    .venv/bin/python benchmarks/bench_precision.py                         # ~1 h on 2 cores
    .venv/bin/python benchmarks/bench_precision.py --models deit_tiny --batches 1 --rounds 2 --quick   # check the script

Writes benchmarks/results/precision.json and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads must not spin while runtimes are timed

import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench_runtimes import source_model, timed_rows, timing_arguments  # noqa: E402  (benchmarks/ is the script's directory)

import deploycomp  # noqa: E402
from deploycomp.artifact import model_bytes, read_manifest, write_json  # noqa: E402
from deploycomp.backends.base import backend_for_manifest, get_backend  # noqa: E402
from deploycomp.backends.fingerprint import host_fingerprint  # noqa: E402
from deploycomp.backends.openvino import has_bf16, nncf_int8_ir  # noqa: E402
from deploycomp.backends.ort import dynamic_int8  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def jobs(quick: bool) -> dict[str, list[str]]:
    """The deploycomp candidates: label -> CLI flags."""
    out = {"deploycomp openvino-cpu int8": ["--target", "openvino-cpu", "--precision", "int8"],
           "deploycomp ort-cpu int8": ["--target", "ort-cpu", "--precision", "int8"],
           "deploycomp openvino-cpu, 16 semantic tokens, int8": ["--target", "openvino-cpu", "--semantic-tokens", "16",
                                                                 "--precision", "int8"]}
    if has_bf16():
        out["deploycomp openvino-cpu bf16"] = ["--target", "openvino-cpu", "--precision", "bf16"]
    if not quick:  # prunes: a few minutes each on DeiT-B, with on-device budget checks
        out["deploycomp openvino-cpu, --latency 0.1x --precision auto"] = [
            "--target", "openvino-cpu", "--latency", "0.1x", "--latency-batch", "8", "--precision", "auto"]
        out["deploycomp openvino-cpu, --latency 0.1x, 16 semantic tokens, int8"] = [
            "--target", "openvino-cpu", "--latency", "0.1x", "--latency-batch", "8", "--semantic-tokens", "16",
            "--precision", "int8"]
    return out


def compile_in_process(name: str, flags: list[str], out: Path, threads: int) -> dict:
    """``deploycomp compile`` in a child process: its wall seconds and peak RSS (the child's own
    max RSS, from ``os.wait4``)."""
    cmd = [sys.executable, "-m", "deploycomp", "compile", f"timm:{name}", "-o", str(out), "--threads", str(threads),
           "--seed", "0", "--no-measure", "-q", *flags]
    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"compile failed (exit {proc.returncode}): {shlex.join(cmd)}\n{log.read_text()[-2000:]}")
    return {"command": shlex.join(["deploycomp", *cmd[3:]]), "seconds": round(seconds, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def run_model(alias: str, threads: int, rounds: int, iters: int, batches: list[int], quick: bool, say) -> dict:
    import onnx_ir as ir

    name, shape, module, plain = source_model(alias)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ir.save(plain, tmp / "source.onnx")
        source_bytes = (tmp / "source.onnx").stat().st_size
        compiled = {}
        for label, flags in jobs(quick).items():
            say(f"compile {name}: {label}")
            d = tmp / f"art{len(compiled)}"
            record = compile_in_process(name, flags, d, threads)
            manifest = read_manifest(d)
            size = manifest["totals"]["artifact_bytes"]
            record.update(bytes=size, bytes_vs_fp32_source=round(size / source_bytes, 3),
                          precision_choice=manifest.get("precision_choice"),
                          float_layers=(manifest.get("quantization") or {}).get("fallback"),
                          levers=manifest.get("pruning", {}).get("levers"))
            compiled[label] = (d, manifest, record)
        ort = get_backend("ort-cpu", threads=threads, allow_spinning=True)
        ov = get_backend("openvino-cpu", threads=threads)
        cands = [ort.candidate("ort plain", plain, shape), ov.candidate("openvino plain", plain, shape)]
        say(f"quantize {name} with NNCF on OpenVINO and with ORT dynamic int8 (the peers)")
        peer_ir = nncf_int8_ir(module, shape, tmp / "ov_nncf_int8.xml")
        cands.append(ov.candidate("openvino + NNCF int8 (peer)", peer_ir, shape))
        peer_ort = dynamic_int8(plain, tmp / "ort_dynamic_int8.onnx", preprocess=True)
        cands.append(ort.candidate("ort dynamic int8 (peer)", peer_ort, shape))
        peers = {"openvino + NNCF int8 (peer)": model_bytes(peer_ir), "ort dynamic int8 (peer)": model_bytes(peer_ort)}
        for label, (d, manifest, _) in compiled.items():
            backend = backend_for_manifest(manifest)
            cands.append(backend.candidate(label, backend.artifact(d, manifest), shape))
        out = {"model": name, "fp32_source_bytes": source_bytes,
               "compiles": {k: r for k, (_, _, r) in compiled.items()},
               "peer_bytes": {k: {"bytes": v, "bytes_vs_fp32_source": round(v / source_bytes, 3)} for k, v in peers.items()},
               "batches": {}}
        for batch in batches:
            say(f"time {name} at batch {batch}")
            out["batches"][str(batch)] = timed_rows(cands, batch, rounds, iters, {
                "vs_plain_ort": "ort plain", "vs_nncf_peer": "openvino + NNCF int8 (peer)"})
    return out


def table(result: dict) -> str:
    lines = ["| model | batch | candidate | median ms | vs plain ORT fp32 | vs OpenVINO + NNCF int8 | bytes vs fp32 | compile s / peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        sizes = {**m["peer_bytes"], **m["compiles"]}
        for batch, rows in m["batches"].items():
            for label, r in rows.items():
                a, b = r["vs_plain_ort"], r["vs_nncf_peer"]
                c = m["compiles"].get(label)
                size = sizes.get(label, {}).get("bytes_vs_fp32_source", 1.0)
                cost = f"{c['seconds']:.0f} / {c['peak_rss_mib']}" if c else ""
                lines.append(f"| {m['model']} | {batch} | {label} | {r['median_ms']:.1f} | {a['median']:.2f}x "
                             f"({a['p10']:.2f}-{a['p90']:.2f}) | {b['median']:.2f}x | {size:.2f} | {cost} |")
    return "\n".join(lines)


def main() -> None:
    ap = timing_arguments(__doc__.splitlines()[0], "deit_small,deit_base", rounds=8)
    ap.add_argument("--quick", action="store_true", help="no pruned candidates (checks the script)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or (Path("/tmp/precision_quick.json") if args.quick else RESULTS / "precision.json")
    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    result = {"command": shlex.join(sys.argv), "host": {**host_fingerprint(), "threads": args.threads},
              "deploycomp_version": deploycomp.__version__, "complete": False, "seconds": 0.0,
              "protocol": {"rounds": args.rounds, "iters_per_round": args.iters, "interleaved": True,
                           "ratios": "per round, median (p10-p90)", "int8_calibration": "synthetic (speed only)"},
              "models": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [m.strip() for m in args.models.split(",")]
    for name in names:  # written after each model: a run cut short keeps the models it finished
        result["models"].append(run_model(name, args.threads, args.rounds, args.iters,
                                          [int(b) for b in args.batches.split(",")], args.quick, say))
        result.update(complete=len(result["models"]) == len(names), seconds=round(time.perf_counter() - t0, 1))
        write_json(out, result)
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
