"""Tiny DeiTs with stored weights, and the independent torch references an artifact is checked against.

A compile's manifest reports the verify pass's own parity; the tests here do not read it. They run
the artifact's ``model.onnx`` with ONNX Runtime and compare it with a torch model built in the test
from the same weights file: the DeiT itself, the pruned FlexViT (sliced by the kept units the
manifest lists), or ``SemanticTokenViT``.
"""

from __future__ import annotations

import numpy as np
import torch

from deploycomp.passes.verify import relative_l2

DEIT = "timm:deit_tiny_patch16_224"
# 64 px / patch 16: 16 patches + cls; every dim inside the "tiny" latency grid
PRUNE_DEIT = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "num_heads": 2, "depth": 2, "num_classes": 10}
# four blocks: blocks 1-2 generate the semantic tokens, block 3 runs on them
TOKEN_DEIT = {"img_size": 64, "patch_size": 16, "embed_dim": 48, "num_heads": 3, "depth": 4, "num_classes": 10}
TOKEN_PRUNE_DEIT = {**TOKEN_DEIT, "embed_dim": 32, "num_heads": 2}
QK_GAIN = 8.0


def timm_deit(kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """A timm DeiT with non-trivial norms and biases (a wrong slice of them shows), and q/k weights
    large enough that attention is peaked: at timm's init (std 0.02) the softmax is nearly uniform,
    and a wrong softmax scale moved the logits of a tiny model by only ~1e-4."""
    import timm

    torch.manual_seed(seed)
    module = timm.create_model("deit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
        for block in module.blocks:
            emb = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * emb].mul_(QK_GAIN)
    return module


def save_weights(module: torch.nn.Module, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return str(path)


def images(batch: int, kwargs: dict, seed: int = 11) -> np.ndarray:
    size = kwargs["img_size"]
    return np.random.default_rng(seed).standard_normal((batch, kwargs.get("in_chans", 3), size, size)).astype(np.float32)


def run_artifact(out_dir, x: np.ndarray) -> np.ndarray:
    from .conftest import run_ort

    return run_ort(out_dir / "model.onnx", x)


def torch_out(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module.eval()(torch.from_numpy(x)).numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return relative_l2(a, b)


def perturbed(module: torch.nn.Module, scale: float = 1.01) -> torch.nn.Module:
    """A copy with the last block's first MLP weight scaled by 1 %: the control a parity check must fail."""
    import copy

    out = copy.deepcopy(module)
    name = [n for n, _ in out.named_parameters() if n.endswith("mlp.fc1.weight")][-1]
    with torch.no_grad():
        out.get_parameter(name).mul_(scale)
    return out


def source_structure(module: torch.nn.Module, kwargs: dict):
    """The cleaned export and the structure the compiler discovers in it (group names, unit counts)."""
    from deploycomp.frontend.export import export_to_onnx
    from deploycomp.passes.base import CompileContext, Pipeline
    from deploycomp.passes.cleanup import CleanupPass
    from deploycomp.passes.discover import DiscoverPass

    model = export_to_onnx(module.eval(), (1, kwargs.get("in_chans", 3), kwargs["img_size"], kwargs["img_size"]), 18)
    ctx = CompileContext(family="deit")
    Pipeline([CleanupPass(), DiscoverPass()])(model, ctx)
    return model, ctx.structure


def pruned_flexvit(module: torch.nn.Module, kwargs: dict, kept: dict[str, list[int]]):
    """The pruned model rebuilt in torch: the source's weights sliced to the manifest's kept units."""
    from deploycomp.pruning.plan import PrunePlan, plan_arch
    from deploycomp.pruning.torch_prune import flexvit_from_timm

    _, structure = source_structure(module, kwargs)
    plan = PrunePlan({g: np.asarray(units, dtype=np.int64) for g, units in kept.items()})
    arch = plan_arch(structure, plan, img_size=kwargs["img_size"], patch=kwargs["patch_size"],
                     in_chans=kwargs.get("in_chans", 3),
                     num_classes=kwargs["num_classes"])
    return flexvit_from_timm(module, structure, plan, arch).eval()


def masked(module: torch.nn.Module, kwargs: dict, kept: dict[str, list[int]]) -> torch.nn.Module:
    """The pruned model as the pruning schedule trains it: the source with removed units masked."""
    from deploycomp.pruning.masks import PlanMasks
    from deploycomp.pruning.plan import PrunePlan

    model, structure = source_structure(module, kwargs)
    plan = PrunePlan({g: np.asarray(units, dtype=np.int64) for g, units in kept.items()})
    PlanMasks(module, model, structure, plan).apply()
    return module.eval()


def random_plan(structure, rng: np.random.Generator, kinds=("emb", "heads", "qk", "v", "mlp")):
    """About 5/8 of every group of the given kinds kept (heads 2 -> 1 and 4 -> 2), drawn at random."""
    from deploycomp.pruning.plan import PrunePlan

    plan = PrunePlan()
    for group in structure.groups():
        data = structure.graph.nodes[group]
        if data["kind"] in kinds:
            units = data["units"]
            plan.keep[group] = np.sort(rng.choice(units, size=max(1, units * 5 // 8), replace=False))
    return plan
