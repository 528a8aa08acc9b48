from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipbound.program import BlockPattern
from lipbound.rigorous import (
    negative_semidefinite_defect,
    round_down,
    round_up,
    rump_positive_definite,
    rump_shift,
    spectral_norm_upper,
    sqrt_up,
)


def exact_is_positive_definite(a: np.ndarray) -> bool:
    """Oracle: exact rational LDL^T (Sylvester via pivots), no rounding at all."""
    n = a.shape[0]
    m = [[Fraction(float(a[i, j])) for j in range(n)] for i in range(n)]
    for k in range(n):
        if m[k][k] <= 0:
            return False
        cols = [j for j in range(k + 1, n) if m[k][j] != 0]  # exact zeros change nothing: banded cost
        for i in range(k + 1, n):
            if m[i][k] == 0:
                continue
            f = m[i][k] / m[k][k]
            for j in cols:
                m[i][j] -= f * m[k][j]
    return True


def block_tridiagonal(rng, sizes, diag_boost=0.0) -> tuple[np.ndarray, BlockPattern]:
    """A random symmetric block-tridiagonal matrix and its pattern."""
    off = np.concatenate([[0], np.cumsum(sizes)])
    n = int(off[-1])
    j = np.zeros((n, n))
    for b, size in enumerate(sizes):  # lower block-bidiagonal factor: J J^T is block tridiagonal
        j[off[b]:off[b + 1], off[b]:off[b + 1]] = rng.standard_normal((size, size))
        if b:
            j[off[b]:off[b + 1], off[b - 1]:off[b]] = rng.standard_normal((size, sizes[b - 1]))
    a = j @ j.T + diag_boost * np.eye(n)
    a = np.tril(a) + np.tril(a, -1).T
    nb = len(sizes)
    adj = np.eye(nb, dtype=bool) | np.eye(nb, k=1, dtype=bool) | np.eye(nb, k=-1, dtype=bool)
    return a, BlockPattern(tuple(sizes), adj)


def test_directed_rounding():
    third = Fraction(1, 3)
    assert Fraction(round_up(third)) >= third >= Fraction(round_down(third))
    assert Fraction(sqrt_up(2)) ** 2 >= 2
    assert sqrt_up(4) >= 2.0 and sqrt_up(0) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 7), st.integers(0, 10_000), st.floats(-1e-3, 1e-3))
def test_rump_never_claims_an_indefinite_matrix(n, seed, shift):
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, n))
    a = b @ b.T
    a = np.tril(a) + np.tril(a, -1).T
    lam_min = np.linalg.eigvalsh(a)[0]
    a[np.diag_indices(n)] -= lam_min + shift  # smallest eigenvalue near `-shift`
    if rump_positive_definite(a):
        assert exact_is_positive_definite(a)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=7), st.integers(0, 10_000),
       st.floats(-1e-3, 1e-3), st.sampled_from([0.0, 1e-14, 1e-9]))
def test_rump_with_block_pattern_never_claims_an_indefinite_matrix(sizes, seed, shift, radius):
    rng = np.random.default_rng(seed)
    a, pattern = block_tridiagonal(rng, sizes)
    lam_min = np.linalg.eigvalsh(a)[0]
    a[np.diag_indices(a.shape[0])] -= lam_min + shift
    if rump_positive_definite(a, radius, pattern=pattern):
        assert exact_is_positive_definite(a)
        # Perturbations within the radius on the pattern (the claim covers them too): corners of the box.
        for _ in range(3):
            e = radius * rng.choice([-1.0, 1.0], size=a.shape)
            e = np.tril(e) + np.tril(e, -1).T
            off = pattern.offsets
            for r in range(len(sizes)):
                for c in range(len(sizes)):
                    if abs(r - c) > 1:
                        e[off[r]:off[r + 1], off[c]:off[c + 1]] = 0.0
            assert exact_is_positive_definite(a + e)


def test_block_pattern_shrinks_the_shift_and_proves_what_the_dense_test_cannot():
    rng = np.random.default_rng(0)
    a, pattern = block_tridiagonal(rng, [4] * 50)
    diag = np.diag(a)
    dense, banded = rump_shift(diag), rump_shift(diag, pattern=pattern)
    assert banded * 100 < dense
    lam_min = np.linalg.eigvalsh(a)[0]
    a[np.diag_indices(a.shape[0])] -= lam_min - 3 * banded  # smallest eigenvalue ~ 3x the banded shift
    assert not rump_positive_definite(a)
    assert rump_positive_definite(a, pattern=pattern)
    assert exact_is_positive_definite(a)


def test_block_pattern_not_matching_the_matrix_falls_back_to_the_dense_test():
    rng = np.random.default_rng(1)
    a, pattern = block_tridiagonal(rng, [3] * 6, diag_boost=1.0)
    a[0, -1] = a[-1, 0] = 1e-3  # outside the pattern
    assert not pattern.contains(a)
    assert rump_positive_definite(a, pattern=pattern) == rump_positive_definite(a)


def test_rump_accepts_well_conditioned_and_rejects_singular():
    assert rump_positive_definite(np.eye(5) * 2.0)
    assert not rump_positive_definite(np.zeros((3, 3)))
    assert not rump_positive_definite(np.array([[1.0, 1.0], [1.0, 1.0]]))
    assert not rump_positive_definite(np.array([[1.0, 2.0], [0.0, 1.0]]))  # not symmetric
    assert not rump_positive_definite(np.diag([1.0, 1e-12]), radius=1e-9)


def test_negative_semidefinite_defect_is_an_upper_bound():
    rng = np.random.default_rng(3)
    b = rng.standard_normal((20, 20))
    m = -(b @ b.T)
    m = np.tril(m) + np.tril(m, -1).T
    m[0, 0] += 5.0
    delta = negative_semidefinite_defect(m, 0.0)
    assert delta >= np.linalg.eigvalsh(m)[-1]
    assert delta <= max(np.linalg.eigvalsh(m)[-1], 0) + 1e-10


@pytest.mark.parametrize("shape", [(3, 3), (10, 4), (4, 10), (50, 30)])
def test_spectral_norm_upper_is_tight_and_sound(shape):
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape)
    s = np.linalg.norm(w, 2)
    ub = spectral_norm_upper(w)
    assert s <= ub <= s * (1 + 1e-6)


def test_spectral_norm_upper_zero_matrix():
    assert spectral_norm_upper(np.zeros((3, 2))) == 0.0


@pytest.mark.parametrize("scale", [1.5e-167, 1e-300, 1e250])
def test_spectral_norm_upper_for_tiny_and_huge_matrices(scale):
    w = np.array([[1.0, 2.0], [-0.5, 3.0]]) * scale
    s = np.linalg.norm(np.array([[1.0, 2.0], [-0.5, 3.0]]), 2) * scale
    assert s <= spectral_norm_upper(w) <= s * (1 + 1e-6)
