"""One LMI of a :class:`~lipbound.program.Program` in *pair form*, laid out for the native solver's cones.

Every term contributes ``L diag(coef @ y + const) R^T`` (plus transpose), so an LMI is
``M(y) = sum_q d_q (l_q r_q^T + r_q l_q^T)`` over *pairs* ``q`` of factor columns, with ``d = C y + const``.
All distinct factor columns stacked in ``U`` (identity blocks and each distinct ``L``/``R`` once) give
``G = U^T Y U``, from which the Schur matrix ``H_ij = tr(F_i A F_j B)`` is gathered (:meth:`LowRankLMI.schur`).

A :class:`Layout` places the LMI's blocks on a grid of ``nb`` equal *super-blocks* of size ``b`` (padding the
smaller ones): one super-block for the dense strategy, a block-tridiagonal chain of them for the chordal one.
Matrices supported on the pattern (the slack ``Z``, the primal ``X``'s specified entries, directions) are
stored *banded*, as a tensor of shape ``(2 nb - 1, b, b)``: the ``nb`` diagonal blocks, then the ``nb - 1``
blocks ``(s, s + 1)`` above the diagonal. Dense matrices (``Z^-1`` and the completed ``X``) live on the padded
``nb b x nb b`` grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from lipbound.errors import SolverError
from lipbound.program import LMI

# Rows of the pair-pair matrix K are formed in chunks of about this many entries (a few such
# temporaries live at once), which bounds the extra memory independently of the problem size.
_CHUNK_ELEMENTS = 1 << 21
# On CUDA: chunks of 2^21 entries made the slot assembly of 784-2048x4-10 96 chunks of about ten small kernels each
# per Schur matrix (44 ms of launches per iteration on an H200); 2^25 entries (256 MiB per temporary) make it 6.
_CHUNK_ELEMENTS_CUDA = 1 << 25
# Up to this many pair-by-pair entries, the Schur products gather them with precomputed flat indices.
_FLAT_GATHER_ENTRIES = 1 << 18
# Pair-to-multiplier maps with at most this many entries are stored dense.
_DENSE_MAP_ENTRIES = 1 << 22
# Multipliers with at most this many pairs are assembled slot by slot (see LowRankLMI._slots).
_SLOT_PAIRS = 4


@dataclass(frozen=True)
class Layout:
    """Where an LMI's blocks sit on a grid of ``nb`` super-blocks of size ``b``.

    ``offsets[j]`` is the padded position of original block ``j``; ``super_block[j]`` its super-block. Every
    pair of coupled blocks lies in the same or in neighbouring super-blocks (the pattern is block tridiagonal
    at the super-block level, so its cliques are consecutive super-block pairs).
    """

    nb: int
    b: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def padded_size(self) -> int:
        return self.nb * self.b

    @property
    def super_block(self) -> tuple[int, ...]:
        return tuple(o // self.b for o in self.offsets)

    @property
    def padded(self) -> bool:
        return sum(self.sizes) < self.padded_size

    def real_mask(self) -> np.ndarray:
        """Boolean vector over the padded grid: ``True`` on positions of the LMI's own rows."""
        mask = np.zeros(self.padded_size, dtype=bool)
        for o, n in zip(self.offsets, self.sizes, strict=True):
            mask[o:o + n] = True
        return mask


def dense_layout(lmi: LMI) -> Layout:
    """One super-block holding the whole LMI (the dense strategy)."""
    off = lmi.offsets
    return Layout(1, max(lmi.size, 1), tuple(int(o) for o in off[:-1]), tuple(int(s) for s in lmi.block_sizes))


