"""Rigorous floating-point primitives: directed rounding, Rump's positive-definiteness test, norm bounds.

Everything here is *sound*: a returned upper bound is >= the exact real quantity, and a ``True``
from :func:`rump_positive_definite` proves positive definiteness, despite rounding errors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import scipy.linalg
import torch

from lipbound.program import UNIT_ROUNDOFF, BlockPattern, BlockTridiagonal, EntrywiseBound, gamma

log = logging.getLogger("lipbound")

_U = Fraction(1, 2**53)
#: Restart cycles of the Lanczos estimate of an LMI's largest eigenvalue before falling back to a dense solver.
_LANCZOS_RESTARTS = 60
_ETA = Fraction(1, 2**1075)


#: The smallest normal binary64 number: the absolute error of one operation that underflows, also under
#: flush-to-zero (gradual underflow alone errs by at most half of the smallest subnormal).
TINY = 2.0**-1022


def next_up(x):
    """Elementwise one ulp up: ``>=`` the exact result whose round-to-nearest value is ``x``.

    ``x`` is a float, a numpy array or a torch tensor (the result has the same type).

    Examples
    --------
    >>> bool(next_up(1.0) > 1.0)
    True
    """
    if isinstance(x, torch.Tensor):
        return torch.nextafter(x, torch.full_like(x, math.inf))
    return np.nextafter(x, np.inf)


def next_down(x):
    """Elementwise one ulp down: ``<=`` the exact result whose round-to-nearest value is ``x`` (numpy or torch)."""
    if isinstance(x, torch.Tensor):
        return torch.nextafter(x, torch.full_like(x, -math.inf))
    return np.nextafter(x, -np.inf)


def outward_up(x):
    """``next_up(x) + TINY``: ``>=`` the exact result of the one operation that gave ``x``, even when it
    underflowed under flush-to-zero (numpy or torch; the bound analysis of :mod:`lipbound.bounds` uses it)."""
    return next_up(x) + TINY


def outward_down(x):
    """``next_down(x) - TINY``: ``<=`` the exact result of the one operation that gave ``x`` (see
    :func:`outward_up`)."""
    return next_down(x) - TINY
_MAX = Fraction(np.finfo(float).max)


def round_up(x: Fraction | float) -> float:
    """The smallest float >= ``x`` (``x`` exact), at every magnitude: ``inf`` above the largest float, the
    smallest positive subnormal for tiny positive ``x`` (never 0 unless ``x == 0``)."""
    x = Fraction(x)
    if x > _MAX:
        return math.inf
    if x < -_MAX:
        return -float(np.finfo(float).max)
    f = float(x)  # int / int division: correctly rounded, subnormals included
    if Fraction(f) < x:
        f = math.nextafter(f, math.inf)
    return f


def round_down(x: Fraction | float) -> float:
    """The largest float <= ``x`` (``x`` exact), at every magnitude (``-inf`` below the most negative float)."""
    return -round_up(-Fraction(x))


def sqrt_up(x: Fraction | float) -> float:
    """The smallest float >= sqrt(x) for exact ``x >= 0``, at every magnitude (``inf`` when it overflows).

    Exact integer arithmetic: ``x`` is scaled by an even power of two into a range where an integer square root
    carries more than 53 significant bits, rounded up, and scaled back exactly.

    Examples
    --------
    >>> sqrt_up(4), sqrt_up(2) ** 2 >= 2, sqrt_up(Fraction(1, 2**2000)) == 2.0**-1000
    (2.0, True, True)
    """
    x = Fraction(x)
    if x <= 0:
        return 0.0
    k = max(0, (120 - (x.numerator.bit_length() - x.denominator.bit_length())) // 2 + 1)
    scaled = x * 4**k  # >= 2^118, so its integer square root has >= 59 bits
    n = -((-scaled.numerator) // scaled.denominator)  # ceil
    r = math.isqrt(n)
    if r * r < n:
        r += 1
    return round_up(Fraction(r, 2**k))


def exact_sum(values) -> Fraction:
    """Exact sum of floats."""
    return sum((Fraction(float(v)) for v in values), Fraction(0))


def _diagonal(a) -> np.ndarray:
    """The diagonal of a numpy array, a torch tensor or a block-tridiagonal matrix, as a numpy array (a copy)."""
    if isinstance(a, BlockTridiagonal):
        return a.diagonal()
    if isinstance(a, torch.Tensor):
        return torch.diagonal(a).cpu().numpy().copy()
    return np.diag(a).copy()


def _all_finite(a) -> bool:
    if isinstance(a, BlockTridiagonal):
        return a.all_finite()
    return bool(torch.isfinite(a).all()) if isinstance(a, torch.Tensor) else bool(np.all(np.isfinite(a)))


def _cholesky_weight(a: np.ndarray | torch.Tensor, device) -> float | None:
    """Factor ``a`` in floating point; None unless the factorisation completes with finite positive pivots, else
    an upper bound on ``max_i (|G| |G|^T 1)_i`` for the computed factor ``G`` (``a ~ G G^T``).

    With a ``device`` this uses torch (cuSOLVER on CUDA, LAPACK on the CPU): IEEE binary64 with round-to-nearest and
    FMA, covered by the same ``gamma_k`` analysis as LAPACK (any summation order), with the doubled constant of
    Rump's test. The row sums are sums of non-negative products, inflated by far more than their rounding error.
    """
    n = a.shape[0]
    if device is not None:
        t = torch.as_tensor(a, dtype=torch.float64, device=device)
        factor, info = torch.linalg.cholesky_ex(t)
        del t, a
        if int(info) != 0:
            return None
        d = torch.diagonal(factor)
        if not bool(torch.all(torch.isfinite(d)) and torch.all(d > 0)):
            return None
        g = factor.abs_()
        top = float((g @ (g.T @ torch.ones(n, dtype=torch.float64, device=device))).max())
    else:
        try:
            factor = scipy.linalg.cholesky(a, lower=True, overwrite_a=True, check_finite=False)
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
            return None
        d = np.diag(factor)
        if not (np.all(np.isfinite(d)) and np.all(d > 0)):
            return None
        g = np.abs(factor)
        top = float(np.max(g @ (g.T @ np.ones(n))))
    if not math.isfinite(top):
        return None
    return math.nextafter(top * (1.0 + 4.0 * (n + 4) * UNIT_ROUNDOFF) + (n + 4) * 2.0**-1074, math.inf)


def _envelope_bound(sqrt_diag: np.ndarray, pattern: BlockPattern) -> tuple[int, float, int]:
    """Structure constants of Rump's test for a matrix with block pattern ``pattern``.

    Returns ``(w, r, k)``: ``w`` the largest row envelope width of the lower triangle (the Cholesky factor's
    rows have their non-zeros inside the envelope, so every inner product has at most ``w - 1`` non-zero
    terms); ``r >= max_i s_i sum_{j ~ i} s_j`` over the pairs ``i ~ j`` whose row envelopes overlap, with
    ``s = sqrt_diag`` (computed in floating point and inflated by far more than its rounding error); ``k``
    the largest number of structurally non-zero entries in a row.
    """
    sizes = np.asarray(pattern.sizes)
    off = pattern.offsets
    adj = pattern.adjacency | pattern.adjacency.T | np.eye(sizes.size, dtype=bool)
    first = np.array([int(np.flatnonzero(adj[b, :b + 1])[0]) for b in range(sizes.size)])
    width = int(np.max(off[1:] - off[first]))
    # Rows i (block a) and j (block b >= a) can share a non-zero column iff b's envelope reaches block a.
    blocks = np.arange(sizes.size)
    overlap = first[np.maximum.outer(blocks, blocks)] <= np.minimum.outer(blocks, blocks)
    block_sum = np.array([float(np.sum(sqrt_diag[off[b]:off[b + 1]])) for b in range(sizes.size)])
    block_max = np.array([float(np.max(sqrt_diag[off[b]:off[b + 1]], initial=0.0)) for b in range(sizes.size)])
    r = float(np.max(block_max * (overlap @ block_sum)))
    r *= 1.0 + 4.0 * (sqrt_diag.size + 4) * UNIT_ROUNDOFF
    k = int(np.max(adj @ sizes))
    return width, math.nextafter(r, math.inf), k


def _rump_constant(diag: np.ndarray, pattern: BlockPattern | None, weight: float | None = None) -> Fraction:
    """Rump's ``c`` (doubled, see :func:`rump_positive_definite`) for a matrix with diagonal ``diag`` (all > 0).

    ``weight`` bounds ``|| |G| |G|^T ||_2`` for the Cholesky factor ``G``: a priori (``None``) from the diagonal
    (``tr`` or the envelope row-sum bound), or a posteriori from a computed factor.
    """
    n = diag.size
    maxdiag = Fraction(float(np.max(diag)))
    if pattern is not None:
        width, r, _ = _envelope_bound(next_up(np.sqrt(diag)), pattern)
        nu = (width + 1) * _U
    else:
        nu = (n + 1) * _U
    if weight is None:
        # fsum is correctly rounded, so one ulp up is >= the exact sum (and far cheaper than rationals).
        prior = Fraction(math.nextafter(math.fsum(diag.tolist()), math.inf))
        weight = min(prior, Fraction(r)) if pattern is not None else prior
    if 3 * nu >= 1:
        raise ValueError(f"matrix of size {n} is too large for Rump's test in binary64.")
    return 2 * ((nu / (1 - nu)) * Fraction(weight) + 4 * _ETA * n * (2 * (n + 1) + maxdiag))


def rump_shift(diag: np.ndarray, radius: float = 0.0, pattern: BlockPattern | None = None) -> float:
    """The diagonal shift of :func:`rump_positive_definite` for a matrix with diagonal ``diag`` (all > 0) and a
    uniform entrywise radius, without equilibration.

    Dense: ``2 c + N r`` with ``c = (N+1)u/(1-(N+1)u) tr(A) + 4 eta N (2(N+1) + max_i A_ii)``. With a block
    ``pattern``, ``(N+1)`` becomes ``w + 1`` (``w`` the row envelope width), ``tr(A)`` becomes
    ``min(tr(A), max_i s_i sum_{j ~ i} s_j)`` (``s_i = sqrt(A_ii)``) and ``N r`` becomes ``k r`` (``k`` the most
    structural non-zeros in a row); see :func:`rump_positive_definite`.
    """
    rows = diag.size if pattern is None else min(diag.size, _envelope_bound(np.sqrt(diag), pattern)[2])
    return round_up(_rump_constant(diag, pattern) + rows * Fraction(float(radius)))


def equilibration_exponents(diag: np.ndarray) -> np.ndarray:
    """Integers ``e`` with ``4^e_i diag_i`` in ``[1, 4)`` (``diag > 0``): the power-of-two Jacobi scaling."""
    return -((np.frexp(diag)[1].astype(np.int64) - 1) // 2)


def rump_positive_definite(a: np.ndarray, radius: float = 0.0, device: str | None = None,
                           pattern: BlockPattern | None = None, bound: EntrywiseBound | None = None) -> bool:
    """Prove that every symmetric matrix within ``radius`` (entrywise; or within ``bound``) of ``a`` is positive
    definite.

    Rump's test (BIT 2006, constants of Rump & Jeannerod 2014; formalised in ValidSDP,
    ``corollary_2_7_with_c_r_upper_bounds``): shift the diagonal down by ``c`` with
    ``c >= (N+1)u/(1-(N+1)u) tr(A) + 4 eta N (2(N+1) + max_i A_ii)``; if the floating-point Cholesky
    factorisation of the shifted matrix succeeds, ``A`` is positive definite. We double ``c`` to cover blocked
    and FMA-based LAPACK kernels, whose summation orders the formal proof does not fix (the underlying
    ``gamma_k`` bound holds for any order).

    **Equilibration.** The test runs on ``D A D`` with ``D = diag(2^e_i)`` making every diagonal entry lie in
    ``[1, 4)`` (exact in binary floating point up to underflow, which is accounted for): congruence keeps
    definiteness, and ``c`` is then relative to each row's own magnitude instead of the largest one (Cholesky
    itself is invariant under such scalings, van der Sluis). Badly scaled LMIs (multipliers from ``1e-11`` to
    ``1``) are proved to their own precision this way.

    **A posteriori constant.** The bound ``|Delta| <= gamma |G| |G|^T`` on the backward error holds for the computed
    factor itself (Higham, Thm 10.3), so a shift smaller than the a priori one is proved by the factor it
    produces when ``gamma max_i (|G| |G|^T 1)_i`` (computed upward) fits in it; the a priori shift is the
    fallback.

    **Perturbations.** For a perturbation ``E`` with ``|D E D|`` of row sums ``r_i`` (from ``bound``, or ``radius``
    on every structurally non-zero entry), row ``i`` is shifted by ``c + r_i``: ``D E D >= -diag(r)`` (Gershgorin),
    so ``D (A + E) D = G G^T + (diag shift - Cholesky error) + (diag(r) + D E D)`` is positive definite.

    With a block ``pattern`` (every non-zero of ``a`` and of the matrices of interest lies in its blocks) the
    constants use the structure (the same ``gamma_k`` analysis of Higham, *Accuracy and Stability*, Ch. 3 and
    Thm 10.3, counting non-zero terms only): the computed factor's rows stay inside the row envelope of ``a``
    (products with exact zeros are exact zeros), so each inner product has at most ``w - 1`` non-zero terms
    and ``gamma_{N+1}`` becomes ``gamma_{w+1}``; the error matrix is bounded entrywise by
    ``gamma_{w+1} s_i s_j`` on the pairs whose envelopes overlap and is zero elsewhere, so its norm is at most
    ``gamma_{w+1} max_i s_i sum_{j ~ i} s_j`` (row sums of a non-negative symmetric matrix) instead of
    ``gamma_{N+1} tr(A)``. For a block-tridiagonal LMI of ``L`` blocks of size ``b`` this divides the shift by
    about ``L^2 / 6``. Derivation: ``theory/certificate_repair.md``.

    Parameters
    ----------
    a : (N, N) symmetric float64 array, a float64 torch tensor (the test then runs on its device), or a
        :class:`~lipbound.program.BlockTridiagonal` matrix (tested block by block on its device, with the
        constants of its pattern; ``device`` and ``pattern`` are then not used)
    radius : float
        Entrywise bound on the distance to the matrices of interest (ignored when ``bound`` is given).
    device : str, optional
        ``"cuda"`` runs the whole test on the GPU (one transfer; see :func:`_rump_test`).
    pattern : BlockPattern, optional
        Block sparsity shared by ``a`` and the matrices of interest. Checked against ``a``; when ``a`` has a
        non-zero outside it the dense constants are used.
    bound : EntrywiseBound, optional
        A structured entrywise bound on the distance to the matrices of interest.

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
    >>> rump_positive_definite(np.diag([1.0, 1e-200]))
    True
    """
    if isinstance(a, BlockTridiagonal):
        return _rump_test_banded(a, bound if bound is not None else EntrywiseBound.uniform(radius, a.pattern,
                                                                                           a.shape[0]))
    n = a.shape[0]
    if tuple(a.shape) != (n, n):
        return False
    if isinstance(a, torch.Tensor):
        return _rump_test(a, radius, a.device, pattern, bound)
    gpu = device is not None and str(device).startswith("cuda")
    return _rump_test(a, radius, device if gpu else None, pattern, bound)


def _rump_test(a: np.ndarray, radius: float, device, pattern: BlockPattern | None,
               bound: EntrywiseBound | None) -> bool:
    """:func:`rump_positive_definite` with the matrix passes on ``device`` (torch, any device) or in numpy (``None``).

    With a device, the matrix crosses once; the finiteness and symmetry checks, the pattern check, the scaling and
    the factorisations run there (on an H200, the numpy passes over an 8976-row LMI took about 1 s of each test, the
    GPU work a few milliseconds). The scaling ``2^(e_i + e_j)`` is then applied as one product by an exact power of
    two (``2^e_i 2^e_j`` is exact while ``e_i + e_j`` stays in the normal exponent range; otherwise the numpy path
    runs), which rounds only where the result is subnormal, exactly like ``np.ldexp``; those entries are counted
    below in both paths.
    """
    n = a.shape[0]
    tiny = np.finfo(float).tiny
    diag = _diagonal(a)
    t = None
    if device is not None:
        t = torch.as_tensor(a, dtype=torch.float64, device=device)
        if not (bool(torch.isfinite(t).all()) and torch.equal(t, t.T)):
            return False
    elif not np.all(np.isfinite(a)) or not np.array_equal(a, a.T):
        return False
    if np.any(diag <= 0):
        return False
    if pattern is not None and (sum(pattern.sizes) != n or not pattern.contains(a if t is None else t)):
        log.warning("Rump's test: the matrix does not fit the given block pattern; using the dense constants.")
        pattern = None
    if bound is None:
        bound = EntrywiseBound.uniform(radius, pattern, n)
    e = equilibration_exponents(diag)
    power = np.ldexp(1.0, e)
    rows = bound.row_sums(power)
    if t is not None and 2 * int(e.max()) <= 1023 and 2 * int(e.min()) >= -1022:
        tp = torch.as_tensor(power, device=device)
        scaled = t * (tp[:, None] * tp[None, :])
        if not bool(torch.isfinite(scaled).all()):
            return False
        lost = ((scaled.abs() < tiny) & (t != 0)).sum(1).cpu().numpy()
        del t
        sdiag = torch.diagonal(scaled).cpu().numpy()
    else:
        a = a if t is None else t.cpu().numpy()
        del t
        scaled = np.ldexp(a, e[:, None] + e[None, :])
        if not np.all(np.isfinite(scaled)):
            return False
        lost = np.count_nonzero((np.abs(scaled) < tiny) & (a != 0), axis=1)
        sdiag = np.diag(scaled)
        device = None
    if np.any(lost):  # underflow while scaling: each such entry is off by at most 2^-1075
        rows = next_up(rows + lost * 2.0**-1074)

    def factor(shifted_diag: np.ndarray) -> float | None:
        if device is not None:
            shifted = scaled.clone()
            shifted.diagonal().copy_(torch.as_tensor(shifted_diag, device=device))
        else:
            shifted = scaled.copy()
            np.fill_diagonal(shifted, shifted_diag)
        return _cholesky_weight(shifted, device)

    return _shift_search(sdiag, rows, pattern, factor)


def _shift_search(sdiag: np.ndarray, rows: np.ndarray, pattern: BlockPattern | None,
                  factor: Callable[[np.ndarray], float | None]) -> bool:
    """The shifts of Rump's test for an equilibrated matrix with diagonal ``sdiag`` and perturbation row sums
    ``rows``: ``factor(d)`` factors the matrix with its diagonal replaced by ``d`` and returns the weight of the
    computed factor (:func:`_cholesky_weight`), or ``None`` when the factorisation breaks down."""

    def factor_with_shift(c: float) -> float | None:
        shifted_diag = next_down(sdiag - next_up(c + rows))
        if not np.all(np.isfinite(shifted_diag)) or np.any(shifted_diag <= 0):
            return None
        return factor(shifted_diag)

    # A posteriori first: the computed factor's |G| |G|^T is usually far below the a priori bound, so a smaller
    # shift is tried and then justified by the factor it produced (Higham Thm 10.3 holds for the computed factor).
    prior = round_up(_rump_constant(sdiag, pattern))
    for trial in (prior / 16, None):
        if trial is None:
            return factor_with_shift(prior) is not None  # the a priori constant: success alone proves
        weight = factor_with_shift(trial)
        if weight is None:
            # The factorisation broke down with the smaller shift: the larger one (a matrix further from positive
            # definite) is not tried. This only saves work (the enlarged-rho search of a certificate tries several
            # matrices that are not positive definite, each costing two factorisations before); "not proved" is
            # always a sound answer.
            return False
        needed = round_up(_rump_constant(sdiag, pattern, weight))
        if needed <= trial:
            return True
        if needed < prior:
            again = factor_with_shift(needed * 1.25)
            if again is not None and round_up(_rump_constant(sdiag, pattern, again)) <= needed * 1.25:
                return True
    return False


def _banded_cholesky_weight(diag: list[torch.Tensor], lower: list[torch.Tensor]) -> float | None:
    """:func:`_cholesky_weight` for a block-tridiagonal matrix (diagonal blocks ``diag``, blocks ``(k + 1, k)``
    ``lower``): the block Cholesky recursion ``G_kk G_kk^T = A_kk - W_k W_k^T`` with ``W_k G_(k-1)(k-1)^T =
    A_(k,k-1)``, whose factor has no fill outside the pattern.

    Every entry of ``G`` is still ``(a_ij - sum_l g_il g_jl) / g_jj`` (a square root on the diagonal) summed in some
    order: the terms of block ``k - 1`` by the product ``W_k W_k^T`` and the triangular solve, those of block ``k``
    by the factorisation; the terms of earlier blocks are exact zeros. So Higham's bound ``|Delta| <= gamma |G|
    |G|^T`` (Thm 10.3, any order of evaluation; a triangular solve that multiplies by reciprocals adds one rounding
    per entry, inside the doubled constant of :func:`_rump_constant`) holds for the computed factor, with the
    envelope width of the pattern in ``gamma``. Returns ``max_i (|G| |G|^T 1)_i`` inflated as there, or ``None``.
    """
    factors: list[torch.Tensor] = []
    couplings: list[torch.Tensor] = []
    for k, block in enumerate(diag):
        if k:
            w = torch.linalg.solve_triangular(factors[-1].mT, lower[k - 1], upper=True, left=False)
            block = block - w @ w.mT
            couplings.append(w)
        lo, info = torch.linalg.cholesky_ex(block)
        if int(info) != 0:
            return None
        d = torch.diagonal(lo)
        if not bool(torch.all(torch.isfinite(d)) and torch.all(d > 0)):
            return None
        factors.append(lo)
    g = [f.abs() for f in factors]
    gw = [w.abs() for w in couplings]
    # |G|^T 1 by column blocks (block k's columns meet G_kk and W_(k+1)), then |G| times it by row blocks.
    col = [g[k].sum(0) + (gw[k].sum(0) if k < len(gw) else 0.0) for k in range(len(g))]
    top = max(float((g[k] @ col[k] + (gw[k - 1] @ col[k - 1] if k else 0.0)).max()) for k in range(len(g)))
    n = sum(int(f.shape[0]) for f in factors)
    if not math.isfinite(top):
        return None
    return math.nextafter(top * (1.0 + 4.0 * (n + 4) * UNIT_ROUNDOFF) + (n + 4) * 2.0**-1074, math.inf)


def _rump_test_banded(a: BlockTridiagonal, bound: EntrywiseBound) -> bool:
    """:func:`rump_positive_definite` for a :class:`~lipbound.program.BlockTridiagonal` matrix, block by block on
    its device: the same equilibration (by exact powers of two, subnormal results counted per row), the same
    perturbation row sums, shifts and constants (with the block-tridiagonal pattern), and the block Cholesky
    factorisation of :func:`_banded_cholesky_weight` in place of the dense one. Cost ``sum_k b_k^3`` instead of
    ``N^3``; memory the stored blocks."""
    if not a.all_finite() or not a.is_symmetric():
        return False
    diag = a.diagonal()
    if np.any(diag <= 0):
        return False
    off = a.offsets
    nb = len(a.diag)
    e = equilibration_exponents(diag)
    powers = np.ldexp(1.0, e)
    rows = bound.row_sums(powers)
    tiny = np.finfo(float).tiny
    exact_powers = 2 * int(e.max()) <= 1023 and 2 * int(e.min()) >= -1022
    power = torch.as_tensor(powers, device=a.device)

    def scaled(block: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``2^(e_i + e_j) block`` for row block ``r`` and column block ``c``, and the mask of its entries that
        landed in the subnormal range."""
        rs, cs = slice(off[r], off[r + 1]), slice(off[c], off[c + 1])
        if exact_powers:
            out = block * (power[rs, None] * power[None, cs])
        else:
            out = torch.as_tensor(np.ldexp(block.cpu().numpy(), e[rs, None] + e[None, cs]), device=a.device)
        return out, (out.abs() < tiny) & (block != 0)

    lost = np.zeros(diag.size)
    sdiag_blocks, slower = [], []
    for k in range(nb):
        block, under = scaled(a.diag[k], k, k)
        sdiag_blocks.append(block)
        lost[off[k]:off[k + 1]] += under.sum(1).cpu().numpy()
    for k in range(nb - 1):
        block, under = scaled(a.lower[k], k + 1, k)
        slower.append(block)
        lost[off[k + 1]:off[k + 2]] += under.sum(1).cpu().numpy()
        lost[off[k]:off[k + 1]] += under.sum(0).cpu().numpy()
    if not all(bool(torch.isfinite(b).all()) for b in sdiag_blocks + slower):
        return False
    if np.any(lost):  # underflow while scaling: each such entry is off by at most 2^-1075
        rows = next_up(rows + lost * 2.0**-1074)
    sdiag = torch.cat([torch.diagonal(b) for b in sdiag_blocks]).cpu().numpy()

    def factor(shifted_diag: np.ndarray) -> float | None:
        shifted = []
        for k, block in enumerate(sdiag_blocks):
            b = block.clone()
            b.diagonal().copy_(torch.as_tensor(shifted_diag[off[k]:off[k + 1]], device=a.device))
            shifted.append(b)
        return _banded_cholesky_weight(shifted, slower)

    return _shift_search(sdiag, rows, a.pattern, factor)


