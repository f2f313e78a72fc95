"""Pruning Swin: windowed attention (heads, QK, V per block, with the relative-position bias sliced
per head and the shifted-window mask untouched), MLPs, and the embedding per stage through patch
merging's 2x2 interleave.

The graph rewrite is checked against ``swin_from_timm``: the source's weights sliced in torch with
index arithmetic of its own (``SlicedWindowAttention``, slot-major merging indices), at batch sizes
1 and 3, and a reference with one block's bias table cut to the wrong heads must fail the same
comparison. The masked torch model (what the schedule trains) is checked against both, so a wrong
mapping between the folded bias and its table shows. NViT's importance over the new groups is
checked as a gate derivative, and the whole schedule runs on Swin with a FLOPs predictor (the
latency table has no windowed part: compile refuses ``--latency`` for Swin).
"""

from __future__ import annotations

import collections
import copy
import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from deploycomp.backends.base import get_backend
from deploycomp.frontend.export import export_to_onnx
from deploycomp.ir.discover import discover, trace_to_layernorm
from deploycomp.latency.micrographs import patch_merging_part, window_attention_part
from deploycomp.passes.base import CompileContext, Pipeline
from deploycomp.passes.cleanup import CleanupPass
from deploycomp.passes.discover import DiscoverPass
from deploycomp.passes.verify import relative_l2
from deploycomp.pruning.derived import DERIVED_FROM, link_relative_position_biases
from deploycomp.pruning.masks import PlanMasks, copy_weights_to_graph
from deploycomp.pruning.plan import PrunePlan
from deploycomp.pruning.rewrite import prune_graph
from deploycomp.pruning.saliency import parameter_slices
from deploycomp.pruning.schedule import PruneConfig, prune
from deploycomp.pruning.torch_prune import swin_from_timm

from .models import random_plan
from .test_saliency import check_unit_sums

SWIN = "swin_tiny_patch4_window7_224"
# stage 0: a 14x14 grid in four 7x7 windows, block 1 shifted (the window mask); stage 1: 7x7 after
# patch merging (one window, no shift). Widths 32 and 64, heads 2 and 4 of 16 channels.
TINY_SWIN = {"img_size": 56, "depths": (2, 2), "num_heads": (2, 4), "embed_dim": 32, "num_classes": 10}
EXACT = 1e-4
# one export of the tiny Swin takes ~20 s on 2 cores (the module fixture), so every test here is slow
pytestmark = pytest.mark.slow


def timm_swin(seed: int = 0) -> torch.nn.Module:
    """A tiny timm Swin whose every part shows when sliced wrong: non-trivial norms and biases,
    peaked attention (q/k rows x 8), and bias tables of unit scale (timm's 0.02 init hides a head
    mix-up in the bias)."""
    import timm

    torch.manual_seed(seed)
    module = timm.create_model(SWIN, pretrained=False, **TINY_SWIN).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn_like(p))
        for stage in module.layers:
            for blk in stage.blocks:
                width = blk.attn.qkv.out_features // 3
                blk.attn.qkv.weight[: 2 * width].mul_(8.0)
    return module


def cleaned(module: torch.nn.Module) -> tuple[ir.Model, object]:
    model = export_to_onnx(module.eval(), (1, 3, TINY_SWIN["img_size"], TINY_SWIN["img_size"]), 18)
    ctx = CompileContext(family="swin")
    return Pipeline([CleanupPass(), DiscoverPass()])(model, ctx), ctx.structure


@pytest.fixture(scope="module")
def swin():
    """(source module, the cleaned export serialized, its structure); tests take fresh copies."""
    source = timm_swin()
    model, structure = cleaned(source)
    return source, ir.to_proto(model).SerializeToString(), structure


def fresh(data: bytes) -> ir.Model:
    return ir.serde.deserialize_model(onnx.load_from_string(data))


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return get_backend("ort-cpu").runner(ir.serde.serialize_model(model).SerializeToString())(x)


def torch_out(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module.eval()(torch.from_numpy(x)).numpy()


def images(batch: int, seed: int = 0) -> np.ndarray:
    size = TINY_SWIN["img_size"]
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)




