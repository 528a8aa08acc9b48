from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipbound.rigorous import (
    negative_semidefinite_defect,
    round_down,
    round_up,
    rump_positive_definite,
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
        for i in range(k + 1, n):
            f = m[i][k] / m[k][k]
            for j in range(k + 1, n):
                m[i][j] -= f * m[k][j]
    return True


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
