"""Exact checks of the quadratic constraints (QCs) behind lipbound's GroupSort and Householder support.

Run ``python -m theory.qc`` to print one PASS/FAIL line per check; the exit status is 1 if any check fails.

The QC under test (Pauli et al., ICLR 2024, arXiv:2401.14033, Lemmas 1-2; lipbound's reference notes
``formulations.md`` §2.3) is, for one group of size ``g`` with multipliers ``lam >= 0`` and free
``gam, tau, nu``::

    T = lam I + gam Pi,   S = tau Pi,   P = nu Pi,
    [dx; dphi]^T [[T - 2S, S + P], [S + P, -T - 2P]] [dx; dphi] >= 0   for all x, y,

with ``dx = x - y``, ``dphi = phi(x) - phi(y)``, and ``Pi = 1 1^T`` (GroupSort) or ``Pi = I - v v^T``
(Householder with unit ``v``). A layer's matrices are block diagonal over its groups, so the layer QC is the
sum of the per-group forms (checked by :func:`check_block_diagonal_split`) and one group suffices.

Every check returns a :class:`CheckResult` whose ``kind`` says how strong the evidence is:

``"proof"``
    A complete symbolic argument over all inputs: polynomial identities verified exactly by sympy (over the
    rationals, modulo ``v^T v = 1`` where a unit vector enters) plus a sign argument stated in ``details``, or
    an exact rational counterexample.
``"exact case analysis"``
    The same, but the input space is split into finitely many regions (pairs of orderings) and each region is
    checked exactly; the regions cover all inputs.
``"rigorous sampling"``
    Exact rational arithmetic at finitely many sample points: no rounding error, but only the sampled points
    are covered.

The polynomial work uses sympy's sparse polynomial rings (``sympy.polys.rings``) over QQ, which are exact and
fast enough for the 576 ordering pairs of group size 4.
"""

from __future__ import annotations

import itertools
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import sympy
from sympy.polys.domains import QQ
from sympy.polys.rings import PolyElement, ring

__all__ = [
    "CheckResult",
    "CHECKS",
    "check_groupsort_qc",
    "check_householder_qc",
    "check_block_diagonal_split",
    "check_maxmin_not_slope_restricted",
    "check_lipsdp_network_qc_invalid",
    "check_relu_neuron_qc_valid",
    "check_qc_rigorous_sampling",
    "qc_form_exact",
    "slope_qc_form_exact",
    "run_all",
    "main",
]

Matrix = list[list[Any]]


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one theory check.

    Attributes
    ----------
    name : str
        Short identifier, e.g. ``"groupsort_qc_size3"``.
    passed : bool
        Whether every step of the check succeeded.
    kind : str
        ``"proof"``, ``"exact case analysis"`` or ``"rigorous sampling"`` (see the module docstring).
    details : str
        Human-readable summary with the numbers behind the verdict.
    data : dict
        Machine-readable numbers (exact values as :class:`fractions.Fraction`, counts as int).
    """

    name: str
    passed: bool
    kind: str
    details: str
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One line for the command-line report."""
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}  [{self.kind}]  {self.details}"


# ------------------------------------------------------------------------------------------------------------
# Small exact linear algebra on nested lists (entries are ring elements or Fractions).
# ------------------------------------------------------------------------------------------------------------


def _dot(u: Sequence[Any], w: Sequence[Any], zero: Any = 0) -> Any:
    total = zero
    for ui, wi in zip(u, w, strict=True):
        total = total + ui * wi
    return total


def _matvec(matrix: Matrix, u: Sequence[Any], zero: Any = 0) -> list[Any]:
    return [_dot(row, u, zero) for row in matrix]


def _quadratic_form(matrix: Matrix, u: Sequence[Any], zero: Any = 0) -> Any:
    return _dot(u, _matvec(matrix, u, zero), zero)


def _identity(n: int, one: Any, zero: Any) -> Matrix:
    return [[one if i == j else zero for j in range(n)] for i in range(n)]


def _lincomb(*terms: tuple[Any, Matrix]) -> Matrix:
    """Entrywise sum of ``coefficient * matrix`` over ``terms``."""
    n = len(terms[0][1])
    return [[sum((c * m[i][j] for c, m in terms[1:]), terms[0][0] * terms[0][1][i][j]) for j in range(n)]
            for i in range(n)]


def _qc_matrix_from_blocks(t: Matrix, s: Matrix, p: Matrix) -> Matrix:
    """The QC matrix [[T - 2S, S + P], [S + P, -T - 2P]] from its multiplier blocks T, S, P."""
    n = len(t)
    top = [[t[i][j] - 2 * s[i][j] for j in range(n)] + [s[i][j] + p[i][j] for j in range(n)]
           for i in range(n)]
    bottom = [[s[i][j] + p[i][j] for j in range(n)] + [-t[i][j] - 2 * p[i][j] for j in range(n)]
              for i in range(n)]
    return top + bottom


