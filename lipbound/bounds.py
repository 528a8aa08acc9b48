"""Activation-bound analysis: rigorous pre-activation bounds over input domains, local slope bounds.

Given a network and an input domain (a :class:`Box` or a :class:`Ball`), :func:`activation_bounds`
returns, for every nonlinear layer, elementwise lower/upper bounds on its *pre-activations* that hold
for every input in the domain. :func:`local_slopes` turns them into per-neuron slope bounds (a network
with narrowed ``alpha``/``beta``) for local Lipschitz certificates; :func:`stable_neurons` counts
neurons whose ReLU phase is fixed on the domain.

Methods
-------
``"ibp"`` (interval bound propagation)
    Affine maps in centre/radius form; activations through rigorous image enclosures: monotone
    activations (ReLU, LeakyReLU with slope >= 0, identity, tanh, sigmoid, ELU with alpha >= 0,
    softplus) by their endpoint values; "valley" activations that decrease up to a critical bracket
    ``[a, b]`` and increase after it (GELU, SiLU, Mish, LeakyReLU with slope < 0, ELU with alpha < 0)
    by the endpoint values and an enclosure of the minimum (the critical points of GELU, SiLU and Mish
    are found numerically and the monotonicity on both sides is *proved* with
    :func:`lipbound.slopes.slope_bounds` on ``(-inf, a]`` and ``[b, inf)``); PolyReLU by the natural
    interval extension of its polynomial intersected with the mean-value form (endpoint values where
    ``slope_bounds`` proves monotonicity). The first affine map is concretised over the domain itself
    (dual norm for balls), not over its enclosing box.
``"crown"`` (backward linear relaxation)
    For chains of affine maps and slope-restricted activations. Each activation gets linear lower and
    upper bounds ``s_l z + i_l <= phi(z) <= s_u z + i_u`` on its pre-activation interval ``[l, u]``. The
    *slopes* are chosen heuristically in floating point: among tangents (mid-ranges of the slope bounds of
    64 grid pieces), the chord and secants from either end through grid points, the line with the least
    area between it and the graph (estimated on the grid) wins; for ReLU this is CROWN's triangle with
    the adaptive lower slope. The *intercepts* are then computed rigorously for whatever slope was chosen:
    with ``g = phi - s z`` and slope ranges ``[alpha_k, beta_k]`` of ``phi`` (from
    :func:`~lipbound.slopes.slope_bounds`) on the pieces ``[p_k, q_k]`` of the grid (which contains the
    kink 0), ``min g >= min_k max(g(q_k) - (beta_k - s)^+ h_k, g(p_k) + (alpha_k - s)^- h_k)``, with
    ``g(p)`` from rigorous point enclosures of ``phi``; the bottleneck piece is split twice more into 8.
    This is exact on pieces where ``g`` is monotone, so tangent and chord lines are nearly exact, and
    soundness never depends on convexity or on the slope choice. The backward pass (CROWN) substitutes
    the lines according to the sign of each coefficient, goes through the affine maps, and the result is
    concretised over the domain (dual norm for balls). Every layer is intersected elementwise with IBP,
    so CROWN is never looser than IBP. Stages without a linear relaxation (GroupSort, Householder,
    residual blocks) are passed by IBP and the backward pass restarts from their output box; this is
    logged (warning) on the ``"lipbound"`` logger.

GroupSort, Householder and residual blocks (IBP)
    GroupSort: the k-th order statistic of a group is non-decreasing in every coordinate, so the bounds
    are the sorted lower and the sorted upper ends. Householder: the rigorously bounded sign of ``v^T z``
    selects the branch (identity, reflection, or the hull of both); the reflection is bounded as an
    interval matrix that covers both ``I - 2 v v^T`` with the stored float vector and the exact
    reflection with ``v / ||v||``; every coordinate is finally clipped to ``+-||R||_2 max ||z||_2`` (the
    output has the norm of the input). Residual blocks ``x + G phi(W x + b) + c``: ``W x + b`` by IBP
    (intersected with CROWN through the preceding chain), then the sum of the boxes.

Implicit (equilibrium) layers are rejected with a :class:`~lipbound.errors.FormulationError`.

Rounding model (soundness in floating point)
--------------------------------------------
All arithmetic is float64. Every bound holds for the *exact* real network on every input of the domain:

* Matrix products (torch, any summation order, FMA or not) are widened by Higham's bound
  ``|fl(sum a_i x_i) - sum a_i x_i| <= gamma_n sum |a_i x_i|``: we use ``3 (n + 4) u >= 2 gamma_{n+4}``
  times a computed magnitude (``u = 2^-53``), plus ``(n + 8)`` times the smallest normal number for
  underflow (also under flush-to-zero). In the backward pass the difference between a computed and the
  exact product matrix is charged to the constant term through a bound on the magnitude of the variable
  it multiplies (known from the bounds of earlier layers).
* Scalar operations are rounded outward (``nextafter`` plus the smallest normal number).
* Transcendental functions (numpy's ``exp``, ``expm1``, ``log1p``, ``tanh``) are not correctly rounded:
  their results are widened by ``16 eps ~ 3.6e-15`` relative (a generous bound: glibc and numpy's SIMD
  kernels are documented to <= 4 ulp) plus ``1e-300`` absolute, as in :mod:`lipbound.slopes`.
  ``scipy.special.ndtr`` (GELU) is widened by the argument-conditioning model of
  :mod:`lipbound.slopes` (doubled): ``(16 x^2 + 64) eps min(Phi, 1 - Phi) + 16 eps Phi + 1e-300``.
  Activations are evaluated through cancellation-free formulas (``e^{-|x|}``, ``expm1``, ``log1p``),
  not with torch's forward functions (e.g. ``F.gelu`` cancels in ``1 + erf``).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize
import scipy.special
import torch

from lipbound.activations import ActivationSpec
from lipbound.errors import FormulationError, LipboundError
from lipbound.network import (
    GroupSortLayer,
    HouseholderLayer,
    ImplicitLayer,
    Network,
    ResidualBlock,
    SlopeRestricted,
)
from lipbound.slopes import slope_bounds

__all__ = ["Ball", "Box", "DomainError", "activation_bounds", "local_slopes", "stable_neurons"]

log = logging.getLogger("lipbound")

_U = 2.0**-53  # unit roundoff
_EPS = 2.0**-52
_TINY = 2.0**-1022  # smallest normal number: covers underflow of one operation (also with flush-to-zero)
_LIBM_REL = 16.0 * _EPS  # relative error allowance of numpy's exp/expm1/log1p/tanh
_LIBM_ABS = 1e-300  # absolute error allowance of every libm result (subnormal range)
_HUGE = 1e150  # neurons with larger pre-activation bounds get constant relaxations (no overflow)
_GRID = 64  # pieces of the uniform grid of a relaxation interval (plus the kink 0)
_SPLIT = 8  # refinement of the bottleneck piece of a rigorous intercept ...
_ROUNDS = 2  # ... done this many times
_CHUNK = 512  # neurons relaxed at once (bounds the memory of the candidate search)
_F64 = torch.float64

Bounds = dict[str, tuple[np.ndarray, np.ndarray]]


class DomainError(LipboundError, ValueError):
    """An input domain is invalid (shape, NaN/inf, empty) or does not match the network."""


# ----------------------------------------------------------------------------------------------
# Directed rounding helpers (numpy and torch)
# ----------------------------------------------------------------------------------------------


def _dn(x: np.ndarray) -> np.ndarray:
    """A float <= the exact result that was rounded to nearest to give ``x``."""
    return np.nextafter(x, -np.inf) - _TINY


def _up(x: np.ndarray) -> np.ndarray:
    """A float >= the exact result that was rounded to nearest to give ``x``."""
    return np.nextafter(x, np.inf) + _TINY


def _tdn(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, -math.inf)) - _TINY


def _tup(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, math.inf)) + _TINY


def _rel(n: int) -> float:
    """``3 (n + 4) u``: at least twice Higham's ``gamma_{n+4}`` (covers the rounding of the bound itself)."""
    k = (n + 4) * _U
    if k > 1e-3:
        raise FormulationError(f"dimension {n} is too large for the rounding-error analysis of the bounds.")
    return 3.0 * k