def wrong_bias_heads(reference: torch.nn.Module, source: torch.nn.Module, plan: PrunePlan) -> torch.nn.Module:
    """The control: ``reference`` with every block's bias table cut to heads the plan removed."""
    out = copy.deepcopy(reference)
    pairs = zip([b for stage in out.layers for b in stage.blocks], [b for stage in source.layers for b in stage.blocks])
    with torch.no_grad():
        for i, (dst, src) in enumerate(pairs):
            table = src.attn.relative_position_bias_table
            kept = plan.keep[f"block{i}.heads"]
            other = np.setdiff1d(np.arange(table.shape[1]), kept)[: len(kept)]
            dst.attn.relative_position_bias_table.copy_(table[:, other])
    return out


def check(model: ir.Model, reference: torch.nn.Module, control: torch.nn.Module | None = None) -> float:
    """The graph equals ``reference`` at batch 1 and 3 (stale views would fail one); the control fails."""
    worst = 0.0
    for batch in (1, 3):
        x = images(batch, seed=batch)
        got = run(model, x)
        err = relative_l2(got, torch_out(reference, x))
        assert err <= EXACT, (batch, err)
        if control is not None:
            assert relative_l2(got, torch_out(control, x)) > max(EXACT, 10 * err), batch
        worst = max(worst, err)
    return worst


def dims_of(structure, plan: PrunePlan) -> list[tuple[int, ...]]:
    return [(len(plan.kept(structure, f"stage{b.stage}.emb")),
             *(len(plan.kept(structure, f"block{b.index}.{k}")) for k in ("heads", "qk", "v", "mlp")))
            for b in structure.blocks]


