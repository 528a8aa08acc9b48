"""Symbolic derivation of the global slope ranges of the scalar activations of :mod:`lipbound.slopes`.

For a piecewise-smooth activation the closure of its difference quotients over ``R`` is
``[inf phi', sup phi']``. On each smooth piece ``(a, b)`` the extremes of ``phi'`` are attained at a
critical point (``phi'' = 0``) or approached at an end of the piece, so the range is the hull of

* the one-sided limits of ``phi'`` at the piece ends (``+-oo`` and kinks), computed by
  :func:`sympy.limit` (at a kink the two one-sided limits span the Clarke derivative), and
* ``phi'`` at the roots of ``phi''`` in ``(a, b)``: solved exactly by :func:`sympy.solve` where a
  closed form exists (tanh, sigmoid, GELU: ``x = +-sqrt(2)``), and in every case located by a sign
  scan of ``phi''`` and polished by :func:`sympy.nsolve` at ``DPS`` digits (the numeric roots are
  cross-checked against the exact ones).

The result is compared with :func:`lipbound.slopes.global_slope_bounds`: PASS when both ends agree to
``1e-8`` *and* the library interval contains the high-precision one (soundness).

Run ``python -m theory.slopes`` to print the table; the exit status is 1 if any row FAILs.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import mpmath
import sympy as sp

from lipbound.slopes import global_slope_bounds

#: Working precision (decimal digits) of nsolve and of the reported values.
DPS = 50
#: Agreement required between the symbolic range and the library range.
TOLERANCE = 1e-8
#: The sign scan of phi'' covers [-SCAN, SCAN] (intersected with each piece) with step 1/16.
SCAN = 40

x = sp.Symbol("x", real=True)


@dataclass(frozen=True)
class Piece:
    """``phi = expr`` on the open interval ``(a, b)`` (ends may be ``+-oo``)."""

    expr: sp.Expr
    a: sp.Expr
    b: sp.Expr


@dataclass(frozen=True)
class Derivation:
    """Symbolic global slope range of one activation.

    Attributes
    ----------
    name, params : the activation as passed to :func:`lipbound.slopes.global_slope_bounds`.
    lower, upper : high-precision (``DPS`` digits) ends of ``[inf phi', sup phi']``.
    lower_form, upper_form : exact sympy form of the ends where one was found, else ``None``.
    critical_points : roots of ``phi''`` found (high precision).
    """

    name: str
    params: dict = field(hash=False)
    lower: mpmath.mpf = field(hash=False)
    upper: mpmath.mpf = field(hash=False)
    lower_form: sp.Expr | None = None
    upper_form: sp.Expr | None = None
    critical_points: tuple = ()


def _mp(e: sp.Expr) -> mpmath.mpf:
    with mpmath.workdps(DPS + 10):
        return mpmath.mpf(sp.N(e, DPS + 10))


def _numeric_roots(d2: sp.Expr, a: sp.Expr, b: sp.Expr) -> list[mpmath.mpf]:
    """Roots of ``d2`` in ``(a, b)``: sign changes on a 1/16 grid, polished by nsolve."""
    lo = max(float(a), -SCAN) if a != -sp.oo else -SCAN
    hi = min(float(b), SCAN) if b != sp.oo else SCAN
    f = sp.lambdify(x, d2, "mpmath")
    roots = []
    with mpmath.workdps(DPS):
        grid = [mpmath.mpf(lo) + mpmath.mpf(k) / 16 for k in range(1, int((hi - lo) * 16))]
        values = [f(g) for g in grid]
        for g0, g1, v0, v1 in zip(grid[:-1], grid[1:], values[:-1], values[1:], strict=True):
            if v0 == 0:
                roots.append(g0)
            elif v0 * v1 < 0:
                r = sp.nsolve(d2, x, (g0, g1), solver="anderson", prec=DPS)
                r = mpmath.mpf(sp.N(r, DPS))
                if not g0 <= r <= g1:
                    raise ArithmeticError(f"nsolve left the bracket [{g0}, {g1}]")
                roots.append(r)
    return roots


def derive(name: str, pieces: list[Piece], params: dict | None = None,
           exact_roots: bool = False, simplify: bool = True) -> Derivation:
    """Global slope range of the piecewise activation given by ``pieces``.

    Parameters
    ----------
    name : str
        Activation name in :mod:`lipbound.slopes`.
    pieces : list of Piece
        Smooth pieces covering ``R`` up to finitely many kinks.
    params : dict, optional
        Parameters for :func:`lipbound.slopes.global_slope_bounds`.
    exact_roots : bool
        Also solve ``phi'' = 0`` exactly with :func:`sympy.solve` and report closed forms.
    simplify : bool
        Simplify ``phi''`` first (minutes for the tanh form of GELU, where the numeric root search does not need
        it).

    Returns
    -------
    Derivation

    Examples
    --------
    >>> d = derive("tanh", [Piece(sp.tanh(x), -sp.oo, sp.oo)], exact_roots=True)
    >>> d.lower_form, d.upper_form
    (0, 1)
    """
    candidates: list[tuple[sp.Expr | None, mpmath.mpf]] = []
    critical: list[mpmath.mpf] = []
    for piece in pieces:
        d1 = sp.diff(piece.expr, x)
        d2 = sp.diff(d1, x)
        d2 = sp.simplify(d2) if simplify else d2
        for end, direction in ((piece.a, "+"), (piece.b, "-")):
            lim = sp.limit(d1, x, end, dir=direction)
            candidates.append((lim, _mp(lim)))
        if d2 == 0:
            continue
        numeric = _numeric_roots(d2, piece.a, piece.b)
        if exact_roots:
            exact = [r for r in sp.solve(d2, x) if r.is_real and bool(piece.a < r) and bool(r < piece.b)]
            if len(exact) != len(numeric):
                raise ArithmeticError(f"{name}: exact roots {exact} disagree with numeric roots {numeric}")
            for r, n in zip(sorted(exact, key=_mp), numeric, strict=True):
                with mpmath.workdps(DPS):
                    far = abs(_mp(r) - n) > mpmath.mpf(10) ** (-DPS // 2)
                if far:
                    raise ArithmeticError(f"{name}: exact root {r} disagrees with numeric root {n}")
            for r in exact:
                value = sp.nsimplify(sp.simplify(d1.subs(x, r)))
                candidates.append((value, _mp(value)))
                critical.append(_mp(r))
        else:
            with mpmath.workdps(DPS):
                f1 = sp.lambdify(x, d1, "mpmath")
                for r in numeric:
                    candidates.append((None, f1(r)))
                    critical.append(r)
    low = min(candidates, key=lambda c: c[1])
    high = max(candidates, key=lambda c: c[1])
    return Derivation(name, dict(params or {}), low[1], high[1], low[0], high[0], tuple(sorted(critical)))


def _pieces_at_zero(left: sp.Expr, right: sp.Expr) -> list[Piece]:
    return [Piece(left, -sp.oo, sp.Integer(0)), Piece(right, sp.Integer(0), sp.oo)]


@functools.cache
def derive_all() -> tuple[Derivation, ...]:
    """Derivations of every activation (and a few parameter values) of :mod:`lipbound.slopes`.

    Returns
    -------
    tuple of Derivation

    Examples
    --------
    >>> {d.name for d in derive_all()} >= {"gelu", "silu", "mish"}
    True
    """
    r = sp.Rational
    softplus = sp.log(1 + sp.exp(x))
    out = [
        derive("relu", _pieces_at_zero(sp.Integer(0), x)),
        derive("leaky_relu", _pieces_at_zero(r(0.01) * x, x), {"negative_slope": 0.01}),
        derive("leaky_relu", _pieces_at_zero(-r(1, 2) * x, x), {"negative_slope": -0.5}),
        derive("leaky_relu", _pieces_at_zero(2 * x, x), {"negative_slope": 2.0}),
        derive("identity", [Piece(x, -sp.oo, sp.oo)]),
        derive("tanh", [Piece(sp.tanh(x), -sp.oo, sp.oo)], exact_roots=True),
        derive("sigmoid", [Piece(1 / (1 + sp.exp(-x)), -sp.oo, sp.oo)], exact_roots=True),
        derive("elu", _pieces_at_zero(sp.exp(x) - 1, x), {"alpha": 1.0}),
        derive("elu", _pieces_at_zero(2 * (sp.exp(x) - 1), x), {"alpha": 2.0}),
        derive("elu", _pieces_at_zero(r(1, 2) * (sp.exp(x) - 1), x), {"alpha": 0.5}),
        derive("softplus", [Piece(softplus, -sp.oo, sp.oo)], {"beta": 1.0}, exact_roots=True),
        derive("softplus", [Piece(sp.log(1 + sp.exp(3 * x)) / 3, -sp.oo, sp.oo)], {"beta": 3.0},
               exact_roots=True),
        derive("gelu", [Piece(x * (1 + sp.erf(x / sp.sqrt(2))) / 2, -sp.oo, sp.oo)], exact_roots=True),
        # x (1 + tanh u) / 2 written as x / (1 + e^{-2u}): phi'' keeps its tiny tails instead of cancelling to 0.
        derive("gelu_tanh", [Piece(x / (1 + sp.exp(-2 * sp.sqrt(2 / sp.pi) * (x + r(44715, 10**6) * x**3))),
                                   -sp.oo, sp.oo)], simplify=False),
        derive("silu", [Piece(x / (1 + sp.exp(-x)), -sp.oo, sp.oo)]),
        derive("mish", [Piece(x * sp.tanh(softplus), -sp.oo, sp.oo)]),
        derive("polyrelu", _pieces_at_zero(r(3, 10), r(3, 10) + r(3, 4) * x),
               {"coefficients": (0.3, 0.75)}),
        derive("polyrelu", _pieces_at_zero(sp.Integer(0), -r(1, 2) * x), {"coefficients": (0.0, -0.5)}),
    ]
    return tuple(out)


def check(d: Derivation) -> tuple[bool, float, float]:
    """Compare a derivation with the library: ``(passed, alpha_lib, beta_lib)``.

    Examples
    --------
    >>> check(derive_all()[0])
    (True, 0.0, 1.0)
    """
    lo, hi = global_slope_bounds(d.name, **d.params)
    close = abs(float(d.lower) - lo) <= TOLERANCE and abs(float(d.upper) - hi) <= TOLERANCE
    with mpmath.workdps(DPS):
        contains = mpmath.mpf(lo) <= d.lower and mpmath.mpf(hi) >= d.upper
    return bool(close and contains), lo, hi


def main() -> int:
    """Print the table of derived global slope ranges; return 1 if any row fails."""
    header = f"{'activation':<34}{'alpha (symbolic)':>24}{'beta (symbolic)':>24}{'alpha (lib)':>25}" \
             f"{'beta (lib)':>25}  status"
    print(header)
    print("-" * len(header))
    failed = 0
    for d in derive_all():
        ok, lo, hi = check(d)
        failed += not ok
        label = d.name + (f"({', '.join(f'{k}={v}' for k, v in d.params.items())})" if d.params else "")
        print(f"{label:<34}{mpmath.nstr(d.lower, 18):>24}{mpmath.nstr(d.upper, 18):>24}"
              f"{lo!r:>25}{hi!r:>25}  {'PASS' if ok else 'FAIL'}")
    print()
    for d in derive_all():
        if d.critical_points:
            pts = ", ".join(mpmath.nstr(c, 20) for c in d.critical_points)
            forms = ""
            if d.lower_form is not None or d.upper_form is not None:
                forms = f"; exact: [{d.lower_form}, {d.upper_form}]"
            print(f"{d.name}: phi'' = 0 at x = {pts}{forms}")
    print(f"\n{len(derive_all()) - failed}/{len(derive_all())} PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
