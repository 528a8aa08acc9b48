"""Solver-independent linear matrix inequality (LMI) programs.

A :class:`Program` is ``minimize c^T y`` subject to sign constraints on ``y`` and one or more LMIs
``M_t(y) <= 0`` (negative semidefinite). Each LMI is block structured and is a sum of
:class:`Term` objects, each contributing ``L diag(d) R^T`` (and its transpose) to one block, where
``d = coef @ y + const``. This low-rank form is what the formulations naturally produce (LipSDP
multipliers enter through rank-1/rank-2 coefficient matrices); it lets backends assemble the LMI
sparsely (cvxpy), densely (the certificate), or exploit it directly (the structured solver).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

UNIT_ROUNDOFF = 2.0**-53
_SUBNORMAL = 2.0**-1074


def gamma(k: int) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``, rounded up generously (doubled)."""
    ku = k * UNIT_ROUNDOFF
    if ku >= 0.5:
        raise ValueError(f"problem too large for the rounding-error analysis (k = {k}).")
    return 2.0 * ku / (1.0 - ku)


def block_offsets(sizes) -> np.ndarray:
    """First row of each block and the total, ``[0, s0, s0 + s1, ...]``, for blocks of the given sizes.

    >>> block_offsets([2, 3]).tolist()
    [0, 2, 5]
    """
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int)


@dataclass(frozen=True, eq=False)
class Term:
    """Contribution ``L diag(coef @ y + const) R^T`` to block ``(row, col)`` (and its transpose).

    ``left``/``right`` are dense arrays of shape (n_row, p)/(n_col, p), or ``None`` for the identity
    (then the block size equals p). For ``row == col``, ``left`` must equal ``right`` unless
    ``mirror`` is set, which adds ``L D R^T + R D L^T`` (a symmetric cross term inside one block).
    Entries of ``left``, ``right`` are exact data unless ``left_err``/``right_err`` (same shapes) give
    entrywise bounds on their distance to the exact factors (e.g. for products of weight matrices
    computed in floating point). Entries of ``coef`` and ``const`` may carry up to ``coef_ops``
    floating-point roundings each. Both are accounted for in the certificate's radius.
    """

    row: int
    col: int
    left: np.ndarray | None
    right: np.ndarray | None
    coef: sp.csr_matrix
    const: np.ndarray | None = None
    coef_ops: int = 3
    left_err: np.ndarray | None = None
    right_err: np.ndarray | None = None
    mirror: bool = False

    @property
    def rank(self) -> int:
        return self.coef.shape[0]

    def diagonal_values(self, y: np.ndarray) -> np.ndarray:
        d = self.coef @ y
        if self.const is not None:
            d = d + self.const
        return d

    def magnitude(self, y: np.ndarray) -> np.ndarray:
        """An upper bound (up to rounding) on |d| computed from |coef| |y| + |const|."""
        d = abs(self.coef) @ np.abs(y)
        if self.const is not None:
            d = d + np.abs(self.const)
        return d

    def product(self, d: np.ndarray) -> np.ndarray:
        """Dense ``L diag(d) R^T``."""
        if self.left is None and self.right is None:
            return np.diag(d)
        if self.right is None:
            return self.left * d
        if self.left is None:
            return (self.right * d).T
        return (self.left * d) @ self.right.T


@dataclass(frozen=True, eq=False)
class BlockPattern:
    """Which blocks of a symmetric block matrix may be non-zero: ``sizes`` of the diagonal blocks and a
    symmetric boolean ``adjacency`` (blocks x blocks, diagonal set). Entries outside these blocks are exactly
    zero, in exact arithmetic and in floating point alike."""

    sizes: tuple[int, ...]
    adjacency: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        return block_offsets(self.sizes)

    def contains(self, a) -> bool:
        """Whether every non-zero entry of ``a`` (a numpy array or a torch tensor) lies in an allowed block."""
        off = self.offsets
        nb = len(self.sizes)
        for r in range(nb):
            for c in range(r):
                if not self.adjacency[r, c] and bool((a[off[r]:off[r + 1], off[c]:off[c + 1]] != 0).any()):
                    return False
        return True


