import math
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


def assert_box_corners_definite(rng, a: np.ndarray, pattern: BlockPattern, radius: float, corners: int) -> None:
    """A proof for ``a`` with an entrywise ``radius`` on the block-tridiagonal ``pattern`` covers every matrix in that
    box: check random symmetric corners of it exactly."""
    off = pattern.offsets
    nb = len(pattern.sizes)
    for _ in range(corners):
        e = radius * rng.choice([-1.0, 1.0], size=a.shape)
        e = np.tril(e) + np.tril(e, -1).T
        for r in range(nb):
            for c in range(nb):
                if abs(r - c) > 1:
                    e[off[r]:off[r + 1], off[c]:off[c + 1]] = 0.0
        assert exact_is_positive_definite(a + e)


def near_singular_scaled(rng, sizes, digits, below, spread) -> tuple[np.ndarray, BlockPattern]:
    """A block-tridiagonal matrix whose smallest eigenvalue is ``-+10^-digits`` (below or above 0), then scaled
    by ``2^(e_i + e_j)`` with exponents up to ``+-spread`` (exactly symmetric)."""
    a, pattern = block_tridiagonal(rng, sizes)
    n = a.shape[0]
    a[np.diag_indices(n)] -= np.linalg.eigvalsh(a)[0] + (1 if below else -1) * 10.0**-digits
    e = rng.integers(-spread, spread + 1, n)
    scaled = np.ldexp(a, e[:, None] + e[None, :])
    return np.tril(scaled) + np.tril(scaled, -1).T, pattern


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
        assert_box_corners_definite(rng, a, pattern, radius, 3)


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


@settings(max_examples=300, deadline=None)
@given(num=st.integers(1, 2**80), den=st.integers(1, 2**80), shift=st.integers(-1300, 1200),
       negative=st.booleans())
def test_directed_rounding_is_tight_at_every_magnitude(num, den, shift, negative):
    x = Fraction(num, den) * Fraction(2) ** shift * (-1 if negative else 1)
    up, down = round_up(x), round_down(x)
    assert Fraction(up) >= x if np.isfinite(up) else x > 0
    assert Fraction(down) <= x if np.isfinite(down) else x < 0
    if np.isfinite(up):
        below = np.nextafter(up, -np.inf)
        assert not np.isfinite(below) or Fraction(float(below)) < x  # the smallest float >= x
    if not negative:
        s = sqrt_up(x)
        if np.isfinite(s):
            assert Fraction(s) ** 2 >= x and s > 0.0
            assert Fraction(float(np.nextafter(s, 0.0))) ** 2 < x


def test_directed_rounding_at_the_ends_of_the_float_range():
    huge, tiny = Fraction(10) ** 400, Fraction(1, 10**400)
    assert round_up(huge) == np.inf and round_down(huge) == np.finfo(float).max
    assert round_up(-huge) == -np.finfo(float).max and round_down(-huge) == -np.inf
    assert round_up(tiny) == 5e-324 and round_down(tiny) == 0.0  # never 0 for a positive value
    assert sqrt_up(Fraction(1, 2**2200)) == 5e-324 and sqrt_up(Fraction(2) ** 2048) == np.inf
    assert sqrt_up(Fraction(1, 2**2000)) == 2.0**-1000 and sqrt_up(0) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 7), st.integers(0, 10_000), st.floats(-1e-3, 1e-3), st.integers(0, 600))
def test_rump_with_equilibration_never_claims_an_indefinite_matrix(n, seed, shift, spread):
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, n))
    a = b @ b.T
    a = np.tril(a) + np.tril(a, -1).T
    a[np.diag_indices(n)] -= np.linalg.eigvalsh(a)[0] + shift
    e = rng.integers(-spread, spread + 1, n)
    scaled = np.ldexp(a, e[:, None] + e[None, :])  # congruence by powers of two: same inertia
    if np.array_equal(np.ldexp(scaled, -(e[:, None] + e[None, :])), a) and rump_positive_definite(scaled):
        assert exact_is_positive_definite(scaled)