def _qc_matrix(pi: Matrix, lam: Any, gam: Any, tau: Any, nu: Any, one: Any, zero: Any) -> Matrix:
    """The 2g x 2g QC matrix of one group: T = lam I + gam Pi, S = tau Pi, P = nu Pi."""
    eye = _identity(len(pi), one, zero)
    return _qc_matrix_from_blocks(_lincomb((lam, eye), (gam, pi)), _lincomb((tau, pi)), _lincomb((nu, pi)))


def _block_diag(blocks: Sequence[Matrix], zero: Any) -> Matrix:
    n = sum(len(b) for b in blocks)
    out = [[zero] * n for _ in range(n)]
    offset = 0
    for b in blocks:
        for i, row in enumerate(b):
            for j, entry in enumerate(row):
                out[offset + i][offset + j] = entry
        offset += len(b)
    return out


def _all_coefficients_nonnegative(poly: PolyElement) -> bool:
    return all(c >= 0 for c in poly.coeffs())


# ------------------------------------------------------------------------------------------------------------
# Exact evaluation helpers (also used by the tests as independent oracles).
# ------------------------------------------------------------------------------------------------------------


def qc_form_exact(
    dx: Sequence[Fraction],
    dphi: Sequence[Fraction],
    pis: Sequence[Matrix],
    multipliers: Sequence[tuple[Fraction, Fraction, Fraction, Fraction]],
) -> Fraction:
    """Exact value of the block-diagonal GroupSort/Householder QC form.

    Parameters
    ----------
    dx, dphi : sequences of Fraction
        ``x - y`` and ``phi(x) - phi(y)`` for a whole layer (all groups concatenated).
    pis : sequence of matrices
        ``Pi_j`` per group (``1 1^T`` or ``I - v_j v_j^T``), as nested lists of Fractions.
    multipliers : sequence of (lam, gam, tau, nu)
        Per-group multipliers.

    Returns
    -------
    Fraction
        ``[dx; dphi]^T [[T - 2S, S + P], [S + P, -T - 2P]] [dx; dphi]``.
    """
    total = Fraction(0)
    offset = 0
    for pi, (lam, gam, tau, nu) in zip(pis, multipliers, strict=True):
        g = len(pi)
        q = _qc_matrix(pi, lam, gam, tau, nu, Fraction(1), Fraction(0))
        u = list(dx[offset:offset + g]) + list(dphi[offset:offset + g])
        total += _quadratic_form(q, u, Fraction(0))
        offset += g
    if offset != len(dx) or offset != len(dphi):
        raise ValueError(f"groups cover {offset} features but dx has {len(dx)} and dphi has {len(dphi)}.")
    return total


def slope_qc_form_exact(
    dx: Sequence[Any], dphi: Sequence[Any], t: Matrix, alpha: Any = 0, beta: Any = 1
) -> Any:
    """LipSDP slope QC ``[dx; dphi]^T [[-2 a b T, (a + b) T], [(a + b) T, -2 T]] [dx; dphi]`` (exact)."""
    t_dx = _matvec(t, dx)
    t_dphi = _matvec(t, dphi)
    return -2 * alpha * beta * _dot(dx, t_dx) + 2 * (alpha + beta) * _dot(dx, t_dphi) - 2 * _dot(dphi, t_dphi)


def _maxmin(z: Sequence[Any]) -> list[Any]:
    """MaxMin with lipbound's ordering: each adjacent pair becomes (min, max)."""
    out: list[Any] = []
    for i in range(0, len(z), 2):
        out += [min(z[i], z[i + 1]), max(z[i], z[i + 1])]
    return out


def _relu(z: Sequence[Any]) -> list[Any]:
    return [max(zi, 0) for zi in z]


# ------------------------------------------------------------------------------------------------------------
# GroupSort: proof (g = 2) and exact case analysis (g = 3, 4).
# ------------------------------------------------------------------------------------------------------------


