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
from lipbound.solvers.native import NativeSolver, choose_layout
from tests.conftest import FORMULATION_CASES, formulation_problem, random_net
from tests.test_cones import banded_lmi

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
    assert {"native", "native-dense", "native-chordal"} <= set(SOLVERS)
    assert {"native", "native-dense", "native-chordal"} <= set(available_solvers())
    assert isinstance(get_solver("native"), NativeSolver)
    assert isinstance(get_solver("NATIVE"), NativeSolver)
    assert get_solver("native-chordal").name == "native-chordal" and get_solver("native-dense").strategy == "dense"
    program = lipsdp(random_net([3, 4, 2], seed=1)).solve_program
    with pytest.raises(SolverError, match="fixes strategy"):
        get_solver("native-dense").solve(program, strategy="chordal")
    with pytest.raises(SolverError, match="unknown native strategy"):
        NativeSolver().solve(program, strategy="sparse")


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
    # householder (seed 11): gap 1.04e-9 against tol 1e-9 when its 7x7 Schur matrix stops being positive definite
    assert result.status in ("optimal", "optimal_inaccurate"), result.info
    assert result.info["gap"] <= 1e-8
    assert abs(ours - ref) <= 1e-6 * max(abs(ref), 1e-12)
    report, _, _ = lipbound.certificate.certify_multipliers(problem.program, result.y,
                                                             solve_program=problem.solve_program)
    assert report.certified


def _three_way(program: Program, **options):
    dense = NativeSolver("dense").solve(program, **options)
    chordal = NativeSolver("chordal").solve(program, **options)
    ref = get_solver("clarabel").solve(program)
    return (float(program.objective @ dense.y), float(program.objective @ chordal.y),
            float(program.objective @ ref.y), dense, chordal)


@pytest.mark.parametrize("case", FORMULATION_CASES)
def test_chordal_agrees_with_dense_and_clarabel_on_every_formulation(case):
    problem = formulation_problem(case, 11)
    dense, chordal, ref, _, result = _three_way(problem.solve_program)
    if case in ("nsr-coupled", "householder"):
        # Coupled NSR programs (Householder layers get one too) are degenerate: near 1e-9 their Schur matrix is
        # singular to working precision and every direction loses its accuracy (the old solver and Clarabel stall
        # on most seeds too); the solver then stops and says so.
        assert result.status == "optimal" or (result.status in ("stalled", "optimal_inaccurate")
                                              and result.info["gap"] <= 1e-7)
    else:
        assert result.status == "optimal", result.info
    assert abs(chordal - dense) <= 1e-7 * abs(dense) and abs(chordal - ref) <= 1e-6 * abs(ref)
    report, _, _ = lipbound.certificate.certify_multipliers(problem.program, result.y,
                                                             solve_program=problem.solve_program)
    assert report.certified
    if case in ("neuron", "layer", "neuron-linf"):  # chains of three or more blocks take the chordal layout
        assert "chordal" in result.info["strategy"]


@pytest.mark.parametrize("form", ["neuron", "layer"])
@pytest.mark.parametrize("act, params", ACTIVATIONS)
def test_chordal_agrees_on_deep_chains(act, params, form):
    # Unequal widths (padded super-blocks), an input block reduced by QR, and an l-infinity t block.
    net = random_net([9, 4, 6, 3, 5, 5, 6, 2], act, seed=7, **params)
    for norm in ({}, {"norm": "linf", "output_index": 1}):
        program = lipsdp(net, form, **norm).solve_program
        assert choose_layout(program.lmis[0], "chordal").nb >= 6
        dense, chordal, ref, _, result = _three_way(program)
        assert result.status == "optimal" and result.info["gap"] <= 1e-9
        assert abs(chordal - dense) <= 1e-7 * abs(dense) and abs(chordal - ref) <= 1e-6 * abs(ref)


def test_chordal_on_a_banded_pattern_with_several_blocks_per_super_block():
    """A program whose LMI couples each block to the next two (as local skips do): super-blocks of two blocks."""
    lmi = banded_lmi([3, 4, 3, 4, 3, 4, 3], 2, n_vars=3, seed=8)
    # min rho - x1 - x2  s.t.  lmi(rho, x1, x2) - (rho + 1) I <= 0 on the diagonal; bounded by the x_i penalties.
    sizes = lmi.block_sizes
    extra = [Term(j, j, None, None, sp.csr_matrix((n, 3)), const=-np.full(n, 20.0)) for j, n in enumerate(sizes)]
    box = LMI((2,), (Term(0, 0, None, None, sp.csr_matrix(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])),
                          const=-np.full(2, 1.0)),))
    neg = LMI((2,), (Term(0, 0, None, None, sp.csr_matrix(np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])),
                          const=-np.full(2, 1.0)),))
    program = Program((LMI(sizes, lmi.terms + tuple(extra)), box, neg), 3, np.array([1.0, -0.3, 0.2]),
                      np.array([False, False, False]), (1.0, 1.0, 1.0), output_map="linear")
    layout = choose_layout(program.lmis[0], "chordal")
    assert layout.nb >= 3 and max(np.bincount(layout.super_block)) >= 2
    dense, chordal, ref, _, result = _three_way(program)
    assert result.status == "optimal"
    assert abs(chordal - dense) <= 1e-7 * max(1.0, abs(dense)) and abs(chordal - ref) <= 1e-6 * max(1.0, abs(ref))