def chordal_layout(lmi: LMI) -> Layout:
    """A grouping of consecutive blocks into super-blocks whose pattern is block tridiagonal.

    Group ``g + 1`` must hold every block coupled to group ``g`` that lies beyond it, so once the first group is
    chosen the finest grouping follows the pattern's reach: a chain of layers gives one super-block per layer; a
    banded pattern (local skips) groups as many consecutive blocks as the band is wide; a dense pattern gives two
    groups (useless: the cost model then picks the dense layout). The first group is chosen to minimise the
    padded grid's ``(nb b)^2 b``, the order of the chordal kernels' cost.
    """
    sizes = [int(s) for s in lmi.block_sizes]
    nblk = len(sizes)
    adj = lmi.pattern.adjacency
    reach = [max(j, int(np.flatnonzero(adj[j]).max())) if adj[j].any() else j for j in range(nblk)]

    def groups_from(first_end: int) -> list[list[int]]:
        groups = [list(range(first_end + 1))]
        while groups[-1][-1] < nblk - 1:
            last = groups[-1][-1]
            end = min(nblk - 1, max(last + 1, max(reach[j] for j in groups[-1])))
            groups.append(list(range(last + 1, end + 1)))
        return groups

    def cost(groups: list[list[int]]) -> float:
        b = max(sum(sizes[j] for j in g) for g in groups)
        return float(len(groups) * b) ** 2 * b

    best = min((groups_from(e) for e in range(nblk)), key=cost)
    b = max(sum(sizes[j] for j in g) for g in best)
    offsets = [0] * nblk
    for s, g in enumerate(best):
        pos = s * b
        for j in g:
            offsets[j] = pos
            pos += sizes[j]
    return Layout(len(best), max(b, 1), tuple(offsets), tuple(sizes))


@dataclass
class _Slot:
    """Pairs of distinct multipliers: left and right stacked columns and multipliers, each a contiguous run
    ``(first, end)`` or an index tensor, and the pairs' coefficients."""

    a: tuple[int, int] | torch.Tensor
    b: tuple[int, int] | torch.Tensor
    var: tuple[int, int] | torch.Tensor
    cval: torch.Tensor
    size: int


def _take(g: torch.Tensor, rows, cols) -> torch.Tensor:
    """``g[rows][:, cols]`` for runs (views) or index tensors (gathers)."""
    g = g[rows[0]:rows[1]] if isinstance(rows, tuple) else g[rows]
    return g[:, cols[0]:cols[1]] if isinstance(cols, tuple) else g[:, cols]


def _rows(run, r0: int, r1: int):
    return (run[0] + r0, run[0] + r1) if isinstance(run, tuple) else run[r0:r1]


@dataclass
class _Group:
    """Distinct factor columns of one block: ``factor`` (size x width), ``None`` for the identity."""

    offset: int
    size: int
    factor: torch.Tensor | None
    width: int
    start: int = -1


@dataclass
class _PairGroup:
    """The pairs whose left column lies in group ``ga`` and right column in group ``gb``; ``slot`` says where
    their block goes in a banded accumulator, ``row0``/``col0`` are the groups' first rows in their super-block."""

    ga: int
    gb: int
    index: torch.Tensor
    ia: torch.Tensor
    ib: torch.Tensor
    slot: int
    sblock: int
    row0: int
    col0: int


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sparse.mm(a, b) if a.is_sparse else a @ b


def _operator(mat: sp.spmatrix, device: torch.device, dense: bool = False) -> torch.Tensor:
    """``mat`` on ``device``: a sparse tensor, or a dense one when ``dense`` (small maps: BLAS beats sparse kernels)."""
    if dense:
        return torch.tensor(sp.csr_matrix(mat).toarray(), dtype=torch.float64, device=device)
    coo = sp.coo_matrix(mat)
    idx = torch.tensor(np.vstack([coo.row, coo.col]), dtype=torch.long, device=device)
    val = torch.tensor(coo.data, dtype=torch.float64, device=device)
    return torch.sparse_coo_tensor(idx, val, coo.shape, device=device, check_invariants=False).coalesce()


