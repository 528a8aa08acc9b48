"""Activation enclosures: rigorous point values, interval images and linear relaxations.

Interval images (IBP)
    Monotone activations (ReLU, LeakyReLU with slope >= 0, identity, tanh, sigmoid, ELU with alpha >= 0,
    softplus) by their endpoint values; "valley" activations that decrease up to a critical bracket ``[a, b]``
    and increase after it (GELU, SiLU, Mish, LeakyReLU with slope < 0, ELU with alpha < 0) by the endpoint
    values and an enclosure of the minimum (the critical points of GELU, SiLU and Mish are found numerically
    and the monotonicity on both sides is *proved* with :func:`lipbound.slopes.slope_bounds` on
    ``(-inf, a]`` and ``[b, inf)``); PolyReLU by the natural interval extension of its polynomial intersected
    with the mean-value form (endpoint values where ``slope_bounds`` proves monotonicity).

Linear relaxations (CROWN)
    Each slope-restricted activation gets lines ``s_l z + i_l <= phi(z) <= s_u z + i_u`` on its pre-activation
    interval ``[l, u]``. The *slopes* are chosen heuristically in floating point: among tangents (mid-ranges of
    the slope bounds of 64 grid pieces), the chord and secants from either end through grid points, the line
    with the least area between it and the graph (estimated on the grid) wins; for ReLU this is CROWN's
    triangle with the adaptive lower slope. The *intercepts* are then computed rigorously for whatever slope
    was chosen: with ``g = phi - s z`` and slope ranges ``[alpha_k, beta_k]`` of ``phi`` (from
    :func:`~lipbound.slopes.slope_bounds`) on the pieces ``[p_k, q_k]`` of the grid (which contains the kink
    0), ``min g >= min_k max(g(q_k) - (beta_k - s)^+ h_k, g(p_k) + (alpha_k - s)^- h_k)``, with ``g(p)`` from
    rigorous point enclosures of ``phi``; the bottleneck piece is split twice more into 8. This is exact on
    pieces where ``g`` is monotone, so tangent and chord lines are nearly exact, and soundness never depends on
    convexity or on the slope choice.

GroupSort and Householder (images only)
    GroupSort: the k-th order statistic of a group is non-decreasing in every coordinate, so the bounds are
    the sorted lower and the sorted upper ends (max pooling is a GroupSort of the window). Householder: the
    rigorously bounded sign of ``v^T z`` selects the branch (identity, reflection, or the hull of both); the
    reflection is bounded as an interval matrix that covers both ``I - 2 v v^T`` with the stored float vector
    and the exact reflection with ``v / ||v||``; every coordinate is finally clipped to ``+-||R||_2 max
    ||z||_2`` (the output has the norm of the input).

Rounding of transcendental functions
    numpy's ``exp``, ``expm1``, ``log1p``, ``tanh`` are not correctly rounded: their results are widened by
    ``16 eps ~ 3.6e-15`` relative (a generous bound: glibc and numpy's SIMD kernels are documented to <= 4 ulp)
    plus ``1e-300`` absolute, as in :mod:`lipbound.slopes`. ``scipy.special.ndtr`` (GELU) is widened by the
    argument-conditioning model of :mod:`lipbound.slopes` (doubled): ``(16 x^2 + 64) eps min(Phi, 1 - Phi) +
    16 eps Phi + 1e-300``. Activations are evaluated through cancellation-free formulas (``e^{-|x|}``,
    ``expm1``, ``log1p``), not with torch's forward functions (e.g. ``F.gelu`` cancels in ``1 + erf``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import scipy.optimize
import scipy.special
import torch

from lipbound.activations import ActivationSpec
from lipbound.bounds.operators import F64, U, abs_term, affine_box, nan_to, rel
from lipbound.errors import FormulationError
from lipbound.network import GroupSortLayer, HouseholderLayer, SlopeRestricted
from lipbound.rigorous import TINY
from lipbound.rigorous import outward_down as _dn
from lipbound.rigorous import outward_up as _up
from lipbound.slopes import slope_bounds

_EPS = 2.0**-52
_LIBM_REL = 16.0 * _EPS  # relative error allowance of numpy's exp/expm1/log1p/tanh
_LIBM_ABS = 1e-300  # absolute error allowance of every libm result (subnormal range)
_HUGE = 1e150  # neurons with larger pre-activation bounds get constant relaxations (no overflow)
_GRID = 64  # pieces of the uniform grid of a relaxation interval (plus the kink 0)
_SPLIT = 8  # refinement of the bottleneck piece of a rigorous intercept ...
_ROUNDS = 2  # ... done this many times
_CHUNK = 512  # neurons relaxed at once (bounds the memory of the candidate search)


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


def point_enclosure(spec: ActivationSpec, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
def valley(spec: ActivationSpec) -> tuple[float, float, float, float] | None:
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
    alo, ahi = point_enclosure(spec, np.array([a]))
    m_lo = _dn(alo[0] + _dn(min(float(alpha), 0.0) * width))
    m_hi = _up(ahi[0] + _up(max(float(beta), 0.0) * width))
    return float(a), float(b), float(m_lo), float(m_hi)


def interval_image(spec: ActivationSpec, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rigorous enclosure of ``phi([lo, hi])`` (elementwise)."""
    fin = np.isfinite(lo) & np.isfinite(hi)
    if spec.name == "polyrelu":
        out_lo, out_hi = _polyrelu_image(tuple(spec.params["coefficients"]), np.where(fin, lo, 0.0),
                                         np.where(fin, hi, 0.0))
    else:
        llo, lhi = point_enclosure(spec, lo)
        ulo, uhi = point_enclosure(spec, hi)
        bracket = valley(spec)
        if bracket is None:
            out_lo, out_hi = llo, uhi
        else:
            a, b, m_lo, m_hi = bracket
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
        slo, shi = point_enclosure(spec, sub)
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


