"""Import ONNX models into the network IR, exactly, and check the result against onnxruntime.

What is read
    An ONNX file (``.onnx``, external data files beside it) or an in-memory ``onnx.ModelProto``, standard
    operators of opsets 13 to the installed onnx's newest, as written by both torch exporters
    (``torch.onnx.export(..., dynamo=False)`` and ``dynamo=True``) and most other tools. The model has one input
    whose first dimension is the batch (static or symbolic) and one output. Model-local functions are inlined.

How
    1. **Constant folding.** Everything that does not depend on the input (given the shape of one sample) is
       evaluated once with onnx's reference evaluator, in the model's own precision: ``Constant``, weight
       normalisations written as ``Div``/``Mul``/``MatMul``/``ReduceL2`` of initializers, and the
       ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains that exporters emit for a flatten with a dynamic
       batch (``Shape`` of an input-dependent tensor is known once the sample shape is). Random operators are
       refused rather than folded.
    2. **Mapping.** The rest becomes exact IR operators: ``Gemm``/``MatMul`` with a constant, ``Conv`` (1-D/2-D,
       asymmetric padding as an explicit zero-padding selection), average pooling and means (coefficients
       ``fl(1/d)`` with their rounding bound), ``BatchNormalization`` folded into a diagonal map with a rigorous
       rounding bound, pure data movement (``Reshape``, ``Flatten``, ``Transpose``, ``Slice``, ``Gather``,
       ``Split``, ``Concat``, ``Pad``, ``Squeeze``, ``Unsqueeze``, ``Expand``, ``Tile``, ...) as selections found by
       running the operator on tensors of indices, sums and constant scalings, element-wise activations, and
       ``MaxPool``/``Max``/``Min``/``ReduceMax``/``TopK`` as GroupSort between selections. Activations that
       exporters decompose are recognised: ``x * Sigmoid(x)`` (SiLU), ``x * Tanh(Softplus(x))`` (Mish) and
       ``0.5 * x * (1 + Erf(x / sqrt(2)))`` (GELU, in any order of the factors; with a rounded constant ``c`` in
       place of ``1/sqrt(2)`` it is ``GELU(k x) / k`` with ``k = sqrt(2) c``, imported as exactly that, the two
       scalings carrying rigorous error bounds).
    3. **Cross-check.** The imported network is evaluated against onnxruntime (graph optimisations off) on random
       inputs; a relative difference above 1e-6 (float64 models) or the model's precision (float32: 1e-4 of the
       output scale) is a :class:`~lipbound.errors.NetworkError`, never a silent bound. With a symbolic batch
       the check uses another batch size than the translation, so nothing batch-dependent slips through.

Everything else is refused: all offending nodes are named at once in one
:class:`~lipbound.errors.UnsupportedLayerError`, with hints (normalisation layers, softmax, products of two
input-dependent tensors such as attention, control flow). Nothing from the file is executed beyond onnx's
reference evaluation of constant subgraphs and onnxruntime's evaluation for the cross-check.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from lipbound.activations import ActivationSpec
from lipbound.errors import NetworkError, UnsupportedLayerError
from lipbound.graph import Concat, Conv, GraphBuilder, GraphNetwork, LinearMap, Sum
from lipbound.importers.common import (
    NodeValue,
    U,
    Unrepresentable,
    batchnorm_affine,
    exact_float,
    gelu_tanh_spec,
    is_identity_selection,
    linear_map_of,
    pool_windows,
    reciprocal_err,
    reciprocal_float,
    selection,
    size_of,
)
from lipbound.importers.simplify import simplify
from lipbound.network import GroupSortLayer, Network, SlopeRestricted

log = logging.getLogger("lipbound")

MIN_OPSET = 13

_FLOAT_TYPES = {1: np.float32, 11: np.float64, 10: np.float16}  # onnx.TensorProto FLOAT, DOUBLE, FLOAT16
_TOLERANCE = {np.float64: 1e-6, np.float32: 1e-4, np.float16: 5e-2}

_HINTS = {
    "softmax": "Softmax/LogSoftmax are not supported: certify the logits (the model without its final softmax).",
    "layer_norm": "LayerNormalization/InstanceNormalization/GroupNormalization divide by a data-dependent norm and "
                  "are not Lipschitz-certifiable by LipSDP-type methods; BatchNormalization (inference) is "
                  "supported.",
    "attention": "attention and products of two input-dependent tensors (MatMul/Mul/Einsum of two activations) are "
                 "not supported.",
    "control": "control flow and comparisons (If, Loop, Scan, Where, Equal, Greater, ...) depend on the data and "
               "cannot be certified; export the model without them (e.g. trace a fixed branch).",
    "domain": "operators outside the standard ONNX domain (e.g. onnxruntime's com.microsoft contrib operators from "
              "its transformer optimiser) are not supported: certify the model as exported, before such "
              "optimisations.",
    "random": "random operators make the function non-deterministic; export the model in inference mode.",
}
_HINT_OF = {
    "Softmax": "softmax", "LogSoftmax": "softmax", "Hardmax": "softmax",
    "LayerNormalization": "layer_norm", "InstanceNormalization": "layer_norm", "GroupNormalization": "layer_norm",
    "LpNormalization": "layer_norm", "MeanVarianceNormalization": "layer_norm", "RMSNormalization": "layer_norm",
    "Attention": "attention", "Einsum": "attention",
    "If": "control", "Loop": "control", "Scan": "control", "Where": "control", "Equal": "control",
    "Greater": "control", "GreaterOrEqual": "control", "Less": "control", "LessOrEqual": "control",
    "Not": "control", "And": "control", "Or": "control", "Xor": "control", "Sign": "control",
    "RandomNormal": "random", "RandomUniform": "random", "RandomNormalLike": "random",
    "RandomUniformLike": "random", "Multinomial": "random", "Bernoulli": "random",
}
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}

# Pure data movement: operator -> which inputs carry data (the others must be constant parameters).
_MOVEMENT = {
    "Reshape": (0,), "Flatten": (0,), "Transpose": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Slice": (0,),
    "Gather": (0,), "GatherElements": (0,), "GatherND": (0,), "Split": (0,), "Pad": (0, 2), "Expand": (0,),
    "Tile": (0,), "DepthToSpace": (0,), "SpaceToDepth": (0,), "Compress": (0,), "Concat": None,
}
_SIMPLE_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softplus": "softplus", "Mish": "mish"}
# Element-wise operators an unrecognised expression may pass through before it is recognised (or refused).
_EXPRESSION_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Erf"}


@dataclass(frozen=True)
class _Expr:
    """An element-wise function of input-dependent tensors that is not (yet) a graph node: the pieces of an
    activation exporters decompose (GELU's erf form). ``tree`` is ``("leaf", node)``, ``("const", Fraction)``,
    ``("add", a, b)``, ``("mul", a, b)`` or ``("erf", a)``; ``sources`` are the ONNX nodes that built it."""

    tree: tuple
    shape: tuple[int, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class _Comparison:
    """``value > threshold`` (a ``Greater`` node), kept for the one pattern that uses it: torch's Softplus
    threshold, ``Where(beta x > t, x, Softplus(beta x) / beta)``."""

    value: NodeValue
    threshold: float
    source: str


_FAILED = object()


class _AlreadyReported(Exception):
    """A node whose failure has been recorded already (an unrecognised expression among its inputs)."""


def _attributes(node) -> dict:
    import onnx

    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _label(node, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _power_of_two(c: float) -> bool:
    if c == 0 or not math.isfinite(c):
        return False
    m, _ = math.frexp(abs(c))
    return m == 0.5


def _sqrt2_interval() -> tuple[Fraction, Fraction]:
    """Floats ``lo < sqrt(2) < hi`` (checked in exact arithmetic)."""
    lo = math.sqrt(2.0)
    while Fraction(lo) ** 2 > 2:
        lo = math.nextafter(lo, 0.0)
    hi = math.nextafter(lo, math.inf)
    while Fraction(hi) ** 2 < 2:
        hi = math.nextafter(hi, math.inf)
    return Fraction(lo), Fraction(hi)


def _float_enclosing(lo: Fraction, hi: Fraction) -> tuple[float, float]:
    """A float ``f`` and ``e`` with ``[lo, hi]`` inside ``[f - e, f + e]``."""
    f = float((lo + hi) / 2)
    e = max(abs(Fraction(f) - lo), abs(Fraction(f) - hi))
    return f, math.nextafter(float(e), math.inf)


class OnnxTranslator:
    """Walks an ONNX graph (topologically sorted) and builds the network; see the module docstring.

    Parameters
    ----------
    model : onnx.ModelProto
        With external data already loaded.
    name : str
    input_shape : tuple of int, optional
        Shape of one sample, for inputs whose non-batch dimensions are symbolic.
    """

    def __init__(self, model, name: str, input_shape: Sequence[int] | None = None):
        self.model = model
        self.graph = model.graph
        self.name = name
        self.opset = _default_opset(model)
        self.values: dict[str, object] = {}
        self.unsupported: list[tuple[str, str]] = []
        self.hints: set[str] = set()
        self.builder: GraphBuilder | None = None
        self.scaled: dict[int, tuple[int, Fraction]] = {}  # node -> (source node, exact factor)
        self.activation_of: dict[int, tuple[str, int]] = {}  # node -> (activation name, source node)
        self.materialised: dict[_Expr, NodeValue] = {}
        self.folded = 0
        self.used: set[str] = set()
        self.input_name, self.sample_shape, self.batch, self.dtype, self.symbolic_batch = self._input(input_shape)

    # -- entry ----------------------------------------------------------------------------------------
    def _input(self, input_shape):
        import onnx

        init = {t.name for t in self.graph.initializer}
        inputs = [i for i in self.graph.input if i.name not in init]
        if len(inputs) != 1:
            raise UnsupportedLayerError([(self.name, f"{len(inputs)} inputs ({', '.join(i.name for i in inputs)})")],
                                        "lipbound certifies models with exactly one input tensor.")
        if len(self.graph.output) != 1:
            raise UnsupportedLayerError([(self.name, f"{len(self.graph.output)} outputs")],
                                        "lipbound certifies models that return one tensor.")
        inp = inputs[0]
        ttype = inp.type.tensor_type
        dtype = _FLOAT_TYPES.get(ttype.elem_type)
        if dtype is None:
            kind = onnx.TensorProto.DataType.Name(ttype.elem_type)
            raise UnsupportedLayerError([(inp.name, f"input of type {kind}")],
                                        "the model's input must be a floating-point tensor (float32, float64, "
                                        "float16).")
        if not ttype.HasField("shape") or len(ttype.shape.dim) < 2:
            rank = len(ttype.shape.dim) if ttype.HasField("shape") else "unknown"
            raise UnsupportedLayerError([(inp.name, f"input of rank {rank}")],
                                        "the model's input must have a batch dimension first (batch, ...).")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        symbolic_batch = dims[0] is None or dims[0] <= 0
        batch = 2 if symbolic_batch else int(dims[0])
        given = None
        if input_shape is not None:
            given = (int(input_shape),) if np.isscalar(input_shape) else tuple(int(s) for s in input_shape)
        sample = dims[1:]
        if given is not None:
            if len(given) != len(sample) or any(s is not None and s != g for s, g in zip(sample, given, strict=True)):
                raise NetworkError(f"{self.name}: input_shape {given} does not fit the model's input "
                                   f"'{inp.name}' of shape (batch, {', '.join(str(s or '?') for s in sample)}).")
            sample = list(given)
        if any(s is None or s <= 0 for s in sample):
            raise NetworkError(f"{self.name}: the input '{inp.name}' has symbolic dimensions "
                               f"(batch, {', '.join(str(s or '?') for s in sample)}); pass input_shape=... (the shape "
                               "of one sample, without the batch dimension).")
        return inp.name, tuple(int(s) for s in sample), batch, dtype, symbolic_batch

    def translate(self) -> GraphNetwork:
        import onnx

        self.builder = GraphBuilder(self.sample_shape)
        self.values[self.input_name] = NodeValue(0, self.sample_shape)
        for t in self.graph.initializer:
            if t.name != self.input_name:
                self.values[t.name] = onnx.numpy_helper.to_array(t)
        output = self.graph.output[0].name
        live = _live_nodes(self.graph, output)
        self.used = {output} | {name for i in live for name in self.graph.node[i].input if name}
        for index, node in enumerate(self.graph.node):
            if index in live:
                self._visit(node, index)
        result = self.values.get(output)
        if isinstance(result, _Expr):
            try:
                result = self._materialise(result, output)
            except Unrepresentable as exc:
                self._refuse_expr(result, str(exc))
                result = _FAILED
        if self.unsupported:
            hint = " ".join(_HINTS[h] for h in sorted(self.hints))
            raise UnsupportedLayerError(self.unsupported, hint)
        if not isinstance(result, NodeValue):
            raise NetworkError(f"{self.name}: the output does not depend on the input: nothing to bound.")
        if result.node == 0:
            raise NetworkError(f"{self.name}: the output is the input itself (Lipschitz constant 1); nothing to bound.")
        if self.folded:
            log.info("import %s: %d constant node(s) folded (weight computations, shape arithmetic)", self.name,
                     self.folded)
        return self.builder.build(result.node, name=self.name)

    # -- dispatch -------------------------------------------------------------------------------------
    def _visit(self, node, index: int) -> None:
        label = _label(node, index)
        args = []
        for name in node.input:
            if not name:
                args.append(None)
            elif name not in self.values:
                raise NetworkError(f"{self.name}: node '{label}' reads '{name}', which no earlier node produces "
                                   "(the graph is not topologically sorted or is incomplete).")
            else:
                args.append(self.values[name])
        if any(a is _FAILED for a in args):
            # Downstream of a refused node: not translatable, reported only if its operator is never supported.
            if not self._handles(node):
                self._refuse(label, node.op_type, "")
            self._set(node, [_FAILED] * len(node.output))
            return
        if node.op_type in _EXPRESSION_OPS and any(isinstance(a, _Expr) for a in args) and any(
                a is not None and not isinstance(a, (NodeValue, _Expr)) and np.asarray(a).size != 1 for a in args):
            # An expression meets a tensor of constants (a bias, per-channel factors): it must be complete here.
            try:
                args = [self._materialise(a, _label(node, index)) if isinstance(a, _Expr) else a for a in args]
            except Unrepresentable as exc:
                for a in args:
                    if isinstance(a, _Expr):
                        self._refuse_expr(a, str(exc))
                self._set(node, [_FAILED] * len(node.output))
                return
        try:
            outs = self._dispatch(node, label, args)
        except _AlreadyReported:
            outs = [_FAILED] * len(node.output)
        except Unrepresentable as exc:
            self._refuse(label, node.op_type, str(exc))
            outs = [_FAILED] * len(node.output)
        self._set(node, outs)

    def _set(self, node, outs) -> None:
        for name, value in zip(node.output, outs, strict=False):
            if name:
                self.values[name] = value

    def _handles(self, node) -> bool:
        """Whether the operator of ``node`` is mapped at all (for some inputs)."""
        return node.domain in ("", "ai.onnx") and (node.op_type in _MOVEMENT or hasattr(self, f"_op_{node.op_type}"))

    def _refuse(self, label: str, op_type: str, what: str) -> None:
        self.unsupported.append((label, f"{op_type}: {what}" if what else op_type))
        hint = _HINT_OF.get(op_type)
        if hint:
            self.hints.add(hint)

    def _refuse_expr(self, expr: _Expr, what: str) -> None:
        self.unsupported.append((", ".join(expr.sources), what))
        self.hints.add("attention")

    def _dispatch(self, node, label: str, args: list) -> list:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            self.hints.add("domain")
            raise Unrepresentable(f"operator of domain '{node.domain}'")
        if any(a.type in (5, 10) for a in node.attribute):  # GRAPH, GRAPHS: control flow with subgraphs
            self.hints.add("control")
            raise Unrepresentable("control flow (subgraph)")
        if op in _RANDOM:
            self.hints.add("random")
            raise Unrepresentable("random operator")
        attrs = _attributes(node)
        dependent = any(isinstance(a, (NodeValue, _Expr, _Comparison)) for a in args)
        if not dependent:
            return self._fold(node, args)
        if op != "Where" and any(isinstance(a, _Comparison) for a in args):
            self.hints.add("control")
            raise Unrepresentable("uses the result of a comparison (data-dependent control flow)")
        if op not in _EXPRESSION_OPS:
            for i, a in enumerate(args):
                if isinstance(a, _Expr):
                    try:
                        args[i] = self._materialise(a, label)
                    except Unrepresentable as exc:
                        self._refuse_expr(a, str(exc))
                        raise _AlreadyReported from None
        if op in _MOVEMENT:
            return self._movement(node, label, args)
        method = getattr(self, f"_op_{op}", None)
        if method is None:
            raise Unrepresentable("")
        out = method(label, args, attrs, node)
        return out if isinstance(out, list) else [out]

    def _fold(self, node, args) -> list:
        """A node on constants only: evaluate it now, in the model's precision (onnx's reference evaluator)."""
        from onnx.reference import ReferenceEvaluator

        feeds = {name: a for name, a in zip(node.input, args, strict=True) if name}
        try:
            out = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception as exc:
            raise Unrepresentable(f"could not evaluate on constants ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        self.folded += 1
        return [np.asarray(o) for o in out]

    def _evaluator(self, node):
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(node, opsets={"": self.opset})

    # -- helpers to add nodes -------------------------------------------------------------------------
    def _add(self, op, inputs: list[NodeValue], name: str, shape) -> NodeValue:
        # A per-sample scalar (shape ()) is one value: the IR's shapes are never empty.
        idx = self.builder.node(op, [t.node for t in inputs], name, tuple(shape) or (1,))
        return NodeValue(idx, tuple(shape))

    def _linear(self, x: NodeValue, matrix, bias, name: str, shape, err=None, kind="linear", bias_err=None
                ) -> NodeValue:
        return self._add(LinearMap(matrix, bias, err, bias_err, kind=kind), [x], name, shape)

    def _activation(self, x: NodeValue, spec: ActivationSpec, name: str) -> NodeValue:
        out = self._add(SlopeRestricted(spec, x.size, name=name), [x], name, x.shape)
        if not spec.params or spec.params == ActivationSpec(spec.name).params:
            self.activation_of[out.node] = (spec.name, x.node)
        return out

    def _scale(self, x: NodeValue, c: float, name: str, err: float = 0.0, exact: Fraction | None = None
               ) -> NodeValue:
        out = self._add(Sum((float(c),), (err,)), [x], name, x.shape)
        if exact is not None:
            self.scaled[out.node] = (x.node, exact)
        return out

    def _bias(self, x: NodeValue, c: np.ndarray, name: str, bias_err: np.ndarray | None = None) -> NodeValue:
        return self._linear(x, sp.identity(x.size, format="csr"), np.asarray(c, dtype=np.float64).reshape(-1), name,
                            x.shape, kind="bias", bias_err=bias_err)

    def _gather(self, operands: list, fn: Callable, name: str, batch: int | None = None) -> NodeValue:
        """The data-movement function ``fn`` (torch tensors with the batch first) of ``operands``."""
        out_shape, mat, const = selection(operands, fn, self.batch if batch is None else batch)
        deps = [t for t in operands if isinstance(t, NodeValue)]
        base = deps[0] if len(deps) == 1 else self._add(Concat(), deps, name + "_cat", (mat.shape[1],))
        if is_identity_selection(mat, const):
            return NodeValue(base.node, out_shape)
        return self._linear(base, mat, const, name, out_shape, kind="gather")

    def _full(self, x: NodeValue) -> tuple[int, ...]:
        return (self.batch,) + x.shape

    def _const(self, v, what: str) -> np.ndarray:
        if v is None:
            raise Unrepresentable(f"{what} is missing")
        if isinstance(v, (NodeValue, _Expr)):
            raise Unrepresentable(f"{what} depends on the input")
        return np.asarray(v)

    def _broadcast_to(self, x: NodeValue, full: tuple[int, ...], name: str) -> NodeValue:
        """``x`` expanded (a selection) to the full shape ``full`` (batch first)."""
        if full == self._full(x):
            return x
        if full[0] != self.batch:
            raise Unrepresentable(f"broadcasting changes the batch dimension (to {full})")
        return self._gather([x], lambda t: t.expand(*full) if t.dim() == len(full) else t.reshape(
            (t.shape[0],) + (1,) * (len(full) - t.dim()) + tuple(t.shape[1:])).expand(*full), name)

    def _against_constant(self, x: NodeValue, c: np.ndarray, name: str) -> tuple[NodeValue, np.ndarray]:
        """``x`` and the constant ``c`` broadcast to their common shape (ONNX's numpy rules, batch first): returns
        ``x`` (expanded if needed) and ``c`` as one sample's flat array."""
        full = self._full(x)
        try:
            target = np.broadcast_shapes(full, c.shape)
        except ValueError:
            raise Unrepresentable(f"constant of shape {c.shape} does not broadcast against {full}") from None
        if len(target) != len(full):
            raise Unrepresentable(f"constant of shape {c.shape} adds dimensions in front of the batch")
        c_full = np.broadcast_to(c, target)
        if target[0] != self.batch:
            raise Unrepresentable(f"constant of shape {c.shape} changes the batch dimension")
        if not np.all(c_full == c_full[:1]):
            raise Unrepresentable(f"constant of shape {c.shape} varies over the batch")
        x = self._broadcast_to(x, tuple(int(s) for s in target), name)
        return x, np.array(c_full[0], dtype=np.float64).reshape(-1)

    def _pair(self, x: NodeValue, y: NodeValue, name: str) -> tuple[NodeValue, NodeValue]:
        """Two input-dependent tensors broadcast to their common shape."""
        try:
            target = np.broadcast_shapes(self._full(x), self._full(y))
        except ValueError:
            raise Unrepresentable(f"shapes {x.shape} and {y.shape} do not broadcast") from None
        target = tuple(int(s) for s in target)
        return self._broadcast_to(x, target, name + "_x"), self._broadcast_to(y, target, name + "_y")

    # -- data movement --------------------------------------------------------------------------------
    def _movement(self, node, label: str, args: list) -> list:
        data = _MOVEMENT[node.op_type]
        positions = range(len(args)) if data is None else data
        for i, a in enumerate(args):
            if isinstance(a, NodeValue) and i not in positions:
                raise Unrepresentable(f"input {i} ('{node.input[i]}') depends on the input; only the data may")
        deps = [i for i, a in enumerate(args) if isinstance(a, NodeValue)]
        evaluator = self._evaluator(node)
        outs = []
        for k, out_name in enumerate(node.output):
            if not out_name:
                outs.append(None)
                continue

            def fn(*ids, k=k):
                feeds = {}
                it = iter(ids)
                for i, (name, a) in enumerate(zip(node.input, args, strict=True)):
                    if not name:
                        continue
                    if i in deps:
                        feeds[name] = next(it).numpy()
                    elif i in positions and np.issubdtype(np.asarray(a).dtype, np.floating):
                        feeds[name] = np.asarray(a, dtype=np.float64)
                    else:
                        feeds[name] = a
                return torch.from_numpy(np.ascontiguousarray(evaluator.run(None, feeds)[k], dtype=np.float64))
            outs.append(self._gather([args[i] for i in deps], fn, label if k == 0 else f"{label}:{k}"))
        return outs

    def _uses_extra_outputs(self, node) -> bool:
        return any(name in self.used for name in node.output[1:])

    def _op_Identity(self, label, args, attrs, node):
        return args[0]

    def _op_Cast(self, label, args, attrs, node):
        if attrs.get("to") not in _FLOAT_TYPES:
            raise Unrepresentable("cast of an input-dependent tensor to a non-floating-point type")
        return args[0]

    def _op_CastLike(self, label, args, attrs, node):
        if isinstance(args[1], NodeValue) or not np.issubdtype(np.asarray(args[1]).dtype, np.floating):
            raise Unrepresentable("cast of an input-dependent tensor to a non-floating-point type")
        return args[0]

    def _op_Dropout(self, label, args, attrs, node):
        if len(args) > 2 and args[2] is not None:
            if isinstance(args[2], NodeValue) or bool(np.asarray(args[2])):
                raise Unrepresentable("Dropout in training mode (random at inference)")
        if self._uses_extra_outputs(node):
            raise Unrepresentable("the Dropout mask output is used")
        return [args[0], None]

    def _op_Shape(self, label, args, attrs, node):
        full = np.array(self._full(args[0]), dtype=np.int64)
        start, end = attrs.get("start", 0), attrs.get("end")
        return full[start:end]

    def _op_Size(self, label, args, attrs, node):
        return np.array(size_of(self._full(args[0])), dtype=np.int64)

    # -- linear operators -----------------------------------------------------------------------------
    def _matrix_map(self, x: NodeValue, w: np.ndarray, name: str, bias=None, bias_err=None) -> NodeValue:
        """``x @ w.T`` on the last dimension of ``x`` (``w`` is (out, in)), plus ``bias`` (flat, optional)."""
        if x.shape[-1] != w.shape[1]:
            raise Unrepresentable(f"matrix of shape {w.T.shape} applied to a tensor of shape {x.shape}")
        lead = size_of(x.shape[:-1])
        out_shape = x.shape[:-1] + (w.shape[0],)
        mat = w if lead == 1 else sp.kron(sp.identity(lead, format="csr"), sp.csr_matrix(w), format="csr")
        return self._linear(x, mat, bias, name, out_shape, bias_err=bias_err)

    def _op_Gemm(self, label, args, attrs, node):
        a, b = args[0], args[1]
        c = args[2] if len(args) > 2 else None
        if not isinstance(a, NodeValue) or isinstance(b, NodeValue):
            if isinstance(a, NodeValue) and isinstance(b, NodeValue):
                self.hints.add("attention")
                raise Unrepresentable("product of two input-dependent tensors")
            raise Unrepresentable("the input-dependent operand must be A (the left one)")
        if attrs.get("transA", 0):
            raise Unrepresentable("transA=1 would mix the samples of the batch")
        if len(a.shape) != 1:
            raise Unrepresentable(f"A of shape {self._full(a)} (Gemm takes matrices)")
        w = self._const(b, "B").astype(np.float64)
        w = w if attrs.get("transB", 0) else w.T  # (out, in)
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        bias = bias_err = None
        if c is not None:
            cc = self._const(c, "C").astype(np.float64)
            try:
                cc = np.broadcast_to(cc, (self.batch, w.shape[0]) if cc.ndim == 2 else (w.shape[0],))
            except ValueError:
                raise Unrepresentable(f"C of shape {cc.shape} for an output of {w.shape[0]} features") from None
            if cc.ndim == 2:
                if not np.all(cc == cc[:1]):
                    raise Unrepresentable(f"C of shape {c.shape} varies over the batch")
                cc = cc[0]
            bias = beta * cc
            if beta != 1 and not _power_of_two(beta):
                bias_err = 2 * U * np.abs(bias) + np.finfo(float).tiny
        if alpha == 1 or (_power_of_two(alpha) and np.all(np.isfinite(alpha * w))
                          and np.array_equal(alpha * w / alpha, w)):
            return self._matrix_map(a, alpha * w, label, bias, bias_err)
        h = self._matrix_map(a, w, label)
        h = self._scale(h, alpha, label + "_alpha")
        return h if bias is None else self._bias(h, bias, label + "_bias", bias_err)

    def _op_MatMul(self, label, args, attrs, node):
        x, w = args
        if isinstance(x, NodeValue) and isinstance(w, NodeValue):
            self.hints.add("attention")
            raise Unrepresentable("product of two input-dependent tensors")
        rank = len(x.shape if isinstance(x, NodeValue) else w.shape) + 1
        const = self._const(w if isinstance(x, NodeValue) else x, "the constant factor")
        if const.ndim >= rank and const.shape[0] != 1:
            raise Unrepresentable(f"constant factor of shape {const.shape} varies over the batch")
        if isinstance(x, NodeValue):
            w = const.astype(np.float64)
            if w.ndim == 2:
                return self._matrix_map(x, w.T, label)
            if w.ndim == 1:
                h = self._matrix_map(x, w.reshape(1, -1), label)
                return NodeValue(h.node, h.shape[:-1])

            def fn(t):
                return torch.from_numpy(np.matmul(t.numpy(), w))
        else:
            a = const.astype(np.float64)
            x = w
            if len(x.shape) < 2:
                raise Unrepresentable("a constant matrix times the input would mix the samples of the batch")

            def fn(t):
                return torch.from_numpy(np.matmul(a, t.numpy()))
        return self._evaluated_linear(x, fn, label, "linear")

    def _evaluated_linear(self, x: NodeValue, fn, label: str, kind: str) -> NodeValue:
        """A linear map whose matrix entries are single constants (products with one-hot vectors are exact)."""
        n = x.size
        cols, rows, vals, out_shape = [], [], [], None
        step = max(1, (1 << 22) // max(n, 1))
        for start in range(0, n, step):
            k = min(step, n - start)
            basis = torch.zeros(k, n, dtype=torch.float64)
            basis[torch.arange(k), torch.arange(start, start + k)] = 1.0
            out = fn(basis.reshape(k, *x.shape))
            if out.dim() == 0 or out.shape[0] != k:
                raise Unrepresentable("the operation mixes the samples of the batch")
            out_shape = tuple(int(s) for s in out.shape[1:])
            out = out.reshape(k, -1)
            j, i = torch.nonzero(out, as_tuple=True)
            rows.append(i.numpy())
            cols.append((j + start).numpy())
            vals.append(out[j, i].numpy())
        mat = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                            shape=(size_of(out_shape), n))
        return self._linear(x, mat, None, label, out_shape, kind=kind)

    def _op_Conv(self, label, args, attrs, node):
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else None
        if not isinstance(x, NodeValue) or isinstance(w, NodeValue) or isinstance(b, NodeValue):
            raise Unrepresentable("input-dependent convolution kernel")
        w = self._const(w, "the kernel").astype(np.float64)
        nd = w.ndim - 2
        if nd not in (1, 2):
            raise Unrepresentable(f"{nd}-D convolution (only 1-D and 2-D)")
        if len(x.shape) != nd + 1:
            raise Unrepresentable(f"{nd}-D convolution of a tensor of shape {self._full(x)}")
        kernel = tuple(w.shape[2:])
        stride = tuple(attrs.get("strides", [1] * nd))
        dil = tuple(attrs.get("dilations", [1] * nd))
        begin, end = _pads(attrs, x.shape[1:], kernel, stride, dil)
        x = self._pad_asymmetric(x, begin, end, label)
        padding = tuple(min(p, q) for p, q in zip(begin, end, strict=True))
        bias = None if b is None else self._const(b, "the bias").astype(np.float64)
        op = Conv(w, bias, x.shape, stride, padding, dil, int(attrs.get("group", 1)))
        return self._add(op, [x], label, op.out_shape)

    def _pad_asymmetric(self, x: NodeValue, begin, end, label: str) -> NodeValue:
        """Zero-pad the difference between ``end`` and ``begin`` explicitly, so the rest is symmetric."""
        if tuple(begin) == tuple(end):
            return x
        extra = []
        for p, q in reversed(list(zip(begin, end, strict=True))):  # F.pad lists the last dimension first
            extra += [max(p - q, 0), max(q - p, 0)]
        return self._gather([x], lambda t: torch.nn.functional.pad(t, extra), label + "_pad")

    def _op_BatchNormalization(self, label, args, attrs, node):
        if attrs.get("training_mode", 0):
            raise Unrepresentable("training mode (certify the model exported in eval mode)")
        if self._uses_extra_outputs(node):
            raise Unrepresentable("running statistics outputs are used (training mode)")
        x = args[0]
        if not isinstance(x, NodeValue) or any(isinstance(a, NodeValue) for a in args[1:]):
            raise Unrepresentable("input-dependent statistics")
        w, bb, mu, var = (self._const(a, what).astype(np.float64) for a, what in
                          zip(args[1:5], ("scale", "B", "mean", "var"), strict=True))
        scale, shift, scale_err, shift_err = batchnorm_affine(w, bb, mu, var, float(attrs.get("epsilon", 1e-5)))
        spatial = size_of(x.shape[1:])
        if scale.shape != (x.shape[0],):
            raise Unrepresentable(f"{scale.shape[0]} statistics for {x.shape[0]} channels")
        mat = sp.diags(np.repeat(scale, spatial), format="csr")
        err = sp.diags(np.repeat(scale_err, spatial), format="csr")
        return self._linear(x, mat, np.repeat(shift, spatial), label, x.shape, err=err, kind="batchnorm",
                            bias_err=np.repeat(shift_err, spatial))

    def _pool_geometry(self, x: NodeValue, attrs):
        nd = len(x.shape) - 1
        if nd not in (1, 2):
            raise Unrepresentable(f"pooling of a tensor of shape {self._full(x)} (only 1-D and 2-D)")
        kernel = tuple(attrs["kernel_shape"])
        stride = tuple(attrs.get("strides", [1] * nd))
        dil = tuple(attrs.get("dilations", [1] * nd))
        begin, end = _pads(attrs, x.shape[1:], kernel, stride, dil)
        out = []
        for i in range(nd):
            span = dil[i] * (kernel[i] - 1) + 1
            room = x.shape[1 + i] + begin[i] + end[i] - span
            if room < 0:
                raise Unrepresentable(f"kernel {kernel} larger than the padded input {x.shape}")
            if attrs.get("ceil_mode", 0):
                o = -(-room // stride[i]) + 1
                if (o - 1) * stride[i] >= x.shape[1 + i] + begin[i]:
                    o -= 1
            else:
                o = room // stride[i] + 1
            out.append(o)
        return kernel, stride, dil, begin, end, (x.shape[0],) + tuple(out)

    def _op_AveragePool(self, label, args, attrs, node):
        x = args[0]
        kernel, stride, dil, begin, end, out_shape = self._pool_geometry(x, attrs)
        include_pad = bool(attrs.get("count_include_pad", 0))
        patterns, divisors = [], []
        for i in range(len(kernel)):
            n_in, n_out = x.shape[1 + i], out_shape[1 + i]
            pos = np.arange(n_out)[:, None] * stride[i] - begin[i] + np.arange(kernel[i])[None, :] * dil[i]
            valid = (pos >= 0) & (pos < n_in)
            inside = (pos >= -begin[i]) & (pos < n_in + end[i])
            rows = np.repeat(np.arange(n_out), kernel[i])[valid.reshape(-1)]
            patterns.append(sp.csr_matrix((np.ones(rows.size), (rows, pos[valid])), shape=(n_out, n_in)))
            divisors.append((inside if include_pad else valid).sum(axis=1))
        pattern, divisor = sp.identity(x.shape[0], format="csr"), np.ones(x.shape[0], dtype=np.int64)
        for p, d in zip(patterns, divisors, strict=True):
            pattern = sp.kron(pattern, p, format="csr")
            divisor = np.kron(divisor, d)
        return self._average(x, pattern, divisor, label, out_shape, "avgpool")

    def _average(self, x: NodeValue, pattern: sp.csr_matrix, divisor: np.ndarray, label: str, out_shape, kind: str
                 ) -> NodeValue:
        """Rows of ``pattern`` (0/1) divided by ``divisor``: ``fl(1/d)`` coefficients with their rounding bound."""
        if np.any(divisor <= 0):
            raise Unrepresentable("a pooling window lies entirely in the padding")
        recip = 1.0 / divisor.astype(np.float64)
        pattern = pattern.tocsr()
        row_of = np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))
        vals = recip[row_of]
        err, _ = reciprocal_err(vals)
        mat = sp.csr_matrix((vals, pattern.indices, pattern.indptr), shape=pattern.shape)
        err_mat = sp.csr_matrix((err, pattern.indices, pattern.indptr), shape=pattern.shape) if np.any(err) else None
        return self._linear(x, mat, None, label, out_shape, err=err_mat, kind=kind)

    def _op_GlobalAveragePool(self, label, args, attrs, node):
        x = args[0]
        if len(x.shape) < 2:
            raise Unrepresentable(f"global pooling of a tensor of shape {self._full(x)}")
        c, spatial = x.shape[0], size_of(x.shape[1:])
        pattern = sp.kron(sp.identity(c, format="csr"), sp.csr_matrix(np.ones((1, spatial))), format="csr")
        return self._average(x, pattern, np.full(c, spatial), label, (c,) + (1,) * (len(x.shape) - 1), "avgpool")

    def _reduce_axes(self, x: NodeValue, args, attrs) -> tuple[int, ...] | None:
        """Reduced axes of one sample (0-based after the batch); ``None``: the operator is the identity."""
        axes = attrs.get("axes")
        if len(args) > 1 and args[1] is not None:
            axes = self._const(args[1], "the axes").reshape(-1).tolist()
        rank = len(x.shape) + 1
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return None
            raise Unrepresentable("reduction over every axis, the batch included")
        axes = sorted({int(a) % rank for a in axes})
        if 0 in axes:
            raise Unrepresentable("reduction over the batch dimension")
        return tuple(a - 1 for a in axes)

    def _op_ReduceSum(self, label, args, attrs, node, mean: bool = False):
        x = args[0]
        axes = self._reduce_axes(x, args, attrs)
        if axes is None:
            return x
        keep = bool(attrs.get("keepdims", 1))
        dims = [a + 1 for a in axes]

        def fn(t):
            return t.mean(dim=dims, keepdim=keep) if mean else t.sum(dim=dims, keepdim=keep)
        mat, err, out_shape = linear_map_of(fn, x.shape, "mean" if mean else "sum")
        return self._linear(x, mat, None, label, out_shape, err=err, kind="mean" if mean else "sum")

    def _op_ReduceMean(self, label, args, attrs, node):
        return self._op_ReduceSum(label, args, attrs, node, mean=True)

    # -- sums and constant factors --------------------------------------------------------------------
    def _op_Add(self, label, args, attrs, node, sign: float = 1.0):
        x, y = args
        if isinstance(x, _Expr) or isinstance(y, _Expr):
            return self._expr_binary("add", x, y if sign > 0 else self._expr_neg(y, node), node, label)
        if isinstance(x, NodeValue) and isinstance(y, NodeValue):
            x, y = self._pair(x, y, label)
            return self._add(Sum((1.0, sign)), [x, y], label, x.shape)
        if isinstance(x, NodeValue):
            x, c = self._against_constant(x, self._const(y, "the offset").astype(np.float64), label)
            return self._bias(x, sign * c, label)
        y, c = self._against_constant(y, self._const(x, "the offset").astype(np.float64), label)
        if sign < 0:
            y = self._scale(y, -1.0, label + "_neg", exact=Fraction(-1))
        return self._bias(y, c, label)

    def _op_Sub(self, label, args, attrs, node):
        return self._op_Add(label, args, attrs, node, sign=-1.0)

    def _op_Neg(self, label, args, attrs, node):
        x = args[0]
        if isinstance(x, _Expr):
            return self._expr_neg(x, node)
        return self._scale(x, -1.0, label, exact=Fraction(-1))

    def _op_Sum(self, label, args, attrs, node, mean: bool = False):
        deps = [a for a in args if isinstance(a, NodeValue)]
        consts = [self._const(a, "an operand").astype(np.float64) for a in args if not isinstance(a, NodeValue)]
        n = len(args)
        coef, err = (1.0, 0.0) if not mean else reciprocal_float(float(n))
        target = tuple(int(s) for s in np.broadcast_shapes(*[self._full(d) for d in deps]))
        deps = [self._broadcast_to(d, target, f"{label}_{i}") for i, d in enumerate(deps)]
        out = self._add(Sum((coef,) * len(deps), (err,) * len(deps)), deps, label, deps[0].shape) \
            if len(deps) > 1 or coef != 1 else deps[0]
        if consts:
            parts = np.broadcast_arrays(*consts)
            total = np.sum(parts, axis=0) * coef
            out, c = self._against_constant(out, total, label)
            _, size = self._against_constant(out, np.sum(np.abs(parts), axis=0), label)
            out = self._bias(out, c, label + "_const", (n + 2) * U * size + np.finfo(float).tiny)
        return out

    def _op_Mean(self, label, args, attrs, node):
        return self._op_Sum(label, args, attrs, node, mean=True)

    def _op_Mul(self, label, args, attrs, node):
        x, y = args
        if isinstance(x, _Expr) or isinstance(y, _Expr):
            return self._expr_binary("mul", x, y, node, label)
        if isinstance(x, NodeValue) and isinstance(y, NodeValue):
            return self._product(x, y, label, node)
        if not isinstance(x, NodeValue):
            x, y = y, x
        return self._multiply(x, self._const(y, "the factor").astype(np.float64), label)

    def _op_Div(self, label, args, attrs, node):
        x, y = args
        if isinstance(y, (NodeValue, _Expr)):
            raise Unrepresentable("division by an input-dependent tensor")
        c = self._const(y, "the divisor").astype(np.float64)
        if isinstance(x, _Expr):
            if c.size != 1:
                raise Unrepresentable("division of an element-wise expression by a tensor")
            return self._expr_binary("mul", x, ("const", 1 / Fraction(float(c.reshape(-1)[0]))), node, label)
        return self._multiply(x, c, label, divide=True)

    def _multiply(self, x: NodeValue, c: np.ndarray, label: str, divide: bool = False) -> NodeValue:
        """``x * c`` (or ``x / c``) with a constant ``c``."""
        if c.size == 1 and c.ndim <= len(self._full(x)):
            v = float(c.reshape(-1)[0])
            if not math.isfinite(v):
                raise Unrepresentable(f"factor {v}")
            if divide:
                q, err = reciprocal_float(v)
                return self._scale(x, q, label, err, exact=1 / Fraction(v))
            return self._scale(x, v, label, exact=Fraction(v))
        x, vals = self._against_constant(x, c, label)
        err = None
        if divide:
            if np.any(vals == 0):
                raise Unrepresentable("division by zero")
            pairs = [reciprocal_float(float(v)) for v in vals]
            vals = np.array([p[0] for p in pairs])
            err = np.array([p[1] for p in pairs])
            err = sp.diags(err, format="csr") if np.any(err) else None
        return self._linear(x, sp.diags(vals, format="csr"), None, label, x.shape, err=err, kind="scale")

    # -- activations ----------------------------------------------------------------------------------
    def _simple(self, label, args, attrs, node):
        return self._activation(args[0], ActivationSpec(_SIMPLE_ACTIVATIONS[node.op_type]), label)

    _op_Relu = _op_Sigmoid = _op_Tanh = _op_Softplus = _op_Mish = _simple

    def _op_LeakyRelu(self, label, args, attrs, node):
        return self._activation(args[0], ActivationSpec("leaky_relu", {"negative_slope": float(attrs.get("alpha",
                                                                                                       0.01))}), label)

    def _op_Elu(self, label, args, attrs, node):
        return self._activation(args[0], ActivationSpec("elu", {"alpha": float(attrs.get("alpha", 1.0))}), label)

    def _op_Gelu(self, label, args, attrs, node):
        if attrs.get("approximate", "none") == "none":
            return self._activation(args[0], ActivationSpec("gelu"), label)
        spec = gelu_tanh_spec()
        if spec is None:
            raise Unrepresentable("approximate='tanh' (GELU's tanh approximation is not one of lipbound's "
                                  "activations)")
        return self._activation(args[0], spec, label)

    def _op_PRelu(self, label, args, attrs, node):
        slope = self._const(args[1], "the slope")
        if slope.size == 0 or not np.all(slope == slope.reshape(-1)[0]):
            raise Unrepresentable("per-channel slopes (only a single slope, i.e. LeakyReLU)")
        x, _ = self._against_constant(args[0], slope.astype(np.float64), label)
        return self._activation(x, ActivationSpec("leaky_relu", {"negative_slope": float(slope.reshape(-1)[0])}),
                                label)

    def _op_Clip(self, label, args, attrs, node):
        x = args[0]
        lo = None if len(args) < 2 or args[1] is None else self._const(args[1], "min").astype(np.float64)
        hi = None if len(args) < 3 or args[2] is None else self._const(args[2], "max").astype(np.float64)
        if lo is not None and not (lo.size == 1 and float(lo.reshape(-1)[0]) == -math.inf):
            x = self._max_constant(x, lo, label + "_min")
        if hi is not None and not (hi.size == 1 and float(hi.reshape(-1)[0]) == math.inf):
            x = self._min_constant(x, hi, label + "_max")
        return x

    def _max_constant(self, x: NodeValue, c: np.ndarray, label: str) -> NodeValue:
        """``max(x, c) = relu(x - c) + c`` (exact)."""
        x, cv = self._against_constant(x, c, label)
        if not np.all(np.isfinite(cv)):
            raise Unrepresentable("an infinite bound in only some entries")
        if not np.any(cv):
            return self._activation(x, ActivationSpec("relu"), label)
        h = self._bias(x, -cv, label + "_shift")
        h = self._activation(h, ActivationSpec("relu"), label)
        return self._bias(h, cv, label + "_unshift")

    def _min_constant(self, x: NodeValue, c: np.ndarray, label: str) -> NodeValue:
        """``min(x, c) = c - relu(c - x)`` (exact)."""
        x, cv = self._against_constant(x, c, label)
        if not np.all(np.isfinite(cv)):
            raise Unrepresentable("an infinite bound in only some entries")
        h = self._scale(x, -1.0, label + "_neg", exact=Fraction(-1))
        h = self._bias(h, cv, label + "_shift") if np.any(cv) else h
        h = self._activation(h, ActivationSpec("relu"), label)
        h = self._scale(h, -1.0, label + "_neg2", exact=Fraction(-1))
        return self._bias(h, cv, label + "_unshift") if np.any(cv) else h

    def _product(self, x: NodeValue, y: NodeValue, label: str, node) -> NodeValue | _Expr:
        """``x * y`` of two input-dependent tensors: SiLU (``x * Sigmoid(x)``) and Mish (``x * Tanh(Softplus(x))``)
        when it is one, else an expression to be recognised later (or refused)."""
        for a, b in ((x, y), (y, x)):
            act = self.activation_of.get(b.node)
            if act is None or a.shape != b.shape:
                continue
            if act == ("sigmoid", a.node):
                return self._activation(a, ActivationSpec("silu"), label)
            if act[0] == "tanh" and self.activation_of.get(act[1]) == ("softplus", a.node):
                return self._activation(a, ActivationSpec("mish"), label)
        return self._expr_binary("mul", x, y, node, label)

    def _op_Greater(self, label, args, attrs, node):
        z, t = args
        if isinstance(z, NodeValue) and not isinstance(t, (NodeValue, _Expr)) and np.asarray(t).size == 1:
            return _Comparison(z, float(np.asarray(t).reshape(-1)[0]), label)
        self.hints.add("control")
        raise Unrepresentable("comparison (data-dependent control flow)")

    def _op_Where(self, label, args, attrs, node):
        """torch's Softplus with a threshold: ``Where(beta x > t, x, Softplus(beta x) / beta)``."""
        cond, x, soft = args
        if isinstance(cond, _Comparison) and isinstance(x, NodeValue) and isinstance(soft, NodeValue):
            z = cond.value
            beta = Fraction(1) if z.node == x.node else (self.scaled.get(z.node, (None, None))[1]
                                                         if self.scaled.get(z.node, (None,))[0] == x.node else None)
            inner, factor = soft.node, Fraction(1)
            if inner in self.scaled:
                inner, factor = self.scaled[inner]
            if beta is not None and beta > 0 and factor * beta == 1 and \
                    self.activation_of.get(inner) == ("softplus", z.node) and x.shape == soft.shape:
                if cond.threshold < 50:
                    raise Unrepresentable(f"Softplus(threshold={cond.threshold:g}): torch switches to the identity "
                                          "above threshold/beta, a jump that breaks slope restriction; use threshold "
                                          ">= 50")
                return self._activation(x, ActivationSpec("softplus", {"beta": float(beta)}), label)
        self.hints.add("control")
        raise Unrepresentable("data-dependent selection")

    def _op_Erf(self, label, args, attrs, node):
        x = args[0]
        tree = x.tree if isinstance(x, _Expr) else ("leaf", x.node)
        sources = (x.sources if isinstance(x, _Expr) else ()) + (label,)
        return _Expr(("erf", tree), x.shape, sources)

    # -- element-wise expressions (decomposed activations) --------------------------------------------
    def _as_tree(self, v, what: str):
        if isinstance(v, _Expr):
            return v.tree, v.shape, v.sources
        if isinstance(v, NodeValue):
            return ("leaf", v.node), v.shape, ()
        if isinstance(v, tuple):
            return v, None, ()
        c = self._const(v, what)
        if c.size != 1:
            raise Unrepresentable(f"an element-wise expression combined with a constant of shape {c.shape}")
        return ("const", Fraction(float(c.reshape(-1)[0]))), None, ()

    def _expr_binary(self, kind: str, x, y, node, label: str) -> _Expr:
        tx, sx, srcx = self._as_tree(x, "an operand")
        ty, sy, srcy = self._as_tree(y, "an operand")
        shapes = {s for s in (sx, sy) if s is not None}
        if len(shapes) != 1:
            raise Unrepresentable(f"an element-wise expression of tensors of shapes {sorted(shapes)}")
        return _Expr((kind, tx, ty), shapes.pop(), tuple(dict.fromkeys(srcx + srcy + (label,))))

    def _expr_neg(self, y, node):
        if isinstance(y, _Expr):
            return _Expr(("mul", ("const", Fraction(-1)), y.tree), y.shape, y.sources)
        if isinstance(y, NodeValue):
            return _Expr(("mul", ("const", Fraction(-1)), ("leaf", y.node)), y.shape, ())
        c = self._const(y, "an operand")
        if c.size != 1:
            raise Unrepresentable(f"an element-wise expression combined with a constant of shape {c.shape}")
        return ("const", -Fraction(float(c.reshape(-1)[0])))

    def _materialise(self, expr: _Expr, key: str) -> NodeValue:
        """The graph nodes of an element-wise expression, when it is a known activation (GELU's erf form)."""
        if expr in self.materialised:
            return self.materialised[expr]
        tree = self._resolve(expr.tree)
        roots = _leaves(tree)
        if len(roots) != 1:
            raise Unrepresentable(f"element-wise expression {_describe(tree)} of several input-dependent tensors "
                                  "(a product of two input-dependent tensors)")
        root = NodeValue(roots.pop(), expr.shape)
        constant, terms = _sum_terms(tree)
        if len(terms) != 1:
            raise Unrepresentable(f"element-wise expression {_describe(tree)} is not a known activation")
        k_factor, factors = terms[0]
        label = expr.sources[-1]
        leaves = [f for f in factors if f[0] == "leaf"]
        others = [f for f in factors if f[0] != "leaf"]
        if len(leaves) != 1 or len(others) != 1:
            raise Unrepresentable(f"element-wise expression {_describe(tree)} is not a known activation")
        c = _one_plus_erf(others[0])
        if c is None or c <= 0:
            raise Unrepresentable(f"element-wise expression {_describe(tree)} is not a known activation")
        # K x (1 + erf(c x)) = (2K/k) GELU(k x) with k = sqrt(2) c.
        lo, hi = _sqrt2_interval()
        k, k_err = _float_enclosing(lo * c, hi * c)
        m_lo, m_hi = sorted((lo * k_factor / c, hi * k_factor / c))
        m, m_err = _float_enclosing(m_lo, m_hi)
        h = self._scale(root, k, label + "_in", k_err)
        h = self._activation(h, ActivationSpec("gelu"), label)
        h = self._scale(h, m, label + "_out", m_err)
        if constant:
            value, err = exact_float(constant)
            h = self._bias(h, np.full(h.size, value), label + "_const", np.full(h.size, err))
        self.materialised[expr] = h
        return h

    def _resolve(self, tree: tuple) -> tuple:
        """Leaves that are exact scalings of other nodes, replaced by the scaling of their source."""
        kind = tree[0]
        if kind == "leaf":
            node = tree[1]
            if node in self.scaled:
                src, q = self.scaled[node]
                return ("mul", ("const", q), self._resolve(("leaf", src)))
            return tree
        if kind == "const":
            return tree
        return (kind,) + tuple(self._resolve(t) for t in tree[1:])

    # -- maxima and sorting ---------------------------------------------------------------------------
    def _sort_last(self, x: NodeValue, label: str) -> NodeValue:
        """GroupSort (ascending) along the last logical dimension."""
        return self._add(GroupSortLayer(x.size, x.shape[-1], name=label), [x], label, x.shape)

    def _extreme_last(self, x: NodeValue, label: str, largest: bool, keep_shape) -> NodeValue:
        """Max (or min) over the last logical dimension, with output shape ``keep_shape``."""
        g = x.shape[-1]
        if g == 1:
            return NodeValue(x.node, keep_shape)
        s = self._sort_last(x, label)
        n = x.size // g
        pick = sp.csr_matrix((np.ones(n), (np.arange(n), np.arange(n) * g + (g - 1 if largest else 0))),
                             shape=(n, x.size))
        return self._linear(s, pick, None, label + "_select", keep_shape, kind="maxpool_select" if largest else
                            "minpool_select")

    def _op_Max(self, label, args, attrs, node, largest: bool = True):
        deps = [a for a in args if isinstance(a, NodeValue)]
        consts = [self._const(a, "an operand").astype(np.float64) for a in args if not isinstance(a, NodeValue)]
        out = deps[0]
        if len(deps) > 1:
            target = tuple(int(s) for s in np.broadcast_shapes(*[self._full(d) for d in deps]))
            deps = [self._broadcast_to(d, target, f"{label}_{i}") for i, d in enumerate(deps)]
            stacked = self._gather(deps, lambda *ts: torch.stack(ts, dim=-1), label + "_stack")
            out = self._extreme_last(stacked, label, largest, target[1:])
        if consts:
            c = consts[0]
            for d in consts[1:]:
                c = np.maximum(c, d) if largest else np.minimum(c, d)
            out = self._max_constant(out, c, label) if largest else self._min_constant(out, c, label)
        return out

    def _op_Min(self, label, args, attrs, node):
        return self._op_Max(label, args, attrs, node, largest=False)

    def _op_MaxPool(self, label, args, attrs, node):
        if self._uses_extra_outputs(node):
            raise Unrepresentable("the Indices output is used (argmax positions are not Lipschitz)")
        x = args[0]
        kernel, stride, dil, begin, end, out_shape = self._pool_geometry(x, attrs)
        windows = pool_windows(x.shape, out_shape, kernel, stride, begin, dil)
        return [self._window_max(x, windows, label, out_shape), None]

    def _window_max(self, x: NodeValue, windows: np.ndarray, label: str, out_shape) -> NodeValue:
        """Max over each row of ``windows`` (flat input indices): copy the windows, GroupSort, keep the last."""
        n_out, w = windows.shape
        if w == 1:
            mat = sp.csr_matrix((np.ones(n_out), (np.arange(n_out), windows[:, 0])), shape=(n_out, x.size))
            return self._linear(x, mat, None, label, out_shape, kind="gather")
        rows = np.arange(n_out * w)
        copy = sp.csr_matrix((np.ones(rows.size), (rows, windows.reshape(-1))), shape=(rows.size, x.size))
        copied = self._linear(x, copy, None, label + "_windows", (n_out, w), kind="maxpool_windows")
        return self._extreme_last(copied, label, True, out_shape)

    def _op_GlobalMaxPool(self, label, args, attrs, node):
        x = args[0]
        if len(x.shape) < 2:
            raise Unrepresentable(f"global pooling of a tensor of shape {self._full(x)}")
        c, spatial = x.shape[0], size_of(x.shape[1:])
        windows = np.arange(c * spatial).reshape(c, spatial)
        return self._window_max(x, windows, label, (c,) + (1,) * (len(x.shape) - 1))

    def _op_ReduceMax(self, label, args, attrs, node, largest: bool = True):
        x = args[0]
        axes = self._reduce_axes(x, args, attrs)
        if axes is None:
            return x
        keep = [i for i in range(len(x.shape)) if i not in axes]
        moved = self._gather([x], lambda t: t.permute(0, *[i + 1 for i in keep], *[a + 1 for a in axes]).reshape(
            t.shape[0], *[x.shape[i] for i in keep], -1), label + "_move")
        if attrs.get("keepdims", 1):
            shape = tuple(1 if i in axes else x.shape[i] for i in range(len(x.shape)))
        else:
            shape = tuple(x.shape[i] for i in keep) or (1,)
        return self._extreme_last(moved, label, largest, shape)

    def _op_ReduceMin(self, label, args, attrs, node):
        return self._op_ReduceMax(label, args, attrs, node, largest=False)

    def _op_TopK(self, label, args, attrs, node):
        if self._uses_extra_outputs(node):
            raise Unrepresentable("the Indices output is used (argmax positions are not Lipschitz)")
        x = args[0]
        k = int(self._const(args[1], "K").reshape(-1)[0])
        axis = int(attrs.get("axis", -1)) % (len(x.shape) + 1)
        if axis == 0:
            raise Unrepresentable("TopK over the batch dimension")
        largest = bool(attrs.get("largest", 1))
        if not attrs.get("sorted", 1) and k > 1:
            raise Unrepresentable("TopK with sorted=0 (the order of the values is unspecified)")
        moved = self._gather([x], lambda t: torch.movedim(t, axis, -1).contiguous(), label + "_move")
        s = self._sort_last(moved, label)
        g = moved.shape[-1]

        def pick(t):
            top = t[..., g - k:].flip(-1) if largest else t[..., :k]
            return torch.movedim(top, -1, axis).contiguous()
        return [self._gather([s], pick, label + "_select"), None]