def check_groupsort_qc(group_size: int) -> CheckResult:
    """Verify the GroupSort QC for one group of ``group_size`` by exact case analysis over orderings.

    The pairs of orderings ``(pi_x, pi_y)`` (``g!^2`` of them) split ``R^g x R^g`` into regions
    ``{x_{pi_x(1)} <= ... <= x_{pi_x(g)}} x {y_{pi_y(1)} <= ...}`` that cover it; ties belong to several
    regions, which is harmless because every ordering consistent with a tie gives the same sorted vector. On a
    region ``sort(x) = (x_{pi_x(k)})_k`` is linear, so ``dphi`` is a fixed linear function of ``(x, y)``. In
    each region the check verifies, as polynomial identities over QQ in ``x, y, lam, gam, tau, nu``:

    1. ``form - lam * D == 0`` with ``D = |dx|^2 - |dphi|^2``: the gam, tau and nu terms vanish because
       sorting preserves the sum, ``1^T dphi = 1^T dx``.
    2. ``D == 2 (sum_k sort(x)_k sort(y)_k - sum_i x_i y_i)`` (sorting preserves norms).
    3. Substituting ``x_{pi_x(1)} = s``, ``x_{pi_x(k+1)} = x_{pi_x(k)} + a_k`` and likewise ``y`` with
       ``t, b_k`` (gaps ``a_k, b_k >= 0``, a parametrisation onto the region), ``D`` becomes a polynomial free
       of ``s, t`` whose coefficients are all ``>= 0``; hence ``D >= 0`` on the region (the rearrangement
       inequality).

    Together: ``form = lam * D >= 0`` for ``lam >= 0`` and any ``gam, tau, nu``. For ``g = 2`` the result is
    labelled a proof and additionally reports the factorisation of ``D`` in the mixed-order region.

    Parameters
    ----------
    group_size : int
        ``g`` (2, 3 or 4 are practical; the cost grows like ``(g!)^2``).

    Returns
    -------
    CheckResult
    """
    g = int(group_size)
    if g < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}.")
    names = ([f"x{i + 1}" for i in range(g)] + [f"y{i + 1}" for i in range(g)]
             + ["lam", "gam", "tau", "nu", "s"] + [f"a{k + 1}" for k in range(g - 1)]
             + ["t"] + [f"b{k + 1}" for k in range(g - 1)])
    r, *gens = ring(sympy.symbols(names), QQ)
    x, y = gens[:g], gens[g:2 * g]
    lam, gam, tau, nu, s = gens[2 * g:2 * g + 5]
    a = gens[2 * g + 5:3 * g + 4]
    t = gens[3 * g + 4]
    b = gens[3 * g + 5:]
    ones = [[r.one] * g for _ in range(g)]
    q = _qc_matrix(ones, lam, gam, tau, nu, r.one, r.zero)

    failures: list[str] = []
    max_terms = 0
    mixed_factorisations: list[str] = []
    for pi_x in itertools.permutations(range(g)):
        x_region = _region_point(pi_x, s, a)
        # Guard the ordering convention: at an interior point of the region (gaps 1), an ascending sort
        # must visit the coordinates in the order pi_x, i.e. sort(x) really is (x_{pi_x(k)})_k there.
        probe = _region_point(pi_x, 0, [1] * (g - 1))
        if sorted(range(g), key=probe.__getitem__) != list(pi_x):
            failures.append(f"ordering probe mismatch for {pi_x}")
        for pi_y in itertools.permutations(range(g)):
            y_region = _region_point(pi_y, t, b)
            sx, sy = [x[i] for i in pi_x], [y[i] for i in pi_y]
            dx = [xi - yi for xi, yi in zip(x, y, strict=True)]
            dphi = [u - w for u, w in zip(sx, sy, strict=True)]
            form = _quadratic_form(q, dx + dphi, r.zero)
            d = _dot(dx, dx, r.zero) - _dot(dphi, dphi, r.zero)
            if form - lam * d != 0:
                failures.append(f"form != lam*D for orderings {pi_x}, {pi_y}")
            if d - 2 * (_dot(sx, sy, r.zero) - _dot(x, y, r.zero)) != 0:
                failures.append(f"D != rearrangement gap for {pi_x}, {pi_y}")
            d_gaps = d.compose(list(zip(x, x_region, strict=True)) + list(zip(y, y_region, strict=True)))
            if d_gaps.degree(s) > 0 or d_gaps.degree(t) > 0 or not _all_coefficients_nonnegative(d_gaps):
                failures.append(f"D not a nonnegative-coefficient polynomial in the gaps for {pi_x}, {pi_y}")
            max_terms = max(max_terms, len(d_gaps.terms()))
            if g == 2 and pi_x == pi_y and d != 0:
                failures.append(f"D != 0 although x and y have the same order {pi_x}")
            if g == 2 and pi_x != pi_y:
                mixed_factorisations.append(f"{sympy.factor(d.as_expr())} = {d_gaps.as_expr()} "
                                            f"(x order {pi_x}, y order {pi_y})")

    cases = len(list(itertools.permutations(range(g)))) ** 2
    details = (f"g={g}: {cases} ordering pairs; in each, form == lam*D, D == 2(sum sort(x)sort(y) - sum xy), "
               f"and D in gap variables has <= {max_terms} monomials, all coefficients >= 0")
    if mixed_factorisations:
        details += ("; mixed orders: D = " + " and ".join(mixed_factorisations)
                    + ", a product of gaps >= 0 (same orders: D = 0)")
    if failures:
        details += "; FAILURES: " + "; ".join(failures[:5])
    return CheckResult(
        name=f"groupsort_qc_size{g}",
        passed=not failures,
        kind="proof" if g == 2 else "exact case analysis",
        details=details,
        data={"cases": cases, "failures": len(failures), "max_gap_monomials": max_terms},
    )


