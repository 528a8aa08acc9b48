"""Rigorous slope (difference-quotient) ranges of scalar activations.

For an activation ``phi`` and an interval ``[l, u]`` the difference quotients
``(phi(a) - phi(b)) / (a - b)``, ``a != b`` in ``[l, u]``, lie in the hull of the Clarke
derivative of ``phi`` over ``[l, u]`` (Lebourg's mean value theorem). This module returns that hull,
``[alpha, beta]``, *outward rounded*: every real difference quotient lies in the returned float
interval. The ranges feed LipSDP multipliers, so an under-approximation would be a soundness bug;
an over-approximation by a few ulps is harmless.

Conventions
-----------
* The hull is taken over the *closed* interval, so a kink lying on an endpoint contributes its whole
  Clarke derivative (e.g. ReLU on ``[-1, 0]`` gives ``[0, 1]``). This is slightly conservative but
  makes the map ``[l, u] -> [alpha, beta]`` inclusion-monotone and consistent with degenerate
  intervals ``l == u``, for which the Clarke derivative hull at the point is returned.
* Infinite endpoints are allowed (``[-inf, u]``, ``[l, inf]``); the closure of the range of
  ``phi'`` (limits at infinity included) is returned.
* Values that are exact by construction (0, 1, ``negative_slope``, ELU's ``alpha``, PolyReLU's
  ``a_1``) are returned unrounded; every computed value is rounded outward.

Rounding model
--------------
All real arithmetic goes through a small interval arithmetic (:class:`_Iv`). IEEE-754 ``+ - * /``
are correctly rounded to nearest, so moving the computed result one ulp outward with
``np.nextafter`` encloses the exact result (this stays true through overflow and gradual
underflow). Transcendental functions come from libm/numpy/scipy, which are not correctly rounded:

* ``exp`` and ``tanh`` are widened by ``16 eps`` relative (:data:`_LIBM_REL`, i.e. >= 16 ulp).
  numpy documents its float64 SIMD kernels to <= 4 ulp and glibc to <= 1-2 ulp; measured against
  mpmath they are within 1.2 ulp (``tests/test_slopes.py`` re-checks the margin on the running
  platform).
* ``scipy.special.ndtr`` (the normal CDF of GELU) computes ``x / sqrt(2)`` internally; the rounding
  of that argument is amplified by the conditioning ``|x| pdf(x) <= (x^2 + 1) min(Phi, 1 - Phi)``
  (Mills' ratio), so the result is widened by ``(8 x^2 + 32) eps min(Phi, 1 - Phi) + 8 eps Phi``
  (:func:`_ndtr_err`; measured errors are at most 1/8 of that).
* On top, an absolute ``1e-300`` (:data:`_LIBM_ABS`) covers results in or near the subnormal range,
  where relative error bounds fail. Absolute errors there are below ``1e-307`` and are not
  amplified by the bounded formulas that consume them.

The results are finally intersected with the rigorous global range (e.g. ``[0, 1]`` for tanh),
which removes margins that would otherwise push, say, tanh's ``alpha`` below 0.

Methods
-------
Piecewise-linear (ReLU, LeakyReLU, identity):
    exact case analysis.
ELU, softplus, tanh, sigmoid:
    closed forms. ``alpha e^x`` (ELU, x < 0) and ``sigma(beta x)`` (softplus) are monotone, so the
    range is spanned by the endpoint values (the argument ``beta x`` is itself enclosed in an
    interval). ``tanh' = sech^2`` and ``sigma' = sigma (1 - sigma)`` are even and decrease in
    ``|x|``: the maximum is at the point of ``[l, u]`` closest to 0, the minimum at the endpoint of
    largest ``|x|``. Both are evaluated in cancellation-free form through ``e^{-|x|}``.
PolyReLU:
    ``phi' = 0`` for ``x < 0``, ``d(x) = sum_i i a_i x^(i-1)`` for ``x > 0``, Clarke hull
    ``{0, a_1}`` at 0. The critical points of ``d`` (roots of ``d'``) are isolated *exactly* by
    sympy's real-root isolation over the rationals (the float coefficients are exact rationals) and
    refined to width ``2^-48``; ``d`` is monotone between them, so its range on ``[p, u]`` is spanned
    by ``d(p)``, ``d(u)`` and enclosures of ``d`` on the root brackets met by ``[p, u]``.
GELU (erf and tanh forms), SiLU, Mish (monotonicity decomposition verified by interval arithmetic):
    ``phi''`` factors as a positive function times a simple sign function ``h``:

    * GELU: ``phi'' = pdf(x) (2 - x^2)``;
    * GELU, tanh form (``nn.GELU(approximate="tanh")``, ``phi = x (1 + tanh u) / 2``, ``u = k (x + c x^3)``,
      ``k = sqrt(2/pi)``, ``c = 0.044715``, both enclosed): ``phi'' = sech^2(u) k (1 + 3cx^2)^2 h(x)`` with
      ``h = r (2 - r) - k x tanh(u)``, ``r = 1 / (1 + 3cx^2)``;
    * SiLU: ``phi'' = sigma'(x) (2 - x tanh(x / 2))``;
    * Mish: ``phi'' = sech^2(sp(x)) sigma(x) h(x)`` with ``sp`` = softplus, ``w = e^x`` and
      ``h = 2 + x (2 + 2w - 3w^2 - 2w^3) / ((1 + w)(w^2 + 2w + 2))``.

    Once per activation the whole real line (including the unbounded tails ``(-inf, -64]`` and
    ``[64, inf)``, which interval arithmetic handles directly) is bisected until the interval
    enclosure of ``h`` has a strict sign on every piece, except for pieces narrower than
    ``2^-42 max(1, |x|)``. Those are merged into *brackets*; each contains every zero of ``phi''``
    nearby and nothing else is assumed about them. Between brackets the sign of ``phi''`` is
    *proved* constant, so ``phi'`` is monotone there. Hence, on ``[l, u]``, ``phi'`` attains its
    extremes at ``l``, ``u`` or inside a bracket met by ``[l, u]``: the range is the hull of the
    enclosures of ``phi'(l)``, ``phi'(u)`` and of ``phi'`` over each such bracket (intersected with
    ``[l, u]``). Bracket enclosures use the centred form ``phi'(c) + phi''(X) (X - c)``, intersected
    with the natural interval extension, so they cost rounding errors only. The global range adds
    the limits at ``+-inf`` (0 and 1 for all four). Nothing is sampled.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import scipy.special

from lipbound.rigorous import next_down, next_up

__all__ = ["ACTIVATION_NAMES", "global_slope_bounds", "slope_bounds"]

ACTIVATION_NAMES: tuple[str, ...] = (
    "relu",
    "leaky_relu",
    "identity",
    "tanh",
    "sigmoid",
    "elu",
    "softplus",
    "gelu",
    "gelu_tanh",
    "silu",
    "mish",
    "polyrelu",
)

# Parameters accepted per activation, with defaults. softplus' ``threshold`` is accepted and ignored:
# bounds are for the exact softplus log(1 + e^{beta x}) / beta.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "relu": {},
    "leaky_relu": {"negative_slope": 0.01},
    "identity": {},
    "tanh": {},
    "sigmoid": {},
    "elu": {"alpha": 1.0},
    "softplus": {"beta": 1.0, "threshold": None},
    "gelu": {},
    "gelu_tanh": {},
    "silu": {},
    "mish": {},
    "polyrelu": {"coefficients": (0.0, 1.0)},
}

_EPS = float(np.finfo(np.float64).eps)
#: Relative widening of numpy's exp/tanh results (16 ulp; see the module docstring).
_LIBM_REL = 16.0 * _EPS
#: Absolute widening of every libm result; covers the subnormal range.
_LIBM_ABS = 1e-300
#: Sign-verification window and bracket width of the GELU/SiLU/Mish decomposition.
_WINDOW = 64.0
_GRID = 512
_BRACKET_TOL = 2.0**-42


# ----------------------------------------------------------------------------------------------
# Interval arithmetic with outward rounding
# ----------------------------------------------------------------------------------------------


class _Iv(NamedTuple):
    """Closed real interval ``[lo, hi]`` (arrays of equal shape; infinite ends allowed)."""

    lo: np.ndarray
    hi: np.ndarray


def _pt(x: np.ndarray | float) -> _Iv:
    x = np.asarray(x, dtype=np.float64)
    return _Iv(x, x)


def _const(decimal: str) -> _Iv:
    """Enclosure of a real constant given by >= 40 correct significant digits."""
    f = float(decimal)  # correctly rounded: the constant is within one ulp of f
    return _Iv(np.float64(next_down(f)), np.float64(next_up(f)))


def _fix_nan(lo: np.ndarray, hi: np.ndarray) -> _Iv:
    # inf - inf: the result is unknown, so the enclosure is the whole line.
    return _Iv(np.where(np.isnan(lo), -np.inf, lo), np.where(np.isnan(hi), np.inf, hi))


def _add(a: _Iv, b: _Iv) -> _Iv:
    return _fix_nan(next_down(a.lo + b.lo), next_up(a.hi + b.hi))


def _sub(a: _Iv, b: _Iv) -> _Iv:
    return _fix_nan(next_down(a.lo - b.hi), next_up(a.hi - b.lo))


def _neg(a: _Iv) -> _Iv:
    if a.hi is a.lo:
        return _pt(-a.lo)
    return _Iv(-a.hi, -a.lo)


def _span(p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, p4: np.ndarray) -> _Iv:
    """Outward-rounded hull of four endpoint products or quotients.

    NaN (``0 * inf``, ``inf / inf``) is skipped by ``fmin``/``fmax``: such a product comes from an
    endpoint 0 (resp. two unbounded ends), and the product set of the real intervals is spanned by
    the remaining endpoint values. If all four are NaN the result is the whole line.
    """
    lo = np.fmin(np.fmin(p1, p2), np.fmin(p3, p4))
    hi = np.fmax(np.fmax(p1, p2), np.fmax(p3, p4))
    if np.isnan(lo).any() or np.isnan(hi).any():
        lo, hi = _fix_nan(lo, hi)
    return _Iv(next_down(lo), next_up(hi))


def _mul(a: _Iv, b: _Iv) -> _Iv:
    if b.hi is b.lo and np.ndim(b.lo) == 0 and math.isfinite(b.lo):  # finite scalar constant
        c = float(b.lo)
        lo, hi = (a.lo * c, a.hi * c) if c >= 0 else (a.hi * c, a.lo * c)
        if c == 0.0:
            lo, hi = np.zeros_like(a.lo), np.zeros_like(a.hi)  # 0 * (finite reals) = 0
        return _Iv(next_down(lo), next_up(hi))
    if a.hi is a.lo and np.ndim(a.lo) == 0:
        return _mul(b, a)
    return _span(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi)


def _sqr(a: _Iv) -> _Iv:
    lo2, hi2 = a.lo * a.lo, a.hi * a.hi
    lo = np.where(a.lo > 0, lo2, np.where(a.hi < 0, hi2, 0.0))
    return _Iv(np.maximum(next_down(lo), 0.0), next_up(np.maximum(lo2, hi2)))


def _div(a: _Iv, b: _Iv) -> _Iv:
    q = _span(a.lo / b.lo, a.lo / b.hi, a.hi / b.lo, a.hi / b.hi)
    straddles = (b.lo <= 0) & (b.hi >= 0)
    if not np.any(straddles):
        return q
    return _Iv(np.where(straddles, -np.inf, q.lo), np.where(straddles, np.inf, q.hi))


def _hull(a: _Iv, b: _Iv) -> _Iv:
    return _Iv(np.minimum(a.lo, b.lo), np.maximum(a.hi, b.hi))


def _meet(a: _Iv, b: _Iv) -> _Iv:
    return _Iv(np.maximum(a.lo, b.lo), np.minimum(a.hi, b.hi))


def _where(mask: np.ndarray, a: _Iv, b: _Iv) -> _Iv:
    return _Iv(np.where(mask, a.lo, b.lo), np.where(mask, a.hi, b.hi))


def _clip(a: _Iv, lo: float, hi: float) -> _Iv:
    return _Iv(np.clip(a.lo, lo, hi), np.clip(a.hi, lo, hi))


def _widen_libm(vlo: np.ndarray, vhi: np.ndarray, err_lo: np.ndarray | float,
                err_hi: np.ndarray | float) -> _Iv:
    """Enclose the exact values behind libm results ``vlo``, ``vhi`` (absolute errors <= ``err``)."""
    lo = np.where(np.isfinite(vlo), vlo - (err_lo + _LIBM_ABS), vlo)
    hi = np.where(np.isfinite(vhi), vhi + (err_hi + _LIBM_ABS), vhi)
    return _Iv(next_down(lo), next_up(hi))


def _ends(f: Callable[[np.ndarray], np.ndarray], a: _Iv) -> tuple[np.ndarray, np.ndarray]:
    """``f`` at both ends (once for point intervals built by :func:`_pt`)."""
    vlo = f(a.lo)
    return vlo, (vlo if a.hi is a.lo else f(a.hi))


def _exp(a: _Iv) -> _Iv:
    r = _widen_rel(*_ends(np.exp, a))
    return _Iv(np.maximum(r.lo, 0.0), r.hi)


def _tanh(a: _Iv) -> _Iv:
    return _clip(_widen_rel(*_ends(np.tanh, a)), -1.0, 1.0)


def _widen_rel(vlo: np.ndarray, vhi: np.ndarray) -> _Iv:
    with np.errstate(invalid="ignore"):
        return _widen_libm(vlo, vhi, _LIBM_REL * np.abs(vlo), _LIBM_REL * np.abs(vhi))


def _ndtr_err(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Error bound of ``v = scipy.special.ndtr(x)``.

    The rounding of the internal argument ``x / sqrt(2)`` (relative ~eps) moves the result by about
    ``|x| pdf(x) eps <= (x^2 + 1) min(Phi, 1 - Phi) eps`` (Mills' ratio); we allow 8 times that plus
    ``32 min(Phi, 1 - Phi) eps`` and ``8 eps Phi`` for the erf/erfc kernel and the final rounding
    (measured against mpmath: <= 2.3 (x^2 + 1) eps relative). ``|x| > 40`` is clipped: there the
    tail is < 1e-300 and covered by :data:`_LIBM_ABS`.
    """
    tail = np.minimum(v, 1.0 - v)
    return (8.0 * np.minimum(x * x, 1600.0) + 32.0) * _EPS * tail + 8.0 * _EPS * v


