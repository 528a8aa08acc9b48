"""Signal models of graph networks: skip connections, convolutions and pooling inside one SDP.

A :class:`~lipbound.graph.GraphNetwork` becomes a :class:`~lipbound.formulations.signal.SignalModel` by walking
its nodes in order and writing each node's value (as a difference of two inputs) as a linear combination of the
signal blocks ``v = [dx; dphi_1; ...]``: linear nodes transform the combinations (products of their matrices
with the running ones, each with a rigorous entrywise error bound), sums and concatenations merge them, and each
activation node starts a new block whose pre-activation is its input's combination. So a skip connection, a
convolution, a pooling layer or a BatchNorm between two activations are all folded exactly into the
pre-activation maps, and the whole network stays inside one LMI.

For a chain :class:`~lipbound.network.Network` this gives the same signal model as
:func:`~lipbound.formulations.signal.signal_model` (tested).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import scipy.sparse as sp

from lipbound.errors import FormulationError
from lipbound.formulations.signal import (
    Lin,
    SignalModel,
    SignalStage,
    combine,
    ladd,
    maxmin_as_residual_relu,
)
from lipbound.graph import Concat, Conv, GraphNetwork, LinearMap, Sum
from lipbound.network import GroupSortLayer, HouseholderLayer, ImplicitLayer, SlopeRestricted
from lipbound.program import UNIT_ROUNDOFF, gamma
from lipbound.rigorous import (
    exact_sum,
    frobenius_bound,
    round_up,
    spectral_norm_bound,
    spectral_norm_estimate,
    sqrt_up,
)

_TINY = np.finfo(float).tiny
# Dense coefficient matrices larger than this many entries are refused (about 3.2 GB each in float64).
MAX_DENSE_ENTRIES = 400_000_000


def _check_size(rows: int, cols: int, what: str) -> None:
    if rows * cols > MAX_DENSE_ENTRIES:
        raise FormulationError(f"{what}: a dense {rows} x {cols} coefficient matrix is too large for the dense "
                               "formulation; use per-channel multipliers on a smaller network or the structured "
                               "solver path.")


def _operator(op) -> tuple[sp.csr_matrix | np.ndarray, sp.csr_matrix | np.ndarray | None]:
    if isinstance(op, Conv):
        return op.matrix(), op.matrix_err()
    return op.matrix, op.err


def _is_selection(a) -> bool:
    m = a if sp.issparse(a) else None
    if m is None:
        return False
    return bool(np.all(m.data == 1.0)) and bool(np.all(np.diff(m.indptr) <= 1))


def op_times(a, a_err, b: Lin, n: int, what: str) -> Lin:
    """``A @ B`` for an operator ``A`` (dense or sparse, exact up to ``a_err``) and a running map ``B`` (``n``
    columns when ``B`` is an implicit identity), with a rigorous entrywise error bound."""
    rows = a.shape[0]
    sparse = sp.issparse(a)
    if b.mat is None:
        mat = a.toarray() if sparse else np.array(a, dtype=np.float64)
        _check_size(rows, mat.shape[1], what)
        mat = np.ldexp(mat, b.power)
        err = None if a_err is None else np.ldexp(a_err.toarray() if sp.issparse(a_err) else a_err, b.power)
        return Lin(mat, err)
    b = b.materialised()
    _check_size(rows, b.mat.shape[1], what)
    if sparse:
        prod = np.asarray(a @ b.mat)
        if _is_selection(a):
            err = None if b.err is None else np.asarray(a @ b.err)
        else:
            k = int(np.max(np.diff(a.indptr))) if a.nnz else 0
            err = gamma(k + 2) * np.asarray(abs(a) @ np.abs(b.mat))
            if b.err is not None:
                err = err + (1 + 4 * UNIT_ROUNDOFF) * np.asarray(abs(a) @ b.err)
    else:
        prod = a @ b.mat
        err = gamma(a.shape[1] + 2) * (np.abs(a) @ np.abs(b.mat))
        if b.err is not None:
            err = err + (1 + 4 * UNIT_ROUNDOFF) * (np.abs(a) @ b.err)
    if a_err is not None:
        mag = np.abs(b.mat) + (0 if b.err is None else b.err)
        extra = np.asarray(a_err @ mag) if sp.issparse(a_err) else a_err @ mag
        err = (0 if err is None else err) + (1 + 4 * UNIT_ROUNDOFF) * extra
    if err is None or (isinstance(err, np.ndarray) and not np.any(err)):
        return Lin(prod, None)
    return Lin(prod, err * (1 + 1e-12) + _TINY)


def _scale(lin: Lin, c: float, c_err: float, n: int) -> Lin:
    """``c * lin`` with ``|c_exact - c| <= c_err``."""
    if c == 1.0 and c_err == 0.0:
        return lin
    dense = lin.materialised()
    mat = dense.dense(n) if dense.mat is None else dense.mat
    prod = c * mat
    err = UNIT_ROUNDOFF * np.abs(prod)
    if dense.err is not None:
        err = err + (1 + 4 * UNIT_ROUNDOFF) * abs(c) * dense.err
    if c_err:
        err = err + (1 + 4 * UNIT_ROUNDOFF) * c_err * (np.abs(mat) + (0 if dense.err is None else dense.err))
    if not np.any(err):
        return Lin(prod, None)
    return Lin(prod, err * (1 + 1e-12) + _TINY)


def _stack(parts: list[tuple[dict[int, Lin], int]], dims: dict[int, int]) -> dict[int, Lin]:
    """Row-wise concatenation of combinations (``parts``: (combination, number of rows))."""
    keys = sorted({b for combo, _ in parts for b in combo})
    out = {}
    for b in keys:
        mats, errs, any_err = [], [], False
        for combo, rows in parts:
            lin = combo.get(b)
            if lin is None:
                mats.append(np.zeros((rows, dims[b])))
                errs.append(np.zeros((rows, dims[b])))
                continue
            lin = lin.materialised()
            mats.append(lin.dense(dims[b]) if lin.mat is None else lin.mat)
            errs.append(np.zeros((rows, dims[b])) if lin.err is None else lin.err)
            any_err |= lin.err is not None
        out[b] = Lin(np.vstack(mats), np.vstack(errs) if any_err else None)
    return out


def graph_signal_model(graph: GraphNetwork, maxmin_as_relu: bool = False, channel_groups: bool = False) -> SignalModel:
    """The signal model of a graph network (see the module docstring).

    ``channel_groups``: record each activation node's channel partition (its shape's leading dimension; a flat
    layer's neurons are their own channels) for per-channel multipliers.
    """
    nodes = graph.nodes
    consumers = graph.consumers()
    combos: dict[int, dict[int, Lin]] = {}
    stages: list[SignalStage] = []
    notes: list[str] = []
    first = consumers[0][0] if len(consumers[0]) == 1 else None
    input_map = None
    if first is not None and isinstance(nodes[first].op, (LinearMap, Conv)) and nodes[first].op.exact \
            and len(nodes[first].inputs) == 1:
        a, _ = _operator(nodes[first].op)
        _check_size(a.shape[0], a.shape[1], nodes[first].name)
        input_map = a.toarray() if sp.issparse(a) else np.array(a)
        combos[first] = {0: Lin(None)}
    else:
        input_map = np.eye(graph.input_dim)
        first = None
    combos[0] = {0: Lin(None)}
    dims = {0: input_map.shape[0]}

    def size_of(b: int) -> int:
        return dims[b]

    def add_stage(layer, pre, name, groups) -> int:
        stages.append(SignalStage(layer, pre, name, groups))
        dims[len(stages)] = layer.width
        return len(stages)

    def groups_of(node) -> np.ndarray | None:
        if not channel_groups:
            return None
        shape = node.shape
        per = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return np.repeat(np.arange(shape[0]), per) if per > 1 else np.arange(node.size)

    for i, node in enumerate(nodes):
        if i == 0 or i == first:
            continue
        op = node.op
        ins = [combos[j] for j in node.inputs]
        if isinstance(op, (LinearMap, Conv)):
            a, a_err = _operator(op)
            combos[i] = {b: op_times(a, a_err, lin, size_of(b), node.name) for b, lin in ins[0].items()}
        elif isinstance(op, Sum):
            out: dict[int, Lin] = {}
            for combo, c, e in zip(ins, op.coefficients, op.errors, strict=True):
                for b, lin in combo.items():
                    lin = _scale(lin, c, e, size_of(b))
                    out[b] = ladd(out[b], lin, size_of(b)) if b in out else lin
            combos[i] = out
        elif isinstance(op, Concat):
            combos[i] = _stack([(c, nodes[j].size) for c, j in zip(ins, node.inputs, strict=True)], dims)
        elif isinstance(op, ImplicitLayer):
            if not isinstance(op.activation, (SlopeRestricted, GroupSortLayer, HouseholderLayer)):
                raise FormulationError(f"implicit layer '{node.name}': unsupported activation.")
            k = len(stages) + 1
            pre = combine(_apply_dense(op.input_weight, ins[0], dims, node.name), {k: Lin(op.weight)}, op.width)
            add_stage(op.activation, pre, node.name, None)
            notes.append(f"implicit layer '{node.name}': assumes a unique fixed point for every input "
                         f"(well-posedness); s||W|| = {op.contraction_factor():.4g}"
                         + (" < 1, so it is guaranteed (contraction)." if op.contraction_factor() < 1
                            else " >= 1: not guaranteed by contraction, the bound holds for well-posed models."))
            combos[i] = {k: Lin(None)}
        elif isinstance(op, (SlopeRestricted, GroupSortLayer, HouseholderLayer)):
            pre = ins[0]
            if isinstance(op, SlopeRestricted) and np.array_equal(op.alpha, op.beta):
                # Exactly linear (identity-type) activations fold into the maps (their multiplier would be infinite).
                combos[i] = pre if np.all(op.alpha == 1.0) else {
                    b: op_times(sp.diags(op.alpha, format="csr"), None, lin, size_of(b), node.name)
                    for b, lin in pre.items()}
                continue
            if maxmin_as_relu and isinstance(op, GroupSortLayer) and op.group_size == 2:
                from lipbound.activations import ActivationSpec

                h, g, wt = maxmin_as_residual_relu(op.width)
                relu = SlopeRestricted(ActivationSpec("relu"), op.width, name=f"{node.name}_rr_relu")
                k = add_stage(relu, _apply_dense(wt, pre, dims, node.name), f"{node.name} (ReLU of the MaxMin rewrite)",
                              None)
                combos[i] = combine(_apply_dense(h, pre, dims, node.name), {k: Lin(g)}, op.width)
                continue
            k = add_stage(op, pre, node.name, groups_of(node) if isinstance(op, SlopeRestricted) else None)
            combos[i] = {k: Lin(None)}
        else:
            raise FormulationError(f"node '{node.name}' ({type(op).__name__}) has no formulation.")
    output = combos[graph.output]
    if not stages:
        notes.append("the network is linear: its Lipschitz constant is the norm of its matrix.")
    return SignalModel(graph.input_dim, input_map, tuple(stages), output, graph.output_dim, tuple(notes))


def _apply_dense(a: np.ndarray, combo: dict[int, Lin], dims: dict[int, int], what: str) -> dict[int, Lin]:
    return {b: op_times(a, None, lin, dims[b], what) for b, lin in combo.items()}



def _sum_up(values: np.ndarray) -> Fraction:
    """An upper bound on the exact sum of non-negative floats: ``fsum`` (correctly rounded) one ulp up, or the
    exact rational sum where the float sum overflows."""
    try:
        total = math.fsum(values.tolist())
    except OverflowError:  # an intermediate partial sum overflowed
        total = math.inf
    if math.isfinite(total):
        return Fraction(math.nextafter(total, math.inf))
    return exact_sum(values)


def _op_norm_l2(op, rigorous: bool = True) -> Fraction:
    """A rigorous upper bound on the spectral norm of a linear node's exact matrix (exact rationals: no overflow
    or underflow at any magnitude). ``rigorous=False``: the same quantity estimated in floating point (a Lanczos
    estimate of the norm, which never exceeds it up to rounding; the same ``sqrt(||A||_1 ||A||_inf)`` for matrices
    too large to hold densely), with the error matrix left out: at most the rigorous bound up to rounding."""
    a, a_err = _operator(op)
    rows, cols = a.shape
    if rows * cols <= MAX_DENSE_ENTRIES // 8:
        dense = a.toarray() if sp.issparse(a) else a
        bound = spectral_norm_bound(dense) if rigorous else Fraction(spectral_norm_estimate(dense))
    else:
        # ||A||_2 <= sqrt(||A||_1 ||A||_inf).
        absa = abs(sp.csr_matrix(a))
        row = max((_sum_up(absa.getrow(i).data) for i in range(rows)), default=Fraction(0))
        col_sums = absa.tocsc()
        col = max((_sum_up(col_sums.getcol(j).data) for j in range(cols)), default=Fraction(0))
        bound = Fraction(sqrt_up(row * col))
    if not rigorous:
        return bound
    if a_err is not None:
        e = a_err.data if sp.issparse(a_err) else np.asarray(a_err).ravel()
        bound += frobenius_bound(e)
    return bound


def _op_norm_linf(op, rows: np.ndarray | None = None) -> Fraction:
    """A rigorous upper bound on the induced l-infinity norm (max absolute row sum) of a linear node's matrix."""
    a, a_err = _operator(op)
    m = abs(sp.csr_matrix(a))
    if a_err is not None:
        m = m + abs(sp.csr_matrix(a_err))
    rows = range(m.shape[0]) if rows is None else rows
    # The stored |a| + |err| is a rounded sum: a second ulp covers it.
    return max((_sum_up(m.data[m.indptr[i]:m.indptr[i + 1]]) * (1 + Fraction(1, 2**52)) for i in rows),
               default=Fraction(0))