def _region_point(order: Sequence[int], base: Any, gaps: Sequence[Any]) -> list[Any]:
    """Coordinates of a point of the region ``z_{order[0]} <= z_{order[1]} <= ...`` from a base and gaps."""
    point: list[Any] = [None] * len(order)
    current = base
    for k, index in enumerate(order):
        point[index] = current
        if k < len(gaps):
            current = current + gaps[k]
    return point


# ------------------------------------------------------------------------------------------------------------
# Householder: symbolic proof with a symbolic unit vector.
# ------------------------------------------------------------------------------------------------------------


def check_householder_qc(dim: int) -> CheckResult:
    """Prove the Householder QC for one group of size ``dim`` with a symbolic unit vector ``v``.

    Everything is a polynomial in ``v, x, y`` and the multipliers; "``== 0`` mod the sphere" means the
    remainder on division by ``v^T v - 1`` is zero (i.e. ``v_1^2`` is replaced by ``1 - v_2^2 - ...``), so the
    identity holds for every unit ``v``. With ``H = I - 2 v v^T`` and ``Pi = I - v v^T`` the check verifies:

    * ``Pi H == Pi`` (so ``Pi sigma(z) = Pi z``, property P3), ``Pi^2 == Pi``, ``Pi^T == Pi``, ``H^T H == I``.
    * For each of the four sign cases of ``(v^T x > 0, v^T y > 0)``, where ``sigma`` is ``I`` or ``H`` on each
      side: ``form - lam * D == 0`` with ``D = |dx|^2 - |dphi|^2``; and ``D == 0`` in the two same-sign cases,
      ``D == -4 (v^T x)(v^T y)`` in the two mixed cases. In a mixed case ``v^T x`` and ``v^T y`` have opposite
      weak signs (one ``> 0``, the other ``<= 0``), so ``D >= 0``.

    Hence ``|sigma(x) - sigma(y)| <= |x - y|`` and ``form = lam * D >= 0`` for every unit ``v``, ``lam >= 0``
    and free ``gam, tau, nu``.

    Parameters
    ----------
    dim : int
        Group size (2 and 3 are run by :func:`run_all`).

    Returns
    -------
    CheckResult
    """
    n = int(dim)
    names = ([f"v{i + 1}" for i in range(n)] + [f"x{i + 1}" for i in range(n)]
             + [f"y{i + 1}" for i in range(n)] + ["lam", "gam", "tau", "nu"])
    r, *gens = ring(sympy.symbols(names), QQ)
    v, x, y = gens[:n], gens[n:2 * n], gens[2 * n:3 * n]
    lam, gam, tau, nu = gens[3 * n:]
    sphere = _dot(v, v, r.zero) - 1

    def on_sphere_zero(poly: PolyElement) -> bool:
        return poly.rem([sphere]) == 0

    eye = _identity(n, r.one, r.zero)
    h = [[eye[i][j] - 2 * v[i] * v[j] for j in range(n)] for i in range(n)]
    pi = [[eye[i][j] - v[i] * v[j] for j in range(n)] for i in range(n)]

    def matmul(m1: Matrix, m2: Matrix) -> Matrix:
        return [[_dot(m1[i], [m2[k][j] for k in range(n)], r.zero) for j in range(n)] for i in range(n)]

    failures: list[str] = []
    identities = {
        "Pi H == Pi": (matmul(pi, h), pi),
        "Pi^2 == Pi": (matmul(pi, pi), pi),
        "Pi^T == Pi": ([list(col) for col in zip(*pi, strict=True)], pi),
        "H^T H == I": (matmul([list(col) for col in zip(*h, strict=True)], h), eye),
    }
    for label, (lhs, rhs) in identities.items():
        if not all(on_sphere_zero(lhs[i][j] - rhs[i][j]) for i in range(n) for j in range(n)):
            failures.append(f"{label} fails")

    q = _qc_matrix(pi, lam, gam, tau, nu, r.one, r.zero)
    vx, vy = _dot(v, x, r.zero), _dot(v, y, r.zero)
    hx, hy = _matvec(h, x, r.zero), _matvec(h, y, r.zero)
    for x_positive, y_positive in itertools.product((True, False), repeat=2):
        sx = x if x_positive else hx
        sy = y if y_positive else hy
        dx = [xi - yi for xi, yi in zip(x, y, strict=True)]
        dphi = [u - w for u, w in zip(sx, sy, strict=True)]
        form = _quadratic_form(q, dx + dphi, r.zero)
        d = _dot(dx, dx, r.zero) - _dot(dphi, dphi, r.zero)
        case = f"(v^T x {'>' if x_positive else '<='} 0, v^T y {'>' if y_positive else '<='} 0)"
        if not on_sphere_zero(form - lam * d):
            failures.append(f"form != lam*D in case {case}")
        expected_d = r.zero if x_positive == y_positive else -4 * vx * vy
        if not on_sphere_zero(d - expected_d):
            failures.append(f"D has an unexpected value in case {case}")

    details = (f"dim={n}, v symbolic with v^T v = 1 reduced out: Pi H = Pi, Pi^2 = Pi, H^T H = I; "
               "4 sign cases: form == lam*D; D == 0 (same signs), D == -4 (v^T x)(v^T y) >= 0 (mixed signs)")
    if failures:
        details += "; FAILURES: " + "; ".join(failures)
    return CheckResult(name=f"householder_qc_dim{n}", passed=not failures, kind="proof", details=details,
                       data={"failures": len(failures)})


