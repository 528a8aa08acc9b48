"""Signal models: a network as stages whose pre-activations are linear in earlier stages' outputs.

Every formulation works on the *signal vector* ``v = [dx; dphi_1; ...; dphi_m]`` (input difference and the
output differences of each nonlinear stage). A :class:`SignalModel` says, for each stage ``k``, how its
pre-activation ``z_k = sum_b P_kb v_b`` is formed, and how the output ``y = sum_b C_b v_b`` is formed:

* feedforward chains: ``z_k = W_{k-1} dphi_{k-1}``;
* residual networks ``x <- x + G phi(W x)``: ``z_k = W_k (x_1 + sum_{j<k} G_j dphi_j)``, first and last
  affine maps included (they stay *inside* the SDP);
* implicit layers ``z = phi(W z + U x)``: a self-loop ``P_kk = W``;
* the MaxMin-as-residual-ReLU rewrite (LipSDP-RR): ``MaxMin(z) = H z + G ReLU(Wt z)``.

Block 0 is the input ``dx``; coefficient matrices of block 0 are stored relative to ``x_1 = W_in dx``
(``W_in`` the first affine map), which is what makes the exact QR input reduction possible.

Matrices that are products of weights are computed in floating point; each carries an entrywise bound on
its distance to the exact product (:class:`Lin`), which the certificate's rounding radius absorbs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lipbound.errors import FormulationError
from lipbound.network import (
    Affine,
    GroupSortLayer,
    HouseholderLayer,
    ImplicitLayer,
    Network,
    ResidualBlock,
    SlopeRestricted,
)
from lipbound.program import UNIT_ROUNDOFF, gamma

_TINY = np.finfo(float).tiny


@dataclass(frozen=True, eq=False)
class Lin:
    """A linear map ``2^power * mat`` (``mat=None``: ``2^power * I``) with entrywise error bound ``2^power * err``.

    ``err`` (in the units of ``mat``) bounds the distance of ``mat`` to ``2^-power`` times the exact map; ``None``
    means exact. Keeping the power apart lets products of extreme weights (``1e200 * 1e200``) stay representable
    until the scaling brings them back to O(1).
    """

    mat: np.ndarray | None
    err: np.ndarray | None = None
    power: int = 0

    def dense(self, n: int) -> np.ndarray:
        return np.ldexp(np.eye(n) if self.mat is None else self.mat, self.power)

    def materialised(self) -> Lin:
        """Same map with ``power`` folded into ``mat`` (identity stays implicit); entries that fall below the
        normal range are off by at most ``2^-1075`` each, which joins the error bound."""
        if self.mat is None or self.power == 0:
            return self
        mat, err = _ldexp_tracked(self.mat, self.err, self.power)
        return Lin(mat, err, 0)

    def scaled(self, power: int) -> Lin:
        """Multiply by ``2**power`` (exact)."""
        return Lin(self.mat, self.err, self.power + int(power))

    @property
    def T(self) -> Lin:  # noqa: N802 - the transpose, as in numpy
        return Lin(None if self.mat is None else self.mat.T, None if self.err is None else self.err.T, self.power)


def _ldexp_tracked(mat: np.ndarray, err: np.ndarray | None, shift) -> tuple[np.ndarray, np.ndarray | None]:
    """``mat * 2^shift`` and its error bound scaled alike (rounded up); entries that lose bits below the normal
    range (at most ``2^-1075`` each) are added to the error bound. Overflow is an error."""
    out = np.ldexp(mat, shift)
    if not np.all(np.isfinite(out)):
        raise FormulationError("a scaled weight product overflows the float64 range; the network's weights are too "
                               "large to be represented even after power-of-two scaling.")
    err = None if err is None else _ldexp_up(err, shift)
    inexact = np.ldexp(out, -np.asarray(shift)) != mat
    if np.any(inexact):
        err = (0.0 if err is None else err) + np.where(inexact, 2.0**-1074, 0.0)
    return out, err


def _normalised(lin: Lin) -> Lin:
    """The same map with ``mat``'s largest entry in ``[1/2, 1)`` (the rest moved into ``power``)."""
    if lin.mat is None:
        return lin
    big = float(np.max(np.abs(lin.mat), initial=0.0))
    if big == 0.0 or not np.isfinite(big):
        return lin
    e = int(np.frexp(big)[1])
    if e == 0:
        return lin
    mat, err = _ldexp_tracked(lin.mat, lin.err, -e)
    return Lin(mat, err, lin.power + e)