def _badly_scaled_pair() -> tuple[np.ndarray, np.ndarray]:
    """A positive definite 6 x 6 matrix with diagonal scalings from 2^-800 to 2^800, and the same matrix made
    indefinite."""
    rng = np.random.default_rng(5)
    b = rng.standard_normal((6, 6))
    a = b @ b.T + 0.1 * np.eye(6)
    d = np.ldexp(1.0, np.array([0, -300, 200, -40, 400, -400]))
    scaled = (a * d[:, None]) * d[None, :]
    scaled = np.tril(scaled) + np.tril(scaled, -1).T
    perturbed = scaled.copy()
    perturbed[1, 1] -= 2 * perturbed[1, 1]  # indefinite
    return scaled, perturbed


def test_rump_proves_badly_scaled_matrices_to_their_own_precision():
    scaled, perturbed = _badly_scaled_pair()
    assert rump_positive_definite(scaled)
    assert not rump_positive_definite(perturbed)


def test_entrywise_bound_row_sums_dominate_the_scaled_bound():
    from lipbound.program import EntrywiseBound

    rng = np.random.default_rng(2)
    sizes = (3, 4, 2)
    pieces = []
    for a in range(3):
        for b in range(3):
            if rng.random() < 0.7:
                p = int(rng.integers(1, 4))
                left = rng.standard_normal((sizes[a], p)) * (rng.random((sizes[a], p)) < 0.7)
                right = rng.standard_normal((sizes[b], p))
                w = np.abs(rng.standard_normal(p)) * 10.0 ** rng.uniform(-300, 300)
                pieces.append((a, left, w, b, right, bool(rng.random() < 0.3)))
    pieces.append((1, None, np.abs(rng.standard_normal(4)) * 1e-200, 1, None, False))
    bound = EntrywiseBound(sizes, tuple(pieces))
    s = np.ldexp(1.0, rng.integers(-200, 200, 9))
    off = bound.offsets
    exact = [Fraction(0)] * 9
    for a, left, w, b, right, support in pieces:
        lm = np.eye(w.size) if left is None else ((left != 0) * 1.0 if support else np.abs(left))
        rm = np.eye(w.size) if right is None else ((right != 0) * 1.0 if support else np.abs(right))
        for i in range(sizes[a]):
            for j in range(sizes[b]):
                entry = sum((Fraction(float(lm[i, k])) * Fraction(float(w[k])) * Fraction(float(rm[j, k]))
                             for k in range(w.size)), Fraction(0))
                exact[off[a] + i] += Fraction(float(s[off[a] + i])) * entry * Fraction(float(s[off[b] + j]))
    rows = bound.row_sums(s)
    assert all(Fraction(float(r)) >= e for r, e in zip(rows, exact, strict=True))


@pytest.mark.parametrize("w, exact", [
    (np.diag([1e300, 1e-320]), Fraction(1e300)),
    (np.array([[3e-320, 0.0], [0.0, 0.0]]), Fraction(3e-320)),
    (np.array([[1e300, 1e300], [1e300, 1e300]]), 2 * Fraction(1e300)),
    (np.array([[1.0, 2.0**-1074], [0.0, 0.5]]), Fraction(1)),
])
def test_norm_bounds_at_mixed_magnitudes(w, exact):
    from lipbound.rigorous import frobenius_bound, spectral_norm_bound

    bound = spectral_norm_bound(w)
    assert exact <= bound <= exact * (1 + Fraction(1, 10**6)) + Fraction(1, 2**1000)
    assert frobenius_bound(w) >= exact


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 9), st.integers(0, 10_000), st.floats(8.0, 17.0), st.booleans(), st.integers(0, 40))
def test_rump_never_claims_a_nearly_singular_indefinite_matrix(n, seed, digits, below, spread):
    # Smallest eigenvalue within 1e-8..1e-17 of zero (either side), diagonal scaled apart: where the a posteriori
    # constant (smaller shifts) and equilibration act. The exact rational factorisation is the oracle.
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, n))
    a = b @ b.T
    a = np.tril(a) + np.tril(a, -1).T
    a[np.diag_indices(n)] -= np.linalg.eigvalsh(a)[0] + (1 if below else -1) * 10.0**-digits
    e = rng.integers(-spread, spread + 1, n)
    a = np.ldexp(a, e[:, None] + e[None, :])
    if rump_positive_definite(a):
        assert exact_is_positive_definite(a)


