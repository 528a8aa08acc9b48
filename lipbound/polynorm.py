"""Certified local and global l2 Lipschitz bounds of the PolyNorm activation (a vector map).

PolyNorm (Zhuo et al., ICLR 2025; :class:`lipbound.nn.PolyNorm`) maps ``x`` in ``R^D`` to

    ``y = a_0 + sum_{i=1}^{r} a_i x**i / s_i(x)``,   ``s_i(x) = sqrt(mean(x**(2i)) + eps)``,

with element-wise powers and the mean over the ``D`` coordinates of the one vector.

Jacobian
--------
``d s_i / d x_j = i x_j**(2i-1) / (D s_i)``, so the term ``N_i = x**i / s_i`` has

    ``J_i = diag(i x**(i-1)) / s_i - x**i (i x**(2i-1))^T / (D s_i**3)
          = (i / s_i) P_i diag(x**(i-1))``,   ``P_i = I - u u^T / (D s_i**2)``,  ``u = x**i``,

and ``J = sum_i a_i J_i``. ``P_i`` is symmetric with eigenvalues ``1`` and ``eps / s_i**2`` (in ``(0, 1]``),
so ``||J_i||_2 <= i ||x||_inf**(i-1) / s_i``; with ``s_i**2 >= ||x||_inf**(2i) / D + eps`` this is at most
``h_i(||x||_inf)``, ``h_i(t) = i t**(i-1) / sqrt(t**(2i)/D + eps)``. ``h_1`` decreases from ``1/sqrt(eps)``;
for ``i >= 2``, ``h_i`` increases up to ``t*`` with ``t***(2i) = D (i-1) eps`` and decreases after it, with
maximum ``C_i = (i**i (D (i-1) eps)**(i-1) / eps**i)**(1/(2i))``. PolyNorm is C^1, so by the mean value
inequality its Lipschitz constant on a convex set is the supremum of ``||J||_2`` there.

Certified bounds
----------------
:func:`polynorm_local_lipschitz` returns the smallest of four sound upper bounds of ``sup ||J(x)||_2`` over a
box ``[lower, upper]`` (all four are proven, so their minimum is too):

1. ``interval_abs``: interval arithmetic with outward rounding encloses every entry of ``J(x)`` for all
   ``x`` in the box (the coordinates and the ``s_i`` are treated as independent intervals, which only widens
   the enclosure), giving matrices ``Jlo <= J(x) <= Jhi``. With ``B = max(|Jlo|, |Jhi|)`` entrywise,
   ``|J(x) v| <= B |v|`` entrywise, so ``||J(x)||_2 <= ||B||_2``; ``||B||_2`` is bounded by
   :func:`lipbound.rigorous.spectral_norm_upper` (Rump's test; tiny matrices are first scaled by an exact power of
   two, since its Gram matrix underflows) and by ``sqrt(||B||_1 ||B||_inf)``.
2. ``interval_midrad``: ``J(x) = C + E`` with the float midpoint ``C`` and ``|E| <= R`` (outward-rounded
   radius), so ``||J(x)||_2 <= ||C||_2 + ||R||_2``. This keeps the sign structure of ``J`` and is within
   ~1e-7 relative of ``||J(x0)||_2`` on a degenerate box ``{x0}``.
3. ``projector``: ``sum_i |a_i| min(i M**(i-1) / s_i_lo, sup_{t in [m, M]} h_i(t))`` with ``M`` (``m``) the
   largest (smallest) ``||x||_inf`` over the box and ``s_i_lo`` a rigorous lower bound of ``s_i``; the
   scalar arithmetic is exact (``fractions.Fraction``) and rounded up once.
4. ``global``: :func:`polynorm_global_lipschitz`, ``sum_i |a_i| C_i``, valid everywhere.

An optional ``min_l2_norm = m`` restricts the statements to the points of the box with ``||x||_2 >= m`` (used by
:mod:`lipbound.polycom_certify`, where the stage inputs stay within a known distance of a known point): then
``mean(x**(2i)) >= (m**2 / D)**i`` (power means) and ``||x||_inf >= m / sqrt(D)`` sharpen the ``s_i`` and ``t``
ranges above. A Lipschitz statement needs the restricted set to be convex, which the caller ensures.

The bounds are for the exact real map with the given float coefficients and ``eps``; a module evaluated in
float32 differs from it by its own rounding errors, which this module does not bound.

Examples
--------
>>> import numpy as np
>>> a = [0.0, 1 / 3, 1 / 3, 1 / 3]
>>> x0 = np.array([0.5, -1.0, 2.0, 0.25])
>>> local = polynorm_local_lipschitz(a, 1e-6, x0 - 0.01, x0 + 0.01)
>>> bool(np.linalg.norm(polynorm_jacobian(x0, a, 1e-6), 2) <= local < polynorm_global_lipschitz(a, 4, 1e-6))
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

import numpy as np

from lipbound.rigorous import next_down, next_up, round_up, spectral_norm_upper, sqrt_up

__all__ = [
    "polynorm",
    "polynorm_jacobian",
    "polynorm_jacobian_enclosure",
    "polynorm_output_enclosure",
    "polynorm_global_lipschitz",
    "polynorm_local_bounds",
    "polynorm_local_lipschitz",
    "interval_matrix_norm_upper",
]

_U = 2.0**-53  # unit roundoff of binary64


# ----------------------------------------------------------------------------------------------
# Interval arithmetic with outward rounding (numpy, binary64, round-to-nearest)
# ----------------------------------------------------------------------------------------------
# IEEE-754 + - * / and sqrt are correctly rounded, so moving a computed result one ulp outward with
# nextafter encloses the exact result, also through overflow (to +-inf) and gradual underflow.


class _Iv(NamedTuple):
    """Closed real intervals ``[lo, hi]`` (arrays of equal shape)."""

    lo: np.ndarray
    hi: np.ndarray


def _pow_up(t: np.ndarray, k: int) -> np.ndarray:
    """A float >= ``t**k`` for floats ``t >= 0`` (each product rounded up)."""
    out = np.ones_like(t)
    for _ in range(k):
        out = next_up(out * t)
    return out


def _pow_dn(t: np.ndarray, k: int) -> np.ndarray:
    """A float in ``[0, t**k]`` for floats ``t >= 0``."""
    out = np.ones_like(t)
    for _ in range(k):
        out = np.maximum(next_down(out * t), 0.0)
    return out


def _iv_pow(x: _Iv, k: int) -> _Iv:
    """Enclosure of ``{t**k : t in x}`` (exact range up to rounding, not the dependent product ``x * x``)."""
    if k == 0:
        one = np.ones_like(x.lo)
        return _Iv(one, one)
    mag = np.maximum(np.abs(x.lo), np.abs(x.hi))
    if k % 2 == 0:
        mig = np.where((x.lo <= 0) & (x.hi >= 0), 0.0, np.minimum(np.abs(x.lo), np.abs(x.hi)))
        return _Iv(_pow_dn(mig, k), _pow_up(mag, k))
    lo = np.where(x.lo >= 0, _pow_dn(np.abs(x.lo), k), -_pow_up(np.abs(x.lo), k))
    hi = np.where(x.hi >= 0, _pow_up(np.abs(x.hi), k), -_pow_dn(np.abs(x.hi), k))
    return _Iv(lo, hi)


def _span(p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, p4: np.ndarray) -> _Iv:
    """Outward-rounded hull of four endpoint products or quotients.

    ``fmin``/``fmax`` skip a NaN (``0 * inf``): it comes from a zero endpoint, and the product set of the real
    intervals is spanned by the other endpoint values; if every candidate is NaN the result is the whole line.
    """
    lo = np.fmin(np.fmin(p1, p2), np.fmin(p3, p4))
    hi = np.fmax(np.fmax(p1, p2), np.fmax(p3, p4))
    lo = np.where(np.isnan(lo), -np.inf, lo)
    hi = np.where(np.isnan(hi), np.inf, hi)
    return _Iv(next_down(lo), next_up(hi))


def _iv_mul(a: _Iv, b: _Iv) -> _Iv:
    return _span(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi)


def _iv_scale(c: float, a: _Iv) -> _Iv:
    """Enclosure of ``c * a`` for a float constant ``c``."""
    if c == 0.0:
        zero = np.zeros_like(a.lo)
        return _Iv(zero, zero)
    lo, hi = (a.lo * c, a.hi * c) if c > 0 else (a.hi * c, a.lo * c)
    return _Iv(next_down(lo), next_up(hi))


def _iv_div_pos(a: _Iv, s: _Iv) -> _Iv:
    """Enclosure of ``a / s`` for an interval ``s`` with ``s.lo > 0``."""
    return _span(a.lo / s.lo, a.lo / s.hi, a.hi / s.lo, a.hi / s.hi)


def _iv_add(a: _Iv, b: _Iv) -> _Iv:
    lo, hi = a.lo + b.lo, a.hi + b.hi
    return _Iv(np.where(np.isnan(lo), -np.inf, next_down(lo)), np.where(np.isnan(hi), np.inf, next_up(hi)))


def _iv_clip(a: _Iv, lo: float, hi: float) -> _Iv:
    """Intersect with ``[lo, hi]`` (a rigorous range of the same quantity)."""
    return _Iv(np.clip(a.lo, lo, hi), np.clip(a.hi, lo, hi))


def _sum_nonneg(v: np.ndarray, upward: bool, axis: int | None = None) -> np.ndarray:
    """A rigorous lower (``upward=False``) or upper bound of the exact sum of nonnegative floats ``v``.

    Any summation order gives ``|fl(S) - S| <= gamma_{n-1} S`` for nonnegative terms (Higham, Thm 4.4; additions
    are exact in the subnormal range), so ``S`` lies within the factor ``1 -+ 2 n u`` of ``fl(S)``, the factors
    themselves rounded outward by at least the ``u`` separating them from the float used.
    """
    n = v.size if axis is None else v.shape[axis]
    if (n + 4) * _U > 1e-3:
        raise ValueError(f"a sum of {n} terms is too long for the rounding-error analysis of the bound.")
    s = np.sum(v, axis=axis)
    if upward:
        return next_up(s * (1.0 + 4.0 * (n + 1) * _U))
    return np.maximum(next_down(s * (1.0 - 4.0 * (n + 1) * _U)), 0.0)


def _rms_enclosure(x: _Iv, i: int, eps: float, min_l2_norm: float = 0.0) -> _Iv:
    """Enclosure of ``s_i = sqrt(mean(x**(2i)) + eps)`` over the box ``x`` (``lo > 0``).

    With ``||x||_2 >= m = min_l2_norm``, the power mean inequality ``mean(x**(2i)) >= mean(x**2)**i`` gives
    ``mean(x**(2i)) >= (m**2 / D)**i`` as a second lower bound.
    """
    dim = float(x.lo.size)
    p = _iv_pow(x, 2 * i)
    mean_lo = np.maximum(next_down(_sum_nonneg(p.lo, upward=False) / dim), 0.0)
    if min_l2_norm > 0.0:
        mean_sq = np.maximum(next_down(next_down(np.float64(min_l2_norm) * min_l2_norm) / dim), 0.0)
        mean_lo = np.maximum(mean_lo, _pow_dn(mean_sq, i))
    mean_hi = next_up(_sum_nonneg(p.hi, upward=True) / dim)
    s_lo = next_down(np.sqrt(next_down(mean_lo + eps)))
    s_hi = next_up(np.sqrt(next_up(mean_hi + eps)))
    # sqrt(eps) > 0 and the rounding above is by one ulp, so s_lo stays positive (eps is a normal float >= 2**-1022).
    return _Iv(np.asarray(s_lo, dtype=np.float64), np.asarray(s_hi, dtype=np.float64))


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def _check_coefficients(coefficients: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.array(coefficients, dtype=np.float64).reshape(-1)
    if a.size < 2:
        raise ValueError(f"PolyNorm needs coefficients a_0..a_r with r >= 1, got {a.size} value(s).")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"PolyNorm coefficients must be finite, got {a.tolist()}.")
    return a


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= np.finfo(np.float64).tiny):
        raise ValueError(f"PolyNorm eps must be a finite normal float > 0 (eps = 0 is not Lipschitz), got {eps}.")
    return eps


def _check_min_norm(min_l2_norm: float) -> float:
    m = float(min_l2_norm)
    if not (math.isfinite(m) and m >= 0.0):
        raise ValueError(f"min_l2_norm must be a finite float >= 0, got {min_l2_norm}.")
    return m


def _check_box_problem(coefficients, eps, lower, upper, min_l2_norm) -> tuple[np.ndarray, float, _Iv, float]:
    """Validated ``(a, eps, box, min_l2_norm)`` of the functions that bound PolyNorm on a box."""
    return (_check_coefficients(coefficients), _check_eps(eps), _check_box(lower, upper),
            _check_min_norm(min_l2_norm))


def _check_box(lower: np.ndarray | Sequence[float], upper: np.ndarray | Sequence[float]) -> _Iv:
    lo = np.array(lower, dtype=np.float64).reshape(-1)
    hi = np.array(upper, dtype=np.float64).reshape(-1)
    if lo.shape != hi.shape or lo.size == 0:
        raise ValueError(f"box ends must be non-empty vectors of equal length, got shapes {lo.shape} and {hi.shape}.")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("box ends must be finite.")
    if np.any(lo > hi):
        j = int(np.flatnonzero(lo > hi)[0])
        raise ValueError(f"empty box: lower[{j}] = {lo[j]} > upper[{j}] = {hi[j]}.")
    return _Iv(lo, hi)


# ----------------------------------------------------------------------------------------------
# Floating-point evaluation (reference, not rigorous)
# ----------------------------------------------------------------------------------------------


def polynorm(x: np.ndarray | Sequence[float], coefficients: Sequence[float] | np.ndarray, eps: float) -> np.ndarray:
    """PolyNorm of one vector in float64: ``a_0 + sum_i a_i x**i / sqrt(mean(x**(2i)) + eps)``.

    Parameters
    ----------
    x : array_like, shape (D,)
    coefficients : array_like, shape (r + 1,)
        Paper order ``[a_0, ..., a_r]`` (as returned by ``PolyNorm.coefficients()``).
    eps : float

    Returns
    -------
    numpy.ndarray, shape (D,)

    Examples
    --------
    >>> polynorm([3.0, -4.0], [0.0, 1.0], 1e-12).round(4).tolist()
    [0.8485, -1.1314]
    """
    a = _check_coefficients(coefficients)
    z = np.asarray(x, dtype=np.float64).reshape(-1)
    out = np.full_like(z, a[0])
    for i in range(1, a.size):
        u = z**i
        out += a[i] * u / math.sqrt(float(np.mean(u * u)) + eps)
    return out


def polynorm_jacobian(x: np.ndarray | Sequence[float], coefficients: Sequence[float] | np.ndarray,
                      eps: float) -> np.ndarray:
    """Closed-form Jacobian of PolyNorm at one point, in float64 (not rigorous; for comparisons).

    ``J = sum_i a_i (diag(i x**(i-1)) / s_i - x**i (i x**(2i-1))^T / (D s_i**3))``.

    Parameters
    ----------
    x : array_like, shape (D,)
    coefficients : array_like, shape (r + 1,)
    eps : float

    Returns
    -------
    numpy.ndarray, shape (D, D)
        ``J[k, j] = d y_k / d x_j``.

    Examples
    --------
    >>> polynorm_jacobian([0.0, 0.0], [0.0, 1.0], 0.25).tolist()  # 1 / sqrt(eps) * I at x = 0
    [[2.0, 0.0], [0.0, 2.0]]
    """
    a = _check_coefficients(coefficients)
    z = np.asarray(x, dtype=np.float64).reshape(-1)
    dim = z.size
    jac = np.zeros((dim, dim))
    for i in range(1, a.size):
        if a[i] == 0.0:
            continue
        u = z**i
        s = math.sqrt(float(np.mean(u * u)) + eps)
        jac += a[i] * (np.diag(i * z ** (i - 1)) / s - np.outer(u, i * z ** (2 * i - 1)) / (dim * s**3))
    return jac


# ----------------------------------------------------------------------------------------------
# Rigorous enclosures over boxes
# ----------------------------------------------------------------------------------------------


def polynorm_jacobian_enclosure(coefficients: Sequence[float] | np.ndarray, eps: float,
                                lower: np.ndarray | Sequence[float], upper: np.ndarray | Sequence[float],
                                min_l2_norm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Float matrices ``Jlo <= J(x) <= Jhi`` (entrywise) for every real ``x`` in the box ``[lower, upper]``.

    Interval arithmetic with outward rounding on the closed form. The diagonal uses
    ``J_i[j, j] = (i x_j**(i-1) / s_i) (1 - q)`` with ``q = x_j**(2i) / (D s_i**2)`` in ``[0, 1)``, the
    off-diagonal entries ``-i x_k**i x_j**(2i-1) / (D s_i**3)``.

    Parameters
    ----------
    coefficients : array_like, shape (r + 1,)
        Paper order ``[a_0, ..., a_r]``.
    eps : float
        Normal float > 0.
    lower, upper : array_like, shape (D,)
        Finite box ends.
    min_l2_norm : float, default 0
        A lower bound of ``||x||_2`` on the subset ``S`` of the box that matters; the result then holds for the
        ``x`` in ``S`` only (``0``: the whole box). It sharpens the lower bounds of the ``s_i``.

    Returns
    -------
    Jlo, Jhi : numpy.ndarray, shape (D, D)

    Examples
    --------
    >>> lo, hi = polynorm_jacobian_enclosure([0.0, 1.0], 1e-6, [1.0, -1.0], [1.0, -1.0])
    >>> bool(np.all(lo <= hi))
    True
    """
    a, eps, x, min_l2_norm = _check_box_problem(coefficients, eps, lower, upper, min_l2_norm)
    dim = x.lo.size
    total = _Iv(np.zeros((dim, dim)), np.zeros((dim, dim)))
    off_mask = ~np.eye(dim, dtype=bool)
    for i in range(1, a.size):
        if a[i] == 0.0:
            continue
        s = _rms_enclosure(x, i, eps, min_l2_norm)
        s2 = _Iv(next_down(s.lo * s.lo), next_up(s.hi * s.hi))
        s3 = _Iv(next_down(s2.lo * s.lo), next_up(s2.hi * s.hi))
        d_s3 = _Iv(next_down(s3.lo * dim), next_up(s3.hi * dim))  # D s_i**3, positive
        u = _iv_pow(x, i)
        v = _iv_scale(float(i), _iv_pow(x, 2 * i - 1))
        outer = _iv_mul(_Iv(u.lo[:, None], u.hi[:, None]), _Iv(v.lo[None, :], v.hi[None, :]))
        off = _iv_div_pos(outer, _Iv(np.full((dim, dim), d_s3.lo), np.full((dim, dim), d_s3.hi)))
        # diagonal: (i x^(i-1) / s) (1 - q), q = x^(2i) / (D s^2) in [0, 1): the dependency is kept in q
        d_s2 = _Iv(np.full(dim, next_down(s2.lo * dim)), np.full(dim, next_up(s2.hi * dim)))
        q = _iv_div_pos(_iv_pow(x, 2 * i), d_s2)
        q = _iv_clip(q, 0.0, 1.0)
        one_minus_q = _Iv(np.maximum(next_down(1.0 - q.hi), 0.0), np.minimum(next_up(1.0 - q.lo), 1.0))
        lead = _iv_div_pos(_iv_scale(float(i), _iv_pow(x, i - 1)), _Iv(np.full(dim, s.lo), np.full(dim, s.hi)))
        diag = _iv_mul(lead, one_minus_q)
        term_lo = np.where(off_mask, -off.hi, 0.0)
        term_hi = np.where(off_mask, -off.lo, 0.0)
        np.fill_diagonal(term_lo, diag.lo)
        np.fill_diagonal(term_hi, diag.hi)
        total = _iv_add(total, _iv_scale(float(a[i]), _Iv(term_lo, term_hi)))
    return total.lo, total.hi