def dense_top_eigenvalue(m: np.ndarray) -> float:
    """The largest eigenvalue of a dense symmetric matrix in floating point: LAPACK's dsyevr for that one value,
    the full symmetric QR algorithm where dsyevr fails ("Internal Error" on badly scaled matrices), ``inf`` for a
    matrix with non-finite entries or when both fail."""
    n = m.shape[0]
    if not np.all(np.isfinite(m)):
        return math.inf
    try:
        return float(scipy.linalg.eigh(m, eigvals_only=True, subset_by_index=[n - 1, n - 1])[0])
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, ValueError):
        try:
            return float(np.linalg.eigvalsh(m)[-1])
        except np.linalg.LinAlgError:
            return math.inf


def largest_eigenvalue(m: np.ndarray, device: str | None = None) -> float:
    """Floating-point estimate of the largest eigenvalue of a symmetric matrix (not rigorous: it only seeds the
    rigorous search for ``delta`` and is reported as the solver's eigenvalue defect)."""
    n = m.shape[0]
    if isinstance(m, BlockTridiagonal):
        return _banded_top_eigenvalue(m)
    if isinstance(m, torch.Tensor):
        return float(torch.linalg.eigvalsh(m)[-1])
    if device is not None and str(device).startswith("cuda"):
        return float(torch.linalg.eigvalsh(torch.as_tensor(m, dtype=torch.float64, device=device))[-1])
    if n <= 400 or not np.all(np.isfinite(m)):
        return dense_top_eigenvalue(m)
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    # Lanczos needs only matrix-vector products; the dense O(n^3) reduction is the fallback.
    try:
        # A fixed start vector keeps the estimate, hence the certified bound, reproducible.
        start = np.ones(n) / np.sqrt(n)
        # Restarts are capped: an LMI at a solver's optimum has a cluster of eigenvalues at 0, where Lanczos
        # converges slowly (a 1040-row LMI of a 64-layer chain took longer than the solve); the dense
        # factorisation is then cheaper.
        return float(eigsh(m, k=1, which="LA", return_eigenvectors=False, tol=1e-8, maxiter=_LANCZOS_RESTARTS,
                           v0=start)[0])
    except ArpackNoConvergence:
        return dense_top_eigenvalue(m)