def test_dense_top_eigenvalue_handles_non_finite_matrices():
    from lipbound.rigorous import dense_top_eigenvalue

    assert dense_top_eigenvalue(np.diag([1.0, 3.0, -2.0])) == pytest.approx(3.0)
    assert dense_top_eigenvalue(np.array([[1.0, np.inf], [np.inf, 1.0]])) == math.inf
    assert dense_top_eigenvalue(np.array([[np.nan]])) == math.inf


# The device path of Rump's test (used on CUDA: the matrix crosses once, the passes and factorisations run there) is
# the same torch code on any device; here it runs on the CPU against the exact oracle and the numpy path.
@settings(max_examples=120, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=6), st.integers(0, 10_000), st.floats(8.0, 17.0),
       st.booleans(), st.integers(0, 600), st.sampled_from([0.0, 1e-14, 1e-9]))
def test_rump_on_a_torch_device_never_claims_an_indefinite_matrix(sizes, seed, digits, below, spread, radius):
    from lipbound.rigorous import _rump_test

    rng = np.random.default_rng(seed)
    scaled, pattern = near_singular_scaled(rng, sizes, digits, below, spread)
    if _rump_test(scaled, radius, "cpu", pattern, None):
        assert exact_is_positive_definite(scaled)


@pytest.mark.parametrize("seed", range(6))
def test_rump_on_a_torch_device_proves_what_the_numpy_path_proves(seed):
    rng = np.random.default_rng(seed)
    a, pattern = block_tridiagonal(rng, [3, 5, 2, 4, 4])
    n = a.shape[0]
    a[np.diag_indices(n)] -= np.linalg.eigvalsh(a)[0] - 1e-6 * np.abs(a).max()  # positive definite, by a margin
    e = rng.integers(-300, 301, n)
    scaled = np.ldexp(a, e[:, None] + e[None, :])
    scaled = np.tril(scaled) + np.tril(scaled, -1).T
    from lipbound.rigorous import _rump_test

    for pat in (None, pattern):
        assert _rump_test(scaled, 0.0, None, pat, None)
        assert _rump_test(scaled, 0.0, "cpu", pat, None)
    flipped = scaled.copy()
    flipped[np.diag_indices(n)] *= -1.0
    assert not _rump_test(flipped, 0.0, "cpu", pattern, None)


def test_rump_on_a_torch_device_handles_subnormal_scaling_and_bad_input():
    from lipbound.rigorous import _rump_test

    scaled, perturbed = _badly_scaled_pair()
    assert _rump_test(scaled, 0.0, "cpu", None, None)  # exponents beyond the normal range: the numpy path
    assert not _rump_test(perturbed, 0.0, "cpu", None, None)
    assert not _rump_test(np.array([[1.0, 2.0], [0.0, 1.0]]), 0.0, "cpu", None, None)  # not symmetric
    assert not _rump_test(np.array([[1.0, np.nan], [np.nan, 1.0]]), 0.0, "cpu", None, None)
    assert not _rump_test(np.diag([1.0, 1e-12]), 1e-9, "cpu", None, None)
    # Entries that the scaling pushes into the subnormal range are counted (and the matrix is still proved).
    tiny = np.diag([1.0, 1.0, 1.0])
    tiny[0, 2] = tiny[2, 0] = 2.0**-1060
    tiny[1, 1] = 2.0**-500
    assert _rump_test(tiny, 0.0, "cpu", None, None) and _rump_test(tiny, 0.0, None, None, None)


