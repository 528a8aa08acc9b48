"""Tests of theory/polycom.py: every theorem check must hold, and the checkers must reject false claims."""

from __future__ import annotations

import importlib.util
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import sympy

from theory import polycom as pc

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "polycom_theorems.py"
t = sympy.Symbol("t", real=True)


# -- the exact machinery rejects false statements (so passing checks are not vacuous) ---------------------


def test_identity_1d_proves_true_and_rejects_false_identities():
    assert pc.identity_1d(sympy.Max(t, 0) - sympy.Max(-t, 0), t, t)[0]
    assert not pc.identity_1d(sympy.Max(t, 0), t, t)[0]  # differs on t < 0
    assert not pc.identity_1d(sympy.Max(t, 0) ** 2 + sympy.Max(-t, 0) ** 2, t**2 + t, t)[0]
    # wrong only at a single breakpoint value is still caught: compare with a shifted kink
    assert not pc.identity_1d(sympy.Max(t - 1, 0), sympy.Max(t - sympy.Rational(101, 100), 0), t)[0]


def test_pieces_1d_of_trapezoid():
    psi = sympy.Max(t + 2, 0) - sympy.Max(t + 1, 0) - sympy.Max(t - 1, 0) + sympy.Max(t - 2, 0)
    pieces = pc.pieces_1d(psi, t)
    assert [(lo, hi) for lo, hi, _ in pieces] == [(-sympy.oo, -2), (-2, -1), (-1, 1), (1, 2), (2, sympy.oo)]
    assert [p for _, _, p in pieces] == [0, t + 2, 1, 2 - t, 0]


def test_exact_breakpoints_and_sup_error_of_simple_net():
    net = pc.UnitNet(1)
    x = net.input(0)
    net.outputs = [pc.relu_gadget(net, x, False) * Fraction(1, 2) + pc.relu_gadget(net, x - Fraction(1, 2),
                                                                                      False) * 1]
    assert pc.exact_breakpoints_1d(net, Fraction(-1), Fraction(1)) == [-1, 0, Fraction(1, 2), 1]
    # interpolant of x^2 at 0, 1/2, 1 on [0, 1]: error 1/16 at 1/4 and 3/4
    sup, argmax = pc.sup_error_vs_square(net, [Fraction(0), Fraction(1, 2), Fraction(1)])
    assert sup == Fraction(1, 16) and argmax == [Fraction(1, 4), Fraction(3, 4)]


def test_unitnet_float_and_exact_evaluation_agree():
    net, _ = pc.build_taylor_network(pc.TARGET_2D, 2, 3, "polyrelu")
    rng = np.random.default_rng(0)
    pts = [[Fraction(int(k), 999) for k in row] for row in rng.integers(0, 1000, size=(20, 2))]
    exact = np.array([float(net.eval_exact(p)[0]) for p in pts])
    floats = net.eval_float(np.array([[float(c) for c in p] for p in pts]))[:, 0]
    np.testing.assert_allclose(floats, exact, rtol=1e-12, atol=1e-14)


def test_relu_product_approximation_error_bound():
    levels, bound = 4, Fraction(1)
    net = pc.UnitNet(2)
    net.outputs = [pc.relu_product_approx_gadget(net, net.input(0), net.input(1), bound, levels)]
    grid = [Fraction(k, 7) for k in range(-7, 8)]
    worst = max(abs(net.eval_exact([a, b])[0] - a * b) for a in grid for b in grid)
    assert 0 < worst <= Fraction(1, 4 ** (levels + 1))
    assert all(net.eval_exact([Fraction(0), b])[0] == 0 for b in grid)  # exact zero when a factor is 0


# -- Lemma 1 ---------------------------------------------------------------------------------------------


def test_lemma1_special_cases():
    res = pc.check_lemma1_special_cases()
    assert res.passed and res.kind == pc.EXACT


