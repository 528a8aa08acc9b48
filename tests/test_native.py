"""The native structured interior-point solver: agreement with Clarabel, generic programs, certification."""

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import lipbound
from lipbound import SolverError
from lipbound.formulations import lipsdp
from lipbound.program import LMI, Program, Term
from lipbound.solvers import SOLVERS, available_solvers, get_solver
from lipbound.solvers.native import NativeSolver
from tests.conftest import FORMULATION_CASES, formulation_problem, random_net

ACTIVATIONS = [("relu", {}), ("tanh", {}), ("leaky_relu", {"negative_slope": -0.5})]
# The last two have input dim > first width, so solvers get the QR-reduced program.
DIMS = [[3, 5, 2], [4, 6, 5, 3], [9, 4, 4, 4, 2], [12, 5, 6, 2]]


def objectives(program: Program) -> tuple[float, float, object]:
    native = NativeSolver().solve(program)
    clarabel = get_solver("clarabel").solve(program)
    return float(program.objective @ native.y), float(program.objective @ clarabel.y), native


@pytest.mark.parametrize("form", ["neuron", "layer"])
@pytest.mark.parametrize("act, params", ACTIVATIONS)
@pytest.mark.parametrize("dims", DIMS)
def test_agrees_with_clarabel_on_lipsdp(dims, act, params, form):
    problem = lipsdp(random_net(dims, act, seed=sum(dims), **params), form)
    if dims[0] > dims[1]:
        assert problem.solve_program.lmis[0].size < problem.program.lmis[0].size
    ours, ref, result = objectives(problem.solve_program)
    assert result.status == "optimal"
    assert result.info["gap"] <= 1e-9
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_nonnegative_relu_net_reaches_the_exact_constant():
    rng = np.random.default_rng(7)
    weights = [np.abs(rng.standard_normal((6, 4))), np.abs(rng.standard_normal((5, 6))),
               np.abs(rng.standard_normal((2, 5)))]
    cert = lipbound.certify(lipbound.from_weights(weights, "relu"), solver="native")
    exact = np.linalg.norm(weights[2] @ weights[1] @ weights[0], 2)
    assert cert.certified and exact <= cert.upper_bound <= exact * (1 + 1e-6)


def _free_variable_program(w_cost: float = 0.0) -> Program:
    """min t + u + w_cost w  s.t.  [[t, x1 + x2], [x1 + x2, 1]] >= 0,  x1 + x2 - u >= 2,  u >= 0.

    ``t, x1, x2, w`` are free; ``x1 - x2`` and ``w`` change no constraint (redundant directions).
    For ``w_cost == 0`` the optimum is 4 at ``t = 4, x1 + x2 = 2, u = 0``; otherwise it is unbounded.
    """
    def row(*values):
        return sp.csr_matrix(np.array([values], dtype=float))

    first = LMI((1, 1), (Term(0, 0, None, None, row(-1, 0, 0, 0, 0)),
                         Term(0, 1, None, None, row(0, -1, -1, 0, 0)),
                         Term(1, 1, None, None, sp.csr_matrix((1, 5)), const=np.array([-1.0]))))
    second = LMI((1,), (Term(0, 0, None, None, row(0, -1, -1, 1, 0), const=np.array([2.0])),))
    return Program((first, second), 5, np.array([1.0, 0.0, 0.0, 1.0, w_cost]),
                   np.array([False, False, False, True, False]), (1.0, 1.0), output_map="linear")


def test_free_variables_redundant_directions_and_several_lmis_hand_made():
    result = NativeSolver().solve(_free_variable_program(), tol=1e-10)
    assert result.status == "optimal"
    t, x1, x2, u, w = result.y
    np.testing.assert_allclose([t, x1 + x2, u], [4.0, 2.0, 0.0], atol=1e-7)
    # Redundant directions are projected out, so they stay at the starting value 0.
    assert abs(x1 - x2) < 1e-9 and abs(w) < 1e-12


def test_objective_along_a_redundant_direction_is_unbounded():
    with pytest.raises(SolverError, match="unbounded"):
        NativeSolver().solve(_free_variable_program(w_cost=1.0))


def _eigenvalue_program(n: int = 7, k: int = 4, seed: int = 0) -> Program:
    """min t s.t. A0 + sum_i x_i (l_i r_i^T + r_i l_i^T) <= t I, with traceless directions (x free).

    Uses general left/right factors and a mirrored diagonal-block term; the optimum is finite because
    every nonzero traceless direction has a positive eigenvalue.
    """
    rng = np.random.default_rng(seed)
    left, right = rng.standard_normal((n, k)), rng.standard_normal((n, k))
    right -= left * (np.sum(left * right, axis=0) / np.sum(left * left, axis=0))
    base = rng.standard_normal((n, 3))
    n_vars = 1 + k
    coef = sp.csr_matrix((np.ones(k), (np.arange(k), np.arange(1, k + 1))), shape=(k, n_vars))
    rho = sp.csr_matrix((-np.ones(n), (np.arange(n), np.zeros(n, int))), shape=(n, n_vars))
    lmi = LMI((n,), (Term(0, 0, None, None, rho),
                     Term(0, 0, left, right, coef, mirror=True),
                     Term(0, 0, base, base, sp.csr_matrix((3, n_vars)), const=np.array([1.0, -0.5, 2.0]))))
    objective = np.zeros(n_vars)
    objective[0] = 1.0
    return Program((lmi,), n_vars, objective, np.zeros(n_vars, bool), (1.0,), output_map="linear")


