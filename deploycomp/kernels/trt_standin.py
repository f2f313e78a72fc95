"""A stand-in for the few parts of ``tensorrt`` / ``tensorrt.plugin`` the TokenCluster plugin touches.

Why: TensorRT cannot be installed on the machines this project runs on (no GPU; the GPU machine
has no downloads). With this stand-in the plugin's own code — ``trt_plugin.register`` and the AOT
implementation ``_aot`` — runs unchanged: the tests check on CPU that TensorRT would accept the
registration, and ``scripts/gpu_check.py`` launches the PTX with exactly the grid, block, shared
memory and arguments ``_aot`` returns.

What it mimics, from TensorRT's ``tensorrt/plugin`` sources (10.9 to 11.x) and NVIDIA's
``samples/python/quickly_deployable_plugins``:

* ``register(id)``: every parameter annotated; tensor descriptors first (``TensorDesc``), then
  attributes of serializable types (here int/float/bool/str/bytes); return ``TensorDesc`` or a tuple
  of them. A second definition of the same id is refused ("already has a definition").
* ``aot_impl(id)``: the id must be registered; the parameters must be exactly
  ``(tensors, the attributes it uses in registration order, outputs, tactic)``; annotations, when
  given, must agree with the registration (``outputs``: a tuple of ``TensorDesc``; ``tactic``: int);
  a return annotation is required: a 4-tuple ``(str|bytes, str|bytes, KernelLaunchParams, a
  SymExprs subclass)``.
* ``ShapeExpr``: ``+ - * //`` with the expression on the left only (no reflected operators),
  ``is_constant``, ``is_fake``, ``constant_value()``; ``KernelLaunchParams`` (grid/block, shared
  memory); ``SymInt32``; ``SymIntExprs.from_tuple``.

The checks are written from the documented rules, not copied. ``installed()`` puts the stand-in in
``sys.modules`` for the duration of a ``with`` block (and a fresh plugin registry with it).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
import typing
from typing import Iterator

SERIALIZABLE = (int, float, bool, str, bytes)


class DataType:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"DataType.{self.name.upper()}"


float32, float16, bfloat16 = DataType("float32"), DataType("float16"), DataType("bfloat16")


class ShapeExpr:
    """An int that behaves like TensorRT's symbolic shape expression (left-hand operators only)."""

    def __init__(self, value: int, constant: bool = True, fake: bool = False):
        self.value, self.is_constant, self.is_fake = int(value), constant, fake

    def _op(self, other, f):
        if isinstance(other, ShapeExpr):
            return ShapeExpr(f(self.value, other.value), self.is_constant and other.is_constant)
        if not isinstance(other, int):
            raise TypeError(f"ShapeExpr supports int or ShapeExpr operands, not {type(other).__name__}")
        return ShapeExpr(f(self.value, other), self.is_constant)

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._op(other, lambda a, b: a - b)

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b)

    def constant_value(self) -> int:
        if not self.is_constant:
            raise ValueError("not a constant expression")
        return self.value

    def __repr__(self) -> str:
        return f"ShapeExpr({self.value})"


class TensorDesc:
    def __init__(self, shape, dtype: DataType, constant_axes: tuple[int, ...] | None = None):
        """``shape``: ints; every axis is a constant expression unless ``constant_axes`` lists which are."""
        self.shape_expr = tuple(ShapeExpr(d, constant_axes is None or i in constant_axes) for i, d in enumerate(shape))
        self.dtype = dtype


def from_shape_expr(shape_expr, dtype: DataType) -> TensorDesc:
    desc = TensorDesc((), dtype)
    desc.shape_expr = tuple(shape_expr)
    return desc


class KernelLaunchParams:
    def __init__(self):
        self.grid_x = self.grid_y = self.grid_z = 1
        self.block_x = self.block_y = self.block_z = 1
        self.shared_mem = 0


class SymExprs(tuple):
    pass


class SymInt32:
    def __init__(self, value):
        self.value = value


class SymIntExprs(SymExprs):
    @classmethod
    def from_tuple(cls, values) -> "SymIntExprs":
        if not all(isinstance(v, SymInt32) for v in values):
            raise TypeError("SymIntExprs.from_tuple takes SymInt32 values")
        return cls(values)


def value_of(expr) -> int:
    """The value at run time of an int, a ShapeExpr or a SymInt32 (what TensorRT resolves when it
    launches what ``_aot`` returned; a non-constant ShapeExpr here carries its run-time value)."""
    if isinstance(expr, SymInt32):
        expr = expr.value
    return expr.value if isinstance(expr, ShapeExpr) else int(expr)


class PluginDef:
    def __init__(self, tensors: list[str], attrs: dict[str, type], desc_fn):
        self.tensors, self.attrs, self.desc_fn = tensors, attrs, desc_fn
        self.aot_fn = None


