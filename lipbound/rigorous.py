"""Rigorous floating-point primitives: directed rounding, Rump's positive-definiteness test, norm bounds.

Everything here is *sound*: a returned upper bound is >= the exact real quantity, and a ``True``
from :func:`rump_positive_definite` proves positive definiteness, despite rounding errors.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import scipy.linalg

from lipbound.program import UNIT_ROUNDOFF, gamma

_U = Fraction(1, 2**53)
_ETA = Fraction(1, 2**1075)


def next_up(x):
    """Elementwise one ulp up: ``>=`` the exact result whose round-to-nearest value is ``x``."""
    return np.nextafter(x, np.inf)


def next_down(x):
    """Elementwise one ulp down: ``<=`` the exact result whose round-to-nearest value is ``x``."""
    return np.nextafter(x, -np.inf)


def round_up(x: Fraction | float) -> float:
    """The smallest float >= ``x`` (``x`` exact)."""
    x = Fraction(x)
    f = float(x)
    if Fraction(f) < x:
        f = math.nextafter(f, math.inf)
    return f


def round_down(x: Fraction | float) -> float:
    """The largest float <= ``x`` (``x`` exact)."""
    x = Fraction(x)
    f = float(x)
    if Fraction(f) > x:
        f = math.nextafter(f, -math.inf)
    return f


def sqrt_up(x: Fraction | float) -> float:
    """A float >= sqrt(x) for exact ``x >= 0``."""
    x = Fraction(x)
    if x <= 0:
        return 0.0
    s = math.sqrt(round_up(x))
    while Fraction(s) ** 2 < x:
        s = math.nextafter(s, math.inf)
    return s


def exact_sum(values) -> Fraction:
    """Exact sum of floats."""
    return sum((Fraction(float(v)) for v in values), Fraction(0))


def _cholesky_succeeds(a: np.ndarray, device: str | None) -> bool:
    """Whether floating-point Cholesky of ``a`` runs to completion with finite positive pivots.

    On CUDA this uses cuSOLVER through torch: IEEE binary64 with round-to-nearest and FMA, covered by the same
    ``gamma_k`` analysis as LAPACK (any summation order), with the doubled constant of Rump's test.
    """
    if device is not None and str(device).startswith("cuda"):
        import torch

        t = torch.as_tensor(a, dtype=torch.float64, device=device)
        factor, info = torch.linalg.cholesky_ex(t)
        if int(info) != 0:
            return False
        d = torch.diagonal(factor)
        return bool(torch.all(torch.isfinite(d)) and torch.all(d > 0))
    try:
        factor = scipy.linalg.cholesky(a, lower=True, overwrite_a=True, check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return False
    d = np.diag(factor)
    return bool(np.all(np.isfinite(d)) and np.all(d > 0))


def rump_positive_definite(a: np.ndarray, radius: float = 0.0, device: str | None = None) -> bool:
    """Prove that every symmetric matrix within ``radius`` (entrywise) of ``a`` is positive definite.

    Rump's test (BIT 2006, constants of Rump & Jeannerod 2014; formalised in ValidSDP,
    ``corollary_2_7_with_c_r_upper_bounds``): shift the diagonal down by
    ``c + N r`` with ``c >= (N+1)u/(1-(N+1)u) tr(A) + 4 eta N (2(N+1) + max_i A_ii)``; if the
    floating-point Cholesky factorisation of the shifted matrix succeeds, the claim holds. We double
    ``c`` to cover blocked and FMA-based LAPACK kernels, whose summation orders the formal proof does
    not fix (the underlying ``gamma_k`` bound holds for any order).

    Parameters
    ----------
    a : (N, N) symmetric float64 array
    radius : float
        Entrywise bound on the distance to the matrices of interest.

    Returns
    -------
    bool
        ``True`` only if positive definiteness is proved; ``False`` means "not proved".

    Examples
    --------
    >>> rump_positive_definite(np.eye(3))
    True
    >>> rump_positive_definite(np.diag([1.0, 1e-20]), radius=1e-10)
    False
    """
    n = a.shape[0]
    if a.shape != (n, n) or not np.all(np.isfinite(a)) or not np.array_equal(a, a.T):
        return False
    diag = np.diag(a)
    if np.any(diag <= 0):
        return False
    nu = (n + 1) * _U
    if 3 * nu >= 1:
        raise ValueError(f"matrix of size {n} is too large for Rump's test in binary64.")
    trace = exact_sum(diag)
    maxdiag = Fraction(float(np.max(diag)))
    c = 2 * ((nu / (1 - nu)) * trace + 4 * _ETA * n * (2 * (n + 1) + maxdiag))
    shift = round_up(c + n * Fraction(float(radius)))
    shifted_diag = np.nextafter(diag - shift, -np.inf)
    if np.any(shifted_diag <= 0):
        return False
    shifted = a.copy()
    np.fill_diagonal(shifted, shifted_diag)
    return _cholesky_succeeds(shifted, device)


def largest_eigenvalue(m: np.ndarray, device: str | None = None) -> float:
    """Floating-point estimate of the largest eigenvalue of a symmetric matrix (not rigorous: it only seeds the
    rigorous search for ``delta`` and is reported as the solver's eigenvalue defect)."""
    n = m.shape[0]
    if device is not None and str(device).startswith("cuda"):
        import torch

        return float(torch.linalg.eigvalsh(torch.as_tensor(m, dtype=torch.float64, device=device))[-1])
    if n <= 400:
        return float(scipy.linalg.eigh(m, eigvals_only=True, subset_by_index=[n - 1, n - 1])[0])
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    # Lanczos needs only matrix-vector products; the dense O(n^3) reduction is the fallback.
    try:
        # A fixed start vector keeps the estimate, hence the certified bound, reproducible.
        start = np.ones(n) / np.sqrt(n)
        return float(eigsh(m, k=1, which="LA", return_eigenvectors=False, tol=1e-8, maxiter=20 * n, v0=start)[0])
    except ArpackNoConvergence:
        return float(scipy.linalg.eigh(m, eigvals_only=True, subset_by_index=[n - 1, n - 1])[0])


def negative_semidefinite_defect(m: np.ndarray, radius: float, estimate: float | None = None,
                                 tries: int = 10, device: str | None = None, first: float | None = None) -> float:
    """A rigorous ``delta >= 0`` with ``M <= delta I`` for every symmetric ``M`` within ``radius`` of ``m``.

    Starts from a floating-point estimate of ``lambda_max(m)`` plus the predicted Rump shift and
    enlarges the margin until :func:`rump_positive_definite` proves ``delta I - M`` positive definite.
    ``first`` is tried before anything else (e.g. the ``delta`` a saved certificate recorded; it is proved
    again, not trusted).

    Raises
    ------
    ArithmeticError
        If no ``delta`` could be proved (non-finite input).
    """
    n = m.shape[0]
    lam = largest_eigenvalue(m, device) if estimate is None else estimate
    if not math.isfinite(lam):
        raise ArithmeticError("the LMI matrix has non-finite entries or eigenvalues.")
    diag_abs = float(np.sum(np.abs(np.diag(m))))
    scale = max(float(np.max(np.abs(m))), np.finfo(float).tiny)
    predicted = 4.0 * (n + 1) * UNIT_ROUNDOFF * (diag_abs + n * max(lam, 0.0)) + n * radius
    excess = max(2.0 * predicted, 64 * UNIT_ROUNDOFF * scale)
    candidates = [] if first is None else [first]
    if lam + excess < 0:
        candidates.append(0.0)
    for i in range(tries):
        candidates.append(max(lam, 0.0) + excess * 4.0**i)
    for delta in candidates:
        delta = round_up(delta)
        a = -m
        a[np.diag_indices(n)] += delta
        # Subtracting from the diagonal rounds once per entry: widen the radius by u |a_ii|.
        r = radius + UNIT_ROUNDOFF * float(np.max(np.abs(np.diag(a)))) * (1 + 4 * UNIT_ROUNDOFF)
        if rump_positive_definite(a, round_up(Fraction(r)), device):
            return delta
    raise ArithmeticError(f"could not prove M <= delta I for any tried delta (lambda_max estimate {lam:.3e}).")


def spectral_norm_upper(w: np.ndarray) -> float:
    """A rigorous upper bound on the spectral norm ``||W||_2`` (within ~1e-7 relative of the true value).

    The floating-point estimate ``s`` is inflated to ``t`` and ``t^2 I - G`` (``G`` the smaller Gram
    matrix) is proved positive definite with Rump's test, accounting for the rounding in ``G``.
    Falls back to the Frobenius norm (rounded up) if the test fails.

    Examples
    --------
    >>> spectral_norm_upper(np.diag([3.0, 1.0])) >= 3.0
    True
    """
    w = np.asarray(w, dtype=np.float64)
    if w.size == 0 or not np.any(w):
        return 0.0
    big = float(np.max(np.abs(w)))
    if big < 2.0**-400 or big > 2.0**400:
        # Squares would underflow or overflow: bound the norm of an exactly rescaled copy (power of two).
        e = int(np.frexp(big)[1])
        return math.nextafter(float(np.ldexp(spectral_norm_upper(np.ldexp(w, -e)), e)), math.inf)
    g = w.T @ w if w.shape[1] <= w.shape[0] else w @ w.T
    g = np.tril(g) + np.tril(g, -1).T
    k = max(w.shape)
    row_norm_sq = float(np.max(np.sum(w * w, axis=0 if w.shape[1] <= w.shape[0] else 1)))
    radius = gamma(k + 2) * row_norm_sq * (1 + 1e-12)
    s = float(np.linalg.norm(w, 2))
    for rel in (1e-10, 1e-7, 1e-4):
        t = round_up(Fraction(s) * (1 + Fraction(rel)))
        t2 = round_up(Fraction(t) ** 2)
        a = -g
        a[np.diag_indices(a.shape[0])] += t2
        r = radius + UNIT_ROUNDOFF * float(np.max(np.abs(np.diag(a)))) * 2
        if rump_positive_definite(a, r):
            return t
    frob = exact_sum((w * w).ravel()) * (1 + Fraction(2 * (w.size + 2)) * _U)
    return sqrt_up(frob)
