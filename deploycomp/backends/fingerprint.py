"""Device fingerprint: what a latency number or an artifact was measured on."""

from __future__ import annotations

import os
import platform
from functools import lru_cache


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def all_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> list[str]:
    """The flags a fingerprint records (the ones that pick kernels: vector width, int8 dot, bf16)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "fma", "neon", "asimd")
    have = all_cpu_flags()
    return [w for w in wanted if w in have]


def isa_of(flags) -> str:
    """The instruction-set level that picks a runtime's kernels, as a short name ("avx512-vnni-bf16",
    "avx2"). Two CPUs that report the same model name ("AMD EPYC") can differ here and run a ViT 3x
    apart, so latency tables are named and matched by it."""
    f = set(flags)
    if "avx512f" in f:
        parts = ["avx512"] + [tag for flag, tag in (("avx512_vnni", "vnni"), ("avx512_bf16", "bf16"), ("amx_tile", "amx"))
                              if flag in f]
    elif "avx2" in f:
        parts = ["avx2"] + (["vnni"] if "avx_vnni" in f else [])
    elif f & {"asimd", "neon"}:
        parts = ["neon"]
    else:
        parts = ["generic"]
    return "-".join(parts)


def int8_dot_saturates() -> bool:
    """Whether this x86 CPU's int8 matrix kernels can clamp: without VNNI (AVX2 or AVX-512 alone),
    ONNX Runtime and OpenVINO multiply u8 x s8 pairs with ``vpmaddubsw``, whose int16 sum of two
    products saturates at 32767 (255 x 127 x 2 does not fit). With full-range int8 weights the
    logits of a DeiT drift by relative L2 ~0.2 from what the Q/DQ graph means. The documented
    fixes keep weights in 7 bits: ONNX Runtime's ``reduce_range`` and NNCF's ``OverflowFix.ENABLE``."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    return not all_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def host_fingerprint() -> dict:
    flags = cpu_flags()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": flags,
        "isa": isa_of(flags),
        "cores": usable_cores(),
        "machine": platform.machine(),
        "os": platform.system(),
    }
