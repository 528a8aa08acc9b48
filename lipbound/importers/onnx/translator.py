"""The ONNX translator: walks the graph in order, folds what does not depend on the input, maps the rest.

Values are constants (numpy arrays, in the model's dtype), input-dependent tensors
(:class:`~lipbound.importers.common.NodeValue`: a graph node and the logical shape of one sample), or pending
pieces of decomposed activations (:mod:`.patterns`). The operators themselves live in :mod:`.linear`,
:mod:`.nonlinear` and :mod:`.patterns`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np
import scipy.sparse as sp
import torch

from lipbound.activations import ActivationSpec
from lipbound.errors import NetworkError, UnsupportedLayerError
from lipbound.graph import Concat, GraphBuilder, GraphNetwork, LinearMap, Sum
from lipbound.importers.common import NodeValue, Unrepresentable, is_identity_selection, selection, size_of
from lipbound.importers.onnx.linear import LinearOps
from lipbound.importers.onnx.nonlinear import NonlinearOps
from lipbound.importers.onnx.patterns import Comparison, Expression, PatternOps
from lipbound.network import SlopeRestricted

log = logging.getLogger("lipbound")

FLOAT_TYPES = {1: np.float32, 11: np.float64, 10: np.float16}  # onnx.TensorProto FLOAT, DOUBLE, FLOAT16

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

# Element-wise operators a pending expression may pass through before it is recognised (or refused).
_EXPRESSION_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Erf"}

_FAILED = object()  # the value of a refused node (its consumers are not reported again)


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


class OnnxTranslator(LinearOps, NonlinearOps, PatternOps):
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
        self.graph = model.graph
        self.name = name
        self.opset = default_opset(model)
        self.values: dict[str, object] = {}
        self.unsupported: list[tuple[str, str]] = []
        self.hints: set[str] = set()
        self.builder: GraphBuilder | None = None
        self.scaled: dict[int, tuple[int, Fraction]] = {}  # node -> (source node, exact factor)
        self.activation_of: dict[int, tuple[str, int]] = {}  # node -> (activation name, source node)
        self.materialised: dict[Expression, NodeValue] = {}
        self.shared: dict[tuple, NodeValue] = {}  # sorts of the same tensor, shared by its maxima and minima
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
        dtype = FLOAT_TYPES.get(ttype.elem_type)
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
        if isinstance(result, Expression):
            try:
                result = self._materialise(result)
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

    def _refuse_expr(self, expr: Expression, what: str) -> None:
        self.unsupported.append((", ".join(expr.sources), what))
        if expr.has_product():
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
        dependent = any(isinstance(a, (NodeValue, Expression, Comparison)) for a in args)
        if not dependent:
            return self._fold(node, args)
        if op != "Where" and any(isinstance(a, Comparison) for a in args):
            self.hints.add("control")
            raise Unrepresentable("uses the result of a comparison (data-dependent control flow)")
        if op not in _EXPRESSION_OPS or any(a is not None and not isinstance(a, (NodeValue, Expression))
                                            and np.asarray(a).size != 1 for a in args):
            # A pending expression used by anything but element-wise arithmetic with scalars (a bias, a layer)
            # must be a complete activation here.
            for i, a in enumerate(args):
                if isinstance(a, Expression):
                    try:
                        args[i] = self._materialise(a)
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

    # -- adding nodes, broadcasting -------------------------------------------------------------------
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

    def _gather(self, operands: list, fn: Callable, name: str) -> NodeValue:
        """The data-movement function ``fn`` (torch tensors with the batch first) of ``operands``."""
        out_shape, mat, const = selection(operands, fn, self.batch)
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
        if isinstance(v, (NodeValue, Expression, Comparison)):
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

    # -- data movement and identities -----------------------------------------------------------------
    def _movement(self, node, label: str, args: list, data: tuple[int, ...] | None = ()) -> list:
        """A data-movement node (``data``: the inputs that carry data, ``None``: all; default from the table),
        its matrix found by running the operator on tensors of indices."""
        data = _MOVEMENT[node.op_type] if data == () else data
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
        if attrs.get("to") not in FLOAT_TYPES:
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


def default_opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise NetworkError("the model imports no version of the standard ONNX operator set.")