def polynorm_output_enclosure(coefficients: Sequence[float] | np.ndarray, eps: float,
                              lower: np.ndarray | Sequence[float], upper: np.ndarray | Sequence[float],
                              min_l2_norm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Rigorous bounds of the PolyNorm output over the box ``[lower, upper]``.

    Each term ``x_k**i / s_i`` is enclosed by interval arithmetic and intersected with its global range
    ``(-sqrt(D), sqrt(D))`` (``[0, sqrt(D))`` for even ``i``), since ``x_k**(2i) <= D mean(x**(2i)) < D s_i**2``.
    The output box is therefore always finite.

    Parameters
    ----------
    coefficients : array_like, shape (r + 1,)
    eps : float
    lower, upper : array_like, shape (D,)
    min_l2_norm : float, default 0
        A lower bound of ``||x||_2`` on the subset ``S`` of the box that matters; the result then holds for the
        ``x`` in ``S`` only (``0``: the whole box). It sharpens the lower bounds of the ``s_i``.

    Returns
    -------
    lower, upper : numpy.ndarray, shape (D,)

    Examples
    --------
    >>> lo, hi = polynorm_output_enclosure([0.5, 1.0], 1e-6, [-1.0, 2.0], [1.0, 3.0])
    >>> y = polynorm([0.25, 2.5], [0.5, 1.0], 1e-6)
    >>> bool(np.all((lo <= y) & (y <= hi)))
    True
    """
    a, eps, x, min_l2_norm = _check_box_problem(coefficients, eps, lower, upper, min_l2_norm)
    dim = x.lo.size
    root_d = sqrt_up(dim)
    total = _Iv(np.full(dim, a[0]), np.full(dim, a[0]))
    for i in range(1, a.size):
        if a[i] == 0.0:
            continue
        s = _rms_enclosure(x, i, eps, min_l2_norm)
        term = _iv_div_pos(_iv_pow(x, i), _Iv(np.full(dim, s.lo), np.full(dim, s.hi)))
        term = _iv_clip(term, 0.0 if i % 2 == 0 else -root_d, root_d)
        total = _iv_add(total, _iv_scale(float(a[i]), term))
    return total.lo, total.hi


# ----------------------------------------------------------------------------------------------
# Norm bounds
# ----------------------------------------------------------------------------------------------


def _product_norm_bound(b: np.ndarray) -> float:
    """A float >= ``sqrt(||B||_1 ||B||_inf)`` (>= ``||B||_2``) for a nonnegative float matrix ``B``."""
    col = float(np.max(_sum_nonneg(b, upward=True, axis=0)))
    row = float(np.max(_sum_nonneg(b, upward=True, axis=1)))
    if not (math.isfinite(col) and math.isfinite(row)):
        return math.inf
    return sqrt_up(Fraction(col) * Fraction(row))


def _spectral_upper(m: np.ndarray) -> float:
    """A float >= ``||M||_2`` (``inf`` for non-finite entries)."""
    if not np.all(np.isfinite(m)):
        return math.inf
    return spectral_norm_upper(m)


def _nonneg_norm_upper(b: np.ndarray) -> float:
    """A float >= ``||B||_2`` for a nonnegative float matrix ``B`` (infinite entries give ``inf``)."""
    if not np.all(np.isfinite(b)):
        return math.inf
    return min(_spectral_upper(b), _product_norm_bound(b))


def interval_matrix_norm_upper(lower: np.ndarray, upper: np.ndarray) -> dict[str, float]:
    """Rigorous upper bounds of ``max ||A||_2`` over real matrices ``lower <= A <= upper`` (entrywise).

    Parameters
    ----------
    lower, upper : numpy.ndarray, shape (m, n)

    Returns
    -------
    dict
        ``abs``: ``||max(|lower|, |upper|)||_2`` bound (``|A v| <= B |v|``); ``midrad``: ``||C||_2 + ||R||_2``
        with midpoint ``C`` and radius ``R``; ``bound``: the smaller of the two.

    Examples
    --------
    >>> b = interval_matrix_norm_upper(np.array([[1.0, -1.0]]), np.array([[1.0, -1.0]]))
    >>> bool(np.sqrt(2) <= b["bound"] < np.sqrt(2) * (1 + 1e-6))
    True
    """
    lo = np.asarray(lower, dtype=np.float64)
    hi = np.asarray(upper, dtype=np.float64)
    if lo.shape != hi.shape or lo.ndim != 2:
        raise ValueError(f"need two matrices of equal shape, got {lo.shape} and {hi.shape}.")
    if np.any(np.isnan(lo)) or np.any(np.isnan(hi)) or np.any(lo > hi):
        raise ValueError("interval matrix ends must satisfy lower <= upper (no NaN).")
    abs_bound = _nonneg_norm_upper(np.maximum(np.abs(lo), np.abs(hi)))
    if np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)):
        mid = 0.5 * lo + 0.5 * hi  # any float matrix works as a centre; the radius below encloses both ends
        rad = next_up(np.maximum(hi - mid, mid - lo))
        mid_norm, rad_norm = _spectral_upper(mid), _nonneg_norm_upper(rad)
        midrad = round_up(Fraction(mid_norm) + Fraction(rad_norm)) if math.isfinite(rad_norm) else math.inf
    else:
        midrad = math.inf
    return {"abs": abs_bound, "midrad": midrad, "bound": min(abs_bound, midrad)}


# ----------------------------------------------------------------------------------------------
# Scalar bounds (exact rational arithmetic, rounded up once)
# ----------------------------------------------------------------------------------------------


def _root_up(q: Fraction, n: int) -> float:
    """The smallest float >= ``q**(1/n)`` for exact ``q >= 0`` (a libm guess, corrected by exact comparisons)."""
    if q <= 0:
        return 0.0
    log_q = math.log(q.numerator) - math.log(q.denominator)
    f = math.exp(log_q / n)
    while Fraction(f) ** n < q:
        f = math.nextafter(f, math.inf)
    while f > 0 and Fraction(math.nextafter(f, 0.0)) ** n >= q:
        f = math.nextafter(f, 0.0)
    return f


def _term_peak_power(i: int, dim: int, eps: float) -> Fraction:
    """``C_i**(2i) = i**i (D (i-1) eps)**(i-1) / eps**i`` for ``i >= 2``, ``1/eps`` for ``i = 1`` (exact)."""
    e = Fraction(eps)
    if i == 1:
        return 1 / e
    return Fraction(i) ** i * (dim * (i - 1) * e) ** (i - 1) / e**i


def _h_squared(i: int, dim: int, eps: float, t: float) -> Fraction:
    """``h_i(t)**2 = i**2 t**(2(i-1)) / (t**(2i)/D + eps)`` (exact)."""
    tt = Fraction(t)
    return Fraction(i * i) * tt ** (2 * (i - 1)) / (tt ** (2 * i) / dim + Fraction(eps))


def _term_sup_on_range(i: int, dim: int, eps: float, t_lo: float, t_hi: float) -> float:
    """A float >= ``sup h_i(t)`` over ``t`` in ``[t_lo, t_hi]`` (unimodal ``h_i``, exact comparisons)."""
    if i == 1:
        return sqrt_up(_h_squared(1, dim, eps, t_lo))  # h_1 decreases
    peak = Fraction(dim * (i - 1)) * Fraction(eps)  # t*^(2i)
    if Fraction(t_hi) ** (2 * i) <= peak:
        return sqrt_up(_h_squared(i, dim, eps, t_hi))  # increasing on [0, t*]
    if Fraction(t_lo) ** (2 * i) >= peak:
        return sqrt_up(_h_squared(i, dim, eps, t_lo))  # decreasing on [t*, inf)
    return _root_up(_term_peak_power(i, dim, eps), 2 * i)


def polynorm_global_lipschitz(coefficients: Sequence[float] | np.ndarray, dim: int, eps: float) -> float:
    """Certified global l2 Lipschitz bound of PolyNorm on ``R^D``: ``sum_i |a_i| C_i`` (rounded up).

    ``C_1 = 1/sqrt(eps)`` and ``C_i = sqrt(i) (D (i-1) eps)**((i-1)/(2i)) / sqrt(eps)`` for ``i >= 2`` are the
    maxima of ``h_i`` (see the module notes), evaluated exactly as ``(C_i**(2i))**(1/(2i))`` and rounded up.
    Each ``C_i`` is within the factor ``2**((i-1)/(2i))`` of the true constant of the ``i``-th term.

    Parameters
    ----------
    coefficients : array_like, shape (r + 1,)
    dim : int
        The width ``D`` the normalisation averages over.
    eps : float

    Returns
    -------
    float

    Examples
    --------
    >>> polynorm_global_lipschitz([0.0, 1.0], 8, 0.25)
    2.0
    """
    a = _check_coefficients(coefficients)
    eps = _check_eps(eps)
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}.")
    total = Fraction(0)
    for i in range(1, a.size):
        if a[i] != 0.0:
            total += abs(Fraction(float(a[i]))) * Fraction(_root_up(_term_peak_power(i, int(dim), eps), 2 * i))
    return round_up(total)


def _projector_bound(a: np.ndarray, eps: float, x: _Iv, min_l2_norm: float) -> float:
    """``sum_i |a_i| min(i M**(i-1) / s_i_lo, sup_{[m, M]} h_i)`` rounded up (see the module notes)."""
    dim = x.lo.size
    mag = np.maximum(np.abs(x.lo), np.abs(x.hi))
    mig = np.where((x.lo <= 0) & (x.hi >= 0), 0.0, np.minimum(np.abs(x.lo), np.abs(x.hi)))
    t_hi, t_lo = float(np.max(mag)), float(np.max(mig))  # range of ||x||_inf over the box
    # ||x||_inf >= ||x||_2 / sqrt(D) >= min_l2_norm / sqrt(D)
    t_lo = max(t_lo, float(next_down(np.float64(min_l2_norm) / sqrt_up(dim))))
    total = Fraction(0)
    for i in range(1, a.size):
        if a[i] == 0.0:
            continue
        s_lo = float(_rms_enclosure(x, i, eps, min_l2_norm).lo)
        via_rms = Fraction(i) * Fraction(t_hi) ** (i - 1) / Fraction(s_lo)
        via_h = Fraction(_term_sup_on_range(i, dim, eps, t_lo, t_hi))
        total += abs(Fraction(float(a[i]))) * min(via_rms, via_h)
    return round_up(total)


def polynorm_local_bounds(coefficients: Sequence[float] | np.ndarray, eps: float,
                          lower: np.ndarray | Sequence[float], upper: np.ndarray | Sequence[float],
                          min_l2_norm: float = 0.0) -> dict[str, float]:
    """All four certified bounds of ``sup ||J(x)||_2`` over the box (see the module notes) and their minimum.

    Parameters
    ----------
    coefficients : array_like, shape (r + 1,)
        Paper order ``[a_0, ..., a_r]``.
    eps : float
    lower, upper : array_like, shape (D,)
    min_l2_norm : float, default 0
        A lower bound of ``||x||_2`` on the subset ``S`` of the box that matters; the bounds then hold on ``S``
        only (``S`` convex for a Lipschitz bound) (``0``: the whole box). It sharpens the lower bounds of the ``s_i``.

    Returns
    -------
    dict
        Keys ``interval_abs``, ``interval_midrad``, ``projector``, ``global`` and ``bound`` (the minimum).

    Examples
    --------
    >>> b = polynorm_local_bounds([0.0, 1.0], 0.25, [0.0, 0.0], [0.0, 0.0])
    >>> b["global"], round(b["bound"], 6)
    (2.0, 2.0)
    """
    a, eps, x, min_l2_norm = _check_box_problem(coefficients, eps, lower, upper, min_l2_norm)
    jlo, jhi = polynorm_jacobian_enclosure(a, eps, x.lo, x.hi, min_l2_norm)
    norms = interval_matrix_norm_upper(jlo, jhi)
    out = {
        "interval_abs": norms["abs"],
        "interval_midrad": norms["midrad"],
        "projector": _projector_bound(a, eps, x, min_l2_norm),
        "global": polynorm_global_lipschitz(a, x.lo.size, eps),
    }
    out["bound"] = min(out.values())
    return out


def polynorm_local_lipschitz(coefficients: Sequence[float] | np.ndarray, eps: float,
                             lower: np.ndarray | Sequence[float], upper: np.ndarray | Sequence[float],
                             min_l2_norm: float = 0.0) -> float:
    """Certified l2 Lipschitz bound of PolyNorm on the box ``[lower, upper]`` (a sound upper bound).

    For all ``x, x'`` in the box, ``||PolyNorm(x) - PolyNorm(x')||_2 <= L ||x - x'||_2`` with the returned ``L``
    (the box is convex and PolyNorm is C^1, so ``L >= sup ||J||_2`` suffices). With ``min_l2_norm > 0`` the
    statement is for ``x, x'`` in a convex subset ``S`` of the box on which ``||x||_2 >= min_l2_norm``.

    Parameters
    ----------
    coefficients : array_like, shape (r + 1,)
        Paper order ``[a_0, ..., a_r]``, e.g. ``PolyNorm.coefficients()``.
    eps : float
        The module's ``eps`` (a normal float > 0).
    lower, upper : array_like, shape (D,)
        Finite box ends, ``lower <= upper``.
    min_l2_norm : float, default 0
        See above; ``0`` certifies the whole box.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> x0 = np.array([1.0, -2.0, 0.5])
    >>> L = polynorm_local_lipschitz([0.0, 0.5, 0.5], 1e-6, x0, x0)
    >>> bool(np.linalg.norm(polynorm_jacobian(x0, [0.0, 0.5, 0.5], 1e-6), 2) <= L)
    True
    """
    return polynorm_local_bounds(coefficients, eps, lower, upper, min_l2_norm)["bound"]