def rescaled(lin: Lin, row_exp: int | np.ndarray, col_exp: int | np.ndarray, n_cols: int,
             row_factor: np.ndarray | None = None, col_factor: np.ndarray | None = None) -> Lin:
    """``diag(r)^-1 A diag(c)`` for ``A = lin`` (``n_cols`` columns), with ``r = 2^row_exp row_factor`` and
    ``c = 2^col_exp col_factor`` (scalars broadcast; factors None mean 1).

    The powers of two are exact in binary floating point except where a scaled entry falls below the normal
    range (each such entry is off by at most ``2^-1075``); factors (in ``[1, 2)``) cost two roundings per entry.
    Both join the error bound (error bounds are scaled with upward rounding).
    """
    if np.isscalar(row_exp) and np.isscalar(col_exp) and row_factor is None and col_factor is None:
        return lin.scaled(int(col_exp) - int(row_exp))
    base = lin if lin.mat is not None else Lin(np.eye(n_cols), None, lin.power)
    shift = np.atleast_1d(np.asarray(col_exp, dtype=np.int64))[None, :] - \
        np.atleast_1d(np.asarray(row_exp, dtype=np.int64))[:, None] + base.power
    mat, err = _ldexp_tracked(base.mat, base.err, np.broadcast_to(shift, base.mat.shape))
    if row_factor is None and col_factor is None:
        return Lin(mat, err)
    c = np.ones(mat.shape[1]) if col_factor is None else np.broadcast_to(col_factor, (mat.shape[1],))
    r = np.ones(mat.shape[0]) if row_factor is None else np.broadcast_to(row_factor, (mat.shape[0],))
    scaled = (mat * c[None, :]) / r[:, None]
    # Two roundings per entry (relative 2u + u^2) plus underflow; error bounds scale up with upward rounding.
    rounding = np.where(mat != 0, 3 * UNIT_ROUNDOFF * np.abs(scaled) + 2.0**-1073, 0.0)
    if err is not None:
        rounding = rounding + np.nextafter(np.nextafter(err * c[None, :], np.inf) / r[:, None], np.inf)
    return Lin(scaled, np.nextafter(rounding, np.inf))


def _ldexp_up(x: np.ndarray, shift) -> np.ndarray:
    """``x * 2^shift`` rounded up (``x >= 0``)."""
    out = np.ldexp(x, shift)
    return np.where(np.ldexp(out, -np.asarray(shift)) < x, np.nextafter(out, np.inf), out)


def lmul(a: np.ndarray | None, b: Lin, n: int | None = None) -> Lin:
    """``A @ B`` with ``A`` exact data (``None`` = identity) and a rigorous error bound (in ``mat`` units)."""
    if a is None:
        return b
    if b.mat is None:
        return _normalised(Lin(a, None, b.power))
    b = _normalised(b)
    prod = a @ b.mat
    a_abs = np.abs(a)
    err = gamma(a.shape[1] + 2) * (a_abs @ np.abs(b.mat))
    if b.err is not None:
        err = err + (1 + 4 * UNIT_ROUNDOFF) * (a_abs @ b.err)
    if not np.any(err):
        return _normalised(Lin(prod, None, b.power))
    return _normalised(Lin(prod, err * (1 + 1e-12) + _TINY, b.power))


def lmul_inexact(a: Lin, f: np.ndarray | None, f_err: np.ndarray | None) -> Lin:
    """``A @ F`` where both may carry error bounds (``F=None``: identity; ``f_err`` absolute)."""
    if f is None:
        return a
    if a.mat is None:
        return Lin(f, f_err, a.power)
    a = _normalised(a)
    out = lmul(a.mat, Lin(f)).materialised()
    err = 0 if out.err is None else out.err
    if f_err is not None:
        err = err + (1 + 1e-12) * (np.abs(a.mat) @ f_err)
    if a.err is not None:
        err = err + (1 + 1e-12) * (a.err @ (np.abs(f) + (0 if f_err is None else f_err)))
    return Lin(out.mat, None if np.isscalar(err) else err + _TINY, a.power)


def ladd(a: Lin, b: Lin, n: int) -> Lin:
    """``A + B`` (implicit identities made dense) with error bound, at the larger of the two powers."""
    p = max(a.power, b.power)
    parts = [_ldexp_tracked(np.eye(n) if x.mat is None else x.mat, x.err, x.power - p) for x in (a, b)]
    s = parts[0][0] + parts[1][0]
    err = UNIT_ROUNDOFF * np.abs(s)
    for _, e in parts:
        if e is not None:
            err = err + e
    return _normalised(Lin(s, err * (1 + 1e-12) + _TINY, p))


def combine(terms: dict[int, Lin], extra: dict[int, Lin], n: int) -> dict[int, Lin]:
    out = dict(terms)
    for b, lin in extra.items():
        out[b] = ladd(out[b], lin, n) if b in out else lin
    return out


def apply(a: np.ndarray | None, combo: dict[int, Lin], n: int) -> dict[int, Lin]:
    return {b: lmul(a, lin, n) for b, lin in combo.items()}


@dataclass(frozen=True, eq=False)
class SignalStage:
    """One nonlinear stage: an activation layer and its pre-activation ``z = sum_b pre[b] v_b``.

    ``groups`` (optional, one entry per neuron) partitions the neurons for per-channel multipliers (the channel of
    each neuron of a convolutional layer); ``None`` means every neuron is its own channel.
    """

    layer: SlopeRestricted | GroupSortLayer | HouseholderLayer
    pre: dict[int, Lin]
    name: str = ""
    groups: np.ndarray | None = None

    @property
    def width(self) -> int:
        return self.layer.width


