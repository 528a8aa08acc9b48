"""Exact simplifications of an imported graph (nothing here rounds).

* a selection (0/1 rows, no constants) before or after an exact linear map is folded into it: selecting rows or
  columns of a matrix is exact;
* a multiplication by a power of two next to an exact linear map is folded into it (exact unless it over- or
  underflows, which is checked);
* an added constant after an exact linear map is folded into its bias when the sum is exact;
* a concatenation of exact linear maps of the same node becomes one linear map (the matrices stacked).

So a model written with ``torch.flatten``, ``x.view(...)``, ``2.0 * self.fc(x)`` stays a chain of dense layers
(:meth:`~lipbound.graph.GraphNetwork.to_network`), while everything else keeps its structure.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from lipbound.graph import Concat, GraphNetwork, LinearMap, Node, Sum, prune


def _is_selection(op) -> bool:
    """0/1 matrix with at most one 1 per row, no constant, exact."""
    if not isinstance(op, LinearMap) or not op.exact or np.any(op.bias):
        return False
    m = op.sparse()
    return bool(np.all(m.data == 1.0)) and bool(np.all(np.diff(m.indptr) <= 1))


def _columns_distinct(op: LinearMap) -> bool:
    m = op.sparse().tocsc()
    return bool(np.all(np.diff(m.indptr) <= 1))


def _power_of_two(c: float) -> int | None:
    if c == 0 or not math.isfinite(c):
        return None
    m, e = math.frexp(abs(c))
    return e - 1 if m == 0.5 else None


def _scaled(op: LinearMap, c: float) -> LinearMap | None:
    e = _power_of_two(c)
    if e is None:
        return None
    mat = op.dense() if not sp.issparse(op.matrix) else op.matrix.toarray()
    scaled = np.ldexp(mat, e) * np.sign(c)
    bias = np.ldexp(op.bias, e) * np.sign(c)
    if not (np.all(np.isfinite(scaled)) and np.array_equal(np.ldexp(scaled, -e) * np.sign(c), mat)
            and np.array_equal(np.ldexp(bias, -e) * np.sign(c), op.bias)):
        return None
    matrix = sp.csr_matrix(scaled) if sp.issparse(op.matrix) else scaled
    return LinearMap(matrix, bias, kind=op.kind)


def _compose(outer: LinearMap, inner: LinearMap) -> LinearMap | None:
    """``outer o inner`` when one of them is a selection that makes the product exact."""
    if not (outer.exact and inner.exact):
        return None
    if _is_selection(outer):
        sel = outer.sparse()
        mat = sel @ inner.matrix
        bias = sel @ inner.bias
        matrix = mat if sp.issparse(mat) else np.asarray(mat)
        if not sp.issparse(inner.matrix):
            matrix = np.asarray(mat)
        return LinearMap(matrix, bias, kind=inner.kind)
    if _is_selection(inner) and _columns_distinct(inner):
        sel = inner.sparse()
        mat = outer.matrix @ sel
        matrix = mat.toarray() if sp.issparse(mat) and not sp.issparse(outer.matrix) else mat
        return LinearMap(matrix, outer.bias, kind=outer.kind)
    return None


def _with_bias(op: LinearMap, extra: np.ndarray) -> LinearMap | None:
    total = op.bias + extra
    # Exact iff no rounding: (a + b) - a == b and (a + b) - b == a (Sterbenz-free check via two-sum).
    err = (op.bias - (total - (total - op.bias))) + (extra - (total - op.bias))
    if np.any(err != 0) or not np.all(np.isfinite(total)):
        return None
    return LinearMap(op.matrix, total, kind=op.kind)


def simplify(graph: GraphNetwork) -> GraphNetwork:
    """Apply the exact folds above until none applies."""
    nodes = list(graph.nodes)
    output = graph.output
    changed = True
    while changed:
        changed = False
        consumers = [0] * len(nodes)
        for n in nodes:
            for j in n.inputs:
                consumers[j] += 1
        for i, node in enumerate(nodes):
            stacked = _stacked_concat(nodes, i, consumers, output)
            if stacked is not None:
                nodes[i] = stacked
                changed = True
                break
            if i == 0 or len(node.inputs) != 1:
                continue
            j = node.inputs[0]
            prev = nodes[j]
            if j == 0 or consumers[j] != 1 or j == output:
                continue
            merged = None
            op, pop = node.op, prev.op
            if isinstance(op, LinearMap) and isinstance(pop, LinearMap):
                if op.kind == "bias" and pop.exact and _is_identity(op):
                    merged = _with_bias(pop, op.bias)
                else:
                    merged = _compose(op, pop)
            elif isinstance(op, Sum) and len(op.coefficients) == 1 and op.errors[0] == 0 and isinstance(pop,
                                                                                                          LinearMap):
                merged = _scaled(pop, op.coefficients[0]) if pop.exact else None
            elif isinstance(op, LinearMap) and isinstance(pop, Sum) and len(pop.coefficients) == 1 \
                    and pop.errors[0] == 0 and op.exact:
                scaled = _scaled(LinearMap(op.matrix, np.zeros(op.out_dim), kind=op.kind), pop.coefficients[0])
                merged = None if scaled is None else LinearMap(scaled.matrix, op.bias, kind=op.kind)
            if merged is not None:
                nodes[i] = Node(node.name, merged, prev.inputs, node.shape)
                changed = True
                break
        if changed:
            pruned, output = prune(nodes, output)
            nodes = list(pruned)
    return GraphNetwork(tuple(nodes), output, graph.name)


def _stacked_concat(nodes: list[Node], i: int, consumers: list[int], output: int) -> Node | None:
    """A concatenation of exact linear maps of one and the same node (each used only here) is one linear map with
    the matrices stacked (no arithmetic, so exact): e.g. the minima and maxima of one GroupSort, concatenated."""
    node = nodes[i]
    if not isinstance(node.op, Concat) or len(node.inputs) < 2:
        return None
    parts = [nodes[j] for j in node.inputs]
    if any(j == output or consumers[j] != 1 or not isinstance(p.op, LinearMap) or not p.op.exact
           or len(p.inputs) != 1 for j, p in zip(node.inputs, parts, strict=True)):
        return None
    if len({p.inputs[0] for p in parts}) != 1 or len(set(node.inputs)) != len(node.inputs):
        return None
    sparse = all(sp.issparse(p.op.matrix) for p in parts)
    matrix = sp.vstack([p.op.sparse() for p in parts], format="csr") if sparse else np.vstack(
        [p.op.dense() for p in parts])
    bias = np.concatenate([p.op.bias for p in parts])
    kinds = {p.op.kind for p in parts}
    return Node(node.name, LinearMap(matrix, bias, kind=kinds.pop() if len(kinds) == 1 else "linear"),
                parts[0].inputs, node.shape)


def _is_identity(op: LinearMap) -> bool:
    m = op.sparse()
    return m.shape[0] == m.shape[1] and m.nnz == m.shape[0] and np.all(m.data == 1.0) and np.array_equal(
        m.indices, np.arange(m.shape[0]))
