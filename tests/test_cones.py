"""The native solver's cones: layouts (dense, chordal) and the chordal kernels against their dense definitions."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from lipbound.formulations import lipsdp
from lipbound.program import LMI, Term
from lipbound.solvers.cones import SemidefiniteCone
from lipbound.solvers.lowrank import LowRankLMI, chordal_layout, dense_layout
from tests.conftest import random_net


def banded_lmi(sizes, bandwidth, n_vars=3, seed=0) -> LMI:
    """Random terms coupling block ``j`` to blocks ``j .. j + bandwidth`` (a banded block pattern)."""
    rng = np.random.default_rng(seed)
    terms = []
    for j, nj in enumerate(sizes):
        terms.append(Term(j, j, None, None, sp.csr_matrix(np.ones((nj, 1))) @ sp.csr_matrix(([1.0], ([0], [0])),
                                                                                             shape=(1, n_vars))))
        for k in range(j + 1, min(len(sizes), j + bandwidth + 1)):
            p = 2
            coef = sp.csr_matrix(rng.standard_normal((p, n_vars)))
            terms.append(Term(j, k, rng.standard_normal((nj, p)), rng.standard_normal((sizes[k], p)), coef))
    return LMI(tuple(sizes), tuple(terms))


def test_chordal_layout_of_a_chain_has_one_super_block_per_layer():
    lmi = lipsdp(random_net([9, 4, 5, 4, 2], seed=1)).solve_program.lmis[0]
    layout = chordal_layout(lmi)
    assert (layout.nb, layout.b) == (4, 5)  # input block reduced to 4 rows, blocks padded to the widest (5)
    assert layout.padded and layout.real_mask().sum() == lmi.size
    assert dense_layout(lmi).nb == 1 and not dense_layout(lmi).padded


@pytest.mark.parametrize("bandwidth, groups", [(1, 6), (2, 3), (5, 2)])
def test_chordal_layout_groups_banded_patterns(bandwidth, groups):
    layout = chordal_layout(banded_lmi([3] * 6, bandwidth))
    assert layout.nb == groups
    supers = layout.super_block
    lmi = banded_lmi([3] * 6, bandwidth)
    for t in lmi.terms:  # every coupling stays within neighbouring super-blocks
        assert abs(supers[t.row] - supers[t.col]) <= 1


def _random_band(cone, rng, pd=True):
    """A symmetric matrix on the pattern (banded), positive definite (diagonally dominant) when ``pd``."""
    band = torch.tensor(rng.standard_normal((2 * cone.nb - 1, cone.b, cone.b)))
    band[:cone.nb] = (band[:cone.nb] + band[:cone.nb].transpose(1, 2)) / 2
    if pd:
        band[:cone.nb] += 4 * cone.b * torch.eye(cone.b)
    return band if cone.mask is None else band * cone.mask


@pytest.fixture
def cone():
    lmi = lipsdp(random_net([7, 5, 6, 5, 6, 3], seed=2)).solve_program.lmis[0]
    layout = chordal_layout(lmi)
    assert layout.nb >= 4 and layout.padded
    lowrank = LowRankLMI(lmi, 30, torch.device("cpu"), layout)
    return SemidefiniteCone(lowrank, 30, np.random.default_rng(0))


def test_assembly_matches_the_program(cone):
    lmi = lipsdp(random_net([7, 5, 6, 5, 6, 3], seed=2)).solve_program.lmis[0]
    y = np.random.default_rng(1).standard_normal(lmi.terms[0].coef.shape[1])
    lr = cone.lowrank
    band = cone.assemble(lr.pair_coefficients(torch.tensor(y), True))
    real = lr.layout.real_mask()
    np.testing.assert_allclose(cone.to_dense(band).numpy()[np.ix_(real, real)], lmi.assemble(y), atol=1e-12)


def test_inverse_completion_and_solves_match_dense_linear_algebra(cone):
    rng = np.random.default_rng(3)
    z, x = _random_band(cone, rng), _random_band(cone, rng)
    full = cone.to_dense(cone._full(z))
    inv = cone.inverse(cone.factor_dual(z))
    torch.testing.assert_close(inv, torch.linalg.inv(full), rtol=1e-10, atol=1e-12)
    rhs = torch.tensor(rng.standard_normal((cone.n_pad, cone.n_pad)))
    torch.testing.assert_close(cone.solve_dual(cone.factor_dual(z), rhs), torch.linalg.solve(full, rhs))
    xhat = cone.completion(x, cone.factor_primal(x))
    pattern = cone.to_dense(torch.ones_like(x)) != 0
    torch.testing.assert_close(xhat[pattern], cone.to_dense(cone._full(x))[pattern])
    # Maximum-determinant completion: its inverse vanishes off the pattern.
    assert float(torch.linalg.inv(xhat)[~pattern].abs().max()) < 1e-12 * float(torch.linalg.inv(xhat).abs().max())


def test_hkm_products_and_second_order_term_match_their_dense_forms(cone):
    rng = np.random.default_rng(4)
    z, x, d = _random_band(cone, rng), _random_band(cone, rng), _random_band(cone, rng, pd=False)
    zf, xf = cone.factor_dual(z), cone.factor_primal(x)
    zinv, xhat = cone.inverse(zf), cone.completion(x, xf)
    dd = cone.to_dense(d)
    p, q = cone.hkm(xhat, d, zinv)
    prod = xhat @ dd @ zinv
    torch.testing.assert_close(cone.to_dense(p), cone.to_dense(cone.band_of((prod + prod.T) / 2)))
    # The predictor's dense direction and Mehrotra's term sym(dX dZ Z^-1), formed without O(N^3) products.
    dx_dense = -xhat - (prod + prod.T) / 2
    dx = cone.band_of(dx_dense)
    second = cone.second_order(dx, d, q, p, xhat, xf, zf)
    ref = dx_dense @ dd @ zinv
    torch.testing.assert_close(cone.to_dense(second), cone.to_dense(cone.band_of((ref + ref.T) / 2)))


def test_step_lengths_match_eigenvalues(cone):
    rng = np.random.default_rng(5)
    z, x, d = _random_band(cone, rng), _random_band(cone, rng), _random_band(cone, rng, pd=False)
    full = cone.to_dense(cone._full(z))
    chol = torch.linalg.cholesky(full)
    t = torch.linalg.solve_triangular(chol, cone.to_dense(d), upper=False)
    t = torch.linalg.solve_triangular(chol, t.T, upper=False)
    exact = -1.0 / float(torch.linalg.eigvalsh((t + t.T) / 2)[0])
    assert cone.max_step_dual(z, cone.factor_dual(z), d) == pytest.approx(exact, rel=1e-9)
    # Primal: the largest step keeping every clique block positive semidefinite (Grone's theorem).
    step = cone.max_step_primal(cone.factor_primal(x), d)
    assert cone.factor_primal(x + 0.999 * step * d) is not None
    assert cone.factor_primal(x + 1.001 * step * d) is None


def test_dual_step_of_large_cones_is_on_the_safe_side():
    lmi = banded_lmi([60] * 6, 1, seed=6)
    layout = chordal_layout(lmi)
    cone = SemidefiniteCone(LowRankLMI(lmi, 3, torch.device("cpu"), layout), 30, np.random.default_rng(0))
    assert cone.n_pad > 256
    rng = np.random.default_rng(7)
    z, d = _random_band(cone, rng), _random_band(cone, rng, pd=False)
    full = cone.to_dense(cone._full(z))
    chol = torch.linalg.cholesky(full)
    t = torch.linalg.solve_triangular(chol, cone.to_dense(d), upper=False)
    t = torch.linalg.solve_triangular(chol, t.T, upper=False)
    exact = -1.0 / float(torch.linalg.eigvalsh((t + t.T) / 2)[0])
    step = cone.max_step_dual(z, cone.factor_dual(z), d)
    assert 0.5 * exact <= step <= exact * (1 + 1e-9)


def test_primal_step_of_large_cliques_is_on_the_safe_side():
    """Cliques above 256 rows get a batched block Krylov estimate: never beyond the exact step, and close to it."""
    lmi = banded_lmi([150] * 4, 1, seed=8)
    layout = chordal_layout(lmi)
    cone = SemidefiniteCone(LowRankLMI(lmi, 3, torch.device("cpu"), layout), 72, np.random.default_rng(0))
    assert cone.nb > 2 and 2 * cone.b > 256
    rng = np.random.default_rng(9)
    x, d = _random_band(cone, rng), _random_band(cone, rng, pd=False)
    chol = cone.factor_primal(x).cliques
    dk = cone._cliques(d)
    t = torch.linalg.solve_triangular(chol, dk, upper=False)
    t = torch.linalg.solve_triangular(chol, t.transpose(1, 2), upper=False)
    exact = -1.0 / float(torch.linalg.eigvalsh((t + t.transpose(1, 2)) / 2).min())
    step = cone.max_step_primal(cone.factor_primal(x), d)
    assert 0.5 * exact <= step <= exact * (1 + 1e-9)
    assert cone.factor_primal(x + 0.999 * step * d) is not None
    # On CUDA the Krylov products use the inverse clique factors instead of triangular solves: the same estimate.
    inverse = torch.linalg.solve_triangular(chol, torch.eye(chol.shape[-1], dtype=chol.dtype).expand_as(chol),
                                            upper=False)
    state = cone.rng.bit_generator.state
    lam_solve = cone._clique_krylov_min(chol, dk)
    cone.rng.bit_generator.state = state
    lam_products = cone._clique_krylov_min(chol, dk, inverse=inverse)
    assert lam_products == pytest.approx(lam_solve, rel=1e-8)
    assert -1.0 / lam_products <= exact * (1 + 1e-9)


@pytest.mark.parametrize("case", ["neuron", "layer", "neuron-linf", "nsr-coupled", "rr", "implicit"])
@pytest.mark.parametrize("layout_of", [dense_layout, chordal_layout])
def test_schur_assembly_matches_its_definition(case, layout_of):
    """``H_ij = tr(F_i A F_j B)`` from Gram matrices (slots and gathers) against dense F_i, for random A, B >= 0."""
    from tests.conftest import formulation_problem

    program = formulation_problem(case, 3).solve_program
    rng = np.random.default_rng(4)
    for lmi in program.lmis:
        layout = layout_of(lmi)
        lowrank = LowRankLMI(lmi, program.n_vars, torch.device("cpu"), layout)
        n, real = lmi.size, layout.real_mask()
        mats = []
        for _ in range(2):
            a = rng.standard_normal((n, n))
            dense = torch.eye(layout.padded_size, dtype=torch.float64)
            dense[np.ix_(real, real)] = torch.tensor(a @ a.T)
            mats.append(dense)
        h = torch.zeros(program.n_vars, program.n_vars, dtype=torch.float64)
        lowrank.schur(lowrank.gram(mats[0]), lowrank.gram(mats[1]), h)
        f, _ = lmi.vectorized(program.n_vars)
        fs = [f[:, i].toarray().reshape(n, n, order="F") for i in range(program.n_vars)]
        a, b = (m.numpy()[np.ix_(real, real)] for m in mats)
        ref = np.array([[np.trace(fi @ a @ fj @ b) for fj in fs] for fi in fs])
        np.testing.assert_allclose(h.numpy(), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("batch", [1, 3, 12])
def test_pencil_min_matches_the_eigenvalues_of_the_reduced_matrix(batch):
    # LAPACK's pencil reduction (up to _PENCIL_LAPACK_BATCH matrices on the CPU) and torch's batched solves (more)
    # give the smallest eigenvalue of L^-1 D L^-T over the batch.
    from lipbound.solvers.cones import _PENCIL_LAPACK_BATCH, _pencil_min

    rng = np.random.default_rng(batch)
    n = 9
    a = rng.standard_normal((batch, n, n))
    x = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(n)
    d = rng.standard_normal((batch, n, n))
    d = d + d.transpose(0, 2, 1)
    chol = np.linalg.cholesky(x)
    ref = min(np.linalg.eigvalsh(np.linalg.solve(c, np.linalg.solve(c, m).T)).min()
              for c, m in zip(chol, d, strict=True))
    got = _pencil_min(torch.as_tensor(chol), torch.as_tensor(d))
    assert got == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert (batch <= _PENCIL_LAPACK_BATCH) == (batch < 12)


@pytest.mark.parametrize("nb1", [False, True])
def test_banded_symmetric_product_reads_strided_blocks_in_place(cone, nb1):
    # Pi_E(sym(A C)) and Pi_E(sym(A^T C)) from strided views (no transposed copies) against dense products.
    rng = np.random.default_rng(5)
    if nb1:
        lmi = lipsdp(random_net([4, 5, 3], seed=2)).solve_program.lmis[0]
        cone = SemidefiniteCone(LowRankLMI(lmi, 30, torch.device("cpu"), dense_layout(lmi)), 30, rng)
    real = torch.tensor(cone.lowrank.layout.real_mask())
    keep = real[:, None] & real[None, :]  # padded rows and columns hold zeros in the solver
    a, c = (torch.tensor(rng.standard_normal((cone.n_pad, cone.n_pad))) * keep for _ in range(2))
    for transpose, left in ((False, a), (True, a.T)):
        prod = left @ c
        torch.testing.assert_close(cone.to_dense(cone.sym_product_band(a, c, transpose_a=transpose)),
                                   cone.to_dense(cone.band_of((prod + prod.T) / 2)))
