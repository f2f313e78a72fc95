"""``deploycomp::TokenCluster`` as a TensorRT Quickly Deployable Plugin with an ahead-of-time kernel.

Three parts:

* ``mark_for_tensorrt(model)`` — pure ONNX, runs anywhere. The TensorRT ONNX parser maps a node it
  has no importer for to a registered plugin when the node's ``op_type`` is the plugin name and the
  node carries a string attribute ``plugin_namespace``; an attribute ``aot = 1`` asks for the
  plugin's AOT implementation (TensorRT samples/python/quickly_deployable_plugins/README.md,
  "ONNX model with an AOT plugin"). An AOT kernel receives its tensors plus int32 scalars only
  (``tensorrt.plugin.aot_impl``: extra args are symbolic ints), so the node's float ``scale``
  reaches the kernel as a compile-time constant of its PTX (``ptx_for(..., scale)``).
* ``aot_launch(...)`` — no TensorRT needed: the kernel name, the PTX of the Triton kernel's AOT entry
  (``deploycomp.kernels.token_cluster.ptx_for``, already in TensorRT's argument order; ``trt_abi``
  checks that order and drops Triton's two unused hidden parameters), the grid (``launch_grid``),
  ``num_warps * 32`` threads, the kernel's shared memory and the int32 scalars, as plain values
  (ints, or TensorRT's symbolic shapes).
* ``register(arch)`` — needs TensorRT (imported there, never at module import). Registers the
  output shape/type (``_desc`` with ``tensorrt.plugin.register``) and the AOT implementation
  (``_aot`` with ``tensorrt.plugin.aot_impl``), which wraps ``aot_launch`` in a
  ``KernelLaunchParams`` and ``SymIntExprs``. Both are module-level functions whose signatures follow
  TensorRT's registration rules (``_aot(q, k, v, num_heads, scale, outputs, tactic)`` with a return
  annotation); ``annotate`` fills in the annotations that name ``tensorrt.plugin`` classes. The
  engine then holds the PTX and runs without Python (e.g. ``trtexec --loadEngine``).

Written against the ``tensorrt.plugin`` API of TensorRT 10.9+ (AOT QDPs were added in 10.9) and
11.x; never run with TensorRT here (no GPU, no TensorRT): the tests and ``scripts/gpu_check.py`` run
it against ``kernels.trt_standin``. No ``from __future__ import annotations`` in this module:
``tensorrt.plugin`` reads the functions' annotations as objects.
"""

import re
from dataclasses import dataclass
from typing import Tuple, Union

import numpy as np
import onnx_ir as ir

from ..tokens.op import DOMAIN, OP_TYPE, VERSION, token_cluster_nodes

PLUGIN_ID = f"{DOMAIN}::{OP_TYPE}"
# Kernel parameter roles (names of deploycomp.kernels.token_cluster.AOT_PARAMS).
INPUTS, OUTPUTS = ("q_ptr", "k_ptr", "v_ptr"), ("o_ptr",)
HIDDEN = ("global_scratch", "profile_scratch")  # Triton's, appended to every kernel; unused by ours
_ENTRY = re.compile(r"(\.visible\s+\.entry\s+(\w+)\s*\()([^)]*)(\))", re.S)
_REGISTERED: dict[str, int | bool] = {}  # arch; which of register / aot_impl succeeded


# ---------------------------------------------------------------------------------------------
# The ONNX side (no TensorRT needed).


def mark_for_tensorrt(model: ir.Model) -> int:
    """Mark every TokenCluster node for the TensorRT ONNX parser, in place; return how many."""
    nodes = token_cluster_nodes(model)
    for node in nodes:
        node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", DOMAIN)
        node.attributes["aot"] = ir.AttrInt64("aot", 1)
    if nodes:
        model.opset_imports.setdefault(DOMAIN, VERSION)
    return len(nodes)