def check_block_diagonal_split() -> CheckResult:
    """Prove that a layer's QC form is the sum of its groups' forms (block-diagonal multipliers).

    Checked as polynomial identities in generic ``dx, dphi`` and per-group multipliers, for three MaxMin
    groups (``Pi_j = 1 1^T``) and for two Householder groups of size 2 with independent symbolic vectors
    (``Pi_j = I - v_j v_j^T``; no unit-norm condition is needed for this identity). This is what lets the
    per-group checks above cover whole layers.

    Returns
    -------
    CheckResult
    """
    failures: list[str] = []
    layouts: list[tuple[str, int, int]] = [("MaxMin", 3, 2), ("Householder", 2, 2)]
    for label, num_groups, g in layouts:
        n = num_groups * g
        names = ([f"u{i}" for i in range(n)] + [f"w{i}" for i in range(n)]
                 + [f"{m}{j}" for j in range(num_groups) for m in ("lam", "gam", "tau", "nu")]
                 + [f"v{j}_{i}" for j in range(num_groups) for i in range(g)])
        r, *gens = ring(sympy.symbols(names), QQ)
        u, w = gens[:n], gens[n:2 * n]
        mult = [gens[2 * n + 4 * j:2 * n + 4 * j + 4] for j in range(num_groups)]
        vecs = [gens[2 * n + 4 * num_groups + g * j:2 * n + 4 * num_groups + g * (j + 1)]
                for j in range(num_groups)]
        pis = []
        for j in range(num_groups):
            if label == "MaxMin":
                pis.append([[r.one] * g for _ in range(g)])
            else:
                pis.append([[(r.one if i == k else r.zero) - vecs[j][i] * vecs[j][k] for k in range(g)]
                            for i in range(g)])
        # Whole-layer matrices T, S, P assembled block-diagonally, then the 2n x 2n QC matrix.
        eye = _identity(g, r.one, r.zero)
        t = _block_diag([_lincomb((m[0], eye), (m[1], p)) for m, p in zip(mult, pis, strict=True)], r.zero)
        s = _block_diag([_lincomb((m[2], p)) for m, p in zip(mult, pis, strict=True)], r.zero)
        p_ = _block_diag([_lincomb((m[3], p)) for m, p in zip(mult, pis, strict=True)], r.zero)
        q = _qc_matrix_from_blocks(t, s, p_)
        layer_form = _quadratic_form(q, list(u) + list(w), r.zero)
        group_sum = r.zero
        for j in range(num_groups):
            block = slice(j * g, (j + 1) * g)
            qj = _qc_matrix(pis[j], *mult[j], r.one, r.zero)
            group_sum += _quadratic_form(qj, list(u[block]) + list(w[block]), r.zero)
        if layer_form != group_sum:
            failures.append(label)
    details = "layer form == sum of group forms for 3 MaxMin groups and 2 Householder groups (size 2)"
    if failures:
        details += "; FAILURES: " + ", ".join(failures)
    return CheckResult(name="qc_block_diagonal_split", passed=not failures, kind="proof", details=details,
                       data={"failures": len(failures)})


# ------------------------------------------------------------------------------------------------------------
# Counterexamples: MaxMin is not slope-restricted; LipSDP-Network's coupled QC is invalid.
# ------------------------------------------------------------------------------------------------------------

#: MaxMin pair that violates the [0, 1] slope QC for every nonzero diagonal T >= 0.
MAXMIN_SLOPE_COUNTEREXAMPLE = ((Fraction(3), Fraction(0)), (Fraction(1), Fraction(2)))