@dataclass(frozen=True, eq=False)
class EntrywiseBound:
    """An entrywise bound ``|E| <= sum_t |L_t| diag(w_t) |R_t|^T`` on a symmetric perturbation ``E`` of a block matrix.

    Each piece ``(a, L, w, b, R, support)`` bounds the entries of block ``(a, b)``: ``L`` has the rows of block
    ``a`` and ``R`` those of block ``b`` (``None``: the identity), ``w >= 0`` one weight per column; with
    ``support`` True, ``|L|`` and ``|R|`` are replaced by the indicators of their non-zeros (for per-operation
    underflow); ``"left"`` or ``"right"`` replaces that side only (an underflow in ``L diag(d)`` carried through
    ``R``). The bound need not be symmetric itself. What Rump's test needs is the row sums of ``D |E| D`` for a
    positive diagonal scaling ``D`` (:meth:`row_sums`), which bound ``E`` in the Gershgorin sense:
    ``D E D >= -diag(row sums)``. Keeping the factors (instead of, say, a rank-one Cauchy-Schwarz bound) keeps the
    bound zero where the exact entries are structurally zero, which matters once rows are scaled far apart.
    """

    block_sizes: tuple[int, ...]
    pieces: tuple[tuple[int, np.ndarray | None, np.ndarray, int, np.ndarray | None, bool], ...]

    @classmethod
    def uniform(cls, radius: float, pattern: BlockPattern | None, size: int) -> EntrywiseBound:
        """``|E_ij| <= radius`` on the blocks of ``pattern`` (every entry when ``pattern`` is None)."""
        if pattern is None:
            pattern = BlockPattern((size,), np.ones((1, 1), dtype=bool))
        sizes = pattern.sizes
        pieces = tuple((a, np.ones((sizes[a], 1)), np.array([float(radius)]), b, np.ones((sizes[b], 1)), False)
                       for a in range(len(sizes)) for b in range(len(sizes)) if pattern.adjacency[a, b] and radius)
        return cls(tuple(sizes), pieces)

    @property
    def offsets(self) -> np.ndarray:
        return block_offsets(self.block_sizes)

    def with_diagonal(self, extra: np.ndarray) -> EntrywiseBound:
        """The bound plus ``diag(extra)`` (e.g. the rounding of a diagonal shift)."""
        off = self.offsets
        added = tuple((b, None, np.asarray(extra[off[b]:off[b + 1]], dtype=float), b, None, False)
                      for b in range(len(self.block_sizes)))
        return EntrywiseBound(self.block_sizes, self.pieces + added)

    def dense(self) -> np.ndarray:
        """The bound as a dense matrix (for tests and small problems)."""
        off = self.offsets
        n = int(off[-1])
        out = np.zeros((n, n))
        for a, left, w, b, right, support in self.pieces:
            lm = _magnitude(left, _side(support, "left"), w.size)
            rm = _magnitude(right, _side(support, "right"), w.size)
            out[off[a]:off[a + 1], off[b]:off[b + 1]] += (lm * w) @ rm.T
        return out

    def row_sums(self, scale: np.ndarray | None = None) -> np.ndarray:
        """Upper bounds on ``sum_j s_i s_j |E_ij|`` per row (``s = scale``, default all ones), rounded up.

        Evaluated in floating point from non-negative terms: each piece is ``s_a |L| (w (|R|^T s_b))``, whose
        relative rounding error is at most ``gamma`` of the number of operations along the way (inflated for), and
        whose underflows (at most ``2^-1075`` per operation) are bounded by ``(n_b + 4) (s_a |L| w + 1) + (p + 4)
        s_a`` units of ``2^-1074`` per row.
        """
        off = self.offsets
        n = int(off[-1])
        s = np.ones(n) if scale is None else np.asarray(scale, dtype=float)
        out = np.zeros(n)
        lost = np.zeros(n)
        ops = 8
        # Pieces share factors (a term's float, underflow and inexact-factor pieces): |L| once per factor and flag in
        # this call (the pieces keep the arrays alive, so their ids are stable here). 2048-wide factors: 10-15 ms each.
        seen: dict[tuple[int, bool], np.ndarray] = {}

        def magnitude(factor: np.ndarray, flag: bool, size: int) -> np.ndarray:
            key = (id(factor), flag)
            if key not in seen:
                seen[key] = _magnitude(factor, flag, size)
            return seen[key]

        for a, left, w, b, right, support in self.pieces:
            sa, sb = s[off[a]:off[a + 1]], s[off[b]:off[b + 1]]
            lm = None if left is None else magnitude(left, _side(support, "left"), w.size)
            t = w * (sb if right is None else magnitude(right, _side(support, "right"), w.size).T @ sb)
            out[off[a]:off[a + 1]] += sa * (t if lm is None else lm @ t)
            reach = sa * (w if lm is None else lm @ w)
            lost[off[a]:off[a + 1]] += (sb.size + 4) * (reach + 1) + (w.size + 4) * sa
            ops = max(ops, sb.size + w.size + 8)
        ops += len(self.pieces)
        out = out * (1.0 + 4.0 * ops * UNIT_ROUNDOFF) + 2 * _SUBNORMAL * lost * (1.0 + 4.0 * ops * UNIT_ROUNDOFF)
        return np.nextafter(out + ops * _SUBNORMAL, np.inf)