def token_cluster_graph(tokens: int = 17, emb: int = 32, num_heads: int = 2, queries: int = 5, seed: int = 0,
                        scale: float | None = None) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """A tiny graph ``x (B, tokens, emb) -> TokenCluster(x[:, :queries] Wq, x Wk, x Wv)`` and its weights.

    The first ``queries`` tokens act as the centres. Used by the GPU self-test and the tests.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = {name: (rng.standard_normal((emb, emb)) / np.sqrt(emb)).astype(np.float32) for name in ("wq", "wk", "wv")}
    scale = (emb // num_heads) ** -0.5 if scale is None else scale
    inits = [numpy_helper.from_array(a, n) for n, a in w.items()]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("starts", [0]), ("ends", [queries]), ("axes", [1]))]
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["centres"]),
        helper.make_node("MatMul", ["centres", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node(OP_TYPE, ["q", "k", "v"], ["y"], name="token_cluster", domain=DOMAIN, num_heads=num_heads,
                         scale=float(scale)),
    ]
    graph = helper.make_graph(nodes, "token_cluster", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                     ["batch", tokens, emb])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", queries, emb])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, VERSION)],
                              ir_version=9)
    w["scale"], w["num_heads"], w["queries"] = np.float32(scale), np.int64(num_heads), np.int64(queries)
    return ir.serde.deserialize_model(proto), w


def token_cluster_graph_reference(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """What ``token_cluster_graph`` computes, from the op's own reference (``tokens.op``)."""
    from ..tokens.op import token_cluster_numpy

    q = x[:, : int(w["queries"])] @ w["wq"]
    return token_cluster_numpy(q, x @ w["wk"], x @ w["wv"], int(w["num_heads"]), float(w["scale"]))


# ---------------------------------------------------------------------------------------------
# The PTX the engine embeds, in TensorRT's calling convention.


def scalar_values(m, n, num_heads: int, hq: int, hv: int) -> dict:
    """Launch value of every int32 kernel parameter, from the token counts (ints, or TensorRT's
    symbolic ``ShapeExpr`` at build time) and the static channel widths H·Dqk, H·Dv. Strides are
    in elements of TensorRT's linear (contiguous) layout."""
    return {"M": m, "N": n, "H": num_heads, "stride_qb": m * hq, "stride_qm": hq, "stride_kb": n * hq,
            "stride_kn": hq, "stride_vb": n * hv, "stride_vn": hv, "stride_ob": m * hv, "stride_om": hv}


SCALARS = frozenset(scalar_values(1, 1, 1, 1, 1))


def entry_params(ptx: str, name: str) -> list[str]:
    """``.param`` declarations of the PTX entry ``name``, in order."""
    return [d.strip() for d in _entry(ptx, name).group(3).split(",") if d.strip()]


def _entry(ptx: str, name: str) -> re.Match:
    for match in _ENTRY.finditer(ptx):
        if match.group(2) == name:
            return match
    raise ValueError(f"PTX has no entry '{name}'")


def trt_abi(kernel) -> tuple[str, list[str]]:
    """The PTX of ``kernel`` (a ``KernelPTX``) as TensorRT's AOT plugin launches it, and the names
    of its scalar parameters in launch order.

    TensorRT passes the input pointers, then the int32 scalars (``extra_args``), then the output
    pointers, and nothing else. The AOT entry already declares its parameters in that order;
    Triton's hidden scratch pointers, appended after them, are dropped from the ``.entry`` when
    the body never reads them. Anything else refuses with the parameter it cannot place.
    """
    match = _entry(kernel.ptx, kernel.name)
    decls = entry_params(kernel.ptx, kernel.name)
    if len(decls) != len(kernel.params):
        raise ValueError(f"PTX entry '{kernel.name}' declares {len(decls)} parameters, KernelPTX lists {kernel.params}")
    own = [p for p in kernel.params if p not in HIDDEN]
    scalars = [p for p in own if p in SCALARS]
    if own != [*INPUTS, *scalars, *OUTPUTS]:
        unplaced = [p for p in own if p not in (*INPUTS, *OUTPUTS, *SCALARS)]
        raise ValueError(f"kernel '{kernel.name}' parameters {kernel.params}: not TensorRT's order (inputs, int32 "
                         f"scalars, outputs)" + (f"; cannot place {unplaced}" if unplaced else ""))
    body = kernel.ptx[match.end():]
    for p, d in zip(kernel.params, decls):
        if p in HIDDEN and re.search(rf"\[{re.escape(d.split()[-1])}\b", body):
            raise ValueError(f"kernel '{kernel.name}' reads {p}, which TensorRT does not pass")
    params = "\n\t" + ",\n\t".join(d for p, d in zip(kernel.params, decls) if p not in HIDDEN) + "\n"
    return kernel.ptx[:match.start(3)] + params + kernel.ptx[match.end(3):match.end()] + body, scalars