@pytest.mark.parametrize("strategy", ["dense", "chordal"])
def test_gap_is_relative_to_the_optimum_not_to_one(strategy):
    """A net whose last layer is scaled by 2^-17 has an optimum 2^-34 times smaller (about 3e-10 here). The stopping
    rule used to divide the gap by 1 + |objective|, so such programs stopped "optimal" at twice their optimum."""
    net = random_net([6, 8, 8, 8, 3], seed=3)
    weights = list(net.weights)
    weights[-1] = np.ldexp(weights[-1], -17)
    small = lipbound.from_weights(weights, "relu")
    unscaled = (0,) * 5  # keep the formulation from rescaling the program
    big_program = lipsdp(net, exponents=unscaled).solve_program
    small_program = lipsdp(small, exponents=unscaled).solve_program
    big = NativeSolver(strategy).solve(big_program)
    tiny = NativeSolver(strategy).solve(small_program)
    assert big.status == tiny.status == "optimal" and tiny.info["gap"] <= 1e-9
    value_big, value_tiny = big_program.objective @ big.y, small_program.objective @ tiny.y
    assert value_tiny < 1e-9
    # The method is covariant under this scaling: the same iterations, the same answer up to 2^-34.
    assert tiny.info["iterations"] == big.info["iterations"]
    assert value_tiny == pytest.approx(np.ldexp(value_big, -34), rel=1e-9)
    cert = lipbound.certify(small, solver=f"native-{strategy}")
    assert cert.certified
    assert cert.upper_bound == pytest.approx(np.ldexp(np.sqrt(value_big), -17), rel=1e-6)


def test_auto_picks_the_layout_from_the_cost_model():
    deep = lipsdp(random_net([4] + [20] * 30 + [1], seed=1)).solve_program.lmis[0]
    shallow = lipsdp(random_net([784, 300, 10], seed=1)).solve_program.lmis[0]
    assert choose_layout(deep, "auto").nb > 1
    assert choose_layout(shallow, "auto").nb == 1 and choose_layout(shallow, "chordal").nb == 1  # one clique
    assert choose_layout(deep, "dense").nb == 1
    # On CUDA the dense layout (measured faster and more robust on an H200); the chordal one only when forced.
    assert choose_layout(deep, "auto", "cuda").nb == 1 and choose_layout(deep, "chordal", "cuda").nb > 1
    assert choose_layout(deep, "auto", "cpu").nb > 1


@pytest.mark.parametrize("solver", ["native-dense", "native-chordal"])
def test_certify_with_each_strategy_matches_clarabel(solver):
    net = random_net([10, 8, 8, 8, 8, 3], "relu", seed=9)
    ours = lipbound.certify(net, solver=solver)
    ref = lipbound.certify(net, solver="clarabel")
    assert ours.certified and ours.solver == solver and ours.status == "optimal"
    assert abs(ours.upper_bound - ref.upper_bound) <= 1e-6 * ref.upper_bound
    assert ours.solver_info["strategy"] == solver.split("-")[1]


@pytest.mark.parametrize("strategy", ["dense", "chordal"])
def test_float32_schur_products_reach_the_float64_optimum(strategy):
    program = lipsdp(random_net([20, 12, 12, 12, 12, 3], seed=4)).solve_program
    ref = NativeSolver(strategy).solve(program)
    low = NativeSolver(strategy).solve(program, schur_precision="float32")
    assert low.status == "optimal" and low.info["gap"] <= 1e-9
    assert abs(program.objective @ low.y - program.objective @ ref.y) <= 1e-9 * abs(program.objective @ ref.y)
    with pytest.raises(SolverError, match="schur_precision"):
        NativeSolver().solve(program, schur_precision="float16")