def test_windowed_attention_pruned_in_the_graph_is_the_sliced_torch_swin(swin):
    """Heads, QK, V and MLP of every block: the rewritten graph computes what timm's Swin computes
    with those units sliced away in torch, the window mask is the source's, byte for byte, and
    the graph reads back as the plan's dims."""
    source, data, structure = swin
    model = fresh(data)
    masks_before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()
                    if v.const_value is not None and v.const_value.numpy().ndim == 5}
    assert masks_before, "the tiny Swin has no shifted-window mask"
    plan = random_plan(structure, np.random.default_rng(1), kinds=("heads", "qk", "v", "mlp"))
    reference = swin_from_timm(source, structure, plan)
    info = prune_graph(model, structure, plan)
    assert info["attention_rebuilt"] == [b.index for b in structure.blocks]
    check(model, reference, wrong_bias_heads(reference, source, plan))
    for name, mask in masks_before.items():
        assert np.array_equal(model.graph.initializers[name].const_value.numpy(), mask), name
    found = discover(model)
    assert [(b.emb, b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in found.blocks] == dims_of(structure, plan)
    assert [b.sequences for b in found.blocks] == [b.sequences for b in structure.blocks] == [4, 4, 1, 1]


def test_embedding_pruned_per_stage_through_patch_merging(swin):
    """Every kind at once, the embedding of both stages included: patch merging's LayerNorm and
    reduction keep a stage-0 channel in all four neighbour slots, and the stream's views (window
    partition and reverse, the merge's 2x2 flatten) take the new widths."""
    source, data, structure = swin
    model = fresh(data)
    plan = random_plan(structure, np.random.default_rng(2))
    reference = swin_from_timm(source, structure, plan)
    info = prune_graph(model, structure, plan)
    assert info["stem_constants"] >= 4  # views of the stream with a width in them
    check(model, reference, wrong_bias_heads(reference, source, plan))
    found = discover(model)
    assert found.stage_embs == [len(plan.keep["stage0.emb"]), len(plan.keep["stage1.emb"])] == [20, 40]
    assert [(b.emb, b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in found.blocks] == dims_of(structure, plan)


def test_masked_swin_is_what_the_pruned_graph_computes(swin):
    """The schedule trains the source with removed units masked (the bias table's columns of removed
    heads included, patch merging's LayerNorm over the kept channels of all four slots); that
    model, written into the graph and rewritten, equals both the graph and the sliced torch Swin."""
    source, data, structure = swin
    model = fresh(data)
    plan = random_plan(structure, np.random.default_rng(3))
    masked = copy.deepcopy(source)
    PlanMasks(masked, model, structure, plan).apply()
    copy_weights_to_graph(masked, model)
    prune_graph(model, structure, plan)
    x = images(3, seed=5)
    assert relative_l2(run(model, x), torch_out(masked, x)) <= 1e-5
    check(model, swin_from_timm(source, structure, plan))


def test_trained_bias_tables_reach_the_graph(swin):
    """Cleanup folds each block's bias table into a constant; after training changes the tables,
    copying the weights recomputes those constants (else the graph keeps the untrained bias)."""
    source, data, structure = swin
    model = fresh(data)
    trained = copy.deepcopy(source)
    assert link_relative_position_biases(trained, model, structure) == len(structure.blocks)
    linked = [v for v in model.graph.initializers.values() if v.metadata_props.get(DERIVED_FROM)]
    assert len(linked) == len(structure.blocks)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.add_(2.0 * torch.randn_like(p))
    x = images(2, seed=7)
    stale = relative_l2(run(model, x), torch_out(trained, x))  # the control: still the old biases
    copy_weights_to_graph(trained, model)
    err = relative_l2(run(model, x), torch_out(trained, x))
    assert err <= 1e-5 and stale > max(1e-3, 100 * err), (err, stale)
    # the link survives serialization (the prune pass times copies of the graph)
    again = fresh(ir.to_proto(model).SerializeToString())
    assert sum(1 for v in again.graph.initializers.values() if v.metadata_props.get(DERIVED_FROM)) == len(linked)


def test_swin_unit_sums_are_gate_derivatives(swin):
    """NViT's (Σ g·w) of a unit is the derivative of the loss w.r.t. a gate on all of its coupled
    slices: checked for every group of the Swin, the heads (whose slices include their bias-table
    column) and the embedding of both stages included."""
    source, data, structure = swin
    model = fresh(data)
    module = copy.deepcopy(source).double()
    torch.manual_seed(0)
    x = torch.randn(2, 3, TINY_SWIN["img_size"], TINY_SWIN["img_size"], dtype=torch.float64)
    y = torch.randint(0, TINY_SWIN["num_classes"], (2,))
    slices = parameter_slices(structure, model, module)
    tables = {item.slice.tensor for g in structure.groups("heads") for item in slices[g]
              if item.slice.tensor.endswith("relative_position_bias_table")}
    assert len(tables) == len(structure.blocks), "a head's bias-table column is not among its slices"
    module.zero_grad()
    torch.nn.functional.cross_entropy(module(x), y).backward()
    check_unit_sums(module, structure, slices, x, y)


def flops_predictor(structure):
    """A latency stand-in for the schedule: the blocks' matmul FLOPs at the plan's dims (ms-like units)."""
    def predict(plan: PrunePlan) -> float:
        total = 0
        for b, dims in zip(structure.blocks, dims_of(structure, plan)):
            emb, heads, qk, v, mlp = dims
            total += dataclasses.replace(b, emb=emb, heads=heads, qk_dim=qk, v_dim=v, mlp_dim=mlp).flops()
        return total / 1e6
    return predict


@pytest.mark.slow
def test_schedule_prunes_windowed_heads_qk_v_by_importance(swin):
    """NViT's schedule over the new groups: importance, latency-regularized selection (FLOPs as the
    latency model), masks; the final plan removes heads, QK and V channels, and the rewritten graph
    equals the masked model that was pruned."""
    source, data, structure = swin
    model = fresh(data)
    module = copy.deepcopy(source)
    predict = flops_predictor(structure)
    config = PruneConfig(latency="0.7x", steps=2, saliency_batches=1, batch_size=4, budget_rounds=0,
                         kinds=("heads", "qk", "v"), group_sizes={"emb": 16, "heads": 1, "qk": 4, "v": 4, "mlp": 16})
    outcome = prune(module, model, structure, predict, config, (1, 3, TINY_SWIN["img_size"], TINY_SWIN["img_size"]))
    assert outcome.predicted_ms <= 0.7 * outcome.baseline_ms * 1.02
    kept = {g: len(outcome.plan.kept(structure, g)) for g in structure.groups()}
    for kind in ("heads", "qk", "v"):
        assert any(kept[g] < structure.graph.nodes[g]["units"] for g in structure.groups(kind)), kind
    copy_weights_to_graph(module, model)
    prune_graph(model, structure, outcome.plan)
    x = images(3, seed=9)
    assert relative_l2(run(model, x), torch_out(module, x)) <= 1e-5


COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "Softmax", "LayerNormalization", "Erf", "Transpose", "Mul", "Div", "Add")


def ops_between(start: ir.Value, end: ir.Node) -> collections.Counter:
    """Compute ops of every node on a data path from ``start`` to ``end`` (included), shape
    arithmetic excluded."""
    down, stack = set(), [start]
    while stack:
        for node in stack.pop().consumers():
            if id(node) not in down and node.op_type not in ("Shape", "Size") and node is not end:
                down.add(id(node))
                stack.extend(node.outputs)
    up, stack, ops = set(), [end], [end.op_type]
    while stack:
        for value in stack.pop().inputs:
            node = value.producer() if value is not None else None
            if node is not None and id(node) in down and id(node) not in up:
                up.add(id(node))
                ops.append(node.op_type)
                stack.append(node)
    return collections.Counter(op for op in ops if op in COMPUTE_OPS)


def attention_half_ops(q_matmul: ir.Node) -> collections.Counter:
    """One block's attention half: from the block's input (what its first LayerNorm reads) to the residual Add."""
    x = trace_to_layernorm(q_matmul.inputs[0]).inputs[0]
    return ops_between(x, next(n for n in x.consumers() if n.op_type == "Add"))


def test_window_attention_micrograph_has_the_ops_of_a_pruned_swin_block(swin):
    """The windowed-attention micro-graph (a function only: no table has it yet) has the compute
    ops, op for op, of a pruned Swin block's attention half as compiled, unshifted and shifted."""
    source, data, structure = swin
    model = fresh(data)
    prune_graph(model, structure, random_plan(structure, np.random.default_rng(1), kinds=("heads", "qk", "v")))
    found = discover(model)
    nodes = {n.name: n for n in model.graph}
    for b, shift in ((found.blocks[0], 0), (found.blocks[1], 3)):
        part = window_attention_part(14, 7, b.emb, b.heads, b.qk_dim, b.v_dim, shift)
        built = collections.Counter(n.op_type for n in part.graph.node if n.op_type in COMPUTE_OPS)
        assert built == attention_half_ops(nodes[b.nodes["q"]]), b.index
        x = np.random.default_rng(0).standard_normal((2, 14, 14, b.emb)).astype(np.float32)
        out = run(ir.serde.deserialize_model(part), x)
        assert out.shape == x.shape and np.isfinite(out).all()


def test_score_views_computed_at_run_time_are_refused_in_one_line(exported):
    """TorchScript's export computes the window-mask views' targets at run time; the rewrite
    cannot give them the kept head count, so it refuses in one line rather than drop the step
    (compile exports with dynamo, whose views are constants)."""
    from deploycomp.errors import DeployCompError

    path, _ = exported("swin", "torchscript")
    model = ir.load(path)
    ctx = CompileContext(family="swin")
    Pipeline([CleanupPass(), DiscoverPass()])(model, ctx)
    with pytest.raises(DeployCompError, match="between the scores and the softmax") as err:
        prune_graph(model, ctx.structure, random_plan(ctx.structure, np.random.default_rng(0), kinds=("heads",)))
    assert "\n" not in str(err.value)


def test_patch_merging_micrograph_has_the_ops_of_a_pruned_merge(swin):
    """The patch-merging micro-graph (a function only) has the compute ops of the merge between
    stage 0 and 1 of a Swin whose embeddings were pruned, from stage 0's last residual Add to
    the reduction."""
    source, data, structure = swin
    model = fresh(data)
    plan = random_plan(structure, np.random.default_rng(2), kinds=("emb",))
    prune_graph(model, structure, plan)
    nodes = {n.name: n for n in model.graph}
    fc2 = nodes[structure.blocks[1].nodes["fc2"]]
    residual = next(n for v in (fc2.outputs[0], *(c.outputs[0] for c in fc2.outputs[0].consumers()))
                    for n in v.consumers() if n.op_type == "Add" and all(i.const_value is None for i in n.inputs))
    reduction = next(n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].name.endswith("downsample.reduction.weight"))
    widths = [len(plan.keep["stage0.emb"]), len(plan.keep["stage1.emb"])]
    part = patch_merging_part(14, *widths)
    built = collections.Counter(n.op_type for n in part.graph.node if n.op_type in COMPUTE_OPS)
    assert built == ops_between(residual.outputs[0], reduction)
    x = np.random.default_rng(0).standard_normal((2, 14, 14, widths[0])).astype(np.float32)
    assert run(ir.serde.deserialize_model(part), x).shape == (2, 7, 7, widths[1])