#: Lanczos steps of the quick largest-eigenvalue estimate of a block-tridiagonal LMI (:func:`eigenvalue_defect`).
_BANDED_LANCZOS_STEPS = 64


def _banded_lanczos(m: BlockTridiagonal, steps: int) -> float:
    """The largest Ritz value of a block-tridiagonal matrix after ``steps`` Lanczos steps (full reorthogonalisation,
    fixed start vector), on the matrix's device: at most the largest eigenvalue (up to rounding)."""
    n = m.shape[0]
    steps = min(n, steps)
    basis = torch.zeros(steps, n, dtype=torch.float64, device=m.device)
    q = torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64, device=m.device)
    alpha, beta = [], []
    for j in range(steps):
        basis[j] = q
        w = m.matvec(q)
        alpha.append(float(w @ q))
        for _ in range(2):
            w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
        b = float(torch.linalg.vector_norm(w))
        if j == steps - 1 or not b > 1e-13 * max(abs(a) for a in alpha):
            break
        beta.append(b)
        q = w / b
    off = beta[:len(alpha) - 1]
    return float(np.linalg.eigvalsh(np.diag(alpha) + np.diag(off, 1) + np.diag(off, -1))[-1])


def _banded_top_eigenvalue(m: BlockTridiagonal) -> float:
    """:func:`largest_eigenvalue` of a block-tridiagonal matrix: ARPACK's Lanczos on its block products (as for
    dense matrices); when it does not converge, the largest Ritz value after ``4 x`` :data:`_BANDED_LANCZOS_STEPS`
    steps (the dense fallback would need the ``N x N`` matrix)."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    n = m.shape[0]
    if not m.all_finite():
        return math.inf
    if n <= 400:
        return dense_top_eigenvalue(m.dense().cpu().numpy())

    def product(v: np.ndarray) -> np.ndarray:
        return m.matvec(torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1), device=m.device)).cpu().numpy()

    op = LinearOperator((n, n), matvec=product, dtype=np.float64)
    try:
        return float(eigsh(op, k=1, which="LA", return_eigenvectors=False, tol=1e-8, maxiter=_LANCZOS_RESTARTS,
                           v0=np.ones(n) / np.sqrt(n))[0])
    except ArpackNoConvergence:
        return _banded_lanczos(m, 4 * _BANDED_LANCZOS_STEPS)


def eigenvalue_defect(m, device: str | None = None) -> float:
    """The largest eigenvalue of an LMI matrix at a solver's answer, as reported (how infeasible the answer was):
    :func:`largest_eigenvalue`, except for block-tridiagonal matrices, where a fixed number of Lanczos steps
    (:data:`_BANDED_LANCZOS_STEPS`) replaces ARPACK's restarts. At an interior-point answer the top eigenvalues
    cluster near 0, where ARPACK's relative tolerance restarts for long (531 products on a 3,332-row LMI, 2.4 s of
    a 3.4 s check); the fixed steps give an estimate from below at a bounded cost. Nothing rigorous depends on it."""
    if isinstance(m, BlockTridiagonal):
        if not m.all_finite():
            return math.inf
        return _banded_lanczos(m, _BANDED_LANCZOS_STEPS) if m.shape[0] > 400 else _banded_top_eigenvalue(m)
    return largest_eigenvalue(m, device)


def negative_semidefinite_defect(m: np.ndarray, radius: float | EntrywiseBound, estimate: float | None = None,
                                 tries: int = 10, device: str | None = None, first: float | None = None,
                                 pattern: BlockPattern | None = None, try_zero: bool = True,
                                 zero_only: bool = False) -> float:
    """A rigorous ``delta >= 0`` with ``M <= delta I`` for every symmetric ``M`` within ``radius`` of ``m``.

    ``radius`` is a uniform entrywise bound (on the structurally non-zero entries) or an
    :class:`~lipbound.program.EntrywiseBound`. Tries ``delta = 0`` and a margin of Rump's shift first (enough
    when ``lambda_max(m) <= 0``, the usual case for solver answers: each try is one Cholesky factorisation, much
    cheaper than an eigenvalue estimate of a large LMI); then starts from a floating-point estimate of
    ``lambda_max(m)`` (``estimate``, or computed) plus the shift and enlarges the margin until
    :func:`rump_positive_definite` proves ``delta I - M`` positive definite. ``first`` is tried before anything
    else (e.g. the ``delta`` a saved certificate recorded; it is proved again, not trusted). ``pattern``: the block
    sparsity of ``m`` and of the matrices of interest (see :func:`rump_positive_definite`). ``try_zero=False``
    skips the ``delta = 0`` attempt (for matrices known to be singular up to rounding, e.g. after ``rho`` was
    re-optimised onto the boundary). ``zero_only=True`` tries ``delta = 0`` only (a proof of strict feasibility).

    Raises
    ------
    ArithmeticError
        If no ``delta`` could be proved (non-finite input, or no tried margin sufficed).
    """
    n = m.shape[0]
    if not _all_finite(m):
        raise ArithmeticError("the LMI matrix has non-finite entries.")
    if isinstance(m, BlockTridiagonal):
        pattern = m.pattern  # the stored blocks (a superset of any sparser pattern: larger, sound constants)
    if not isinstance(radius, EntrywiseBound):
        if not math.isfinite(radius):
            raise ArithmeticError("the rounding radius of the LMI is not finite.")
        radius = EntrywiseBound.uniform(radius, pattern, n)
    neg_diag = -_diagonal(m)
    tiny = np.finfo(float).tiny

    def excess(lam: float) -> float:
        # Rump's shift for delta I - M with delta ~ lam, in the coordinates of M: each row's shift (constant and
        # perturbation row sum, relative after equilibration) scaled back by that row's diagonal.
        diag = np.maximum(neg_diag + max(lam, 0.0), 0.0) + tiny
        e = equilibration_exponents(diag)
        sdiag = np.ldexp(diag, 2 * e)
        rows = radius.row_sums(np.ldexp(1.0, e)) + UNIT_ROUNDOFF * sdiag * 2
        local = np.ldexp(float(_rump_constant(sdiag, pattern)) + rows, -2 * e)
        return 1.25 * float(np.max(local))

    def proves(delta: float) -> bool:
        a = m.negated() if isinstance(m, BlockTridiagonal) else -m
        if isinstance(a, BlockTridiagonal):
            a.add_to_diagonal(delta)
        elif isinstance(a, torch.Tensor):
            a.diagonal().add_(delta)  # the same IEEE additions as below, where the matrix already is
        else:
            a[np.diag_indices(n)] += delta
        # Adding to the diagonal rounds once per entry: widen the bound by u |a_ii|.
        b = radius.with_diagonal(next_up(UNIT_ROUNDOFF * np.abs(_diagonal(a)) * (1 + 4 * UNIT_ROUNDOFF)))
        return rump_positive_definite(a, device=device, pattern=pattern, bound=b)

    if zero_only:
        if proves(0.0):
            return 0.0
        raise ArithmeticError("M < 0 (strict feasibility) could not be proved.")
    guesses = [] if first is None or not math.isfinite(first) or first < 0 else [first]
    if estimate is None:
        guesses += [0.0] if try_zero else []
        # Rump's shift alone covers a matrix that is negative semidefinite up to rounding; a shift that is not tiny
        # next to the matrix (rows that vanish at delta = 0 get extreme scalings) is no guess worth proving.
        shift = excess(0.0)
        if shift <= 2.0**-20 * float(np.max(np.abs(neg_diag), initial=0.0)):
            guesses.append(shift)
    for delta in guesses:
        delta = round_up(delta)
        if math.isfinite(delta) and proves(delta):
            return delta
    lam = largest_eigenvalue(m, device) if estimate is None else estimate
    if not math.isfinite(lam):
        raise ArithmeticError("the LMI matrix has non-finite eigenvalues.")
    margin = excess(lam)
    if not math.isfinite(margin):
        raise ArithmeticError("Rump's shift of the LMI matrix is not finite (entries near the overflow threshold).")
    candidates = [0.0] if lam + margin < 0 else []
    candidates += [max(lam, 0.0) + margin * 4.0**i for i in range(tries)]
    # An estimate from below by more than the margins (Lanczos on a block-tridiagonal matrix that ARPACK did not
    # converge on): relative enlargements up to twice the estimate.
    candidates += [max(lam, 0.0) * (1 + 2.0**-j) + margin for j in (12, 6, 3, 1, 0)] if lam > 0 else []
    for delta in candidates:
        delta = round_up(delta)
        if math.isfinite(delta) and proves(delta):
            return delta
    raise ArithmeticError(f"could not prove M <= delta I for any tried delta (lambda_max estimate {lam:.3e}).")


def _top_eigenvalue_psd(op, k: int, rtol: float) -> float | None:
    """Lanczos estimate of the largest eigenvalue of a PSD operator (matrix or LinearOperator); None if stuck."""
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    try:
        # A fixed start vector keeps the estimate (and what is derived from it) reproducible.
        lam = eigsh(op, k=1, which="LA", return_eigenvectors=False, tol=rtol, v0=np.ones(k) / np.sqrt(k),
                    maxiter=50 * k)[0]
    except ArpackNoConvergence:
        return None
    return max(float(lam), 0.0)


def spectral_norm_estimate(w: np.ndarray, rtol: float = 1e-13, gram: np.ndarray | None = None) -> float:
    """Floating-point estimate of ``||W||_2`` (not rigorous): Lanczos on the smaller Gram matrix for large ``W``
    (``O(mn)`` per step instead of a full SVD; ``gram``, that matrix if already formed), the SVD for small ones.

    Examples
    --------
    >>> round(spectral_norm_estimate(np.diag([3.0, 1.0])), 12)
    3.0
    """
    w = np.asarray(w, dtype=np.float64)
    k = min(w.shape, default=0)
    if k <= 64:
        return float(np.linalg.norm(w, 2)) if w.size else 0.0
    from scipy.sparse.linalg import LinearOperator

    if gram is not None:
        op = gram
    elif w.shape[1] <= w.shape[0]:
        op = LinearOperator((k, k), matvec=lambda v: w.T @ (w @ v), dtype=np.float64)
    else:
        op = LinearOperator((k, k), matvec=lambda v: w @ (w.T @ v), dtype=np.float64)
    lam = _top_eigenvalue_psd(op, k, rtol)
    return float(np.linalg.norm(w, 2)) if lam is None else float(np.sqrt(lam))


def spectral_norm_bound(w: np.ndarray) -> Fraction:
    """An exact rational upper bound on ``||W||_2`` at any magnitude (see :func:`spectral_norm_upper`).

    ``W`` is first scaled by a power of two so that its largest entry lies in ``[1/2, 1)``; entries that this
    pushes below the smallest subnormal are off by at most ``2^-1075`` each, added as their Frobenius norm.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.size == 0 or not np.any(w):
        return Fraction(0)
    if not np.all(np.isfinite(w)):
        raise ArithmeticError("the matrix has non-finite entries.")
    e = int(np.frexp(float(np.max(np.abs(w))))[1])
    scaled = np.ldexp(w, -e)
    lost = int(np.count_nonzero(np.ldexp(scaled, e) != w))
    bound = Fraction(_spectral_norm_upper_normalised(scaled))
    if lost:
        bound += Fraction(sqrt_up(lost)) * Fraction(1, 2**1074)
    return bound * Fraction(2) ** e