def test_lemma1_polynomials():
    res = pc.check_lemma1_polynomials(max_order=4)
    assert res.passed and res.numbers["units_per_polynomial"] == 2


def test_lemma1_product_gadget():
    res = pc.check_lemma1_product_gadget()
    assert res.passed and res.numbers["units"] == 4 and res.numbers["depth"] == 1


def test_lemma1_shared_coefficients():
    assert pc.check_lemma1_shared_coefficients().passed
    random_a = [Fraction(1, 5), Fraction(-2, 3), Fraction(3, 7), Fraction(5, 4)]
    assert pc.check_lemma1_shared_coefficients(random_a).passed
    # a_2 = 0 makes relu^2 unreachable from rescaled units: the system is singular and the check says so
    singular = [Fraction(0), Fraction(1), Fraction(0), Fraction(1)]
    assert not pc.check_lemma1_shared_coefficients(singular).passed


# -- Theorems 1 and 2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_theorem1(seed):
    res = pc.check_theorem1_relu_to_polyrelu(seed=seed, n_random_points=40)
    assert res.passed and res.numbers["same_size"] and res.numbers["pieces_1d"] >= 2


def test_theorem2_sawtooth_exact_errors():
    res = pc.check_theorem2_sawtooth(max_levels=6)
    assert res.passed
    assert res.numbers["sup_errors"] == [str(Fraction(1, 4 ** (m + 1))) for m in range(1, 7)]
    assert res.numbers["units"] == [3 * m for m in range(1, 7)]
    assert res.numbers["pieces"] == [2**m for m in range(1, 7)]
    assert res.numbers["relu_units_lower_bound"] == list(range(1, 7))
    # size grows like ln(1/eps): units = 1.5 log2(1/eps) - 3 exactly
    for units, err in zip(res.data["units"], res.data["errors"], strict=True):
        assert units == 1.5 * math.log2(1 / err) - 3


# -- Theorem 3 -------------------------------------------------------------------------------------------


def test_theorem3_gadgets():
    res = pc.check_theorem3_gadgets(max_grid=4)
    assert res.passed and res.numbers["network_eq_formula_points"] == 75


def test_theorem3_polyrelu_unit_counts():
    for big_n in (2, 5):
        net, info = pc.build_taylor_network(pc.TARGET_1D, 2, big_n, "polyrelu")
        assert net.n_units == 8 * (big_n + 1)  # 4 ReLU units per trapezoid + 4 per exact product
        net2, _ = pc.build_taylor_network(pc.TARGET_2D, 2, big_n, "polyrelu")
        assert net2.n_units == 8 * (big_n + 1) + 12 * (big_n + 1) ** 2
        assert info["relu_levels"] is None and info["bound"] > 0


@pytest.mark.parametrize("d,sizes,relu_sizes,ppc", [(1, (4, 8, 16, 32), (4, 8, 16), 16),
                                                     (2, (4, 6, 8, 12), (3, 4, 6), 4)])
def test_theorem3_rate(d, sizes, relu_sizes, ppc):
    res = pc.check_theorem3_rate(d, 2, grid_sizes=sizes, points_per_cell=ppc, relu_grid_sizes=relu_sizes)
    assert res.passed, res.line()
    assert abs(res.numbers["polyrelu_fitted"] - (-2 / d)) <= pc.RATE_TOL
    assert res.numbers["errors_within_bound"]
    errors = res.numbers["polyrelu_errors"]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    # the ReLU construction needs more units than PolyReLU at every common N
    common = [s for s in relu_sizes if s in sizes]
    for s in common:
        assert res.numbers["relu_units"][relu_sizes.index(s)] > res.numbers["polyrelu_units"][sizes.index(s)]


def test_theorem3_rate_check_fails_with_zero_tolerance():
    res = pc.check_theorem3_rate(1, 2, grid_sizes=(4, 8, 16), points_per_cell=8, relu_grid_sizes=(4, 8),
                                 tol=0.0)
    assert not res.passed


