"""LMI programs: the assembly's entrywise rounding bound holds against exact rational arithmetic at any magnitude."""

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lipbound.program import LMI, Term


def _fractions(a: np.ndarray) -> list:
    return [[Fraction(float(x)) for x in row] for row in np.atleast_2d(a)]


def _random_term(rng, sizes, n_vars, magnitude):
    """A random term and its exact data: factors, the exact coefficients and constant (the stored ones are
    their roundings), and exact factors within the stored error bounds."""
    r = int(rng.integers(len(sizes)))
    c = int(rng.integers(len(sizes)))
    kind = rng.integers(3)
    rank = sizes[r] if kind == 0 else int(rng.integers(1, 4))
    if kind == 0:  # identity on a diagonal block
        c, left, right = r, None, None
    else:
        left = rng.standard_normal((sizes[r], rank)) * 10.0 ** rng.uniform(-magnitude, magnitude)
        right = left if (r == c and kind == 1) else rng.standard_normal((sizes[c], rank)) * 10.0 ** rng.uniform(
            -magnitude, magnitude)
    mirror = r == c and left is not right and kind != 0
    # Exact coefficients a * b whose float product may underflow (coef_ops = 1 rounding each).
    a = rng.standard_normal((rank, n_vars)) * 10.0 ** rng.uniform(-magnitude, magnitude, (rank, n_vars))
    b = rng.standard_normal((rank, n_vars)) * 10.0 ** rng.uniform(-magnitude, magnitude, (rank, n_vars))
    mask = rng.random((rank, n_vars)) < 0.6
    exact_coef = [[Fraction(float(a[i, j])) * Fraction(float(b[i, j])) if mask[i, j] else Fraction(0)
                   for j in range(n_vars)] for i in range(rank)]
    stored = sp.csr_matrix(np.where(mask, a * b, 0.0))
    const = rng.standard_normal(rank) if rng.random() < 0.5 else None
    left_err = right_err = None
    exact_left, exact_right = left, right
    if left is not None and rng.random() < 0.5:
        left_err = np.abs(left) * 1e-10 + 1e-300
        exact_left = [[Fraction(float(x)) + Fraction(float(e)) * Fraction(int(rng.integers(-4, 5)), 4)
                       for x, e in zip(row, erow, strict=True)] for row, erow in zip(left, left_err, strict=True)]
        if right is left:
            right_err, exact_right = left_err, exact_left
    term = Term(r, c, left, right, stored, const, coef_ops=1, left_err=left_err, right_err=right_err, mirror=mirror)
    return term, exact_left, exact_right, exact_coef


def _exact_matrix(sizes, terms, y) -> list:
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    n = int(off[-1])
    m = [[Fraction(0)] * n for _ in range(n)]
    yf = [Fraction(float(v)) for v in y]
    for term, left, right, coef in terms:
        d = [sum((coef[k][j] * yf[j] for j in range(len(yf))), Fraction(0))
             + (Fraction(float(term.const[k])) if term.const is not None else 0) for k in range(len(coef))]
        rank = len(d)
        eye = [[Fraction(int(i == k)) for k in range(rank)] for i in range(rank)]
        lf = eye if left is None else (left if isinstance(left, list) else _fractions(left))
        rf = eye if right is None else (right if isinstance(right, list) else _fractions(right))
        for i in range(len(lf)):
            for j in range(len(rf)):
                val = sum((lf[i][k] * d[k] * rf[j][k] for k in range(rank)), Fraction(0))
                gi, gj = off[term.row] + i, off[term.col] + j
                m[gi][gj] += val
                if term.row != term.col or term.mirror:
                    m[gj][gi] += val
    return m


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), magnitude=st.sampled_from([0.0, 5.0, 100.0, 160.0]))
@example(seed=287, magnitude=100.0)  # L diag(d) underflowed (1e-316) and R (1e66) carried the error (a CI run)
def test_rounding_bound_holds_against_exact_arithmetic(seed, magnitude):
    rng = np.random.default_rng(seed)
    sizes = tuple(int(s) for s in rng.integers(1, 4, size=int(rng.integers(1, 4))))
    n_vars = 3
    terms = [_random_term(rng, sizes, n_vars, magnitude) for _ in range(int(rng.integers(1, 6)))]
    lmi = LMI(sizes, tuple(t[0] for t in terms))
    y = rng.standard_normal(n_vars) * 10.0 ** rng.uniform(-magnitude, magnitude, n_vars)
    computed = lmi.assemble(y)
    if not np.all(np.isfinite(computed)):
        return
    exact = _exact_matrix(sizes, terms, y)
    bound = lmi.rounding_bound(y)
    # The entrywise bound as a matrix (its float evaluation rounded generously up) against every entry.
    dense = bound.dense()
    if not np.all(np.isfinite(dense)):
        return  # an infinite bound holds trivially (and makes the certificate fail, soundly)
    ent = np.nextafter(dense * (1 + 1e-12), np.inf)
    # The same bound covers the terms assembled in two groups (the enlarged-rho search re-uses the sum of the terms
    # without rho): only each entry's summation order changes.
    split = int(rng.integers(len(lmi.terms) + 1))
    first, second = lmi.terms[:split], lmi.terms[split:]
    two_step = lmi.assemble(y, terms=second, into=lmi.assemble(y, terms=first))
    # On a torch tensor (the check's GPU path) the second group is added with the same IEEE operations.
    on_torch = lmi.assemble(y, terms=second, into=torch.as_tensor(lmi.assemble(y, terms=first))).numpy()
    assert np.array_equal(on_torch, two_step, equal_nan=True)
    n = lmi.size
    assert np.array_equal(two_step, two_step.T) or not np.all(np.isfinite(two_step))
    for i in range(n):
        for j in range(n):
            assert abs(Fraction(float(computed[i, j])) - exact[i][j]) <= Fraction(float(ent[i, j])), (i, j)
            if np.isfinite(two_step[i, j]):
                assert abs(Fraction(float(two_step[i, j])) - exact[i][j]) <= Fraction(float(ent[i, j])), (i, j)


