"""Tests of :mod:`lipbound.bounds` (activation-bound analysis and local slopes).

Soundness is checked two ways:

* against *exact* pre-activations (mpmath at 50 digits on the float weights and inputs), compared with the
  float bounds without any tolerance, for small networks and a few inputs per domain (corners, boundary
  points, centre);
* against torch's float64 forward pass on many sampled inputs, with a tiny tolerance ``TOL (1 + |z|)``:
  the float forward pass is itself inexact (e.g. ``F.gelu`` cancels in ``1 + erf``), so an exact comparison
  could fail for tight bounds even though the bounds enclose the exact values.

The linear relaxations, point enclosures and interval images used by CROWN/IBP are checked directly
against mpmath, again without tolerance.
"""

from __future__ import annotations

import logging

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipbound
from lipbound.activations import ActivationSpec
from lipbound.bounds import Ball, Box, DomainError, activation_bounds, local_slopes, stable_neurons
from lipbound.bounds import relaxations as rx
from lipbound.errors import FormulationError, NetworkError
from lipbound.network import (
    Affine,
    GroupSortLayer,
    HouseholderLayer,
    ImplicitLayer,
    Network,
    ResidualBlock,
    SlopeRestricted,
)

DPS = 50
TOL = 1e-9
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
    ("elu", {"alpha": -0.5}),
    ("softplus", {}),
    ("softplus", {"beta": 4.0}),
    ("softplus", {"beta": -2.0}),
    ("gelu", {}),
    ("gelu_tanh", {}),
    ("silu", {}),
    ("mish", {}),
    ("polyrelu", {"coefficients": (0.2, 1.0, -1.0, 0.5)}),
    ("polyrelu", {"coefficients": (1.0, -0.5, 0.25)}),
    ("polyrelu", {"coefficients": (0.0, 1.0, -1.125, 0.875, -5.0 / 12.0, 0.05)}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" if p else n for n, p in CONFIGS]
SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------


def _mpf(v) -> mpmath.mpf:
    return mpmath.mpf(float(v))


def _sig(t):
    return 1 / (1 + mpmath.exp(-t))


def phi_mp(spec: ActivationSpec):
    """The exact activation in mpmath (call inside ``mpmath.workdps``)."""
    name, p = spec.name, spec.params
    if name == "relu":
        return lambda t: max(t, 0)
    if name == "leaky_relu":
        s = _mpf(p["negative_slope"])
        return lambda t: t if t >= 0 else s * t
    if name == "identity":
        return lambda t: t
    if name == "tanh":
        return mpmath.tanh
    if name == "sigmoid":
        return _sig
    if name == "elu":
        a = _mpf(p["alpha"])
        return lambda t: t if t > 0 else a * mpmath.expm1(t)
    if name == "softplus":
        b = _mpf(p["beta"])
        return lambda t: mpmath.log1p(mpmath.exp(b * t)) / b
    if name == "gelu":
        return lambda t: t * mpmath.ncdf(t)
    if name == "gelu_tanh":
        # t (1 + tanh u) / 2 = t sigma(2u), without cancellation
        return lambda t: t * _sig(2 * mpmath.sqrt(2 / mpmath.pi) * (t + mpmath.mpf("0.044715") * t**3))
    if name == "silu":
        return lambda t: t * _sig(t)
    if name == "mish":
        return lambda t: t * mpmath.tanh(mpmath.log1p(mpmath.exp(t)))
    coefs = [_mpf(c) for c in p["coefficients"]]
    return lambda t: coefs[0] + sum(c * max(t, 0) ** i for i, c in enumerate(coefs) if i > 0)


def make_net(dims, name: str, params: dict, seed: int = 0, scale: float = 1.0) -> Network:
    """A feedforward network with one activation, layers named ``act_i``; PolyReLUs that are not globally
    slope-bounded get alpha/beta of +-1e300 (the IR needs some; these hold for every pre-activation here)."""
    spec = ActivationSpec(name, params)
    try:
        spec.slope_range()
        alpha = beta = None
    except NetworkError:
        alpha, beta = -1e300, 1e300
    rng = np.random.default_rng(seed)
    layers: list = []
    for i in range(len(dims) - 1):
        if i:
            width = dims[i]
            layers.append(SlopeRestricted(spec, width, None if alpha is None else np.full(width, alpha),
                                          None if beta is None else np.full(width, beta), name=f"act_{i}"))
        w = rng.standard_normal((dims[i + 1], dims[i])) * scale / np.sqrt(dims[i])
        layers.append(Affine(w, rng.standard_normal(dims[i + 1]) * 0.3, name=f"lin_{i}"))
    return Network(tuple(layers), name=f"net_{name}")


def preacts(net: Network, x: torch.Tensor) -> list[np.ndarray]:
    """Pre-activations of every stage (float64 torch forward), for a batch ``x``."""
    out = []
    h = x
    for layer in net.layers:
        if isinstance(layer, Affine):
            w, b = layer.torch_parameters(torch.float64, "cpu")
            h = h @ w.T + b
        elif isinstance(layer, ResidualBlock):
            w, b = layer.inner.torch_parameters(torch.float64, "cpu")
            out.append((h @ w.T + b).numpy())
            h = layer.forward(h)
        else:
            out.append(h.numpy())
            h = layer.forward(h)
    return out


def preacts_mp(net: Network, x: np.ndarray) -> list[list]:
    """Exact pre-activations (mpmath) of an Affine/SlopeRestricted network at one float input."""
    out = []
    h = [_mpf(v) for v in x]
    for layer in net.layers:
        if isinstance(layer, Affine):
            h = [mpmath.fsum(_mpf(w) * v for w, v in zip(row, h, strict=True)) + _mpf(b)
                 for row, b in zip(layer.weight, layer.bias, strict=True)]
        else:
            out.append(h)
            f = phi_mp(layer.activation)
            h = [f(t) for t in h]
    return out


def make_domain(kind: str, center: np.ndarray, radius: float):
    if kind == "box":
        return Box(center - radius, center + radius * np.linspace(0.5, 1.5, center.size))
    return Ball(center, radius, norm=kind)


def sample_points(domain, rng: np.random.Generator, n: int) -> np.ndarray:
    """Points inside the (exact) domain: centre, corners / boundary points and interior points."""
    if isinstance(domain, Box):
        lo, hi = domain.lower, domain.upper
        corners = np.where(rng.random((n, lo.size)) < 0.5, lo, hi)
        inner = np.clip(lo + (hi - lo) * rng.random((n, lo.size)), lo, hi)
        return np.vstack([0.5 * (lo + hi), corners, inner])
    c, r = domain.center, domain.radius * (1 - 1e-9)  # the margin absorbs the rounding of c + offset
    if domain.norm == "linf":
        boundary = np.sign(rng.standard_normal((n, c.size)))
        inner = rng.uniform(-1, 1, (n, c.size))
    else:
        g = rng.standard_normal((n, c.size))
        boundary = g / np.linalg.norm(g, axis=1, keepdims=True)
        inner = boundary * rng.random((n, 1))
    return np.vstack([c, c + r * boundary, c + r * inner])


def assert_contains(bounds: dict, zs: list[np.ndarray], tol: float = TOL) -> None:
    for (name, (lo, hi)), z in zip(bounds.items(), zs, strict=True):
        slack = tol * (1 + np.abs(z))
        assert np.all(z >= lo - slack), f"{name}: lower bound violated by {np.max(lo - z)}"
        assert np.all(z <= hi + slack), f"{name}: upper bound violated by {np.max(z - hi)}"


def assert_contains_exact(bounds: dict, zs_mp: list[list]) -> None:
    for (name, (lo, hi)), z in zip(bounds.items(), zs_mp, strict=True):
        for i, v in enumerate(z):
            assert _mpf(lo[i]) <= v <= _mpf(hi[i]), f"{name}[{i}]: {v} not in [{lo[i]}, {hi[i]}]"


def assert_subset(inner: dict, outer: dict) -> None:
    for name in outer:
        assert np.all(inner[name][0] >= outer[name][0]), name
        assert np.all(inner[name][1] <= outer[name][1]), name


# ------------------------------------------------------------------------------------------------
# Soundness of the bounds on networks
# ------------------------------------------------------------------------------------------------


@given(config=st.sampled_from(CONFIGS), kind=st.sampled_from(["box", "l2", "linf"]),
       seed=st.integers(0, 2**16), scale=st.sampled_from([0.5, 1.0, 3.0]),
       radius=st.sampled_from([1e-3, 0.3, 1.0, 4.0]))
@settings(max_examples=60, **SETTINGS)
def test_bounds_contain_sampled_preactivations(config, kind, seed, scale, radius):
    name, params = config
    net = make_net([3, 7, 6, 5, 2], name, params, seed=seed, scale=scale)
    rng = np.random.default_rng(seed)
    domain = make_domain(kind, rng.uniform(-1, 1, 3), radius)
    ibp = activation_bounds(net, domain, method="ibp")
    crown = activation_bounds(net, domain, method="crown")
    assert list(ibp) == list(crown) == ["act_1", "act_2", "act_3"]
    zs = preacts(net, torch.from_numpy(sample_points(domain, rng, 150)))
    assert_contains(ibp, zs)
    assert_contains(crown, zs)
    assert_subset(crown, ibp)  # never looser than IBP


@given(config=st.sampled_from(CONFIGS), kind=st.sampled_from(["box", "l2", "linf"]),
       method=st.sampled_from(["ibp", "crown"]), seed=st.integers(0, 2**16),
       radius=st.sampled_from([0.0, 1e-9, 0.5, 2.0]))
@settings(max_examples=45, **SETTINGS)
def test_bounds_contain_exact_preactivations(config, kind, method, seed, radius):
    name, params = config
    net = make_net([2, 4, 3, 2], name, params, seed=seed, scale=2.0)
    rng = np.random.default_rng(seed)
    domain = make_domain(kind, rng.uniform(-1, 1, 2), radius)
    result = activation_bounds(net, domain, method=method)
    with mpmath.workdps(DPS):
        for x in sample_points(domain, rng, 3):
            assert_contains_exact(result, preacts_mp(net, x))


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
@pytest.mark.parametrize("kind", ["box", "l2", "linf"])
def test_degenerate_domain_is_tight(name, params, kind):
    net = make_net([3, 5, 4, 2], name, params, seed=7, scale=2.0)
    x = np.array([0.3, -1.2, 0.8])
    domain = Box(x, x) if kind == "box" else Ball(x, 0.0, norm=kind)
    with mpmath.workdps(DPS):
        exact = preacts_mp(net, x)
    for method in ("ibp", "crown"):
        result = activation_bounds(net, domain, method=method)
        assert_contains_exact(result, exact)
        for lo, hi in result.values():
            assert np.all(hi - lo <= 1e-12 * (1 + np.abs(lo)))


def test_first_layer_is_the_exact_range():
    rng = np.random.default_rng(0)
    net = make_net([4, 6, 2], "relu", {}, seed=1)
    w, b = net.layers[0].weight, net.layers[0].bias
    c = rng.uniform(-1, 1, 4)
    exact = {
        "box": np.abs(w) @ np.full(4, 0.5),
        "l2": 0.5 * np.linalg.norm(w, axis=1),
        "linf": 0.5 * np.abs(w).sum(axis=1),
    }
    for kind, spread in exact.items():
        domain = Box(c - 0.5, c + 0.5) if kind == "box" else Ball(c, 0.5, norm=kind)
        for method in ("ibp", "crown"):
            lo, hi = activation_bounds(net, domain, method=method)["act_1"]
            np.testing.assert_allclose(lo, w @ c + b - spread, rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(hi, w @ c + b + spread, rtol=1e-13, atol=1e-13)


def _reference_crown_relu(net: Network, lo0: np.ndarray, hi0: np.ndarray,
                          inter: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Plain float CROWN for ReLU networks over a box (triangle relaxation, adaptive lower slope), relaxing
    layer ``j`` on the given intermediate bounds ``inter[j]``."""
    ws, bs = [a.weight for a in net.affines], [a.bias for a in net.affines]
    c, r = (lo0 + hi0) / 2, (hi0 - lo0) / 2
    out = [(ws[0] @ c + bs[0] - np.abs(ws[0]) @ r, ws[0] @ c + bs[0] + np.abs(ws[0]) @ r)]
    for k in range(1, len(ws) - 1):
        lam_l, dl, lam_u, du = ws[k].copy(), bs[k].copy(), ws[k].copy(), bs[k].copy()
        for j in range(k - 1, -1, -1):
            lo, hi = inter[j]
            unstable = (lo < 0) & (hi > 0)
            su = np.where(hi <= 0, 0.0, np.where(lo >= 0, 1.0, hi / np.where(unstable, hi - lo, 1.0)))
            iu = np.where(unstable, -su * lo, 0.0)
            sl = np.where(hi <= 0, 0.0, np.where(lo >= 0, 1.0, (hi >= -lo).astype(float)))
            pos, neg = np.clip(lam_l, 0, None), np.clip(lam_l, None, 0)
            dl, lam_l = dl + neg @ iu, pos * sl + neg * su
            pos, neg = np.clip(lam_u, 0, None), np.clip(lam_u, None, 0)
            du, lam_u = du + pos @ iu, pos * su + neg * sl
            dl, lam_l = dl + lam_l @ bs[j], lam_l @ ws[j]
            du, lam_u = du + lam_u @ bs[j], lam_u @ ws[j]
        out.append((lam_l @ c + dl - np.abs(lam_l) @ r, lam_u @ c + du + np.abs(lam_u) @ r))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_crown_at_least_as_tight_as_plain_crown_on_relu(seed):
    net = make_net([4, 24, 24, 24, 2], "relu", {}, seed=seed)
    lo0, hi0 = -np.ones(4), np.ones(4)
    ours = activation_bounds(net, Box(lo0, hi0), method="crown")
    ibp = activation_bounds(net, Box(lo0, hi0), method="ibp")
    ref = _reference_crown_relu(net, lo0, hi0, list(ours.values()))
    for (lo, hi), (rlo, rhi) in zip(ours.values(), ref, strict=True):
        assert np.all(lo >= rlo - 1e-9) and np.all(hi <= rhi + 1e-9)
    last = list(ours)[-1]
    assert np.mean(ours[last][1] - ours[last][0]) < 0.9 * np.mean(ibp[last][1] - ibp[last][0])


@pytest.mark.parametrize(("name", "params"), [c for c in CONFIGS if c[0] != "identity"],
                         ids=[i for i in IDS if i != "identity"])
def test_crown_tightens_deep_networks(name, params):
    net = make_net([3, 16, 16, 16, 2], name, params, seed=3)
    domain = Ball(np.zeros(3), 0.5)
    ibp = activation_bounds(net, domain, method="ibp")
    crown = activation_bounds(net, domain, method="crown")
    assert_subset(crown, ibp)
    width = {k: float(np.mean(crown[k][1] - crown[k][0]) / np.mean(ibp[k][1] - ibp[k][0])) for k in ibp}
    assert width["act_3"] < 1.0, width


def test_identity_layers_give_exact_linear_bounds():
    rng = np.random.default_rng(2)
    ws = [rng.standard_normal((5, 3)), rng.standard_normal((4, 5)), rng.standard_normal((2, 4))]
    net = lipbound.from_weights(ws, "identity")
    domain = Box(-np.ones(3), np.ones(3))
    lo, hi = activation_bounds(net, domain, method="crown")["identity_2"]
    product = ws[1] @ ws[0]
    np.testing.assert_allclose(hi, np.abs(product).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(lo, -np.abs(product).sum(axis=1), rtol=1e-12)


def test_huge_and_tiny_weights_stay_sound():
    for scale in (1e-200, 1e120):
        net = make_net([3, 4, 4, 2], "tanh", {}, seed=1, scale=scale)
        domain = Box(-np.ones(3), np.ones(3))
        x = sample_points(domain, np.random.default_rng(0), 20)
        for method in ("ibp", "crown"):
            result = activation_bounds(net, domain, method=method)
            assert_contains(result, preacts(net, torch.from_numpy(x)))
            for lo, hi in result.values():
                assert not np.any(np.isnan(lo)) and not np.any(np.isnan(hi))


# ------------------------------------------------------------------------------------------------
# Building blocks: point enclosures, images, relaxations (exact comparisons)
# ------------------------------------------------------------------------------------------------

EXTREMES = [-750.0, -745.0, -709.5, -40.0, -37.5, -20.0, -1.2785, -0.7518, -1e-300, -5e-324, 0.0, 5e-324,
            1e-10, 0.5, 1.0, 20.0, 40.0, 709.5, 745.0]


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_point_enclosures_are_exact(name, params):
    spec = ActivationSpec(name, params)
    xs = np.array(EXTREMES + list(np.random.default_rng(0).uniform(-30, 30, 30)))
    if name == "polyrelu":
        xs = xs[np.abs(xs) < 100]
    lo, hi = rx.point_enclosure(spec, xs)
    f = phi_mp(spec)
    with mpmath.workdps(DPS):
        for x, a, b in zip(xs, lo, hi, strict=True):
            v = f(_mpf(x))
            assert _mpf(a) <= v <= _mpf(b), (x, a, b, v)
            assert b - a <= 1e-13 * (1 + abs(float(v))), (x, a, b)
    inf_lo, inf_hi = rx.point_enclosure(spec, np.array([np.inf, -np.inf]))
    assert np.all(inf_lo == -np.inf) and np.all(inf_hi == np.inf)


interval_widths = st.sampled_from([0.0, 1e-12, 1e-6, 0.01, 0.5, 2.0, 10.0, 60.0])


@given(config=st.sampled_from(CONFIGS), lows=st.lists(st.floats(-40, 40), min_size=6, max_size=6),
       widths=st.lists(interval_widths, min_size=6, max_size=6))
@settings(max_examples=150, **SETTINGS)
def test_relaxations_and_images_are_sound(config, lows, widths):
    name, params = config
    spec = ActivationSpec(name, params)
    lo = np.array(lows + [-1.0, -0.7518, -3.0, 0.0, -745.0, 700.0, -1e3, -1.2785, -1e200])
    hi = np.array(list(np.array(lows) + np.array(widths)) + [0.0, -0.7518, -1.5, 0.0, -700.0, 745.0, 1e3,
                                                               -1.2785 + 1e-12, 1e200])
    if name == "polyrelu":
        lo, hi = lo[:-5] / 8, hi[:-5] / 8
    img_lo, img_hi = rx.interval_image(spec, lo, hi)
    sl, il, su, iu = rx.linear_relaxation(spec, lo, hi, img_lo, img_hi)
    f = phi_mp(spec)
    with mpmath.workdps(DPS):
        for i in range(lo.size):
            grid = np.clip(lo[i] + (hi[i] - lo[i]) * np.linspace(0, 1, 25), lo[i], hi[i])
            extra = [p for p in (0.0, -0.7518, -1.2785, -1.1924, 1e-9) if lo[i] <= p <= hi[i]]
            for z in np.concatenate([grid, extra, [lo[i], hi[i]]]):
                if abs(z) > 1e4:  # beyond mpmath's comfort; the huge interval is checked below
                    continue
                zm = _mpf(z)
                v = f(zm)
                assert _mpf(img_lo[i]) <= v <= _mpf(img_hi[i]), ("image", lo[i], hi[i], z)
                assert _mpf(sl[i]) * zm + _mpf(il[i]) <= v, ("lower line", lo[i], hi[i], z, sl[i], il[i])
                assert v <= _mpf(su[i]) * zm + _mpf(iu[i]), ("upper line", lo[i], hi[i], z, su[i], iu[i])
    if name != "polyrelu":  # huge intervals get the constant lines of the image
        assert sl[-1] == su[-1] == 0 and il[-1] == img_lo[-1] and iu[-1] == img_hi[-1]


@pytest.mark.parametrize(("name", "params"), [c for c in CONFIGS if c[0] != "polyrelu"],
                         ids=[i for i in IDS if not i.startswith("polyrelu")])
def test_images_and_relaxations_are_tight(name, params):
    spec = ActivationSpec(name, params)
    lo = np.array([-3.0, -1.0, -0.9, 0.5, -6.0, 2.0, -1e-3])
    hi = np.array([2.0, -0.5, -0.6, 4.0, -4.0, 2.0, 1e-3])
    img_lo, img_hi = rx.interval_image(spec, lo, hi)
    z = np.linspace(lo, hi, 4001)
    vals = spec.torch(torch.from_numpy(z)).numpy()
    tol = 1e-12 * (1 + np.abs(vals).max(axis=0))
    assert np.all(img_lo >= vals.min(axis=0) - 1e-6 - tol)  # the grid may miss an interior minimum by ~1e-7
    assert np.all(img_hi <= vals.max(axis=0) + tol)
    sl, il, su, iu = rx.linear_relaxation(spec, lo, hi, img_lo, img_hi)
    gap_lo = (vals - (sl * z + il)).min(axis=0)
    gap_hi = ((su * z + iu) - vals).min(axis=0)
    # each line touches the graph up to the grid resolution
    assert np.all(gap_lo <= 1e-5 * (1 + hi - lo) ** 2), gap_lo
    assert np.all(gap_hi <= 1e-5 * (1 + hi - lo) ** 2), gap_hi


def test_relu_relaxation_is_the_crown_triangle():
    spec = ActivationSpec("relu")
    lo, hi = np.array([-1.0, -3.0, 0.5, -2.0, -1.0]), np.array([3.0, 1.0, 2.0, -1.0, 1.5])
    sl, il, su, iu = rx.linear_relaxation(spec, lo, hi, *rx.interval_image(spec, lo, hi))
    np.testing.assert_allclose(sl, [1.0, 0.0, 1.0, 0.0, 1.0])  # adaptive: 1 iff u >= -l
    np.testing.assert_allclose(su, [0.75, 0.25, 1.0, 0.0, 0.6])  # chord u / (u - l)
    np.testing.assert_allclose(il, 0.0, atol=1e-15)  # outward rounding costs an ulp
    np.testing.assert_allclose(iu, [0.75, 0.75, 0.0, 0.0, 0.6], rtol=1e-14, atol=1e-15)
    assert np.all(il <= 0) and np.all(iu >= [0.75, 0.75, 0.0, 0.0, 0.6])


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "mish"])
def test_valley_minimum_is_enclosed(name):
    spec = ActivationSpec(name)
    a, b, m_lo, m_hi = rx.valley(spec)
    expected = {"gelu": -0.7518, "gelu_tanh": -0.7525, "silu": -1.2785, "mish": -1.1924}[name]
    assert a < b and abs(a - expected) < 1e-3 and b - a < 1e-6
    f = phi_mp(spec)
    with mpmath.workdps(DPS):
        t = mpmath.findroot(lambda s: mpmath.diff(f, s), expected)
        assert _mpf(a) <= t <= _mpf(b)
        assert _mpf(m_lo) <= f(t) <= _mpf(m_hi)
    assert m_hi - m_lo < 1e-12


# ------------------------------------------------------------------------------------------------
# Domains
# ------------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["box", "l2", "linf"]),
       radius=st.sampled_from([0.0, 1e-8, 0.7, 30.0]))
@settings(max_examples=40, **SETTINGS)
def test_domain_linear_bounds_are_exact_up_to_rounding(seed, kind, radius):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((3, 4)) * 10.0 ** rng.integers(-3, 4, (3, 1))
    d = rng.standard_normal(3)
    c = rng.uniform(-5, 5, 4)
    domain = make_domain(kind, c, radius)
    lo, hi = domain.linear_bounds(a, d)
    with mpmath.workdps(DPS):
        for i in range(3):
            center = mpmath.fsum(_mpf(a[i, j]) * _mpf(c[j]) for j in range(4)) + _mpf(d[i])
            if kind == "box":
                lo_box, hi_box = domain.lower, domain.upper
                spread = None
                vmin = mpmath.fsum(min(_mpf(a[i, j]) * _mpf(lo_box[j]), _mpf(a[i, j]) * _mpf(hi_box[j]))
                                   for j in range(4)) + _mpf(d[i])
                vmax = mpmath.fsum(max(_mpf(a[i, j]) * _mpf(lo_box[j]), _mpf(a[i, j]) * _mpf(hi_box[j]))
                                   for j in range(4)) + _mpf(d[i])
            else:
                if kind == "l2":
                    spread = _mpf(radius) * mpmath.sqrt(mpmath.fsum(_mpf(v) ** 2 for v in a[i]))
                else:
                    spread = _mpf(radius) * mpmath.fsum(abs(_mpf(v)) for v in a[i])
                vmin, vmax = center - spread, center + spread
            assert _mpf(lo[i]) <= vmin and vmax <= _mpf(hi[i])
            scale = float(np.abs(a[i]) @ (np.abs(c) + 2 * radius) + abs(d[i]))
            assert float(vmin) - lo[i] <= 1e-13 * scale + 1e-300
            assert hi[i] - float(vmax) <= 1e-13 * scale + 1e-300
    box_lo, box_hi = domain.enclosing_box()
    pts = sample_points(domain, rng, 20)
    assert np.all(pts >= box_lo) and np.all(pts <= box_hi)


def test_domain_validation_messages():
    with pytest.raises(DomainError, match=r"shape \(3,\).*shape \(2,\)"):
        Box(np.zeros(3), np.ones(2))
    with pytest.raises(DomainError, match=r"empty: lower\[1\]"):
        Box([0.0, 2.0], [1.0, 1.0])
    with pytest.raises(DomainError, match=r"1-D array \(n,\), got shape \(2, 2\)"):
        Box(np.zeros((2, 2)), np.ones((2, 2)))
    with pytest.raises(DomainError, match=r"finite; entry 1 is nan"):
        Box([0.0, np.nan], [1.0, 1.0])
    with pytest.raises(DomainError, match=r"radius must be finite and >= 0, got -1.0 \(center shape \(2,\)\)"):
        Ball([0.0, 0.0], -1.0)
    with pytest.raises(DomainError, match="radius must be finite"):
        Ball([0.0, 0.0], np.inf)
    with pytest.raises(DomainError, match="norm must be 'l2' or 'linf'"):
        Ball([0.0], 1.0, norm="l1")
    with pytest.raises(DomainError, match="Ball center"):
        Ball([np.inf], 1.0)
    with pytest.raises(ValueError, match="non-empty"):  # DomainError is a ValueError
        Box([], [])
    net = make_net([3, 4, 1], "relu", {})
    with pytest.raises(DomainError, match=r"dimension 2 .* takes 3 inputs"):
        activation_bounds(net, Box(np.zeros(2), np.ones(2)))
    with pytest.raises(DomainError, match="Box or Ball"):
        activation_bounds(net, (np.zeros(3), np.ones(3)))
    with pytest.raises(FormulationError, match="unknown method 'lp'"):
        activation_bounds(net, Box(np.zeros(3), np.ones(3)), method="lp")
    with pytest.raises(DomainError, match=r"shape \(m, 3\)"):
        Box(np.zeros(3), np.ones(3)).linear_bounds(np.ones((2, 4)))


# ------------------------------------------------------------------------------------------------
# Other stages, importers, names
# ------------------------------------------------------------------------------------------------


def _mixed_networks() -> dict[str, Network]:
    rng = np.random.default_rng(5)

    def aff(o, i, name):
        return Affine(rng.standard_normal((o, i)), rng.standard_normal(o) * 0.2, name=name)

    tanh = ActivationSpec("tanh")
    groupsort = Network((aff(6, 3, "l0"), GroupSortLayer(6, 2, name="maxmin"), aff(4, 6, "l1"),
                         SlopeRestricted(tanh, 4, name="tanh"), aff(2, 4, "l2")))
    householder = Network((aff(6, 3, "l0"), HouseholderLayer(rng.standard_normal((2, 3)), name="hh"),
                           aff(4, 6, "l1"), SlopeRestricted(ActivationSpec("relu"), 4, name="relu"),
                           aff(2, 4, "l2")))
    inner = aff(4, 4, "inner")
    outer = aff(4, 4, "outer")
    residual = Network((aff(4, 3, "l0"), ResidualBlock(inner, SlopeRestricted(tanh, 4, name="res_tanh"), outer),
                        aff(4, 4, "l1"), SlopeRestricted(ActivationSpec("gelu"), 4, name="gelu"), aff(2, 4, "l2")))
    resnet = lipbound.from_weights([rng.standard_normal((4, 3)), rng.standard_normal((4, 4)) * 0.5,
                                    rng.standard_normal((4, 4)) * 0.5, rng.standard_normal((1, 4))],
                                   "silu", architecture="residual")
    fullsort = lipbound.from_weights([rng.standard_normal((4, 3)), rng.standard_normal((1, 4))], "groupsort",
                                     group_size=4)
    return {"groupsort": groupsort, "householder": householder, "residual": residual, "resnet": resnet,
            "fullsort": fullsort}


@pytest.mark.parametrize("which", ["groupsort", "householder", "residual", "resnet", "fullsort"])
@pytest.mark.parametrize("kind", ["box", "l2"])
def test_other_stages_are_sound_and_crown_falls_back_loudly(which, kind, caplog):
    net = _mixed_networks()[which]
    rng = np.random.default_rng(1)
    domain = make_domain(kind, rng.uniform(-1, 1, 3), 0.8)
    zs = preacts(net, torch.from_numpy(sample_points(domain, rng, 400)))
    ibp = activation_bounds(net, domain, method="ibp")
    with caplog.at_level(logging.WARNING, logger="lipbound"):
        crown = activation_bounds(net, domain, method="crown")
    if which in ("residual", "resnet"):  # skip connections are crossed by CROWN itself: no fallback
        assert "no linear relaxation" not in caplog.text
    else:
        assert "no linear relaxation" in caplog.text and "IBP" in caplog.text
    assert_contains(ibp, zs)
    assert_contains(crown, zs)
    assert_subset(crown, ibp)


def test_degenerate_householder_and_groupsort_are_tight():
    for which in ("groupsort", "householder", "residual"):
        net = _mixed_networks()[which]
        x = np.array([0.2, -0.4, 0.9])
        zs = preacts(net, torch.from_numpy(x[None, :]))
        result = activation_bounds(net, Box(x, x), method="crown")
        assert_contains(result, zs)
        for lo, hi in result.values():
            assert np.all(hi - lo <= 1e-11 * (1 + np.abs(lo)))


def test_householder_branch_selection_uses_the_sign_of_the_projection():
    layer = HouseholderLayer(np.array([[1.0, 0.0]]), name="hh")  # reflects x_0 -> -x_0 when x_0 <= 0
    lo, hi = rx.householder_image(layer, torch.tensor([1.0, -2.0], dtype=torch.float64),
                                   torch.tensor([2.0, 3.0], dtype=torch.float64))
    np.testing.assert_allclose(lo.numpy(), [1.0, -2.0], rtol=1e-12)
    np.testing.assert_allclose(hi.numpy(), [2.0, 3.0], rtol=1e-12)
    lo, hi = rx.householder_image(layer, torch.tensor([-2.0, -2.0], dtype=torch.float64),
                                   torch.tensor([-1.0, 3.0], dtype=torch.float64))
    np.testing.assert_allclose(lo.numpy(), [1.0, -2.0], rtol=1e-12)
    np.testing.assert_allclose(hi.numpy(), [2.0, 3.0], rtol=1e-12)


def test_implicit_layers_are_rejected():
    rng = np.random.default_rng(0)
    act = SlopeRestricted(ActivationSpec("relu"), 3, name="eq_relu")
    implicit = ImplicitLayer(0.1 * rng.standard_normal((3, 3)), rng.standard_normal((3, 2)), act, name="deq")
    net = Network((Affine(np.eye(2)), implicit, Affine(np.ones((1, 3)))))
    for method in ("ibp", "crown"):
        with pytest.raises(FormulationError, match="implicit layer 'deq' is not supported"):
            activation_bounds(net, Box(np.zeros(2), np.ones(2)), method=method)


def test_torch_modules_are_imported():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.ReLU(),
                                torch.nn.Linear(4, 1)).double()
    domain = Ball(np.zeros(3), 1.0, norm="linf")
    result = activation_bounds(model, domain)
    net = lipbound.from_torch(model, input_shape=3)
    assert list(result) == [a.name for a in net.activations]
    assert_contains(result, preacts(net, torch.from_numpy(sample_points(domain, np.random.default_rng(0), 50))))


def test_repeated_names_get_indexed_keys(caplog):
    spec = ActivationSpec("relu")
    net = Network((Affine(np.eye(2)), SlopeRestricted(spec, 2), Affine(np.eye(2)), SlopeRestricted(spec, 2),
                   Affine(np.ones((1, 2)))))
    with caplog.at_level(logging.WARNING, logger="lipbound"):
        result = activation_bounds(net, Box(-np.ones(2), np.ones(2)))
    assert list(result) == ["activation[0]", "activation[1]"]
    assert "repeated layer names" in caplog.text


def test_device_argument():
    net = make_net([3, 4, 4, 1], "gelu", {}, seed=0)
    domain = Box(-np.ones(3), np.ones(3))
    cpu = activation_bounds(net, domain, device="cpu")
    default = activation_bounds(net, domain)
    for k in cpu:
        np.testing.assert_array_equal(cpu[k][0], default[k][0])
    if torch.cuda.is_available():  # pragma: no cover - CPU-only CI
        gpu = activation_bounds(net, domain, device="cuda")
        assert_contains(gpu, preacts(net, torch.from_numpy(sample_points(domain, np.random.default_rng(0), 50))))


# ------------------------------------------------------------------------------------------------
# Stable neurons and local slopes
# ------------------------------------------------------------------------------------------------


def test_stable_neurons_counts():
    net = lipbound.from_weights([np.eye(4), np.ones((1, 4))], "relu", [np.array([2.0, -2.0, 0.0, 1.5]), None])
    counts = stable_neurons(activation_bounds(net, Box(-np.ones(4), np.ones(4))))
    assert counts == {"relu_1": (1, 2, 4)}
    assert stable_neurons({"a": (np.array([0.0, -1.0]), np.array([0.0, 0.0]))}) == {"a": (2, 0, 2)}


@pytest.mark.parametrize("seed", range(3))
def test_crown_proves_at_least_as_many_stable_neurons(seed):
    net = make_net([5, 20, 20, 20, 1], "relu", {}, seed=seed)
    domain = Ball(np.zeros(5), 0.3)
    ibp = stable_neurons(activation_bounds(net, domain, method="ibp"))
    crown = stable_neurons(activation_bounds(net, domain, method="crown"))
    zs = preacts(net, torch.from_numpy(sample_points(domain, np.random.default_rng(seed), 200)))
    for (name, (inactive, active, total)), z in zip(crown.items(), zs, strict=True):
        assert inactive >= ibp[name][0] and active >= ibp[name][1] and total == 20
        assert inactive <= int(np.sum(z.max(axis=0) <= 0)) and active <= int(np.sum(z.min(axis=0) >= 0))


@given(config=st.sampled_from(CONFIGS), kind=st.sampled_from(["box", "l2", "linf"]),
       method=st.sampled_from(["ibp", "crown"]), seed=st.integers(0, 2**16))
@settings(max_examples=30, **SETTINGS)
def test_local_slopes_contain_difference_quotients(config, kind, method, seed):
    name, params = config
    net = make_net([3, 5, 4, 1], name, params, seed=seed, scale=2.0)
    rng = np.random.default_rng(seed)
    domain = make_domain(kind, rng.uniform(-1, 1, 3), 0.6)
    local = local_slopes(net, domain, method=method)
    assert isinstance(local, Network) and local.dims == net.dims
    result = activation_bounds(net, domain, method=method)
    for old, new in zip(net.activations, local.activations, strict=True):
        assert np.all(new.alpha >= old.alpha) and np.all(new.beta <= old.beta) and np.all(new.alpha <= new.beta)
    # difference quotients of every neuron along random segments inside the domain
    pts = sample_points(domain, rng, 12)
    x1, x2 = pts[rng.integers(0, len(pts), 30)], pts[rng.integers(0, len(pts), 30)]
    t = rng.random((30, 1))
    x2 = np.where(rng.random((30, 1)) < 0.5, x2, x1 + t * (x2 - x1))  # also short segments
    if isinstance(domain, Box):
        x2 = np.clip(x2, domain.lower, domain.upper)
    z1s, z2s = preacts(net, torch.from_numpy(x1)), preacts(net, torch.from_numpy(x2))
    with mpmath.workdps(DPS):
        for layer, (lo, hi), z1, z2 in zip(local.activations, result.values(), z1s, z2s, strict=True):
            f = phi_mp(layer.activation)
            for z in (z1, z2):
                assert np.all(z >= lo - TOL * (1 + np.abs(z))) and np.all(z <= hi + TOL * (1 + np.abs(z)))
            a, b = np.clip(z1, lo, hi), np.clip(z2, lo, hi)  # within rounding of the float forward pass
            for r, i in zip(*np.nonzero(np.abs(a - b) > 1e-9), strict=True):
                q = (f(_mpf(a[r, i])) - f(_mpf(b[r, i]))) / (_mpf(a[r, i]) - _mpf(b[r, i]))
                assert _mpf(layer.alpha[i]) <= q <= _mpf(layer.beta[i]), (layer.name, i, q)


def test_local_slopes_of_stable_relus():
    net = lipbound.from_weights([np.eye(3), np.ones((1, 3))], "relu", [np.array([2.0, -2.0, 0.0]), None])
    local = local_slopes(net, Box(-np.ones(3), np.ones(3)))
    np.testing.assert_array_equal(local.activations[0].alpha, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(local.activations[0].beta, [1.0, 0.0, 1.0])
    tanh = lipbound.from_weights([np.eye(2) * 3, np.ones((1, 2))], "tanh")
    local = local_slopes(tanh, Ball(np.array([1.0, -2.0]), 0.1))
    expected = 1 - np.tanh(np.array([3.3, 6.3])) ** 2  # min slope on the interval ends farthest from 0
    assert np.all(local.activations[0].alpha <= expected) and np.all(local.activations[0].alpha >= 0.99 * expected)
    assert np.all(local.activations[0].beta < 0.05)


def test_local_slopes_keep_groupsort_stages_of_a_chain():
    # A chain with GroupSort stages (max pooling imports as one) was refused; its slope-restricted layers are
    # narrowed and the GroupSort ones kept (their quadratic constraints hold globally).
    net = _mixed_networks()["groupsort"]
    box = Box(np.zeros(3), np.full(3, 0.1))
    local = local_slopes(net, box)
    assert isinstance(local, Network) and isinstance(local.activations[0], GroupSortLayer)
    assert np.all(local.activations[1].beta <= net.activations[1].beta)
    assert np.any(local.activations[1].beta < 1.0)
    cert = lipbound.certify(net, method="lipsdp-nsr", domain=box)
    assert cert.certified and cert.upper_bound <= lipbound.certify(net, method="lipsdp-nsr").upper_bound
    assert lipbound.verify_certificate(cert, net).valid
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 0.1, (400, 3))
    xp = np.clip(x + rng.normal(0, 1e-3, x.shape), 0.0, 0.1)
    with torch.no_grad():
        fx, fxp = net(torch.tensor(x)).numpy(), net(torch.tensor(xp)).numpy()
    quotients = np.linalg.norm(fx - fxp, axis=1) / np.linalg.norm(x - xp, axis=1)
    assert quotients.max() <= cert.upper_bound
    with pytest.raises(TypeError, match="lipbound.Network"):
        local_slopes(torch.nn.Linear(2, 2), Box(np.zeros(2), np.ones(2)))