def _ndtr(a: _Iv) -> _Iv:
    vlo, vhi = _ends(scipy.special.ndtr, a)
    return _clip(_widen_libm(vlo, vhi, _ndtr_err(a.lo, vlo), _ndtr_err(a.hi, vhi)), 0.0, 1.0)


def _sigmoid_point(y: np.ndarray) -> _Iv:
    """Enclosure of ``sigma(y)`` at float points ``y`` via ``e = e^{-|y|}`` (no overflow)."""
    e = _exp(_pt(-np.abs(y)))
    one = _pt(1.0)
    den = _add(one, e)
    return _where(y >= 0, _div(one, den), _div(e, den))


def _sigmoid(a: _Iv) -> _Iv:
    # sigma is increasing: lower bound at a.lo, upper bound at a.hi.
    at_lo = _sigmoid_point(a.lo)
    at_hi = at_lo if a.hi is a.lo else _sigmoid_point(a.hi)
    return _clip(_Iv(at_lo.lo, at_hi.hi), 0.0, 1.0)


def _frac_down(q: Fraction) -> float:
    try:
        f = float(q)  # Fraction -> float is correctly rounded
    except OverflowError:
        return -math.inf if q < 0 else math.nextafter(math.inf, 0.0)
    return math.nextafter(f, -math.inf) if Fraction(f) > q else f