def test_an_optimum_below_the_datas_rounding_level_is_not_reported_optimal(caplog):
    """30 layers of 0.5 x orthogonal 3 x 3 weights: LipSDP's optimum is 2^-60 against data of order 1 when the
    formulation does not rescale the blocks. A slack re-assembled in float64 looks feasible at any such point, so
    the solver must not claim optimality; the scaled program of the same net is solved to the same value."""
    rng = np.random.default_rng(0)
    net = lipbound.from_weights([0.5 * np.linalg.qr(rng.standard_normal((3, 3)))[0] for _ in range(30)], "relu")
    scaled = lipsdp(net).solve_program
    unscaled = lipsdp(net, exponents=(0,) * 31).solve_program
    good = NativeSolver().solve(scaled)
    with caplog.at_level(logging.INFO, logger="lipbound"):
        bad = NativeSolver().solve(unscaled, max_iter=60)
    # Without the sign constraints the LMI implies, this run stalls at gap 1.5; the solver runs it again with them.
    assert "solving again with them" in caplog.text
    assert good.status == "optimal" and good.info["rounding_floor"] <= 1e-9
    assert bad.status != "optimal" and bad.info["rounding_floor"] > 1e-9
    assert unscaled.value(bad.y) == pytest.approx(scaled.value(good.y), rel=1e-8)
    # The gap is relative to the optimum (2^-60 here), and once it and the residuals meet tol the run ends: the
    # rounding floor cannot fall further.
    assert bad.info["gap"] <= 1e-9 and bad.info["iterations"] < 60
    assert abs(bad.info["objective"] - bad.info["lower_objective"]) <= 1e-8 * abs(bad.info["objective"])


def test_dense_cone_above_the_exact_step_size_agrees_with_the_chordal_layout():
    """A dense cone of more than 256 rows takes Krylov step estimates and frees its Cholesky factor once Z^-1 is
    formed (memory of large GPU problems); the optimum is the chordal layout's."""
    program = lipsdp(random_net([30, 100, 100, 100, 3], seed=3)).solve_program
    assert program.lmis[0].size > 256
    dense = NativeSolver("dense").solve(program)
    chordal = NativeSolver("chordal").solve(program)
    assert dense.status == chordal.status == "optimal"
    assert program.value(dense.y) == pytest.approx(program.value(chordal.y), rel=1e-8)


@pytest.mark.parametrize("strategy", ["dense", "chordal"])
def test_large_intermediates_are_freed_when_no_longer_needed(monkeypatch, strategy):
    """Peak memory of large problems (784-4096x4-10 on an H200: the identity Gram matrix, m x m, was held for the
    whole run, 8.4 GiB of its 43.9 GiB peak): the Gram matrices, Z^-1, the completion and the Schur factor of one
    iteration must be garbage by the time the next iterate is factorised."""
    import weakref

    from lipbound.solvers import cones, lowrank

    program = lipsdp(random_net([6, 12, 12, 12, 12, 2], seed=5)).solve_program
    tracked: list[tuple[str, weakref.ref]] = []
    checked = []
    gram, inverse, completion = lowrank.LowRankLMI.gram, cones.SemidefiniteCone.inverse, \
        cones.SemidefiniteCone.completion
    factor_dual = cones.SemidefiniteCone.factor_dual

    def track(name, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            tracked.append((name, weakref.ref(out)))
            return out
        return wrapper

    def factor_dual_checked(self, z):
        # Called for a new slack: everything a previous iteration formed is garbage by now, except this
        # iteration's own products (formed after the last factorisation of a slack).
        alive = [name for name, ref in tracked if ref() is not None]
        checked.append(alive)
        tracked.clear()
        return factor_dual(self, z)

    monkeypatch.setattr(lowrank.LowRankLMI, "gram", track("gram", gram))
    monkeypatch.setattr(cones.SemidefiniteCone, "inverse", track("inverse", inverse))
    monkeypatch.setattr(cones.SemidefiniteCone, "completion", track("completion", completion))
    monkeypatch.setattr(cones.SemidefiniteCone, "factor_dual", factor_dual_checked)
    result = NativeSolver(strategy).solve(program, max_iter=6)
    assert result.status in ("max_iter", "optimal")  # the run went on to its iteration limit (or converged)
    # The first factorisation is the starting point's (after the identity Gram matrix of the set-up); every later one
    # follows a step. On the dense layout the completion is X itself.
    assert len(checked) > 3
    leftovers = [alive for alive in checked if any(name != "completion" or strategy == "chordal"
                                                        for name in alive)]
    assert leftovers == []


@pytest.mark.parametrize("strategy", ["dense", "chordal"])
def test_trail_holds_strictly_feasible_iterates_most_accurate_first(strategy):
    # SolveResult.trail: the first dual-feasible iterate of each decade of the gap below 1e-4, for certificates the
    # answer itself cannot give (certify checks them when the answer's check lands far above its value).
    rng = np.random.default_rng(5)
    weights = [rng.standard_normal((6, 6)) for _ in range(6)]
    program = lipsdp(lipbound.from_weights(weights, "relu"), "neuron").solve_program
    res = NativeSolver(strategy).solve(program)
    assert res.status == "optimal" and len(res.trail) >= 2
    values = [float(program.objective @ y) for y in res.trail]
    assert values == sorted(values)  # most accurate (lowest: dual-feasible values approach from above) first
    assert values[0] >= float(program.objective @ res.y) * (1 - 1e-12)
    for y in res.trail:
        assert not np.array_equal(y, res.y)
        assert all(np.linalg.eigvalsh(lmi.assemble(y))[-1] < 0 for lmi in program.lmis)
    assert get_solver("clarabel").solve(program).trail == ()
