"""The campaign's judge: a network's function evaluated in multiple precision (mpmath), at any magnitude.

A certified bound ``U`` is wrong when some pair of inputs has ``||f(x) - f(x')|| > U ||x - x'||``. Deciding this in
float64 is itself error prone: differences of nearby outputs cancel, and weights of 1e-300 or 1e300 underflow or
overflow intermediate values. :class:`Reference` therefore evaluates the function the IR describes in binary
floating point with ``prec`` bits (default 256) and an unbounded exponent (mpmath), independently of lipbound's own
torch forward pass. Every weight, bias and activation parameter is a float64, converted exactly.

**Error margin.** Each mpmath operation is accurate to about ``2^-prec`` relative. A computed output ``f(x)`` is
then off by far less than ``2^-(prec - 100) |f(x)|`` unless the evaluation cancels more than 100 bits internally
(it does not for the campaign's networks: weights are O(1) up to a power-of-two scale, and the fixed points of
implicit layers are iterated to ``2^-(prec - 16)``). :meth:`Reference.ratio` subtracts ``2^-128 (|f(x)| + |f(x')|)``
from ``|f(x) - f(x')|`` before dividing, and :func:`spectral_norm` and :func:`row_l1_norm` subtract ``2^-128``
relative; the results are lower bounds of the Lipschitz constant by a margin of ``2^-128 ~ 3e-39`` relative, far
below the resolution of a float64 certificate (``2^-52``). So a campaign violation, ``U < lower``, is a wrong
certificate, not an evaluation artefact, and every certificate wrong by one ulp or more is detectable.

Each IR stage type has one evaluator in :data:`STAGES`, and each graph operator one in :data:`GRAPH_OPS`
(:class:`~lipbound.graph.GraphNetwork` nodes: linear maps and convolutions through their exact matrices, sums,
concatenations, and the activation stages above); a new stage type or graph operator adds one.

**Inexact operators.** A graph's :class:`~lipbound.graph.LinearMap` may carry an entrywise bound ``err`` on the
distance of its stored float matrix to the exact one (BatchNorm's ``gamma / sqrt(var + eps)``, average pooling's
``1/9``), and :class:`~lipbound.graph.Conv` and :class:`~lipbound.graph.Sum` their ``weight_err`` and ``errors``.
The reference evaluates the *stored* floats. That is a fair judge: the exact operator is unknown within ``err``,
so a certificate must hold for every operator within ``err`` of the stored one, the stored one included; a pair
of the stored network whose quotient exceeds a certified bound proves that certificate wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mpmath
import numpy as np
import scipy.sparse as sp
import torch

from lipbound.errors import NetworkError
from lipbound.graph import Concat, Conv, GraphNetwork, LinearMap, Sum
from lipbound.network import (
    Affine,
    GroupSortLayer,
    HouseholderLayer,
    ImplicitLayer,
    Network,
    ResidualBlock,
    SlopeRestricted,
)

PREC = 256
DISCOUNT_BITS = 128

Vector = list  # a list of mpmath numbers


def _poly(c, r, coefficients):
    out = c.zero
    for a in reversed(coefficients):
        out = out * r + c.mpf(a)
    return out


#: name -> f(context, z, params): the activations of :data:`lipbound.SUPPORTED_ACTIVATIONS`, written from their
#: definitions (torch's conventions: leaky_relu and relu take the identity branch at 0, softplus without threshold).
ACTIVATIONS: dict[str, Callable] = {
    "relu": lambda c, z, p: z if z > 0 else c.zero,
    "leaky_relu": lambda c, z, p: z if z >= 0 else c.mpf(p["negative_slope"]) * z,
    "identity": lambda c, z, p: z,
    "tanh": lambda c, z, p: c.tanh(z),
    "sigmoid": lambda c, z, p: 1 / (1 + c.exp(-z)),
    "elu": lambda c, z, p: z if z > 0 else c.mpf(p["alpha"]) * c.expm1(z),
    "softplus": lambda c, z, p: c.log1p(c.exp(c.mpf(p["beta"]) * z)) / c.mpf(p["beta"]),
    "gelu": lambda c, z, p: z / 2 * (1 + c.erf(z / c.sqrt(2))),
    "gelu_tanh": lambda c, z, p: z / 2 * (1 + c.tanh(c.sqrt(2 / c.pi) * (z + c.mpf("0.044715") * z**3))),
    "silu": lambda c, z, p: z / (1 + c.exp(-z)),
    "mish": lambda c, z, p: z * c.tanh(c.log1p(c.exp(z))),
    "polyrelu": lambda c, z, p: _poly(c, z if z > 0 else c.zero, p["coefficients"]),
}


class Reference:
    """The function of a :class:`~lipbound.network.Network` or :class:`~lipbound.graph.GraphNetwork`, evaluated
    with ``prec``-bit mpmath numbers.

    Parameters
    ----------
    network : Network or GraphNetwork
    prec : int
        Working precision in bits.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> ref = Reference(lipbound.from_weights([np.array([[1e-300]]), np.array([[1e-300]])], "tanh"))
    >>> y = ref([1e300])                      # float64 would underflow to 0 here
    >>> ref.ctx.nstr(y[0], 8)
    '7.6159416e-301'
    >>> ref.ctx.nstr(ref.ratio([0.0], [1.0]), 8)   # 1e-300 tanh(1e-300), below float64's range
    '1.0e-600'
    >>> from lipbound.graph import GraphBuilder
    >>> b = GraphBuilder((1,))
    >>> h = b.activation(b.linear(b.input, np.array([[1e-300]])), "relu")
    >>> tiny = np.array([[1e-300]])
    >>> out = b.concat([b.add([b.linear(h, tiny), b.linear(h, tiny)], [1.0, 2.0]), h])   # a graph
    >>> graph = Reference(b.build(out))
    >>> [graph.ctx.nstr(v, 6) for v in graph([1.0])]   # float64 would give 0 for 3e-600
    ['3.0e-600', '1.0e-300']
    """

    def __init__(self, network: Network | GraphNetwork, prec: int = PREC):
        self.network = network
        self.ctx = mpmath.MPContext()
        self.ctx.prec = prec
        if isinstance(network, GraphNetwork):
            self._evaluate = _compile_graph(network, self.ctx)
        else:
            stages = [_compile(layer, self.ctx) for layer in network.layers]
            self._evaluate = lambda z: _chain(stages, z)

    def vector(self, x: Sequence) -> Vector:
        """``x`` (floats or mpmath numbers) as a list of this context's numbers (floats convert exactly)."""
        return [self.ctx.mpf(float(v)) if isinstance(v, (float, int, np.floating, np.integer)) else self.ctx.mpf(v)
                for v in x]

    def __call__(self, x: Sequence) -> Vector:
        """``f(x)`` as a list of mpmath numbers."""
        z = self.vector(x)
        if len(z) != self.network.input_dim:
            raise NetworkError(f"reference evaluation: input of length {len(z)}, the network takes "
                               f"{self.network.input_dim}.")
        return self._evaluate(z)

    def ratio(self, x: Sequence, x2: Sequence, norm: str = "l2", output_index: int | None = None):
        """A lower bound of the Lipschitz constant from the pair ``(x, x2)``.

        ``||f(x) - f(x2)||_2 / ||x - x2||_2`` (``norm="l2"``) or ``|f_i(x) - f_i(x2)| / ||x - x2||_inf``
        (``"linf"``, ``i = output_index``), with ``2^-128 (|f(x)| + |f(x2)|)`` taken off the numerator (see the
        module's error margin). Returns an mpmath number (0 for ``x == x2``).
        """
        a, b = self.vector(x), self.vector(x2)
        return _quotient(self.ctx, a, b, self(a), self(b), norm, output_index, DISCOUNT_BITS)