def _frac_up(q: Fraction) -> float:
    try:
        f = float(q)
    except OverflowError:
        return math.inf if q > 0 else -math.nextafter(math.inf, 0.0)
    return math.nextafter(f, math.inf) if Fraction(f) < q else f


# ----------------------------------------------------------------------------------------------
# GELU, SiLU, Mish: interval extensions of phi', phi'' and the sign factor h of phi''
# ----------------------------------------------------------------------------------------------

_ONE, _TWO, _THREE, _FOUR, _HALF = (_pt(v) for v in (1.0, 2.0, 3.0, 4.0, 0.5))
_INV_SQRT_2PI = _const("0.39894228040143267793994605993438186847585863116493")


def _gelu_pdf(x: _Iv) -> _Iv:
    return _mul(_exp(_neg(_mul(_sqr(x), _HALF))), _INV_SQRT_2PI)


def _gelu_d1(x: _Iv) -> _Iv:
    return _add(_ndtr(x), _mul(x, _gelu_pdf(x)))


def _gelu_h(x: _Iv) -> _Iv:
    return _sub(_TWO, _sqr(x))


def _gelu_d2(x: _Iv) -> _Iv:
    return _mul(_gelu_pdf(x), _gelu_h(x))


# GELU, tanh form: phi = x (1 + tanh(u)) / 2 = x sigma(2u), u = k (x + c x^3), k = sqrt(2/pi), c = 0.044715. The
# constants are enclosed, so every bound holds for the exact ones and for their float64 roundings (torch's).
_GT_K = _const("0.79788456080286535587989211986876373695171726232987")
_GT_C = _const("0.044715")
_GT_3C = _mul(_THREE, _GT_C)


