"""Machine checks of the PolyCom theory (Zhuo et al., ICLR 2025, arXiv:2411.03884, Section 3).

The paper's statements were not available verbatim (see ``shared/reference/polycom.md``); the statements
below are the reconstructions given there, and every check says which of its parts is an **exact proof**
(sympy case analysis or exact rational arithmetic, valid for all inputs it covers) and which is a
**measurement** (floating-point evaluation on grids or samples, evidence but not proof).

Network model used by the constructions
---------------------------------------
A network is a DAG of *units*; unit ``k`` computes ``sigma(w_k . v + b_k)`` where ``v`` holds the inputs
and all earlier units (skip connections are allowed, as in Yarotsky 2017). ``sigma`` is either plain ReLU
or a PolyReLU ``sigma_a(z) = sum_i a_i relu(z)**i`` whose coefficient vector ``a`` may differ between units
(``a = e_1`` is ReLU, ``a = e_2`` squared ReLU). :func:`check_lemma1_shared_coefficients` shows that one
shared vector per layer (the paper's implementation) recovers every ``relu**i`` exactly from ``r``
rescaled units, so sizes change by a constant factor only. The output is an affine function of all
values. *Size* is the number of units; the number of nonzero weights is reported too.

Checks (each returns a :class:`CheckResult`)
--------------------------------------------
* :func:`check_lemma1_special_cases`, :func:`check_lemma1_polynomials`, :func:`check_lemma1_product_gadget`,
  :func:`check_lemma1_shared_coefficients`: Lemma 1 (exact).
* :func:`check_theorem1_relu_to_polyrelu`: Theorem 1 (exact).
* :func:`check_theorem2_sawtooth`: the separation behind Theorem 2 (exact).
* :func:`check_theorem3_gadgets`, :func:`check_theorem3_rate`: Theorem 3 for small ``d, n`` (gadgets exact,
  rate measured).
* :func:`check_polyrelu_not_lipschitz`, :func:`check_polynorm_lipschitz`: global Lipschitz facts.

Run ``python -m theory.polycom`` (add ``--fast`` for the coarse grids used by the tests).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import math
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import scipy.sparse as sp
import sympy

__all__ = [
    "CheckResult",
    "Aff",
    "UnitNet",
    "SmoothTarget",
    "TARGET_1D",
    "TARGET_2D",
    "polyrelu_sym",
    "pieces_1d",
    "identity_1d",
    "relu_gadget",
    "poly_power_gadget",
    "poly_product_gadget",
    "sawtooth_square_gadget",
    "relu_square_approx_gadget",
    "relu_product_approx_gadget",
    "exact_breakpoints_1d",
    "sup_error_vs_square",
    "build_sawtooth_square_net",
    "build_taylor_network",
    "polynorm_term_bounds",
    "polynorm_lipschitz_bounds",
    "polynorm_jacobian",
    "check_lemma1_special_cases",
    "check_lemma1_polynomials",
    "check_lemma1_product_gadget",
    "check_lemma1_shared_coefficients",
    "check_theorem1_relu_to_polyrelu",
    "check_theorem2_sawtooth",
    "check_theorem3_gadgets",
    "check_theorem3_rate",
    "check_polyrelu_not_lipschitz",
    "check_polynorm_lipschitz",
    "run_all",
    "main",
]

EXACT = "exact proof"
MEASURED = "measurement"
MIXED = "exact proof + measurement"

#: Default fitted-exponent tolerance for the Theorem 3 rate check (|fitted - (-n/d)| <= RATE_TOL).
RATE_TOL = 0.3


# ---------------------------------------------------------------------------------------------------------
# Result object
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """Outcome of one check.

    Attributes
    ----------
    name : str
        Short identifier, e.g. ``"theorem2_sawtooth"``.
    passed : bool
        Whether every asserted identity/inequality held.
    kind : str
        ``"exact proof"``, ``"measurement"`` or ``"exact proof + measurement"``.
    numbers : dict
        The measured or computed numbers that are printed.
    note : str
        One-line statement of what was checked and which part is exact.
    data : dict
        Arrays for plotting (not printed).
    """

    name: str
    passed: bool
    kind: str
    numbers: dict[str, object] = field(default_factory=dict)
    note: str = ""
    data: dict[str, object] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, object]:
        """Return the printable fields as a plain dict."""
        return {"name": self.name, "passed": self.passed, "kind": self.kind, "numbers": dict(self.numbers),
                "note": self.note}

    def line(self) -> str:
        """Return a one-line ``PASS``/``FAIL`` summary with the numbers."""
        nums = ", ".join(f"{k}={_fmt(v)}" for k, v in self.numbers.items())
        return f"{'PASS' if self.passed else 'FAIL'} [{self.kind}] {self.name}: {nums}"


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, Fraction):
        return str(value) if value.denominator < 10**6 else f"{float(value):.6g}"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# Symbolic helpers: PolyReLU units and exact 1-D piecewise analysis
# ---------------------------------------------------------------------------------------------------------


def polyrelu_sym(z: sympy.Expr, coefficients: Sequence[object]) -> sympy.Expr:
    """Symbolic PolyReLU unit ``sum_i a_i Max(z, 0)**i`` (``Max(z, 0)**0 = 1``, as in the modules).

    Parameters
    ----------
    z : sympy.Expr
        Pre-activation.
    coefficients : sequence
        ``[a_0, ..., a_r]`` (numbers or sympy expressions).

    Returns
    -------
    sympy.Expr
    """
    r = sympy.Max(z, 0)
    return sympy.Add(*[sympy.sympify(a) * r**i for i, a in enumerate(coefficients)])


def _max_atoms(expr: sympy.Expr, t: sympy.Symbol) -> list[tuple[sympy.Expr, sympy.Expr]]:
    """Return ``(atom, L)`` for every ``Max(L, 0)`` in ``expr``, checking that ``L`` is affine in ``t``."""
    out = []
    for atom in expr.atoms(sympy.Max):
        args = [a for a in atom.args if a != 0]
        if len(atom.args) != 2 or len(args) != 1:
            raise ValueError(f"only Max(L, 0) atoms are supported, got {atom}")
        (lin,) = args
        if lin.has(sympy.Max) or sympy.Poly(lin, t).degree() > 1:
            raise ValueError(f"Max argument must be affine in {t} without nested Max, got {lin}")
        out.append((atom, lin))
    return out


def pieces_1d(expr: sympy.Expr, t: sympy.Symbol) -> list[tuple[sympy.Expr, sympy.Expr, sympy.Expr]]:
    """Split a 1-D expression built from ``Max(affine, 0)`` atoms into exact polynomial pieces.

    Every ``Max(L, 0)`` has constant sign of ``L`` between consecutive roots of the affine arguments, so on
    each open interval between sorted roots the expression *is* a polynomial; it is obtained by replacing
    each atom by ``L`` or ``0`` according to the sign of ``L`` at the interval's midpoint (an exact rational).
    By continuity of the expressions used here the pieces also determine the values at the roots.

    Parameters
    ----------
    expr : sympy.Expr
        Expression in the single real symbol ``t`` (other symbols may appear as parameters).
    t : sympy.Symbol

    Returns
    -------
    list of (lo, hi, polynomial)
        ``lo``/``hi`` are sympy numbers or ``-oo``/``oo``; the polynomial is expanded.
    """
    atoms = _max_atoms(expr, t)
    roots: set[sympy.Expr] = set()
    for _, lin in atoms:
        p = sympy.Poly(lin, t)
        if p.degree() == 1:
            slope, offset = p.all_coeffs()
            roots.add(-offset / slope)
    ordered = sorted(roots)
    edges = [-sympy.oo, *ordered, sympy.oo]
    pieces = []
    for lo, hi in itertools.pairwise(edges):
        if lo == -sympy.oo and hi == sympy.oo:
            sample = sympy.S(0)
        elif lo == -sympy.oo:
            sample = hi - 1
        elif hi == sympy.oo:
            sample = lo + 1
        else:
            sample = (lo + hi) / 2
        replacement = {atom: (lin if lin.subs(t, sample) > 0 else sympy.S(0)) for atom, lin in atoms}
        pieces.append((lo, hi, sympy.expand(expr.xreplace(replacement))))
    return pieces


def identity_1d(lhs: sympy.Expr, rhs: sympy.Expr, t: sympy.Symbol) -> tuple[bool, int]:
    """Prove ``lhs(t) == rhs(t)`` for every real ``t`` by exact case analysis (see :func:`pieces_1d`).

    Both sides may contain ``Max(affine, 0)`` atoms and symbolic parameters. The difference is checked to
    be the zero polynomial on every open interval between breakpoints and to vanish exactly at every
    breakpoint, so no continuity argument is needed.

    Parameters
    ----------
    lhs, rhs : sympy.Expr
    t : sympy.Symbol

    Returns
    -------
    holds : bool
    n_cases : int
        Number of intervals plus breakpoints examined.
    """
    diff = lhs - rhs
    pieces = pieces_1d(diff, t)
    cases = 0
    for lo, _hi, poly in pieces:
        cases += 1
        if poly != 0:
            return False, cases
        if lo != -sympy.oo:
            cases += 1
            if sympy.expand(diff.subs(t, lo)) != 0:
                return False, cases
    return True, cases


# ---------------------------------------------------------------------------------------------------------
# Exact DAG networks of ReLU / PolyReLU units
# ---------------------------------------------------------------------------------------------------------


class Aff:
    """Affine expression ``sum_j c_j v_j + const`` over the value vector of a :class:`UnitNet` (exact)."""

    __slots__ = ("terms", "const")

    def __init__(self, terms: dict[int, Fraction] | None = None, const: Fraction | int = 0) -> None:
        self.terms = {k: Fraction(v) for k, v in (terms or {}).items() if v != 0}
        self.const = Fraction(const)

    @staticmethod
    def var(index: int) -> Aff:
        """The value with the given index (input ``i`` is index ``i``)."""
        return Aff({index: Fraction(1)})

    def _combine(self, other: Aff | Fraction | int, sign: int) -> Aff:
        if not isinstance(other, Aff):
            return Aff(self.terms, self.const + sign * Fraction(other))
        terms = dict(self.terms)
        for k, v in other.terms.items():
            terms[k] = terms.get(k, Fraction(0)) + sign * v
        return Aff(terms, self.const + sign * other.const)

    def __add__(self, other: Aff | Fraction | int) -> Aff:
        return self._combine(other, 1)

    __radd__ = __add__

    def __sub__(self, other: Aff | Fraction | int) -> Aff:
        return self._combine(other, -1)

    def __rsub__(self, other: Aff | Fraction | int) -> Aff:
        return (-self)._combine(other, 1)

    def __neg__(self) -> Aff:
        return Aff({k: -v for k, v in self.terms.items()}, -self.const)

    def __mul__(self, scalar: Fraction | int) -> Aff:
        s = Fraction(scalar)
        return Aff({k: s * v for k, v in self.terms.items()}, s * self.const)

    __rmul__ = __mul__

    def __truediv__(self, scalar: Fraction | int) -> Aff:
        return self * (1 / Fraction(scalar))

    def evaluate(self, values: Sequence[Fraction]) -> Fraction:
        """Exact value given the value vector."""
        return self.const + sum((c * values[k] for k, c in self.terms.items()), Fraction(0))


E1 = (Fraction(0), Fraction(1), Fraction(0), Fraction(0))
E2 = (Fraction(0), Fraction(0), Fraction(1), Fraction(0))


@dataclass
class _Unit:
    pre: Aff
    coefficients: tuple[Fraction, ...] | None  # None: plain ReLU max(z, 0); else PolyReLU a_0..a_r
    level: int


class UnitNet:
    """A DAG of ReLU / PolyReLU units with exact rational weights and one or more affine outputs.

    Parameters
    ----------
    n_inputs : int
        Input dimension ``d``; values ``0..d-1`` are the inputs, value ``d + k`` is unit ``k``.
    """

    def __init__(self, n_inputs: int) -> None:
        self.n_inputs = int(n_inputs)
        self.units: list[_Unit] = []
        self._outputs: list[Aff] = []
        self._compiled: tuple | None = None

    @property
    def outputs(self) -> list[Aff]:
        """The affine output expressions (assign a new list to change them)."""
        return self._outputs

    @outputs.setter
    def outputs(self, value: Sequence[Aff]) -> None:
        self._outputs = list(value)
        self._compiled = None  # the compiled float evaluator caches the output matrix

    # -- construction ---------------------------------------------------------------------------------
    def add_unit(self, pre: Aff, coefficients: Sequence[Fraction | int] | None) -> Aff:
        """Append a unit with pre-activation ``pre``; return its value as an :class:`Aff`."""
        level = 1 + max((self._level_of(k) for k in pre.terms), default=0)
        coeffs = None if coefficients is None else tuple(Fraction(a) for a in coefficients)
        self.units.append(_Unit(pre, coeffs, level))
        self._compiled = None
        return Aff.var(self.n_inputs + len(self.units) - 1)

    def _level_of(self, index: int) -> int:
        return 0 if index < self.n_inputs else self.units[index - self.n_inputs].level

    def input(self, i: int) -> Aff:
        """Input coordinate ``i`` as an :class:`Aff`."""
        return Aff.var(i)

    # -- size -----------------------------------------------------------------------------------------
    @property
    def n_units(self) -> int:
        """Number of activation units (the size measure)."""
        return len(self.units)

    @property
    def n_weights(self) -> int:
        """Number of nonzero weights and biases, including the output layer."""
        count = sum(len(u.pre.terms) + (u.pre.const != 0) for u in self.units)
        return count + sum(len(o.terms) + (o.const != 0) for o in self.outputs)

    @property
    def depth(self) -> int:
        """Longest chain of units from an input to the output."""
        return max((u.level for u in self.units), default=0)

    # -- exact evaluation -----------------------------------------------------------------------------
    @staticmethod
    def _activate(z: Fraction, coeffs: tuple[Fraction, ...] | None) -> Fraction:
        r = z if z > 0 else Fraction(0)
        if coeffs is None:
            return r
        out = Fraction(0)
        for a in reversed(coeffs):  # Horner; relu(z)**0 = 1 so a_0 is added even for z <= 0
            out = out * r + a
        return out

    def values_exact(self, point: Sequence[Fraction | int], upto: int | None = None) -> list[Fraction]:
        """Exact value vector (inputs then units ``0..upto-1``) at a rational point."""
        vals = [Fraction(x) for x in point]
        if len(vals) != self.n_inputs:
            raise ValueError(f"expected {self.n_inputs} coordinates, got {len(vals)}")
        for unit in self.units[: len(self.units) if upto is None else upto]:
            vals.append(self._activate(unit.pre.evaluate(vals), unit.coefficients))
        return vals

    def eval_exact(self, point: Sequence[Fraction | int]) -> list[Fraction]:
        """Exact outputs at a rational point."""
        vals = self.values_exact(point)
        return [o.evaluate(vals) for o in self.outputs]

    # -- float evaluation -----------------------------------------------------------------------------
    def _compile(self) -> tuple:
        if self._compiled is not None:
            return self._compiled
        n_values = self.n_inputs + len(self.units)
        order = max((len(u.coefficients) for u in self.units if u.coefficients is not None), default=2)
        by_level: dict[int, list[int]] = {}
        for k, u in enumerate(self.units):
            by_level.setdefault(u.level, []).append(k)
        levels = []
        for lev in sorted(by_level):
            ks = by_level[lev]
            rows, cols, vals = [], [], []
            for r, k in enumerate(ks):
                for j, c in self.units[k].pre.terms.items():
                    rows.append(r)
                    cols.append(j)
                    vals.append(float(c))
            w = sp.csr_matrix((vals, (rows, cols)), shape=(len(ks), n_values))
            b = np.array([float(self.units[k].pre.const) for k in ks])[:, None]
            plain = np.array([self.units[k].coefficients is None for k in ks])
            coef = np.zeros((len(ks), order))
            for r, k in enumerate(ks):
                if self.units[k].coefficients is not None:
                    a = self.units[k].coefficients
                    coef[r, : len(a)] = [float(x) for x in a]
            levels.append((np.array(ks) + self.n_inputs, w, b, plain, coef))
        rows, cols, vals = [], [], []
        for r, o in enumerate(self.outputs):
            for j, c in o.terms.items():
                rows.append(r)
                cols.append(j)
                vals.append(float(c))
        w_out = sp.csr_matrix((vals, (rows, cols)), shape=(len(self.outputs), n_values))
        c_out = np.array([float(o.const) for o in self.outputs])[:, None]
        self._compiled = (n_values, levels, w_out, c_out)
        return self._compiled

    def eval_float(self, x: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """Evaluate in float64 at the rows of ``x`` (``(n_points, d)``); returns ``(n_points, n_out)``."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.n_inputs)
        n_values, levels, w_out, c_out = self._compile()
        out = np.empty((x.shape[0], len(self.outputs)))
        # Bound the dense value matrix (n_values x chunk) to about 40 MB for large networks.
        chunk = max(16, min(chunk, 5_000_000 // n_values))
        for start in range(0, x.shape[0], chunk):
            xc = x[start:start + chunk]
            vals = np.zeros((n_values, xc.shape[0]))
            vals[: self.n_inputs] = xc.T
            for idx, w, b, plain, coef in levels:
                z = w @ vals + b
                r = np.maximum(z, 0.0)
                act = coef[:, -1:] * r
                for i in range(coef.shape[1] - 2, 0, -1):
                    act = (act + coef[:, i:i + 1]) * r
                act = act + coef[:, :1]
                act[plain] = r[plain]
                vals[idx] = act
            out[start:start + chunk] = (w_out @ vals + c_out).T
        return out


# -- gadgets (each returns the gadget's value as an Aff) ----------------------------------------------------


def relu_gadget(net: UnitNet, z: Aff, polyrelu: bool) -> Aff:
    """``relu(z)`` as one unit: plain ReLU, or PolyReLU with ``a = e_1`` (Lemma 1)."""
    return net.add_unit(z, E1 if polyrelu else None)


def poly_power_gadget(net: UnitNet, z: Aff, k: int, order: int = 3) -> Aff:
    """``z**k`` exactly from two PolyReLU units: ``relu^k(z) + (-1)**k relu^k(-z)`` (``1 <= k <= order``)."""
    if not 1 <= k <= order:
        raise ValueError(f"power {k} needs 1 <= k <= order = {order}")
    ek = tuple(Fraction(int(i == k)) for i in range(order + 1))
    return net.add_unit(z, ek) + (-1) ** k * net.add_unit(-z, ek)


def poly_product_gadget(net: UnitNet, u: Aff, v: Aff) -> Aff:
    """``u * v`` exactly from four PolyReLU (``a = e_2``) units: ``(sq(u+v) - sq(u-v)) / 4``."""
    return (poly_power_gadget(net, u + v, 2) - poly_power_gadget(net, u - v, 2)) / 4


def sawtooth_square_gadget(net: UnitNet, t: Aff, levels: int, polyrelu: bool = False) -> Aff:
    """Yarotsky's ``f_m(t) = t - sum_{s=1}^{m} g_s(t) / 4**s`` for ``t`` in ``[0, 1]`` (``3 m`` units).

    Level ``s`` has units ``relu(g_{s-1})``, ``relu(g_{s-1} - 1/2)`` (so ``g_s = 2 relu(g) - 4 relu(g - 1/2)``
    is the hat function of ``g_{s-1}``, valid because ``g_{s-1}`` is in ``[0, 1]``) and ``relu(f_{s-1})``,
    which carries the (non-negative) partial sum forward so that every unit has O(1) inputs.
    """
    g, acc = t, t
    for s in range(1, levels + 1):
        h1 = relu_gadget(net, g, polyrelu)
        h2 = relu_gadget(net, g - Fraction(1, 2), polyrelu)
        h3 = relu_gadget(net, acc, polyrelu)
        g = 2 * h1 - 4 * h2
        acc = h3 - g / Fraction(4) ** s
    return acc


def relu_square_approx_gadget(net: UnitNet, z: Aff, bound: Fraction, levels: int) -> Aff:
    """ReLU approximation of ``z**2`` for ``|z| <= bound``: ``bound**2 f_m(|z| / bound)``.

    Error in ``[0, bound**2 4**(-m-1)]`` (:func:`check_theorem2_sawtooth`); ``2 + 3 m`` units.
    """
    absz = relu_gadget(net, z, False) + relu_gadget(net, -z, False)
    return Fraction(bound) ** 2 * sawtooth_square_gadget(net, absz / bound, levels)


def relu_product_approx_gadget(net: UnitNet, u: Aff, v: Aff, bound: Fraction, levels: int) -> Aff:
    """ReLU approximation of ``u * v`` for ``|u|, |v| <= bound`` by polarisation.

    Both squares over-estimate by at most ``4 bound**2 4**(-m-1)``, so the error is at most
    ``bound**2 4**(-m-1)``; the result is exactly 0 when ``u = 0`` or ``v = 0`` (the approximate square
    depends on ``|z|`` only), so inactive partition-of-unity terms contribute nothing.
    """
    b2 = 2 * Fraction(bound)
    return (relu_square_approx_gadget(net, u + v, b2, levels)
            - relu_square_approx_gadget(net, u - v, b2, levels)) / 4


# -- exact 1-D analysis of piecewise-linear networks --------------------------------------------------------


def exact_breakpoints_1d(net: UnitNet, lo: Fraction, hi: Fraction) -> list[Fraction]:
    """All breakpoints in ``[lo, hi]`` of a 1-D network of piecewise-linear units, in exact rationals.

    Units are processed in order; before unit ``k`` every earlier unit is affine on each interval between
    the current breakpoints, hence so is unit ``k``'s pre-activation, which therefore changes sign at most
    once per interval, at a rational point computed exactly. Adding these roots keeps the invariant.

    Parameters
    ----------
    net : UnitNet
        One input; units must be plain ReLU or PolyReLU of degree <= 1.
    lo, hi : Fraction

    Returns
    -------
    list of Fraction
        Sorted, including ``lo`` and ``hi``; the output is affine between consecutive entries.
    """
    if net.n_inputs != 1:
        raise ValueError("exact_breakpoints_1d needs a network with one input")
    for u in net.units:
        if u.coefficients is not None and any(a != 0 for a in u.coefficients[2:]):
            raise ValueError("exact_breakpoints_1d needs piecewise-linear units")
    pts = [Fraction(lo), Fraction(hi)]
    vals = [[pts[0]], [pts[1]]]
    for k, unit in enumerate(net.units):
        i = 0
        while i < len(pts) - 1:
            z0, z1 = unit.pre.evaluate(vals[i]), unit.pre.evaluate(vals[i + 1])
            if (z0 > 0 > z1) or (z0 < 0 < z1):
                root = pts[i] + (pts[i + 1] - pts[i]) * z0 / (z0 - z1)
                pos = bisect.bisect_left(pts, root)
                pts.insert(pos, root)
                vals.insert(pos, net.values_exact([root], upto=k))
            i += 1
        for v in vals:
            v.append(UnitNet._activate(unit.pre.evaluate(v), unit.coefficients))
    return pts


def sup_error_vs_square(net: UnitNet, pts: Sequence[Fraction]) -> tuple[Fraction, list[Fraction]]:
    """Exact ``sup |net(x) - x**2|`` over ``[pts[0], pts[-1]]`` for a net affine between the ``pts``.

    On a piece where the net is ``c x + e`` the error ``e(x) = c x + e - x**2`` is concave, so its maximum is
    at the vertex ``x = c/2`` (if inside) or an endpoint and its minimum at an endpoint; the sup of ``|e|``
    is the largest ``|e|`` over these candidates.

    Returns
    -------
    sup : Fraction
    argmax : list of Fraction
        Every candidate point attaining the sup.
    """
    cands: dict[Fraction, Fraction] = {}
    out = [net.eval_exact([p])[0] for p in pts]
    for (p0, y0), (p1, y1) in itertools.pairwise(zip(pts, out, strict=True)):
        c = (y1 - y0) / (p1 - p0)
        e = y0 - c * p0
        for x in (p0, p1, c / 2):
            if p0 <= x <= p1:
                cands[x] = abs(c * x + e - x * x)
    sup = max(cands.values())
    return sup, sorted(x for x, v in cands.items() if v == sup)


# ---------------------------------------------------------------------------------------------------------
# Lemma 1
# ---------------------------------------------------------------------------------------------------------

_t = sympy.Symbol("t", real=True)


def check_lemma1_special_cases(order: int = 3) -> CheckResult:
    """ReLU and squared ReLU are PolyReLU units: ``a = e_1`` and ``a = e_2`` (exact, all real inputs)."""
    e1 = [int(i == 1) for i in range(order + 1)]
    e2 = [int(i == 2) for i in range(order + 1)]
    ok1, n1 = identity_1d(polyrelu_sym(_t, e1), sympy.Max(_t, 0), _t)
    ok2, n2 = identity_1d(polyrelu_sym(_t, e2), sympy.Max(_t, 0) ** 2, _t)
    return CheckResult("lemma1_relu_relu2", ok1 and ok2, EXACT,
                       {"relu_eq_e1": ok1, "relu2_eq_e2": ok2, "cases_checked": n1 + n2},
                       "PolyReLU(a=e_1) == ReLU, PolyReLU(a=e_2) == ReLU^2 for all real t (sign case split).")


def check_lemma1_polynomials(max_order: int = 5) -> CheckResult:
    """Monomials and every polynomial of degree <= r from two PolyReLU units (exact, symbolic coefficients).

    ``x**k = relu^k(x) + (-1)**k relu^k(-x)`` for ``k <= max_order``; and with symbolic ``b_0..b_r`` the
    units ``sigma_{(b_0, b_1, ..., b_r)}(x) + sigma_{(0, -b_1, b_2, ..., (-1)^r b_r)}(-x)`` equal
    ``sum_k b_k x**k`` for every real ``x`` and every ``r <= max_order``.
    """
    mono_ok = []
    for k in range(1, max_order + 1):
        lhs = sympy.Max(_t, 0) ** k + (-1) ** k * sympy.Max(-_t, 0) ** k
        mono_ok.append(identity_1d(lhs, _t**k, _t)[0])
    poly_ok = []
    for r in range(1, max_order + 1):
        b = sympy.symbols(f"b0:{r + 1}", real=True)
        plus = polyrelu_sym(_t, b)
        minus = polyrelu_sym(-_t, [0] + [(-1) ** k * b[k] for k in range(1, r + 1)])
        poly_ok.append(identity_1d(plus + minus, sum(b[k] * _t**k for k in range(r + 1)), _t)[0])
    passed = all(mono_ok) and all(poly_ok)
    return CheckResult("lemma1_polynomials", passed, EXACT,
                       {"monomials_max_k": max_order, "monomials_ok": all(mono_ok),
                        "polynomials_max_r": max_order, "polynomials_ok": all(poly_ok),
                        "units_per_polynomial": 2},
                       "x^k = ReLU^k(x) + (-1)^k ReLU^k(-x); any degree-<=r polynomial = 2 PolyReLU units.")


def check_lemma1_product_gadget() -> CheckResult:
    """Exact product ``xy = (sq(x+y) - sq(x-y))/4`` with ``sq(z) = relu^2(z) + relu^2(-z)`` (4 units).

    Proof in two exact steps: ``sq(z) == z**2`` for every real ``z`` (case split), then the polarisation
    identity ``((x+y)**2 - (x-y)**2)/4 == x y`` as a polynomial identity. The assembled gadget is also
    evaluated exactly on a rational grid of sign patterns, through :class:`UnitNet`.
    """
    sq_ok, cases = identity_1d(polyrelu_sym(_t, E2) + polyrelu_sym(-_t, E2), _t**2, _t)
    x, y = sympy.symbols("x y", real=True)
    polar_ok = sympy.expand(((x + y) ** 2 - (x - y) ** 2) / 4 - x * y) == 0
    net = UnitNet(2)
    net.outputs = [poly_product_gadget(net, net.input(0), net.input(1))]
    grid = [Fraction(n, 3) for n in range(-7, 8)]
    net_ok = all(net.eval_exact([a, b])[0] == a * b for a in grid for b in grid)
    passed = sq_ok and polar_ok and net_ok and net.n_units == 4 and net.depth == 1
    return CheckResult("lemma1_product_gadget", passed, EXACT,
                       {"sq_identity": sq_ok, "polarisation": polar_ok, "units": net.n_units,
                        "depth": net.depth, "rational_points_exact": len(grid) ** 2, "cases": cases},
                       "xy from 4 ReLU^2 units, one hidden layer, exact for all reals.")


def check_lemma1_shared_coefficients(coefficients: Sequence[Fraction] | None = None) -> CheckResult:
    """With one shared coefficient vector ``a`` (all ``a_i != 0``), each ``relu^k`` is exact from ``r`` units.

    For ``lam > 0``, ``sigma_a(lam z) - a_0 = sum_i a_i lam**i relu^i(z)``; with ``lam = 1..r`` this is a
    Vandermonde-type system ``M_{ji} = a_i j**i`` that is invertible when every ``a_i != 0``, so
    ``relu^k(z) = sum_j C_{kj} (sigma_a(j z) - a_0)`` exactly. Verified for all real ``z`` by case split.
    Default ``a`` is the official initialisation ``(0, 1/3, 1/3, 1/3)``.
    """
    a = list(coefficients) if coefficients is not None else [Fraction(0)] + [Fraction(1, 3)] * 3
    r = len(a) - 1
    m = sympy.Matrix(r, r, lambda j, i: sympy.Rational(a[i + 1]) * sympy.Integer(j + 1) ** (i + 1))
    if m.det() == 0:
        return CheckResult("lemma1_shared_coefficients", False, EXACT, {"det": 0}, "singular system")
    c = m.inv()  # relu^k = sum_j c[k-1, j] (sigma((j+1) z) - a_0)
    ok = []
    for k in range(1, r + 1):
        lhs = sum(c[k - 1, j] * (polyrelu_sym((j + 1) * _t, a) - sympy.Rational(a[0])) for j in range(r))
        ok.append(identity_1d(lhs, sympy.Max(_t, 0) ** k, _t)[0])
    return CheckResult("lemma1_shared_coefficients", all(ok), EXACT,
                       {"a": [str(v) for v in a], "det": str(m.det()), "units_per_relu_power": r,
                        "all_powers_exact": all(ok)},
                       "one shared a per layer suffices: relu^k = combination of sigma_a(j z), j = 1..r.")


# ---------------------------------------------------------------------------------------------------------
# Theorem 1
# ---------------------------------------------------------------------------------------------------------


def _random_relu_net(rng: random.Random, widths: Sequence[int]) -> UnitNet:
    """Random layered ReLU MLP with small rational weights (widths include input and output)."""
    net = UnitNet(widths[0])
    prev = [net.input(i) for i in range(widths[0])]

    def rational() -> Fraction:
        return Fraction(rng.randint(-9, 9), rng.randint(1, 6))

    for width in widths[1:-1]:
        prev = [relu_gadget(net, sum((rational() * p for p in prev), Aff()) + rational(), False)
                for _ in range(width)]
    net.outputs = [sum((rational() * p for p in prev), Aff()) + rational() for _ in range(widths[-1])]
    return net


def _convert_to_polyrelu(net: UnitNet, order: int = 3) -> UnitNet:
    """Theorem 1's conversion: same graph and weights, every ReLU replaced by PolyReLU with ``a = e_1``."""
    e1 = tuple(Fraction(int(i == 1)) for i in range(order + 1))
    out = UnitNet(net.n_inputs)
    for u in net.units:
        out.add_unit(Aff(u.pre.terms, u.pre.const), e1 if u.coefficients is None else u.coefficients)
    out.outputs = [Aff(o.terms, o.const) for o in net.outputs]
    return out


def check_theorem1_relu_to_polyrelu(seed: int = 0, n_random_points: int = 200) -> CheckResult:
    """Any ReLU network equals a PolyReLU network of the same size (exact).

    Proof: ``sigma_{e_1} == relu`` on all reals (:func:`identity_1d`), so replacing every unit keeps every
    value unchanged by induction over the units. Exact confirmation on random rational networks:

    * a 1-D network ``1-6-6-5-1``: all breakpoints on ``[-1, 1]`` are enumerated exactly; both networks are
      compared at every breakpoint and piece midpoint, and on every linear piece their (slope, intercept)
      pairs are compared;
    * a 3-D network ``3-8-8-2``: random rational points plus points on every first-layer hyperplane.
    """
    rng = random.Random(seed)
    unit_ok, _ = identity_1d(polyrelu_sym(_t, E1), sympy.Max(_t, 0), _t)

    net1 = _random_relu_net(rng, [1, 6, 6, 5, 1])
    poly1 = _convert_to_polyrelu(net1)
    pts = exact_breakpoints_1d(net1, Fraction(-1), Fraction(1))
    mids = [(a + b) / 2 for a, b in itertools.pairwise(pts)]
    points_ok = all(net1.eval_exact([p]) == poly1.eval_exact([p]) for p in pts + mids)
    pieces_ok = True
    for a, b in itertools.pairwise(pts):
        lines = []
        for net in (net1, poly1):
            ya, yb, ym = net.eval_exact([a])[0], net.eval_exact([b])[0], net.eval_exact([(a + b) / 2])[0]
            slope = (yb - ya) / (b - a)
            pieces_ok &= ym == (ya + yb) / 2  # affine on the piece, as the enumeration promises
            lines.append((slope, ya - slope * a))
        pieces_ok &= lines[0] == lines[1]

    net3 = _random_relu_net(rng, [3, 8, 8, 2])
    poly3 = _convert_to_polyrelu(net3)
    test_pts = [[Fraction(rng.randint(-60, 60), 60) for _ in range(3)] for _ in range(n_random_points)]
    for u in net3.units[:8]:  # first layer: points with w.x + b = 0 exactly
        w = [u.pre.terms.get(i, Fraction(0)) for i in range(3)]
        j = max(range(3), key=lambda i: abs(w[i]))
        if w[j] == 0:
            continue
        for _ in range(5):
            p = [Fraction(rng.randint(-30, 30), 30) for _ in range(3)]
            p[j] = -(u.pre.const + sum(w[i] * p[i] for i in range(3) if i != j)) / w[j]
            test_pts.append(p)
    multi_ok = all(net3.eval_exact(p) == poly3.eval_exact(p) for p in test_pts)
    same_size = all((a.n_units, a.n_weights, a.depth) == (b.n_units, b.n_weights, b.depth)
                    for a, b in ((net1, poly1), (net3, poly3)))
    passed = unit_ok and points_ok and pieces_ok and multi_ok and same_size
    return CheckResult("theorem1_relu_to_polyrelu", passed, EXACT,
                       {"unit_identity": unit_ok, "pieces_1d": len(pts) - 1, "pieces_equal": pieces_ok,
                        "points_1d": len(pts) + len(mids), "points_3d": len(test_pts),
                        "all_points_equal": points_ok and multi_ok, "units": [net1.n_units, net3.n_units],
                        "same_size": same_size},
                       "relu == PolyReLU(e_1) on all reals => same network and size; exact rational checks.")


# ---------------------------------------------------------------------------------------------------------
# Theorem 2 (separation): Yarotsky's sawtooth for x^2
# ---------------------------------------------------------------------------------------------------------


def build_sawtooth_square_net(levels: int) -> UnitNet:
    """ReLU network computing Yarotsky's ``f_m(x)`` on ``[0, 1]`` (``3 m`` units, depth ``m``)."""
    net = UnitNet(1)
    net.outputs = [sawtooth_square_gadget(net, net.input(0), levels)]
    return net


def check_theorem2_sawtooth(max_levels: int = 8) -> CheckResult:
    """ReLU needs size ~ ln(1/eps) for ``x**2`` on [0, 1]; PolyReLU needs 2 units and has error 0 (exact).

    For ``m = 1..max_levels`` (all exact, rational arithmetic):

    * the sawtooth network's breakpoints are enumerated exactly: ``2**m`` pieces, all at ``k / 2**m``;
    * it interpolates ``x**2`` at every ``k / 2**m``;
    * its exact sup error is ``2**(-2m-2)``, attained exactly at the midpoints ``(2k+1) / 2**(m+1)``;
    * size ``3 m`` units, so size = ``1.5 log2(1/eps) - 3`` grows like ``ln(1/eps)``.

    Lower bound (why ReLU cannot do better than logarithmic): a 1-D network of ``N`` ReLU units has at most
    ``2**N`` linear pieces (each unit splits each current piece at most once; checked on these networks),
    and on a piece of length ``l`` no affine function is closer than ``l**2/8`` to ``x**2`` (exact: for any
    affine ``L``, ``e = x**2 - L`` satisfies ``e(0) - 2 e(l/2) + e(l) = l**2/2``). Hence ``eps >= 4**(-N)/8``,
    i.e. ``N >= (log2(1/eps) - 3)/2``; at ``eps = 2**(-2m-2)`` this is ``N >= m``. PolyReLU: ``x**2`` equals
    ``relu^2(x) + relu^2(-x)`` on all reals (Lemma 1), error exactly 0 with 2 units.
    """
    rows = []
    ok = True
    for m in range(1, max_levels + 1):
        net = build_sawtooth_square_net(m)
        pts = exact_breakpoints_1d(net, Fraction(0), Fraction(1))
        grid = [Fraction(k, 2**m) for k in range(2**m + 1)]
        interp = all(net.eval_exact([g])[0] == g * g for g in grid)
        sup, argmax = sup_error_vs_square(net, pts)
        mids = [Fraction(2 * k + 1, 2 ** (m + 1)) for k in range(2**m)]
        good = (pts == grid and interp and sup == Fraction(1, 4 ** (m + 1)) and argmax == mids
                and net.n_units == 3 * m and len(pts) - 1 <= 2**net.n_units)
        ok &= good
        lower = math.ceil((math.log2(1 / sup) - 3) / 2)
        rows.append((m, net.n_units, len(pts) - 1, sup, lower, good))

    l_sym, c0, c1, xs = sympy.symbols("l c0 c1 x", real=True)
    e = xs**2 - (c0 + c1 * xs)
    second_diff = sympy.expand(e.subs(xs, 0) - 2 * e.subs(xs, l_sym / 2) + e.subs(xs, l_sym)) == l_sym**2 / 2
    best = xs**2 - (l_sym * xs - l_sym**2 / 8)
    best_ok = all(sympy.simplify(best.subs(xs, v) - s * l_sym**2 / 8) == 0
                  for v, s in ((0, 1), (l_sym / 2, -1), (l_sym, 1)))
    poly_ok, _ = identity_1d(polyrelu_sym(_t, E2) + polyrelu_sym(-_t, E2), _t**2, _t)
    ok &= second_diff and best_ok and poly_ok
    return CheckResult(
        "theorem2_sawtooth_separation", ok, EXACT,
        {"levels": max_levels, "sup_errors": [str(r[3]) for r in rows], "units": [r[1] for r in rows],
         "pieces": [r[2] for r in rows], "relu_units_lower_bound": [r[4] for r in rows],
         "affine_lower_bound_l2/8": second_diff and best_ok, "polyrelu_units": 2, "polyrelu_error": 0},
        "exact sup error 2^(-2m-2) with 3m ReLU units (and >= m needed); PolyReLU: 0 error with 2 units.",
        data={"levels": [r[0] for r in rows], "units": [r[1] for r in rows],
              "errors": [float(r[3]) for r in rows], "lower_units": [r[4] for r in rows]})


# ---------------------------------------------------------------------------------------------------------
# Theorem 3: Yarotsky-style construction with exact PolyReLU products
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmoothTarget:
    """A smooth target on ``[0, 1]^d`` with proven bounds on its derivatives.

    Attributes
    ----------
    name : str
    symbols : tuple of sympy.Symbol
    expr : sympy.Expr
    derivative_bounds : dict
        ``n -> M_n`` with ``max_{|alpha| = n} sup_{[0,1]^d} |D^alpha f| <= M_n`` (proved in the comment at
        the definition).
    """

    name: str
    symbols: tuple[sympy.Symbol, ...]
    expr: sympy.Expr
    derivative_bounds: dict[int, float]

    @property
    def dim(self) -> int:
        """Input dimension ``d``."""
        return len(self.symbols)

    def numpy(self) -> Callable[..., np.ndarray]:
        """Vectorised float64 evaluator ``f(x1, ..., xd)``."""
        return sympy.lambdify(self.symbols, self.expr, "numpy")


_x1, _x2 = sympy.symbols("x1 x2", real=True)
# f = sin(3x + 1/2)/9: f' = cos(.)/3, f'' = -sin(.), f''' = -3 cos(.); |sin|, |cos| <= 1 give M_1 = 1/3,
# M_2 = 1, M_3 = 3, and |f| <= 1/9, so f lies in the unit ball of W^{2,inf}.
TARGET_1D = SmoothTarget("sin(3x+1/2)/9", (_x1,), sympy.sin(3 * _x1 + sympy.Rational(1, 2)) / 9,
                         {1: 1 / 3, 2: 1.0, 3: 3.0})
# f = sin(x1 + 1) cos(2 x2 + 1/2) / 4: second partials are products of sin/cos with factors 1, 2, 4 over 4,
# so M_2 = 1 (from d^2/dx2^2); first partials are <= 1/2: f lies in the unit ball of W^{2,inf}.
TARGET_2D = SmoothTarget("sin(x1+1)cos(2x2+1/2)/4", (_x1, _x2),
                         sympy.sin(_x1 + 1) * sympy.cos(2 * _x2 + sympy.Rational(1, 2)) / 4, {1: 0.5, 2: 1.0})


def _multi_indices(d: int, max_order: int) -> list[tuple[int, ...]]:
    return [a for a in itertools.product(range(max_order + 1), repeat=d) if sum(a) <= max_order]


def _psi_exact(t: Fraction) -> Fraction:
    """Trapezoid 1 on [-1, 1], 0 outside [-2, 2], linear between (independent of the network)."""
    return min(Fraction(1), max(Fraction(0), 2 - abs(t)))


def build_taylor_network(target: SmoothTarget, n: int, grid_n: int, kind: str = "polyrelu",
                         relu_levels: int | None = None) -> tuple[UnitNet, dict]:
    """Build the Theorem 3 network ``sum_m phi_m(x) P_m(x)`` for ``target`` on ``[0, 1]^d``.

    * ``psi(t) = relu(t+2) - relu(t+1) - relu(t-1) + relu(t-2)`` (4 units) gives
      ``phi_m(x) = prod_k psi(3 N x_k - 3 m_k)``, ``m in {0..N}^d``, an exact partition of unity on
      ``[0, 1]^d``.
    * ``P_m`` is the Taylor polynomial of degree ``n - 1`` at ``m / N`` (coefficients rounded once to float64
      and then used as exact rationals).
    * ``kind = "polyrelu"``: every product (and power ``(x_k - m_k/N)**j``, ``j >= 2``) is exact (Lemma 1).
      ``kind = "relu"``: products use the sawtooth approximation with ``relu_levels`` levels (default
      ``ceil(n log2(N)/2) + 2`` so its error ``4**(-levels)`` is below ``N**(-n)/16``, well under the Taylor
      error).

    Parameters
    ----------
    target : SmoothTarget
    n : int
        Smoothness order (Taylor degree ``n - 1``); PolyReLU powers need ``n - 1 <= 3``.
    grid_n : int
        ``N``; there are ``(N + 1)**d`` partition functions.
    kind : {"polyrelu", "relu"}
    relu_levels : int, optional

    Returns
    -------
    net : UnitNet
    info : dict
        ``"taylor"``: ``{m: {alpha: Fraction}}``; ``"bound"``: the proven sup-error bound of the ideal
        (exact-product) construction, ``(2 d / (3 N))**n / n! * M_n``; ``"relu_levels"``.
    """
    if kind not in ("polyrelu", "relu"):
        raise ValueError(f"kind must be 'polyrelu' or 'relu', got {kind!r}")
    d, big_n = target.dim, int(grid_n)
    poly = kind == "polyrelu"
    levels = relu_levels if relu_levels is not None else math.ceil(n * math.log2(max(big_n, 2)) / 2) + 2
    # Products in the ReLU net see |phi| <= 1 (+ tiny approximation error) and |x_k - m_k/N| <= 1.
    bound = Fraction(2)

    def product(u: Aff, v: Aff) -> Aff:
        if poly:
            return poly_product_gadget(net, u, v)
        return relu_product_approx_gadget(net, u, v, bound, levels)

    def power(z: Aff, j: int) -> Aff:
        if j == 1:
            return z
        if poly:
            return poly_power_gadget(net, z, j)
        out = z
        for _ in range(j - 1):
            out = product(out, z)
        return out

    derivs = {}
    for alpha in _multi_indices(d, n - 1):
        expr = target.expr
        for k, ak in enumerate(alpha):
            if ak:
                expr = sympy.diff(expr, target.symbols[k], ak)
        denom = math.prod(math.factorial(a) for a in alpha)
        derivs[alpha] = sympy.lambdify(target.symbols, expr / denom, "math")

    net = UnitNet(d)
    psi: list[list[Aff]] = []
    for k in range(d):
        row = []
        for mk in range(big_n + 1):
            tk = 3 * big_n * net.input(k) - 3 * mk
            row.append(relu_gadget(net, tk + 2, poly) - relu_gadget(net, tk + 1, poly)
                       - relu_gadget(net, tk - 1, poly) + relu_gadget(net, tk - 2, poly))
        psi.append(row)
    output = Aff()
    taylor: dict[tuple[int, ...], dict[tuple[int, ...], Fraction]] = {}
    for m in itertools.product(range(big_n + 1), repeat=d):
        phi = psi[0][m[0]]
        for k in range(1, d):
            phi = product(phi, psi[k][m[k]])
        center = [m_k / big_n for m_k in m]
        taylor[m] = {}
        for alpha, fn in derivs.items():
            coef = Fraction(float(fn(*center)))
            if coef == 0:
                continue  # exact zero: the term contributes nothing, so no units are spent on it
            taylor[m][alpha] = coef
            term = phi
            for k, ak in enumerate(alpha):
                if ak:
                    term = product(term, power(net.input(k) - Fraction(m[k], big_n), ak))
            output = output + coef * term
    net.outputs = [output]
    ideal_bound = (2 * d / (3 * big_n)) ** n / math.factorial(n) * target.derivative_bounds[n]
    return net, {"taylor": taylor, "bound": ideal_bound, "relu_levels": None if poly else levels}


def _taylor_formula_exact(point: Sequence[Fraction], taylor: dict, grid_n: int) -> Fraction:
    """``sum_m phi_m(x) P_m(x)`` in exact rationals, computed directly from the definitions."""
    total = Fraction(0)
    for m, coefs in taylor.items():
        phi = math.prod((_psi_exact(3 * grid_n * x - 3 * mk) for x, mk in zip(point, m, strict=True)),
                        start=Fraction(1))
        if phi == 0:
            continue
        p = Fraction(0)
        for al, c in coefs.items():
            shifts = (x - Fraction(mk, grid_n) for x, mk in zip(point, m, strict=True))
            p += c * math.prod((s**a for s, a in zip(shifts, al, strict=True)), start=Fraction(1))
        total += phi * p
    return total


def check_theorem3_gadgets(max_grid: int = 6, seed: int = 0) -> CheckResult:
    """Exactness of Theorem 3's building blocks and of the assembled PolyReLU networks (exact).

    * ``psi`` is the trapezoid (0, ``t+2``, 1, ``2-t``, 0 on the five intervals), proved by case split;
    * ``sum_{m=0}^{N} psi(3N x - 3m) == 1`` on ``[0, 1]`` for ``N = 1..max_grid`` (every piece meeting
      ``[0, 1]`` is the constant 1), hence ``sum_m phi_m == 1`` on ``[0, 1]^d`` as a product of sums;
    * the product and power gadgets are exact (Lemma 1);
    * the assembled networks for ``d = 1`` (``N = 5``, ``n = 2, 3``) and ``d = 2`` (``N = 3``, ``n = 2``)
      equal
      ``sum_m phi_m P_m`` (computed independently from the definitions) exactly at rational points.
    """
    psi = sympy.Max(_t + 2, 0) - sympy.Max(_t + 1, 0) - sympy.Max(_t - 1, 0) + sympy.Max(_t - 2, 0)
    expected = [0, _t + 2, 1, 2 - _t, 0]
    pieces = pieces_1d(psi, _t)
    psi_ok = len(pieces) == 5 and all(sympy.expand(p - e) == 0 for (_, _, p), e in zip(pieces, expected,
                                                                                      strict=True))
    pou_ok = True
    for big_n in range(1, max_grid + 1):
        total = sum(psi.subs(_t, 3 * big_n * _t - 3 * m) for m in range(big_n + 1))
        for lo, hi, p in pieces_1d(total, _t):
            if hi > 0 and lo < 1:
                pou_ok &= p == 1
    pow_ok = all(identity_1d(polyrelu_sym(_t, [int(i == j) for i in range(4)])
                             + (-1) ** j * polyrelu_sym(-_t, [int(i == j) for i in range(4)]), _t**j, _t)[0]
                 for j in (1, 2, 3))
    rng = random.Random(seed)
    net_ok = True
    n_points = 0
    for target, n, big_n in ((TARGET_1D, 2, 5), (TARGET_1D, 3, 5), (TARGET_2D, 2, 3)):
        net, info = build_taylor_network(target, n, big_n, "polyrelu")
        special = [Fraction(k, 3 * big_n) for k in range(3 * big_n + 1)]
        pts = [[rng.choice(special) if rng.random() < 0.4 else Fraction(rng.randint(0, 997), 997)
                for _ in range(target.dim)] for _ in range(25)]
        for p in pts:
            net_ok &= net.eval_exact(p)[0] == _taylor_formula_exact(p, info["taylor"], big_n)
            n_points += 1
    passed = psi_ok and pou_ok and pow_ok and net_ok
    return CheckResult("theorem3_gadgets", passed, EXACT,
                       {"psi_trapezoid": psi_ok, "partition_of_unity_max_N": max_grid, "pou_ok": pou_ok,
                        "power_gadgets": pow_ok, "network_eq_formula_points": n_points,
                        "network_exact": net_ok},
                       "trapezoid, partition of unity, power/product gadgets and assembled nets are exact.")


def _fit_exponent(sizes: Sequence[float], errors: Sequence[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(size)``."""
    return float(np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(errors, float)), 1)[0])


def _eval_grid(d: int, grid_n: int, points_per_cell: int) -> np.ndarray:
    """Tensor grid on ``[0, 1]^d``: ``points_per_cell`` points per cell of width ``1/N`` plus every kink.

    The error of the construction has kinks where a trapezoid changes slope, at ``k / (3N)``; the sup is
    often attained there, so these coordinates are always included (a purely uniform grid under-estimates
    the sup by up to ~20% and biases the fitted exponent).
    """
    kinks = np.arange(3 * grid_n + 1) / (3 * grid_n)
    axis = np.union1d(np.linspace(0.0, 1.0, points_per_cell * grid_n + 1), kinks)
    return np.stack(np.meshgrid(*([axis] * d), indexing="ij"), axis=-1).reshape(-1, d)


def check_theorem3_rate(d: int = 1, n: int = 2, grid_sizes: Sequence[int] | None = None,
                        points_per_cell: int | None = None, relu_grid_sizes: Sequence[int] | None = None,
                        tol: float = RATE_TOL, target: SmoothTarget | None = None) -> CheckResult:
    """Measured sup error vs size of the Theorem 3 construction, PolyReLU vs ReLU (measurement).

    For each ``N`` the PolyReLU network of :func:`build_taylor_network` is evaluated in float64 on a grid of
    ``[0, 1]^d`` (see :func:`_eval_grid`); its measured sup error must not exceed the proven bound of the
    exact construction (``(2d/(3N))**n M_n / n!``, from ``sum_m phi_m = 1``, ``phi_m >= 0`` and the Taylor
    remainder on the support ``|x_k - m_k/N| < 2/(3N)``). The slope of ``log(error)`` against
    ``log(units)`` is fitted by least squares over all ``N`` and must lie within ``tol`` of the predicted
    ``-n/d``; the local slope between the two largest ``N`` is reported too (the unit count is affine in
    ``(N+1)**d``, which steepens the fit at small ``N``). The same numbers are reported for the ReLU version
    (products approximated by the sawtooth, size ``O(N^d log N)``), not gated: for ``d = 1, n = 2`` a ReLU
    network can also reach the rate ``-2`` without the log factor (piecewise-linear interpolation), so the
    ReLU construction here illustrates the generic Yarotsky bound, not a lower bound. Grid sup errors are
    lower estimates of the true sup (a measurement, not a proof).

    Parameters
    ----------
    d, n : int
    grid_sizes : sequence of int, optional
        Values of ``N`` for PolyReLU (default: ``4..128`` for d = 1, ``3..16`` for d = 2).
    points_per_cell : int, optional
        Uniform evaluation points per cell and axis (default 32 for d = 1, 8 for d = 2).
    relu_grid_sizes : sequence of int, optional
        Values of ``N`` for the ReLU construction (default: the PolyReLU ones up to 64 / 12).
    tol : float
        Allowed deviation of the fitted exponent from ``-n/d``.
    target : SmoothTarget, optional
        Default :data:`TARGET_1D` / :data:`TARGET_2D`.
    """
    target = target if target is not None else (TARGET_1D if d == 1 else TARGET_2D)
    if target.dim != d:
        raise ValueError(f"target has dimension {target.dim}, expected {d}")
    if grid_sizes is None:
        grid_sizes = (4, 8, 16, 32, 64, 128) if d == 1 else (3, 4, 6, 8, 12, 16)
    if relu_grid_sizes is None:
        relu_grid_sizes = [g for g in grid_sizes if g <= (64 if d == 1 else 12)]
    if points_per_cell is None:
        points_per_cell = 32 if d == 1 else 8
    f_num = target.numpy()

    def measure(kind: str, sizes: Iterable[int]) -> tuple[list, list, list, list, int]:
        units, weights, errors, bounds, n_points = [], [], [], [], 0
        for big_n in sizes:
            x = _eval_grid(d, big_n, points_per_cell)
            f_true = np.asarray(f_num(*x.T), dtype=np.float64) * np.ones(x.shape[0])
            net, info = build_taylor_network(target, n, big_n, kind)
            errors.append(float(np.max(np.abs(net.eval_float(x)[:, 0] - f_true))))
            units.append(net.n_units)
            weights.append(net.n_weights)
            bounds.append(info["bound"])
            n_points = max(n_points, x.shape[0])
        return units, weights, errors, bounds, n_points

    p_units, p_weights, p_err, p_bound, n_pts = measure("polyrelu", grid_sizes)
    r_units, r_weights, r_err, _, _ = measure("relu", relu_grid_sizes)
    p_slope = _fit_exponent(p_units, p_err)
    r_slope = _fit_exponent(r_units, r_err)
    p_last = _fit_exponent(p_units[-2:], p_err[-2:])
    r_last = _fit_exponent(r_units[-2:], r_err[-2:])
    predicted = -n / d
    within_bound = all(e <= b for e, b in zip(p_err, p_bound, strict=True))
    passed = within_bound and abs(p_slope - predicted) <= tol
    return CheckResult(
        f"theorem3_rate_d{d}_n{n}", passed, MEASURED,
        {"predicted": predicted, "polyrelu_fitted": round(p_slope, 4), "tol": tol,
         "polyrelu_last_slope": round(p_last, 4), "relu_fitted": round(r_slope, 4),
         "relu_last_slope": round(r_last, 4), "N": list(grid_sizes), "polyrelu_units": p_units,
         "polyrelu_errors": p_err, "error_bounds": p_bound, "errors_within_bound": within_bound,
         "relu_N": list(relu_grid_sizes), "relu_units": r_units, "relu_errors": r_err,
         "max_grid_points": n_pts},
        f"sup error on grids ({points_per_cell} pts/cell/axis + kinks) vs #units; PolyReLU exponent must be "
        f"within {tol} of -n/d; ReLU (approximate products) reported only.",
        data={"polyrelu_units": p_units, "polyrelu_errors": p_err, "polyrelu_weights": p_weights,
              "relu_units": r_units, "relu_errors": r_err, "relu_weights": r_weights,
              "predicted": predicted, "polyrelu_slope": p_slope, "relu_slope": r_slope, "d": d, "n": n})


# ---------------------------------------------------------------------------------------------------------
# Global Lipschitz facts
# ---------------------------------------------------------------------------------------------------------


def check_polyrelu_not_lipschitz(order: int = 3) -> CheckResult:
    """PolyReLU is globally Lipschitz iff ``a_2 = ... = a_r = 0`` (then with constant ``|a_1|``); exact.

    For ``x > 0``, ``phi'(x) = sum_i i a_i x**(i-1)``. If ``j >= 2`` is the largest index with ``a_j != 0``,
    ``lim phi'(x) / x**(j-1) = j a_j != 0`` (sympy limit with symbolic coefficients), so ``|phi'|`` and the
    difference quotient ``(phi(x) - phi(0))/x`` are unbounded. At the initialisation ``a = (0, 1/3, 1/3,
    1/3)`` sympy gives ``lim phi'(x) = oo``. With ``a_2 = ... = a_r = 0`` the map is ``a_0 + a_1 relu(x)``,
    which is ``|a_1|``-Lipschitz and no better (slope ``a_1`` on ``x > 0``).
    """
    xp = sympy.Symbol("x", positive=True)
    a = sympy.symbols(f"a0:{order + 1}", real=True)
    ok = True
    leading = {}
    for j in range(2, order + 1):
        phi = sum(a[i] * xp**i for i in range(j + 1))  # a_{j+1..r} = 0, a_j is the top coefficient
        lim = sympy.limit(sympy.diff(phi, xp) / xp ** (j - 1), xp, sympy.oo)
        lim_q = sympy.limit((phi - a[0]) / xp / xp ** (j - 1), xp, sympy.oo)
        leading[j] = str(lim)
        ok &= sympy.simplify(lim - j * a[j]) == 0 and sympy.simplify(lim_q - a[j]) == 0
    init = [0] + [sympy.Rational(1, order)] * order
    phi0 = sum(c * xp**i for i, c in enumerate(init))
    lim_init = sympy.limit(sympy.diff(phi0, xp), xp, sympy.oo)
    quot_init = sympy.limit((phi0 - init[0]) / xp, xp, sympy.oo)
    ok &= lim_init == sympy.oo and quot_init == sympy.oo
    affine = polyrelu_sym(_t, [a[0], a[1]] + [0] * (order - 1))
    affine_ok, _ = identity_1d(affine, a[0] + a[1] * sympy.Max(_t, 0), _t)
    ok &= affine_ok
    return CheckResult("polyrelu_not_globally_lipschitz", ok, EXACT,
                       {"lim phi'/x^(j-1)": leading, "lim phi' at init": str(lim_init),
                        "lim (phi(x)-phi(0))/x at init": str(quot_init), "affine_case_constant": "|a_1|"},
                       "unbounded slope whenever some a_j != 0 with j >= 2 (sympy limits).")


def polynorm_jacobian(z: np.ndarray, coefficients: Sequence[float], eps: float) -> np.ndarray:
    """Closed-form Jacobian of PolyNorm at one vector ``z`` (paper-order coefficients).

    ``J = sum_p a_p (p / s_p) (I - u_p u_p^T / (D s_p**2)) diag(z**(p-1))`` with ``u_p = z**p`` and
    ``s_p = sqrt(mean(u_p**2) + eps)``.
    """
    z = np.asarray(z, dtype=np.float64)
    dim = z.size
    jac = np.zeros((dim, dim))
    for p, a in enumerate(coefficients):
        if p == 0 or a == 0:
            continue
        u = z**p
        s2 = float(np.mean(u * u)) + eps
        proj = np.eye(dim) - np.outer(u, u) / (dim * s2)
        jac += a * (p / math.sqrt(s2)) * proj * (z ** (p - 1))[None, :]
    return jac


def polynorm_term_bounds(p: int, dim: int, eps: float) -> tuple[float, float]:
    """Proven ``(lower, upper)`` bounds on ``sup ||J_p||_2`` for ``N_p(z) = z**p / sqrt(mean(z**2p) + eps)``.

    Upper: ``||J_p|| <= p max|z|**(p-1) / s_p`` (the projector has norm <= 1) and ``s_p**2 >= max|z|**(2p)/D
    + eps``; maximising ``h(t) = p t**(p-1) / sqrt(t**(2p)/D + eps)`` gives ``1/sqrt(eps)`` for ``p = 1``
    and ``p (D (p-1) eps)**((p-1)/(2p)) / sqrt(p eps)`` for ``p >= 2``. Lower: at ``z = (t, t, 0, ..)`` in the
    direction ``(1, -1, 0, ..)/sqrt(2)`` (orthogonal to ``u_p``) the norm is exactly ``h`` with ``D -> D/2``;
    for ``p = 1``, ``z = 0`` attains ``1/sqrt(eps)``. The two differ by the factor ``2**((p-1)/(2p))``.
    """
    if p == 1:
        return 1 / math.sqrt(eps), 1 / math.sqrt(eps)

    def h(dd: float) -> float:
        return p * (dd * (p - 1) * eps) ** ((p - 1) / (2 * p)) / math.sqrt(p * eps)

    return h(dim / 2), h(dim)


def polynorm_lipschitz_bounds(coefficients: Sequence[float], dim: int, eps: float,
                              cells: int = 200_000) -> dict[str, float]:
    """Global l2 Lipschitz bounds of PolyNorm (paper-order coefficients, ``D = dim``, ``dim >= 2``).

    Returns
    -------
    dict
        ``closed_upper = sum_p |a_p| C_p`` (closed form, proven); ``upper``: the proven bound
        ``sup_t g(t)``, ``g(t) = sum_p |a_p| p t**(p-1) / sqrt(t**(2p)/D + eps)`` (``t = max|z|``), bounded
        rigorously by monotone cell bounds on a geometric grid plus a ``sqrt(D)/t`` tail (float64, with a
        1e-9 relative outward margin); ``lower``: the largest ``||J v||`` at the exact constructions ``z = 0``
        and ``z = (t, t, 0, ..)``, ``v = (1, -1, 0, ..)/sqrt(2)`` (a valid lower bound on the constant).
    """
    if dim < 2:
        raise ValueError(f"polynorm_lipschitz_bounds needs dim >= 2 (two-hot lower bound), got {dim}")
    a = [abs(float(c)) for c in coefficients]
    ps = [p for p in range(1, len(a)) if a[p] != 0]
    closed = sum(a[p] * polynorm_term_bounds(p, dim, eps)[1] for p in ps)
    if not ps:
        return {"closed_upper": 0.0, "upper": 0.0, "lower": 0.0}
    # The critical scales of the individual terms are (D (p-1) eps)^(1/2p); cover them generously.
    t_star = max((dim * max(p - 1, 1) * eps) ** (1 / (2 * p)) for p in ps)
    t_min, t_max = t_star * 1e-9, t_star * 1e6
    grid = np.concatenate([[0.0], np.geomspace(t_min, t_max, cells)])
    lo_t, hi_t = grid[:-1], grid[1:]
    cell = np.zeros(lo_t.size)
    for p in ps:
        # numerator increases and denominator increases in t, so evaluate them at opposite cell ends
        cell += a[p] * p * hi_t ** (p - 1) / np.sqrt(lo_t ** (2 * p) / dim + eps)
    tail = sum(a[p] * p for p in ps) * math.sqrt(dim) / t_max
    upper = max(float(cell.max()), tail) * (1 + 1e-9)
    ts = np.concatenate([-grid[1:], grid[1:]])
    signed = [float(c) for c in coefficients]
    two_hot = np.abs(sum(signed[p] * p * ts ** (p - 1) / np.sqrt(2 * ts ** (2 * p) / dim + eps) for p in ps))
    lower = max(float(two_hot.max()), abs(signed[1]) / math.sqrt(eps) if len(signed) > 1 else 0.0)
    return {"closed_upper": closed, "upper": upper, "lower": lower}


def _polynorm_symbolic_facts() -> dict[str, bool]:
    """Sympy proofs: the Jacobian formula (D = 3), the maximiser of h_p and eps = 0 discontinuity."""
    eps = sympy.Symbol("eps", positive=True)
    zs = sympy.symbols("z1:4", real=True)
    dim = 3
    facts = {}
    jac_ok = True
    for p in (1, 2, 3):
        u = sympy.Matrix([z**p for z in zs])
        s = sympy.sqrt(sum(v**2 for v in u) / dim + eps)
        n_p = u / s
        jac = n_p.jacobian(zs)
        scale = sympy.diag(*[z ** (p - 1) for z in zs])
        formula = (p / s) * (sympy.eye(dim) - u * u.T / (dim * s**2)) * scale
        jac_ok &= sympy.simplify(jac - formula) == sympy.zeros(dim, dim)
    facts["jacobian_formula_D3"] = jac_ok
    tp, dsym = sympy.Symbol("t", positive=True), sympy.Symbol("D", positive=True)
    max_ok = True
    for p in (2, 3, 4):
        h2 = (p * tp ** (p - 1)) ** 2 / (tp ** (2 * p) / dsym + eps)
        crit = sympy.solve(sympy.Eq(sympy.diff(sympy.log(h2), tp), 0), tp)
        expected = (dsym * (p - 1) * eps) ** sympy.Rational(1, 2 * p)
        max_ok &= len(crit) == 1 and sympy.simplify(crit[0] - expected) == 0
        value = sympy.sqrt(h2.subs(tp, expected))
        closed = p * (dsym * (p - 1) * eps) ** sympy.Rational(p - 1, 2 * p) / sympy.sqrt(p * eps)
        max_ok &= sympy.simplify(value - closed) == 0
        # h -> 0 at t -> 0+ and t -> oo, so the unique critical point is the global maximum
        max_ok &= sympy.limit(h2, tp, 0, "+") == 0 and sympy.limit(h2, tp, sympy.oo) == 0
    facts["h_p_maximiser_p2..4"] = max_ok
    ts = sympy.Symbol("t", real=True)
    n1 = ts / sympy.sqrt(ts**2 / dsym)  # N_1(t e_1), first coordinate, eps = 0
    facts["eps0_jump_at_0"] = (sympy.limit(n1, ts, 0, "+") == sympy.sqrt(dsym)
                               and sympy.limit(n1, ts, 0, "-") == -sympy.sqrt(dsym))
    return facts


def check_polynorm_lipschitz(dims: Sequence[int] = (16, 64), eps: float = 1e-6, samples: int = 400,
                             seed: int = 0, cells: int = 200_000) -> CheckResult:
    """PolyNorm with ``eps > 0`` is globally l2-Lipschitz, for every order (proof + sampled test).

    What is true (proved here): ``N_p(z) = z**p / sqrt(mean(z**2p) + eps)`` is C^1 with Jacobian
    ``(p/s_p) P_p diag(z**(p-1))``, ``P_p = I - u_p u_p^T/(D s_p**2)`` of norm <= 1, so by the mean value
    inequality its global constant is ``sup ||J_p||``, which lies in
    ``[C_p 2**(-(p-1)/(2p)), C_p]`` with ``C_1 = 1/sqrt(eps)`` (attained at 0) and
    ``C_p = sqrt(p) (D (p-1) eps)**((p-1)/(2p)) / sqrt(eps)`` for ``p >= 2`` (:func:`polynorm_term_bounds`).
    So every term, including ``p >= 2``, is globally Lipschitz: the powers are tamed by the normalisation at
    large ``|z|`` (``||J_p|| <= p sqrt(D)/max|z|``) and vanish at ``z = 0``. The constants grow with the width
    like ``D**((p-1)/(2p))`` and blow up as ``eps -> 0`` (like ``eps**(-1/(2p))``; at ``eps = 0`` the map
    jumps at 0 and is not Lipschitz). For PolyNorm the constant lies between the lower and upper values of
    :func:`polynorm_lipschitz_bounds`. Measured: Jacobian spectral norms (closed form, cross-checked against
    torch autograd of :class:`lipbound.nn.polycom.PolyNorm`) and difference quotients at sampled points never
    exceed the proven constant.
    """
    import torch  # imported here so the sympy-only checks do not pay for importing torch

    from lipbound.nn.polycom import PolyNorm

    facts = _polynorm_symbolic_facts()
    rng = np.random.default_rng(seed)
    numbers: dict[str, object] = dict(facts)
    ok = all(facts.values())
    coef_sets = {"init": [0.0, 1 / 3, 1 / 3, 1 / 3], "mixed": [0.2, -0.7, 0.4, -0.25]}
    for dim in dims:
        # per-term bounds and the worst sampled Jacobian norm of each term
        for p in (1, 2, 3):
            lower, upper = polynorm_term_bounds(p, dim, eps)
            t_star = (dim * max(p - 1, 1) * eps) ** (1 / (2 * p))
            pts = _polynorm_samples(rng, dim, t_star, samples)
            coeffs = [0.0] * (p + 1)
            coeffs[p] = 1.0
            worst = max(np.linalg.norm(polynorm_jacobian(z, coeffs, eps), 2) for z in pts)
            ok &= worst <= upper and lower <= upper
            numbers[f"D{dim}_p{p}"] = f"lower={lower:.4g} sampled={worst:.4g} upper={upper:.4g}"
        for label, coeffs in coef_sets.items():
            bounds = polynorm_lipschitz_bounds(coeffs, dim, eps, cells)
            t_star = max((dim * max(p - 1, 1) * eps) ** (1 / (2 * p)) for p in (1, 2, 3))
            pts = _polynorm_samples(rng, dim, t_star, samples)
            jac_norms = [np.linalg.norm(polynorm_jacobian(z, coeffs, eps), 2) for z in pts]
            module = PolyNorm(order=3, eps=eps).double()
            module.set_coefficients(coeffs)
            auto_err = 0.0
            for z in pts[:: max(1, len(pts) // 20)]:
                jt = torch.autograd.functional.jacobian(module, torch.tensor(z, dtype=torch.float64)).numpy()
                ref = polynorm_jacobian(z, coeffs, eps)
                auto_err = max(auto_err, float(np.max(np.abs(jt - ref)) / max(1.0, np.max(np.abs(ref)))))
            quot = 0.0
            with torch.no_grad():
                for z in pts:
                    for scale in (1e-6, 1e-2, 1.0):
                        w = z + scale * max(float(np.max(np.abs(z))), t_star) * rng.standard_normal(dim)
                        fz = module(torch.tensor(z)).numpy()
                        fw = module(torch.tensor(w)).numpy()
                        quot = max(quot, float(np.linalg.norm(fz - fw) / np.linalg.norm(z - w)))
            worst = max(jac_norms)
            ok &= (worst <= bounds["upper"] and quot <= bounds["upper"] and bounds["lower"] <= bounds["upper"]
                   and bounds["upper"] <= bounds["closed_upper"] * (1 + 1e-9) and auto_err < 1e-8)
            numbers[f"D{dim}_{label}"] = (
                f"lower={bounds['lower']:.5g} sampled_J={worst:.5g} sampled_quot={quot:.5g} "
                f"upper={bounds['upper']:.5g} closed={bounds['closed_upper']:.5g} "
                f"autograd_relerr={auto_err:.1e}")
    return CheckResult("polynorm_globally_lipschitz", ok, MIXED, numbers,
                       "bounds proven (sympy + closed form); sampled Jacobians/quotients are measurements.")


def _polynorm_samples(rng: np.random.Generator, dim: int, t_star: float, count: int) -> list[np.ndarray]:
    """Test points: Gaussian, sparse and two-hot vectors at scales spanning the critical scale."""
    pts = [np.zeros(dim)]
    scales = np.geomspace(t_star * 1e-3, t_star * 1e3, max(count // 4, 2))
    for s in scales:
        g = rng.standard_normal(dim)
        pts.append(s * g / np.max(np.abs(g)))
        sparse = np.zeros(dim)
        idx = rng.choice(dim, size=rng.integers(1, min(dim, 4) + 1), replace=False)
        sparse[idx] = rng.choice([-1.0, 1.0], size=idx.size) * rng.uniform(0.5, 1.0, size=idx.size)
        pts.append(s * sparse)
        two_hot = np.zeros(dim)
        two_hot[:2] = s
        pts.append(two_hot)
        pts.append(s * rng.standard_normal(dim) * 0.1 + two_hot)
    return pts


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------


def run_all(fast: bool = False) -> list[CheckResult]:
    """Run every check; ``fast=True`` uses the coarse grids and fewer samples used by the test-suite."""
    results = [
        check_lemma1_special_cases(),
        check_lemma1_polynomials(max_order=4 if fast else 5),
        check_lemma1_product_gadget(),
        check_lemma1_shared_coefficients(),
        check_theorem1_relu_to_polyrelu(n_random_points=60 if fast else 200),
        check_theorem2_sawtooth(max_levels=6 if fast else 8),
        check_theorem3_gadgets(max_grid=4 if fast else 6),
    ]
    if fast:
        results.append(check_theorem3_rate(1, 2, grid_sizes=(4, 8, 16, 32), points_per_cell=16,
                                           relu_grid_sizes=(4, 8, 16)))
        results.append(check_theorem3_rate(2, 2, grid_sizes=(4, 6, 8, 12), points_per_cell=4,
                                           relu_grid_sizes=(3, 4, 6)))
    else:
        results.append(check_theorem3_rate(1, 2))
        results.append(check_theorem3_rate(2, 2))
        results.append(check_theorem3_rate(1, 3, grid_sizes=(4, 8, 16, 32, 64)))
    results.append(check_polyrelu_not_lipschitz())
    results.append(check_polynorm_lipschitz(samples=80 if fast else 400, cells=50_000 if fast else 200_000))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print one PASS/FAIL line per check; return 1 if any check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="coarse grids (as in the tests)")
    args = parser.parse_args(argv)
    results = run_all(fast=args.fast)
    for res in results:
        print(res.line())
        if res.note:
            print(f"    {res.note}")
    failed = [r.name for r in results if not r.passed]
    summary = f"{len(results) - len(failed)}/{len(results)} checks passed"
    print(summary + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