class OnnxReference:
    """An ONNX model's own function, evaluated by onnxruntime in float64, as a judge of input pairs.

    This judges the whole path from an ONNX file to a certificate (importer included) rather than the imported
    network. Its evaluation is float64, not multiple precision: onnxruntime's kernels round each operation, so an
    output of the campaign's small models (a few dozen operations per output, weights of order one) is off by
    some hundred ulps of the values involved at most, about ``2^-45`` relative. :meth:`ratio` takes
    ``2^-30 (|f(x)| + |f(x2)|)`` off the numerator, a margin 2^15 times larger, so its quotients are lower bounds
    unless an evaluation cancels more than 15 bits beyond that; this is a float64 estimate, not a proof like
    :class:`Reference`'s 2^-128 margin, and a violation found by this judge is to be re-judged on the imported
    network before it is believed.

    Parameters
    ----------
    model : bytes or onnx.ModelProto
        A float64 model with one input of shape ``(batch, *input_shape)`` and one output.
    input_shape : tuple of int
        The shape of one sample.

    Raises
    ------
    OnnxReference.Unavailable
        When onnxruntime cannot run the model in float64 (it has no float64 kernel for Conv, AveragePool, Elu,
        Softplus, Erf, ...): judge the imported network with :class:`Reference` instead.
    """

    #: Bits of the relative margin taken off each numerator.
    MARGIN_BITS = 30

    class Unavailable(Exception):
        """onnxruntime cannot evaluate the model in float64."""

    def __init__(self, model, input_shape, prec: int = PREC):
        import onnxruntime as ort

        data = model if isinstance(model, bytes) else model.SerializeToString()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise OnnxReference.Unavailable(f"onnxruntime cannot run the model in float64: {text}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(double)":
            raise OnnxReference.Unavailable(f"the model's inputs are {[(i.name, i.type) for i in inputs]}, not one "
                                            "float64 tensor")
        self.input_name = inputs[0].name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.ctx = mpmath.MPContext()
        self.ctx.prec = prec

    def __call__(self, x: Sequence) -> Vector:
        """onnxruntime's ``f(x)`` (``x`` floats) as a list of mpmath numbers (exact conversions)."""
        sample = np.array([float(v) for v in x], dtype=np.float64).reshape((1,) + self.input_shape)
        out = self.session.run(None, {self.input_name: sample})[0]
        return [self.ctx.mpf(float(v)) for v in np.asarray(out, dtype=np.float64).reshape(-1)]

    def ratio(self, x: Sequence, x2: Sequence, norm: str = "l2", output_index: int | None = None):
        """As :meth:`Reference.ratio`, on onnxruntime's outputs, less ``2^-30 (|f(x)| + |f(x2)|)``."""
        a = [self.ctx.mpf(float(v)) for v in x]
        b = [self.ctx.mpf(float(v)) for v in x2]
        return _quotient(self.ctx, a, b, self(x), self(x2), norm, output_index, self.MARGIN_BITS)


def _quotient(c, a: Vector, b: Vector, fa: Vector, fb: Vector, norm: str, output_index: int | None,
              margin_bits: int):
    """The difference quotient of ``f`` between ``a`` and ``b`` less ``2^-margin_bits (|f(a)| + |f(b)|)`` in the
    numerator and a few ulps of ``c`` (see :meth:`Reference.ratio`); 0 for ``a == b``."""
    if norm == "l2":
        num, mag = _norm2(c, [u - v for u, v in zip(fa, fb, strict=True)]), _norm2(c, fa) + _norm2(c, fb)
        den = _norm2(c, [u - v for u, v in zip(a, b, strict=True)])
    else:
        i = 0 if output_index is None else output_index
        num, mag = abs(fa[i] - fb[i]), abs(fa[i]) + abs(fb[i])
        den = max(abs(u - v) for u, v in zip(a, b, strict=True))
    if den == 0:
        return c.zero
    num -= c.ldexp(mag, -margin_bits)
    return max(c.zero, num / den * (1 - c.ldexp(1, 16 - c.prec)))


def _chain(stages: list[Callable[[Vector], Vector]], z: Vector) -> Vector:
    for stage in stages:
        z = stage(z)
    return z


def _norm2(c, v: Vector):
    return c.sqrt(c.fsum(u * u for u in v))


def _matrix(c, a: np.ndarray) -> list[list]:
    return [[c.mpf(float(v)) for v in row] for row in np.atleast_2d(a)]


def _matvec(c, rows: list[list], x: Vector) -> Vector:
    return [c.fdot(row, x) for row in rows]


def _compile_affine(layer: Affine, c) -> Callable[[Vector], Vector]:
    w, b = _matrix(c, layer.weight), [c.mpf(float(v)) for v in layer.bias]
    return lambda x: [u + v for u, v in zip(_matvec(c, w, x), b, strict=True)]


def _compile_slope(layer: SlopeRestricted, c) -> Callable[[Vector], Vector]:
    spec = layer.activation
    try:
        phi = ACTIVATIONS[spec.name]
    except KeyError:
        raise NetworkError(f"reference evaluation: no multiple-precision definition of activation "
                           f"'{spec.name}'; add one to lipbound.soundness.reference.ACTIVATIONS.") from None
    params = spec.params
    return lambda z: [phi(c, v, params) for v in z]


def _compile_groupsort(layer: GroupSortLayer, c) -> Callable[[Vector], Vector]:
    g = layer.group_size
    return lambda z: [v for k in range(0, len(z), g) for v in sorted(z[k:k + g])]


def _compile_householder(layer: HouseholderLayer, c) -> Callable[[Vector], Vector]:
    # The layer is the exact reflection with the unit vectors u = v / ||v|| (v the stored float vectors).
    units = []
    for v in layer.vectors:
        vm = [c.mpf(float(t)) for t in v]
        n = _norm2(c, vm)
        units.append([t / n for t in vm])
    g = layer.group_size

    def apply(z: Vector) -> Vector:
        out = []
        for k, u in enumerate(units):
            block = z[k * g:(k + 1) * g]
            proj = c.fdot(u, block)
            out += block if proj > 0 else [t - 2 * proj * s for t, s in zip(block, u, strict=True)]
        return out

    return apply


def _compile_residual(layer: ResidualBlock, c) -> Callable[[Vector], Vector]:
    inner, act = _compile_affine(layer.inner, c), _compile(layer.activation, c)
    outer = None if layer.outer is None else _compile_affine(layer.outer, c)

    def apply(x: Vector) -> Vector:
        h = act(inner(x))
        if outer is not None:
            h = outer(h)
        return [u + v for u, v in zip(x, h, strict=True)]

    return apply


def _compile_implicit(layer: ImplicitLayer, c) -> Callable[[Vector], Vector]:
    """The fixed point ``z = phi(W z + U x + b)`` by Picard iteration, which converges for contractive layers.

    The iteration starts from lipbound's float64 fixed point when that is finite (only a starting point: the
    limit does not depend on it) and stops when a step is below ``2^-(prec - 16)`` of the iterate; with the
    contraction factor ``q = s ||W|| < 1`` the distance to the fixed point is then at most ``q / (1 - q)`` times that.
    """
    w, u, b = _matrix(c, layer.weight), _matrix(c, layer.input_weight), [c.mpf(float(v)) for v in layer.bias]
    act = _compile(layer.activation, c)
    q = layer.contraction_factor()
    if not q < 1:
        raise NetworkError(f"reference evaluation: implicit layer '{layer.name}' is not a contraction "
                           f"(s||W|| = {q:.3g}); its fixed point is not computable by iteration.")
    max_iter = int(math.ceil(c.prec * math.log(2) / -math.log(q))) + 200 if q > 0 else 3

    def apply(x: Vector) -> Vector:
        drive = [s + t for s, t in zip(_matvec(c, u, x), b, strict=True)]
        try:
            start = layer.forward(torch.tensor([[float(v) for v in x]], dtype=torch.float64))[0].tolist()
        except (NetworkError, OverflowError):
            start = None
        z = [c.mpf(v) if start is not None and math.isfinite(v) else c.zero
             for v in (start or [0.0] * len(drive))]
        for _ in range(max_iter):
            new = act([s + t for s, t in zip(_matvec(c, w, z), drive, strict=True)])
            step = max(abs(s - t) for s, t in zip(new, z, strict=True))
            size = max(abs(s) for s in new)
            z = new
            if step == 0 or step <= c.ldexp(size, 16 - c.prec):
                return z
        raise NetworkError(f"reference evaluation: implicit layer '{layer.name}' did not converge in {max_iter} "
                           f"steps (contraction factor {q:.3g}).")

    return apply


#: IR stage type -> compiler(layer, context) returning the stage's multiple-precision function.
STAGES: dict[type, Callable] = {
    Affine: _compile_affine, SlopeRestricted: _compile_slope, GroupSortLayer: _compile_groupsort,
    HouseholderLayer: _compile_householder, ResidualBlock: _compile_residual, ImplicitLayer: _compile_implicit,
}


def _compile(layer, c) -> Callable[[Vector], Vector]:
    compiler = STAGES.get(type(layer))
    if compiler is None:
        raise NetworkError(f"reference evaluation: no multiple-precision evaluator for layer "
                           f"'{getattr(layer, 'name', layer)}' ({type(layer).__name__}); add one to "
                           "lipbound.soundness.reference.STAGES.")
    return compiler(layer, c)


def _sparse_rows(c, matrix) -> list[tuple[list[int], list]]:
    """Each row of a (dense or sparse) float matrix as (column indices, mpmath values) of its nonzeros."""
    m = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    m.eliminate_zeros()
    return [(m.indices[m.indptr[i]:m.indptr[i + 1]].tolist(),
             [c.mpf(float(v)) for v in m.data[m.indptr[i]:m.indptr[i + 1]]]) for i in range(m.shape[0])]


def _compile_matrix(c, matrix, bias: np.ndarray) -> Callable[[Vector], Vector]:
    """``x -> A x + b`` over the nonzeros of ``A`` (convolutions and selections are mostly zeros)."""
    rows, b = _sparse_rows(c, matrix), [c.mpf(float(v)) for v in bias]

    def apply(x: Vector) -> Vector:
        return [c.fdot(values, [x[j] for j in cols]) + s for (cols, values), s in zip(rows, b, strict=True)]

    return apply


def _compile_linear_map(op: LinearMap, c) -> Callable[[list[Vector]], Vector]:
    # An inexact map (err not None) is evaluated with its stored matrix: see the module's "inexact operators".
    apply = _compile_matrix(c, op.matrix, op.bias)
    return lambda args: apply(args[0])


def _compile_conv(op: Conv, c) -> Callable[[list[Vector]], Vector]:
    # The convolution's exact sparse matrix (its entries are the stored kernel floats; weight_err as for err).
    apply = _compile_matrix(c, op.matrix(), np.repeat(op.bias, op.out_dim // op.weight.shape[0]))
    return lambda args: apply(args[0])


def _compile_sum(op: Sum, c) -> Callable[[list[Vector]], Vector]:
    # The stored coefficients (their error bounds as for err).
    coefficients = [c.mpf(v) for v in op.coefficients]

    def apply(args: list[Vector]) -> Vector:
        return [c.fdot(coefficients, column) for column in zip(*args, strict=True)]

    return apply


def _compile_concat(op: Concat, c) -> Callable[[list[Vector]], Vector]:
    return lambda args: [v for a in args for v in a]


#: Graph operator type -> compiler(op, context) returning a function of the node's input values (a list of
#: vectors); the activation stages and implicit layers of :data:`STAGES` act on the node's single input.
GRAPH_OPS: dict[type, Callable] = {
    LinearMap: _compile_linear_map, Conv: _compile_conv, Sum: _compile_sum, Concat: _compile_concat,
}


def _compile_node(node, c) -> Callable[[list[Vector]], Vector]:
    compiler = GRAPH_OPS.get(type(node.op))
    if compiler is not None:
        return compiler(node.op, c)
    if type(node.op) in STAGES and len(node.inputs) == 1:
        stage = _compile(node.op, c)
        return lambda args: stage(args[0])
    raise NetworkError(f"reference evaluation: no multiple-precision evaluator for graph node '{node.name}' "
                       f"({type(node.op).__name__}); add one to lipbound.soundness.reference.GRAPH_OPS.")


def _compile_graph(network: GraphNetwork, c) -> Callable[[Vector], Vector]:
    """The graph's function: every node evaluated once, in order, from its inputs' values."""
    program = [(node.inputs, _compile_node(node, c)) for node in network.nodes[1:]]

    def evaluate(x: Vector) -> Vector:
        values = [x]
        for inputs, fn in program:
            values.append(fn([values[j] for j in inputs]))
        return values[network.output]

    return evaluate


def _product(c, matrices: Sequence[np.ndarray]):
    """``A_k ... A_1 A_0`` of float matrices (given in the order applied), as an mpmath matrix."""
    out = c.matrix(_matrix(c, matrices[0]))
    for a in matrices[1:]:
        out = c.matrix(_matrix(c, a)) * out
    return out


def spectral_norm(matrices: Sequence[np.ndarray], prec: int = PREC):
    """``||A_k ... A_0||_2`` less ``2^-128`` relative (a lower bound).

    The matrices are float64 arrays, applied in the given order; the product is formed in ``prec``-bit arithmetic
    and its singular values by mpmath's SVD.

    Examples
    --------
    >>> import numpy as np
    >>> float(spectral_norm([np.array([[3.0, 4.0]]), np.array([[1e-300]])]))
    5e-300
    """
    c = mpmath.MPContext()
    c.prec = prec
    p = _product(c, matrices)
    top = max(c.svd_r(p, compute_uv=False))
    return top * (1 - c.ldexp(1, -DISCOUNT_BITS))


def row_l1_norm(matrices: Sequence[np.ndarray], row: int, prec: int = PREC):
    """``||e_row^T A_k ... A_0||_1`` less ``2^-128`` relative (a lower bound).

    Examples
    --------
    >>> import numpy as np
    >>> float(row_l1_norm([np.array([[3.0, -4.0], [1.0, 1.0]])], 0))
    7.0
    """
    c = mpmath.MPContext()
    c.prec = prec
    p = _product(c, matrices)
    total = c.fsum(abs(p[row, j]) for j in range(p.cols))
    return total * (1 - c.ldexp(1, -DISCOUNT_BITS))