# ---------------------------------------------------------------------------------------------
# The launch TensorRT makes (no TensorRT needed): what the AOT implementation returns, as plain values.


@dataclass(frozen=True)
class AotLaunch:
    """Everything ``aot_impl`` hands TensorRT, before it is wrapped in ``tensorrt.plugin`` types.

    ``grid`` entries and ``scalar_values`` are ints, or TensorRT's symbolic ``ShapeExpr`` at engine
    build time. TensorRT launches ``name`` from ``ptx`` with ``grid``, ``block`` threads and
    ``shared_mem`` bytes of dynamic shared memory, passing the input pointers (q, k, v), then
    ``[scalar_values[p] for p in scalars]`` as int32, then the output pointer."""

    name: str
    ptx: str
    grid: tuple
    block: int
    shared_mem: int
    scalars: tuple[str, ...]
    scalar_values: dict
    kernel: object  # the KernelPTX (arch, ISA, the untrimmed PTX)

    def args(self, inputs, outputs) -> list:
        """The kernel's arguments in TensorRT's order, from input/output pointers."""
        return [*inputs, *(self.scalar_values[p] for p in self.scalars), *outputs]


def aot_launch(arch: int, dtype: str, batch, m, n, hq: int, hv: int, num_heads: int, scale: float) -> AotLaunch:
    """The launch of TokenCluster for ``sm_<arch>``: q (batch, m, hq), k (batch, n, hq), v (batch, n, hv)
    in ``dtype`` ("float32" | "float16"). ``batch``, ``m``, ``n`` may be symbolic."""
    from .token_cluster import launch_grid, ptx_for

    if num_heads <= 0 or hq % num_heads or hv % num_heads:
        raise ValueError(f"{PLUGIN_ID}: channel widths {hq}, {hv} are not divisible by num_heads={num_heads}")
    kernel = ptx_for(arch, dtype, hq // num_heads, hv // num_heads, float(scale))
    ptx, scalars = trt_abi(kernel)
    return AotLaunch(name=kernel.name, ptx=ptx, grid=launch_grid(batch, m, num_heads, kernel.block_m),
                     block=kernel.num_warps * 32, shared_mem=kernel.shared_bytes, scalars=tuple(scalars),
                     scalar_values=scalar_values(m, n, num_heads, hq, hv), kernel=kernel)


# ---------------------------------------------------------------------------------------------
# The TensorRT side (imported lazily; nothing here runs without TensorRT).
#
# TensorRT checks both functions' signatures when they are registered (tensorrt/plugin/_validate.py):
# ``register``'s needs TensorDesc annotations on the tensors, serializable types on the attributes and
# a TensorDesc return; ``aot_impl``'s must be (tensors, the attributes it uses, outputs, tactic) and
# needs a return annotation tuple[str|bytes, str|bytes, KernelLaunchParams, a SymExprs type]. The
# annotations that name ``tensorrt.plugin`` classes are filled in by ``annotate`` at registration, so
# that this module imports without TensorRT.


def _desc(q, k, v, num_heads: int, scale: float):
    """Output descriptor: (B, M, H·Dv) in q's dtype."""
    from tensorrt import plugin as trtp

    return trtp.from_shape_expr((q.shape_expr[0], q.shape_expr[1], v.shape_expr[2]), dtype=q.dtype)


def _aot(q, k, v, num_heads: int, scale: float, outputs, tactic: int):
    """The AOT implementation TensorRT calls while building an engine: the kernel's name, its PTX in
    TensorRT's calling convention, the launch parameters and the int32 scalars (``aot_launch``)."""
    import tensorrt as trt
    from tensorrt import plugin as trtp

    dtypes = {trt.float32: "float32", trt.float16: "float16"}
    if q.dtype not in dtypes or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{PLUGIN_ID}: q, k, v must all be float32 or all float16 (the kernel's types)")
    if "arch" not in _REGISTERED:
        raise RuntimeError(f"{PLUGIN_ID}: register(arch) was not called")
    hq, hv = _static(q.shape_expr[2], "H*Dqk"), _static(v.shape_expr[2], "H*Dv")
    launch = aot_launch(_REGISTERED["arch"], dtypes[q.dtype], q.shape_expr[0], q.shape_expr[1], k.shape_expr[1], hq, hv,
                        num_heads, scale)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = launch.grid
    params.block_x = launch.block
    params.shared_mem = launch.shared_mem
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(launch.scalar_values[p]) for p in launch.scalars])
    return launch.name.encode(), launch.ptx.encode(), params, extra