# -- Lipschitz facts -------------------------------------------------------------------------------------


def test_polyrelu_not_globally_lipschitz():
    res = pc.check_polyrelu_not_lipschitz()
    assert res.passed and res.numbers["lim phi' at init"] == "oo"


@pytest.mark.parametrize("p", [1, 2, 3])
def test_polynorm_term_bounds(p):
    dim, eps = 16, 1e-4
    lower, upper = pc.polynorm_term_bounds(p, dim, eps)
    assert lower / upper == pytest.approx(2 ** (-(p - 1) / (2 * p)), rel=1e-12)
    # the lower bound is attained at z = (t, t, 0, ..) with t^(2p) = (D/2)(p-1) eps (p >= 2)
    if p >= 2:
        tt = ((dim / 2) * (p - 1) * eps) ** (1 / (2 * p))
        z = np.zeros(dim)
        z[:2] = tt
        coeffs = [0.0] * p + [1.0]
        assert np.linalg.norm(pc.polynorm_jacobian(z, coeffs, eps), 2) == pytest.approx(lower, rel=1e-9)


def test_polynorm_jacobian_matches_finite_differences():
    rng = np.random.default_rng(3)
    coeffs, eps = [0.3, 0.5, -0.2, 0.4], 1e-3
    z = rng.standard_normal(6) * 0.3
    jac = pc.polynorm_jacobian(z, coeffs, eps)

    def f(v: np.ndarray) -> np.ndarray:
        out = np.full_like(v, coeffs[0])
        for p in (1, 2, 3):
            u = v**p
            out += coeffs[p] * u / np.sqrt(np.mean(u * u) + eps)
        return out

    h = 1e-6
    fd = np.stack([(f(z + h * e) - f(z - h * e)) / (2 * h) for e in np.eye(6)], axis=1)
    np.testing.assert_allclose(jac, fd, rtol=1e-6, atol=1e-6)


def test_polynorm_lipschitz_bounds_are_ordered():
    bounds = pc.polynorm_lipschitz_bounds([0.0, 1 / 3, 1 / 3, 1 / 3], 32, 1e-6, cells=20_000)
    assert bounds["lower"] <= bounds["upper"] <= bounds["closed_upper"] * (1 + 1e-9)
    assert bounds["lower"] >= (1 / 3) / math.sqrt(1e-6)  # z = 0 attains |a_1| / sqrt(eps)


def test_polynorm_lipschitz_check():
    res = pc.check_polynorm_lipschitz(dims=(16,), samples=60, cells=20_000)
    assert res.passed, res.line()
    assert res.kind == pc.MIXED


# -- reporting and the example script --------------------------------------------------------------------


def test_check_result_line_and_dict():
    res = pc.CheckResult("demo", False, pc.MEASURED, {"x": 0.5, "r": Fraction(1, 3)}, "note")
    assert res.line() == "FAIL [measurement] demo: x=0.5, r=1/3"
    assert res.as_dict()["passed"] is False


def test_example_writes_plots_and_exit_code(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("polycom_theorems_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saw = pc.check_theorem2_sawtooth(max_levels=3)
    # a loose tolerance: this test is about the plots and exit codes, the rate is tested above
    rate = pc.check_theorem3_rate(1, 2, grid_sizes=(4, 8), points_per_cell=4, relu_grid_sizes=(4, 8), tol=1.0)
    monkeypatch.setattr(module, "run_all", lambda fast=False: [saw, rate])
    assert module.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "theorem2_sawtooth.png").stat().st_size > 0
    assert (tmp_path / "theorem3_rate_d1_n2.png").stat().st_size > 0
    assert '"theorem2_sawtooth_separation"' in (tmp_path / "results.json").read_text()
    failing = pc.CheckResult("broken", False, pc.EXACT, {}, "")
    monkeypatch.setattr(module, "run_all", lambda fast=False: [saw, failing])
    assert module.main(["--out", str(tmp_path / "b")]) == 1
