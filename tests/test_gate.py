"""The verification gate refuses a wrong rewrite on every compile path, through the command line.

Each case plants a realistic bug in the function that does the rewrite, inside its own module (so
the test does not depend on how ``api`` assembles the passes), runs ``deploycomp compile`` in this
process, and expects: the planted code ran, exit code 2, one ``error: verification failed`` line,
and nothing left where the artifact would have gone (no directory, no staging directory).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from .models import DEIT, PRUNE_DEIT, TOKEN_DEIT, TOKEN_PRUNE_DEIT, save_weights, timm_deit
from .synthetic_tables import attention_heavy, write_synthetic_table


def model_args(kwargs: dict) -> list[str]:
    return [a for k, v in kwargs.items() for a in ("--model-arg", f"{k}={v}")]


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``deploycomp ARGS`` in this process (so planted bugs apply): exit code and stderr."""
    from deploycomp import cli

    monkeypatch.setattr(sys, "argv", ["deploycomp", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def wrap(monkeypatch, module, name: str, make_wrong):
    """Replace ``module.name`` by ``make_wrong(real)``; returns a list that counts its calls."""
    import importlib

    mod = importlib.import_module(module)
    real = getattr(mod, name)
    wrong = make_wrong(real)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return wrong(*args, **kwargs)

    monkeypatch.setattr(mod, name, counted)
    return calls


# ---- the planted bugs ---------------------------------------------------------------------------

def cleanup_scales_a_weight(real):
    """plain path: cleanup's transpose folding also scales one MLP weight by 5 % (a folding bug)."""
    import onnx_ir as ir

    def wrong(model):
        count = real(model)
        value = next(v for n, v in model.graph.initializers.items() if n.endswith("fc1.weight"))
        value.const_value = ir.tensor(value.const_value.numpy() * 1.05, name=value.name)
        return count

    return wrong


def qkv_split_drops_the_v_bias(real):
    """prune path: splitting the (fused) qkv for the rebuilt attention loses the v bias."""

    def wrong(*args, **kwargs):
        parts = real(*args, **kwargs)
        return {**parts, "v": (parts["v"][0], None)}

    return wrong


def token_cluster_wrong_scale(real):
    """tokens path: the TokenCluster node gets a wrong softmax scale."""
    return lambda b, q, k, v, heads, scale: real(b, q, k, v, heads, scale * 1.3)


def low_precision_weights_scaled(real):
    """fp16 path: weights stored in fp16 are 2 % off (a wrong cast)."""
    import onnx_ir as ir

    def wrong(tensor, low, name):
        bad = ir.tensor(tensor.numpy().astype(np.float32) * 1.02, name=name)
        return real(bad, low, name)

    return wrong


PRUNE = ["--latency", "0.8x", "--prune-groups", "heads,qk,v", "--prune-steps", "1", "--budget-rounds", "0",
         "--calibrate-rounds", "0", "--saliency-batches", "1", "--calib-batch", "4"]  # synthetic table: not timed
CASES = {
    "plain": ("deploycomp.passes.cleanup", "fold_parameter_transposes", cleanup_scales_a_weight, PRUNE_DEIT, []),
    "prune": ("deploycomp.pruning.rewrite", "qkv_arrays", qkv_split_drops_the_v_bias, PRUNE_DEIT, PRUNE),
    "tokens": ("deploycomp.tokens.rewrite", "token_cluster_node", token_cluster_wrong_scale, TOKEN_DEIT,
               ["--semantic-tokens", "4", "--token-layer", "1"]),
    "tokens+prune": ("deploycomp.tokens.rewrite", "token_cluster_node", token_cluster_wrong_scale, TOKEN_PRUNE_DEIT,
                     ["--semantic-tokens", "4", "--token-layer", "1", *PRUNE]),
    "fp16": ("deploycomp.passes.precision", "_low_tensor", low_precision_weights_scaled, PRUNE_DEIT,
             ["--precision", "fp16"]),
}


# tokens+prune (~2.5 s) and fp16 (~2.4 s; fp16 parity is quick in test_parity.py) in the slow tier
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p in ("tokens+prune", "fp16") else p for p in CASES])
def test_gate_refuses_a_wrong_rewrite(tmp_path, monkeypatch, capsys, path):
    module, name, bug, kwargs, extra = CASES[path]
    tables = tmp_path / "tables"
    write_synthetic_table(tables, attention_heavy)
    calls = wrap(monkeypatch, module, name, bug)
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "out"
    weights = save_weights(timm_deit(kwargs), tmp_path / "w.safetensors")  # non-zero biases, peaked attention
    code, err = run_cli(monkeypatch, capsys, "compile", DEIT, *model_args(kwargs), "--target", "ort-cpu", "--weights", weights, *extra,
                        "--tables", tables, "--seed", "0", "--no-measure", "-q", "-o", out)
    assert calls, f"the planted bug in {module}.{name} never ran: the test no longer covers the {path} path"
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: verification failed: relative L2 error"), err
    error = float(lines[0].split("relative L2 error ")[1].split()[0])
    assert error > 10 * 1e-4 if path != "fp16" else error > 2 * 5e-3, f"the planted bug is too subtle to refuse reliably: {err}"
    assert not out.exists() and list(parent.iterdir()) == []
