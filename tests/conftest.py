"""Shared fixtures: tiny DeiT and Swin configs (full sizes belong in benchmarks/)."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from .synthetic_tables import mlp_only, write_synthetic_table  # noqa: E402



def _own_cores_under_xdist() -> int:
    """Pin this pytest-xdist worker to its own share of the cores; returns how many it has.

    Two workers that each run 2-thread ONNX Runtime and torch on 2 shared cores oversubscribe them and
    thrash; one worker per core keeps each test's arithmetic on a core nobody else uses. Without xdist
    (``-n 0``) nothing changes."""
    cores = sorted(os.sched_getaffinity(0))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and 1 < count <= len(cores):
        mine = cores[int(worker[2:]) % count::count]
        os.sched_setaffinity(0, mine)
        return len(mine)
    return len(cores)


torch.set_num_threads(min(2, _own_cores_under_xdist()))

# timm constructor overrides that keep each family's structure (cls token, windows, patch merging)
TINY = {
    "deit": ("deit_tiny_patch16_224", {"depth": 2, "img_size": 32, "patch_size": 8}),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 56, "depths": (2, 2), "num_heads": (2, 4), "embed_dim": 32}),
}
TINY_EXPECTED = {
    # per block: (stage, emb, heads, qk, v, mlp, tokens, sequences)
    "deit": [(0, 192, 3, 64, 64, 768, 17, 1)] * 2,
    "swin": [(0, 32, 2, 16, 16, 128, 49, 4)] * 2 + [(1, 64, 4, 16, 16, 256, 49, 1)] * 2,
}


def tiny_module(family: str, seed: int = 0):
    import timm

    name, kwargs = TINY[family]
    torch.manual_seed(seed)
    module = timm.create_model(name, pretrained=False, **kwargs).eval()
    # Non-trivial norms and biases, so that a wrong slice of them changes the outputs.
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return module


def input_shape(family: str) -> tuple[int, ...]:
    img = TINY[family][1]["img_size"]
    return (1, 3, img, img)


def export(module, shape, exporter: str, path) -> ir.Model:
    """Export with the dynamo exporter (opset 18) or the TorchScript exporter (opset 17)."""
    if exporter == "dynamo":
        from deploycomp.frontend.export import export_to_onnx

        model = export_to_onnx(module, shape, 18)
        ir.save(model, path)
        return ir.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    return ir.load(path)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(family, exporter) -> (path of the raw export, torch module)."""
    cache = {}

    def get(family: str, exporter: str):
        key = (family, exporter)
        if key not in cache:
            module = tiny_module(family)
            path = tmp_path_factory.mktemp(f"{family}_{exporter}") / "model.onnx"
            export(module, input_shape(family), exporter, path)
            cache[key] = (path, module)
        return cache[key]

    return get


def run_ort(model_or_path, x: np.ndarray, fuse_qdq: bool = True) -> np.ndarray:
    """The model's first output on ONNX Runtime's CPU provider.

    ``fuse_qdq=False`` stops at basic graph optimizations, so Q/DQ pairs run as written (float
    arithmetic on dequantized values) rather than as fused int8 kernels: on a CPU without VNNI
    (AVX2 only) those multiply u8 x s8 pairs into int16 sums that saturate, so a test of what a Q/DQ
    graph *means* would be reading the kernel instead."""
    import onnxruntime as ort

    data = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else \
        ir.serde.serialize_model(model_or_path).SerializeToString()
    if isinstance(data, (str, os.PathLike)):
        data = str(data)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not fuse_qdq:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def tiny_tables(tmp_path_factory):
    """This device's "tiny" table, written from :func:`mlp_only` (no profiling: no timing noise)."""
    root = tmp_path_factory.mktemp("tables")
    write_synthetic_table(root, mlp_only)
    return root


def invoke_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``deploycomp ARGS`` in this process: exit code, stdout, stderr.

    For CLI tests that are about what a command does, not about the process: a fresh interpreter pays
    ~5-8 s of imports per call. True-subprocess tests of exit code 2 stay in ``test_cli.py``. Rich wraps
    stdout at 80 columns here (``COLUMNS`` is read when the console is made), so compare stdout with
    whitespace collapsed. torch's thread count, which ``train`` sets, is restored."""
    import sys

    from deploycomp import cli

    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["deploycomp", *map(str, args)])
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err