def _nan_to(x: torch.Tensor, value: float) -> torch.Tensor:
    """Replace NaN (from ``inf - inf`` or ``0 * inf``: an unknown quantity) by the sound default ``value``."""
    return torch.where(torch.isnan(x), torch.full_like(x, value), x)


def _mv(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product ``a (..., m, n) @ x (..., n) -> (..., m)``."""
    return (a @ x.unsqueeze(-1)).squeeze(-1)


def _abs_term(n: int, magnitude: torch.Tensor | float = 0.0) -> torch.Tensor | float:
    """Underflow allowance of ``n``-term dot products whose factors are bounded by ``magnitude``."""
    return (n + 8) * _TINY * (2.0 + magnitude)


# ----------------------------------------------------------------------------------------------
# Rigorous affine maps over boxes and domains (torch)
# ----------------------------------------------------------------------------------------------


def _center_radius(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Floats ``c``, ``r`` with ``[lo, hi]`` contained in ``[c - r, c + r]`` (exactly)."""
    fin = torch.isfinite(lo) & torch.isfinite(hi)
    c = torch.where(fin, 0.5 * lo + 0.5 * hi, torch.zeros_like(lo))  # any float works as a centre
    r = _tup(torch.maximum(hi - c, c - lo))  # fl(hi - c) is rounded to nearest: one step up encloses it
    return c, torch.where(fin, r, torch.full_like(r, math.inf))


def _center_terms(a: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t = fl(a c + d)`` and ``err >= |t - (a c + d)|`` (exact)."""
    n = a.shape[-1]
    t = _mv(a, c) + d
    mag = _mv(a.abs(), c.abs()) + d.abs()
    err = _tup(_tup(_rel(n + 1) * mag) + _abs_term(n))
    return t, _nan_to(err, math.inf)


def _bound_sum(t: torch.Tensor, spread: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outward-rounded ``t -+ spread -+ err`` (lower, upper), NaN mapped to -inf/+inf."""
    lo = _tdn(_tdn(t - spread) - err)
    hi = _tup(_tup(t + spread) + err)
    return _nan_to(lo, -math.inf), _nan_to(hi, math.inf)


def _box_spread(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A float >= ``|a| r`` (exact), i.e. >= max of ``a (x - c)`` over ``|x - c| <= r``."""
    n = a.shape[-1]
    q = _mv(a.abs(), r)
    return _nan_to(_tup(_tup(q * (1.0 + _rel(n))) + _abs_term(n)), math.inf)


def _affine_box(w: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                w_err: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigorous bounds of ``M x + b`` over ``x`` in ``[lo, hi]`` for every real ``M`` with ``|M - w| <= w_err``."""
    c, r = _center_radius(lo, hi)
    t, err = _center_terms(w, b, c)
    spread = _box_spread(w, r)
    if w_err is not None:
        xmax = torch.maximum(lo.abs(), hi.abs())
        spread = _tup(spread + _box_spread(w_err, xmax))
    return _bound_sum(t, spread, err)


class _Concretizer:
    """Rigorous lower/upper bounds of linear functions ``a x + d`` over a domain (torch, float64)."""

    def __init__(self, kind: str, center: torch.Tensor, radius: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor]):
        self.kind = kind  # "box": radius is a vector with the box inside [c - r, c + r]; "l2"/"linf": a scalar
        self.center = center
        self.radius = radius
        self.box = box

    @classmethod
    def from_box(cls, lo: torch.Tensor, hi: torch.Tensor) -> _Concretizer:
        c, r = _center_radius(lo, hi)
        return cls("box", c, r, (lo, hi))

    def spread(self, a: torch.Tensor) -> torch.Tensor:
        """A float >= max over the domain of ``a (x - c)``, per row (the dual norm for balls)."""
        if self.kind == "box":
            return _box_spread(a, self.radius)
        n = a.shape[-1]
        if self.kind == "l2":
            sq = (a * a).sum(-1)  # exact sum <= fl(sum) (1 + rel) + underflow
            norm = _tup(torch.sqrt(_tup(_tup(sq * (1.0 + _rel(n))) + _abs_term(n))))
        else:
            s1 = a.abs().sum(-1)
            norm = _tup(_tup(s1 * (1.0 + _rel(n))) + _abs_term(n))
        return _nan_to(_tup(self.radius * norm), math.inf)

    def bounds(self, a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, err = _center_terms(a, d, self.center)
        return _bound_sum(t, self.spread(a), err)

    def lower(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.bounds(a, d)[0]

    def upper(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.bounds(a, d)[1]


# ----------------------------------------------------------------------------------------------
# Input domains
# ----------------------------------------------------------------------------------------------


def _vector(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise DomainError(f"{what} must be a 1-D array of real numbers, got {type(value).__name__}.") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise DomainError(f"{what} must be a non-empty 1-D array (n,), got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise DomainError(f"{what} (shape {arr.shape}) must be finite; entry {i} is {arr[i]}.")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Box:
    """The box ``{x : lower <= x <= upper}`` (elementwise).

    Parameters
    ----------
    lower, upper : array_like, shape (n,)
        Finite ends with ``lower <= upper``; ``lower == upper`` gives a single point.

    Examples
    --------
    >>> box = Box([-1.0, 0.0], [1.0, 2.0])
    >>> box.dim
    2
    >>> lo, hi = box.linear_bounds([[1.0, -1.0]])  # x_0 - x_1 over the box
    >>> float(lo[0]) <= -3.0, float(hi[0]) >= 1.0
    (True, True)
    """

    lower: np.ndarray
    upper: np.ndarray

    def __post_init__(self):
        lower = _vector(self.lower, "Box lower")
        upper = _vector(self.upper, "Box upper")
        if lower.shape != upper.shape:
            raise DomainError(f"Box lower has shape {lower.shape} but upper has shape {upper.shape}; they must match.")
        if np.any(lower > upper):
            i = int(np.flatnonzero(lower > upper)[0])
            raise DomainError(f"Box (shape {lower.shape}) is empty: lower[{i}] = {lower[i]} > upper[{i}] = {upper[i]}.")
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)

    @property
    def dim(self) -> int:
        """Dimension ``n`` of the domain."""
        return int(self.lower.size)

    def enclosing_box(self) -> tuple[np.ndarray, np.ndarray]:
        """The box itself, as ``(lower, upper)`` copies.

        Examples
        --------
        >>> Box([0.0], [1.0]).enclosing_box()
        (array([0.]), array([1.]))
        """
        return self.lower.copy(), self.upper.copy()

    def linear_bounds(self, a: Any, b: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Rigorous bounds of ``a x + b`` over the box: ``a c + b -+ |a| r`` (centre ``c``, half-widths ``r``).

        Parameters
        ----------
        a : array_like, shape (m, n) or (n,)
        b : array_like, shape (m,), optional

        Returns
        -------
        lower, upper : ndarray, shape (m,)
            Outward rounded: they enclose the exact range.

        Examples
        --------
        >>> lo, hi = Box([0.0, 0.0], [1.0, 1.0]).linear_bounds([1.0, 1.0], [0.5])
        >>> float(lo[0]) <= 0.5 <= 2.5 <= float(hi[0])
        True
        """
        return _linear_bounds(self, a, b)

    def _concretizer(self, device: torch.device) -> _Concretizer:
        lo = torch.tensor(self.lower, dtype=_F64, device=device)
        hi = torch.tensor(self.upper, dtype=_F64, device=device)
        return _Concretizer.from_box(lo, hi)


@dataclass(frozen=True, eq=False)
class Ball:
    """The norm ball ``{x : ||x - center|| <= radius}`` with ``norm`` ``"l2"`` or ``"linf"``.

    Parameters
    ----------
    center : array_like, shape (n,)
    radius : float
        Finite and ``>= 0`` (``0`` gives a single point).
    norm : {"l2", "linf"}

    Examples
    --------
    >>> ball = Ball([0.0, 0.0], 1.0, norm="l2")
    >>> lo, hi = ball.linear_bounds([[3.0, 4.0]])  # 3 x_0 + 4 x_1 ranges over [-5, 5]
    >>> bool(-5.000001 < lo[0] <= -5.0), bool(5.0 <= hi[0] < 5.000001)
    (True, True)
    """

    center: np.ndarray
    radius: float
    norm: str = "l2"

    def __post_init__(self):
        center = _vector(self.center, "Ball center")
        try:
            radius = float(self.radius)
        except (TypeError, ValueError) as exc:
            raise DomainError(f"Ball radius must be a real number, got {self.radius!r}.") from exc
        if not math.isfinite(radius) or radius < 0:
            raise DomainError(f"Ball radius must be finite and >= 0, got {radius} (center shape {center.shape}).")
        if self.norm not in ("l2", "linf"):
            raise DomainError(f"Ball norm must be 'l2' or 'linf', got {self.norm!r}.")
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "radius", radius)

    @property
    def dim(self) -> int:
        """Dimension ``n`` of the domain."""
        return int(self.center.size)

    def enclosing_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Outward-rounded ``(center - radius, center + radius)``.

        Examples
        --------
        >>> lo, hi = Ball([1.0], 0.5, norm="linf").enclosing_box()
        >>> bool(lo[0] <= 0.5 and hi[0] >= 1.5)
        True
        """
        return _dn(self.center - self.radius), _up(self.center + self.radius)

    def linear_bounds(self, a: Any, b: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Rigorous bounds of ``a x + b`` over the ball: ``a c + b -+ radius ||a_i||_*`` (dual norm).

        The dual norm is ``||.||_2`` for the l2 ball and ``||.||_1`` for the linf ball.

        Parameters
        ----------
        a : array_like, shape (m, n) or (n,)
        b : array_like, shape (m,), optional

        Returns
        -------
        lower, upper : ndarray, shape (m,)

        Examples
        --------
        >>> lo, hi = Ball([0.0, 0.0], 1.0, norm="linf").linear_bounds([[1.0, -2.0]])
        >>> bool(lo[0] <= -3.0 and hi[0] >= 3.0)
        True
        """
        return _linear_bounds(self, a, b)

    def _concretizer(self, device: torch.device) -> _Concretizer:
        c = torch.tensor(self.center, dtype=_F64, device=device)
        lo, hi = (torch.tensor(v, dtype=_F64, device=device) for v in self.enclosing_box())
        return _Concretizer(self.norm, c, torch.tensor(self.radius, dtype=_F64, device=device), (lo, hi))


Domain = Box | Ball


def _linear_bounds(domain: Domain, a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    if a.ndim != 2 or a.shape[1] != domain.dim:
        raise DomainError(f"linear_bounds: a must have shape (m, {domain.dim}) for this domain, got {a.shape}.")
    b = np.zeros(a.shape[0]) if b is None else np.asarray(b, dtype=np.float64).reshape(-1)
    if b.shape != (a.shape[0],):
        raise DomainError(f"linear_bounds: b must have shape ({a.shape[0]},), got {b.shape}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise DomainError("linear_bounds: a and b must be finite.")
    dev = torch.device("cpu")
    lo, hi = domain._concretizer(dev).bounds(torch.tensor(a, dtype=_F64), torch.tensor(b, dtype=_F64))
    return lo.numpy(), hi.numpy()


# ----------------------------------------------------------------------------------------------
# Rigorous scalar activation enclosures (numpy)
# ----------------------------------------------------------------------------------------------


def _widen(v: np.ndarray, rel: float = _LIBM_REL) -> tuple[np.ndarray, np.ndarray]:
    """Enclosure of the exact values behind libm results ``v`` (relative error <= rel, absolute 1e-300)."""
    slack = np.where(np.isfinite(v), rel * np.abs(v) + _LIBM_ABS, 0.0)
    return _dn(v - slack), _up(v + slack)


def _mul_pt(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Enclosure of ``x * [lo, hi]`` for float points ``x``."""
    p, q = x * lo, x * hi
    return _dn(np.fmin(p, q)), _up(np.fmax(p, q))


def _mul_const(c: float, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Enclosure of ``c * [lo, hi]`` for a float constant ``c``."""
    if c >= 0:
        return _dn(c * lo), _up(c * hi)
    return _dn(c * hi), _up(c * lo)


def _sigmoid_enc(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sigma(x)`` via ``e = e^{-|x|}``: ``1 / (1 + e)`` for ``x >= 0``, ``e / (1 + e)`` otherwise."""
    elo, ehi = _widen(np.exp(-np.abs(x)))
    elo = np.maximum(elo, 0.0)
    pos = x >= 0
    # 1/(1+e) decreases and e/(1+e) increases in e.
    lo = np.where(pos, _dn(1.0 / _up(1.0 + ehi)), _dn(elo / _up(1.0 + elo)))
    hi = np.where(pos, _up(1.0 / _dn(1.0 + elo)), _up(ehi / _dn(1.0 + ehi)))
    return np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)


def _softplus_unit(y: np.ndarray, upper: bool) -> np.ndarray:
    """Lower (or upper) bound of ``log(1 + e^y) = max(y, 0) + log1p(e^{-|y|})`` at float points ``y``."""
    tlo, thi = _widen(np.exp(-np.abs(y)))
    t = thi if upper else np.maximum(tlo, 0.0)
    llo, lhi = _widen(np.log1p(t))  # log1p is increasing
    if upper:
        return _up(np.maximum(y, 0.0) + lhi)
    return _dn(np.maximum(y, 0.0) + np.maximum(llo, 0.0))


def _softplus_enc(x: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``log(1 + e^{beta x}) / beta``: the argument ``beta x`` is enclosed, the function is increasing in it."""
    ylo, yhi = _mul_const(beta, x, x)
    flo, fhi = _softplus_unit(ylo, upper=False), _softplus_unit(yhi, upper=True)
    if beta > 0:
        return _dn(flo / beta), _up(fhi / beta)
    return _dn(fhi / beta), _up(flo / beta)


def _ndtr_enc(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Phi(x)`` by scipy's ``ndtr``, widened by twice the error model of :mod:`lipbound.slopes`."""
    v = scipy.special.ndtr(x)
    tail = np.minimum(v, 1.0 - v)
    err = (16.0 * np.minimum(x * x, 1600.0) + 64.0) * _EPS * tail + 16.0 * _EPS * v + _LIBM_ABS
    return np.clip(_dn(v - err), 0.0, 1.0), np.clip(_up(v + err), 0.0, 1.0)


# tanh-form GELU constants k = sqrt(2/pi) and c = 0.044715, enclosed (the bounds hold for the exact constants and
# for their float64 roundings).
_GT_K = (math.nextafter(0.7978845608028654, 0.0), math.nextafter(0.7978845608028654, 1.0))
_GT_C = (math.nextafter(0.044715, 0.0), math.nextafter(0.044715, 1.0))


def _interval_product(alo, ahi, blo, bhi) -> tuple[np.ndarray, np.ndarray]:
    """Outward-rounded ``[alo, ahi] * [blo, bhi]`` (finite or infinite ends, no NaN inputs)."""
    p = np.stack([alo * blo, alo * bhi, ahi * blo, ahi * bhi])
    return _dn(np.nanmin(p, axis=0)), _up(np.nanmax(p, axis=0))


def _gelu_tanh_enc(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x (1 + tanh u) / 2 = x sigma(2u)``, ``u = k (x + c x^3)``: ``2u`` is enclosed and ``sigma`` is increasing."""
    sq = _dn(x * x), _up(x * x)
    cube = _mul_pt(x, *sq)
    slo, shi = _interval_product(_GT_C[0], _GT_C[1], *cube)
    slo, shi = _dn(x + slo), _up(x + shi)
    ylo, yhi = _interval_product(2.0 * _GT_K[0], 2.0 * _GT_K[1], slo, shi)
    return _mul_pt(x, _sigmoid_enc(ylo)[0], _sigmoid_enc(yhi)[1])


def _poly_range(coefficients: tuple[float, ...], p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Natural interval extension of ``sum_i a_i x^i`` on ``[p, q]``, ``0 <= p <= q`` (powers are monotone)."""
    lo = np.full(p.shape, coefficients[0])
    hi = lo.copy()
    plo, phi = np.ones_like(p), np.ones_like(q)
    for a in coefficients[1:]:
        plo, phi = np.maximum(_dn(plo * p), 0.0), _up(phi * q)
        if a == 0.0:
            continue
        tlo, thi = _mul_const(a, plo, phi)
        lo, hi = _dn(lo + tlo), _up(hi + thi)
    return np.where(np.isnan(lo), -np.inf, lo), np.where(np.isnan(hi), np.inf, hi)


def _eval(spec: ActivationSpec, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rigorous enclosure ``[lo, hi]`` of ``phi(x)`` at float points ``x`` (``[-inf, inf]`` at infinite ``x``)."""
    x = np.asarray(x, dtype=np.float64)
    fin = np.isfinite(x)
    xf = np.where(fin, x, 0.0)
    name, p = spec.name, spec.params
    with np.errstate(all="ignore"):
        if name == "identity":
            lo, hi = xf, xf
        elif name == "relu":
            lo = hi = np.maximum(xf, 0.0)
        elif name == "leaky_relu":
            slo, shi = _mul_const(float(p["negative_slope"]), xf, xf)
            lo, hi = np.where(xf >= 0, xf, slo), np.where(xf >= 0, xf, shi)
        elif name == "tanh":
            lo, hi = _widen(np.tanh(xf))
            lo, hi = np.clip(lo, -1.0, 1.0), np.clip(hi, -1.0, 1.0)
        elif name == "sigmoid":
            lo, hi = _sigmoid_enc(xf)
        elif name == "elu":
            elo, ehi = _widen(np.expm1(np.minimum(xf, 0.0)))
            nlo, nhi = _mul_const(float(p["alpha"]), np.clip(elo, -1.0, 0.0), np.clip(ehi, -1.0, 0.0))
            lo, hi = np.where(xf >= 0, xf, nlo), np.where(xf >= 0, xf, nhi)
        elif name == "softplus":
            lo, hi = _softplus_enc(xf, float(p["beta"]))
        elif name == "gelu":
            lo, hi = _mul_pt(xf, *_ndtr_enc(xf))
        elif name == "gelu_tanh":
            lo, hi = _gelu_tanh_enc(xf)
        elif name == "silu":
            lo, hi = _mul_pt(xf, *_sigmoid_enc(xf))
        elif name == "mish":
            splo, sphi = _softplus_enc(xf, 1.0)
            tlo, _ = _widen(np.tanh(np.maximum(splo, 0.0)))
            _, thi = _widen(np.tanh(sphi))
            lo, hi = _mul_pt(xf, np.clip(tlo, 0.0, 1.0), np.clip(thi, 0.0, 1.0))
        elif name == "polyrelu":
            coefs = p["coefficients"]
            xp = np.maximum(xf, 0.0)
            plo, phi = _poly_range(coefs, xp, xp)
            lo, hi = np.where(xf < 0, coefs[0], plo), np.where(xf < 0, coefs[0], phi)
        else:  # pragma: no cover - ActivationSpec validates the name
            raise FormulationError(f"activation '{name}' has no rigorous evaluation.")
    lo = np.where(fin & ~np.isnan(lo), lo, -np.inf)
    hi = np.where(fin & ~np.isnan(hi), hi, np.inf)
    return lo, hi


@functools.lru_cache(maxsize=64)
def _valley(spec: ActivationSpec) -> tuple[float, float, float, float] | None:
    """``(a, b, m_lo, m_hi)`` if ``phi`` is non-increasing on ``(-inf, a]`` and non-decreasing on ``[b, inf)``
    with ``phi([a, b])`` inside ``[m_lo, m_hi]``; ``None`` if ``phi`` is non-decreasing."""
    name, p = spec.name, spec.params
    if name == "leaky_relu":
        return (0.0, 0.0, 0.0, 0.0) if p["negative_slope"] < 0 else None
    if name == "elu":
        return (0.0, 0.0, 0.0, 0.0) if p["alpha"] < 0 else None
    if name not in ("gelu", "gelu_tanh", "silu", "mish"):
        return None  # relu, identity, tanh, sigmoid, softplus (any beta) are non-decreasing

    def dphi(t: float) -> float:
        lo, hi = slope_bounds(name, t, t)
        return float(0.5 * (lo + hi))

    root = scipy.optimize.brentq(dphi, -2.0, -0.5, xtol=1e-15)
    delta = 2.0**-30
    for _ in range(12):
        a, b = root - delta, root + delta
        # Proof of the monotonicity on both sides: rigorous ranges of phi' (limits at infinity included).
        _, beta_left = slope_bounds(name, -np.inf, a)
        alpha_right, _ = slope_bounds(name, b, np.inf)
        if beta_left <= 0 and alpha_right >= 0:
            break
        delta *= 4.0
    else:  # pragma: no cover - the critical points are simple
        raise FormulationError(f"could not isolate the minimum of '{name}' rigorously.")
    alpha, beta = slope_bounds(name, a, b)
    width = float(_up(np.float64(b - a)))
    alo, ahi = _eval(spec, np.array([a]))
    m_lo = _dn(alo[0] + _dn(min(float(alpha), 0.0) * width))
    m_hi = _up(ahi[0] + _up(max(float(beta), 0.0) * width))
    return float(a), float(b), float(m_lo), float(m_hi)


def _image(spec: ActivationSpec, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rigorous enclosure of ``phi([lo, hi])`` (elementwise)."""
    fin = np.isfinite(lo) & np.isfinite(hi)
    if spec.name == "polyrelu":
        out_lo, out_hi = _polyrelu_image(tuple(spec.params["coefficients"]), np.where(fin, lo, 0.0),
                                         np.where(fin, hi, 0.0))
    else:
        llo, lhi = _eval(spec, lo)
        ulo, uhi = _eval(spec, hi)
        valley = _valley(spec)
        if valley is None:
            out_lo, out_hi = llo, uhi
        else:
            a, b, m_lo, m_hi = valley
            out_lo = np.where(hi <= a, ulo, np.where(lo >= b, llo, m_lo))
            meets = (lo <= b) & (hi >= a)
            out_hi = np.maximum(np.maximum(lhi, uhi), np.where(meets, m_hi, -np.inf))
    return np.where(fin, out_lo, -np.inf), np.where(fin, out_hi, np.inf)


def _polyrelu_image(coefs: tuple[float, ...], lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``phi = a_0`` on ``x < 0`` and the polynomial ``P`` on ``x >= 0``: hull of both parts met by ``[lo, hi]``."""
    out_lo, out_hi = np.full(lo.shape, np.inf), np.full(lo.shape, -np.inf)
    neg = lo < 0
    out_lo[neg], out_hi[neg] = coefs[0], coefs[0]
    pos = hi >= 0
    if np.any(pos):
        p, q = np.maximum(lo[pos], 0.0), hi[pos]
        with np.errstate(all="ignore"):
            nlo, nhi = _poly_range(coefs, p, q)  # natural extension
            alpha, beta = slope_bounds("polyrelu", p, q, coefficients=coefs)
            m = np.clip(p + 0.5 * (q - p), p, q)
            mlo, mhi = _poly_range(coefs, m, m)
            dl, dh = _dn(p - m), _up(q - m)  # dl <= 0 <= dh
            prods = np.stack([alpha * dl, alpha * dh, beta * dl, beta * dh])
            vlo = _dn(mlo + _dn(np.nanmin(prods, axis=0)))  # mean-value form
            vhi = _up(mhi + _up(np.nanmax(prods, axis=0)))
            rlo, rhi = np.fmax(nlo, vlo), np.fmin(nhi, vhi)
            plo, phi_p = _poly_range(coefs, p, p)
            qlo, qhi = _poly_range(coefs, q, q)
            inc, dec = alpha >= 0, beta <= 0  # proved monotone: endpoint values
            rlo = np.where(inc, np.fmax(rlo, plo), np.where(dec, np.fmax(rlo, qlo), rlo))
            rhi = np.where(inc, np.fmin(rhi, qhi), np.where(dec, np.fmin(rhi, phi_p), rhi))
        out_lo[pos] = np.minimum(out_lo[pos], np.where(np.isnan(rlo), -np.inf, rlo))
        out_hi[pos] = np.maximum(out_hi[pos], np.where(np.isnan(rhi), np.inf, rhi))
    return out_lo, out_hi


# ----------------------------------------------------------------------------------------------
# Linear relaxations (numpy)
# ----------------------------------------------------------------------------------------------


def _piece_lower(p: np.ndarray, q: np.ndarray, gp: np.ndarray, gq: np.ndarray, alpha: np.ndarray,
                 beta: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Rigorous lower bound of ``min g`` on ``[p, q]`` for ``g = phi - s z``.

    ``gp <= g(p)``, ``gq <= g(q)``, and every difference quotient of ``phi`` on ``[p, q]`` lies in
    ``[alpha, beta]``: then ``g(z) >= g(q) - (beta - s)^+ (q - p)`` and ``g(z) >= g(p) + (alpha - s)^- (q - p)``.
    """
    h = _up(q - p)
    aneg = np.minimum(_dn(alpha - s), 0.0)
    bpos = np.maximum(_up(beta - s), 0.0)
    return np.fmax(_dn(gq - _up(bpos * h)), _dn(gp + _dn(aneg * h)))


def _intercept(spec: ActivationSpec, pts: np.ndarray, flo: np.ndarray, fhi: np.ndarray, alpha: np.ndarray,
               beta: np.ndarray, s: np.ndarray, upper: bool) -> np.ndarray:
    """A float ``i`` with ``s z + i <= phi(z)`` (``upper``: ``>=``) for all ``z`` in ``[pts[:, 0], pts[:, -1]]``.

    Pieces of the grid ``pts`` are bounded by :func:`_piece_lower`; the bottleneck piece of every neuron is
    then split into 8 (``_ROUNDS`` times), which makes the bound exact up to ``phi'' h^2 / 64^_ROUNDS`` where
    ``g`` is not monotone. The upper case is the lower case of ``-phi`` (negation is exact).
    """
    sign = -1.0 if upper else 1.0
    if upper:
        flo, fhi, alpha, beta = -fhi, -flo, -beta, -alpha
    s = sign * s
    rows = np.arange(pts.shape[0])
    sc = s[:, None]

    def g_lower(z: np.ndarray, f_lo: np.ndarray) -> np.ndarray:
        return _dn(f_lo - _up(sc * z))

    p, q = pts[:, :-1], pts[:, 1:]
    gz = g_lower(pts, flo)
    gp, gq = gz[:, :-1], gz[:, 1:]
    low = _piece_lower(p, q, gp, gq, alpha, beta, sc)
    low = np.where(np.isnan(low), -np.inf, low)
    t = np.arange(_SPLIT + 1) / _SPLIT
    for _ in range(_ROUNDS):
        k = np.argmin(low, axis=1)
        pk, qk = p[rows, k], q[rows, k]
        sub = np.clip(pk[:, None] + (qk - pk)[:, None] * t, pk[:, None], qk[:, None])
        sub[:, 0], sub[:, -1] = pk, qk
        slo, shi = _eval(spec, sub)
        a, b = slope_bounds(spec.name, sub[:, :-1], sub[:, 1:], **spec.params)
        if upper:
            slo, a, b = -shi, -b, -a
        gs = g_lower(sub, slo)
        sub_low = _piece_lower(sub[:, :-1], sub[:, 1:], gs[:, :-1], gs[:, 1:], a, b, sc)
        sub_low = np.where(np.isnan(sub_low), -np.inf, sub_low)
        low[rows, k] = np.inf  # the piece is covered by its sub-pieces
        p, q = np.concatenate([p, sub[:, :-1]], axis=1), np.concatenate([q, sub[:, 1:]], axis=1)
        low = np.concatenate([low, sub_low], axis=1)
    return sign * low.min(axis=1)


def _relax(spec: ActivationSpec, lo: np.ndarray, hi: np.ndarray, img_lo: np.ndarray,
           img_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sound lines ``s_l z + i_l <= phi(z) <= s_u z + i_u`` for ``z`` in ``[lo, hi]`` (elementwise).

    Returns ``(s_l, i_l, s_u, i_u)``. The slopes are chosen in floating point (least area over a dense
    grid among tangent, chord and endpoint-secant candidates); the intercepts are rigorous for the chosen
    slopes (:func:`_intercept`). Neurons with infinite or huge bounds get the constant lines
    ``img_lo <= phi <= img_hi`` (the image enclosure).
    """
    n = lo.size
    sl, su = np.zeros(n), np.zeros(n)
    il, iu = np.array(img_lo, dtype=np.float64), np.array(img_hi, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(lo) & np.isfinite(hi) & (np.maximum(np.abs(lo), np.abs(hi)) <= _HUGE))
    for start in range(0, ok.size, _CHUNK):
        idx = ok[start:start + _CHUNK]
        with np.errstate(all="ignore"):
            sl[idx], il[idx], su[idx], iu[idx] = _relax_finite(spec, lo[idx], hi[idx])
    return sl, il, su, iu


def _relax_finite(spec: ActivationSpec, lo: np.ndarray,
                  hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rows = np.arange(lo.size)
    t = np.arange(_GRID + 1) / _GRID
    pts = lo[:, None] + (hi - lo)[:, None] * t[None, :]
    pts = np.concatenate([pts, np.clip(0.0, lo, hi)[:, None]], axis=1)  # the kink of relu & co.
    pts = np.sort(np.clip(pts, lo[:, None], hi[:, None]), axis=1)
    pts[:, 0], pts[:, -1] = lo, hi
    flo, fhi = _eval(spec, pts)
    alpha, beta = slope_bounds(spec.name, pts[:, :-1], pts[:, 1:], **spec.params)  # per piece
    # Candidate slopes (heuristic only): tangents (mid-range of the piece slopes), the chord, and secants
    # from either end through grid points (near-tangent lines through an endpoint suit S-shaped pieces).
    fmid = 0.5 * (flo + fhi)
    step = max(_GRID // 16, 1)
    from_lo = pts[:, step:-1:step] - lo[:, None]
    to_hi = hi[:, None] - pts[:, step:-1:step]
    width = hi - lo
    candidates = [
        0.5 * (alpha + beta)[:, ::step],
        ((fmid[:, -1] - fmid[:, 0]) / width)[:, None],
        (fmid[:, step:-1:step] - fmid[:, :1]) / from_lo,
        (fmid[:, -1:] - fmid[:, step:-1:step]) / to_hi,
    ]
    slopes = np.concatenate(candidates, axis=1)
    slopes = np.where(np.isfinite(slopes), slopes, 0.5 * (alpha[:, :1] + beta[:, :1]))
    slopes = np.where(np.isfinite(slopes), slopes, 0.0)
    g = fmid[:, None, :] - slopes[:, :, None] * pts[:, None, :]  # float estimate of phi - s z on the grid
    mid = 0.5 * (lo + hi)[:, None]
    score_lo = np.nan_to_num(slopes * mid + g.min(axis=2), nan=-np.inf)  # value at the midpoint ~ area
    score_hi = np.nan_to_num(slopes * mid + g.max(axis=2), nan=np.inf)
    s_lo = slopes[rows, np.argmax(score_lo, axis=1)]
    s_hi = slopes[rows, np.argmin(score_hi, axis=1)]
    i_lo = _intercept(spec, pts, flo, fhi, alpha, beta, s_lo, upper=False)
    i_hi = _intercept(spec, pts, flo, fhi, alpha, beta, s_hi, upper=True)
    return s_lo, i_lo, s_hi, i_hi


# ----------------------------------------------------------------------------------------------
# Stage images (IBP through GroupSort / Householder / slope-restricted), torch
# ----------------------------------------------------------------------------------------------


def _householder_image(layer: HouseholderLayer, lo: torch.Tensor,
                       hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IBP through a Householder layer.

    Per group the output is ``z`` (if ``v^T z > 0``) or ``R z`` with ``R = I - k v v^T``. We allow every
    ``k`` between 2 (the float vector used by ``forward``) and ``2 / ||v||^2`` (the exact unit vector), so
    the bound holds for both readings. Rigorous bounds of ``v^T z`` select the branch (hull of both when
    undecided); ``R z`` is bounded as an interval matrix ``fl(I - 2 v v^T) +- err`` times the box. Finally
    every coordinate is clipped to ``[-rho, rho]`` with ``rho >= ||R||_2 max ||z||_2`` (``||R||_2 <=
    max(1, |1 - 2 ||v||^2|)``).
    """
    g = layer.group_size
    v = torch.tensor(np.array(layer.vectors), dtype=_F64, device=lo.device)  # (G, g)
    zl, zh = lo.reshape(layer.n_groups, g), hi.reshape(layer.n_groups, g)
    pl, ph = _affine_box(v.unsqueeze(-2), torch.zeros(layer.n_groups, 1, dtype=_F64, device=lo.device), zl, zh)
    eye = torch.eye(g, dtype=_F64, device=lo.device)
    m = eye - 2.0 * v.unsqueeze(-1) * v.unsqueeze(-2)
    s = (v * v).sum(-1)
    s_lo = _tdn(_tdn(s * (1.0 - _rel(g))) - _abs_term(g))  # squares may have been rounded up from underflow
    s_hi = _tup(_tup(s * (1.0 + _rel(g))) + _abs_term(g))
    k_dev = torch.maximum(_tup(_tup(2.0 / s_lo) - 2.0), _tup(2.0 - _tdn(2.0 / s_hi))).clamp(min=0.0)
    vv = v.abs().unsqueeze(-1) * v.abs().unsqueeze(-2)
    w_err = _tup((k_dev[:, None, None] + 8 * _U) * (1.0 + 8 * _U) * (2.0 * vv + m.abs()) + 4 * _TINY)
    rl, rh = _affine_box(m, torch.zeros_like(zl), zl, zh, w_err=w_err)
    ident = (pl > 0).expand_as(zl)
    refl = (ph <= 0).expand_as(zl)
    out_lo = torch.where(ident, zl, torch.where(refl, rl, torch.minimum(zl, rl)))
    out_hi = torch.where(ident, zh, torch.where(refl, rh, torch.maximum(zh, rh)))
    zmax = torch.maximum(zl.abs(), zh.abs())
    norm = _tup(torch.sqrt(_tup(_tup((zmax * zmax).sum(-1) * (1.0 + _rel(g))) + _abs_term(g))))
    factor = torch.maximum(torch.ones_like(s), torch.maximum(_tup(2.0 * s_hi - 1.0), _tup(1.0 - 2.0 * s_lo)))
    rho = _nan_to(_tup(factor * norm), math.inf).unsqueeze(-1)
    out_lo, out_hi = torch.maximum(out_lo, -rho), torch.minimum(out_hi, rho)
    return out_lo.reshape(-1), out_hi.reshape(-1)


def _stage_image(stage: Any, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigorous box enclosing the image of the box ``[lo, hi]`` under an activation stage."""
    if isinstance(stage, SlopeRestricted):
        ilo, ihi = _image(stage.activation, lo.cpu().numpy(), hi.cpu().numpy())
        return torch.tensor(ilo, dtype=_F64, device=lo.device), torch.tensor(ihi, dtype=_F64, device=lo.device)
    if isinstance(stage, GroupSortLayer):
        # the k-th order statistic of a group is non-decreasing in every coordinate
        shape = (stage.n_groups, stage.group_size)
        return (torch.sort(lo.reshape(shape), dim=-1).values.reshape(-1),
                torch.sort(hi.reshape(shape), dim=-1).values.reshape(-1))
    if isinstance(stage, HouseholderLayer):
        return _householder_image(stage, lo, hi)
    raise FormulationError(f"activation_bounds: no interval bound for stage '{getattr(stage, 'name', stage)}' "
                           f"of type {type(stage).__name__}.")


# ----------------------------------------------------------------------------------------------
# CROWN backward pass (torch)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Segment:
    """A chain ``A_0, phi_1, A_1, ..., phi_t`` starting at a concretizable variable.

    ``affines[j] = (W, b, hmax)``: ``z_{j+1} = W v_j + b`` with ``|v_j| <= hmax``; ``acts[j] = (s_l, i_l, s_u,
    i_u, zmax)``: relaxation of ``phi_{j+1}`` valid on its bounds, ``|z_{j+1}| <= zmax``.
    """

    dom: _Concretizer
    affines: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    acts: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


def _affine_step(lam: torch.Tensor, d: torch.Tensor, w: torch.Tensor, b: torch.Tensor, hmax: torch.Tensor,
                 lower: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``lam z + d`` with ``z = w v + b`` to ``fl(lam w) v + d'``, valid as a lower (upper) bound.

    The products differ from the exact ones by at most ``gamma_n |lam| (|w| hmax + |b|)`` (Higham; ``|v| <=
    hmax``), which is moved into the constant.
    """
    n = lam.shape[-1]
    c_mat = lam @ w
    c_vec = _mv(lam, b)
    wmag = _mv(w.abs(), hmax) + b.abs()
    err = _tup(_tup(_rel(n + w.shape[-1] + 1) * _mv(lam.abs(), wmag)) + _abs_term(n + w.shape[-1], hmax.sum()))
    err = _nan_to(err, math.inf)
    if lower:
        return c_mat, _nan_to(_tdn(_tdn(d + c_vec) - err), -math.inf)
    return c_mat, _nan_to(_tup(_tup(d + c_vec) + err), math.inf)


def _act_step(lam: torch.Tensor, d: torch.Tensor, relax: tuple[torch.Tensor, ...],
              lower: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``lam phi(z) + d`` to ``B z + d'`` with the relaxation lines, valid as a lower (upper) bound.

    ``B = lam^+ s_a + lam^- s_b`` entrywise (one rounding per entry, error ``<= 2u |B|`` times ``|z| <=
    zmax``); ``e = lam^+ i_a + lam^- i_b`` with Higham's bound.
    """
    sl, il, su, iu, zmax = relax
    pos, neg = lam.clamp(min=0.0), lam.clamp(max=0.0)
    if lower:  # lam^+ takes the lower line, lam^- the upper line
        s_a, i_a, s_b, i_b = sl, il, su, iu
    else:
        s_a, i_a, s_b, i_b = su, iu, sl, il
    mat = pos * s_a + neg * s_b
    e = _mv(pos, i_a) + _mv(neg, i_b)
    n = lam.shape[-1]
    mag = _mv(pos, i_a.abs()) - _mv(neg, i_b.abs())
    err = _tup(_tup(_rel(2 * n) * mag) + _tup(4.0 * _U * _mv(mat.abs(), zmax)) + _abs_term(2 * n, zmax.sum()))
    err = _nan_to(err, math.inf)
    if lower:
        return mat, _nan_to(_tdn(_tdn(d + e) - err), -math.inf)
    return mat, _nan_to(_tup(_tup(d + e) + err), math.inf)


def _crown(seg: _Segment, ll: torch.Tensor, dl: torch.Tensor, lu: torch.Tensor,
           du: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of ``ll h + dl`` (lower) and ``lu h + du`` (upper), ``h`` the output of the segment's last stage
    (or the segment's input variable when it has no activation yet)."""
    for j in range(len(seg.acts) - 1, -1, -1):
        ll, dl = _act_step(ll, dl, seg.acts[j], lower=True)
        lu, du = _act_step(lu, du, seg.acts[j], lower=False)
        w, b, hmax = seg.affines[j]
        ll, dl = _affine_step(ll, dl, w, b, hmax, lower=True)
        lu, du = _affine_step(lu, du, w, b, hmax, lower=False)
    return seg.dom.lower(ll, dl), seg.dom.upper(lu, du)


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------


def _as_network(model: Any, dim: int) -> Network:
    if isinstance(model, Network):
        return model
    if isinstance(model, torch.nn.Module):
        from lipbound.importers import from_torch

        return from_torch(model, input_shape=dim)
    raise TypeError(f"activation_bounds needs a lipbound.Network or a torch.nn.Module, got {type(model).__name__}.")


def _check_domain(domain: Any, network: Network) -> None:
    if not isinstance(domain, (Box, Ball)):
        raise DomainError(f"the domain must be a lipbound.bounds.Box or Ball, got {type(domain).__name__}.")
    if domain.dim != network.input_dim:
        raise DomainError(f"the domain has dimension {domain.dim} (shape ({domain.dim},)) but network "
                          f"'{network.name}' takes {network.input_dim} inputs.")


def _stage_name(stage: Any) -> str:
    return stage.activation.name if isinstance(stage, ResidualBlock) else stage.name


def _intersect(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor] | None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    if b is None:
        return a
    return torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1])


def _propagate(network: Network, dom: _Concretizer, crown: bool,
               reference: list[tuple[torch.Tensor, torch.Tensor]] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-activation bounds of every stage, in order (``reference``: bounds to intersect with)."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    layers = network.layers
    box = dom.box  # a box containing the current value (input of the next affine map)
    fresh = dom  # concretizer of the current value when it is a segment input, else None
    seg = _Segment(dom)
    device = dom.center.device
    for k in range(0, len(layers) - 1, 2):
        aff, stage = layers[k], layers[k + 1]
        w, b = aff.torch_parameters(_F64, device)
        hmax = torch.maximum(box[0].abs(), box[1].abs())
        y = fresh.bounds(w, b) if fresh is not None else _affine_box(w, b, *box)
        if crown and fresh is None:
            y = _intersect(y, _crown(seg, w, b, w, b))
        if isinstance(stage, ResidualBlock):
            wi, bi = stage.inner.torch_parameters(_F64, device)
            z = _affine_box(wi, bi, *y)
            if crown:  # backward through the (linear) composition inner o aff
                cl, dl = _affine_step(wi, bi, w, b, hmax, lower=True)
                cu, du = _affine_step(wi, bi, w, b, hmax, lower=False)
                z = _intersect(z, _crown(seg, cl, dl, cu, du))
            y_in = y
        else:
            z = y
        if reference is not None:
            z = _intersect(z, reference[len(out)])
        if bool(torch.any(z[0] > z[1])):  # both are sound enclosures of a non-empty set
            raise RuntimeError(f"internal error: empty bounds for layer '{_stage_name(stage)}'.")
        out.append(z)
        if isinstance(stage, ResidualBlock):
            h = _stage_image(stage.activation, *z)
            if stage.outer is not None:
                wo, bo = stage.outer.torch_parameters(_F64, device)
                h = _affine_box(wo, bo, *h)
            box = (_tdn(y_in[0] + h[0]), _tup(y_in[1] + h[1]))
        else:
            box = _stage_image(stage, *z)
        box = (_nan_to(box[0], -math.inf), _nan_to(box[1], math.inf))
        if crown and isinstance(stage, SlopeRestricted):
            rel = _relax(stage.activation, z[0].cpu().numpy(), z[1].cpu().numpy(), box[0].cpu().numpy(),
                         box[1].cpu().numpy())
            tens = tuple(torch.tensor(r, dtype=_F64, device=device) for r in rel)
            seg.affines.append((w, b, hmax))
            seg.acts.append((*tens, torch.maximum(z[0].abs(), z[1].abs())))
            fresh = None
        elif crown:  # no linear relaxation: restart the backward pass from the IBP output box
            seg = _Segment(_Concretizer.from_box(*box))
            fresh = seg.dom
        else:
            fresh = None
    return out


def _keys(network: Network) -> list[str]:
    names = [_stage_name(s) for s in network.activations]
    keys = []
    for i, name in enumerate(names):
        if names.count(name) > 1:
            keys.append(f"{name}[{i}]")
        else:
            keys.append(name)
    if len(set(keys)) < len(keys):
        raise FormulationError(f"activation_bounds: layer names of network '{network.name}' cannot be made unique "
                               f"({keys}); rename the layers.")
    if keys != names:
        log.warning("activation_bounds: network '%s' has repeated layer names; keys are 'name[i]' with i the "
                    "stage index: %s", network.name, keys)
    return keys


def _analyse(network: Network, domain: Domain, method: str,
             device: str | torch.device | None) -> list[tuple[np.ndarray, np.ndarray]]:
    if method not in ("crown", "ibp"):
        raise FormulationError(f"activation_bounds: unknown method {method!r}; use 'crown' or 'ibp'.")
    _check_domain(domain, network)
    for stage in network.activations:
        if isinstance(stage, ImplicitLayer):
            raise FormulationError(
                f"activation_bounds: implicit layer '{stage.name}' is not supported: bounding its fixed point "
                "z = phi(W z + U x + b) needs a fixed-point (interval contraction) enclosure, which is not "
                "implemented. Remove the implicit layer or bound it separately.")
    dev = torch.device("cpu" if device is None else device)
    dom = domain._concretizer(dev)
    with torch.no_grad():
        ibp = _propagate(network, dom, crown=False, reference=None)
        if method == "ibp":
            result = ibp
        else:
            unsupported = [f"'{s.name}' ({type(s).__name__})" for s in network.activations
                           if not isinstance(s, SlopeRestricted)]
            if unsupported:
                log.warning("activation_bounds(method='crown'): no linear relaxation for stage(s) %s; they are "
                            "passed by interval propagation (IBP) and the backward pass restarts from their "
                            "output boxes.", ", ".join(unsupported))
            result = _propagate(network, dom, crown=True, reference=ibp)
    return [(lo.cpu().numpy().copy(), hi.cpu().numpy().copy()) for lo, hi in result]


def activation_bounds(model: Network | torch.nn.Module, domain: Domain, method: str = "crown",
                      device: str | torch.device | None = None) -> Bounds:
    """Rigorous bounds on the pre-activations of every nonlinear layer over an input domain.

    Parameters
    ----------
    model : Network or torch.nn.Module
        A module is imported with :func:`lipbound.from_torch` (input shape ``(domain.dim,)``).
    domain : Box or Ball
    method : {"crown", "ibp"}
        ``"crown"``: backward linear relaxation, intersected with IBP (never looser than IBP);
        ``"ibp"``: interval bound propagation. See the module docstring.
    device : str or torch.device, optional
        Where the matrix products run (float64); default ``"cpu"``.

    Returns
    -------
    dict
        ``{layer name: (lower, upper)}`` for every stage in order: the ``SlopeRestricted``, GroupSort and
        Householder layers' names, and for residual blocks the name of their activation (bounds of
        ``W x + b`` inside the block). Arrays are float64 of shape ``(width,)``; for every input ``x`` in the
        domain the exact pre-activations lie in ``[lower, upper]``. Repeated names become ``"name[i]"``
        (``i`` the stage index; a warning is logged).

    Raises
    ------
    DomainError
        If the domain does not match the network's input dimension.
    FormulationError
        For an unknown method or an implicit layer (not supported).

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.array([[1.0, -1.0], [2.0, 0.5]]), np.ones((1, 2))], "relu")
    >>> b = activation_bounds(net, Box([-1.0, -1.0], [1.0, 1.0]))
    >>> lo, hi = b["relu_1"]
    >>> bool(np.all(lo <= [-2.0, -2.5]) and np.all(hi >= [2.0, 2.5]))
    True
    """
    network = _as_network(model, domain.dim if isinstance(domain, (Box, Ball)) else 0)
    results = _analyse(network, domain, method, device)
    return dict(zip(_keys(network), results, strict=True))


def stable_neurons(bounds: Bounds) -> dict[str, tuple[int, int, int]]:
    """Count the neurons whose ReLU phase is fixed: ``(n_inactive, n_active, n_total)`` per layer.

    A neuron is inactive if ``upper <= 0`` and active if ``lower >= 0`` (a neuron with ``lower = upper = 0``
    counts as inactive only). Meaningful for ReLU-like layers (a kink at 0).

    Parameters
    ----------
    bounds : dict
        As returned by :func:`activation_bounds`.

    Returns
    -------
    dict
        ``{name: (n_inactive, n_active, n_total)}``.

    Examples
    --------
    >>> stable_neurons({"relu_1": (np.array([-2.0, 0.5, -1.0]), np.array([-1.0, 3.0, 1.0]))})
    {'relu_1': (1, 1, 3)}
    """
    out = {}
    for name, (lo, hi) in bounds.items():
        lo, hi = np.asarray(lo), np.asarray(hi)
        inactive = hi <= 0
        active = (lo >= 0) & ~inactive
        out[name] = (int(inactive.sum()), int(active.sum()), int(lo.size))
    return out


def local_slopes(network: Network, domain: Domain, method: str = "crown",
                 device: str | torch.device | None = None) -> Network:
    """The network with per-neuron slope bounds narrowed to the domain.

    For every slope-restricted layer, ``(alpha, beta) = slope_bounds(activation, lower, upper)`` on the
    pre-activation bounds of :func:`activation_bounds`, intersected with the layer's current (e.g. global)
    ``alpha``/``beta``. Every difference quotient of a neuron between two inputs of the domain lies in the
    new range, so a Lipschitz certificate of the returned network is a *local* certificate on the domain.

    Parameters
    ----------
    network : Network
        All stages must be :class:`~lipbound.network.SlopeRestricted`.
    domain : Box or Ball
    method : {"crown", "ibp"}
    device : str or torch.device, optional

    Returns
    -------
    Network
        ``network.with_slopes(...)``.

    Raises
    ------
    FormulationError
        If a stage is not slope-restricted, or the layer's own ``alpha``/``beta`` do not meet the local range.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.eye(2), np.ones((1, 2))], "relu", [np.array([2.0, -2.0]), None])
    >>> local = local_slopes(net, Box([-1.0, -1.0], [1.0, 1.0]))
    >>> local.activations[0].alpha, local.activations[0].beta
    (array([1., 0.]), array([1., 0.]))
    """
    if not isinstance(network, Network):
        raise TypeError(f"local_slopes needs a lipbound.Network, got {type(network).__name__}.")
    bad = [f"'{s.name}' ({type(s).__name__})" for s in network.activations if not isinstance(s, SlopeRestricted)]
    if bad:
        raise FormulationError(f"local_slopes needs a network whose stages are all slope-restricted activations; "
                               f"found {', '.join(bad)}.")
    results = _analyse(network, domain, method, device)
    slopes = []
    for layer, (lo, hi) in zip(network.activations, results, strict=True):
        a, b = slope_bounds(layer.activation.name, lo, hi, **layer.activation.params)
        alpha, beta = np.maximum(a, layer.alpha), np.minimum(b, layer.beta)
        if np.any(alpha > beta):
            i = int(np.flatnonzero(alpha > beta)[0])
            raise FormulationError(f"local_slopes: layer '{layer.name}' neuron {i}: its slope bounds "
                                   f"[{layer.alpha[i]}, {layer.beta[i]}] do not meet the local range [{a[i]}, {b[i]}] "
                                   f"on pre-activations [{lo[i]}, {hi[i]}].")
        slopes.append((alpha, beta))
    return network.with_slopes(slopes)