def check_maxmin_not_slope_restricted() -> CheckResult:
    """Prove that MaxMin violates the LipSDP slope QC for every nonzero diagonal ``T >= 0``.

    One exact pair does it: ``x = (3, 0)``, ``y = (1, 2)`` gives ``MaxMin(x) = (0, 3)``,
    ``MaxMin(y) = (1, 2)``, so ``dx = (2, -2) = -2 dphi`` with ``dphi = (-1, 1)``. The slope-[0, 1] form is
    then ``2 dx^T T dphi - 2 dphi^T T dphi = -6 dphi^T T dphi = -6 (t1 + t2)`` for ``T = diag(t1, t2)``,
    which is ``< 0`` whenever ``t1, t2 >= 0`` are not both zero: this single pair's violating set is all
    nonzero diagonal ``T >= 0``. The check also evaluates the form for a general slope range
    ``[alpha, beta]`` symbolically: ``-2 (2 alpha + 1)(2 beta + 1)(t1 + t2)``, negative for every range with
    ``beta >= alpha > -1/2``; and for a full symmetric ``T`` (the LipSDP-Network class) it is
    ``-6 dphi^T T dphi``, negative unless ``(1, -1)^T T (1, -1) = 0``.

    Returns
    -------
    CheckResult
    """
    t1, t2, t12, alpha, beta = sympy.symbols("t1 t2 t12 alpha beta")
    (x, y) = MAXMIN_SLOPE_COUNTEREXAMPLE
    xs, ys = [sympy.Rational(c) for c in x], [sympy.Rational(c) for c in y]
    dx = [u - w for u, w in zip(xs, ys, strict=True)]
    dphi = [u - w for u, w in zip(_maxmin(xs), _maxmin(ys), strict=True)]
    diag_t = [[t1, 0], [0, t2]]
    form_01 = sympy.expand(slope_qc_form_exact(dx, dphi, diag_t))
    form_ab = sympy.factor(slope_qc_form_exact(dx, dphi, diag_t, alpha, beta))
    full_t = [[t1, t12], [t12, t2]]
    form_full = sympy.expand(slope_qc_form_exact(dx, dphi, full_t))
    checks = {
        "form == -6(t1 + t2)": sympy.expand(form_01 + 6 * (t1 + t2)) == 0,
        "general range == -2(2a+1)(2b+1)(t1+t2)":
            sympy.expand(form_ab + 2 * (2 * alpha + 1) * (2 * beta + 1) * (t1 + t2)) == 0,
        "full T == -6 dphi^T T dphi": sympy.expand(form_full + 6 * (t1 + t2 - 2 * t12)) == 0,
        # -6(t1 + t2) < 0 on the nonzero nonnegative orthant: both coefficients are negative.
        "negative on nonzero T >= 0": all(c < 0 for c in sympy.Poly(form_01, t1, t2).coeffs())
        and sympy.Poly(form_01, t1, t2).degree() == 1 and form_01.subs({t1: 0, t2: 0}) == 0,
    }
    failures = [k for k, ok in checks.items() if not ok]
    coefficients = tuple(Fraction(str(form_01.coeff(symbol))) for symbol in (t1, t2))
    examples = {label: Fraction(str(form_01.subs({t1: a1, t2: a2}))) for label, (a1, a2) in
                {"T=diag(1,0)": (1, 0), "T=diag(0,1)": (0, 1), "T=I": (1, 1)}.items()}
    details = (f"x=(3,0), y=(1,2): dx=(2,-2), dphi=(-1,1); slope-[0,1] form = {form_01} < 0 for all nonzero "
               f"diagonal T >= 0 (e.g. {', '.join(f'{k}: {v}' for k, v in examples.items())}); "
               f"slope [alpha,beta]: {form_ab}; full T: {form_full}")
    if failures:
        details += "; FAILURES: " + ", ".join(failures)
    return CheckResult(
        name="maxmin_not_slope_restricted", passed=not failures, kind="proof", details=details,
        data={"x": x, "y": y, "form_coefficients": coefficients, **examples},
    )


#: Rational version of the float counterexample in formulations.md §1.2, and a simpler integer one.
LIPSDP_NETWORK_COUNTEREXAMPLES = {
    "notes_example": ((Fraction(-736, 1000), Fraction(-163, 1000)),
                      (Fraction(-482, 1000), Fraction(599, 1000))),
    "integer_example": ((Fraction(-1), Fraction(0)), (Fraction(0), Fraction(1))),
}


def check_lipsdp_network_qc_invalid() -> CheckResult:
    """Prove that LipSDP-Network's coupled multiplier ``T = (e1 - e2)(e1 - e2)^T`` is invalid for ReLU.

    With ``alpha = 0, beta = 1`` the form is ``2 dx^T T dphi - 2 dphi^T T dphi = 2 d (e - d)`` where
    ``d = dphi_1 - dphi_2`` and ``e = dx_1 - dx_2``; it is negative whenever ``d`` and ``e - d`` have
    opposite signs, which happens because the two neurons' difference quotients can differ. Two exact pairs
    are evaluated: the rational rounding of the float example in the reference notes
    (``x = (-0.736, -0.163)``, ``y = (-0.482, 0.599)``), and ``x = (-1, 0)``, ``y = (0, 1)``, where both
    inputs move by the same amount but only one ReLU output changes.

    Returns
    -------
    CheckResult
    """
    t = [[Fraction(1), Fraction(-1)], [Fraction(-1), Fraction(1)]]
    # The closed form 2 d (e - d) of the coupled form, as a polynomial identity in generic dx, dphi.
    sdx, sdphi = sympy.symbols("dx1 dx2"), sympy.symbols("dphi1 dphi2")
    d_sym, e_sym = sdphi[0] - sdphi[1], sdx[0] - sdx[1]
    closed_form_ok = sympy.expand(slope_qc_form_exact(sdx, sdphi, [[1, -1], [-1, 1]])
                                  - 2 * d_sym * (e_sym - d_sym)) == 0
    values: dict[str, Fraction] = {}
    for label, (x, y) in LIPSDP_NETWORK_COUNTEREXAMPLES.items():
        dx = [u - w for u, w in zip(x, y, strict=True)]
        dphi = [u - w for u, w in zip(_relu(x), _relu(y), strict=True)]
        values[label] = slope_qc_form_exact(dx, dphi, t, Fraction(0), Fraction(1))
    passed = closed_form_ok and all(v < 0 for v in values.values())
    parts = [f"{label}: x={_fmt(x)}, y={_fmt(y)} -> form = {values[label]} = {float(values[label]):.6g}"
             for label, (x, y) in LIPSDP_NETWORK_COUNTEREXAMPLES.items()]
    details = ("ReLU, alpha=0, beta=1, T=(e1-e2)(e1-e2)^T, form = 2d(e-d) with d = dphi1-dphi2, "
               f"e = dx1-dx2 (identity {'verified' if closed_form_ok else 'FAILED'}): " + "; ".join(parts)
               + " (all < 0)")
    return CheckResult(name="lipsdp_network_qc_invalid", passed=passed, kind="proof", details=details,
                       data=dict(values))