class Registry:
    def __init__(self):
        self.plugins: dict[str, PluginDef] = {}

    def register(self, plugin_id: str):
        def decorate(fn):
            if plugin_id in self.plugins:
                raise ValueError(f"plugin '{plugin_id}' already has a definition")
            self.plugins[plugin_id] = _check_register(fn)
            return fn
        return decorate

    def aot_impl(self, plugin_id: str):
        def decorate(fn):
            plugin = self.plugins.get(plugin_id)
            if plugin is None:
                raise ValueError(f"plugin '{plugin_id}' is not registered")
            if plugin.aot_fn is not None:
                raise ValueError(f"plugin '{plugin_id}' already has an aot_impl")
            _check_aot_impl(fn, plugin)
            plugin.aot_fn = fn
            return fn
        return decorate


def _is_class(a, base) -> bool:
    return inspect.isclass(a) and issubclass(a, base)


def _check_register(fn) -> PluginDef:
    sig = inspect.signature(fn)
    tensors, attrs = [], {}
    for name, param in sig.parameters.items():
        if param.annotation is inspect.Parameter.empty:
            raise ValueError(f"register: argument '{name}' has no type annotation")
        if _is_class(param.annotation, TensorDesc):
            if attrs:
                raise ValueError("register: tensor descriptors must come before the attributes")
            tensors.append(name)
        elif param.annotation in SERIALIZABLE:
            if name in ("outputs", "stream", "tactic"):
                raise ValueError(f"register: '{name}' cannot be an attribute name")
            attrs[name] = param.annotation
        else:
            raise ValueError(f"register: attribute '{name}' has type {param.annotation!r}, not a serializable type")
    ret = sig.return_annotation
    outs = typing.get_args(ret) if typing.get_origin(ret) is tuple else (ret,)
    if ret is inspect.Parameter.empty or not all(_is_class(a, TensorDesc) for a in outs):
        raise ValueError(f"register: return annotation must be TensorDesc or a tuple of them, not {ret!r}")
    return PluginDef(tensors, attrs, fn)


def _str_or_bytes(annotation) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(a in (str, bytes) for a in typing.get_args(annotation))
    return annotation in (str, bytes)


def _check_aot_impl(fn, plugin: PluginDef) -> None:
    sig = inspect.signature(fn)
    names = list(sig.parameters)
    used = [a for a in plugin.attrs if a in names]
    expected = [*plugin.tensors, *used, "outputs", "tactic"]
    if names != expected:
        raise ValueError(f"aot_impl: signature ({', '.join(names)}) does not match ({', '.join(expected)})")
    for name, param in sig.parameters.items():
        a = param.annotation
        if a is inspect.Parameter.empty:
            continue
        if name == "outputs":
            if typing.get_origin(a) is not tuple or not all(_is_class(x, TensorDesc) for x in typing.get_args(a)):
                raise ValueError(f"aot_impl: 'outputs' must be Tuple[TensorDesc], not {a!r}")
        elif name == "tactic":
            if not _is_class(a, int):
                raise ValueError("aot_impl: 'tactic' must be an int")
        elif name in plugin.tensors:
            if not _is_class(a, TensorDesc):
                raise ValueError(f"aot_impl: tensor '{name}' must be a TensorDesc, not {a!r}")
        elif a is not plugin.attrs[name]:
            raise ValueError(f"aot_impl: attribute '{name}' is {a!r}, registered as {plugin.attrs[name]!r}")
    ret = sig.return_annotation
    if ret is inspect.Parameter.empty:
        raise ValueError("aot_impl: no return annotation")
    args = typing.get_args(ret)
    if (typing.get_origin(ret) is not tuple or len(args) != 4 or not _str_or_bytes(args[0])
            or not _str_or_bytes(args[1]) or not _is_class(args[2], KernelLaunchParams)
            or not _is_class(args[3], SymExprs)):
        raise ValueError(f"aot_impl: return annotation {ret!r} is not (str|bytes, str|bytes, KernelLaunchParams, "
                         "SymExprs)")


def modules(version: str = "10.9.0") -> tuple[types.ModuleType, types.ModuleType]:
    """Fresh ``tensorrt`` and ``tensorrt.plugin`` stand-in modules with an empty plugin registry."""
    registry = Registry()
    plugin = types.ModuleType("tensorrt.plugin")
    for name in ("TensorDesc", "KernelLaunchParams", "SymExprs", "SymIntExprs", "SymInt32", "ShapeExpr",
                 "from_shape_expr"):
        setattr(plugin, name, globals()[name])
    plugin.register, plugin.aot_impl, plugin.registry = registry.register, registry.aot_impl, registry
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.plugin = version, plugin
    trt.float32, trt.float16, trt.bfloat16 = float32, float16, bfloat16
    return trt, plugin


@contextlib.contextmanager
def installed(version: str = "10.9.0") -> Iterator[types.ModuleType]:
    """``import tensorrt`` / ``tensorrt.plugin`` give the stand-in inside the block; yields the plugin
    module (its ``registry`` holds what was registered). Restores whatever was there before."""
    trt, plugin = modules(version)
    saved = {name: sys.modules.get(name) for name in ("tensorrt", "tensorrt.plugin")}
    sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, plugin
    try:
        yield plugin
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