@dataclass(frozen=True, eq=False)
class SignalModel:
    """Stages (blocks 1..m), output map, and the input map ``W_in`` (block 0 is ``dx``, coefficients relative to
    ``W_in dx``)."""

    input_dim: int
    input_map: np.ndarray
    stages: tuple[SignalStage, ...]
    output: dict[int, Lin]
    output_dim: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def block_sizes(self) -> list[int]:
        return [self.input_dim] + [s.width for s in self.stages]

    def coefficient_dim(self, b: int) -> int:
        """Dimension of what block-``b`` coefficients multiply (``W_in dx`` for block 0)."""
        return self.input_map.shape[0] if b == 0 else self.stages[b - 1].width


def _is_linear(layer) -> bool:
    return isinstance(layer, SlopeRestricted) and np.array_equal(layer.alpha, layer.beta)


def maxmin_as_residual_relu(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(H, G, Wt)`` with ``MaxMin(z) = H z + G ReLU(Wt z)`` for (min, max) pairs (QC paper §3)."""
    if n % 2:
        raise FormulationError(f"MaxMin needs an even width, got {n}.")
    k = n // 2
    eye = np.eye(k)
    h = np.kron(eye, np.array([[0.0, 1.0], [0.0, 1.0]]))
    g = np.kron(eye, np.diag([-1.0, 1.0]))
    wt = np.kron(eye, np.array([[-1.0, 1.0], [1.0, -1.0]]))
    return h, g, wt


def signal_model(network: Network, maxmin_as_relu: bool = False) -> SignalModel:
    """Convert a network to its signal model.

    Exactly linear activation layers (``alpha == beta``) are folded into the coefficient matrices (their
    LipSDP multiplier would have to be infinite). With ``maxmin_as_relu``, MaxMin layers (GroupSort of group
    size 2) become residual ReLU layers (the LipSDP-RR baseline).
    """
    layers = network.layers
    w_in = layers[0].weight
    n1 = w_in.shape[0]
    combo: dict[int, Lin] = {0: Lin(None)}  # the current signal, as a combination of blocks
    width = n1
    stages: list[SignalStage] = []
    notes: list[str] = []

    def add_stage(layer, pre: dict[int, Lin], name: str) -> int:
        stages.append(SignalStage(layer, pre, name))
        return len(stages)

    def activation(layer, pre: dict[int, Lin], name: str, n: int) -> dict[int, Lin]:
        """Apply an element-wise/group activation to the signal ``pre``; return its output combination."""
        if _is_linear(layer):
            if np.all(layer.alpha == 1.0):
                return pre
            return apply(np.diag(layer.alpha), pre, n)
        if maxmin_as_relu and isinstance(layer, GroupSortLayer) and layer.group_size == 2:
            from lipbound.activations import ActivationSpec

            h, g, wt = maxmin_as_residual_relu(n)
            relu = SlopeRestricted(ActivationSpec("relu"), n, name=f"{name}_rr_relu")
            k = add_stage(relu, apply(wt, pre, n), f"{name} (ReLU of the MaxMin rewrite)")
            return combine(apply(h, pre, n), {k: Lin(g)}, n)
        if isinstance(layer, (ResidualBlock, ImplicitLayer)):
            raise FormulationError(f"nested block '{layer.name}' inside another block is not supported.")
        if isinstance(layer, GroupSortLayer) or isinstance(layer, HouseholderLayer) \
                or isinstance(layer, SlopeRestricted):
            k = add_stage(layer, pre, name)
            return {k: Lin(None)}
        raise FormulationError(f"layer '{getattr(layer, 'name', layer)}' ({type(layer).__name__}) has no quadratic "
                               "constraint in lipbound.")

    for layer in layers[1:]:
        if isinstance(layer, Affine):
            combo = apply(layer.weight, combo, width)
            width = layer.out_dim
            continue
        if isinstance(layer, ResidualBlock):
            pre = apply(layer.inner.weight, combo, width)
            out = activation(layer.activation, pre, layer.name, layer.inner.out_dim)
            if layer.outer is not None:
                out = apply(layer.outer.weight, out, layer.inner.out_dim)
            combo = combine(combo, out, width)
            continue
        if isinstance(layer, ImplicitLayer):
            if not isinstance(layer.activation, (SlopeRestricted, GroupSortLayer, HouseholderLayer)) or \
                    _is_linear(layer.activation):
                raise FormulationError(f"implicit layer '{layer.name}': its activation must be nonlinear.")
            k = len(stages) + 1
            pre = combine(apply(layer.input_weight, combo, width), {k: Lin(layer.weight)}, layer.width)
            add_stage(layer.activation, pre, layer.name)
            notes.append(f"implicit layer '{layer.name}': assumes a unique fixed point for every input "
                         f"(well-posedness); s||W|| = {layer.contraction_factor():.4g}"
                         + (" < 1, so it is guaranteed (contraction)." if layer.contraction_factor() < 1
                            else " >= 1: not guaranteed by contraction, the bound holds for well-posed models."))
            combo = {k: Lin(None)}
            width = layer.width
            continue
        combo = activation(layer, combo, layer.name, width)
    return SignalModel(network.input_dim, w_in, tuple(stages), combo, network.output_dim, tuple(notes))