def _pads(attrs, spatial, kernel, stride, dil) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Padding before and after each spatial dimension (``pads`` or ``auto_pad``)."""
    nd = len(spatial)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0] * 2 * nd))
        return tuple(pads[:nd]), tuple(pads[nd:])
    if auto == "VALID":
        return (0,) * nd, (0,) * nd
    begin, end = [], []
    for i in range(nd):
        out = -(-spatial[i] // stride[i])
        total = max(0, (out - 1) * stride[i] + dil[i] * (kernel[i] - 1) + 1 - spatial[i])
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return tuple(begin), tuple(end)


def _live_nodes(graph, output: str) -> set[int]:
    """Indices of the nodes the output depends on (dead code, e.g. unused shape computations, is skipped)."""
    producer = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            if name:
                producer[name] = i
    live, stack = set(), [output]
    while stack:
        name = stack.pop()
        i = producer.get(name)
        if i is None or i in live:
            continue
        live.add(i)
        stack.extend(n for n in graph.node[i].input if n)
    return live


def _leaves(tree: tuple) -> set[int]:
    if tree[0] == "leaf":
        return {tree[1]}
    if tree[0] == "const":
        return set()
    return set().union(*(_leaves(t) for t in tree[1:]))


def _sum_terms(tree: tuple) -> tuple[Fraction, list[tuple[Fraction, list[tuple]]]]:
    """``tree`` as ``constant + sum_i K_i * prod(factors_i)`` (factors: leaves and non-polynomial subtrees)."""
    if tree[0] == "add":
        c1, t1 = _sum_terms(tree[1])
        c2, t2 = _sum_terms(tree[2])
        return c1 + c2, t1 + t2
    if tree[0] == "const":
        return tree[1], []
    k, factors = _product_factors(tree)
    return (Fraction(0), []) if k == 0 else (Fraction(0), [(k, factors)])


def _product_factors(tree: tuple) -> tuple[Fraction, list[tuple]]:
    if tree[0] == "mul":
        k1, f1 = _product_factors(tree[1])
        k2, f2 = _product_factors(tree[2])
        return k1 * k2, f1 + f2
    if tree[0] == "const":
        return tree[1], []
    return Fraction(1), [tree]


def _one_plus_erf(tree: tuple) -> Fraction | None:
    """``c`` when ``tree`` is ``1 + erf(c x)`` (``x`` a single leaf), else ``None``."""
    constant, terms = _sum_terms(tree)
    if constant != 1 or len(terms) != 1 or terms[0][0] != 1 or len(terms[0][1]) != 1:
        return None
    erf = terms[0][1][0]
    if erf[0] != "erf":
        return None
    inner_const, inner = _sum_terms(erf[1])
    if inner_const != 0 or len(inner) != 1 or len(inner[0][1]) != 1 or inner[0][1][0][0] != "leaf":
        return None
    return inner[0][0]


def _describe(tree: tuple) -> str:
    kind = tree[0]
    if kind == "leaf":
        return "x"
    if kind == "const":
        return f"{float(tree[1]):g}"
    if kind == "add":
        return f"({_describe(tree[1])} + {_describe(tree[2])})"
    if kind == "mul":
        return f"{_describe(tree[1])}*{_describe(tree[2])}"
    return f"{kind}({_describe(tree[1])})"


def _default_opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise NetworkError("the model imports no version of the standard ONNX operator set.")


# -- reading, checking ---------------------------------------------------------------------------------------

def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise NetworkError("reading ONNX models needs the 'onnx' and 'onnxruntime' packages "
                           "(pip install 'lipbound[onnx]').") from exc


def _read(path: Path):
    """The model of an ONNX file with its external data, or a NetworkError naming the file."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model, uses_external_data

    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise NetworkError(f"{path} is a directory, not an ONNX file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise NetworkError(f"{path}: not a readable ONNX file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'cannot be parsed'}).") from exc
    if not model.HasField("graph") or model.ir_version <= 0 or not model.graph.node:
        raise NetworkError(f"{path}: not an ONNX model (no graph or no IR version; is it an ONNX file?).")
    base = path.resolve().parent
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        rel = Path(location)
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise NetworkError(f"{path}: tensor '{tensor.name}' points to external data '{location}' outside the "
                               "model's folder; external data must lie beside the model.")
        if not (base / rel).is_file():
            raise NetworkError(f"{path}: external data file '{location}' (tensor '{tensor.name}') not found in "
                               f"{base}; copy it beside the model.")
    try:
        load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise NetworkError(f"{path}: the external data could not be read ({type(exc).__name__}: {exc}).") from exc
    return model


