"""Translate a ``torch.export`` program (ATen operations) into a :class:`~lipbound.graph.GraphNetwork`.

The exported graph is what the module's code actually computes: functional calls, overridden ``forward``
methods, parametrised weights and hooks all appear as ATen operations. Each operation is mapped exactly:

* computations on parameters and buffers only (weight normalisations, spectral-norm parametrisations) are
  evaluated here, in the module's own dtype, as the module does at inference;
* pure data movement (view, flatten, permute, slicing, padding, concatenation, splitting) becomes a selection
  matrix found by running the operation on a tensor of indices (exact, whatever the operation);
* linear layers, convolutions, pooling, batch normalisation (eval), sums and constant scalings become linear
  operators, with a rigorous entrywise bound where an exact coefficient is not a float (``1/9``,
  ``gamma / sqrt(var + eps)``);
* activations become slope-restricted nodes; ``sort``/``max``/``min``/``maximum`` and max pooling become
  GroupSort nodes between selections (max pooling = copy each window, sort it, keep its last entry).

Everything else is reported, all offending nodes at once, in one :class:`~lipbound.errors.UnsupportedLayerError`.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import scipy.sparse as sp
import torch

from lipbound.activations import ActivationSpec
from lipbound.errors import NetworkError, UnsupportedLayerError
from lipbound.graph import Conv, GraphBuilder, GraphNetwork, LinearMap
from lipbound.importers.common import NodeValue as _T
from lipbound.importers.common import U as _U
from lipbound.importers.common import Unrepresentable as _Unsupported
from lipbound.importers.common import batchnorm_affine, is_identity_selection, linear_map_of, selection
from lipbound.importers.common import expand as _expand
from lipbound.importers.common import pool_windows as _pool_windows
from lipbound.importers.common import size_of as _size
from lipbound.network import GroupSortLayer, HouseholderLayer, SlopeRestricted

log = logging.getLogger("lipbound")

aten = torch.ops.aten


@dataclass(frozen=True)
class _Multi:
    """A tuple-valued data-movement result (split, chunk, unbind): ``fn(t)[i]`` selects one part."""

    source: _T
    fn: object


@dataclass(frozen=True)
class _Sorted:
    """``sort``/``max``/``min`` outputs: the GroupSort node of ``source`` along ``dim`` and which part is kept."""

    values: _T | None
    what: str


_HINTS = {
    "softmax": "softmax/log_softmax are not supported: certify the logits (the model without its final softmax).",
    "layer_norm": "LayerNorm/GroupNorm/InstanceNorm divide by a data-dependent norm and are not Lipschitz-certifiable "
                  "by LipSDP-type methods; BatchNorm in eval mode is supported.",
    "attention": "attention and products of two input-dependent tensors are not supported.",
    "control": "comparisons and masks (data-dependent control flow) are not supported; write the activation as a "
               "module lipbound knows (e.g. lipbound.nn.Householder, GroupSort) or a supported function.",
}

_HINT_OF = {
    "softmax": "softmax", "_softmax": "softmax", "log_softmax": "softmax", "_log_softmax": "softmax",
    "layer_norm": "layer_norm", "native_layer_norm": "layer_norm", "group_norm": "layer_norm",
    "native_group_norm": "layer_norm", "instance_norm": "layer_norm", "rms_norm": "layer_norm",
    "scaled_dot_product_attention": "attention", "bmm": "attention", "baddbmm": "attention", "einsum": "attention",
    "where": "control", "gt": "control", "lt": "control", "ge": "control", "le": "control", "eq": "control",
    "ne": "control", "masked_fill": "control", "sign": "control",
}

_IDENTITY_OPS = {"clone", "contiguous", "alias", "detach", "_to_copy", "to", "type_as", "lift_fresh_copy",
                 "_assert_tensor_metadata", "dropout_eval"}
_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "silu": "silu", "mish": "mish"}


def _name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _namespace(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[0]
    return ""


def _arguments(node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    target = node.target
    out = {}
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema.arguments
        for i, arg in enumerate(schema):
            if i < len(node.args) and not arg.kwarg_only:
                out[arg.name] = node.args[i]
            elif arg.name in node.kwargs:
                out[arg.name] = node.kwargs[arg.name]
            elif arg.has_default_value():
                out[arg.name] = arg.default_value
        return out
    for i, a in enumerate(node.args):
        out[i] = a
    out.update(node.kwargs)
    return out


class AtenTranslator:
    """Walks an exported program's graph and builds the network; see the module docstring.

    Parameters
    ----------
    program : torch.export.ExportedProgram
    name : str
    custom : dict, optional
        Handlers of lipbound's own custom operators (``lipbound::...``), by operator name.
    """

    def __init__(self, program, name: str, custom: dict | None = None):
        self.program = program
        self.name = name
        self.custom = custom or {}
        self.unsupported: list[tuple[str, str]] = []
        self.hints: set[str] = set()
        self.values: dict = {}
        self.sorts: dict = {}
        self.builder: GraphBuilder | None = None
        self.batch = None
        self.folded = 0

    # -- entry ----------------------------------------------------------------------------------------
    def translate(self) -> GraphNetwork:
        graph = self.program.graph
        sig = self.program.graph_signature
        consts = dict(self.program.state_dict)
        consts.update(getattr(self.program, "constants", {}) or {})
        lifted = {}
        for spec in sig.input_specs:
            if spec.target is not None and spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR",
                                                                "CUSTOM_OBJ"):
                lifted[spec.arg.name] = spec.target
        user_inputs = [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"]
        if len(user_inputs) != 1:
            raise UnsupportedLayerError([(self.name, f"{len(user_inputs)} inputs")],
                                        "lipbound certifies models with exactly one input tensor.")
        for node in graph.nodes:
            if node.op == "placeholder":
                if node.name in lifted:
                    value = consts.get(lifted[node.name])
                    if value is None:
                        raise NetworkError(f"exported program: no value for '{lifted[node.name]}'.")
                    self.values[node] = value.detach()
                    continue
                val = node.meta.get("val")
                if val is None or not hasattr(val, "shape") or len(val.shape) < 2:
                    raise UnsupportedLayerError([(node.name, f"input of shape {getattr(val, 'shape', '?')}")],
                                                "the model's input must have a batch dimension (batch, ...).")
                self.batch = val.shape[0]
                shape = tuple(int(s) for s in val.shape[1:])
                self.builder = GraphBuilder(shape)
                self.values[node] = _T(0, shape)
            elif node.op == "call_function":
                if not node.users:
                    continue  # dead code (e.g. the unused indices of a sort)
                try:
                    self.values[node] = self._call(node)
                except _Downstream:
                    self.values[node] = _FAILED
                except _Unsupported as exc:
                    self._refuse(node, str(exc))
                    # Carry on with a stand-in of the right shape, so that every later node is checked too and
                    # all offending nodes are reported at once (the stand-in graph is never returned).
                    self.values[node] = self._stand_in(node)
            elif node.op == "get_attr":
                self.values[node] = getattr(self.program.graph_module, node.target)
            elif node.op == "output":
                outs = node.args[0]
                outs = outs if isinstance(outs, (tuple, list)) else [outs]
                if len(outs) != 1:
                    raise UnsupportedLayerError([(self.name, f"{len(outs)} outputs")],
                                                "lipbound certifies models that return one tensor.")
                result = self.values.get(outs[0])
        if self.unsupported:
            hint = " ".join(_HINTS[h] for h in sorted(self.hints))
            raise UnsupportedLayerError(self.unsupported, hint)
        if not isinstance(result, _T):
            raise NetworkError(f"{self.name}: the output does not depend on the input: nothing to bound.")
        out = result.node
        if out == 0:
            raise NetworkError(f"{self.name}: the output is the input itself (Lipschitz constant 1); nothing to bound.")
        if self.folded:
            log.info("import %s: %d parameter-only computation(s) evaluated (weight parametrisations)", self.name,
                     self.folded)
        return self.builder.build(out, name=self.name)

    def _stand_in(self, node):
        def one(val):
            if not hasattr(val, "shape") or len(val.shape) == 0 or val.shape[0] != self.batch:
                return _FAILED
            shape = tuple(int(s) for s in val.shape[1:])
            mat = sp.csr_matrix((_size(shape), self.builder.nodes[0].size if self.builder else 1))
            idx = self.builder.node(LinearMap(mat, kind="unsupported"), [0], f"{node.name}_stand_in", shape)
            return _T(idx, shape)
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return tuple(one(v) for v in val)
        return one(val)

    def _refuse(self, node, what: str) -> None:
        self.unsupported.append((_source_name(node), what))
        hint = _HINT_OF.get(_name(node.target))
        if hint:
            self.hints.add(hint)

    # -- dispatch -------------------------------------------------------------------------------------
    def _call(self, node):
        target = node.target
        args = [self._value(a) for a in node.args]
        kwargs = {k: self._value(v) for k, v in node.kwargs.items()}
        if target is operator.getitem:
            return self._getitem(node, args)
        flat = _flatten_args(args) + _flatten_args(list(kwargs.values()))
        if any(v is _FAILED for v in flat):
            raise _Downstream()
        if not any(isinstance(v, (_T, _Multi, _Sorted)) for v in flat):
            return self._fold(node, target, args, kwargs)
        op = _name(target)
        if _namespace(target) == "lipbound":
            handler = self.custom.get(op)
            if handler is None:
                raise _Unsupported(f"custom operator lipbound::{op}")
            return handler(self, node, args)
        a = self._bind(node, args, kwargs)
        method = getattr(self, f"_op_{op}", None)
        if method is not None:
            return method(node, a)
        if op in _IDENTITY_OPS:
            return a[next(iter(a))]
        if op in _ACTIVATIONS:
            return self._activation(a["self"], ActivationSpec(_ACTIVATIONS[op]), node)
        raise _Unsupported(f"{_namespace(target) + '::' if _namespace(target) else ''}{op}")

    def _value(self, a):
        if isinstance(a, torch.fx.Node):
            return self.values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self._value(x) for x in a)
        return a

    def _bind(self, node, args, kwargs) -> dict:
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            out = {}
            for i, arg in enumerate(target._schema.arguments):
                if i < len(args) and not arg.kwarg_only:
                    out[arg.name] = args[i]
                elif arg.name in kwargs:
                    out[arg.name] = kwargs[arg.name]
                elif arg.has_default_value():
                    out[arg.name] = arg.default_value
            return out
        return {i: a for i, a in enumerate(args)} | kwargs

    def _fold(self, node, target, args, kwargs):
        """A computation on constants only: evaluate it now, as the module does at inference."""
        self.folded += 1
        with torch.no_grad():
            return target(*args, **kwargs)

    # -- helpers to add nodes -------------------------------------------------------------------------
    def _add(self, op, inputs, name, shape) -> _T:
        idx = self.builder.node(op, [t.node for t in inputs], name, shape)
        return _T(idx, tuple(shape))

    def _activation(self, x: _T, spec: ActivationSpec, node) -> _T:
        layer = SlopeRestricted(spec, x.size, name=_source_name(node))
        return self._add(layer, [x], _source_name(node), x.shape)

    def _linear(self, x: _T, matrix, bias, node, shape, err=None, kind="linear", bias_err=None) -> _T:
        op = LinearMap(matrix, bias, err, bias_err, kind=kind)
        return self._add(op, [x], _source_name(node), shape)

    def _out_shape(self, node) -> tuple[int, ...]:
        val = node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            raise _Unsupported("no shape information")
        self._check_batch(val.shape, node)
        return tuple(int(s) for s in val.shape[1:])

    def _check_batch(self, shape, node) -> None:
        if len(shape) == 0 or (shape[0] != self.batch):
            raise _Unsupported(f"operation changes the batch dimension (shape {tuple(shape)})")

    # -- data movement by index tensors ---------------------------------------------------------------
    def _gather(self, inputs: list, fn, node, name_suffix: str = ""):
        """The result of the pure data-movement function ``fn`` (of tensors with a batch dimension) applied to
        ``inputs`` (``_T`` or constant tensors), as a selection of the flat concatenation of the ``_T`` inputs plus
        a constant vector. Returns a ``_T``."""
        out_shape, mat, const = selection(inputs, fn)
        total = mat.shape[1]
        graph_inputs = [t for t in inputs if isinstance(t, _T)]
        if not graph_inputs:
            raise _Unsupported("no input-dependent operand")
        if len(graph_inputs) == 1:
            base_t = graph_inputs[0]
        else:
            base_t = self._add(_concat_op(), graph_inputs, _source_name(node) + "_cat", (total,))
        if is_identity_selection(mat, const):
            return _T(base_t.node, out_shape)
        return self._linear(base_t, mat, const, node, out_shape, kind="gather")

    def _movement(self, node, a):
        """Map a node whose op is pure data movement: rerun its ATen op on index tensors."""
        target = node.target
        tensors, rebuild = [], []
        for key, v in a.items():
            if isinstance(v, _T):
                tensors.append(v)
                rebuild.append(key)

        def fn(*ts):
            kw = dict(a)
            for key, t in zip(rebuild, ts, strict=True):
                kw[key] = t
            return _call_schema(target, kw)
        return self._gather(tensors, fn, node)

    _op_view = _op_reshape = _op__unsafe_view = _op_flatten = _op_unflatten = _movement
    _op_squeeze = _op_unsqueeze = _op_permute = _op_transpose = _op_t = _op_expand = _movement
    _op_slice = _op_select = _op_narrow = _op_flip = _op_repeat = _op_roll = _op_movedim = _movement
    _op_constant_pad_nd = _op_pad = _op_pixel_shuffle = _op_pixel_unshuffle = _op_index_select = _movement
    _op_unfold = _op_expand_as = _op_view_as = _op_reshape_as = _op_squeeze_copy = _op_view_copy = _movement
    _op_channel_shuffle = _op_tile = _op_diagonal = _movement

    def _op_cat(self, node, a):
        tensors = list(a["tensors"])
        dim = a["dim"]
        if not any(isinstance(t, _T) for t in tensors):
            raise _Unsupported("concatenation of constants")
        return self._gather(tensors, lambda *ts: torch.cat(list(ts), dim), node)

    def _op_stack(self, node, a):
        tensors = list(a["tensors"])
        dim = a["dim"]
        return self._gather(tensors, lambda *ts: torch.stack(list(ts), dim), node)

    def _op_split(self, node, a):
        return _Multi(a["self"], lambda t: _call_schema(node.target, dict(a, self=t)))

    _op_split_with_sizes = _op_chunk = _op_unbind = _op_tensor_split = _op_split

    def _getitem(self, node, args):
        src, i = args
        if isinstance(src, _Multi):
            return self._gather([src.source], lambda t: src.fn(t)[i], node)
        if isinstance(src, _Sorted):
            if i == 0:
                return src.values
            raise _Unsupported("sort/max/min indices (argmax-type outputs are not Lipschitz)")
        if isinstance(src, (tuple, list)):
            return src[i]
        raise _Unsupported("item of a non-tuple value")

    # -- linear operators -----------------------------------------------------------------------------
    def _const(self, v, what: str) -> np.ndarray:
        if isinstance(v, _T):
            raise _Unsupported(f"{what} depends on the input (a product of two input-dependent tensors)")
        return torch.as_tensor(v).detach().to(torch.float64).cpu().numpy()

    def _matmul_last(self, x: _T, w: np.ndarray, b: np.ndarray | None, node, kind="linear") -> _T:
        """``x @ w.T + b`` on the last dimension of ``x`` (``w`` is (out, in))."""
        if x.shape[-1] != w.shape[1]:
            raise _Unsupported(f"matrix of shape {w.shape} applied to a tensor of shape {x.shape}")
        lead = _size(x.shape[:-1])
        out_shape = x.shape[:-1] + (w.shape[0],)
        bias = None if b is None else np.broadcast_to(b, out_shape).reshape(-1)
        if lead == 1:
            return self._linear(x, w, bias, node, out_shape, kind=kind)
        mat = sp.kron(sp.identity(lead, format="csr"), sp.csr_matrix(w), format="csr")
        return self._linear(x, mat, bias, node, out_shape, kind=kind)

    def _op_linear(self, node, a):
        x = a["input"]
        w = self._const(a["weight"], "the weight")
        b = None if a.get("bias") is None else self._const(a["bias"], "the bias")
        return self._matmul_last(x, w, b, node)

    def _op_addmm(self, node, a):
        x, w, b = a["mat1"], a["mat2"], a["self"]
        if not isinstance(x, _T):
            raise _Unsupported("addmm with the input on the right")
        beta, alpha = a.get("beta", 1), a.get("alpha", 1)
        w = self._const(w, "the weight").T * float(alpha)
        return self._matmul_last(x, w, float(beta) * self._const(b, "the bias"), node)

    def _op_mm(self, node, a):
        if not isinstance(a["self"], _T):
            raise _Unsupported("matrix product with the input on the right")
        return self._matmul_last(a["self"], self._const(a["mat2"], "the weight").T, None, node)

    _op_matmul = _op_mm

    def _op_mv(self, node, a):
        raise _Unsupported("matrix-vector product with an input-dependent operand")

    def _op_convolution(self, node, a):
        if a.get("transposed"):
            raise _Unsupported("transposed convolution")
        if any(int(p) for p in (a.get("output_padding") or [])):
            raise _Unsupported("convolution with output_padding")
        return self._conv(node, a["input"], a["weight"], a.get("bias"), a["stride"], a["padding"], a["dilation"],
                          a["groups"])

    def _op_conv1d(self, node, a):
        return self._conv(node, a["input"], a["weight"], a.get("bias"), a["stride"], a["padding"], a["dilation"],
                          a["groups"])

    _op_conv2d = _op_conv1d

    def _conv(self, node, x, weight, bias, stride, padding, dilation, groups):
        if not isinstance(x, _T):
            raise _Unsupported("convolution of a constant with an input-dependent kernel")
        w = self._const(weight, "the convolution kernel")
        nd = w.ndim - 2
        if len(x.shape) != nd + 1:
            raise _Unsupported(f"{nd}-D convolution of an unbatched or mis-shaped input {x.shape}")
        if isinstance(padding, str):
            if padding == "valid":
                padding = [0] * nd
            else:  # "same": torch pads (total // 2) before; symmetric only when the total is even
                dil = [int(d) for d in (dilation if len(dilation) == nd else list(dilation) * nd)]
                totals = [dil[i] * (w.shape[2 + i] - 1) for i in range(nd)]
                if any(t % 2 for t in totals):
                    raise _Unsupported("padding='same' with an even kernel (asymmetric padding)")
                padding = [t // 2 for t in totals]
        b = None if bias is None else self._const(bias, "the bias")
        op = Conv(w, b, x.shape, tuple(stride) * (nd if len(stride) == 1 else 1),
                  tuple(padding) * (nd if len(padding) == 1 else 1),
                  tuple(dilation) * (nd if len(dilation) == 1 else 1), int(groups))
        out = self._add(op, [x], _source_name(node), op.out_shape)
        if tuple(op.out_shape) != self._out_shape(node):
            raise NetworkError(f"convolution '{node.name}': computed output shape {op.out_shape} differs from torch's "
                               f"{self._out_shape(node)}.")
        return out

    def _op_batch_norm(self, node, a):
        if a.get("training"):
            raise _Unsupported("batch normalisation in training mode (certify the model in eval mode)")
        return self._batch_norm(node, a["input"], a.get("weight"), a.get("bias"), a["running_mean"], a["running_var"],
                                a["eps"])

    def _op__native_batch_norm_legit_no_training(self, node, a):
        return (self._batch_norm(node, a["input"], a.get("weight"), a.get("bias"), a["running_mean"],
                                 a["running_var"], a["eps"]), None, None)

    def _batch_norm(self, node, x, weight, bias, mean, var, eps):
        if not isinstance(x, _T) or len(x.shape) < 1:
            raise _Unsupported("batch normalisation of an unbatched tensor")
        c = x.shape[0]
        w = np.ones(c) if weight is None else self._const(weight, "the BatchNorm weight")
        b = np.zeros(c) if bias is None else self._const(bias, "the BatchNorm bias")
        mu, v = self._const(mean, "the running mean"), self._const(var, "the running variance")
        scale, shift, scale_err, shift_err = batchnorm_affine(w, b, mu, v, eps)
        spatial = _size(x.shape[1:])
        diag = np.repeat(scale, spatial)
        n = x.size
        mat = sp.diags(diag, format="csr")
        err = sp.diags(np.repeat(scale_err, spatial), format="csr")
        return self._linear(x, mat, np.repeat(shift, spatial), node, x.shape, err=err, kind="batchnorm",
                            bias_err=np.repeat(shift_err, spatial)[:n])

    def _linear_from_torch(self, x: _T, fn, node, kind: str) -> _T:
        """A linear function with reciprocal-integer coefficients (average pooling, means), its matrix found by
        evaluating ``fn`` on basis vectors in float64; ``1/d`` entries get their rounding bound."""
        mat, err_mat, out_shape = linear_map_of(fn, x.shape, kind)
        return self._linear(x, mat, None, node, out_shape, err=err_mat, kind=kind)

    def _reduction(self, node, a, kind: str):
        x = a["self"]
        target = node.target

        def fn(t):
            kw = dict(a)
            kw["self"] = t
            return _call_schema(target, kw)
        out = self._linear_from_torch(x, fn, node, kind)
        self._check_batch((self.batch,) + out.shape, node)
        return out

    def _op_avg_pool1d(self, node, a):
        return self._reduction(node, a, "avgpool")

    _op_avg_pool2d = _op_avg_pool1d

    def _op_adaptive_avg_pool1d(self, node, a):
        return self._reduction(node, a, "adaptive_avgpool")

    _op_adaptive_avg_pool2d = _op__adaptive_avg_pool2d = _op_adaptive_avg_pool1d

    def _op_mean(self, node, a):
        if a.get("dim") is not None and any(int(d) % (len(a["self"].shape) + 1) == 0 for d in a["dim"]):
            raise _Unsupported("mean over the batch dimension")
        if a.get("dim") is None or len(a.get("dim")) == 0:
            raise _Unsupported("mean over the batch dimension")
        return self._reduction(node, a, "mean")

    def _op_sum(self, node, a):
        if a.get("dim") is None or len(a.get("dim")) == 0 or any(
                int(d) % (len(a["self"].shape) + 1) == 0 for d in a["dim"]):
            raise _Unsupported("sum over the batch dimension")
        return self._reduction(node, a, "sum")

    # -- arithmetic -----------------------------------------------------------------------------------
    def _scale(self, x: _T, c, node, err: float = 0.0) -> _T:
        from lipbound.graph import Sum

        return self._add(Sum((float(c),), (err,)), [x], _source_name(node), x.shape)

    def _elementwise(self, x: _T, c, node, divide: bool = False) -> _T:
        """``x * c`` (or ``x / c``) with a constant ``c`` broadcast against ``x``."""
        if isinstance(c, (int, float, bool)) or (isinstance(c, torch.Tensor) and c.dim() == 0):
            c = float(c)
            if divide:
                if c == 0:
                    raise _Unsupported("division by zero")
                q = 1.0 / c
                err = 0.0 if Fraction(q) * Fraction(c) == 1 else math.nextafter(
                    float(abs(Fraction(q) - 1 / Fraction(c))), math.inf)
                return self._scale(x, q, node, err)
            return self._scale(x, c, node)
        arr = self._const(c, "the factor")
        try:
            full = np.broadcast_to(arr, (1,) + x.shape)
        except ValueError:
            full = None
        if full is None or (arr.ndim == len(x.shape) + 1 and arr.shape[0] != 1):
            raise _Unsupported(f"factor of shape {arr.shape} for a tensor of shape {x.shape}")
        vals = np.array(full.reshape(-1), dtype=np.float64)
        err = None
        if divide:
            if np.any(vals == 0):
                raise _Unsupported("division by zero")
            q = 1.0 / vals
            exact = np.array([Fraction(float(a)) * Fraction(float(b)) == 1 for a, b in zip(q, vals, strict=True)])
            err = np.where(exact, 0.0, 2 * _U * np.abs(q) + np.finfo(float).tiny)
            vals = q
        return self._linear(x, sp.diags(vals, format="csr"), None, node, x.shape,
                            err=None if err is None or not np.any(err) else sp.diags(err, format="csr"),
                            kind="scale")

    def _bias(self, x: _T, c, node, sign: float = 1.0) -> _T:
        arr = self._const(c, "the offset") * sign
        if arr.ndim == len(x.shape) + 1:
            if arr.shape[0] != 1:
                raise _Unsupported(f"offset of shape {arr.shape} varies over the batch")
            arr = arr[0]
        try:
            full = np.broadcast_to(arr, x.shape).reshape(-1)
        except ValueError:
            raise _Unsupported(f"offset of shape {arr.shape} for a tensor of shape {x.shape}") from None
        return self._linear(x, sp.identity(x.size, format="csr"), full, node, x.shape, kind="bias")

    def _same_shape(self, x: _T, y: _T) -> None:
        if x.shape != y.shape:
            raise _Unsupported(f"broadcasting between input-dependent tensors of shapes {x.shape} and {y.shape}")

    def _op_add(self, node, a, sign: float = 1.0):
        from lipbound.graph import Sum

        x, y = a["self"], a["other"]
        alpha = float(a.get("alpha", 1))
        if isinstance(x, _T) and isinstance(y, _T):
            self._same_shape(x, y)
            return self._add(Sum((1.0, sign * alpha)), [x, y], _source_name(node), x.shape)
        if isinstance(x, _T):
            return self._bias(x, y, node, sign * alpha)
        # constant (+/-) alpha * y
        scaled = self._scale(y, sign * alpha, node) if sign * alpha != 1 else y
        return self._bias(scaled, x, node, 1.0)

    def _op_sub(self, node, a):
        return self._op_add(node, a, -1.0)

    def _op_rsub(self, node, a):
        return self._op_add(node, {"self": a["other"], "other": a["self"], "alpha": a.get("alpha", 1)}, -1.0)

    def _op_neg(self, node, a):
        return self._scale(a["self"], -1.0, node)

    def _op_mul(self, node, a):
        x, y = a["self"], a["other"]
        if isinstance(x, _T) and isinstance(y, _T):
            raise _Unsupported("product of two input-dependent tensors")
        if not isinstance(x, _T):
            x, y = y, x
        return self._elementwise(x, y, node)

    def _op_div(self, node, a):
        x, y = a["self"], a["other"]
        if not isinstance(x, _T) or isinstance(y, _T):
            raise _Unsupported("division by an input-dependent tensor")
        if a.get("rounding_mode") is not None:
            raise _Unsupported(f"division with rounding_mode={a['rounding_mode']!r}")
        return self._elementwise(x, y, node, divide=True)

    def _op_dropout(self, node, a):
        if a.get("train"):
            raise _Unsupported("dropout that is active at inference (F.dropout with training=True): the function is "
                               "random")
        return a["input"]

    _op_feature_dropout = _op_alpha_dropout = _op_dropout

    # -- activations ----------------------------------------------------------------------------------
    def _op_leaky_relu(self, node, a):
        return self._activation(a["self"], ActivationSpec("leaky_relu",
                                                          {"negative_slope": float(a["negative_slope"])}), node)

    def _op_elu(self, node, a):
        if float(a.get("scale", 1)) != 1 or float(a.get("input_scale", 1)) != 1:
            raise _Unsupported("ELU with scale or input_scale (SELU/CELU)")
        return self._activation(a["self"], ActivationSpec("elu", {"alpha": float(a["alpha"])}), node)

    def _op_softplus(self, node, a):
        threshold, beta = float(a.get("threshold", 20)), float(a.get("beta", 1))
        if threshold < 50:
            raise _Unsupported(f"Softplus(threshold={threshold:g}): torch switches to the identity above "
                               "threshold/beta, a jump that breaks slope restriction; use threshold >= 50")
        return self._activation(a["self"], ActivationSpec("softplus", {"beta": beta}), node)

    def _op_gelu(self, node, a):
        approximate = a.get("approximate", "none")
        if approximate == "none":
            return self._activation(a["self"], ActivationSpec("gelu"), node)
        if approximate == "tanh":
            return self._activation(a["self"], ActivationSpec("gelu_tanh"), node)
        raise _Unsupported(f"GELU(approximate={approximate!r})")

    def _op_clamp(self, node, a):
        lo, hi = a.get("min"), a.get("max")
        if hi is None and lo is not None and float(lo) == 0.0:
            return self._activation(a["self"], ActivationSpec("relu"), node)
        raise _Unsupported(f"clamp(min={lo}, max={hi}) (only clamp(min=0), i.e. ReLU)")

    _op_clamp_min = _op_clamp

    def _op_hardtanh(self, node, a):
        raise _Unsupported(f"hardtanh/relu6 (min {a.get('min_val')}, max {a.get('max_val')})")

    # -- sorting and maxima ---------------------------------------------------------------------------
    def _sort(self, x: _T, dim: int, node) -> _T:
        """GroupSort of ``x`` along logical dimension ``dim`` (ascending), same shape as ``x``."""
        nd = len(x.shape)
        d = dim % (nd + 1)
        if d == 0:
            raise _Unsupported("sorting over the batch dimension")
        d -= 1
        key = (x, d)
        if key in self.sorts:
            return self.sorts[key]
        g = x.shape[d]
        if d == nd - 1:
            out = self._add(GroupSortLayer(x.size, g, name=_source_name(node)), [x], _source_name(node), x.shape)
        else:
            moved = self._gather([x], lambda t: torch.movedim(t, d + 1, -1).contiguous(), node)
            sorted_ = self._add(GroupSortLayer(x.size, g, name=_source_name(node)), [moved], _source_name(node),
                                moved.shape)
            out = self._gather([sorted_], lambda t: torch.movedim(t, -1, d + 1).contiguous(), node)
        self.sorts[key] = out
        return out

    def _op_sort(self, node, a):
        x = a["self"]
        out = self._sort(x, int(a.get("dim", -1)), node)
        if a.get("descending"):
            out = self._gather([out], lambda t: torch.flip(t, [int(a.get("dim", -1))]), node)
        return _Sorted(out, "sort")

    def _reduce_extreme(self, node, x: _T, dim: int, keepdim: bool, largest: bool) -> _T:
        s = self._sort(x, dim, node)
        index = -1 if largest else 0
        return self._gather([s], lambda t: t.select(dim, index).unsqueeze(dim) if keepdim else t.select(dim, index),
                            node)

    def _op_max(self, node, a):
        x = a["self"]
        if "other" in a and isinstance(a.get("other"), _T):
            return self._binary_extreme(node, x, a["other"], largest=_name(node.target) == "max")
        if a.get("dim") is None:
            flat = _T(x.node, (x.size,))
            return self._reduce_extreme(node, flat, 1, False, _name(node.target) == "max")
        return _Sorted(self._reduce_extreme(node, x, int(a["dim"]), bool(a.get("keepdim")),
                                            _name(node.target) == "max"), "max")

    _op_min = _op_max

    def _op_amax(self, node, a, largest: bool = True):
        x = a["self"]
        dims = [int(d) for d in (a.get("dim") or [])]
        if not dims:
            flat = _T(x.node, (x.size,))
            return self._reduce_extreme(node, flat, 1, False, largest)
        if len(dims) != 1:
            nd = len(x.shape) + 1
            dims = sorted(d % nd for d in dims)
            keep = [i for i in range(1, nd) if i not in dims]
            moved = self._gather([x], lambda t: t.permute(0, *keep, *dims).reshape(
                t.shape[0], *[t.shape[i] for i in keep], -1), node)
            out = self._reduce_extreme(node, moved, -1, False, largest)
            if a.get("keepdim"):
                shape = tuple(1 if i in dims else x.shape[i - 1] for i in range(1, nd))
                out = _T(out.node, shape)
            return out
        return self._reduce_extreme(node, x, dims[0], bool(a.get("keepdim")), largest)

    def _op_amin(self, node, a):
        return self._op_amax(node, a, largest=False)

    def _binary_extreme(self, node, x: _T, y: _T, largest: bool) -> _T:
        self._same_shape(x, y)
        pair = self._gather([x, y], lambda s, t: torch.stack([s, t], dim=-1), node)
        return self._reduce_extreme(node, pair, -1, False, largest)

    def _op_maximum(self, node, a):
        x, y = a["self"], a["other"]
        if not (isinstance(x, _T) and isinstance(y, _T)):
            c = y if isinstance(x, _T) else x
            t = x if isinstance(x, _T) else y
            arr = self._const(c, "the bound")
            if _name(node.target) == "maximum" and np.all(arr == 0):
                return self._activation(t, ActivationSpec("relu"), node)
            raise _Unsupported(f"{_name(node.target)} with a non-zero constant")
        return self._binary_extreme(node, x, y, largest=_name(node.target) == "maximum")

    _op_minimum = _op_maximum

    def _op_max_pool1d(self, node, a):
        return self._max_pool(node, a)

    _op_max_pool2d = _op_max_pool1d

    def _op_max_pool2d_with_indices(self, node, a):
        return _Sorted(self._max_pool(node, a), "max_pool")

    _op_max_pool1d_with_indices = _op_max_pool2d_with_indices

    def _max_pool(self, node, a):
        x = a["self"]
        nd = len(x.shape) - 1
        if nd not in (1, 2):
            raise _Unsupported(f"max pooling of a tensor of shape {x.shape}")
        k = _expand(a["kernel_size"], nd)
        stride = _expand(a.get("stride") or a["kernel_size"], nd)
        pad = _expand(a.get("padding", 0), nd)
        dil = _expand(a.get("dilation", 1), nd)
        out_shape = self._out_shape(node)
        windows = _pool_windows(x.shape, out_shape, k, stride, pad, dil)  # (n_out, window) flat input indices
        n_out, w = windows.shape
        if w == 1:
            mat = sp.csr_matrix((np.ones(n_out), (np.arange(n_out), windows[:, 0])), shape=(n_out, x.size))
            return self._linear(x, mat, None, node, out_shape, kind="gather")
        rows = np.arange(n_out * w)
        copy = sp.csr_matrix((np.ones(rows.size), (rows, windows.reshape(-1))), shape=(rows.size, x.size))
        copied = self._linear(x, copy, None, node, (n_out * w,), kind="maxpool_windows")
        sorted_ = self._add(GroupSortLayer(n_out * w, w, name=_source_name(node)), [copied], _source_name(node),
                            (n_out * w,))
        pick = sp.csr_matrix((np.ones(n_out), (np.arange(n_out), np.arange(n_out) * w + w - 1)),
                             shape=(n_out, n_out * w))
        return self._linear(sorted_, pick, None, node, out_shape, kind="maxpool_select")

    # -- lipbound's own operators ---------------------------------------------------------------------
    def householder(self, x: _T, vectors: np.ndarray, dim: int, node, pairs: str = "consecutive") -> _T:
        """Householder activation along logical ``dim`` (groups of ``vectors.shape[1]`` consecutive features, or
        ``pairs="halves"``: feature ``i`` paired with ``i + C/2``, as deel-torchlip does)."""
        nd = len(x.shape)
        d = dim % (nd + 1) - 1
        if d < 0:
            raise _Unsupported("Householder over the batch dimension")
        g = vectors.shape[1]
        c = x.shape[d]
        if pairs == "halves":
            order = lambda t: torch.stack(torch.split(t, c // 2, dim=d + 1), dim=d + 2).flatten(d + 1, d + 2)  # noqa: E731
            x = self._gather([x], lambda t: order(t), node)
        moved = self._gather([x], lambda t: torch.movedim(t, d + 1, -1).contiguous(), node)
        n_groups_per_fibre = c // g
        fibres = moved.size // c
        vecs = np.tile(vectors.reshape(n_groups_per_fibre, g), (fibres, 1))
        act = self._add(HouseholderLayer(vecs, name=_source_name(node)), [moved], _source_name(node), moved.shape)
        back = self._gather([act], lambda t: torch.movedim(t, -1, d + 1).contiguous(), node)
        if pairs == "halves":
            shape = back.shape

            def unorder(t):
                pairs_ = t.unflatten(d + 1, (c // 2, 2))
                return torch.cat([pairs_.select(d + 2, 0), pairs_.select(d + 2, 1)], dim=d + 1)
            back = self._gather([_T(back.node, shape)], unorder, node)
        return back


class _Downstream(Exception):
    """Depends on a value that could not be represented (already reported)."""


_FAILED = object()


def _concat_op():
    from lipbound.graph import Concat

    return Concat()


def _source_name(node) -> str:
    """The module path a node came from (``layer1.0.conv1``), else the node's own name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            path = path.replace("L['self'].", "").replace("L__self___", "")
            return f"{path}:{node.name}"
    return node.name


def _flatten_args(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flatten_args(a))
        else:
            out.append(a)
    return out


def _call_schema(target, kw: dict):
    """Call an ATen overload with schema-named arguments."""
    args, kwargs = [], {}
    for arg in target._schema.arguments:
        if arg.name not in kw:
            continue
        if arg.kwarg_only:
            kwargs[arg.name] = kw[arg.name]
        else:
            args.append(kw[arg.name])
    return target(*args, **kwargs)