def test_swin_parts_chained_have_the_ops_of_a_pruned_swin(swin):
    """The latency table's Swin parts (stem, per block windowed attention and MLP at the block's
    shift, patch merging, head), chained at a pruned Swin's dims, have the compute ops of that whole
    compiled graph, op for op: the predictor's sum covers every op the model runs."""
    from deploycomp.latency.profiler import FIXED, build_part

    source, data, structure = swin
    model = fresh(data)
    prune_graph(model, structure, random_plan(structure, np.random.default_rng(4)))
    found = discover(model)
    e0, e1 = found.stage_embs
    points = [("swin_stem", (e0,)), ("patch_merging.0", (196, e0, e1)), ("swin_head", (49, e1))]
    for b in found.blocks:
        shift = int(b.index == 1)  # stage 0's second block; stage 1 is one window
        points += [(f"window_attention.{b.stage}", (b.sequences, b.tokens, b.emb, b.heads, b.qk_dim, b.v_dim, shift)),
                   (f"mlp.{b.stage}", (b.tokens * b.sequences, b.emb, b.mlp_dim))]
    counted = (*COMPUTE_OPS, "ReduceMean")  # the head's pooling
    built = collections.Counter(n.op_type for part, point in points
                                for n in build_part(part, point, FIXED["swin-micro"]).graph.node
                                if n.op_type in counted)
    assert built == collections.Counter(n.op_type for n in model.graph if n.op_type in counted)