def _gelu_tanh_u(x: _Iv) -> _Iv:
    """``u(x) = k (x + c x^3)``, increasing in ``x``: enclosed end by end."""

    def at(p: np.ndarray) -> _Iv:
        q = _pt(p)
        return _mul(_GT_K, _add(q, _mul(_GT_C, _mul(_sqr(q), q))))

    lo = at(x.lo)
    return _Iv(lo.lo, (lo if x.hi is x.lo else at(x.hi)).hi)


def _gelu_tanh_du(x: _Iv) -> _Iv:
    """``u'(x) = k (1 + 3 c x^2)``."""
    return _mul(_GT_K, _add(_ONE, _mul(_GT_3C, _sqr(x))))


def _gelu_tanh_sech2(u: _Iv) -> _Iv:
    """``sech^2(u) = 1 - tanh^2(u)`` (even, decreasing in ``|u|``), without cancellation."""
    return _even_unimodal(_sech2_point, u.lo, u.hi)


def _gelu_tanh_d1(x: _Iv) -> _Iv:
    """``phi' = sigma(2u) + x sech^2(u) u' / 2`` (``(1 + tanh u) / 2 = sigma(2u)`` avoids cancellation)."""
    u = _gelu_tanh_u(x)
    return _add(_sigmoid(_mul(_TWO, u)), _mul(_mul(_HALF, x), _mul(_gelu_tanh_sech2(u), _gelu_tanh_du(x))))


def _gelu_tanh_d2(x: _Iv) -> _Iv:
    """``phi'' = sech^2(u) (u' + x u''/2 - x tanh(u) u'^2)`` with ``x u''/2 = 3 k c x^2``."""
    u = _gelu_tanh_u(x)
    du = _gelu_tanh_du(x)
    inner = _sub(_add(du, _mul(_mul(_GT_K, _GT_3C), _sqr(x))), _mul(_mul(x, _tanh(u)), _sqr(du)))
    return _mul(_gelu_tanh_sech2(u), inner)


def _gelu_tanh_h(x: _Iv) -> _Iv:
    """Sign factor: ``phi'' / (sech^2(u) k (1 + 3cx^2)^2) = r (2 - r) - k x tanh(u)``, ``r = 1 / (1 + 3cx^2)``
    (bounded on the unbounded tails, where the unscaled factor would give ``inf - inf``)."""
    r = _div(_ONE, _add(_ONE, _mul(_GT_3C, _sqr(x))))
    return _sub(_mul(r, _sub(_TWO, r)), _mul(_GT_K, _mul(x, _tanh(_gelu_tanh_u(x)))))


def _silu_dsig(x: _Iv) -> _Iv:
    return _mul(_sigmoid(x), _sigmoid(_neg(x)))  # sigma' = sigma(x) sigma(-x)


def _silu_d1(x: _Iv) -> _Iv:
    return _add(_sigmoid(x), _mul(x, _silu_dsig(x)))


def _silu_h(x: _Iv) -> _Iv:
    return _sub(_TWO, _mul(x, _tanh(_mul(x, _HALF))))


def _silu_d2(x: _Iv) -> _Iv:
    return _mul(_silu_dsig(x), _silu_h(x))


def _mish_h_neg(x: _Iv) -> _Iv:
    """Sign factor ``h`` of Mish'' for ``x <= 0``, via ``w = e^x`` in ``(0, 1]``."""
    w = _exp(x)
    w2 = _sqr(w)
    w3 = _mul(w2, w)
    num = _sub(_sub(_add(_TWO, _mul(_TWO, w)), _mul(_THREE, w2)), _mul(_TWO, w3))
    den = _mul(_add(_ONE, w), _add(_add(w2, _mul(_TWO, w)), _TWO))
    return _add(_TWO, _mul(x, _div(num, den)))


def _mish_h_pos(x: _Iv) -> _Iv:
    """Sign factor ``h`` for ``x >= 0``, via ``v = e^{-x}`` in ``(0, 1]`` (numerator and
    denominator of the ``w`` form multiplied by ``v^3``; no overflow)."""
    v = _exp(_neg(x))
    v2 = _sqr(v)
    v3 = _mul(v2, v)
    num = _sub(_sub(_add(_mul(_TWO, v3), _mul(_TWO, v2)), _mul(_THREE, v)), _TWO)
    den = _mul(_add(_ONE, v), _add(_add(_ONE, _mul(_TWO, v)), _mul(_TWO, v2)))
    return _add(_TWO, _mul(x, _div(num, den)))


def _mish_h(x: _Iv) -> _Iv:
    """``h`` with ``Mish'' = sech^2(sp(x)) sigma(x) h(x)``: hull of both forms where ``x`` meets them."""
    lo, hi = np.broadcast_arrays(np.atleast_1d(x.lo), np.atleast_1d(x.hi))
    out_lo, out_hi = np.full(lo.shape, np.inf), np.full(lo.shape, -np.inf)
    neg, pos = lo <= 0, hi >= 0
    if np.any(neg):
        r = _mish_h_neg(_Iv(lo[neg], np.minimum(hi[neg], 0.0)))
        out_lo[neg], out_hi[neg] = r.lo, r.hi
    if np.any(pos):
        r = _mish_h_pos(_Iv(np.maximum(lo[pos], 0.0), hi[pos]))
        out_lo[pos], out_hi[pos] = np.minimum(out_lo[pos], r.lo), np.maximum(out_hi[pos], r.hi)
    return _Iv(out_lo, out_hi)


def _mish_a(x: _Iv) -> _Iv:
    """``A = (1 + e^x)^2 = e^{2 sp(x)}`` (increasing in x; may overflow to ``[MAX, inf]``)."""
    return _sqr(_add(_ONE, _exp(x)))