def _fmt(vector: Sequence[Fraction]) -> str:
    return "(" + ", ".join(str(c) for c in vector) + ")"


def check_relu_neuron_qc_valid() -> CheckResult:
    """Prove the contrast case: the diagonal (LipSDP-Neuron) slope-[0, 1] QC is valid for ReLU.

    The diagonal form is ``2 sum_i t_i dphi_i (dx_i - dphi_i)``, so it suffices that each scalar term
    ``g(a, b) = (relu(a) - relu(b)) (a - b - relu(a) + relu(b)) >= 0``. The four sign cases of ``(a, b)`` are
    parametrised by nonnegative ``p, q`` (``a = p`` or ``-p``, ``b = q`` or ``-q``); in each, ``g`` is a
    polynomial in ``p, q`` with nonnegative coefficients.

    Returns
    -------
    CheckResult
    """
    p, q = sympy.symbols("p q", nonnegative=True)
    failures = []
    expressions = []
    for a, relu_a in ((p, p), (-p, 0)):
        for b, relu_b in ((q, q), (-q, 0)):
            g = sympy.expand((relu_a - relu_b) * (a - b - relu_a + relu_b))
            expressions.append(str(g))
            if g != 0 and not all(c >= 0 for c in sympy.Poly(g, p, q).coeffs()):
                failures.append(str(g))
    return CheckResult(name="relu_neuron_qc_valid", passed=not failures, kind="proof",
                       details="per-neuron term over the 4 sign cases = " + ", ".join(expressions)
                       + " (each >= 0 for p, q >= 0)", data={"failures": len(failures)})


# ------------------------------------------------------------------------------------------------------------
# Rigorous sampling in exact rational arithmetic, including sizes beyond the case analysis (FullSort 8).
# ------------------------------------------------------------------------------------------------------------

# Rational unit vectors from Pythagorean quadruples (a^2 + b^2 + c^2 = d^2), so Householder stays exact.
_PYTHAGOREAN_QUADRUPLES = ((1, 2, 2, 3), (2, 3, 6, 7), (2, 6, 9, 11), (1, 4, 8, 9), (4, 4, 7, 9),
                           (2, 10, 11, 15))


def _random_rational(rng: random.Random) -> Fraction:
    return Fraction(rng.randint(-40, 40), rng.choice((1, 2, 3, 4, 5, 7, 8)))


def _random_unit_vector_3(rng: random.Random) -> list[Fraction]:
    a, b, c, d = rng.choice(_PYTHAGOREAN_QUADRUPLES)
    entries = [Fraction(a, d), Fraction(b, d), Fraction(c, d)]
    rng.shuffle(entries)
    return [e * rng.choice((-1, 1)) for e in entries]


def _householder_exact(z: Sequence[Fraction], vectors: Sequence[Sequence[Fraction]]) -> list[Fraction]:
    out: list[Fraction] = []
    g = len(vectors[0])
    for j, v in enumerate(vectors):
        block = list(z[j * g:(j + 1) * g])
        proj = sum((vi * bi for vi, bi in zip(v, block, strict=True)), Fraction(0))
        out += block if proj > 0 else [bi - 2 * proj * vi for vi, bi in zip(v, block, strict=True)]
    return out


def _groupsort_exact(z: Sequence[Fraction], g: int) -> list[Fraction]:
    return [c for j in range(0, len(z), g) for c in sorted(z[j:j + g])]