def frobenius_bound(x: np.ndarray) -> Fraction:
    """An exact rational upper bound on the Frobenius norm of ``x``, at any magnitude.

    Examples
    --------
    >>> float(frobenius_bound(np.array([3.0, 4.0]))) >= 5.0
    True
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or not np.any(x):
        return Fraction(0)
    if not np.all(np.isfinite(x)):
        raise ArithmeticError("the matrix has non-finite entries.")
    e = int(np.frexp(float(np.max(np.abs(x))))[1])
    scaled = np.ldexp(x, -e).ravel()
    lost = int(np.count_nonzero(np.ldexp(scaled, e) != x.ravel()))
    # Squares and their sum: relative error gamma_{n+1}, plus 2^-1074 per square that underflows, plus the entries
    # lost to scaling (each below 2^-1074 in scaled units).
    total = Fraction(math.fsum((scaled * scaled).tolist())) * (1 + 2 * Fraction(x.size + 4, 2**53))
    total += Fraction(x.size + lost, 2**1074)
    return Fraction(sqrt_up(total)) * Fraction(2) ** e


def spectral_norm_upper(w: np.ndarray) -> float:
    """A rigorous upper bound on the spectral norm ``||W||_2`` (within ~1e-7 relative of the true value), rounded
    up to a float (``inf`` beyond the float range).

    The floating-point estimate ``s`` is inflated to ``t`` and ``t^2 I - G`` (``G`` the smaller Gram
    matrix) is proved positive definite with Rump's test, accounting for the rounding in ``G``.
    Falls back to the Frobenius norm (rounded up) if the test fails.

    Examples
    --------
    >>> spectral_norm_upper(np.diag([3.0, 1.0])) >= 3.0
    True
    """
    return round_up(spectral_norm_bound(w))


def _spectral_norm_upper_normalised(w: np.ndarray) -> float:
    """:func:`spectral_norm_upper` for a matrix whose largest entry lies in ``[1/2, 1)``; products of tiny entries
    may underflow (absolute error ``2^-1074`` each, in the radius)."""
    g = w.T @ w if w.shape[1] <= w.shape[0] else w @ w.T
    g = np.tril(g) + np.tril(g, -1).T
    k = max(w.shape)
    row_norm_sq = float(np.max(np.sum(w * w, axis=0 if w.shape[1] <= w.shape[0] else 1)))
    radius = gamma(k + 2) * row_norm_sq * (1 + 1e-12) + (k + 2) * 2.0**-1074
    s = spectral_norm_estimate(w, gram=g)
    # The first margin leaves room for Rump's shift on t^2 I - G (each failed try costs a Cholesky factorisation).
    s2 = max(s * s, np.finfo(float).tiny)
    shift = rump_shift(np.maximum(s2 - np.diag(g), s2 * 1e-10), radius)
    first = min(1e-4, max(1e-10, shift / s2))
    for rel in [first] + [r for r in (1e-7, 1e-4) if r > first]:
        t = round_up(Fraction(s) * (1 + Fraction(rel)))
        t2 = round_up(Fraction(t) ** 2)
        a = -g
        a[np.diag_indices(a.shape[0])] += t2
        r = radius + UNIT_ROUNDOFF * float(np.max(np.abs(np.diag(a)))) * 2
        if rump_positive_definite(a, r):
            return t
    return sqrt_up(sum((Fraction(float(x)) ** 2 for x in w.ravel()), Fraction(0)))