def _mish_sech2(a: _Iv) -> _Iv:
    """``sech^2(sp) = 4A / (A + 1)^2 = 4 / (A + 2 + 1/A)``, decreasing in ``A >= 1``: endpoint-wise."""

    def at(p: np.ndarray) -> _Iv:
        q = _pt(p)
        return _div(_FOUR, _add(_add(q, _TWO), _div(_ONE, q)))

    return _Iv(at(a.hi).lo, at(a.lo).hi)


def _mish_d1(x: _Iv) -> _Iv:
    a = _mish_a(x)
    t = _sub(_ONE, _div(_TWO, _add(a, _ONE)))  # tanh(sp(x)) = 1 - 2 / (A + 1)
    return _add(t, _mul(x, _mul(_mish_sech2(a), _sigmoid(x))))


def _mish_d2(x: _Iv) -> _Iv:
    return _mul(_mul(_mish_sech2(_mish_a(x)), _sigmoid(x)), _mish_h(x))


class _Smooth(NamedTuple):
    d1: Callable[[_Iv], _Iv]  # interval extension of phi'
    d2: Callable[[_Iv], _Iv]  # interval extension of phi''
    sign: Callable[[_Iv], _Iv]  # h with sign(phi'') = sign(h)
    lim_neg: float  # lim phi'(x), x -> -inf
    lim_pos: float  # lim phi'(x), x -> +inf


_SMOOTH: dict[str, _Smooth] = {
    "gelu": _Smooth(_gelu_d1, _gelu_d2, _gelu_h, 0.0, 1.0),
    "gelu_tanh": _Smooth(_gelu_tanh_d1, _gelu_tanh_d2, _gelu_tanh_h, 0.0, 1.0),
    "silu": _Smooth(_silu_d1, _silu_d2, _silu_h, 0.0, 1.0),
    "mish": _Smooth(_mish_d1, _mish_d2, _mish_h, 0.0, 1.0),
}


def _isolate_sign_changes(sign: Callable[[_Iv], _Iv]) -> np.ndarray:
    """Brackets outside of which ``sign`` is proved nonzero, as a ``(k, 2)`` array.

    The real line is cut into ``(-inf, -W]``, a uniform grid on ``[-W, W]`` and ``[W, inf)``;
    pieces whose enclosure of ``sign`` contains 0 are bisected until narrower than the bracket
    tolerance. Adjacent pieces with proved signs cannot have opposite signs (they share an
    endpoint), so ``sign`` has constant sign on each gap between brackets.
    """
    edges = np.linspace(-_WINDOW, _WINDOW, _GRID + 1)
    lo = np.concatenate([[-np.inf], edges])
    hi = np.concatenate([edges, [np.inf]])
    found: list[tuple[np.ndarray, np.ndarray]] = []
    while lo.size:
        with np.errstate(all="ignore"):
            s = sign(_Iv(lo, hi))
        pending = ~((s.lo > 0) | (s.hi < 0))
        scale = np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)))
        small = pending & (hi - lo <= _BRACKET_TOL * scale)
        found.append((lo[small], hi[small]))
        split = pending & ~small
        if np.any(split & ~(np.isfinite(lo) & np.isfinite(hi))):
            raise RuntimeError("sign of phi'' could not be verified on an unbounded tail")
        a, b = lo[split], hi[split]
        mid = a + 0.5 * (b - a)
        lo, hi = np.concatenate([a, mid]), np.concatenate([mid, b])
    los = np.concatenate([f[0] for f in found])
    his = np.concatenate([f[1] for f in found])
    order = np.argsort(los)
    merged: list[list[float]] = []
    for a, b in zip(los[order], his[order], strict=True):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], float(b))
        else:
            merged.append([float(a), float(b)])
    return np.array(merged, dtype=np.float64).reshape(-1, 2)


@functools.cache
def _smooth_brackets(name: str) -> np.ndarray:
    return _isolate_sign_changes(_SMOOTH[name].sign)


def _enclose_range(d1: Callable[[_Iv], _Iv], d2: Callable[[_Iv], _Iv], x: _Iv) -> _Iv:
    """Enclosure of ``{f(t): t in x}`` (finite ``x``): natural extension meet centred form."""
    c = np.clip(x.lo + 0.5 * (x.hi - x.lo), x.lo, x.hi)
    centred = _add(d1(_pt(c)), _mul(d2(x), _sub(x, _pt(c))))
    return _meet(d1(x), centred)


def _point_d1(spec: _Smooth, x: np.ndarray) -> _Iv:
    """Enclosure of ``phi'(x)`` at float points, with limits at ``+-inf``.

    Beyond the window ``|x| >= W`` the sign of ``phi''`` is proved constant (:func:`_isolate_sign_changes`), so
    ``phi'(x)`` lies between ``phi'(+-W)`` and the limit; that hull is met with the direct enclosure, which can be
    loose for huge ``|x|`` (e.g. ``x sech^2(u) u'`` evaluates to ``[0, inf] * 0``-like products).
    """
    finite = np.isfinite(x)
    v = spec.d1(_pt(np.where(finite, x, 0.0)))
    lim = np.where(x < 0, spec.lim_neg, spec.lim_pos)
    v = _where(finite, v, _pt(lim))
    far = np.abs(x) >= _WINDOW
    if np.any(far):
        edge = spec.d1(_pt(np.where(x < 0, -_WINDOW, _WINDOW)))
        v = _where(far, _meet(v, _hull(edge, _pt(lim))), v)
    return v