@pytest.mark.parametrize("seed", range(4))
def test_negative_semidefinite_defect_on_a_torch_tensor_matches_numpy(seed):
    # The certificate's GPU path hands Rump's test torch tensors; on the CPU the same code must prove the same delta.
    import torch

    rng = np.random.default_rng(seed)
    a, pattern = block_tridiagonal(rng, [3, 4, 2, 5])
    m = -a
    m[np.diag_indices(m.shape[0])] += np.linalg.eigvalsh(a)[0] + [1e-3, -1e-9, 0.0, 1e-6][seed]
    m = np.tril(m) + np.tril(m, -1).T
    for kwargs in ({}, {"pattern": pattern}, {"zero_only": True}):
        try:
            expected = negative_semidefinite_defect(m.copy(), 1e-15, **kwargs)
        except ArithmeticError:
            with pytest.raises(ArithmeticError):
                negative_semidefinite_defect(torch.as_tensor(m.copy()), 1e-15, **kwargs)
            continue
        got = negative_semidefinite_defect(torch.as_tensor(m.copy()), 1e-15, **kwargs)
        # The eigenvalue estimate that seeds the search comes from torch there (LAPACK's dsyevr here): the proved
        # deltas may differ in their last digits.
        assert got == pytest.approx(expected, rel=1e-8, abs=1e-300)
        assert np.linalg.eigvalsh(m)[-1] <= min(got, expected)


# -- the block-by-block test (chain LMIs held as BlockTridiagonal matrices) ---------------------------------------
def _as_banded(a: np.ndarray, sizes):
    import torch

    from lipbound.program import BlockTridiagonal

    off = np.concatenate([[0], np.cumsum(sizes)])
    diag = [torch.as_tensor(a[off[k]:off[k + 1], off[k]:off[k + 1]].copy()) for k in range(len(sizes))]
    lower = [torch.as_tensor(a[off[k + 1]:off[k + 2], off[k]:off[k + 1]].copy()) for k in range(len(sizes) - 1)]
    return BlockTridiagonal(diag, lower)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=7), st.integers(0, 10_000), st.floats(8.0, 17.0),
       st.booleans(), st.integers(0, 600), st.sampled_from([0.0, 1e-14, 1e-9]))
def test_banded_rump_never_claims_an_indefinite_matrix(sizes, seed, digits, below, spread, radius):
    rng = np.random.default_rng(seed)
    scaled, pattern = near_singular_scaled(rng, sizes, digits, below, spread)
    if rump_positive_definite(_as_banded(scaled, sizes), radius):
        assert exact_is_positive_definite(scaled)
        assert_box_corners_definite(rng, scaled, pattern, radius, 2)


@pytest.mark.parametrize("seed", range(6))
def test_banded_rump_proves_what_the_dense_test_with_the_pattern_proves(seed):
    rng = np.random.default_rng(seed)
    sizes = [3, 5, 2, 4, 4, 6, 1]
    a, pattern = block_tridiagonal(rng, sizes)
    n = a.shape[0]
    shifts = [1e-6, 1e-9, 1e-12]
    for margin in shifts:
        b = a.copy()
        b[np.diag_indices(n)] -= np.linalg.eigvalsh(a)[0] - margin * np.abs(a).max()
        e = rng.integers(-300, 301, n)
        scaled = np.ldexp(b, e[:, None] + e[None, :])
        scaled = np.tril(scaled) + np.tril(scaled, -1).T
        assert rump_positive_definite(_as_banded(scaled, sizes)) == rump_positive_definite(scaled, pattern=pattern)
    assert rump_positive_definite(_as_banded(scaled, sizes))  # margin 1e-12 of the largest entry: still proved
    flipped = scaled.copy()
    flipped[np.diag_indices(n)] *= -1.0
    assert not rump_positive_definite(_as_banded(flipped, sizes))


