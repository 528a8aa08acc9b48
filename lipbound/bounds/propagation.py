"""Bound propagation on graph networks: interval bound propagation (IBP) and CROWN, outward rounded.

Both run on any :class:`~lipbound.graph.GraphNetwork` (a chain :class:`~lipbound.network.Network` is converted
with :meth:`~lipbound.graph.GraphNetwork.from_network`, residual blocks becoming sum nodes) and return a box
``[lo, hi]`` for the value of every node that holds for every input of the domain.

IBP
    Nodes in topological order. Linear operators (dense, sparse, convolutions, with their inexact-coefficient
    error bounds) in centre/radius form (:mod:`lipbound.bounds.operators`); a linear operator applied to the
    input itself is concretised over the domain (dual norm for balls), not over its enclosing box. Sums by
    outward-rounded interval arithmetic, concatenations by concatenation, activations by their interval images
    (:mod:`lipbound.bounds.relaxations`).

CROWN (backward linear relaxation on a DAG)
    For every node that feeds a nonlinearity (an activation's pre-activation), a backward pass from that node
    visits the nodes in reverse topological order and accumulates, per node, the linear coefficients of a lower
    and an upper bound of the target in terms of that node's value: a linear operator maps the coefficients
    back through ``lam A`` (transposed convolution for convolutions), a sum hands each input its scaled
    coefficients, a concatenation its slice, so skip connections add at the node where they branch; a
    slope-restricted activation substitutes its relaxation lines according to the coefficients' signs. The
    input's coefficients are concretised over the domain. GroupSort and Householder nodes have no linear
    relaxation: the pass concretises their coefficients over the node's box (so max pooling is crossed as in
    IBP) and logs this. Every node's box is intersected with the IBP box, so CROWN is never looser than IBP.

Rounding
    Products and sums follow the model of :mod:`lipbound.bounds.operators`. In the backward pass the
    difference between a computed and the exact coefficient matrix (products with the operator, scaling by a
    sum's coefficients, accumulation of two consumers' coefficients, inexact operator entries) is charged to
    the constant term through a bound on the magnitude of the variable it multiplies (the node's box).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lipbound.bounds.domains import Concretizer
from lipbound.bounds.operators import (
    F64,
    LinearOperator,
    U,
    abs_term,
    inflate,
    linear_operator,
    mv,
    nan_to,
    operator_box,
    rel,
)
from lipbound.bounds.relaxations import activation_image, linear_relaxation
from lipbound.graph import Concat, Conv, GraphNetwork, LinearMap, Sum
from lipbound.network import GroupSortLayer, HouseholderLayer, SlopeRestricted
from lipbound.rigorous import outward_down as _dn
from lipbound.rigorous import outward_up as _up

#: Entries of one coefficient matrix of the backward pass (the target's rows are processed in chunks).
CROWN_ENTRIES = 1 << 22

Interval = tuple[torch.Tensor, torch.Tensor]


def _intersect(a: Interval, b: Interval | None) -> Interval:
    if b is None:
        return a
    return torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1])


def _sum_box(op: Sum, boxes: list[Interval]) -> Interval:
    """Outward-rounded ``sum_i c_i [lo_i, hi_i]`` plus ``+- e_i max |x_i|`` for inexact coefficients."""
    lo = hi = None
    for c, e, (bl, bh) in zip(op.coefficients, op.errors, boxes, strict=True):
        if c == 1.0:
            pl, ph = bl, bh
        elif c == -1.0:
            pl, ph = -bh, -bl
        elif c > 0:
            pl, ph = _dn(c * bl), _up(c * bh)
        else:
            pl, ph = _dn(c * bh), _up(c * bl)
        if e:
            m = _up(e * torch.maximum(bl.abs(), bh.abs()))
            pl, ph = _dn(pl - m), _up(ph + m)
        lo = pl if lo is None else _dn(lo + pl)
        hi = ph if hi is None else _up(hi + ph)
    return nan_to(lo, -math.inf), nan_to(hi, math.inf)


def _rounding_charge(coef: torch.Tensor, hmax: torch.Tensor) -> torch.Tensor:
    """A bound of ``|(C - fl(C)) v|`` for ``|v| <= hmax`` when ``coef = fl(C)`` is one rounded operation per
    entry (a product or a sum): ``|fl(C) - C| <= 2u |fl(C)| + TINY`` entrywise."""
    n = coef.shape[-1]
    return inflate(2.0 * U * inflate(mv(coef.abs(), hmax), n), n, hmax.sum())


@dataclass
class _Side:
    """One side (lower or upper) of a backward pass: coefficients per node and the constant term."""

    lower: bool
    d: torch.Tensor
    lam: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, value: torch.Tensor | None, err: torch.Tensor) -> None:
        """``d += value`` (if given), widened by ``err >= 0`` in the sound direction."""
        d = self.d
        if self.lower:
            d = d if value is None else _dn(d + value)
            self.d = nan_to(_dn(d - err), -math.inf)
        else:
            d = d if value is None else _up(d + value)
            self.d = nan_to(_up(d + err), math.inf)


class Propagation:
    """IBP or CROWN through one graph over one domain (see the module docstring).

    Parameters
    ----------
    graph : GraphNetwork
    domain : Concretizer
        The input domain in torch form (its device is where the products run).
    crown : bool
        Add CROWN bounds for the pre-activation nodes (else plain IBP).
    reference : list of (lo, hi), optional
        Boxes of every node (e.g. from IBP) to intersect with.
    operators : dict, optional
        ``{node index: LinearOperator}`` built earlier (shared between passes).
    """

    def __init__(self, graph: GraphNetwork, domain: Concretizer, crown: bool, reference: list[Interval] | None = None,
                 operators: dict[int, LinearOperator] | None = None):
        self.graph = graph
        self.nodes = graph.nodes
        self.domain = domain
        self.crown = crown
        self.reference = reference
        self.device = domain.center.device
        self.operators = operators if operators is not None else build_operators(graph, self.device)
        self.boxes: list[Interval] = []
        self.relaxations: dict[int, tuple[torch.Tensor, ...]] = {}
        self._hmax: dict[int, torch.Tensor] = {}
        self.targets = {node.inputs[0] for node in self.nodes if node.is_activation} - {0}

    # -- forward (topological order) ------------------------------------------------------------------
    def run(self) -> list[Interval]:
        """The box of every node, in node order."""
        for i in range(len(self.nodes)):
            box = self._interval(i)
            if self.reference is not None:
                box = _intersect(box, self.reference[i])
            if self.crown and i in self.targets and self._needs_crown(i):
                box = _intersect(box, self._crown(i))
            if bool(torch.any(box[0] > box[1])):  # both are sound enclosures of a non-empty set
                raise RuntimeError(f"internal error: empty bounds for node '{self.nodes[i].name}'.")
            self.boxes.append(box)
            op = self.nodes[i].op
            if self.crown and isinstance(op, SlopeRestricted):
                self._relax(i, op)
        return self.boxes

    def _needs_crown(self, i: int) -> bool:
        """Whether CROWN can improve on the IBP box of a pre-activation node: only for linear nodes other than a
        linear operator of the input (IBP concretises that over the domain already). The output of a nonlinear
        node is best bounded by its image: CROWN would bound it through the node's own relaxation lines (or
        its box), which lie outside the image."""
        node = self.nodes[i]
        if isinstance(node.op, (LinearMap, Conv)):
            return node.inputs[0] != 0
        return node.is_linear

    def _interval(self, i: int) -> Interval:
        node = self.nodes[i]
        op = node.op
        if i == 0:
            return self.domain.box
        if isinstance(op, (LinearMap, Conv)):
            a = self.operators[i]
            if node.inputs[0] == 0:
                return self.domain.operator_bounds(a)
            return operator_box(a, *self.boxes[node.inputs[0]])
        if isinstance(op, Sum):
            return _sum_box(op, [self.boxes[j] for j in node.inputs])
        if isinstance(op, Concat):
            return (torch.cat([self.boxes[j][0] for j in node.inputs]),
                    torch.cat([self.boxes[j][1] for j in node.inputs]))
        lo, hi = activation_image(op, *self.boxes[node.inputs[0]])
        return nan_to(lo, -math.inf), nan_to(hi, math.inf)

    def _relax(self, i: int, op: SlopeRestricted) -> None:
        z = self.boxes[self.nodes[i].inputs[0]]
        img = self.boxes[i]
        lines = linear_relaxation(op.activation, z[0].cpu().numpy(), z[1].cpu().numpy(), img[0].cpu().numpy(),
                                  img[1].cpu().numpy())
        tens = tuple(torch.tensor(v, dtype=F64, device=self.device) for v in lines)
        self.relaxations[i] = (*tens, torch.maximum(z[0].abs(), z[1].abs()))

    def hmax(self, i: int) -> torch.Tensor:
        """``max |x|`` over the box of node ``i``."""
        if i not in self._hmax:
            lo, hi = self.boxes[i]
            self._hmax[i] = torch.maximum(lo.abs(), hi.abs())
        return self._hmax[i]

    # -- CROWN ---------------------------------------------------------------------------------------
    def _crown(self, t: int) -> Interval:
        size = self.nodes[t].size
        widest = max(node.size for node in self.nodes[:t + 1])
        chunk = max(1, min(size, CROWN_ENTRIES // widest))
        parts = [self._backward(t, a, min(a + chunk, size)) for a in range(0, size, chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _backward(self, t: int, start: int, stop: int) -> Interval:
        """CROWN bounds of the entries ``start:stop`` of the linear node ``t``."""
        k = stop - start
        zeros = torch.zeros(k, dtype=F64, device=self.device)
        sides = (_Side(True, zeros), _Side(False, zeros))
        self._start(t, start, stop, sides)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for j in range(t - 1, 0, -1):
            if j not in sides[0].lam:
                continue
            coefs = [side.lam.pop(j) for side in sides]
            op = self.nodes[j].op
            if isinstance(op, (LinearMap, Conv)):
                self._through_linear(j, coefs, sides)
            elif isinstance(op, Sum):
                self._through_sum(j, coefs, sides)
            elif isinstance(op, Concat):
                self._through_concat(j, coefs, sides)
            elif isinstance(op, SlopeRestricted):
                self._through_activation(j, coefs, sides)
            else:  # GroupSort, Householder: no linear relaxation, concretise over the node's box
                box = Concretizer.from_box(*self.boxes[j])
                parts.append((box.lower(coefs[0], zeros), box.upper(coefs[1], zeros)))
        if 0 in sides[0].lam:
            lo = self.domain.lower(sides[0].lam.pop(0), sides[0].d)
            hi = self.domain.upper(sides[1].lam.pop(0), sides[1].d)
        else:
            lo, hi = sides[0].d, sides[1].d
        for plo, phi in parts:
            lo, hi = _dn(lo + plo), _up(hi + phi)
        return nan_to(lo, -math.inf), nan_to(hi, math.inf)

    def _accumulate(self, side: _Side, i: int, coef: torch.Tensor) -> None:
        """Add ``coef`` to the coefficients of node ``i``, charging the rounding of the sum."""
        if i not in side.lam:
            side.lam[i] = coef
            return
        total = side.lam[i] + coef
        side.add(None, _rounding_charge(total, self.hmax(i)))
        side.lam[i] = total

    def _start(self, t: int, start: int, stop: int, sides: tuple[_Side, _Side]) -> None:
        """The exact expression of the rows ``start:stop`` of a linear node in terms of its inputs."""
        node = self.nodes[t]
        op = node.op
        k = stop - start
        if isinstance(op, (LinearMap, Conv)):
            a = self.operators[t]
            rows = a.rows(start, stop)
            err = None
            if a.inexact:
                err = inflate(a.err_matvec(self.hmax(node.inputs[0]))[start:stop], a.in_dim)
                if a.bias_err is not None:
                    err = _up(err + a.bias_err[start:stop])
            for side in sides:
                side.d = a.bias[start:stop].clone()  # 0 + b: exact
                if err is not None:
                    side.add(None, err)
                self._accumulate(side, node.inputs[0], rows)
            return
        offset = 0
        rows = torch.arange(k, device=self.device)
        for n, j in enumerate(node.inputs):
            width = self.nodes[j].size
            coef = torch.zeros(k, width, dtype=F64, device=self.device)
            err = None
            if isinstance(op, Sum):  # the same rows of every input, times the (float) coefficient: exact
                coef[rows, rows + start] = op.coefficients[n]
                if op.errors[n]:
                    err = _up(op.errors[n] * self.hmax(j)[start:stop])
            else:  # Concat: the part of the rows that falls into this input
                lo, hi = max(start, offset), min(stop, offset + width)
                if lo < hi:
                    coef[rows[lo - start:hi - start], torch.arange(lo - offset, hi - offset, device=self.device)] = 1.0
                offset += width
            for side in sides:
                if err is not None:
                    side.add(None, err)
                self._accumulate(side, j, coef)

    def _through_linear(self, j: int, coefs: list[torch.Tensor], sides: tuple[_Side, _Side]) -> None:
        """From ``lam y`` with ``y = A x + b`` to ``fl(lam A) x + lam b``: the products' errors are at most
        ``gamma |lam| (|A| |x| + |b|)`` (Higham), inexact entries add ``|lam| (E |x| + e_b)``."""
        i = self.nodes[j].inputs[0]
        a = self.operators[j]
        hm = self.hmax(i)
        wmag = a.abs_matvec(hm) + a.bias.abs() + abs_term(a.fwd_terms)  # covers underflow inside |A| hm
        emag = None
        if a.inexact:
            emag = a.err_matvec(hm) + abs_term(a.in_dim)
            if a.bias_err is not None:
                emag = emag + a.bias_err
        for side, lam in zip(sides, coefs, strict=True):
            n = lam.shape[-1]
            lam_abs = lam.abs()
            err = _up(_up(rel(n + a.fwd_terms + 1) * mv(lam_abs, wmag)) + abs_term(n + a.fwd_terms, hm.sum()))
            if emag is not None:
                err = _up(err + inflate(mv(lam_abs, emag), n + a.in_dim + 1, hm.sum()))
            side.add(mv(lam, a.bias), nan_to(err, math.inf))
            self._accumulate(side, i, a.rmatmat(lam))

    def _through_sum(self, j: int, coefs: list[torch.Tensor], sides: tuple[_Side, _Side]) -> None:
        op = self.nodes[j].op
        for i, c, e in zip(self.nodes[j].inputs, op.coefficients, op.errors, strict=True):
            hm = self.hmax(i)
            for side, lam in zip(sides, coefs, strict=True):
                if c in (1.0, -1.0):
                    coef = lam if c == 1.0 else -lam
                else:
                    coef = c * lam
                    side.add(None, _rounding_charge(coef, hm))
                if e:
                    side.add(None, _up(e * inflate(mv(lam.abs(), hm), lam.shape[-1], hm.sum())))
                self._accumulate(side, i, coef)

    def _through_concat(self, j: int, coefs: list[torch.Tensor], sides: tuple[_Side, _Side]) -> None:
        offset = 0
        for i in self.nodes[j].inputs:
            width = self.nodes[i].size
            for side, lam in zip(sides, coefs, strict=True):
                self._accumulate(side, i, lam[:, offset:offset + width])
            offset += width

    def _through_activation(self, j: int, coefs: list[torch.Tensor], sides: tuple[_Side, _Side]) -> None:
        """From ``lam phi(z)`` to ``B z + e`` with the relaxation lines, valid as a lower (upper) bound.

        ``B = lam^+ s_a + lam^- s_b`` entrywise (one rounding per entry, error ``<= 2u |B|`` times ``|z| <=
        zmax``); ``e = lam^+ i_a + lam^- i_b`` with Higham's bound.
        """
        sl, il, su, iu, zmax = self.relaxations[j]
        i = self.nodes[j].inputs[0]
        for side, lam in zip(sides, coefs, strict=True):
            pos, neg = lam.clamp(min=0.0), lam.clamp(max=0.0)
            if side.lower:  # lam^+ takes the lower line, lam^- the upper line
                s_a, i_a, s_b, i_b = sl, il, su, iu
            else:
                s_a, i_a, s_b, i_b = su, iu, sl, il
            mat = pos * s_a + neg * s_b
            e = mv(pos, i_a) + mv(neg, i_b)
            n = lam.shape[-1]
            mag = mv(pos, i_a.abs()) - mv(neg, i_b.abs())
            err = _up(_up(rel(2 * n) * mag) + _up(4.0 * U * mv(mat.abs(), zmax)) + abs_term(2 * n, zmax.sum()))
            side.add(e, nan_to(err, math.inf))
            self._accumulate(side, i, mat)


def build_operators(graph: GraphNetwork, device: torch.device) -> dict[int, LinearOperator]:
    """The :class:`~lipbound.bounds.operators.LinearOperator` of every linear-operator node."""
    return {i: linear_operator(node.op, device) for i, node in enumerate(graph.nodes)
            if isinstance(node.op, (LinearMap, Conv))}


def no_relaxation(graph: GraphNetwork) -> list[str]:
    """Names (and types) of the nonlinear nodes CROWN crosses by their boxes."""
    return [f"'{node.name}' ({type(node.op).__name__})" for node in graph.nodes
            if isinstance(node.op, (GroupSortLayer, HouseholderLayer))]
