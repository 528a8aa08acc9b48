"""Activations that exporters decompose, recognised exactly; everything else they are made of is refused.

* ``x * Sigmoid(x)`` is SiLU and ``x * Tanh(Softplus(x))`` is Mish (the factors are graph nodes whose provenance
  is recorded when they are created);
* torch's Softplus with a threshold, ``Where(beta x > t, x, Softplus(beta x) / beta)``, is Softplus when
  ``t >= 50`` (as :mod:`lipbound.importers.aten` accepts it);
* GELU's erf form ``0.5 * x * (1 + Erf(x / sqrt(2)))``, its factors in any order: ``Erf`` and the arithmetic
  around it build an :class:`Expression` tree, which is recognised as ``K x (1 + erf(c x))`` (``K``, ``c`` exact
  rationals read from the file's constants) when it is used. That function is ``(sqrt(2) K / c) GELU(k x)`` with
  ``k = sqrt(2) c``, imported as exactly that: two scalings whose irrational coefficients carry rigorous error
  bounds around a GELU node. (With the exporters' rounded ``sqrt(2)`` the function is not exactly GELU, and this
  is what the file computes.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from lipbound.activations import ActivationSpec
from lipbound.importers.common import NodeValue, Unrepresentable, exact_float


@dataclass(frozen=True)
class Expression:
    """An element-wise function of input-dependent tensors that is not (yet) a graph node. ``tree`` is
    ``("leaf", node)``, ``("const", Fraction)``, ``("add", a, b)``, ``("mul", a, b)`` or ``("erf", a)``;
    ``sources`` are the ONNX nodes that built it (named when it is not recognised)."""

    tree: tuple
    shape: tuple[int, ...]
    sources: tuple[str, ...]

    def has_product(self) -> bool:
        """Whether it multiplies two input-dependent factors (for the hint when it is refused)."""
        return _has_product(self.tree)


@dataclass(frozen=True)
class Comparison:
    """``value > threshold`` (a ``Greater`` node), kept for the one pattern that uses it (torch's Softplus)."""

    value: NodeValue
    threshold: float
    source: str


class PatternOps:
    """The translator's operators for decomposed activations (a mixin of
    :class:`~lipbound.importers.onnx.translator.OnnxTranslator`)."""

    def _product(self, x: NodeValue, y: NodeValue, label: str, node) -> NodeValue | Expression:
        """``x * y`` of two input-dependent tensors: SiLU (``x * Sigmoid(x)``) and Mish (``x * Tanh(Softplus(x))``)
        when it is one, else an expression to be recognised later (or refused)."""
        for a, b in ((x, y), (y, x)):
            act = self.activation_of.get(b.node)
            if act is None or a.shape != b.shape:
                continue
            if act == ("sigmoid", a.node):
                return self._activation(a, ActivationSpec("silu"), label)
            if act[0] == "tanh" and self.activation_of.get(act[1]) == ("softplus", a.node):
                return self._activation(a, ActivationSpec("mish"), label)
        return self._expr_binary("mul", x, y, label)

    def _op_Greater(self, label, args, attrs, node):
        z, t = args
        if isinstance(z, NodeValue) and not isinstance(t, (NodeValue, Expression)) and np.asarray(t).size == 1:
            return Comparison(z, float(np.asarray(t).reshape(-1)[0]), label)
        self.hints.add("control")
        raise Unrepresentable("comparison (data-dependent control flow)")

    def _op_Where(self, label, args, attrs, node):
        """A constant mask selects (data movement); else only torch's Softplus with a threshold:
        ``Where(beta x > t, x, Softplus(beta x) / beta)``."""
        cond, x, soft = args
        if not isinstance(cond, (NodeValue, Expression, Comparison)):
            return self._movement(node, label, args, data=(1, 2))
        if isinstance(cond, Comparison) and isinstance(x, NodeValue) and isinstance(soft, NodeValue):
            z = cond.value
            source, beta = self._scaling(z.node)
            inner, factor = self._scaling(soft.node)
            if source == x.node and beta > 0 and factor * beta == 1 and x.shape == soft.shape \
                    and self.activation_of.get(inner) == ("softplus", z.node):
                if cond.threshold < 50:
                    raise Unrepresentable(f"Softplus(threshold={cond.threshold:g}): torch switches to the identity "
                                          "above threshold/beta, a jump that breaks slope restriction; use threshold "
                                          ">= 50")
                return self._activation(x, ActivationSpec("softplus", {"beta": float(beta)}), label)
        self.hints.add("control")
        raise Unrepresentable("data-dependent selection")

    def _scaling(self, node: int) -> tuple[int, Fraction]:
        """``(source, factor)`` with ``value(node) = factor * value(source)`` exactly (the node itself and 1 when
        it is not a recorded scaling)."""
        return self.scaled.get(node, (node, Fraction(1)))

    def _op_Erf(self, label, args, attrs, node):
        x = args[0]
        tree = x.tree if isinstance(x, Expression) else ("leaf", x.node)
        sources = (x.sources if isinstance(x, Expression) else ()) + (label,)
        return Expression(("erf", tree), x.shape, sources)

    def _as_tree(self, v, what: str):
        if isinstance(v, Expression):
            return v.tree, v.shape, v.sources
        if isinstance(v, NodeValue):
            return ("leaf", v.node), v.shape, ()
        if isinstance(v, tuple):
            return v, None, ()
        c = self._const(v, what)
        if c.size != 1:
            raise Unrepresentable(f"an element-wise expression combined with a constant of shape {c.shape}")
        return ("const", Fraction(float(c.reshape(-1)[0]))), None, ()

    def _expr_binary(self, kind: str, x, y, label: str) -> Expression | NodeValue:
        """``x + y`` or ``x * y`` where one operand is a pending expression (or both are input-dependent). A
        product that completes a known activation becomes its graph nodes at once, so that what follows (a second
        GELU of it, a skip connection) sees an ordinary tensor."""
        tx, sx, srcx = self._as_tree(x, "an operand")
        ty, sy, srcy = self._as_tree(y, "an operand")
        shapes = {s for s in (sx, sy) if s is not None}
        if len(shapes) != 1:
            raise Unrepresentable(f"an element-wise expression of tensors of shapes {sorted(shapes)}")
        expr = Expression((kind, tx, ty), shapes.pop(), tuple(dict.fromkeys(srcx + srcy + (label,))))
        if kind == "mul":
            try:
                return self._materialise(expr)
            except Unrepresentable:
                pass
        return expr

    def _expr_neg(self, y):
        """``-y`` as an expression tree (for ``Sub`` of or from an expression)."""
        if isinstance(y, Expression):
            return Expression(("mul", ("const", Fraction(-1)), y.tree), y.shape, y.sources)
        if isinstance(y, NodeValue):
            return Expression(("mul", ("const", Fraction(-1)), ("leaf", y.node)), y.shape, ())
        c = self._const(y, "an operand")
        if c.size != 1:
            raise Unrepresentable(f"an element-wise expression combined with a constant of shape {c.shape}")
        return ("const", -Fraction(float(c.reshape(-1)[0])))

    def _materialise(self, expr: Expression) -> NodeValue:
        """The graph nodes of an element-wise expression, when it is a known activation (GELU's erf form)."""
        if expr in self.materialised:
            return self.materialised[expr]
        tree = self._resolve(expr.tree)
        roots = _leaves(tree)
        if len(roots) != 1:
            raise Unrepresentable(f"element-wise expression {_describe(tree)} of several input-dependent tensors "
                                  "(a product of two input-dependent tensors)")
        root = NodeValue(roots.pop(), expr.shape)
        constant, terms = _sum_terms(tree)
        if len(terms) != 1:
            raise Unrepresentable(f"element-wise expression {_describe(tree)} is not a known activation")
        k_factor, factors = terms[0]
        label = expr.sources[-1]
        leaves = [f for f in factors if f[0] == "leaf"]
        others = [f for f in factors if f[0] != "leaf"]
        if len(leaves) != 1 or len(others) != 1:
            raise Unrepresentable(f"element-wise expression {_describe(tree)} is not a known activation")
        c = _one_plus_erf(others[0])
        if c is None or c <= 0:
            raise Unrepresentable(f"element-wise expression {_describe(tree)} is not a known activation")
        # K x (1 + erf(c x)) = (2K/k) GELU(k x) with k = sqrt(2) c.
        lo, hi = _sqrt2_interval()
        k, k_err = _float_enclosing(lo * c, hi * c)
        m_lo, m_hi = sorted((lo * k_factor / c, hi * k_factor / c))
        m, m_err = _float_enclosing(m_lo, m_hi)
        h = self._scale(root, k, label + "_in", k_err)
        h = self._activation(h, ActivationSpec("gelu"), label)
        h = self._scale(h, m, label + "_out", m_err)
        if constant:
            value, err = exact_float(constant)
            h = self._bias(h, np.full(h.size, value), label + "_const", np.full(h.size, err))
        self.materialised[expr] = h
        return h

    def _resolve(self, tree: tuple) -> tuple:
        """Leaves that are exact scalings of other nodes, replaced by the scaling of their source."""
        kind = tree[0]
        if kind == "leaf":
            node = tree[1]
            if node in self.scaled:
                src, q = self.scaled[node]
                return ("mul", ("const", q), self._resolve(("leaf", src)))
            return tree
        if kind == "const":
            return tree
        return (kind,) + tuple(self._resolve(t) for t in tree[1:])


def _sqrt2_interval() -> tuple[Fraction, Fraction]:
    """Floats ``lo < sqrt(2) < hi`` (checked in exact arithmetic)."""
    lo = math.sqrt(2.0)
    while Fraction(lo) ** 2 > 2:
        lo = math.nextafter(lo, 0.0)
    hi = math.nextafter(lo, math.inf)
    while Fraction(hi) ** 2 < 2:
        hi = math.nextafter(hi, math.inf)
    return Fraction(lo), Fraction(hi)


def _float_enclosing(lo: Fraction, hi: Fraction) -> tuple[float, float]:
    """A float ``f`` and ``e`` with ``[lo, hi]`` inside ``[f - e, f + e]``."""
    f = float((lo + hi) / 2)
    e = max(abs(Fraction(f) - lo), abs(Fraction(f) - hi))
    return f, math.nextafter(float(e), math.inf)


def _has_product(tree: tuple) -> bool:
    if tree[0] in ("leaf", "const"):
        return False
    if tree[0] == "mul" and _leaves(tree[1]) and _leaves(tree[2]):
        return True
    return any(_has_product(t) for t in tree[1:])


def _leaves(tree: tuple) -> set[int]:
    if tree[0] == "leaf":
        return {tree[1]}
    if tree[0] == "const":
        return set()
    return set().union(*(_leaves(t) for t in tree[1:]))


def _sum_terms(tree: tuple) -> tuple[Fraction, list[tuple[Fraction, list[tuple]]]]:
    """``tree`` as ``constant + sum_i K_i * prod(factors_i)`` (factors: leaves and non-polynomial subtrees)."""
    if tree[0] == "add":
        c1, t1 = _sum_terms(tree[1])
        c2, t2 = _sum_terms(tree[2])
        return c1 + c2, t1 + t2
    if tree[0] == "const":
        return tree[1], []
    k, factors = _product_factors(tree)
    return (Fraction(0), []) if k == 0 else (Fraction(0), [(k, factors)])


def _product_factors(tree: tuple) -> tuple[Fraction, list[tuple]]:
    if tree[0] == "mul":
        k1, f1 = _product_factors(tree[1])
        k2, f2 = _product_factors(tree[2])
        return k1 * k2, f1 + f2
    if tree[0] == "const":
        return tree[1], []
    return Fraction(1), [tree]


def _one_plus_erf(tree: tuple) -> Fraction | None:
    """``c`` when ``tree`` is ``1 + erf(c x)`` (``x`` a single leaf), else ``None``."""
    constant, terms = _sum_terms(tree)
    if constant != 1 or len(terms) != 1 or terms[0][0] != 1 or len(terms[0][1]) != 1:
        return None
    erf = terms[0][1][0]
    if erf[0] != "erf":
        return None
    inner_const, inner = _sum_terms(erf[1])
    if inner_const != 0 or len(inner) != 1 or len(inner[0][1]) != 1 or inner[0][1][0][0] != "leaf":
        return None
    return inner[0][0]


def _describe(tree: tuple) -> str:
    kind = tree[0]
    if kind == "leaf":
        return "x"
    if kind == "const":
        return f"{float(tree[1]):g}"
    if kind == "add":
        return f"({_describe(tree[1])} + {_describe(tree[2])})"
    if kind == "mul":
        return f"{_describe(tree[1])}*{_describe(tree[2])}"
    return f"{kind}({_describe(tree[1])})"

