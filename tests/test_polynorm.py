"""Tests of the certified PolyNorm bounds (lipbound.polynorm, lipbound.polycom_certify) and the example."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lipbound
from lipbound.errors import UnsupportedLayerError
from lipbound.nn import PolyNorm, PolyReLU
from lipbound.polycom_certify import PolyNormCertificate, certify_polynorm_mlp
from lipbound.polynorm import (
    interval_matrix_norm_upper,
    polynorm,
    polynorm_global_lipschitz,
    polynorm_jacobian,
    polynorm_jacobian_enclosure,
    polynorm_local_bounds,
    polynorm_local_lipschitz,
    polynorm_output_enclosure,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "polycom_lipschitz.py"
COEFS = {
    "init": [0.0, 1 / 3, 1 / 3, 1 / 3],
    "mixed": [0.2, -0.7, 0.4, -0.25],
    "order1": [0.5, 1.0],
    "order4": [0.0, 0.3, -0.2, 0.5, -0.1],
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one torch thread avoids OpenMP spin-waiting when the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def module(coefficients, eps: float) -> PolyNorm:
    m = PolyNorm(order=len(coefficients) - 1, eps=eps).double()
    m.set_coefficients(coefficients)
    return m


def autograd_norms(coefficients, eps: float, points: np.ndarray) -> np.ndarray:
    """Spectral norms of the autograd Jacobians of the PolyNorm module at each row of ``points``."""
    m = module(coefficients, eps)
    jac = torch.func.vmap(torch.func.jacrev(m))(torch.tensor(points, dtype=torch.float64))
    return torch.linalg.matrix_norm(jac.detach(), ord=2).numpy()


def box_points(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, count: int) -> np.ndarray:
    """Uniform points, corners and the centre of the box, plus the point of it nearest to 0."""
    u = rng.uniform(size=(count, lo.size))
    corners = np.where(rng.uniform(size=(count // 4, lo.size)) < 0.5, lo, hi)
    nearest0 = np.clip(0.0, lo, hi)[None, :]
    return np.vstack([lo + u * (hi - lo), corners, (0.5 * (lo + hi))[None, :], nearest0])


# ----------------------------------------------------------------------------------------------
# closed forms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COEFS))
def test_closed_form_matches_module_and_autograd(name):
    coefficients, eps = COEFS[name], 1e-4
    rng = np.random.default_rng(1)
    m = module(coefficients, eps)
    for scale in (0.01, 1.0, 3.0):
        x = scale * rng.standard_normal(7)
        xt = torch.tensor(x, dtype=torch.float64)
        np.testing.assert_allclose(polynorm(x, coefficients, eps), m(xt).detach().numpy(), rtol=1e-12, atol=1e-12)
        ref = torch.autograd.functional.jacobian(m, xt).numpy()
        jac = polynorm_jacobian(x, coefficients, eps)
        assert np.max(np.abs(jac - ref)) <= 1e-10 * max(1.0, np.max(np.abs(ref)))


def test_jacobian_factorisation_through_projector():
    """J_i = (i / s_i) (I - u u^T / (D s_i^2)) diag(x^(i-1)), and the projector has norm <= 1."""
    rng = np.random.default_rng(2)
    x, eps, dim = rng.standard_normal(6), 1e-3, 6
    for i in (1, 2, 3):
        coefficients = [0.0] * i + [1.0]
        u = x**i
        s2 = np.mean(u * u) + eps
        proj = np.eye(dim) - np.outer(u, u) / (dim * s2)
        np.testing.assert_allclose(polynorm_jacobian(x, coefficients, eps),
                                   (i / np.sqrt(s2)) * proj @ np.diag(x ** (i - 1)), atol=1e-12)
        assert np.linalg.norm(proj, 2) <= 1 + 1e-12


# ----------------------------------------------------------------------------------------------
# local bound of PolyNorm on boxes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COEFS))
@pytest.mark.parametrize("eps", [1e-6, 1e-2, 1.0])
def test_local_bound_dominates_autograd_jacobians(name, eps):
    coefficients = COEFS[name]
    rng = np.random.default_rng(abs(hash((name, eps))) % 2**32)
    for dim in (1, 3, 16):
        for scale, width in ((1.0, 0.0), (1.0, 1e-3), (0.5, 0.3), (0.05, 0.1), (2.0, 1.5)):
            center = scale * rng.standard_normal(dim)
            lo, hi = center - width * rng.uniform(size=dim), center + width * rng.uniform(size=dim)
            bound = polynorm_local_lipschitz(coefficients, eps, lo, hi)
            sampled = autograd_norms(coefficients, eps, box_points(rng, lo, hi, 120))
            # the bound can be attained (e.g. at the point nearest 0); the autograd value carries its own rounding
            assert np.max(sampled) <= bound * (1 + 1e-12), (dim, scale, width, np.max(sampled), bound)


def test_local_bound_dominates_difference_quotients():
    rng = np.random.default_rng(3)
    for name, coefficients in COEFS.items():
        for dim, width in ((4, 0.05), (8, 0.5), (16, 2.0)):
            center = rng.standard_normal(dim)
            lo, hi = center - width, center + width
            bound = polynorm_local_lipschitz(coefficients, 1e-5, lo, hi)
            x = box_points(rng, lo, hi, 300)
            y = np.clip(x + width * 0.3 * rng.standard_normal(x.shape), lo, hi)
            fx = np.array([polynorm(p, coefficients, 1e-5) for p in x])
            fy = np.array([polynorm(p, coefficients, 1e-5) for p in y])
            dist = np.linalg.norm(x - y, axis=1)
            keep = dist > 1e-6
            quotients = np.linalg.norm(fx - fy, axis=1)[keep] / dist[keep]
            assert np.max(quotients) <= bound, (name, dim, width)


@settings(max_examples=100, deadline=None)
@given(
    coefficients=st.lists(st.floats(-2, 2, allow_nan=False), min_size=2, max_size=5),
    log_eps=st.floats(-8, 1),
    center=st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=6),
    log_width=st.floats(-9, 0.5),
    seed=st.integers(0, 2**16),
)
def test_local_bound_property(coefficients, log_eps, center, log_width, seed):
    """For any box and coefficients: bound >= ||J|| at random points, and enclosures contain J and f."""
    eps = 10.0**log_eps
    rng = np.random.default_rng(seed)
    c = np.array(center)
    half = 10.0**log_width * rng.uniform(size=c.size)
    lo, hi = c - half, c + half
    bounds = polynorm_local_bounds(coefficients, eps, lo, hi)
    jlo, jhi = polynorm_jacobian_enclosure(coefficients, eps, lo, hi)
    ylo, yhi = polynorm_output_enclosure(coefficients, eps, lo, hi)
    for x in box_points(rng, lo, hi, 20):
        jac = polynorm_jacobian(x, coefficients, eps)
        slack = 1e-9 * (1 + np.abs(jac))  # the float64 reference itself is rounded
        assert np.all(jlo <= jac + slack) and np.all(jac - slack <= jhi)
        assert np.linalg.norm(jac, 2) <= bounds["bound"] * (1 + 1e-9)
        y = polynorm(x, coefficients, eps)
        assert np.all(ylo <= y + 1e-9 * (1 + np.abs(y))) and np.all(y - 1e-9 * (1 + np.abs(y)) <= yhi)
    assert bounds["bound"] == min(bounds["interval_abs"], bounds["interval_midrad"], bounds["projector"],
                                  bounds["global"])


def test_degenerate_box_is_close_to_the_jacobian_norm():
    rng = np.random.default_rng(4)
    for name, coefficients in COEFS.items():
        for dim in (2, 8, 32):
            x0 = rng.standard_normal(dim)
            exact = np.linalg.norm(polynorm_jacobian(x0, coefficients, 1e-6), 2)
            bound = polynorm_local_lipschitz(coefficients, 1e-6, x0, x0)
            assert exact <= bound <= exact * (1 + 1e-6) + 1e-12, (name, dim, exact, bound)


def test_bound_grows_with_the_box_and_stays_below_the_global_bound():
    rng = np.random.default_rng(5)
    for coefficients in COEFS.values():
        x0 = rng.standard_normal(12)
        bounds = [polynorm_local_lipschitz(coefficients, 1e-6, x0 - w, x0 + w) for w in (0.0, 1e-3, 0.1, 0.5, 3.0)]
        assert all(a <= b * (1 + 1e-9) for a, b in zip(bounds, bounds[1:], strict=False)), bounds
        assert bounds[-1] > bounds[0]
        assert bounds[-1] <= polynorm_global_lipschitz(coefficients, 12, 1e-6)


def test_min_l2_norm_sharpens_and_stays_sound():
    rng = np.random.default_rng(6)
    coefficients = COEFS["init"]
    c = rng.standard_normal(10) + 2.0
    lo, hi = c - 2.5, c + 2.5
    radius = 0.5
    min_norm = np.linalg.norm(c) - radius
    plain = polynorm_local_lipschitz(coefficients, 1e-6, lo, hi)
    sharp = polynorm_local_lipschitz(coefficients, 1e-6, lo, hi, min_l2_norm=min_norm)
    assert sharp < plain
    d = rng.standard_normal((300, 10))
    points = c + radius * d / np.linalg.norm(d, axis=1, keepdims=True) * rng.uniform(size=(300, 1))
    assert np.max(autograd_norms(coefficients, 1e-6, points)) <= sharp
    with pytest.raises(ValueError, match="min_l2_norm"):
        polynorm_local_lipschitz(coefficients, 1e-6, lo, hi, min_l2_norm=-1.0)


def test_global_bound_values_and_lower_constructions():
    assert polynorm_global_lipschitz([0.0, 1.0], 8, 0.25) == 2.0
    eps, dim = 1e-6, 16
    for i in (2, 3, 4):
        coefficients = [0.0] * i + [1.0]
        closed = math.sqrt(i) * (dim * (i - 1) * eps) ** ((i - 1) / (2 * i)) / math.sqrt(eps)
        bound = polynorm_global_lipschitz(coefficients, dim, eps)
        assert closed * (1 - 1e-12) <= bound <= closed * (1 + 1e-9)
        # two-hot points z = (t, t, 0, ...) in the direction (1, -1, 0, ...)/sqrt(2) attain h_i with D -> D/2
        v = np.zeros(dim)
        v[:2] = [1 / math.sqrt(2), -1 / math.sqrt(2)]
        for t in np.geomspace(1e-3, 10, 60):
            z = np.zeros(dim)
            z[:2] = t
            assert np.linalg.norm(polynorm_jacobian(z, coefficients, eps) @ v) <= bound
    with pytest.raises(ValueError, match="eps"):
        polynorm_global_lipschitz([0.0, 1.0], 4, 0.0)


def test_interval_matrix_norm_bounds_every_member():
    rng = np.random.default_rng(7)
    for shape in ((5, 5), (3, 8)):
        c = rng.standard_normal(shape)
        r = 0.3 * rng.uniform(size=shape)
        bounds = interval_matrix_norm_upper(c - r, c + r)
        for _ in range(200):
            member = c + r * rng.uniform(-1, 1, size=shape)
            assert np.linalg.norm(member, 2) <= bounds["bound"]
        assert bounds["bound"] == min(bounds["abs"], bounds["midrad"])
    with pytest.raises(ValueError):
        interval_matrix_norm_upper(np.ones((2, 2)), np.zeros((2, 2)))


def test_input_validation():
    with pytest.raises(ValueError, match="coefficients"):
        polynorm_local_lipschitz([1.0], 1e-6, [0.0], [1.0])
    with pytest.raises(ValueError, match="empty box"):
        polynorm_local_lipschitz([0.0, 1.0], 1e-6, [1.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        polynorm_local_lipschitz([0.0, 1.0], 1e-6, [0.0], [np.inf])


# ----------------------------------------------------------------------------------------------
# composed bound of PolyNorm MLPs
# ----------------------------------------------------------------------------------------------


def polynorm_mlp(dims, seed: int, coefficients=None, eps: float = 1e-6) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for k in range(len(dims) - 1):
        layers.append(torch.nn.Linear(dims[k], dims[k + 1]))
        if k < len(dims) - 2:
            act = PolyNorm(order=3, eps=eps)
            if coefficients is not None:
                act.set_coefficients(coefficients)
            layers.append(act)
    return torch.nn.Sequential(*layers)


def sampled_model_norms(model: torch.nn.Module, points: np.ndarray, center: np.ndarray, radius: float,
                        steps: int = 10) -> float:
    """Largest Jacobian norm over ``points`` and a short projected gradient ascent from them (l2 ball)."""
    jac = torch.func.vmap(torch.func.jacrev(model.double()))
    c = torch.tensor(center, dtype=torch.float64)
    x = torch.tensor(points, dtype=torch.float64)
    best = 0.0
    for _ in range(steps + 1):
        x = x.detach().requires_grad_(True)
        sigma = torch.linalg.matrix_norm(jac(x), ord=2)
        best = max(best, float(sigma.detach().max()))
        (grad,) = torch.autograd.grad(sigma.sum(), x)
        x = x.detach() + 0.1 * radius * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-300)
        d = x - c
        x = c + d * torch.clamp(radius / d.norm(dim=1, keepdim=True).clamp_min(1e-300), max=1.0)
    return best


@pytest.mark.parametrize("coefficients", [None, COEFS["mixed"]])
def test_composed_bound_dominates_sampled_jacobians(coefficients):
    model = polynorm_mlp([6, 10, 8, 3], seed=0, coefficients=coefficients)
    rng = np.random.default_rng(8)
    for radius in (0.0, 0.01, 0.3, 2.0):
        x0 = rng.standard_normal(6)
        cert = certify_polynorm_mlp(model, lipbound.Ball(x0, radius))
        assert cert.upper_bound <= cert.product_bound * (1 + 1e-12) <= cert.global_upper_bound * (1 + 1e-12)
        d = rng.standard_normal((64, 6))
        points = x0 + radius * d / np.linalg.norm(d, axis=1, keepdims=True) * rng.uniform(size=(64, 1)) ** (1 / 6)
        assert sampled_model_norms(model, points, x0, radius) <= cert.upper_bound
        # pairs of points: difference quotients of the module itself (float64)
        with torch.no_grad():
            fx = model(torch.tensor(points)).numpy()
            fy = model(torch.tensor(points[::-1].copy())).numpy()
        dist = np.linalg.norm(points - points[::-1], axis=1)
        keep = dist > 1e-9
        if keep.any():
            assert np.max(np.linalg.norm(fx - fy, axis=1)[keep] / dist[keep]) <= cert.upper_bound


def test_composed_bound_on_boxes_and_linf_balls():
    model = polynorm_mlp([5, 7, 4], seed=1)
    rng = np.random.default_rng(9)
    x0 = rng.standard_normal(5)
    for domain in (lipbound.Box(x0 - 0.2, x0 + 0.1), lipbound.Ball(x0, 0.1, norm="linf")):
        cert = certify_polynorm_mlp(model, domain)
        lo, hi = domain.enclosing_box()
        points = lo + (hi - lo) * rng.uniform(size=(300, 5))
        model = model.double()
        jac = torch.func.vmap(torch.func.jacrev(model))(torch.tensor(points))
        assert float(torch.linalg.matrix_norm(jac.detach(), ord=2).max()) <= cert.upper_bound


def test_degenerate_domain_is_close_and_bound_grows_with_radius():
    model = polynorm_mlp([8, 12, 12, 4], seed=2)
    x0 = np.random.default_rng(10).standard_normal(8)
    exact = np.linalg.norm(torch.autograd.functional.jacobian(model.double(), torch.tensor(x0)).numpy(), 2)
    point = certify_polynorm_mlp(model, lipbound.Ball(x0, 0.0))
    assert exact <= point.upper_bound <= exact * (1 + 1e-5)
    assert point.upper_bound < point.product_bound  # the chain keeps the cancellations a product loses
    bounds = [certify_polynorm_mlp(model, lipbound.Ball(x0, r)).upper_bound for r in (0.0, 1e-3, 0.1, 1.0)]
    assert all(a <= b * (1 + 1e-9) for a, b in zip(bounds, bounds[1:], strict=False)), bounds


def test_certificate_fields_and_json():
    model = polynorm_mlp([3, 4, 2], seed=3)
    cert = certify_polynorm_mlp(model, lipbound.Ball([0.1, -0.2, 0.3], 0.05))
    assert isinstance(cert, PolyNormCertificate)
    assert cert.layers == ("Linear", "PolyNorm", "Linear")
    assert len(cert.factors) == 3 and len(cert.box_widths) == 4 and cert.norm == "l2"
    assert cert.box_widths[0] == pytest.approx(0.1, rel=1e-9)
    json.dumps(cert.to_dict())
    with pytest.raises(AttributeError):
        cert.upper_bound = 0.0  # type: ignore[misc]


def test_unsupported_modules_are_named():
    bad = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2), PolyReLU())
    with pytest.raises(UnsupportedLayerError, match=r"model\[1\] \(ReLU\).*model\[3\] \(PolyReLU\)"):
        certify_polynorm_mlp(bad, lipbound.Ball(np.zeros(3), 0.1))
    with pytest.raises(UnsupportedLayerError, match="Linear"):
        certify_polynorm_mlp(torch.nn.Linear(3, 2), lipbound.Ball(np.zeros(3), 0.1))
    with pytest.raises(lipbound.DomainError, match="expects 3 inputs"):
        certify_polynorm_mlp(polynorm_mlp([3, 4, 2], seed=0), lipbound.Ball(np.zeros(5), 0.1))


# ----------------------------------------------------------------------------------------------
# example smoke test
# ----------------------------------------------------------------------------------------------


def test_example_runs_fast(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("polycom_lipschitz_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--fast", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "polycom_lipschitz.png").stat().st_size > 0
    assert {r["model"] for r in results["rows"]} == {"PolyReLU", "PolyNorm"}
    assert all(r["lower"] <= r["upper"] for r in results["rows"])
    assert "not globally Lipschitz" in results["models"]["PolyReLU"]["global"]
    assert "certified upper" in capsys.readouterr().out
