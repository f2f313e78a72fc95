"""The latency lookup table: a versioned JSON file per target and device.

``latency_tables/<target>/<device-slug>.json`` (one per target, device, batch and *precision*: the
slug carries ``-fp32-``, ``-int8-`` or ``-bf16-``, the fingerprint's ``dtype`` the same, and an int8
table's ``quantizer`` how the micro-graphs were quantized) holds the device fingerprint, the grid of each part
kind, and per grid point the measured samples with their median and spread. Writes are atomic
(temporary file + rename) under an exclusive file lock, so an interrupted profile resumes from what
it saved and two profiles of the same table never corrupt it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import DeployCompError
from ..backends.fingerprint import isa_of

SCHEMA = "deploycomp.latency_table"
VERSION = 1
# Fingerprint fields that must agree for a table to describe this device.
MATCH_KEYS = ("target", "cpu_model", "isa", "threads", "allow_spinning", "backend", "backend_version", "provider", "batch",
              "dtype", "quantizer", "performance_hint", "inference_precision", "static_batch")
PART_KEYS = {
    "attention": ("tokens", "emb", "heads", "qk_dim", "v_dim"),
    "mlp": ("tokens", "emb", "mlp_dim"),
    "stem": ("emb",),
    "head": ("tokens", "emb"),
    # STViT's generator: TokenCluster of ``queries`` centres over ``tokens`` keys, at the attention
    # grid's widest heads (``cross_reference``); other head shapes scale by the attention part
    "cross_attention": ("queries", "tokens", "emb"),
    # Swin (``arch.SwinArch``): per stage s, ``window_attention.s`` (one block's attention half over
    # ``windows`` windows of ``tokens`` tokens; shift 1: the shifted-window variant), ``mlp.s`` at
    # the stage's tokens, ``patch_merging.s`` (stage s's grid of ``tokens`` to half its side);
    # stem and head as Swin has them (no cls token, mean pooling)
    "window_attention": ("windows", "tokens", "emb", "heads", "qk_dim", "v_dim", "shift"),
    # Swin with semantic tokens per window (``tokens/stvit_swin.py``): per window, ``queries`` over
    # ``tokens`` keys, at the stage's widest heads (``cross_reference``); other head shapes
    # scale by the stage's ``window_attention``
    "window_cross_attention": ("windows", "queries", "tokens", "emb"),
    "patch_merging": ("tokens", "emb", "out_emb"),
    "swin_stem": ("emb",),
    "swin_head": ("tokens", "emb"),
}


def part_kind(part: str) -> str:
    """``window_attention.2`` -> ``window_attention``: a grid may hold one part of a kind per stage."""
    return part.split(".", 1)[0]


def stage_of(part: str) -> int:
    """``window_attention.2`` -> 2: the Swin stage a per-stage part belongs to."""
    return int(part.split(".", 1)[1])


def part_keys(part: str) -> tuple[str, ...]:
    return PART_KEYS[part_kind(part)]


def cross_reference(grid: dict[str, dict[str, list[int]]], part: str = "attention") -> tuple[int, int, int]:
    """(heads, QK, V) a cross-attention part is profiled at: the largest of the self-attention
    ``part`` it is scaled by (DeiT's ``attention``; a Swin stage's ``window_attention.s``)."""
    att = grid[part]
    return max(att["heads"]), max(att["qk_dim"]), max(att["v_dim"])


def key_of(values) -> str:
    return ",".join(str(int(v)) for v in values)


@dataclass
class LatencyTable:
    fingerprint: dict[str, Any]
    grid: dict[str, dict[str, list[int]]]
    fixed: dict[str, Any]  # img_size, patch, in_chans, num_classes of the stem/head parts
    protocol: dict[str, Any]
    entries: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    profiling_seconds: float = 0.0
    path: Path | None = None

    @property
    def parts(self) -> list[str]:
        """The part kinds this table profiles (tables from before a kind existed lack it)."""
        kinds = list(PART_KEYS)
        return sorted((part for part in self.grid if part_kind(part) in PART_KEYS),
                      key=lambda part: (kinds.index(part_kind(part)), part))

    def points(self, part: str) -> list[tuple[int, ...]]:
        axes = [self.grid[part][k] for k in part_keys(part)]
        return [tuple(int(v) for v in p) for p in np.array(np.meshgrid(*axes, indexing="ij")).reshape(len(axes), -1).T]

    def samples(self, part: str, point) -> list[float]:
        return self.entries.get(part, {}).get(key_of(point), {}).get("samples_ms", [])

    def add_samples(self, part: str, point, samples_ms: list[float]) -> None:
        entry = self.entries.setdefault(part, {}).setdefault(key_of(point), {"samples_ms": []})
        entry["samples_ms"] = entry["samples_ms"] + [round(float(s), 5) for s in samples_ms]
        a = np.asarray(entry["samples_ms"])
        entry.update(median_ms=float(np.median(a)), p10_ms=float(np.percentile(a, 10)),
                     p90_ms=float(np.percentile(a, 90)), n=int(a.size))

    def median(self, part: str, point) -> float:
        return self.entries[part][key_of(point)]["median_ms"]

    @property
    def complete(self) -> bool:
        need = self.protocol["passes"] * self.protocol["repeats"]
        return all(len(self.samples(part, p)) >= need for part in self.parts for p in self.points(part))

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": VERSION, "fingerprint": self.fingerprint, "grid": self.grid,
                "fixed": self.fixed, "protocol": self.protocol, "complete": self.complete,
                "profiling_seconds": round(self.profiling_seconds, 1), "entries": self.entries}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path | None = None) -> "LatencyTable":
        if data.get("schema") != SCHEMA:
            raise DeployCompError(f"{path}: not a deploycomp latency table")
        if data.get("version") != VERSION:
            raise DeployCompError(f"{path}: latency table version {data.get('version')}, this deploycomp reads {VERSION}")
        fingerprint = dict(data["fingerprint"])
        fingerprint.setdefault("isa", isa_of(fingerprint.get("cpu_flags", [])))  # tables written before "isa" was recorded
        return cls(fingerprint, data["grid"], data["fixed"], data["protocol"], data["entries"],
                   data.get("profiling_seconds", 0.0), path)


def device_slug(fp: dict[str, Any]) -> str:
    cpu = re.sub(r"[^a-z0-9]+", "-", fp["cpu_model"].lower()).strip("-")
    version = re.sub(r"[^A-Za-z0-9.]+", "-", str(fp["backend_version"]))  # OpenVINO's has a '/' in it
    spin = "-spin" if fp.get("allow_spinning") else ""  # ONNX Runtime sessions with spinning workers
    static = "-static" if fp.get("static_batch") else ""  # parts compiled for their exact batch (OpenVINO)
    return f"{cpu}-{fp['isa']}-{fp['cores']}c-t{fp['threads']}-b{fp['batch']}-{fp['dtype']}-{fp['backend']}{version}{spin}{static}"


def table_path(root: Path, fp: dict[str, Any], grid: str = "deit-base") -> Path:
    """latency_tables/<target>/<device>[-<grid>].json: one table per device, batch and grid preset."""
    suffix = "" if grid == "deit-base" else f"-{grid}"
    return Path(root) / fp["target"] / f"{device_slug(fp)}{suffix}.json"


def mismatches(table_fp: dict[str, Any], device_fp: dict[str, Any]) -> list[str]:
    return [f"{k}: table {table_fp.get(k)!r}, device {device_fp.get(k)!r}" for k in MATCH_KEYS
            if table_fp.get(k) != device_fp.get(k)]


def load_table(path: Path, device_fp: dict[str, Any] | None = None, force: bool = False) -> LatencyTable:
    """Read a table; refuse it if it was measured on another device (unless ``force``)."""
    path = Path(path)
    if not path.is_file():
        raise DeployCompError(f"latency table not found: {path} (run `deploycomp profile` first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeployCompError(f"corrupt latency table {path}: {exc}") from None
    table = LatencyTable.from_json(data, path)
    if device_fp is not None and not force:
        diff = mismatches(table.fingerprint, device_fp)
        if diff:
            raise DeployCompError(f"latency table {path} was measured on another device ({'; '.join(diff)}); "
                                  "profile this device or force the table")
    return table


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock held while a table is read-modified-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save_table(table: LatencyTable, path: Path) -> None:
    """Merge this table's samples into the file's (another profile may have added some) and write atomically."""
    path = Path(path)
    with locked(path):
        if path.is_file():
            try:
                on_disk = LatencyTable.from_json(json.loads(path.read_text(encoding="utf-8")), path)
            except (json.JSONDecodeError, DeployCompError):
                on_disk = None
            if (on_disk is not None and on_disk.grid == table.grid and on_disk.protocol == table.protocol
                    and not mismatches(on_disk.fingerprint, table.fingerprint)):
                for part, points in on_disk.entries.items():
                    for key, entry in points.items():
                        mine = table.entries.get(part, {}).get(key, {}).get("samples_ms", [])
                        if len(entry["samples_ms"]) > len(mine):
                            table.entries.setdefault(part, {})[key] = entry
                table.profiling_seconds = max(table.profiling_seconds, on_disk.profiling_seconds)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(table.to_json(), f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a table is meant to be shared
        os.replace(tmp, path)
    table.path = path