def test_implied_sign_constraints():
    import lipbound
    from lipbound.formulations import lipsdp
    from lipbound.program import Program

    rng = np.random.default_rng(0)
    relu = lipbound.from_weights([rng.standard_normal(shape) for shape in ((5, 4), (5, 5), (2, 5))])
    for program in (lipsdp(relu).program, lipsdp(relu).solve_program):
        # Every neuron's diagonal entry is -2 lambda_i plus a nonnegative constant; rho's is -rho.
        assert program.implied_nonnegative().all() and program.nonneg.all()
    leaky = lipbound.from_weights([rng.standard_normal((5, 4)), rng.standard_normal((2, 5))], "leaky_relu")
    program = lipsdp(leaky).solve_program
    implied = program.implied_nonnegative()
    # The input block's diagonal holds -rho and -2 alpha beta (W^T Lambda W)_ii: rho is not alone there.
    assert not implied[program.rho_index] and implied.sum() == program.n_vars - 1

    def one_entry(coef, const):
        term = Term(0, 0, None, None, sp.csr_matrix(np.atleast_2d(coef)), const=np.array([const]))
        return Program((LMI((1,), (term,)),), 2, np.ones(2), np.array([True, True]), (1.0,))

    assert one_entry([-1.0, 0.0], 0.5).implied_nonnegative().tolist() == [True, False]
    assert one_entry([-1.0, 0.0], -0.5).implied_nonnegative().tolist() == [False, False]  # y_0 >= -0.5 only
    assert one_entry([-1.0, -1.0], 0.0).implied_nonnegative().tolist() == [False, False]  # two multipliers
    assert one_entry([1.0, 0.0], 0.0).implied_nonnegative().tolist() == [False, False]  # an upper bound


# -- block-tridiagonal matrices (the certificate's storage for chain LMIs) -----------------------------------------
def _random_block_tridiagonal(rng, sizes):
    from lipbound.program import BlockTridiagonal

    diag = []
    for s in sizes:
        b = rng.standard_normal((s, s))
        diag.append(torch.as_tensor(np.tril(b) + np.tril(b, -1).T))
    lower = [torch.as_tensor(rng.standard_normal((sizes[k + 1], sizes[k]))) for k in range(len(sizes) - 1)]
    return BlockTridiagonal(diag, lower)


def test_block_tridiagonal_storage_products_and_shape_errors():
    from lipbound.program import BlockTridiagonal, is_block_tridiagonal

    rng = np.random.default_rng(0)
    a = _random_block_tridiagonal(rng, [3, 1, 4, 2])
    dense = a.dense().numpy()
    assert a.shape == (10, 10) and np.array_equal(dense, dense.T)
    assert dense[0, 5] == 0.0 and dense[9, 3] == 0.0  # blocks two apart are zero
    v = rng.standard_normal((10, 3))
    np.testing.assert_allclose(a.matvec(torch.as_tensor(v)).numpy(), dense @ v, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(a.diagonal(), np.diag(dense))
    b = a.negated()
    b.add_to_diagonal(np.arange(10.0))
    np.testing.assert_array_equal(b.dense().numpy(), -dense + np.diag(np.arange(10.0)))
    assert a.is_symmetric() and a.all_finite() and is_block_tridiagonal(a.pattern)
    a.diag[2][0, 1] += 1.0
    assert not a.is_symmetric()
    a.lower[0][0, 0] = math.inf
    assert not a.all_finite()
    with pytest.raises(ValueError, match="do not chain"):
        BlockTridiagonal([torch.eye(2), torch.eye(3)], [torch.ones(2, 2)])


def test_assemble_banded_is_the_dense_assembly_exactly():
    """Every entry is the same floating-point sum (same products, same order), so the rounding bound covers it."""
    import lipbound
    from lipbound.formulations import lipsdp
    from tests.conftest import random_net

    rng = np.random.default_rng(1)
    net = random_net([5, 7, 6, 7, 3], seed=2)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 4 * 4, 3))
    cnn = lipbound.from_torch(conv.double(), input_shape=(1, 4, 4))
    for network, method in ((net, "neuron"), (net, "layer"), (cnn, "channel")):
        for program in (lipsdp(network, method).program, lipsdp(network, method).solve_program):
            lmi = program.lmis[0]
            y = np.abs(rng.standard_normal(program.n_vars))
            np.testing.assert_array_equal(lmi.assemble_banded(y).dense().numpy(), lmi.assemble(y))
            half = lmi.terms[::2]
            partial = lmi.assemble_banded(y, terms=half)
            rest = tuple(t for t in lmi.terms if t not in half)
            np.testing.assert_array_equal(lmi.assemble_banded(y, terms=rest, into=partial).dense().numpy(),
                                          lmi.assemble(y, terms=rest, into=lmi.assemble(y, terms=half)))
    skip = LMI((2, 2, 2), (Term(0, 2, np.ones((2, 1)), np.ones((2, 1)), sp.csr_matrix(np.ones((1, 1)))),))
    with pytest.raises(ValueError, match="not block tridiagonal"):
        skip.assemble_banded(np.ones(1))