def _prepare(model, where: str):
    """Validate, check the opset and inline model-local functions."""
    import onnx

    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise NetworkError(f"{where}: not a valid ONNX model ({type(exc).__name__}: {text[0] if text else ''}).") \
            from exc
    opset = _default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise UnsupportedLayerError([(where, f"opset {opset}")],
                                    f"opsets {MIN_OPSET} to {newest} are supported: re-export with a newer "
                                    "opset_version, or convert with onnx.version_converter.convert_version(model, "
                                    f"{MIN_OPSET}).")
    if opset > newest:
        raise UnsupportedLayerError([(where, f"opset {opset}")],
                                    f"the installed onnx knows opsets up to {newest}; upgrade onnx.")
    if model.functions:
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    return model


def _reference(model, source, translator: OnnxTranslator):
    """The evaluator to check against: onnxruntime (graph optimisations off), or, for a model onnxruntime has no
    kernel for (float64 convolutions, for one), onnx's reference evaluator. Returns ``(run, what)``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(source if isinstance(source, str) else model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        if "NOT_IMPLEMENTED" not in text:
            raise NetworkError(f"{translator.name}: onnxruntime cannot load the model, so the import cannot be "
                               f"checked ({type(exc).__name__}: {text}); pass check=False to import it unchecked.") \
                from exc
        from onnx.reference import ReferenceEvaluator

        log.info("import %s: onnxruntime has no kernel for part of the model (%s); checking against onnx's "
                 "reference evaluator", translator.name, text)
        evaluator = ReferenceEvaluator(model)
        return (lambda x: evaluator.run(None, {translator.input_name: x})[0]), "onnx's reference evaluator"
    return (lambda x: session.run(None, {translator.input_name: x})[0]), "onnxruntime"


def _cross_check(graph: GraphNetwork, model, source, translator: OnnxTranslator) -> None:
    """Evaluate the network and the reference on random inputs; a mismatch is an error."""
    run, what = _reference(model, source, translator)
    dtype = translator.dtype
    batch = 3 if translator.symbolic_batch else translator.batch
    runs = max(1, -(-4 // batch))
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(runs):
        x = rng.standard_normal((batch, *translator.sample_shape)).astype(dtype)
        try:
            ref = run(x)
        except Exception as exc:
            raise NetworkError(f"{translator.name}: {what} cannot evaluate the model ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); pass check=False to import it "
                               "unchecked.") from exc
        ref = np.asarray(ref, dtype=np.float64).reshape(batch, -1)
        with torch.no_grad():
            out = graph.forward(torch.from_numpy(x.astype(np.float64))).numpy()
        if out.shape != ref.shape or not np.all(np.isfinite(ref)):
            raise NetworkError(f"{translator.name}: the imported network outputs {out.shape[1:]} values per sample, "
                               f"{what} {ref.shape[1:]} (or non-finite values); nothing was certified.")
        scale = float(np.abs(ref).max())
        err = float(np.abs(out - ref).max())
        worst = max(worst, err / scale if scale > 0 else err)
    tol = _TOLERANCE[dtype]
    if worst > tol:
        raise NetworkError(f"{translator.name}: the imported network does not reproduce {what}'s output (relative "
                           f"error {worst:.3g} > {tol:g} for a {np.dtype(dtype).name} model). This is a bug in "
                           "lipbound's ONNX importer; nothing was certified.")
    log.info("import %s: output matches %s to %.2g relative (%s)", translator.name, what, worst, np.dtype(dtype).name)


def from_onnx(source, input_shape: Sequence[int] | int | None = None, check: bool = True,
              name: str | None = None) -> Network | GraphNetwork:
    """Import an ONNX model (a ``.onnx`` file or an ``onnx.ModelProto``) as a network.

    See the module docstring for what is read, how, and what is refused.

    Parameters
    ----------
    source : str, Path or onnx.ModelProto
        The file (its external data files beside it) or the model.
    input_shape : int or tuple of int, optional
        Shape of one sample, without the batch dimension; needed only when the model's input has symbolic
        dimensions other than the batch.
    check : bool
        Evaluate the network against onnxruntime on random inputs and raise on a mismatch (default).
    name : str, optional
        Defaults to the file's stem (or the graph's name).

    Returns
    -------
    Network or GraphNetwork
        A chain :class:`~lipbound.network.Network` when the model is one, else a
        :class:`~lipbound.graph.GraphNetwork`.

    Raises
    ------
    UnsupportedLayerError
        Listing every node that cannot be represented, with hints.
    NetworkError
        For a corrupt or invalid file, a missing external data file, or a network that does not reproduce
        onnxruntime's output.

    Examples
    --------
    >>> import io, torch, lipbound
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> buffer = io.BytesIO()
    >>> torch.onnx.export(model, (torch.randn(1, 3),), buffer, dynamo=False)
    >>> import onnx
    >>> lipbound.from_onnx(onnx.load_from_string(buffer.getvalue())).dims
    (3, 4, 2)
    """
    _require_onnx()
    import onnx

    if isinstance(source, onnx.ModelProto):
        model, where, path = source, name or source.graph.name or "onnx_model", None
    else:
        path = Path(source)
        model, where = _read(path), str(path)
    model = _prepare(model, where)
    name = name or (path.stem if path is not None else model.graph.name or "onnx_model")
    translator = OnnxTranslator(model, name, input_shape)
    graph = simplify(translator.translate())
    if check:
        # Serialised models are limited to 2 GB; larger ones (external data) are given to onnxruntime by path.
        by_path = path is not None and model.ByteSize() >= 2**31 - 1
        _cross_check(graph, model, str(path) if by_path else None, translator)
    return graph.to_network() or graph
