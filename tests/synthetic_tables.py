"""Latency tables written from a formula instead of measured: budget logic with answers known by hand.

A table here is stamped with this device's fingerprint (so ``compile --latency`` accepts it) but its
entries come from :data:`LINEAR`, a formula the predictor interpolates exactly (each part is linear
in every key). No test that uses one depends on how busy the machine is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from deploycomp.backends.base import get_backend
from deploycomp.latency.profiler import FIXED, GRIDS, device_fingerprint
from deploycomp.latency.table import LatencyTable, part_kind, save_table, table_path

Formula = Callable[[str, tuple[int, ...]], float]

# Milliseconds per unit of each part (ALPHA per MLP channel, per attention head-dim channel, ...).
ALPHA = 0.01


def mlp_only(part: str, point: tuple[int, ...]) -> float:
    """Only the MLP width costs: ``ALPHA`` ms per MLP channel of a block; everything else a constant
    (stem 0.3 ms, head 0.1 ms, attention 0.12 ms per block)."""
    if part == "mlp":
        return ALPHA * point[2]
    return {"stem": 0.3, "head": 0.1, "attention": 0.12, "cross_attention": 0.12}[part]


def attention_heavy(part: str, point: tuple[int, ...]) -> float:
    """Attention costs ``ALPHA`` ms per head and head-dim channel (H·(QK+V)); the MLP costs a
    hundredth of that per channel: latency-aware selection must take heads / head dims first."""
    if part == "attention":
        _, _, heads, qk, v = point
        return 0.05 + ALPHA * heads * (qk + v)
    if part == "mlp":
        return 0.05 + 1e-4 * point[2]
    if part == "cross_attention":  # at the grid's widest heads; the predictor scales it by the above
        return 0.05 + ALPHA * point[0]
    return {"stem": 0.3, "head": 0.1}[part]


def flops_like(part: str, point: tuple[int, ...]) -> float:
    """Every width costs, in proportion to the multiply-adds of the part (a sum of products of
    single keys: still multilinear), so pruning takes some of every kind."""
    if part == "attention":
        t, e, h, qk, v = point
        return 0.02 + 1e-4 * t * e * h * (qk + v)
    if part == "mlp":
        t, e, m = point
        return 0.02 + 2e-5 * t * e * m
    if part == "stem":
        return 0.05 + 1e-3 * point[0]
    if part == "cross_attention":
        m, n, e = point
        return 0.02 + 1e-4 * (m + n) * e
    t, e = point
    return 0.01 + 1e-5 * t * e


def swin_flops_like(part: str, point: tuple[int, ...]) -> float:
    """The Swin parts (``swin-micro`` grid), each multilinear in its keys: windowed attention in
    proportion to windows x window tokens x EMB x H·(QK+V), plus 0.01 ms for the shift; the window
    cross-attention of semantic tokens to windows x (queries + keys) x EMB; the MLP,
    patch merging and head in proportion to their multiply-adds. Every width of every stage costs,
    and so does each patch merging."""
    kind = part_kind(part)
    if kind == "window_attention":
        w, t, e, h, qk, v, shift = point
        return 0.02 + 4e-6 * w * t * e * h * (qk + v) + 0.01 * shift
    if kind == "window_cross_attention":  # at the stage's widest heads; the predictor scales it
        w, q, t, e = point
        return 0.03 + 1e-6 * w * (q + t) * e
    if kind == "mlp":
        t, e, m = point
        return 0.02 + 2e-6 * t * e * m
    if kind == "patch_merging":
        t, e, out = point
        return 0.01 + 1e-6 * t * e * out
    if kind == "swin_stem":
        return 0.05 + 1e-3 * point[0]
    t, e = point  # swin_head
    return 0.01 + 1e-5 * t * e


def mlp_only_int8(part: str, point: tuple[int, ...]) -> float:
    """:func:`mlp_only` with the MLP at half the cost per channel (an int8 table: the MLPs' MatMuls
    run twice as fast, the rest as in fp32)."""
    if part == "mlp":
        return ALPHA / 2 * point[2]
    return mlp_only(part, point)


def synthetic_table(formula: Formula, grid: str = "tiny", batch: int = 1, threads: int | None = None,
                    precision: str = "fp32") -> LatencyTable:
    """A table of ``formula`` stamped as this device's ort-cpu table at ``precision``."""
    fp = device_fingerprint(get_backend("ort-cpu", threads=threads), batch, precision)
    protocol = {"warmup": 0, "repeats": 1, "passes": 1, "grid_name": grid}
    table = LatencyTable(fp, GRIDS[grid], FIXED[grid], protocol)
    for part in GRIDS[grid]:
        for point in table.points(part):
            table.add_samples(part, point, [formula(part, point)])
    return table


def write_synthetic_table(root: Path, formula: Formula, grid: str = "tiny", batch: int = 1,
                          threads: int | None = None, precision: str = "fp32") -> Path:
    """Write the table where ``compile --latency --tables root`` looks for this device's; returns its path."""
    table = synthetic_table(formula, grid, batch, threads, precision)
    path = table_path(Path(root), table.fingerprint, grid)
    save_table(table, path)
    return path


INT8_OPS = frozenset({"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QuantizeLinear",
                      "DequantizeLinear"})


def is_int8(model_bytes: bytes) -> bool:
    import onnx

    return any(n.op_type in INT8_OPS for n in onnx.load_from_string(model_bytes).graph.node)