def test_general_factors_and_mirrored_terms_agree_with_clarabel():
    ours, ref, result = objectives(_eigenvalue_program())
    assert result.status == "optimal"
    assert abs(ours - ref) <= 1e-6 * max(1.0, abs(ref))


@pytest.mark.parametrize("method", ["lipsdp-neuron", "lipsdp-layer"])
def test_certify_with_native_matches_clarabel(method):
    net = random_net([10, 8, 8, 3], "relu", seed=5)
    ours = lipbound.certify(net, method=method, solver="native")
    ref = lipbound.certify(net, method=method, solver="clarabel")
    assert ours.certified and ref.certified
    assert ours.solver == "native" and ours.status == "optimal"
    assert abs(ours.upper_bound - ref.upper_bound) <= 1e-6 * ref.upper_bound


def test_registration():
    assert "native" in SOLVERS
    assert "native" in available_solvers()
    assert isinstance(get_solver("native"), NativeSolver)
    assert isinstance(get_solver("NATIVE"), NativeSolver)


def test_info_status_logging_and_silence(caplog, capsys):
    program = lipsdp(random_net([4, 5, 3], seed=2)).solve_program
    with caplog.at_level(logging.INFO, logger="lipbound"):
        result = NativeSolver().solve(program)
    assert set(result.info) >= {"gap", "iterations", "device"}
    assert result.info["device"] == "cpu" and result.info["iterations"] > 0
    assert any("native it" in r.getMessage() for r in caplog.records)
    assert capsys.readouterr().out == ""
    NativeSolver().solve(program, verbose=True)  # the library never prints, verbose or not (issue 10)
    assert capsys.readouterr().out == ""


def test_iteration_limit_returns_a_point_with_status():
    program = lipsdp(random_net([4, 6, 6, 3], seed=3)).solve_program
    result = NativeSolver().solve(program, max_iter=3)
    assert result.status == "max_iter"
    assert result.y.shape == (program.n_vars,) and np.all(np.isfinite(result.y))
    assert result.info["iterations"] <= 3


def test_without_convergence_the_best_dual_feasible_iterate_is_returned(caplog):
    program = lipsdp(random_net([6, 8, 8, 3], seed=6)).solve_program
    with caplog.at_level(logging.INFO, logger="lipbound"):
        result = NativeSolver().solve(program, max_iter=9)
    assert result.status == "max_iter"
    feasible_objectives = [float(r.getMessage().split("obj ")[1].split()[0]) for r in caplog.records
                           if "native it" in r.getMessage() and "dinf 0.00e+00" in r.getMessage()]
    assert feasible_objectives, "the run never became dual feasible; use more iterations"
    value = float(program.objective @ result.y)
    assert value == pytest.approx(min(feasible_objectives), rel=1e-9)
    for lmi in program.lmis:  # strictly feasible in floating point
        assert np.all(np.linalg.eigvalsh(lmi.assemble(result.y)) < 0)


def test_unknown_option_is_rejected():
    program = lipsdp(random_net([3, 4, 2], seed=1)).solve_program
    with pytest.raises(SolverError, match="unknown option"):
        NativeSolver().solve(program, eps_abs=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_cuda_matches_cpu():
    program = lipsdp(random_net([30, 20, 20, 5], seed=4)).solve_program
    cpu = NativeSolver().solve(program)
    gpu = NativeSolver().solve(program, device="cuda")
    assert gpu.status == "optimal" and gpu.info["device"].startswith("cuda")
    assert abs(program.objective @ gpu.y - program.objective @ cpu.y) <= 1e-7 * abs(program.objective @ cpu.y)
    cert = lipbound.certify(random_net([30, 20, 20, 5], seed=4), solver="native", device="cuda")
    assert cert.certified


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_cuda_check_of_a_large_lmi_matches_cpu():
    # The GPU paths of the eigenvalue estimate and of the rho re-optimisation against the CPU ones.
    net = random_net([784, 300, 300, 10], seed=5)
    gpu = lipbound.certify(net, solver="native", device="cuda")
    assert gpu.certified and gpu.eigen_defect is not None
    from lipbound.certificate import certify_multipliers

    problem = lipsdp(net)
    report, _, raw = certify_multipliers(problem.program, np.asarray(gpu.multipliers), device=None,
                                         solve_program=problem.solve_program)
    assert report.certified and abs(report.bound - gpu.upper_bound) <= 1e-9 * gpu.upper_bound
    assert abs(max(raw.eigen_defects) - gpu.eigen_defect) <= 1e-6 * max(1.0, abs(gpu.eigen_defect))


@pytest.mark.parametrize("case", FORMULATION_CASES)
def test_agrees_with_clarabel_on_every_formulation(case):
    problem = formulation_problem(case, 11)
    ours, ref, result = objectives(problem.solve_program)
    assert result.status == "optimal", result.info
    assert abs(ours - ref) <= 1e-6 * max(abs(ref), 1e-12)
    report, _, _ = lipbound.certificate.certify_multipliers(problem.program, result.y,
                                                             solve_program=problem.solve_program)
    assert report.certified