def test_compile_latency_prunes_a_swin_to_the_budget(tmp_path, monkeypatch):
    """``compile --latency 0.5x`` on a tiny Swin with every group prunable, on a synthetic Swin table
    (every width of every stage costs) and a simulated device: the budget is met by the table and
    by the device's timing of the artifact, heads / QK / V / MLP and both stage widths move, and the
    artifact equals the source's weights sliced to the manifest's kept units in torch
    (``swin_from_timm``) at batch 1 and 3."""
    from deploycomp.api import CompileOptions, compile
    from deploycomp.pruning.schedule import PruneConfig

    from .models import save_weights
    from .synthetic_tables import SimulatedDevice, swin_flops_like, write_synthetic_table

    source = timm_swin()
    weights = save_weights(source, tmp_path / "w.safetensors")
    write_synthetic_table(tmp_path / "tables", swin_flops_like, grid="swin-micro")
    device = SimulatedDevice(swin_flops_like).install(monkeypatch)
    prune = PruneConfig(latency="0.5x", steps=2, saliency_batches=1, batch_size=4, budget_rounds=0, method="magnitude",
                        group_sizes={"emb": 8, "heads": 1, "qk": 4, "v": 4, "mlp": 16})
    manifest = compile("timm:" + SWIN, tmp_path / "out", CompileOptions(
        target="ort-cpu", model_kwargs=dict(TINY_SWIN), weights=weights, prune=prune, tables=str(tmp_path / "tables"),
        measure_rounds=1, seed=0))
    p = manifest["pruning"]
    assert p["predicted_ms"] <= p["target_ms"] == pytest.approx(0.5 * p["baseline_predicted_ms"], rel=1e-9)
    assert p["latency"]["measured_ratio"] <= 0.5 * 1.02  # the simulated device times the artifact
    # the device runs the table's formula: a right sum of the right parts predicts its ratio
    assert p["latency"]["predicted_ratio"] == pytest.approx(p["latency"]["measured_ratio"], rel=1e-4)
    cut = {g for g, u in p["kept"].items() if len(u) < structure_units(g)}
    assert {"stage0.emb", "stage1.emb"} <= cut and any(g.endswith(".mlp") for g in cut), sorted(cut)
    assert any(g.endswith((".heads", ".qk", ".v")) for g in cut), sorted(cut)
    # every group stays inside its own stage's grid (swin-micro: widths >= 24 / 48, MLP >= 64 / 128)
    floors = {"stage0.emb": 24, "stage1.emb": 48, "block0.mlp": 64, "block1.mlp": 64, "block2.mlp": 128, "block3.mlp": 128}
    assert all(len(p["kept"][g]) >= n for g, n in floors.items()), {g: len(p["kept"][g]) for g in floors}
    assert len(device.timed) == 1
    _, structure = cleaned(source)
    plan = PrunePlan({g: np.asarray(u, dtype=np.int64) for g, u in p["kept"].items()})
    reference = swin_from_timm(source, structure, plan)
    for batch in (1, 3):
        x = images(batch, seed=batch)
        assert relative_l2(run_ort_path(tmp_path / "out" / "model.onnx", x), torch_out(reference, x)) <= EXACT


