"""Tests of :mod:`lipbound.slopes`.

Soundness is checked against *exact* difference quotients (mpmath at 60 digits, compared with the
float bounds without tolerance) and against dense float64 grids; tightness against an independent
mpmath reference range (endpoints, critical points, Clarke sets at kinks); global ranges against
the symbolic derivation in :mod:`theory.slopes`.
"""

from __future__ import annotations

import functools
import math

import mpmath
import numpy as np
import pytest
import scipy.special
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lipbound import slopes
from lipbound.slopes import ACTIVATION_NAMES, global_slope_bounds, slope_bounds

DPS = 60
POLY_MULTI = (0.0, 1.0, -1.125, 0.875, -5.0 / 12.0, 0.05)  # d' ~ (x - 0.5)(x - 1.5)(x - 3)

CONFIGS: list[tuple[str, dict]] = [
    ("relu", {}),
    ("leaky_relu", {}),
    ("leaky_relu", {"negative_slope": -0.5}),
    ("leaky_relu", {"negative_slope": 3.0}),
    ("identity", {}),
    ("tanh", {}),
    ("sigmoid", {}),
    ("elu", {}),
    ("elu", {"alpha": 2.5}),
    ("elu", {"alpha": 0.3}),
    ("softplus", {}),
    ("softplus", {"beta": 4.0}),
    ("softplus", {"beta": 0.5, "threshold": 20.0}),
    ("gelu", {}),
    ("gelu_tanh", {}),
    ("silu", {}),
    ("mish", {}),
    ("polyrelu", {}),
    ("polyrelu", {"coefficients": (0.2, 1.0, -1.0, 0.5)}),
    ("polyrelu", {"coefficients": POLY_MULTI}),
    ("polyrelu", {"coefficients": (1.0, -0.5, 0.25)}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" if p else n for n, p in CONFIGS]
KINKED = {"relu", "leaky_relu", "elu", "polyrelu"}


# ------------------------------------------------------------------------------------------------
# mpmath reference implementation
# ------------------------------------------------------------------------------------------------


def _mpf(v) -> mpmath.mpf:
    return mpmath.mpf(float(v))


def _sig(t):
    return 1 / (1 + mpmath.exp(-t))


def _gelu_tanh_u(t):
    """``u = k (t + c t^3)`` of the tanh form of GELU, ``k = sqrt(2/pi)``, ``c = 0.044715`` (exact)."""
    return mpmath.sqrt(2 / mpmath.pi) * (t + mpmath.mpf("0.044715") * t**3)


def phi_mp(name: str, params: dict):
    """The activation in mpmath (call inside ``mpmath.workdps``)."""
    if name == "relu":
        return lambda t: max(t, 0)
    if name == "leaky_relu":
        s = _mpf(params.get("negative_slope", 0.01))
        return lambda t: t if t >= 0 else s * t
    if name == "identity":
        return lambda t: t
    if name == "tanh":
        return mpmath.tanh
    if name == "sigmoid":
        return _sig
    if name == "elu":
        a = _mpf(params.get("alpha", 1.0))
        return lambda t: t if t > 0 else a * mpmath.expm1(t)
    if name == "softplus":
        b = _mpf(params.get("beta", 1.0))
        return lambda t: mpmath.log1p(mpmath.exp(b * t)) / b
    if name == "gelu":
        return lambda t: t * mpmath.ncdf(t)
    if name == "gelu_tanh":
        return lambda t: t * _sig(2 * _gelu_tanh_u(t))  # = t (1 + tanh u) / 2 without cancellation
    if name == "silu":
        return lambda t: t * _sig(t)
    if name == "mish":
        return lambda t: t * mpmath.tanh(mpmath.log1p(mpmath.exp(t)))
    coefs = [_mpf(c) for c in params.get("coefficients", (0.0, 1.0))]
    return lambda t: coefs[0] + sum(c * max(t, 0) ** i for i, c in enumerate(coefs) if i > 0)


def dphi_mp(name: str, params: dict):
    """phi' in mpmath away from kinks (call inside ``mpmath.workdps``)."""
    if name == "relu":
        return lambda t: mpmath.mpf(1 if t > 0 else 0)
    if name == "leaky_relu":
        s = _mpf(params.get("negative_slope", 0.01))
        return lambda t: mpmath.mpf(1) if t > 0 else s
    if name == "identity":
        return lambda t: mpmath.mpf(1)
    if name == "tanh":
        return lambda t: mpmath.sech(t) ** 2
    if name == "sigmoid":
        return lambda t: _sig(t) * _sig(-t)
    if name == "elu":
        a = _mpf(params.get("alpha", 1.0))
        return lambda t: mpmath.mpf(1) if t > 0 else a * mpmath.exp(t)
    if name == "softplus":
        b = _mpf(params.get("beta", 1.0))
        return lambda t: _sig(b * t)
    if name == "gelu":
        return lambda t: mpmath.ncdf(t) + t * mpmath.npdf(t)
    if name == "gelu_tanh":
        k, c = mpmath.sqrt(2 / mpmath.pi), mpmath.mpf("0.044715")
        return lambda t: (_sig(2 * _gelu_tanh_u(t))
                          + t * mpmath.sech(_gelu_tanh_u(t)) ** 2 * k * (1 + 3 * c * t**2) / 2)
    if name == "silu":
        return lambda t: _sig(t) + t * _sig(t) * _sig(-t)
    if name == "mish":

        def d(t):
            sp = mpmath.log1p(mpmath.exp(t))
            return mpmath.tanh(sp) + t * mpmath.sech(sp) ** 2 * _sig(t)

        return d
    coefs = [_mpf(c) for c in params.get("coefficients", (0.0, 1.0))]
    return lambda t: (mpmath.mpf(0) if t < 0
                      else sum(i * c * t ** (i - 1) for i, c in enumerate(coefs) if i > 0))


def clarke_at_zero(name: str, params: dict) -> tuple[float, float]:
    """One-sided derivatives at the kink x = 0 (their hull is the Clarke derivative)."""
    left = {"relu": 0.0, "leaky_relu": params.get("negative_slope", 0.01), "elu": params.get("alpha", 1.0),
            "polyrelu": 0.0}[name]
    coefs = params.get("coefficients", (0.0, 1.0))
    right = coefs[1] if name == "polyrelu" and len(coefs) > 1 else (0.0 if name == "polyrelu" else 1.0)
    return float(left), float(right)


@functools.cache
def critical_points(name: str, params_key: tuple) -> tuple:
    """Zeros of phi'' (high precision), found independently of the library."""
    params = dict(params_key)
    with mpmath.workdps(DPS):
        if name in ("tanh", "sigmoid"):
            return (mpmath.mpf(0),)
        if name == "gelu":
            return (-mpmath.sqrt(2), mpmath.sqrt(2))
        if name == "silu":
            r = mpmath.findroot(lambda t: 2 - t * mpmath.tanh(t / 2), 2.4)
            return (-r, r)
        if name == "gelu_tanh":
            d = dphi_mp(name, params)
            r = mpmath.findroot(lambda t: mpmath.diff(d, t), 1.42)
            return (-r, r)
        if name == "mish":
            d = dphi_mp(name, params)
            return tuple(mpmath.findroot(lambda t: mpmath.diff(d, t), x0) for x0 in (-2.26, 1.49))
        if name == "polyrelu":
            coefs = [_mpf(c) for c in params.get("coefficients", (0.0, 1.0))]
            dd = [i * (i - 1) * c for i, c in enumerate(coefs) if i >= 2]  # ascending
            while dd and dd[-1] == 0:
                dd.pop()
            if len(dd) < 2:
                return ()
            roots = mpmath.polyroots(list(reversed(dd)), maxsteps=200, extraprec=200)
            return tuple(mpmath.re(r) for r in roots if abs(mpmath.im(r)) < 1e-40 and mpmath.re(r) > 0)
        return ()


def reference_range(name: str, params: dict, lo: float, hi: float) -> tuple[mpmath.mpf, mpmath.mpf]:
    """Hull of the Clarke derivative over [lo, hi] (finite), from endpoints/critical points/kinks."""
    with mpmath.workdps(DPS):
        d = dphi_mp(name, params)
        vals = []
        for t in (lo, hi):
            if not (t == 0 and name in KINKED):
                vals.append(d(_mpf(t)))
        for c in critical_points(name, tuple(sorted(params.items()))):
            if _mpf(lo) <= c <= _mpf(hi):
                vals.append(d(c))
        if name in KINKED and lo <= 0 <= hi:
            vals.extend(_mpf(v) for v in clarke_at_zero(name, params))
        return min(vals), max(vals)


# ------------------------------------------------------------------------------------------------
# float64 reference (torch / numpy) for dense grids
# ------------------------------------------------------------------------------------------------


def phi_float(name: str, params: dict, x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    if name == "relu":
        y = torch.relu(t)
    elif name == "leaky_relu":
        y = F.leaky_relu(t, params.get("negative_slope", 0.01))
    elif name == "identity":
        y = t
    elif name == "tanh":
        y = torch.tanh(t)
    elif name == "sigmoid":
        y = torch.sigmoid(t)
    elif name == "elu":
        y = F.elu(t, params.get("alpha", 1.0))
    elif name == "softplus":
        y = F.softplus(t, beta=params.get("beta", 1.0), threshold=math.inf)
    elif name == "gelu":
        y = F.gelu(t)
    elif name == "gelu_tanh":
        y = F.gelu(t, approximate="tanh")
    elif name == "silu":
        y = F.silu(t)
    elif name == "mish":
        y = F.mish(t)
    else:
        r = torch.relu(t)
        coefs = params.get("coefficients", (0.0, 1.0))
        y = sum(float(c) * r**i for i, c in enumerate(coefs))
    return y.numpy()


# ------------------------------------------------------------------------------------------------
# Soundness
# ------------------------------------------------------------------------------------------------


def _points(name: str, params: dict, lo: float, hi: float, rng: np.random.Generator) -> list[float]:
    pts = {lo, hi, float(np.nextafter(lo, np.inf)), float(np.nextafter(hi, -np.inf))}
    pts.update(float(v) for v in rng.uniform(lo, hi, 10))
    for c in critical_points(name, tuple(sorted(params.items()))) + (mpmath.mpf(0),):
        f = float(c)
        for g in (f, np.nextafter(f, np.inf), np.nextafter(f, -np.inf), f + 1e-9, f - 1e-9):
            if lo <= g <= hi:
                pts.add(float(g))
    return sorted(p for p in pts if lo <= p <= hi)


def assert_quotients_inside(name: str, params: dict, lo: float, hi: float, seed: int = 0) -> None:
    alpha, beta = slope_bounds(name, lo, hi, **params)
    alpha, beta = float(alpha), float(beta)
    pts = _points(name, params, lo, hi, np.random.default_rng(seed))
    gaps = np.diff(pts)
    # Enough digits that phi(a) - phi(b) is exact to ~DPS digits even for adjacent floats.
    # Three times the gap's digits: a quotient may sit within x^2 of the bound at a point x near an extremum of
    # the slope (sigmoid on [-1, -2.7e-65]: 0.25 - 4e-131), which needs that many digits beyond the gap's.
    extra = 3 * (int(-math.log10(float(np.min(gaps)))) + 10) if gaps.size else 0
    with mpmath.workdps(DPS + max(extra, 0)):
        phi = phi_mp(name, params)
        vals = [phi(_mpf(p)) for p in pts]
        a_mp, b_mp = _mpf(alpha), _mpf(beta)
        for i in range(len(pts)):
            for j in range(i + 1, len(pts)):
                q = (vals[j] - vals[i]) / (_mpf(pts[j]) - _mpf(pts[i]))
                assert a_mp <= q <= b_mp, (name, params, lo, hi, pts[i], pts[j], alpha, float(q), beta)


intervals = st.one_of(
    st.tuples(st.floats(-12, 12), st.floats(-12, 12)).map(sorted),
    st.tuples(st.floats(-6, 6), st.floats(-14, 0.5)).map(lambda cw: sorted((cw[0], cw[0] + 10 ** cw[1]))),
    st.tuples(st.sampled_from([-2.3993572805154677, -2.2563763963607931, -1.4142135623730951, -1.4185040087908284,
                               1.4185040087908284, 0.0,
                               1.4905711794854285, 1.4142135623730951, 2.3993572805154677, 0.5, 1.5, 3.0]),
              st.floats(-13, -1), st.floats(-13, -1))
    .map(lambda c: (c[0] - 10 ** c[1], c[0] + 10 ** c[2])),
)


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(interval=intervals)
@example(interval=[-1.0, -2.6570618098431023e-65])  # the judge needed more digits (an explore run)
def test_exact_difference_quotients_inside(name, params, interval):
    lo, hi = (float(v) for v in interval)
    assert_quotients_inside(name, params, lo, hi)


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_dense_grid_quotients_and_derivatives_inside(name, params):
    rng = np.random.default_rng(1)
    n, k = 400, 129
    centre = rng.uniform(-9, 9, n)
    width = 10 ** rng.uniform(-3, 1.3, n)
    lo, hi = centre - width / 2, centre + width / 2
    alpha, beta = slope_bounds(name, lo, hi, **params)
    grid = lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, k)[None, :]
    grid[:, -1] = hi
    y = phi_float(name, params, grid)
    # Consecutive and long-range pairs; float64 quotients carry an error ~eps |phi| / |a - b|.
    for step in (1, 8, k - 1):
        dy, dx = y[:, step:] - y[:, :-step], grid[:, step:] - grid[:, :-step]
        q = dy / dx
        tol = 1e-13 * (1 + np.abs(y[:, step:]) + np.abs(y[:, :-step])) / dx
        assert np.all(q >= alpha[:, None] - tol), name
        assert np.all(q <= beta[:, None] + tol), name
    # Derivative samples (float64 via torch autograd) lie inside as well.
    t = torch.from_numpy(grid.copy()).requires_grad_(True)
    out = _torch_phi(name, params, t)
    (g,) = torch.autograd.grad(out.sum(), t)
    g = g.numpy()
    inner = (grid != 0)
    scale = 1e-12 * (1 + np.abs(g))
    assert np.all((g >= alpha[:, None] - scale) | ~inner)
    assert np.all((g <= beta[:, None] + scale) | ~inner)


def _torch_phi(name: str, params: dict, t: torch.Tensor) -> torch.Tensor:
    if name == "polyrelu":
        r = torch.relu(t)
        return sum(float(c) * r**i for i, c in enumerate(params.get("coefficients", (0.0, 1.0))))
    if name == "softplus":
        return F.softplus(t, beta=params.get("beta", 1.0), threshold=math.inf)
    if name == "leaky_relu":
        return F.leaky_relu(t, params.get("negative_slope", 0.01))
    if name == "elu":
        return F.elu(t, params.get("alpha", 1.0))
    fn = {"relu": torch.relu, "identity": lambda v: v * 1.0, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
          "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "silu": F.silu, "mish": F.mish}[name]
    return fn(t)


# ------------------------------------------------------------------------------------------------
# Closed forms and tightness
# ------------------------------------------------------------------------------------------------


def test_piecewise_linear_exact():
    lo = np.array([-3.0, -3.0, -1.0, 0.0, 0.0, 0.5, -np.inf])
    hi = np.array([-1.0, 0.0, 2.0, 0.0, 1.0, 2.0, np.inf])
    a, b = slope_bounds("relu", lo, hi)
    np.testing.assert_array_equal(a, [0, 0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(b, [0, 1, 1, 1, 1, 1, 1])
    a, b = slope_bounds("leaky_relu", lo, hi, negative_slope=-0.5)
    np.testing.assert_array_equal(a, [-0.5, -0.5, -0.5, -0.5, -0.5, 1, -0.5])
    np.testing.assert_array_equal(b, [-0.5, 1, 1, 1, 1, 1, 1])
    a, b = slope_bounds("leaky_relu", lo, hi, negative_slope=3.0)
    np.testing.assert_array_equal(a, [3, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(b, [3, 3, 3, 3, 3, 1, 3])
    a, b = slope_bounds("identity", lo, hi)
    np.testing.assert_array_equal(a, np.ones(7))
    np.testing.assert_array_equal(b, np.ones(7))
    a, b = slope_bounds("polyrelu", lo, hi)  # default coefficients (0, 1): ReLU
    np.testing.assert_array_equal(b, [0, 1, 1, 1, 1, 1, 1])


def test_closed_form_values():
    # tanh: max 1 at 0, min at the farthest end; sigmoid likewise with 1/4.
    a, b = slope_bounds("tanh", np.array([-1.0, 0.5]), np.array([2.0, 3.0]))
    np.testing.assert_allclose(a, 1 - np.tanh([2.0, 3.0]) ** 2, rtol=1e-14)
    np.testing.assert_allclose(b, [1.0, 1 - np.tanh(0.5) ** 2], rtol=1e-14)
    a, b = slope_bounds("sigmoid", -4.0, 1.0)
    s = scipy.special.expit(-4.0)
    assert b == 0.25 and a <= s * (1 - s) and a == pytest.approx(s * (1 - s), rel=1e-14)
    # ELU: alpha e^x on x < 0, 1 on x > 0, hull{alpha, 1} at 0.
    a, b = slope_bounds("elu", np.array([-2.0, -2.0, 1.0]), np.array([-1.0, 3.0, 2.0]), alpha=2.5)
    np.testing.assert_allclose(a, [2.5 * math.exp(-2), 2.5 * math.exp(-2), 1.0], rtol=1e-14)
    np.testing.assert_allclose(b, [2.5 * math.exp(-1), 2.5, 1.0], rtol=1e-14)
    # softplus: sigma(beta x) is increasing.
    a, b = slope_bounds("softplus", -1.0, 0.5, beta=4.0)
    assert a == pytest.approx(scipy.special.expit(-4.0), rel=1e-14)
    assert b == pytest.approx(scipy.special.expit(2.0), rel=1e-14)
    # GELU: phi' extremes at -sqrt(2), +sqrt(2): 1/2 -+ (erf(1)/2 + 1/(e sqrt(pi))).
    m = 0.5 + math.erf(1) / 2 + 1 / (math.e * math.sqrt(math.pi))
    a, b = slope_bounds("gelu", -3.0, 3.0)
    assert a == pytest.approx(1 - m, abs=1e-14) and b == pytest.approx(m, abs=1e-14)
    # PolyReLU d(x) = 1 - 2x + 1.5x^2: critical point 2/3 with d = 1/3.
    a, b = slope_bounds("polyrelu", np.array([0.1, 0.0, -1.0]), np.array([2.0, 2.0, 0.5]),
                        coefficients=(0.0, 1.0, -1.0, 0.5))
    np.testing.assert_allclose(a, [1 / 3, 0.0, 0.0], atol=1e-14)
    np.testing.assert_allclose(b, [3.0, 3.0, 1.0], atol=1e-14)


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_matches_reference_range(name, params):
    rng = np.random.default_rng(7)
    centre = rng.uniform(-8, 8, 60)
    width = 10 ** rng.uniform(-8, 1.2, 60)
    lo = np.concatenate([centre - width / 2, [-3.0, -0.5, 0.0, 1.0, -2.5, 0.4]])
    hi = np.concatenate([centre + width / 2, [3.0, 0.0, 0.0, 1.0, 2.0, 3.5]])
    alpha, beta = slope_bounds(name, lo, hi, **params)
    for i in range(lo.size):
        r_lo, r_hi = reference_range(name, params, lo[i], hi[i])
        with mpmath.workdps(DPS):
            assert _mpf(alpha[i]) <= r_lo and _mpf(beta[i]) >= r_hi, (lo[i], hi[i], alpha[i], beta[i])
            scale = 1 + abs(float(r_lo)) + abs(float(r_hi))
            if name == "polyrelu":
                scale *= (1 + max(abs(lo[i]), abs(hi[i]))) ** len(params.get("coefficients", (0, 1)))
            assert float(r_lo) - alpha[i] <= 5e-14 * scale, (lo[i], hi[i], alpha[i], r_lo)
            assert beta[i] - float(r_hi) <= 5e-14 * scale, (lo[i], hi[i], beta[i], r_hi)


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_degenerate_intervals(name, params):
    pts = np.array([-7.5, -2.0, -1e-9, 1e-12, 0.3, 1.4142135623730951, 2.0, 11.0])
    alpha, beta = slope_bounds(name, pts, pts, **params)
    with mpmath.workdps(DPS):
        d = dphi_mp(name, params)
        for x, a, b in zip(pts, alpha, beta, strict=True):
            v = d(_mpf(x))
            assert _mpf(a) <= v <= _mpf(b), (name, x, a, b, v)
            assert b - a <= 1e-13 * (1 + abs(float(v))) * (1 + abs(x)) ** 5
    a0, b0 = slope_bounds(name, 0.0, 0.0, **params)
    if name in KINKED:
        left, right = clarke_at_zero(name, params)
        assert (float(a0), float(b0)) == (min(left, right), max(left, right))
    else:
        with mpmath.workdps(DPS):
            v = dphi_mp(name, params)(mpmath.mpf(0))
            assert _mpf(a0) <= v <= _mpf(b0) and float(b0 - a0) <= 1e-14


def test_kinks_at_zero():
    assert tuple(map(float, slope_bounds("relu", 0.0, 0.0))) == (0.0, 1.0)
    assert tuple(map(float, slope_bounds("leaky_relu", 0.0, 0.0, negative_slope=-0.5))) == (-0.5, 1.0)
    assert tuple(map(float, slope_bounds("elu", 0.0, 0.0, alpha=2.5))) == (1.0, 2.5)
    assert tuple(map(float, slope_bounds("elu", 0.0, 0.0, alpha=0.3))) == (0.3, 1.0)
    assert tuple(map(float, slope_bounds("polyrelu", 0.0, 0.0, coefficients=(0.2, -0.7, 3.0)))) == (-0.7, 0.0)


# ------------------------------------------------------------------------------------------------
# Global ranges
# ------------------------------------------------------------------------------------------------


def test_global_ranges_match_theory():
    from theory.slopes import check, derive_all

    derivations = derive_all()
    assert {d.name for d in derivations} == set(ACTIVATION_NAMES)
    for d in derivations:
        ok, lo, hi = check(d)
        assert ok, (d.name, d.params, lo, hi, d.lower, d.upper)
        assert abs(lo - float(d.lower)) <= 1e-8 and abs(hi - float(d.upper)) <= 1e-8


def test_global_values():
    assert global_slope_bounds("relu") == (0.0, 1.0)
    assert global_slope_bounds("leaky_relu", negative_slope=0.1) == (0.1, 1.0)
    assert global_slope_bounds("leaky_relu", negative_slope=-2.0) == (-2.0, 1.0)
    assert global_slope_bounds("identity") == (1.0, 1.0)
    assert global_slope_bounds("tanh") == (0.0, 1.0)
    assert global_slope_bounds("sigmoid") == (0.0, 0.25)
    assert global_slope_bounds("elu", alpha=3.0) == (0.0, 3.0)
    assert global_slope_bounds("softplus", beta=7.0) == (0.0, 1.0)
    assert global_slope_bounds("polyrelu", coefficients=(5.0, 0.5)) == (0.0, 0.5)
    assert global_slope_bounds("polyrelu", coefficients=(5.0, 0.5, 0.0)) == (0.0, 0.5)
    m = 0.5 + math.erf(1) / 2 + 1 / (math.e * math.sqrt(math.pi))
    lo, hi = global_slope_bounds("gelu")
    assert lo <= 1 - m and hi >= m and hi - m < 1e-14 and (1 - m) - lo < 1e-14
    assert global_slope_bounds("silu") == pytest.approx((-0.0998393201288669, 1.0998393201288669), abs=1e-14)
    assert global_slope_bounds("mish") == pytest.approx((-0.1125261223894626, 1.0884981612517279), abs=1e-14)
    # tanh form of GELU: phi' at its critical points +-1.41850400879082836 (mpmath, 50 digits).
    lo, hi = global_slope_bounds("gelu_tanh")
    with mpmath.workdps(50):
        r = critical_points("gelu_tanh", ())[1]
        d = dphi_mp("gelu_tanh", {})
        assert _mpf(lo) <= d(-r) and _mpf(hi) >= d(r)
        assert float(d(-r)) - lo < 1e-14 and hi - float(d(r)) < 1e-14


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_whole_line_equals_global(name, params):
    a, b = slope_bounds(name, -np.inf, np.inf, **params)
    coefs = params.get("coefficients", (0.0, 1.0))
    if name == "polyrelu" and any(c != 0 for c in coefs[2:]):
        assert math.isinf(float(a)) or math.isinf(float(b))
        with pytest.raises(ValueError, match="not globally slope-bounded"):
            global_slope_bounds(name, **params)
    else:
        assert (float(a), float(b)) == global_slope_bounds(name, **params)


def test_critical_point_brackets():
    for name in ("gelu", "gelu_tanh", "silu", "mish"):
        br = slopes._smooth_brackets(name)
        roots = critical_points(name, ())
        assert br.shape == (2, 2)
        with mpmath.workdps(DPS):
            for (a, b), r in zip(br, roots, strict=True):
                assert _mpf(a) <= r <= _mpf(b) and b - a < 1e-11


def test_polyrelu_unbounded_above():
    a, b = slope_bounds("polyrelu", np.array([1.0, -1.0]), np.array([np.inf, np.inf]),
                        coefficients=POLY_MULTI)
    assert np.all(np.isposinf(b))
    a, b = slope_bounds("polyrelu", 1.0, np.inf, coefficients=(0.0, 1.0, -1.0))  # d(x) = 1 - 2x
    assert np.isneginf(a) and -1.0 <= float(b) <= -1.0 + 1e-14


# ------------------------------------------------------------------------------------------------
# Monotonicity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_inclusion_monotone(name, params):
    rng = np.random.default_rng(3)
    n = 300
    lo = rng.uniform(-8, 6, n)
    hi = lo + 10 ** rng.uniform(-6, 0.5, n)
    u, v = np.sort(rng.uniform(0, 1, (2, n)), axis=0)
    sub_lo, sub_hi = lo + (hi - lo) * u, lo + (hi - lo) * v
    sub_hi = np.minimum(np.maximum(sub_lo, sub_hi), hi)
    a, b = slope_bounds(name, lo, hi, **params)
    sa, sb = slope_bounds(name, sub_lo, sub_hi, **params)
    # Enclosures of different intervals are rounded independently: allow a few ulps.
    tol = 1e-14 * (1 + np.abs(a) + np.abs(b))
    assert np.all(sa >= a - tol) and np.all(sb <= b + tol)
    if name in ("relu", "leaky_relu", "identity"):
        assert np.all(sa >= a) and np.all(sb <= b)


# ------------------------------------------------------------------------------------------------
# API, shapes, errors
# ------------------------------------------------------------------------------------------------


def test_activation_names_covered():
    assert ACTIVATION_NAMES == ("relu", "leaky_relu", "identity", "tanh", "sigmoid", "elu", "softplus",
                                "gelu", "gelu_tanh", "silu", "mish", "polyrelu")
    assert {n for n, _ in CONFIGS} == set(ACTIVATION_NAMES)


def test_shapes_and_broadcasting():
    a, b = slope_bounds("gelu", 0.0, 1.0)
    assert a.shape == () and b.shape == () and a.dtype == np.float64
    a, b = slope_bounds("mish", np.zeros((3, 1)) - 1, np.ones((1, 4)))
    assert a.shape == (3, 4) and b.shape == (3, 4) and np.all(a <= b)
    a, b = slope_bounds("tanh", [], [])
    assert a.shape == (0,)


def test_error_messages():
    with pytest.raises(ValueError, match=r"lower > upper at index \(1,\)"):
        slope_bounds("relu", [0.0, 2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"lower > upper at index \(1, 0\)"):
        slope_bounds("gelu", np.array([[0.0, 0.0], [3.0, 0.0]]), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"lower is NaN at index \(2,\)"):
        slope_bounds("tanh", [0.0, 0.0, np.nan], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"upper is NaN at index \(0,\)"):
        slope_bounds("tanh", [0.0], [np.nan])
    with pytest.raises(ValueError, match="empty interval"):
        slope_bounds("relu", np.inf, np.inf)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        slope_bounds("swish", 0.0, 1.0)
    with pytest.raises(ValueError, match="unknown activation"):
        global_slope_bounds("ReLU")
    with pytest.raises(ValueError, match=r"takes parameters .* unknown \['slope'\]"):
        slope_bounds("leaky_relu", 0.0, 1.0, slope=0.2)
    with pytest.raises(ValueError, match="takes parameters none"):
        global_slope_bounds("gelu", approximate="tanh")
    with pytest.raises(ValueError, match="'beta' must be nonzero"):
        global_slope_bounds("softplus", beta=0.0)
    with pytest.raises(ValueError, match="must be finite"):
        slope_bounds("elu", 0.0, 1.0, alpha=math.nan)
    with pytest.raises(ValueError, match="non-empty"):
        slope_bounds("polyrelu", 0.0, 1.0, coefficients=[])
    with pytest.raises(ValueError, match="finite"):
        slope_bounds("polyrelu", 0.0, 1.0, coefficients=[0.0, math.inf])
    with pytest.raises(ValueError, match=r"not globally slope-bounded.*slope_bounds\(\)"):
        global_slope_bounds("polyrelu", coefficients=(0.0, 1.0, 0.5))


# ------------------------------------------------------------------------------------------------
# Assumptions on libm (re-checked on the running platform)
# ------------------------------------------------------------------------------------------------


def test_libm_error_margins():
    rng = np.random.default_rng(11)
    xs = np.concatenate([rng.uniform(-740, 700, 400), rng.uniform(-40, 40, 400), rng.uniform(-1, 1, 200)])
    checks = [
        (np.exp, mpmath.exp, xs, lambda x, v: slopes._LIBM_REL * np.abs(v)),
        (np.tanh, mpmath.tanh, xs / 20, lambda x, v: slopes._LIBM_REL * np.abs(v)),
        (scipy.special.ndtr, mpmath.ncdf, np.clip(xs, -39, 10), slopes._ndtr_err),
    ]
    with mpmath.workdps(40):
        for f, f_mp, pts, margin in checks:
            vals = f(pts)
            errs = margin(pts, vals) + slopes._LIBM_ABS
            for x, v, e in zip(pts, vals, errs, strict=True):
                assert abs(_mpf(v) - f_mp(_mpf(x))) <= _mpf(e), (f, x)


# ------------------------------------------------------------------------------------------------
# GELU, tanh form
# ------------------------------------------------------------------------------------------------


def test_gelu_tanh_constants_enclose_torchs():
    """The enclosed k and c contain both the exact constants and the float64 values torch computes with."""
    torch_k = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5  # M_SQRT2 * M_2_SQRTPI * 0.5 in ATen
    with mpmath.workdps(50):
        for enclosure, exact, used in ((slopes._GT_K, mpmath.sqrt(2 / mpmath.pi), torch_k),
                                       (slopes._GT_C, mpmath.mpf("0.044715"), 0.044715)):
            lo, hi = float(enclosure.lo), float(enclosure.hi)
            assert _mpf(lo) <= exact <= _mpf(hi) and lo <= used <= hi


def test_gelu_tanh_differs_from_erf_form_and_matches_torch():
    a, b = global_slope_bounds("gelu_tanh")
    c, d = global_slope_bounds("gelu")
    assert abs(a - c) > 1e-5 and abs(b - d) > 1e-5  # a different function, not an alias
    x = torch.cat([torch.linspace(-6, 6, 2001), torch.linspace(-1.43, -1.41, 2001), torch.linspace(1.41, 1.43, 2001)])
    x = x.to(torch.float64).requires_grad_(True)
    (g,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)
    assert float(g.min()) >= a - 1e-12 and float(g.max()) <= b + 1e-12
    assert float(g.min()) - a < 1e-6 and b - float(g.max()) < 1e-6


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "mish"])
def test_far_tails_are_tight(name):
    """Beyond the sign-verification window phi' is proved monotone, so huge ends keep tight ranges."""
    a, b = slope_bounds(name, np.array([100.0, 1e200, -1e300]), np.array([1e300, np.inf, -1e200]))
    np.testing.assert_allclose(a, [1.0, 1.0, 0.0], atol=1e-14)
    np.testing.assert_allclose(b, [1.0, 1.0, 0.0], atol=1e-14)
    assert a[1] <= 1.0 <= b[1] and a[2] <= 0.0 <= b[2]
