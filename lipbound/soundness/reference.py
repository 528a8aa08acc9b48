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

Each IR stage type has one evaluator in :data:`STAGES`; a new stage type (a graph node) adds one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mpmath
import numpy as np
import torch

from lipbound.errors import NetworkError
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
    """The function of a :class:`~lipbound.network.Network`, evaluated with ``prec``-bit mpmath numbers.

    Parameters
    ----------
    network : Network
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
    """

    def __init__(self, network: Network, prec: int = PREC):
        self.network = network
        self.ctx = mpmath.MPContext()
        self.ctx.prec = prec
        self._stages = [_compile(layer, self.ctx) for layer in network.layers]

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
        for stage in self._stages:
            z = stage(z)
        return z

    def ratio(self, x: Sequence, x2: Sequence, norm: str = "l2", output_index: int | None = None):
        """A lower bound of the Lipschitz constant from the pair ``(x, x2)``.

        ``||f(x) - f(x2)||_2 / ||x - x2||_2`` (``norm="l2"``) or ``|f_i(x) - f_i(x2)| / ||x - x2||_inf``
        (``"linf"``, ``i = output_index``), with ``2^-128 (|f(x)| + |f(x2)|)`` taken off the numerator (see the
        module's error margin). Returns an mpmath number (0 for ``x == x2``).
        """
        c = self.ctx
        a, b = self.vector(x), self.vector(x2)
        fa, fb = self(a), self(b)
        if norm == "l2":
            num, mag = _norm2(c, [u - v for u, v in zip(fa, fb, strict=True)]), _norm2(c, fa) + _norm2(c, fb)
            den = _norm2(c, [u - v for u, v in zip(a, b, strict=True)])
        else:
            i = 0 if output_index is None else output_index
            num, mag = abs(fa[i] - fb[i]), abs(fa[i]) + abs(fb[i])
            den = max(abs(u - v) for u, v in zip(a, b, strict=True))
        if den == 0:
            return c.zero
        num -= c.ldexp(mag, -DISCOUNT_BITS)
        return max(c.zero, num / den * (1 - c.ldexp(1, 16 - c.prec)))


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