class LowRankLMI:
    """One LMI in pair form on a :class:`Layout`: ``M(y) = sum_q d_q (l_q r_q^T + r_q l_q^T)``, ``d = C y + const``.

    Parameters
    ----------
    lmi : LMI
    n_vars : int
    device : torch.device
    layout : Layout
    """

    def __init__(self, lmi: LMI, n_vars: int, device: torch.device, layout: Layout):
        self.size = lmi.size
        self.device = device
        self.layout = layout
        off = layout.offsets
        groups: list[_Group] = []
        keys: dict = {}
        # Factors equal in content share a group. Candidates are the groups of the same block and shape, compared by
        # identity, then by value (hashing every 2048 x 2048 factor took 0.77 s of a 784-2048x4-10 solve on an H200
        # host; a comparison is one pass, and a block has one or two distinct factors).
        candidates: dict[tuple, list[tuple[np.ndarray, tuple]]] = {}

        def group_id(block: int, factor: np.ndarray | None, p: int) -> int:
            nb = lmi.block_sizes[block]
            if factor is None:
                if p != nb:
                    raise SolverError(f"{lmi.name}: identity factor of width {p} in a block of size {nb}.")
                key = (block, None)
            else:
                if factor.shape != (nb, p):
                    raise SolverError(f"{lmi.name}: factor of shape {factor.shape} in a block of size {nb} "
                                      f"for a term of rank {p}.")
                same = candidates.setdefault((block, factor.shape), [])
                for other, other_key in same:
                    if other is factor or np.array_equal(other, factor):
                        key = other_key
                        break
                else:
                    key = (block, factor.shape, len(same))
                    same.append((factor, key))
            if key not in keys:
                tensor = None if factor is None else torch.tensor(np.ascontiguousarray(factor, dtype=np.float64),
                                                                  device=device)
                keys[key] = len(groups)
                groups.append(_Group(int(off[block]), nb, tensor, p))
            return keys[key]

        ga_l, ia_l, gb_l, ib_l, coefs, consts = [], [], [], [], [], []
        for t in lmi.terms:
            p = t.rank
            if p == 0:
                continue
            # Every term is sum_k d_k (l_k r_k^T + r_k l_k^T) with weight 1, except a plain diagonal-block
            # term L diag(d) L^T, which is that sum with weight 1/2 (mirrored terms add both products).
            w = 0.5 if t.row == t.col and not t.mirror else 1.0
            gl = group_id(t.row, t.left, p)
            gr = group_id(t.col, t.right, p)
            ga_l.append(np.full(p, gl))
            gb_l.append(np.full(p, gr))
            ia_l.append(np.arange(p))
            ib_l.append(np.arange(p))
            coefs.append(sp.csr_matrix(t.coef, dtype=np.float64) * w)
            consts.append(np.zeros(p) if t.const is None else np.asarray(t.const, dtype=np.float64) * w)
        self.groups = groups
        if not coefs:
            self._empty(n_vars)
            return
        ga, gb = np.concatenate(ga_l), np.concatenate(gb_l)
        ia, ib = np.concatenate(ia_l), np.concatenate(ib_l)
        coef = sp.vstack(coefs).tocsr()
        const = np.concatenate(consts)
        # A pair and its mirror are the same symmetric piece: order each pair, then merge duplicates.
        swap = (ga > gb) | ((ga == gb) & (ia > ib))
        ga, gb = np.where(swap, gb, ga), np.where(swap, ga, gb)
        ia, ib = np.where(swap, ib, ia), np.where(swap, ia, ib)
        keys_arr = np.stack([ga, ia, gb, ib], axis=1)
        uniq, inv = np.unique(keys_arr, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        merge = sp.csr_matrix((np.ones(inv.size), (inv, np.arange(inv.size))), shape=(uniq.shape[0], inv.size))
        coef = (merge @ coef).tocsr()
        coef.eliminate_zeros()
        const = merge @ const
        has_coef = np.diff(coef.indptr) > 0
        keep = has_coef | (const != 0)
        uniq, coef, const, has_coef = uniq[keep], coef[keep], const[keep], has_coef[keep]
        ga, ia, gb, ib = (uniq[:, j] for j in range(4))
        self.n_pairs = uniq.shape[0]
        # Pair-to-multiplier maps small enough are kept dense (e.g. 260 x 101 for LipSDP-Neuron on 784-50-50-10).
        dense = coef.shape[0] * coef.shape[1] <= _DENSE_MAP_ENTRIES
        self.coef = _operator(coef, device, dense)
        self.coef_t = _operator(coef.T, device, dense)
        self.const = torch.tensor(const, device=device)
        self.pair_groups = []
        b = layout.b
        for a, c in sorted(set(zip(ga.tolist(), gb.tolist(), strict=True))):
            sel = np.flatnonzero((ga == a) & (gb == c))
            g, h = groups[a], groups[c]
            sg, sh = g.offset // b, h.offset // b
            if abs(sh - sg) > 1:
                raise SolverError(f"{lmi.name}: blocks at super-blocks {sg} and {sh} are coupled; the layout is "
                                  "not block tridiagonal.")
            self.pair_groups.append(_PairGroup(a, c, torch.tensor(sel, device=device),
                                               torch.tensor(ia[sel], device=device),
                                               torch.tensor(ib[sel], device=device),
                                               (sh - sg) % 3, sg, g.offset - sg * b, h.offset - sh * b))
        self._flat_identity_pairs(ga, ia, gb, ib)
        # Pairs that carry multipliers, and the stacked columns U they use.
        act = np.flatnonzero(has_coef)
        coef_act = coef[act].tocsr()
        n_act = act.size
        # Pairs of one multiplier each (LipSDP's neuron and layer multipliers): C^T K C is a segment sum over the
        # pairs' multipliers, O(pairs^2); otherwise sparse products with C.
        self.single = bool(np.all(np.diff(coef_act.indptr) == 1))
        slots = self._slots(coef_act.indices, ga[act], ia[act], gb[act], ib[act]) if self.single else []
        # Column order of U: each slot's left groups, then its right groups (so that slots read contiguous blocks of
        # the Gram matrices), then every other active group.
        order = []
        for slot in slots:
            for side in (ga[act][slot], gb[act][slot]):
                order += [g for g in dict.fromkeys(side.tolist()) if g not in order]
        order += [g for g in sorted(set(ga[act].tolist()) | set(gb[act].tolist())) if g not in order]
        start = 0
        for g in order:
            groups[g].start = start
            start += groups[g].width
        self.m = start
        self.active_groups = [g for g in groups if g.start >= 0]
        starts = np.array([g.start for g in groups])
        cols_a, cols_b = starts[ga[act]] + ia[act], starts[gb[act]] + ib[act]
        self.ca = torch.tensor(cols_a, device=device)
        self.cb = torch.tensor(cols_b, device=device)
        if self.single:
            self.var = torch.tensor(coef_act.indices, device=device)
            self.cval = torch.tensor(coef_act.data, dtype=torch.float64, device=device)
        else:
            self.coef_act_t = _operator(coef_act.T, device, dense)

        def index(values: np.ndarray):
            """A contiguous increasing run as ``(first, last + 1)``, else an index tensor."""
            if values.size and np.all(np.diff(values) == 1):
                return int(values[0]), int(values[-1]) + 1
            return torch.tensor(values, device=device)

        self.slots = [_Slot(index(cols_a[sl]), index(cols_b[sl]), index(coef_act.indices[sl]),
                            torch.tensor(coef_act.data[sl], dtype=torch.float64, device=device), len(sl))
                      for sl in slots]
        slotted = np.zeros(n_act, dtype=bool)
        for sl in slots:
            slotted[sl] = True
        self.rest = torch.tensor(np.flatnonzero(~slotted), device=device)
        self.slotted = torch.tensor(np.flatnonzero(slotted), device=device)
        # Few pairs: flat indices of the four pair-by-pair gathers; otherwise row chunks of bounded size.
        self.flat = None
        self.chunk_elements = _CHUNK_ELEMENTS_CUDA if torch.device(device).type == "cuda" else _CHUNK_ELEMENTS
        rows = n_act if n_act * n_act <= _FLAT_GATHER_ENTRIES else max(1, self.chunk_elements // n_act)
        self.chunks = [(q0, min(q0 + rows, n_act), None if self.single else
                        _operator(coef_act[q0:q0 + rows].T, device, dense)) for q0 in range(0, n_act, rows)]
        if n_act * n_act <= _FLAT_GATHER_ENTRIES and not self.slots:
            a, c = self.ca, self.cb
            self.flat = tuple(u[:, None] * self.m + v[None, :] for u, v in ((c, a), (a, c), (a, a), (c, c)))

    @staticmethod
    def _slots(var: np.ndarray, ga, ia, gb, ib) -> list[np.ndarray]:
        """Slots of the active pairs: among the multipliers with the most common number ``k <= _SLOT_PAIRS`` of
        pairs (LipSDP-Neuron's neurons: ``(W^T e_i, e_i)`` and ``(e_i, e_i)`` for ReLU), slot ``j`` holds every such
        multiplier's ``j``-th pair, ordered by multiplier. A slot's pairs use distinct multipliers, so its Schur
        contributions are dense blocks of Hadamard products of Gram sub-blocks (no gathers when its columns are
        contiguous). Other multipliers (``rho``, LipSDP-Layer's) are left to the general assembly."""
        counts = np.bincount(var)
        per_var = counts[counts > 0]
        small = per_var[per_var <= _SLOT_PAIRS]
        if small.size == 0:
            return []
        values, freq = np.unique(small, return_counts=True)
        k = int(values[np.argmax(freq)])
        if freq.max() < 2:
            return []
        order = np.lexsort((ib, gb, ia, ga, var))
        first = np.concatenate([[0], np.cumsum(counts)])
        rank = np.arange(var.size) - first[var[order]]
        family = counts[var[order]] == k
        return [order[family & (rank == j)] for j in range(k)]

    def _flat_identity_pairs(self, ga, ia, gb, ib) -> None:
        """Flat positions in a banded tensor of the pairs whose both columns are unit vectors (one gather)."""
        nb, b = self.layout.nb, self.layout.b
        ident = np.array([g.factor is None for g in self.groups])
        sel = np.flatnonzero(ident[ga] & ident[gb])
        self.id_pairs = torch.tensor(sel, device=self.device)
        rows = np.array([self.groups[g].offset for g in ga[sel]], dtype=np.int64) + ia[sel]
        cols = np.array([self.groups[g].offset for g in gb[sel]], dtype=np.int64) + ib[sel]
        # Entry (r, c) of the symmetric matrix: read it where the banded tensor stores it (upper block triangle).
        lo, hi = np.minimum(rows // b, cols // b), np.maximum(rows // b, cols // b)
        swap = rows // b > cols // b
        r = np.where(swap, cols, rows) % b
        c = np.where(swap, rows, cols) % b
        index = np.where(hi == lo, lo, nb + lo)
        self.id_flat = torch.tensor((index * b + r) * b + c, device=self.device)

    def _empty(self, n_vars: int):
        dev = self.device
        self.n_pairs, self.m, self.pair_groups, self.active_groups, self.chunks = 0, 0, [], [], []
        self.flat = None
        self.coef = _operator(sp.csr_matrix((0, n_vars)), dev)
        self.coef_t = _operator(sp.csr_matrix((n_vars, 0)), dev)
        self.coef_act_t = self.coef_t
        self.single = False
        self.const = torch.zeros(0, dtype=torch.float64, device=dev)
        self.ca = self.cb = torch.zeros(0, dtype=torch.long, device=dev)
        self.id_pairs = self.id_flat = torch.zeros(0, dtype=torch.long, device=dev)

    # -- maps between multipliers and matrices ------------------------------------------------------
    def pair_coefficients(self, y: torch.Tensor, with_const: bool) -> torch.Tensor:
        d = _mm(self.coef, y.reshape(-1, 1)).reshape(-1)
        return d + self.const if with_const else d

    def assemble(self, d: torch.Tensor) -> torch.Tensor:
        """Banded ``sum_q d_q (l_q r_q^T + r_q l_q^T)`` (shape ``(2 nb - 1, b, b)``)."""
        nb, b = self.layout.nb, self.layout.b
        # acc[slot, s] holds the (non-symmetric) block (s, s + r) of sum_q d_q l_q r_q^T, slot = r mod 3.
        acc = torch.zeros(1 if nb == 1 else 3, nb, b, b, dtype=torch.float64, device=self.device)
        for pg in self.pair_groups:
            g, h = self.groups[pg.ga], self.groups[pg.gb]
            dq = d[pg.index]
            blk = acc[pg.slot, pg.sblock]
            if g.factor is None and h.factor is None:
                blk.index_put_((pg.row0 + pg.ia, pg.col0 + pg.ib), dq, accumulate=True)
            elif h.factor is None:
                blk[pg.row0:pg.row0 + g.size].index_add_(1, pg.col0 + pg.ib, g.factor[:, pg.ia] * dq)
            elif g.factor is None:
                blk[:, pg.col0:pg.col0 + h.size].index_add_(0, pg.row0 + pg.ia, (h.factor[:, pg.ib] * dq).T)
            else:
                blk[pg.row0:pg.row0 + g.size, pg.col0:pg.col0 + h.size] += \
                    (g.factor[:, pg.ia] * dq) @ h.factor[:, pg.ib].T
        out = torch.empty(2 * nb - 1, b, b, dtype=torch.float64, device=self.device)
        out[:nb] = acc[0] + acc[0].transpose(1, 2)
        if nb > 1:
            out[nb:] = acc[1, :-1] + acc[2, 1:].transpose(1, 2)
        return out

    def pair_values(self, band: torch.Tensor) -> torch.Tensor:
        """``l_q^T Y r_q`` for every pair (``Y`` symmetric, banded)."""
        nb = self.layout.nb
        val = torch.empty(self.n_pairs, dtype=torch.float64, device=self.device)
        if self.id_pairs.numel():
            val[self.id_pairs] = torch.take(band, self.id_flat)
        for pg in self.pair_groups:
            g, h = self.groups[pg.ga], self.groups[pg.gb]
            if g.factor is None and h.factor is None:
                continue
            if pg.slot == 0:
                blk = band[pg.sblock]
            elif pg.slot == 1:
                blk = band[nb + pg.sblock]
            else:
                blk = band[nb + pg.sblock - 1].T
            rs, cs = slice(pg.row0, pg.row0 + g.size), slice(pg.col0, pg.col0 + h.size)
            if h.factor is None:
                v = (g.factor[:, pg.ia] * blk[rs][:, pg.col0 + pg.ib]).sum(0)
            elif g.factor is None:
                v = (h.factor[:, pg.ib] * blk[:, cs][pg.row0 + pg.ia].T).sum(0)
            else:
                v = (g.factor[:, pg.ia] * (blk[rs, cs] @ h.factor[:, pg.ib])).sum(0)
            val[pg.index] = v
        return val

    def adjoint(self, band: torch.Tensor) -> torch.Tensor:
        """``(<F_i, Y>)_i`` for symmetric banded ``Y`` (linear part only)."""
        val = 2.0 * self.pair_values(band)
        return _mm(self.coef_t, val.reshape(-1, 1)).reshape(-1)

    def gram(self, dense: torch.Tensor) -> torch.Tensor:
        """``U^T Y U`` over the stacked active columns, for a dense symmetric ``Y`` on the padded grid, in ``Y``'s
        precision. Symmetric up to rounding (not symmetrised: that would need a second copy of the largest matrix
        of the iteration; the Schur matrix built from it is symmetrised instead)."""
        n, m = dense.shape[0], self.m
        v = torch.empty(n, m, dtype=dense.dtype, device=self.device)
        for g in self.active_groups:
            cols = dense[:, g.offset:g.offset + g.size]
            v[:, g.start:g.start + g.width] = cols if g.factor is None else cols @ g.factor.to(dense.dtype)
        out = torch.empty(m, m, dtype=dense.dtype, device=self.device)
        for g in self.active_groups:
            rows = v[g.offset:g.offset + g.size]
            out[g.start:g.start + g.width] = rows if g.factor is None else g.factor.to(dense.dtype).T @ rows
        return out

    def _add_rows(self, h: torch.Tensor, k: torch.Tensor, q0: int, chunk_t: torch.Tensor | None) -> None:
        """``h += C[q0:q0+r]^T k C`` for a row block ``k`` of a pair-by-pair matrix (any precision; ``h`` float64)."""
        k = k.to(h.dtype)
        if self.single:
            t = torch.zeros(k.shape[0], h.shape[1], dtype=h.dtype, device=h.device)
            t.index_add_(1, self.var, k * self.cval)
            h.index_add_(0, self.var[q0:q0 + k.shape[0]], t * self.cval[q0:q0 + k.shape[0], None])
        else:
            h += _mm(chunk_t, _mm(self.coef_act_t, k.T).T)

    def schur(self, ga: torch.Tensor, gb: torch.Tensor, h: torch.Tensor):
        """Add ``tr(F_i A F_j B)`` to ``h`` from ``ga = U^T A U`` and ``gb = U^T B U``.

        For ``S_q = l r^T + r l^T``: ``tr(S_q A S_q' B) = A_ba' B_ab' + A_ab' B_ba' + A_aa' B_bb' + A_bb' B_aa'``
        (``a, b`` the columns of pair ``q``, primes those of ``q'``). Slots (:meth:`_slots`) contribute dense
        blocks of Hadamard products of Gram sub-blocks; the other pairs contribute through gathers, where the
        first two terms are ``K1`` and its transpose (``A``, ``B`` symmetric): ``H = C^T K1 C + (C^T K1 C)^T +
        C^T K2 C``.
        """
        if self.slots:
            self._schur_slots(ga, gb, h)
            return
        if self.flat is not None:
            # Few pairs: gather the four pair-by-pair products directly (flat indices precomputed).
            iba, iab, iaa, ibb = self.flat
            k = torch.take(ga, iba) * torch.take(gb, iab)
            k = k + k.T
            k += torch.take(ga, iaa) * torch.take(gb, ibb)
            k += torch.take(ga, ibb) * torch.take(gb, iaa)
            self._add_rows(h, k, 0, self.chunks[0][2])
            return
        ca, cb = self.ca, self.cb
        h1 = torch.zeros_like(h)
        # Row blocks of K from row gathers of G, then column gathers: temporaries stay of the chunk's size (the
        # G matrices of a 16k-neuron net are 8 GiB each; gathering their columns up front would need four more).
        for q0, q1, chunk_t in self.chunks:
            a, c = ca[q0:q1], cb[q0:q1]
            ga_a, ga_c, gb_a, gb_c = ga[a], ga[c], gb[a], gb[c]
            k1 = ga_c[:, ca] * gb_a[:, cb]
            k2 = ga_a[:, ca] * gb_c[:, cb]
            k2 += ga_c[:, cb] * gb_a[:, ca]
            del ga_a, ga_c, gb_a, gb_c
            self._add_rows(h1, k1, q0, chunk_t)
            self._add_rows(h, k2, q0, chunk_t)
        h += h1 + h1.T

    def _schur_slots(self, ga: torch.Tensor, gb: torch.Tensor, h: torch.Tensor) -> None:
        """Slot-by-slot Schur assembly (every pair has one multiplier): ``H = sum_{s,t} C_s^T K_st C_t`` over slots
        ``s, t`` (blocks ``K_ts = K_st^T``), plus the rows and columns of the remaining pairs ``R``
        (``C_R^T K_R,all C`` and the transpose of its slot part)."""
        for s, sa in enumerate(self.slots):
            for t in range(s, len(self.slots)):
                tb = self.slots[t]
                step = max(1, self.chunk_elements // max(tb.size, 1))
                for r0 in range(0, sa.size, step):
                    r1 = min(sa.size, r0 + step)
                    ar, br = _rows(sa.a, r0, r1), _rows(sa.b, r0, r1)
                    k = _take(ga, br, tb.a) * _take(gb, ar, tb.b)
                    k += _take(ga, ar, tb.b) * _take(gb, br, tb.a)
                    k += _take(ga, ar, tb.a) * _take(gb, br, tb.b)
                    k += _take(ga, br, tb.b) * _take(gb, ar, tb.a)
                    k = k.to(h.dtype) * sa.cval[r0:r1, None] * tb.cval[None, :]
                    self._add_block(h, _rows(sa.var, r0, r1), tb.var, k)
                    if t != s:
                        self._add_block(h, tb.var, _rows(sa.var, r0, r1), k.T)
        if not self.rest.numel():
            return
        ca, cb, n_act = self.ca, self.cb, self.ca.numel()
        step = max(1, self.chunk_elements // n_act)
        for r0 in range(0, self.rest.numel(), step):
            rows = self.rest[r0:r0 + step]
            a, c = ca[rows], cb[rows]
            ga_a, ga_c, gb_a, gb_c = ga[a], ga[c], gb[a], gb[c]
            k = ga_c[:, ca] * gb_a[:, cb]
            k += ga_a[:, cb] * gb_c[:, ca]
            k += ga_a[:, ca] * gb_c[:, cb]
            k += ga_c[:, cb] * gb_a[:, ca]
            del ga_a, ga_c, gb_a, gb_c
            k = k.to(h.dtype) * self.cval[rows, None]
            var = self.var[rows]
            t_all = torch.zeros(rows.numel(), h.shape[1], dtype=h.dtype, device=h.device)
            t_all.index_add_(1, self.var, k * self.cval)
            h.index_add_(0, var, t_all)
            t_slot = torch.zeros_like(t_all)
            t_slot.index_add_(1, self.var[self.slotted], k[:, self.slotted] * self.cval[self.slotted])
            h.index_add_(1, var, t_slot.T)

    @staticmethod
    def _add_block(h: torch.Tensor, rows, cols, k: torch.Tensor) -> None:
        if isinstance(rows, tuple) and isinstance(cols, tuple):
            h[rows[0]:rows[1], cols[0]:cols[1]] += k
            return
        r = torch.arange(rows[0], rows[1], device=h.device) if isinstance(rows, tuple) else rows
        c = torch.arange(cols[0], cols[1], device=h.device) if isinstance(cols, tuple) else cols
        h.index_put_((r[:, None], c[None, :]), k, accumulate=True)