def _smooth_local(name: str, lower: np.ndarray, upper: np.ndarray) -> _Iv:
    spec = _SMOOTH[name]
    r = _hull(_point_d1(spec, lower), _point_d1(spec, upper))
    lo, hi = r.lo.copy(), r.hi.copy()
    for a, b in _smooth_brackets(name):
        m = (lower <= b) & (upper >= a)
        if np.any(m):
            e = _enclose_range(spec.d1, spec.d2, _Iv(np.maximum(lower[m], a), np.minimum(upper[m], b)))
            lo[m] = np.minimum(lo[m], e.lo)
            hi[m] = np.maximum(hi[m], e.hi)
    return _Iv(lo, hi)


@functools.cache
def _smooth_global(name: str) -> tuple[float, float]:
    spec = _SMOOTH[name]
    br = _smooth_brackets(name)
    with np.errstate(all="ignore"):
        e = _enclose_range(spec.d1, spec.d2, _Iv(br[:, 0], br[:, 1]))
    lo = min(spec.lim_neg, spec.lim_pos, float(np.min(e.lo, initial=np.inf)))
    hi = max(spec.lim_neg, spec.lim_pos, float(np.max(e.hi, initial=-np.inf)))
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------


def _sech2_point(x: np.ndarray) -> _Iv:
    """``tanh'(x) = 4e / (1 + e)^2`` with ``e = e^{-2|x|}``."""
    e = _exp(_pt(-2.0 * np.abs(x)))  # 2|x| is exact (or overflows to inf, then e = 0)
    return _div(_mul(_FOUR, e), _sqr(_add(_ONE, e)))


def _dsigmoid_point(x: np.ndarray) -> _Iv:
    """``sigma'(x) = e / (1 + e)^2`` with ``e = e^{-|x|}``."""
    e = _exp(_pt(-np.abs(x)))
    return _div(e, _sqr(_add(_ONE, e)))


def _even_unimodal(f: Callable[[np.ndarray], _Iv], lower: np.ndarray, upper: np.ndarray) -> _Iv:
    """Range of an even function decreasing in ``|x|``: max nearest 0, min at the farthest end."""
    near = np.clip(0.0, lower, upper)
    far = np.where(np.abs(lower) >= np.abs(upper), lower, upper)
    return _Iv(f(far).lo, f(near).hi)


def _include(lo: np.ndarray, hi: np.ndarray, mask: np.ndarray, vlo: Any, vhi: Any) -> None:
    np.copyto(lo, np.minimum(lo, vlo), where=mask)
    np.copyto(hi, np.maximum(hi, vhi), where=mask)


def _elu_local(lower: np.ndarray, upper: np.ndarray, alpha: float) -> _Iv:
    lo, hi = np.full(lower.shape, np.inf), np.full(lower.shape, -np.inf)
    a = _pt(alpha)
    neg = lower < 0
    # alpha e^x is monotone on x < 0: its range on [l, min(u, 0)) is spanned by the two ends.
    left = _mul(a, _exp(_pt(np.where(neg, lower, 0.0))))
    right = _mul(a, _exp(_pt(np.where(neg, np.minimum(upper, 0.0), 0.0))))
    _include(lo, hi, neg, np.minimum(left.lo, right.lo), np.maximum(left.hi, right.hi))
    at0 = (lower <= 0) & (upper >= 0)  # Clarke derivative at 0: hull{alpha, 1}
    _include(lo, hi, at0, min(alpha, 1.0), max(alpha, 1.0))
    _include(lo, hi, upper > 0, 1.0, 1.0)
    return _Iv(lo, hi)


def _softplus_local(lower: np.ndarray, upper: np.ndarray, beta: float) -> _Iv:
    b = _pt(beta)
    yl, yu = _mul(b, _pt(lower)), _mul(b, _pt(upper))  # beta*x enclosed; sigma is monotone
    return _sigmoid(_hull(yl, yu))


# ----------------------------------------------------------------------------------------------
# PolyReLU
# ----------------------------------------------------------------------------------------------


class _PolyData(NamedTuple):
    a1: float
    d: list[_Iv]  # coefficients of d(x) = phi'(x), x > 0, ascending, as intervals
    dd: list[_Iv]  # coefficients of d'(x)
    brackets: np.ndarray  # (k, 2) enclosures of the roots of d' in [0, inf)
    limit_pos: float  # lim d(x), x -> +inf


def _frac_iv(q: Fraction) -> _Iv:
    return _Iv(np.float64(_frac_down(q)), np.float64(_frac_up(q)))


def _poly_iv(coefs: Sequence[_Iv], x: _Iv) -> _Iv:
    """Interval Horner scheme, coefficients ascending."""
    acc = _Iv(np.broadcast_to(coefs[-1].lo, x.lo.shape), np.broadcast_to(coefs[-1].hi, x.lo.shape))
    for c in reversed(coefs[:-1]):
        acc = _add(_mul(acc, x), c)
    return acc


@functools.lru_cache(maxsize=256)
def _polyrelu_data(coefficients: tuple[float, ...]) -> _PolyData:
    a = [Fraction(c) for c in coefficients]
    d = [(k + 1) * a[k + 1] for k in range(len(a) - 1)] or [Fraction(0)]
    while len(d) > 1 and d[-1] == 0:
        d.pop()
    dd = [k * d[k] for k in range(1, len(d))] or [Fraction(0)]
    brackets = np.zeros((0, 2))
    if len(dd) > 1:
        import sympy

        x = sympy.Symbol("x")
        poly = sympy.Poly([sympy.Rational(c.numerator, c.denominator) for c in reversed(dd)], x,
                          domain=sympy.QQ)
        rows = []
        for (ra, rb), _mult in poly.intervals(eps=sympy.Rational(1, 2**48)):
            qa, qb = Fraction(int(ra.p), int(ra.q)), Fraction(int(rb.p), int(rb.q))
            if qb >= 0:  # only roots in [0, inf) matter: d applies to x > 0
                rows.append([max(_frac_down(qa), 0.0), _frac_up(qb)])
        brackets = np.array(rows, dtype=np.float64).reshape(-1, 2)
    if len(d) == 1:
        limit = float(d[0])  # d is the constant a_1 (a float)
    else:
        limit = math.inf if d[-1] > 0 else -math.inf
    a1 = float(coefficients[1]) if len(coefficients) > 1 else 0.0
    return _PolyData(a1, [_frac_iv(c) for c in d], [_frac_iv(c) for c in dd], brackets, limit)