def structure_units(group: str) -> int:
    """Units of a tiny Swin group before pruning (TINY_SWIN: widths 32/64, heads 2/4 of 16, MLP 4x)."""
    name, kind = group.split(".")
    stage = 0 if name in ("stage0", "block0", "block1") else 1
    return {"emb": 32, "heads": 2, "qk": 16, "v": 16, "mlp": 128}[kind] * (2 if stage and kind in ("emb", "heads", "mlp") else 1)


def run_ort_path(path, x: np.ndarray) -> np.ndarray:
    from .conftest import run_ort

    return run_ort(path, x)


def test_compile_latency_with_semantic_tokens_per_window(tmp_path, monkeypatch):
    """``compile --latency 0.07x --semantic-tokens 4`` on a tiny Swin (the tokens alone predict ~0.09x,
    so the width must give the rest): one budget over both levers
    (the table predicts the token design, ``window_cross_attention``), the on-device budget check
    times the pruned design re-exported from torch (the token rewrite cannot act on a graph), and
    the artifact is the source's design cut to the manifest's kept units in torch, written out
    independently (``swin_from_timm`` of ``SemanticTokenSwin``) at batch 1 and 3."""
    from deploycomp.api import CompileOptions, compile
    from deploycomp.pruning.schedule import PruneConfig
    from deploycomp.tokens.config import SemanticTokenConfig
    from deploycomp.tokens.stvit_swin import SemanticTokenSwin, SwinTokenConfig

    from .models import save_weights
    from .synthetic_tables import FlopsDevice, swin_flops_like, write_synthetic_table

    source = timm_swin()
    weights = save_weights(source, tmp_path / "w.safetensors")
    write_synthetic_table(tmp_path / "tables", swin_flops_like, grid="swin-micro")
    device = FlopsDevice().install(monkeypatch)
    prune = PruneConfig(latency="0.07x", steps=2, saliency_batches=1, batch_size=4, budget_rounds=1, method="magnitude",
                        group_sizes={"emb": 8, "heads": 1, "qk": 4, "v": 4, "mlp": 16})
    manifest = compile("timm:" + SWIN, tmp_path / "out", CompileOptions(
        target="ort-cpu", model_kwargs=dict(TINY_SWIN), weights=weights, prune=prune, tables=str(tmp_path / "tables"),
        semantic_tokens=SemanticTokenConfig(4, stage=0), measure_rounds=0, seed=0))
    p = manifest["pruning"]
    assert p["rewrites"] == ["semantic_tokens", "lower_token_cluster"]
    assert p["predicted_ms"] <= p["target_ms"] == pytest.approx(0.07 * p["baseline_predicted_ms"], rel=1e-9)
    assert p["levers"]["tokens"] > 1.05 and p["levers"]["width"] > 1.0, p["levers"]
    assert manifest["parity"]["reference"] == "torch (semantic tokens per window)"
    assert [(b["tokens"], b["sequences"]) for b in manifest["structure"]["blocks"]][:2] == [(4, 4), (4, 4)]
    # the budget check timed a pruned graph with the semantic tokens, lowered: the pooling's ReduceMax
    # and no TokenCluster node
    checks = p["budget_checks"]
    assert checks and len(device.timed) == len(checks), checks  # the checks (measure_rounds 0: no report timing)
    assert checks[-1]["measured_ratio"] <= 0.07 * 1.02  # the device (FLOPs) judged the design with tokens
    ops = {n.op_type for n in fresh(device.timed[0]).graph}
    assert "ReduceMax" in ops and "TokenCluster" not in ops, sorted(ops)
    _, structure = cleaned(source)
    plan = PrunePlan({g: np.asarray(u, dtype=np.int64) for g, u in p["kept"].items()})
    assert any(len(u) < structure_units(g) for g, u in p["kept"].items())
    design = SemanticTokenSwin(copy.deepcopy(source), SwinTokenConfig(4, stage=0))
    reference = swin_from_timm(design, structure, plan)
    for batch in (1, 3):
        x = images(batch, seed=batch)
        assert relative_l2(run_ort_path(tmp_path / "out" / "model.onnx", x), torch_out(reference, x)) <= EXACT