def annotate(trtp) -> None:
    """Give ``_desc`` and ``_aot`` the annotations TensorRT's registration reads, from ``trtp`` (the
    ``tensorrt.plugin`` module, or a stand-in with the same class names in tests)."""
    tensors = {name: trtp.TensorDesc for name in ("q", "k", "v")}
    _desc.__annotations__ = {**tensors, "num_heads": int, "scale": float, "return": trtp.TensorDesc}
    _aot.__annotations__ = {**tensors, "num_heads": int, "scale": float, "outputs": Tuple[trtp.TensorDesc],
                            "tactic": int,
                            "return": Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                            trtp.SymIntExprs]}


def register(arch: int) -> None:
    """Register the plugin for a GPU of compute capability ``arch`` (e.g. 80, 90) with TensorRT.

    The AOT implementation runs while TensorRT builds an engine; the PTX it returns is compiled
    for ``arch``. Registering twice for the same arch is a no-op; a different arch is refused
    (TensorRT keeps one definition per plugin id in a process). Each of the two registrations is
    recorded as it succeeds, so a call that failed half-way can be retried: TensorRT refuses a
    second ``register`` of the same id ("already has a definition").
    """
    if _REGISTERED.get("aot_impl"):
        if _REGISTERED["arch"] != arch:
            raise RuntimeError(f"{PLUGIN_ID} is registered for sm_{_REGISTERED['arch']}, not sm_{arch}")
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from ..errors import DeployCompError

    if not hasattr(trtp, "aot_impl"):
        raise DeployCompError(f"TokenCluster needs TensorRT >= 10.9 (AOT plugins); this is {trt.__version__}")
    try:
        from . import token_cluster  # noqa: F401
    except ImportError as exc:
        raise DeployCompError(f"TokenCluster's TensorRT plugin needs Triton for its kernel ({exc}): "
                              "pip install 'deploycomp[tensorrt]'") from None

    annotate(trtp)
    if not _REGISTERED.get("register"):
        trtp.register(PLUGIN_ID)(_desc)
        _REGISTERED["register"] = True
    _REGISTERED["arch"] = arch  # read by _aot, which TensorRT calls at engine build time
    trtp.aot_impl(PLUGIN_ID)(_aot)
    _REGISTERED["aot_impl"] = True


def _static(expr, what: str) -> int:
    if expr.is_fake or not expr.is_constant:
        raise ValueError(f"{PLUGIN_ID}: the {what} axis must be static to pick a kernel")
    return expr.constant_value()