def _side(support: bool | str, side: str) -> bool:
    """Whether a piece's ``support`` flag replaces its ``side`` ("left" or "right") by the indicator."""
    return support is True or support == side


def _magnitude(factor: np.ndarray | None, support: bool, size: int) -> np.ndarray:
    """``|factor|`` (or the indicator of its non-zeros); the identity of order ``size`` for None."""
    if factor is None:
        return np.eye(size)
    return (factor != 0).astype(float) if support else np.abs(factor)


class BlockTridiagonal:
    """A symmetric block-tridiagonal matrix, stored by blocks as float64 torch tensors on one device.

    ``diag[k]`` is the ``k``-th diagonal block (symmetric) and ``lower[k]`` the block ``(k + 1, k)``; the blocks
    ``(k, k + 1)`` are their transposes, exactly, and every other entry is zero. Only the pattern's blocks are
    held: ``sum_k b_k^2 + b_k b_(k+1)`` numbers instead of ``N^2`` (a 14x14 CNN with 32 channels and 8 convolutions:
    0.6 GB instead of 20 GB). The LMI of a chain of layers has this structure
    (:meth:`LMI.assemble_banded`); :mod:`lipbound.rigorous` proves such matrices definite block by block.

    Examples
    --------
    >>> import torch
    >>> a = BlockTridiagonal([torch.eye(2), 2 * torch.eye(1, dtype=torch.float64)], [torch.ones(1, 2)])
    >>> a.dense().tolist()
    [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0]]
    """

    def __init__(self, diag: Sequence[torch.Tensor], lower: Sequence[torch.Tensor]):
        self.diag = [torch.as_tensor(b, dtype=torch.float64) for b in diag]
        self.lower = [torch.as_tensor(b, dtype=torch.float64, device=self.diag[0].device) for b in lower]
        sizes = self.sizes
        if len(self.lower) != len(sizes) - 1 or any(
                tuple(b.shape) != (s, s) for b, s in zip(self.diag, sizes, strict=True)) or any(
                tuple(b.shape) != (sizes[k + 1], sizes[k]) for k, b in enumerate(self.lower)):
            raise ValueError("BlockTridiagonal: block shapes do not chain: diagonal "
                             f"{[tuple(b.shape) for b in self.diag]}, lower {[tuple(b.shape) for b in self.lower]}.")

    @classmethod
    def zeros(cls, sizes: Sequence[int], device: str | torch.device | None = None) -> BlockTridiagonal:
        dev = torch.device("cpu" if device is None else device)
        return cls([torch.zeros(s, s, dtype=torch.float64, device=dev) for s in sizes],
                   [torch.zeros(sizes[k + 1], sizes[k], dtype=torch.float64, device=dev)
                    for k in range(len(sizes) - 1)])

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(b.shape[0]) for b in self.diag)

    @property
    def shape(self) -> tuple[int, int]:
        n = sum(self.sizes)
        return n, n

    @property
    def device(self) -> torch.device:
        return self.diag[0].device

    @property
    def offsets(self) -> np.ndarray:
        return block_offsets(self.sizes)

    @property
    def pattern(self) -> BlockPattern:
        nb = len(self.diag)
        idx = np.arange(nb)
        return BlockPattern(self.sizes, np.abs(idx[:, None] - idx[None, :]) <= 1)

    def blocks(self):
        """Every stored block (diagonal blocks first)."""
        return [*self.diag, *self.lower]

    def clone(self) -> BlockTridiagonal:
        return BlockTridiagonal([b.clone() for b in self.diag], [b.clone() for b in self.lower])

    def to(self, device: str | torch.device) -> BlockTridiagonal:
        return BlockTridiagonal([b.to(device) for b in self.diag], [b.to(device) for b in self.lower])

    def diagonal(self) -> np.ndarray:
        """The matrix's diagonal as a numpy array (a copy)."""
        return torch.cat([torch.diagonal(b) for b in self.diag]).cpu().numpy().copy()

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(b).all()) for b in self.blocks())

    def is_symmetric(self) -> bool:
        """Whether every diagonal block is exactly symmetric (the off-diagonal blocks are by construction)."""
        return all(torch.equal(b, b.T) for b in self.diag)

    def negated(self) -> BlockTridiagonal:
        return BlockTridiagonal([-b for b in self.diag], [-b for b in self.lower])

    def add_to_diagonal(self, values: np.ndarray | float) -> None:
        """Add ``values`` (a scalar or one per row) to the diagonal, in place (one IEEE addition per entry)."""
        off = self.offsets
        for k, b in enumerate(self.diag):
            v = values if np.isscalar(values) else torch.as_tensor(
                np.asarray(values[off[k]:off[k + 1]], dtype=np.float64), device=b.device)
            b.diagonal().add_(v)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for a vector or a matrix ``v`` with ``N`` rows (on the matrix's device)."""
        off = self.offsets
        parts = [v[off[k]:off[k + 1]] for k in range(len(self.diag))]
        out = [d @ p for d, p in zip(self.diag, parts, strict=True)]
        for k, e in enumerate(self.lower):
            out[k + 1] = out[k + 1] + e @ parts[k]
            out[k] = out[k] + e.T @ parts[k + 1]
        return torch.cat(out)

    def dense(self) -> torch.Tensor:
        """The full ``N x N`` matrix (for tests and small problems)."""
        off = self.offsets
        n = int(off[-1])
        out = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for k, b in enumerate(self.diag):
            out[off[k]:off[k + 1], off[k]:off[k + 1]] = b
        for k, e in enumerate(self.lower):
            out[off[k + 1]:off[k + 2], off[k]:off[k + 1]] = e
            out[off[k]:off[k + 1], off[k + 1]:off[k + 2]] = e.T
        return out


def is_block_tridiagonal(pattern: BlockPattern) -> bool:
    """Whether ``pattern`` couples each block to its neighbours only."""
    idx = np.arange(len(pattern.sizes))
    return not bool(np.any(pattern.adjacency & (np.abs(idx[:, None] - idx[None, :]) > 1)))


@dataclass(frozen=True, eq=False)
class LMI:
    """A block-structured LMI ``sum_t Term_t(y) <= 0``."""

    block_sizes: tuple[int, ...]
    terms: tuple[Term, ...]
    name: str = "lmi"

    @property
    def size(self) -> int:
        return int(sum(self.block_sizes))

    @property
    def offsets(self) -> np.ndarray:
        return block_offsets(self.block_sizes)

    @property
    def pattern(self) -> BlockPattern:
        """The blocks its terms touch (plus the diagonal): every other entry of ``M(y)`` is zero for every ``y``."""
        nb = len(self.block_sizes)
        adj = np.eye(nb, dtype=bool)
        for t in self.terms:
            adj[t.row, t.col] = adj[t.col, t.row] = True
        return BlockPattern(tuple(int(b) for b in self.block_sizes), adj)

    def assemble(self, y: np.ndarray, terms: tuple[Term, ...] | None = None,
                 into: np.ndarray | None = None) -> np.ndarray:
        """Dense symmetric float64 matrix ``M(y)``, exactly symmetric.

        Off-diagonal blocks receive each product and its transpose in the same order, so they mirror exactly;
        identity terms only touch the diagonal. Only diagonal blocks that received a computed product (which
        rounding can make slightly asymmetric) get their lower triangle mirrored.

        ``terms`` (a subset of the LMI's terms) are added to ``into`` (an exactly symmetric partial sum, modified in
        place) instead: assembling the terms in two groups only changes the order of each entry's sum, which
        :meth:`rounding_bound` covers (any order of a block's terms). ``into`` may be a float64 torch tensor (e.g. on
        the GPU that runs the check): the terms' values and products are computed in numpy as always, and each is
        added to it with the same IEEE additions.
        """
        off = self.offsets
        m = np.zeros((self.size, self.size)) if into is None else into
        on_torch = isinstance(m, torch.Tensor)

        def value(v: np.ndarray):
            return torch.as_tensor(v, dtype=torch.float64, device=m.device) if on_torch else v

        dirty = set()
        for t in self.terms if terms is None else terms:
            d = t.diagonal_values(y)
            rs, cs = slice(off[t.row], off[t.row + 1]), slice(off[t.col], off[t.col + 1])
            if t.row == t.col and t.left is None and t.right is None:
                idx = np.arange(off[t.row], off[t.row + 1])
                idx = torch.as_tensor(idx, device=m.device) if on_torch else idx
                for _ in range(2 if t.mirror else 1):
                    m[idx, idx] += value(d)
                continue
            block = value(t.product(d))
            m[rs, cs] += block
            if t.row != t.col or t.mirror:
                m[cs, rs] += block.T
            if t.row == t.col:
                dirty.add(t.row)
        lib = torch if on_torch else np
        for b in dirty:
            s = slice(off[b], off[b + 1])
            m[s, s] = lib.tril(m[s, s]) + lib.tril(m[s, s], -1).T
        return m

    def assemble_banded(self, y: np.ndarray, terms: tuple[Term, ...] | None = None,
                        into: BlockTridiagonal | None = None, device: str | torch.device | None = None
                        ) -> BlockTridiagonal:
        """``M(y)`` as a :class:`BlockTridiagonal` matrix (the LMI's pattern must be block tridiagonal).

        Every entry is the same floating-point sum as in :meth:`assemble` (the same products, added in the order of
        the terms, diagonal blocks symmetrised from their lower triangle), so :meth:`rounding_bound` covers it;
        ``terms`` and ``into`` as there (``into`` is modified in place). Only the ``(k + 1, k)`` block of each
        off-diagonal pair is stored: the ``(k, k + 1)`` block is its exact transpose, as :meth:`assemble` makes it.
        """
        if not is_block_tridiagonal(self.pattern):
            raise ValueError(f"LMI {self.name!r} is not block tridiagonal; assemble it densely.")
        m = BlockTridiagonal.zeros(self.block_sizes, device) if into is None else into
        dev = m.device
        dirty = set()
        for t in self.terms if terms is None else terms:
            d = t.diagonal_values(y)
            if t.row == t.col and t.left is None and t.right is None:
                for _ in range(2 if t.mirror else 1):
                    m.diag[t.row].diagonal().add_(torch.as_tensor(d, dtype=torch.float64, device=dev))
                continue
            block = torch.as_tensor(t.product(d), dtype=torch.float64, device=dev)
            if t.row == t.col:
                m.diag[t.row] += block
                if t.mirror:
                    m.diag[t.row] += block.T
                dirty.add(t.row)
            elif t.row > t.col:
                m.lower[t.col] += block
            else:
                m.lower[t.row] += block.T
        for b in dirty:
            m.diag[b] = torch.tril(m.diag[b]) + torch.tril(m.diag[b], -1).T
        return m

    def rounding_bound(self, y: np.ndarray) -> EntrywiseBound:
        """An entrywise bound on ``|assemble(y) - M(y)|`` (exact-arithmetic ``M``), resolved per row.

        Each entry of a term's block is a sum of products ``L_ik d_k R_jk`` with ``d`` itself a short sum of
        products. Every floating-point operation ``op`` returns ``op(1 + e) + f`` with ``|e| <= u`` and
        ``|f| <= 2^-1075`` (underflow). So ``|d_hat_k - d_k| <= gamma dabs_k + a_k`` with ``dabs = |coef| |y| +
        |const|`` and ``a_k = coef_ops eta sum_{coef_kv != 0} |y_v| + (ops) eta`` (a stored coefficient that
        underflowed is off by ``eta`` times its multiplier), and the computed entry is within
        ``sum_k |L_ik| w_k |R_jk| + K eta`` of the exact one, with ``w = gamma_K (dabs + a) + a`` (Higham, Ch. 3;
        ``K`` counts the operations on the way, the other terms of the same block included), kept in factored form
        ``|L| diag(w) |R|^T``. Inexact factors add ``dL R + L dR + dL dR`` (weights ``|d| <= dabs + a``). The
        transposed entries (mirrored blocks, and the symmetrised lower triangle of diagonal blocks) get the same
        bound, so each term contributes pieces in both directions.
        """
        per_block_terms: dict[tuple[int, int], int] = {}
        for t in self.terms:
            key = (min(t.row, t.col), max(t.row, t.col))
            per_block_terms[key] = per_block_terms.get(key, 0) + 1
        pieces: list[tuple] = []
        yabs = np.abs(y)
        for t in self.terms:
            nnz_row = int(np.max(np.diff(t.coef.indptr))) if t.coef.nnz else 0
            # |coef| |y| may underflow term by term (each lost product is below the smallest normal number).
            dabs = t.magnitude(y) + (nnz_row + 1) * np.finfo(float).tiny
            k = t.rank + nnz_row + t.coef_ops + 4 + per_block_terms[(min(t.row, t.col), max(t.row, t.col))]
            pattern = abs(t.coef.sign()) @ yabs + (0.0 if t.const is None else (t.const != 0))
            absolute = (t.coef_ops * pattern + nnz_row + 2) * _SUBNORMAL
            # The bound itself is computed in floating point: inflate by a relative margin far above its own
            # rounding error (p * u).
            margin = 1.0 + 8.0 * (t.rank + 16) * UNIT_ROUNDOFF
            weight = (gamma(k) * (dabs + absolute) + absolute) * margin
            true = (dabs + absolute) * margin
            underflow = np.full(t.rank, (k + 2) * _SUBNORMAL)
            if t.left is None and t.right is None and t.row == t.col:
                pieces.append((t.row, None, (weight + underflow) * (2 if t.mirror else 1), t.row, None, False))
                continue
            # (left, weights, right, support): float error, underflow, inexact factors dL R + L dR + dL dR
            parts = [(t.left, weight, t.right, False), (t.left, underflow, t.right, True)]
            if t.left is not None and t.right is not None:
                # product() forms (L diag(d)) R^T: an entry of L diag(d) that underflows is off by up to 2^-1075,
                # and R multiplies that error (a tiny L d times a huge R).
                parts.append((t.left, underflow, t.right, "left"))
            if t.left_err is not None:
                right_abs = np.abs(t.right) if t.right is not None else np.eye(t.rank)
                if t.right_err is not None:
                    right_abs = right_abs + t.right_err
                parts.append((t.left_err, true, right_abs, False))
            if t.right_err is not None:
                parts.append((t.left, true, t.right_err, False))
            flipped = {"left": "right", "right": "left"}
            for left, w, right, support in parts:
                pieces.append((t.row, left, w, t.col, right, support))
                pieces.append((t.col, right, w, t.row, left, flipped.get(support, support)))
        return EntrywiseBound(tuple(int(b) for b in self.block_sizes), tuple(pieces))

    def vectorized(self, n_vars: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """Sparse ``F`` (N^2 x n_vars) and ``f0`` (N^2) with ``vec(M(y)) = F y + f0`` (column-major vec)."""
        n = self.size
        off = self.offsets
        rows_all, cols_all, vals_all = [], [], []
        f0 = np.zeros(n * n)
        for t in self.terms:
            nb_r = self.block_sizes[t.row]
            nb_c = self.block_sizes[t.col]
            left = np.eye(nb_r) if t.left is None else t.left
            right = np.eye(nb_c) if t.right is None else t.right
            coef = t.coef.tocsr()
            for k in range(t.rank):
                lk = np.nonzero(left[:, k])[0]
                rk = np.nonzero(right[:, k])[0]
                if lk.size == 0 or rk.size == 0:
                    continue
                outer = np.outer(left[lk, k], right[rk, k]).ravel()
                ga = np.repeat(lk + off[t.row], rk.size)
                gb = np.tile(rk + off[t.col], lk.size)
                idx = [ga + gb * n]
                if t.row != t.col or t.mirror:
                    idx.append(gb + ga * n)
                start, end = coef.indptr[k], coef.indptr[k + 1]
                for pos in idx:
                    if t.const is not None and t.const[k] != 0.0:
                        np.add.at(f0, pos, outer * t.const[k])
                    for var, val in zip(coef.indices[start:end], coef.data[start:end], strict=True):
                        rows_all.append(pos)
                        cols_all.append(np.full(pos.size, var))
                        vals_all.append(outer * val)
        if rows_all:
            f = sp.coo_matrix((np.concatenate(vals_all), (np.concatenate(rows_all), np.concatenate(cols_all))),
                              shape=(n * n, n_vars)).tocsr()
        else:
            f = sp.csr_matrix((n * n, n_vars))
        return f, f0


class DeferredWeights(Sequence):
    """Repair weights computed on first use, once (thread-safe).

    Each weight is a rigorous norm bound proved by Rump's test (a Gram product and a Cholesky factorisation per weight
    matrix: 1.5 s of the 2.5 s formulation of 784-2048x4-10 on a 16-core host), and a certificate proved with
    ``delta = 0`` never uses them. Pickles as the plain tuple of its values.
    """

    def __init__(self, count: int, compute):
        self._count = int(count)
        self._compute = compute
        self._values: tuple[float, ...] | None = None
        self._lock = threading.Lock()

    @property
    def computed(self) -> bool:
        return self._values is not None

    @property
    def values(self) -> tuple[float, ...]:
        with self._lock:
            if self._values is None:
                values = tuple(float(v) for v in self._compute())
                if len(values) != self._count:
                    raise ValueError(f"expected {self._count} repair weights, got {len(values)}.")
                self._values, self._compute = values, None
            return self._values

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        return self.values[i]

    def __reduce__(self):
        return (tuple, (self.values,))

    def __repr__(self) -> str:
        return repr(self._values) if self._values is not None else f"DeferredWeights({self._count}, not computed)"


def known_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """The repair weights if they are already known (a plain tuple, or computed deferred ones), else ``()``."""
    if isinstance(weights, DeferredWeights) and not weights.computed:
        return ()
    return tuple(weights)


def placed_rows(block: sp.spmatrix, row0: int, rows: int) -> sp.csr_matrix:
    """``block`` as rows ``row0 ...`` of a matrix with ``rows`` rows (zeros elsewhere)."""
    return sp.vstack([sp.csr_matrix((row0, block.shape[1])), block,
                      sp.csr_matrix((rows - row0 - block.shape[0], block.shape[1]))]).tocsr()


@dataclass(frozen=True, eq=False)
class Program:
    """``minimize objective @ y`` s.t. ``y[nonneg] >= 0`` and ``lmi(y) <= 0`` for every LMI.

    ``rho_index`` names a variable that enters only as ``-rho_weight * rho * I`` on block ``rho_block`` of
    LMI ``rho_lmi`` and with objective coefficient 1; the certificate re-optimises it by block elimination.

    The certified bound derived from a feasible-up-to-defect point is
    ``2^scale_exponent * g(objective @ y + sum_t delta_t * repair_weights[t])`` with ``g = sqrt`` (``output_map
    == "sqrt"``) or the identity (``"linear"``), where ``delta_t >= lambda_max(lmi_t(y))``; see
    :mod:`lipbound.certificate` for why. ``repair_weights`` is a tuple or :class:`DeferredWeights` (computed when a
    check first needs one).
    """

    lmis: tuple[LMI, ...]
    n_vars: int
    objective: np.ndarray
    nonneg: np.ndarray
    repair_weights: Sequence[float]
    output_map: str = "sqrt"
    scale_exponent: int = 0
    rho_index: int | None = None
    rho_block: int | None = None
    rho_lmi: int = 0
    rho_weight: float = 1.0
    variables: tuple[tuple[str, slice], ...] = field(default_factory=tuple)
    name: str = "program"

    def __post_init__(self):
        if len(self.repair_weights) != len(self.lmis):
            raise ValueError("one repair weight per LMI is required.")
        if self.output_map not in ("sqrt", "linear"):
            raise ValueError(f"output_map must be 'sqrt' or 'linear', got {self.output_map!r}.")

    @property
    def sizes(self) -> dict:
        return {"n_vars": self.n_vars, "lmi_sizes": [lmi.size for lmi in self.lmis]}

    def clip(self, y: np.ndarray) -> np.ndarray:
        y = np.array(y, dtype=np.float64, copy=True).reshape(-1)
        if y.shape != (self.n_vars,):
            raise ValueError(f"expected {self.n_vars} multipliers, got {y.shape[0]}.")
        y[self.nonneg] = np.maximum(y[self.nonneg], 0.0)
        return y

    def implied_nonnegative(self) -> np.ndarray:
        """Which sign constraints ``y_i >= 0`` the LMIs imply (boolean mask over the variables).

        ``y_i`` is implied nonnegative when it is the only multiplier on some diagonal entry of an LMI, with only
        negative contributions to its coefficient and none negative to the entry's constant: ``M <= 0`` makes the
        entry ``c y_i + const <= 0`` with ``c < 0 <= const``. Signs are decided product by product (term factors
        times coefficients), so no cancellation can fake a sign. LipSDP-Neuron of a ReLU net: every neuron's
        multiplier (its entry is ``-2 lambda_i`` plus the next layer's nonnegative constant) and ``rho``.

        Solvers may drop these constraints (the native solver does: fewer complementarity pairs, 1-3 fewer
        iterations on 784-50-50-10 and GLipSDP-shaped stacks). The certificate does not rely on this: it clips
        ``y[nonneg]`` to 0 and checks the program as it is, so a constraint dropped here can cost tightness,
        never soundness.
        """
        implied = np.zeros(self.n_vars, dtype=bool)
        for lmi in self.lmis:
            off = lmi.offsets
            pos = sp.csr_matrix((lmi.size, self.n_vars))
            neg = sp.csr_matrix((lmi.size, self.n_vars))
            const_neg = np.zeros(lmi.size)
            for t in lmi.terms:
                if t.row != t.col:
                    continue  # off-diagonal blocks never touch the diagonal
                n = off[t.row + 1] - off[t.row]
                if t.left is None and t.right is None:
                    diag = sp.identity(n, format="csr")
                else:
                    left = np.eye(n) if t.left is None else t.left
                    right = np.eye(n) if t.right is None else t.right
                    diag = sp.csr_matrix(left * right)
                dp, dn = diag.maximum(0), (-diag).maximum(0)
                cp, cn = t.coef.maximum(0), (-t.coef).maximum(0)
                pos = pos + placed_rows(dp @ cp + dn @ cn, off[t.row], lmi.size)
                neg = neg + placed_rows(dp @ cn + dn @ cp, off[t.row], lmi.size)
                if t.const is not None:
                    const_neg[off[t.row]:off[t.row + 1]] += dp @ np.maximum(-t.const, 0) + dn @ np.maximum(t.const, 0)
            pos, neg = pos.tocsr(), neg.tocsr()
            pos.eliminate_zeros()
            neg.eliminate_zeros()
            touched = (pos + neg).tocsr()
            rows = np.flatnonzero((np.diff(touched.indptr) == 1) & (const_neg == 0))
            if not rows.size:
                continue
            cols = touched.indices[touched.indptr[rows]]
            alone = (np.asarray(neg[rows, cols]).reshape(-1) > 0) & (np.asarray(pos[rows, cols]).reshape(-1) == 0)
            implied[cols[alone]] = True
        return implied & self.nonneg

    def tightened(self, margins: Sequence[float]) -> Program:
        """The same program with LMI ``t`` tightened to ``M_t(y) <= -margins[t] I`` (a constant term on every diagonal
        block). A point solved for it keeps that margin in every direction, so the certificate can prove it
        strictly feasible although the interior-point answer of the plain program is singular up to rounding (see
        :func:`lipbound.api.certify`). Its optimum is above the plain one by about ``margin * tr(X*)``."""
        if len(margins) != len(self.lmis):
            raise ValueError("one margin per LMI is required.")
        lmis = []
        for lmi, margin in zip(self.lmis, margins, strict=True):
            if not (margin >= 0 and np.isfinite(margin)):
                raise ValueError(f"margins must be finite and >= 0, got {margin!r}.")
            extra = tuple(Term(b, b, None, None, sp.csr_matrix((n, self.n_vars)), const=np.full(n, float(margin)),
                               coef_ops=0) for b, n in enumerate(lmi.block_sizes) if margin > 0)
            lmis.append(LMI(lmi.block_sizes, lmi.terms + extra, lmi.name))
        return dataclasses.replace(self, lmis=tuple(lmis), name=f"{self.name} (tightened)")

    def value(self, y: np.ndarray) -> float:
        """The bound the solver claims (no certification): ``2^scale_exponent * g(objective @ y)``."""
        v = float(self.objective @ y)
        if self.output_map == "sqrt":
            v = float(np.sqrt(max(v, 0.0)))
        with np.errstate(over="ignore"):
            return float(np.ldexp(v, self.scale_exponent))