def float_view(model_bytes: bytes) -> bytes:
    """ONNX Runtime's dynamic int8 graph with every MatMulInteger chain (DynamicQuantizeLinear ->
    MatMulInteger -> Cast -> Mul by the scales) back as one float MatMul of the same shapes: the
    architecture :func:`graph_ms` discovers (the weights' values do not matter to it)."""
    import onnx
    import onnx_ir as ir
    from onnx import helper, numpy_helper
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    model = onnx.load_from_string(model_bytes)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}
    new_nodes = []
    for n in g.node:
        if n.op_type != "MatMulInteger":
            new_nodes.append(n)
            continue
        dql = producer[n.input[0]]
        assert dql.op_type == "DynamicQuantizeLinear", dql.op_type
        (cast,) = consumers[n.output[0]]
        (scaled,) = consumers[cast.output[0]]
        assert (cast.op_type, scaled.op_type) == ("Cast", "Mul")
        weight = n.input[1] + ".float"
        g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[n.input[1]]).astype("float32"), weight))
        new_nodes.append(helper.make_node("MatMul", [dql.input[0], weight], [scaled.output[0]], name=n.name))
        scaled.output[0] = scaled.output[0] + ".dead"
    del g.node[:]
    g.node.extend(new_nodes)
    out = ir.from_proto(model)
    RemoveUnusedNodesPass()(out)
    out.graph.sort()
    return ir.to_proto(out).SerializeToString()


def graph_ms(model_bytes: bytes, formula: Formula) -> float:
    """What ``formula`` says a compiled graph costs: its discovered architecture, part by part."""
    import onnx
    import onnx_ir as ir

    from deploycomp.ir.discover import discover

    structure = discover(ir.serde.deserialize_model(onnx.load_from_string(model_bytes)))
    if len(structure.stage_embs) > 1:
        return swin_graph_ms(structure, formula)
    blocks = structure.blocks
    emb = blocks[0].emb
    total = formula("stem", (emb,)) + formula("head", (blocks[-1].tokens, emb))
    for b in blocks:
        total += formula("attention", (b.tokens, emb, b.heads, b.qk_dim, b.v_dim))
        total += formula("mlp", (b.tokens, emb, b.mlp_dim))
    return total


def swin_graph_ms(structure, formula: Formula) -> float:
    """A discovered Swin's cost by ``formula``, written out on its own (not through the predictor):
    stage s runs (windows x window tokens) tokens at its width; odd blocks of a stage with several
    windows are shifted (timm's rule); patch merging between stages."""
    embs = structure.stage_embs
    total = formula("swin_stem", (embs[0],))
    for s, emb in enumerate(embs):
        blocks = [b for b in structure.blocks if b.stage == s]
        tokens = blocks[0].tokens * blocks[0].sequences
        for i, b in enumerate(blocks):
            shift = int(i % 2 == 1 and b.sequences > 1)
            total += formula(f"window_attention.{s}", (b.sequences, b.tokens, emb, b.heads, b.qk_dim, b.v_dim, shift))
            total += formula(f"mlp.{s}", (tokens, emb, b.mlp_dim))
        if s + 1 < len(embs):
            total += formula(f"patch_merging.{s}", (tokens, emb, embs[s + 1]))
        else:
            total += formula("swin_head", (tokens, emb))
    return total


class SimulatedDevice:
    """Stands in for the backend's interleaved timing (``Backend.time``): every graph takes
    ``drift`` times what ``formula`` says (1: the device runs as when the table was profiled; a
    function of the formula's ms: a drift that depends on the model's size), a pruned one
    ``slowdown`` times that again (a table too optimistic about pruned models); an int8 graph
    (ONNX Runtime's dynamic int8) takes what ``int8`` says of its architecture. Records every
    pruned graph it was asked to time."""

    def __init__(self, formula: Formula, slowdown: float = 1.0, drift: float | Callable[[float], float] = 1.0,
                 int8: Formula | None = None):
        self.formula, self.slowdown, self.drift, self.timed = formula, slowdown, drift, []
        self.int8 = int8

    def time(self, backend, models, input_shape, batch, rounds, iters=3, backends=None):
        from deploycomp.backends.base import onnx_bytes

        out = {}
        for name, model in models.items():
            blob = onnx_bytes(model)
            ms = self.device_ms(blob) * (self.slowdown if name == "pruned" else 1.0)
            if name == "pruned":
                self.timed.append(blob)
            out[name] = {"median_ms": ms, "p10_ms": ms, "p90_ms": ms, "min_ms": ms, "n": rounds}
        return out

    def device_ms(self, blob: bytes) -> float:
        if is_int8(blob):
            assert self.int8 is not None, "an int8 graph timed on a device simulated without an int8 formula"
            ms = graph_ms(float_view(blob), self.int8)
        else:
            ms = graph_ms(blob, self.formula)
        return ms * (self.drift(ms) if callable(self.drift) else self.drift)

    def install(self, monkeypatch) -> "SimulatedDevice":
        """Replace the timing where compile does it (the table's calibration, budget checks, the
        report, the artifact's latency: all through ``Backend.time``)."""
        from deploycomp.backends.base import BackendBase

        device = self
        monkeypatch.setattr(BackendBase, "time", lambda backend, *a, **k: device.time(backend, *a, **k))
        return self


class FlopsDevice(SimulatedDevice):
    """A device on which a graph takes 0.05 ms plus 1 ms per 10 MFLOPs of its MatMul/Gemm/Conv
    (``ir.shapes.matmul_flops``): times any graph, one discovery cannot read too (a Swin with
    semantic tokens from its first stage); the table is calibrated to it like to a real device."""

    def __init__(self):
        super().__init__(formula=None)

    def device_ms(self, blob: bytes) -> float:
        import onnx
        import onnx_ir as ir

        from deploycomp.ir.shapes import matmul_flops

        return 0.05 + matmul_flops(ir.serde.deserialize_model(onnx.load_from_string(blob))) / 1e7