def _polyrelu_local(lower: np.ndarray, upper: np.ndarray, coefficients: tuple[float, ...]) -> _Iv:
    data = _polyrelu_data(coefficients)
    lo, hi = np.full(lower.shape, np.inf), np.full(lower.shape, -np.inf)
    _include(lo, hi, lower < 0, 0.0, 0.0)  # phi' = 0 on x < 0
    at0 = (lower <= 0) & (upper >= 0)  # Clarke derivative at 0: hull{0, a_1}
    _include(lo, hi, at0, min(0.0, data.a1), max(0.0, data.a1))
    pos = upper > 0
    if not np.any(pos):
        return _Iv(lo, hi)
    p = np.where(pos, np.maximum(lower, 0.0), 0.0)
    q = np.where(pos, upper, 0.0)
    q_inf = np.isinf(q)
    dp = _poly_iv(data.d, _pt(p))
    dq = _poly_iv(data.d, _pt(np.where(q_inf, 0.0, q)))
    dq = _where(q_inf, _pt(np.full(q.shape, data.limit_pos)), dq)
    _include(lo, hi, pos, np.minimum(dp.lo, dq.lo), np.maximum(dp.hi, dq.hi))
    # d is monotone between the roots of d'; the brackets met by [p, q] add their enclosures.
    for a, b in data.brackets:
        m = pos & (p <= b) & (q >= a)
        if np.any(m):
            x = _Iv(np.maximum(p[m], a), np.minimum(q[m], b))
            e = _enclose_range(functools.partial(_poly_iv, data.d), functools.partial(_poly_iv, data.dd), x)
            lo[m] = np.minimum(lo[m], e.lo)
            hi[m] = np.maximum(hi[m], e.hi)
    return _Iv(lo, hi)


# ----------------------------------------------------------------------------------------------
# Parameters and public API
# ----------------------------------------------------------------------------------------------


def _finite_float(activation: str, name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{activation}: parameter '{name}' must be a real number, got {value!r}.") from exc
    if not math.isfinite(v):
        raise ValueError(f"{activation}: parameter '{name}' must be finite, got {v}.")
    return v


def _resolve(activation: str, params: dict[str, Any]) -> dict[str, Any]:
    if activation not in _DEFAULTS:
        raise ValueError(f"unknown activation {activation!r}; supported: {', '.join(ACTIVATION_NAMES)}.")
    allowed = _DEFAULTS[activation]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"activation '{activation}' takes parameters {sorted(allowed) or 'none'}, "
                         f"got unknown {unknown}.")
    p = {**allowed, **params}
    if activation == "leaky_relu":
        p["negative_slope"] = _finite_float(activation, "negative_slope", p["negative_slope"])
    elif activation == "elu":
        p["alpha"] = _finite_float(activation, "alpha", p["alpha"])
    elif activation == "softplus":
        p["beta"] = _finite_float(activation, "beta", p["beta"])
        if p["beta"] == 0.0:
            raise ValueError("softplus: parameter 'beta' must be nonzero.")
    elif activation == "polyrelu":
        try:
            coefs = np.asarray(p["coefficients"], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError("polyrelu: 'coefficients' must be a sequence of real numbers a_0..a_r.") from exc
        if coefs.ndim != 1 or coefs.size == 0:
            raise ValueError(f"polyrelu: 'coefficients' must be a non-empty 1-D sequence a_0..a_r, "
                             f"got shape {coefs.shape}.")
        if not np.all(np.isfinite(coefs)):
            raise ValueError(f"polyrelu: 'coefficients' must be finite, got {coefs.tolist()}.")
        p["coefficients"] = tuple(float(c) for c in coefs)
    return p


def _validate(lower: Any, upper: Any) -> tuple[np.ndarray, np.ndarray]:
    lo = np.asarray(lower, dtype=np.float64)
    hi = np.asarray(upper, dtype=np.float64)
    try:
        lo, hi = np.broadcast_arrays(lo, hi)
    except ValueError as exc:
        raise ValueError(f"lower and upper have incompatible shapes {lo.shape} and {hi.shape}.") from exc

    def first(mask: np.ndarray) -> tuple[int, ...] | None:
        if not np.any(mask):
            return None
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))

    for arr, what in ((lo, "lower"), (hi, "upper")):
        idx = first(np.isnan(arr))
        if idx is not None:
            raise ValueError(f"{what} is NaN at index {idx}.")
    idx = first(lo > hi)
    if idx is not None:
        raise ValueError(f"lower > upper at index {idx}: lower={lo[idx]!r}, upper={hi[idx]!r}.")
    idx = first(np.isposinf(lo) | np.isneginf(hi))
    if idx is not None:
        raise ValueError(f"empty interval at index {idx}: [{lo[idx]!r}, {hi[idx]!r}] contains no real "
                         "number.")
    return np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64)


def _globally_bounded(activation: str, p: dict[str, Any]) -> bool:
    return activation != "polyrelu" or all(c == 0.0 for c in p["coefficients"][2:])