def graph_product_bound(graph: GraphNetwork, norm: str = "l2", output_index: int | None = None,
                        rigorous: bool = True) -> tuple[float, float, tuple]:
    """The matrix-product bound of a graph: each node's Lipschitz bound from its inputs' (linear nodes: operator
    norm times input bound; sums: ``sum |c_i| L_i``; concatenations: ``sqrt(sum L_i^2)`` in l2, ``max L_i`` in
    l-infinity; activations: largest |slope| times input bound; implicit layers: ``s||U|| / (1 - s||W||)``).

    Returns ``(certified, estimate, ())`` like :func:`~lipbound.formulations.lipsdp.product_bound` (no
    rebalancing). ``rigorous=False`` (l2): every operator norm is estimated instead of proved (see
    :func:`_op_norm_l2`), for :func:`~lipbound.formulations.lipsdp.product_estimate`.
    """
    from lipbound.network import max_slope

    if norm == "linf":
        if output_index is None:
            if graph.output_dim != 1:
                raise FormulationError("norm='linf' needs output_index for a network with several outputs.")
            output_index = 0
        if not 0 <= output_index < graph.output_dim:
            raise FormulationError(f"output_index {output_index} out of range for {graph.output_dim} outputs.")
    bounds: dict[int, Fraction] = {0: Fraction(1)}
    for i, node in enumerate(graph.nodes[1:], start=1):
        op = node.op
        ins = [bounds[j] for j in node.inputs]
        if isinstance(op, (LinearMap, Conv)):
            if norm == "l2":
                factor = _op_norm_l2(op, rigorous)
            else:
                rows = np.array([output_index]) if i == graph.output and isinstance(op, LinearMap) else None
                factor = _op_norm_linf(op, rows)
            bounds[i] = factor * ins[0]
        elif isinstance(op, Sum):
            bounds[i] = sum(((abs(Fraction(c)) + Fraction(e)) * b for c, e, b in zip(op.coefficients, op.errors, ins,
                                                                                         strict=True)), Fraction(0))
        elif isinstance(op, Concat):
            bounds[i] = Fraction(sqrt_up(sum((b * b for b in ins), Fraction(0)))) if norm == "l2" else max(ins)
        elif isinstance(op, HouseholderLayer) and norm == "linf":
            bounds[i] = Fraction(sqrt_up(op.group_size)) * ins[0]
        elif isinstance(op, (SlopeRestricted, GroupSortLayer, HouseholderLayer)):
            bounds[i] = Fraction(max_slope(op)) * ins[0]
        elif isinstance(op, ImplicitLayer):
            s = Fraction(max_slope(op.activation))
            if norm == "l2" and not rigorous:
                cw, cu = (Fraction(spectral_norm_estimate(w)) for w in (op.weight, op.input_weight))
            elif norm == "l2":
                cw, cu = spectral_norm_bound(op.weight), spectral_norm_bound(op.input_weight)
            else:
                cw = _op_norm_linf(LinearMap(op.weight))
                cu = _op_norm_linf(LinearMap(op.input_weight))
            if s * cw >= 1:
                raise FormulationError(f"mp: implicit layer '{node.name}' is not a contraction (s||W|| >= 1); no "
                                       "product bound.")
            bounds[i] = s * cu / (1 - s * cw) * ins[0]
        else:
            raise FormulationError(f"mp: node '{node.name}' ({type(op).__name__}) has no product bound.")
    cert = bounds[graph.output]
    return round_up(cert), round_up(cert), ()