def check_qc_rigorous_sampling(samples: int = 150, seed: int = 0) -> CheckResult:
    """Evaluate the QC exactly (``fractions.Fraction``) at random rational points and multipliers.

    Layers: MaxMin with 3 groups (n = 6), GroupSort 4 with 2 groups (n = 8), FullSort 8 (beyond the exact
    case analysis, which would need 8!^2 regions), and Householder with 2 groups of size 3 and rational unit
    vectors. Points include ties (repeated coordinates, for GroupSort) and points exactly on the reflection
    boundary ``v^T x = 0`` (for Householder). At every point the check asserts ``form == sum_j lam_j D_j``
    and ``D_j >= 0`` per group, with no rounding.

    Parameters
    ----------
    samples : int
        Points per layer.
    seed : int
        Seed of the deterministic generator.

    Returns
    -------
    CheckResult
    """
    rng = random.Random(seed)
    failures: list[str] = []
    worst_ratio: dict[str, Fraction] = {}
    layers: list[tuple[str, int, int]] = [("MaxMin n=6", 2, 3), ("GroupSort4 n=8", 4, 2),
                                          ("FullSort n=8", 8, 1), ("Householder3 n=6", 3, 2)]
    for label, g, num_groups in layers:
        n = g * num_groups
        vectors = [_random_unit_vector_3(rng) for _ in range(num_groups)] if label.startswith("House") else []
        for sample in range(samples):
            x = [_random_rational(rng) for _ in range(n)]
            y = [_random_rational(rng) for _ in range(n)]
            if sample % 3 == 1 and n > 1:
                # Force ties (GroupSort) or boundary points (Householder) that random rationals rarely hit.
                if vectors:
                    v = vectors[0]
                    proj = sum((vi * xi for vi, xi in zip(v, x[:g], strict=True)), Fraction(0))
                    x[:g] = [xi - proj * vi for vi, xi in zip(v, x[:g], strict=True)]
                else:
                    x[1] = x[0]
                    y[-1] = y[0]
            if vectors:
                fx, fy = _householder_exact(x, vectors), _householder_exact(y, vectors)
                pis = [[[Fraction(int(i == k)) - v[i] * v[k] for k in range(g)] for i in range(g)]
                       for v in vectors]
            else:
                fx, fy = _groupsort_exact(x, g), _groupsort_exact(y, g)
                pis = [[[Fraction(1)] * g for _ in range(g)] for _ in range(num_groups)]
            mults = [(abs(_random_rational(rng)), _random_rational(rng), _random_rational(rng),
                      _random_rational(rng)) for _ in range(num_groups)]
            dx = [u - w for u, w in zip(x, y, strict=True)]
            dphi = [u - w for u, w in zip(fx, fy, strict=True)]
            form = qc_form_exact(dx, dphi, pis, mults)
            expected = Fraction(0)
            for j in range(num_groups):
                block = slice(j * g, (j + 1) * g)
                d = (sum((c * c for c in dx[block]), Fraction(0))
                     - sum((c * c for c in dphi[block]), Fraction(0)))
                if d < 0:
                    failures.append(f"{label}: D < 0 at sample {sample}")
                expected += mults[j][0] * d
            if form != expected:
                failures.append(f"{label}: form != sum lam_j D_j at sample {sample}")
            norm_dx = sum((c * c for c in dx), Fraction(0))
            if norm_dx > 0:
                ratio = form / norm_dx
                worst_ratio[label] = min(worst_ratio.get(label, ratio), ratio)
    details = (f"{samples} exact samples per layer; min form/|dx|^2: "
               + ", ".join(f"{k}: {float(v):.3g}" for k, v in worst_ratio.items()))
    if failures:
        details += "; FAILURES: " + "; ".join(failures[:5])
    return CheckResult(name="qc_rigorous_sampling", passed=not failures, kind="rigorous sampling",
                       details=details, data={"samples_per_layer": samples, "min_ratio": worst_ratio,
                                              "failures": len(failures)})


# ------------------------------------------------------------------------------------------------------------
# Driver.
# ------------------------------------------------------------------------------------------------------------

#: Every check, by name, in report order.
CHECKS: dict[str, Callable[[], CheckResult]] = {
    "groupsort_qc_size2": lambda: check_groupsort_qc(2),
    "groupsort_qc_size3": lambda: check_groupsort_qc(3),
    "groupsort_qc_size4": lambda: check_groupsort_qc(4),
    "householder_qc_dim2": lambda: check_householder_qc(2),
    "householder_qc_dim3": lambda: check_householder_qc(3),
    "qc_block_diagonal_split": check_block_diagonal_split,
    "maxmin_not_slope_restricted": check_maxmin_not_slope_restricted,
    "lipsdp_network_qc_invalid": check_lipsdp_network_qc_invalid,
    "relu_neuron_qc_valid": check_relu_neuron_qc_valid,
    "qc_rigorous_sampling": check_qc_rigorous_sampling,
}


def run_all() -> list[CheckResult]:
    """Run every check in :data:`CHECKS` and return the results in order."""
    return [check() for check in CHECKS.values()]


def main() -> int:
    """Print one PASS/FAIL line per check; return 0 if all pass, else 1.

    Examples
    --------
    ``python -m theory.qc``
    """
    results = run_all()
    for result in results:
        print(result.line())
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