def test_banded_rump_handles_subnormal_scaling_and_bad_input():
    scaled, perturbed = _badly_scaled_pair()
    sizes = [1] * scaled.shape[0]
    tridiagonal = np.abs(np.subtract.outer(np.arange(len(sizes)), np.arange(len(sizes)))) <= 1
    if np.all(scaled[~tridiagonal] == 0):
        assert rump_positive_definite(_as_banded(scaled, sizes)) == rump_positive_definite(scaled)
    tiny = np.diag([1.0, 1.0, 1.0])
    tiny[0, 1] = tiny[1, 0] = 2.0**-1060  # pushed into the subnormal range by the equilibration: counted
    tiny[1, 1] = 2.0**-500
    assert rump_positive_definite(_as_banded(tiny, [1, 1, 1]))
    assert rump_positive_definite(_as_banded(tiny, [2, 1]))
    assert not rump_positive_definite(_as_banded(np.array([[1.0, 2.0], [2.0, 1.0]]), [1, 1]))
    bad = _as_banded(np.eye(4), [2, 2])
    bad.diag[0][0, 1] = 0.5  # a diagonal block that is not symmetric
    assert not rump_positive_definite(bad)
    bad = _as_banded(np.eye(4), [2, 2])
    bad.lower[0][1, 0] = math.nan
    assert not rump_positive_definite(bad)
    assert not rump_positive_definite(_as_banded(np.diag([1.0, 1e-12, 1.0]), [1, 1, 1]), 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_negative_semidefinite_defect_block_by_block_matches_dense(seed):
    rng = np.random.default_rng(seed)
    sizes = [3, 4, 2, 5]
    a, pattern = block_tridiagonal(rng, sizes)
    m = -a
    m[np.diag_indices(m.shape[0])] += np.linalg.eigvalsh(a)[0] + [1e-3, -1e-9, 0.0, 1e-6][seed]
    m = np.tril(m) + np.tril(m, -1).T
    for kwargs in ({}, {"zero_only": True}):
        try:
            expected = negative_semidefinite_defect(m.copy(), 1e-15, pattern=pattern, **kwargs)
        except ArithmeticError:
            with pytest.raises(ArithmeticError):
                negative_semidefinite_defect(_as_banded(m, sizes), 1e-15, **kwargs)
            continue
        got = negative_semidefinite_defect(_as_banded(m, sizes), 1e-15, **kwargs)
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-300)
        assert np.linalg.eigvalsh(m)[-1] <= got


def test_banded_largest_eigenvalue_estimates():
    # largest_eigenvalue (seeds the rigorous search for delta: ARPACK on the block products) is accurate;
    # eigenvalue_defect (only reported) takes a fixed number of Lanczos steps: a bounded cost, an estimate from below.
    from lipbound.rigorous import eigenvalue_defect, largest_eigenvalue

    for seed in (5, 6):
        rng = np.random.default_rng(seed)
        sizes = [60] * 8
        a, _ = block_tridiagonal(rng, sizes)
        m = -a
        m[np.diag_indices(m.shape[0])] += np.linalg.eigvalsh(a)[0] + 0.5
        m = np.tril(m) + np.tril(m, -1).T
        exact = np.linalg.eigvalsh(m)[-1]
        estimate = largest_eigenvalue(_as_banded(m, sizes))
        assert estimate <= exact + 1e-9 and estimate == pytest.approx(exact, rel=2e-3)
        # The search for delta survives an estimate below the true value by far more than Rump's margins.
        delta = negative_semidefinite_defect(_as_banded(m, sizes), 1e-15, estimate=0.9 * exact)
        assert exact <= delta <= 2 * exact
        quick = eigenvalue_defect(_as_banded(m, sizes))
        assert 0.8 * exact <= quick <= exact + 1e-9
        assert eigenvalue_defect(m) == pytest.approx(exact, rel=1e-6)  # dense: the accurate estimate
    inf = _as_banded(m, sizes)
    inf.diag[1][0, 0] = math.inf
    assert largest_eigenvalue(inf) == math.inf and eigenvalue_defect(inf) == math.inf