def linear_relaxation(spec: ActivationSpec, lo: np.ndarray, hi: np.ndarray, img_lo: np.ndarray,
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
    flo, fhi = point_enclosure(spec, pts)
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


def householder_image(layer: HouseholderLayer, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IBP through a Householder layer.

    Per group the output is ``z`` (if ``v^T z > 0``) or ``R z`` with ``R = I - k v v^T``. We allow every
    ``k`` between 2 (the float vector used by ``forward``) and ``2 / ||v||^2`` (the exact unit vector), so
    the bound holds for both readings. Rigorous bounds of ``v^T z`` select the branch (hull of both when
    undecided); ``R z`` is bounded as an interval matrix ``fl(I - 2 v v^T) +- err`` times the box. Finally
    every coordinate is clipped to ``[-rho, rho]`` with ``rho >= ||R||_2 max ||z||_2`` (``||R||_2 <=
    max(1, |1 - 2 ||v||^2|)``).
    """
    g = layer.group_size
    v = torch.tensor(np.array(layer.vectors), dtype=F64, device=lo.device)  # (G, g)
    zl, zh = lo.reshape(layer.n_groups, g), hi.reshape(layer.n_groups, g)
    pl, ph = affine_box(v.unsqueeze(-2), torch.zeros(layer.n_groups, 1, dtype=F64, device=lo.device), zl, zh)
    eye = torch.eye(g, dtype=F64, device=lo.device)
    m = eye - 2.0 * v.unsqueeze(-1) * v.unsqueeze(-2)
    s = (v * v).sum(-1)
    s_lo = _dn(_dn(s * (1.0 - rel(g))) - abs_term(g))  # squares may have been rounded up from underflow
    s_hi = _up(_up(s * (1.0 + rel(g))) + abs_term(g))
    k_dev = torch.maximum(_up(_up(2.0 / s_lo) - 2.0), _up(2.0 - _dn(2.0 / s_hi))).clamp(min=0.0)
    vv = v.abs().unsqueeze(-1) * v.abs().unsqueeze(-2)
    w_err = _up((k_dev[:, None, None] + 8 * U) * (1.0 + 8 * U) * (2.0 * vv + m.abs()) + 4 * TINY)
    rl, rh = affine_box(m, torch.zeros_like(zl), zl, zh, w_err=w_err)
    ident = (pl > 0).expand_as(zl)
    refl = (ph <= 0).expand_as(zl)
    out_lo = torch.where(ident, zl, torch.where(refl, rl, torch.minimum(zl, rl)))
    out_hi = torch.where(ident, zh, torch.where(refl, rh, torch.maximum(zh, rh)))
    zmax = torch.maximum(zl.abs(), zh.abs())
    norm = _up(torch.sqrt(_up(_up((zmax * zmax).sum(-1) * (1.0 + rel(g))) + abs_term(g))))
    factor = torch.maximum(torch.ones_like(s), torch.maximum(_up(2.0 * s_hi - 1.0), _up(1.0 - 2.0 * s_lo)))
    rho = nan_to(_up(factor * norm), math.inf).unsqueeze(-1)
    out_lo, out_hi = torch.maximum(out_lo, -rho), torch.minimum(out_hi, rho)
    return out_lo.reshape(-1), out_hi.reshape(-1)


def activation_image(stage: Any, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigorous box enclosing the image of the box ``[lo, hi]`` under an activation stage."""
    if isinstance(stage, SlopeRestricted):
        ilo, ihi = interval_image(stage.activation, lo.cpu().numpy(), hi.cpu().numpy())
        return torch.tensor(ilo, dtype=F64, device=lo.device), torch.tensor(ihi, dtype=F64, device=lo.device)
    if isinstance(stage, GroupSortLayer):
        # the k-th order statistic of a group is non-decreasing in every coordinate
        shape = (stage.n_groups, stage.group_size)
        return (torch.sort(lo.reshape(shape), dim=-1).values.reshape(-1),
                torch.sort(hi.reshape(shape), dim=-1).values.reshape(-1))
    if isinstance(stage, HouseholderLayer):
        return householder_image(stage, lo, hi)
    raise FormulationError(f"activation_bounds: no interval bound for stage '{getattr(stage, 'name', stage)}' "
                           f"of type {type(stage).__name__}.")