def _global(activation: str, p: dict[str, Any]) -> tuple[float, float]:
    if activation in ("relu", "tanh", "softplus"):
        return 0.0, 1.0
    if activation == "identity":
        return 1.0, 1.0
    if activation == "sigmoid":
        return 0.0, 0.25
    if activation == "leaky_relu":
        s = p["negative_slope"]
        return min(s, 1.0), max(s, 1.0)
    if activation == "elu":
        a = p["alpha"]  # alpha e^x sweeps (0, alpha) on x < 0; 1 on x > 0
        return min(0.0, a, 1.0), max(0.0, a, 1.0)
    if activation in _SMOOTH:
        return _smooth_global(activation)
    coefs = p["coefficients"]
    if not _globally_bounded(activation, p):
        degree = max(i for i, c in enumerate(coefs) if c != 0.0)
        raise ValueError(f"polyrelu with coefficients {list(coefs)} (degree {degree} >= 2) is not globally "
                         "slope-bounded: its derivative is unbounded on x > 0. Use slope_bounds() with "
                         "local pre-activation bounds [lower, upper] instead.")
    a1 = coefs[1] if len(coefs) > 1 else 0.0
    return min(0.0, a1), max(0.0, a1)


def slope_bounds(activation: str, lower: np.ndarray, upper: np.ndarray,
                 **params: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rigorous slope ranges ``[alpha, beta]`` of an activation on intervals ``[lower, upper]``.

    Every difference quotient ``(phi(a) - phi(b)) / (a - b)`` with ``a != b`` in
    ``[lower_i, upper_i]`` lies in ``[alpha_i, beta_i]``; more precisely ``[alpha_i, beta_i]``
    encloses the hull of the Clarke derivative of ``phi`` over the closed interval (for
    ``lower_i == upper_i``: the Clarke derivative at the point). Bounds are rounded outward, so
    they hold for the exact real numbers (see the module docstring for the methods).

    Parameters
    ----------
    activation : str
        One of :data:`ACTIVATION_NAMES`.
    lower, upper : array_like
        Interval ends, broadcast together; ``lower <= upper`` elementwise, no NaN. Infinite ends
        are allowed (the closure of the derivative range is returned).
    **params
        ``negative_slope`` (leaky_relu, default 0.01), ``alpha`` (elu, default 1.0), ``beta``
        (softplus, default 1.0; ``threshold`` is accepted and ignored: bounds are for the exact
        ``log(1 + e^{beta x}) / beta``), ``coefficients`` (polyrelu, ``a_0..a_r``, default
        ``(0, 1)``: ``a_0 + sum_i a_i max(x, 0)^i``).

    Returns
    -------
    alpha, beta : ndarray
        Float64 arrays of the broadcast shape, ``alpha <= beta``.

    Raises
    ------
    ValueError
        On an unknown activation or parameter, an invalid parameter value, NaN ends,
        ``lower > upper`` or an empty interval; the message names the first offending index.

    Examples
    --------
    >>> import numpy as np
    >>> slope_bounds("relu", np.array([-1.0, 0.5]), np.array([2.0, 3.0]))
    (array([0., 1.]), array([1., 1.]))
    >>> alpha, beta = slope_bounds("tanh", -0.5, 0.25)
    >>> bool(alpha <= 1 - np.tanh(0.5) ** 2), float(beta)
    (True, 1.0)
    """
    p = _resolve(activation, params)
    lo, hi = _validate(lower, upper)
    shape = lo.shape
    lo, hi = lo.reshape(-1), hi.reshape(-1)  # 1-D internally (0-d arithmetic yields scalars)
    with np.errstate(all="ignore"):
        if activation == "relu":
            r = _Iv(np.where(lo > 0, 1.0, 0.0), np.where(hi < 0, 0.0, 1.0))
        elif activation == "leaky_relu":
            s = p["negative_slope"]
            r = _Iv(np.where(lo > 0, 1.0, np.where(hi < 0, s, min(s, 1.0))),
                    np.where(lo > 0, 1.0, np.where(hi < 0, s, max(s, 1.0))))
        elif activation == "identity":
            r = _Iv(np.ones_like(lo), np.ones_like(lo))
        elif activation == "tanh":
            r = _even_unimodal(_sech2_point, lo, hi)
        elif activation == "sigmoid":
            r = _even_unimodal(_dsigmoid_point, lo, hi)
        elif activation == "elu":
            r = _elu_local(lo, hi, p["alpha"])
        elif activation == "softplus":
            r = _softplus_local(lo, hi, p["beta"])
        elif activation in _SMOOTH:
            r = _smooth_local(activation, lo, hi)
        else:
            r = _polyrelu_local(lo, hi, p["coefficients"])
        if _globally_bounded(activation, p):
            g_lo, g_hi = _global(activation, p)  # rigorous too: intersecting keeps soundness
            r = _Iv(np.maximum(r.lo, g_lo), np.minimum(r.hi, g_hi))
    alpha = np.array(np.broadcast_to(r.lo, lo.shape), dtype=np.float64).reshape(shape)
    beta = np.array(np.broadcast_to(r.hi, lo.shape), dtype=np.float64).reshape(shape)
    return alpha, beta


def global_slope_bounds(activation: str, **params: Any) -> tuple[float, float]:
    """Rigorous global slope range ``(alpha, beta)`` of an activation over the whole real line.

    ``[alpha, beta]`` encloses the closure of the set of difference quotients over ``R`` (the
    hull of the Clarke derivative, limits at infinity included), rounded outward.

    Parameters
    ----------
    activation : str
        One of :data:`ACTIVATION_NAMES`.
    **params
        As for :func:`slope_bounds`.

    Returns
    -------
    (float, float)

    Raises
    ------
    ValueError
        On an unknown activation or parameter, or when the activation is not globally
        slope-bounded (PolyReLU with a nonzero coefficient of degree >= 2): use
        :func:`slope_bounds` with local intervals then.

    Examples
    --------
    >>> global_slope_bounds("leaky_relu", negative_slope=0.1)
    (0.1, 1.0)
    >>> lo, hi = global_slope_bounds("gelu")
    >>> round(lo, 6), round(hi, 6)
    (-0.128904, 1.128904)
    """
    p = _resolve(activation, params)
    lo, hi = _global(activation, p)
    return float(lo), float(hi)
