"""``solver="native"``: a structured primal-dual interior-point SDP solver in torch (float64, CPU or CUDA).

Algorithm
---------
A :class:`~lipbound.program.Program` is the *dual* standard-form SDP

    max  b^T y   s.t.  Z_t = C_t - A_t^T(y) >= 0 (every LMI t),   s = E y >= 0,

with ``b = -objective``, ``C_t = -M_t(0)``, ``A_t^T(y) = M_t(y) - M_t(0)`` and ``E`` selecting the
sign-constrained multipliers. Its primal is ``min sum_t <C_t, X_t>`` s.t. ``sum_t A_t(X_t) - E^T x = b``,
``X_t >= 0``, ``x >= 0``. We run an **infeasible-start primal-dual path-following method with the
HKM direction and Mehrotra's predictor-corrector** (as in SDPT3 and CSDP), stopping when the
relative duality gap and both relative infeasibilities are below ``tol``.

Why this route:

* **No feasible start is needed.** The iterates ``(X, y, Z)`` start at scaled identities; residuals
  shrink geometrically and vanish after the first full step. No phase 1 and no formulation-specific
  warm start, so any Program (free multipliers, several LMIs, general objective) is handled.
* **HKM keeps the Schur matrix cheap and structured.** Its Schur matrix is
  ``H_ij = sum_t tr(F_ti X_t F_tj Z_t^-1) + [i = j nonneg] x_i / s_i`` (symmetric positive definite),
  which needs only ``X`` and ``Z^-1`` (NT would need the scaling matrix, an extra eigen- or
  Cholesky-based factorization per iteration for the same structure).
* **Low-rank factors, never dense ``F_i``.** Every term contributes ``L diag(coef @ y) R^T`` (plus
  transpose), i.e. ``F_i = sum_q C_qi (l_q r_q^T + r_q l_q^T)`` over *pairs* ``q`` of factor columns.
  With all distinct factor columns stacked in ``U`` (identity blocks and each distinct ``L``/``R`` once),
  ``G_X = U^T X U`` and ``G_Z = U^T Z^-1 U`` are computed blockwise, and
  ``tr(S_q X S_q' Z^-1)`` for ``S_q = l_q r_q^T + r_q l_q^T`` is a sum of four products of entries of
  ``G_X`` and ``G_Z``; so ``H = C^T K C`` with ``K`` (pairs x pairs) built by gathers and elementwise
  products, and ``C`` the sparse pair-to-variable map. This covers LipSDP-Neuron (one variable per
  ~3 pairs) and LipSDP-Layer (one variable for all columns of a term) alike, in O(pairs^2) work
  after the ``G`` products. Identical pairs of different terms are merged.
* **Dense linear algebra, GPU friendly.** Per iteration: one Cholesky of each ``Z_t`` (and ``X_t``)
  and of ``H``, a handful of ``N x N`` products, and the blocked ``G`` products. Memory is
  O(N^2 + m^2 + n_vars^2) (``m = O(N)`` stacked columns); ``K`` is formed in row chunks of bounded size.

Numerical safeguards, each for an observed failure mode:

* Step lengths to the cone boundary come from the smallest eigenvalue of ``L^-1 dX L^-T`` (``X = L L^T``):
  computed exactly for blocks up to 256 (cheaper than the Lanczos recurrence's per-step overhead there),
  estimated by Lanczos for larger ones (avoiding a full eigendecomposition per step); either way checked
  by the Cholesky factorization of the new iterate (needed next anyway) with backtracking.
* After the first full dual step the dual residual is zero up to rounding; from then on ``Z = -M(y)``
  is re-assembled exactly, so every later ``y`` is strictly feasible in floating point (then
  ``objective @ y - lower_objective`` bounds the distance to the optimum, up to the primal residual).
* Near the optimum the Schur matrix is ill-conditioned; the corrector is refined against the
  operator ``dX`` is built with, which keeps the primal residual from growing.
* Free multipliers that change no constraint (redundant QC multipliers) make ``H`` singular; they
  are detected once from ``[tr(F_i F_j)]`` and projected out (the program is reported unbounded if
  the objective moves along them).

The returned multipliers are checked rigorously by :mod:`lipbound.certificate`; this solver is
accurate, not rigorous.

Examples
--------
>>> import numpy as np, lipbound
>>> net = lipbound.from_weights([np.eye(2), np.eye(2)], "relu")
>>> prob = lipbound.formulations.lipsdp(net, "neuron")
>>> res = NativeSolver().solve(prob.solve_program)
>>> res.status, round(float(res.y[0]), 6)
('optimal', 1.0)
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch

from lipbound.errors import SolverError
from lipbound.program import LMI, Program
from lipbound.solvers.base import SolveResult

log = logging.getLogger("lipbound")

# Rows of the pair-pair matrix K are formed in chunks of about this many entries (a few such
# temporaries live at once), which bounds the extra memory independently of the problem size.
_CHUNK_ELEMENTS = 1 << 21
# Blocks up to this size get exact step lengths from a dense eigenvalue solve (measured crossover with the
# Lanczos estimate on 2 CPU cores: about 250).
_DENSE_STEP_SIZE = 256
# CPU solves of programs whose LMIs have at most this many rows in all run on one thread (measured on 2 cores:
# 784-50-50-10, LMI 150, 0.42 -> 0.33 s; 784-100-100-10, LMI 300, one thread is 10 % slower).
_SINGLE_THREAD_SIZE = 200
# Up to this many pair-by-pair entries, the Schur products gather them with precomputed flat indices.
_FLAT_GATHER_ENTRIES = 1 << 18
# Pair-to-multiplier maps with at most this many entries are stored dense.
_DENSE_MAP_ENTRIES = 1 << 22
_OPTIONS = ("step_fraction", "lanczos_steps", "threads")


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
    """The pairs whose left column lies in group ``ga`` and right column in group ``gb``."""

    ga: int
    gb: int
    index: torch.Tensor
    ia: torch.Tensor
    ib: torch.Tensor


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


class _StructuredLMI:
    """One LMI in pair form: ``M(y) = sum_q d_q (l_q r_q^T + r_q l_q^T)``, ``d = C y + const``.

    Parameters
    ----------
    lmi : LMI
    n_vars : int
    device : torch.device
    """

    def __init__(self, lmi: LMI, n_vars: int, device: torch.device):
        self.size = lmi.size
        self.device = device
        off = lmi.offsets
        groups: list[_Group] = []
        keys: dict = {}

        def group_id(block: int, factor: np.ndarray | None, p: int) -> int:
            nb = lmi.block_sizes[block]
            if factor is None:
                if p != nb:
                    raise SolverError(f"{lmi.name}: identity factor of width {p} in a block of size {nb}.")
                key = (block, None)
            else:
                factor = np.ascontiguousarray(factor, dtype=np.float64)
                if factor.shape != (nb, p):
                    raise SolverError(f"{lmi.name}: factor of shape {factor.shape} in a block of size {nb} "
                                      f"for a term of rank {p}.")
                key = (block, factor.shape, hashlib.blake2b(factor.tobytes(), digest_size=20).digest())
            if key not in keys:
                tensor = None if factor is None else torch.tensor(factor, device=device)
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
            w = 0.5 if t.row == t.col and not getattr(t, "mirror", False) else 1.0
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
        for a, b in sorted(set(zip(ga.tolist(), gb.tolist(), strict=True))):
            sel = np.flatnonzero((ga == a) & (gb == b))
            self.pair_groups.append(_PairGroup(a, b, torch.tensor(sel, device=device),
                                               torch.tensor(ia[sel], device=device),
                                               torch.tensor(ib[sel], device=device)))
        # Pairs that carry multipliers, and the stacked columns U they use.
        act = np.flatnonzero(has_coef)
        start = 0
        for g in sorted(set(ga[act].tolist()) | set(gb[act].tolist())):
            groups[g].start = start
            start += groups[g].width
        self.m = start
        self.active_groups = [g for g in groups if g.start >= 0]
        starts = np.array([g.start for g in groups])
        self.ca = torch.tensor(starts[ga[act]] + ia[act], device=device)
        self.cb = torch.tensor(starts[gb[act]] + ib[act], device=device)
        coef_act = coef[act]
        self.coef_act_t = _operator(coef_act.T, device, dense)
        n_act = act.size
        # Few pairs: flat indices of the four pair-by-pair gathers; otherwise row chunks of bounded size.
        self.flat, self.chunks = None, []
        if n_act * n_act <= _FLAT_GATHER_ENTRIES:
            a, b = self.ca, self.cb
            self.flat = tuple(u[:, None] * self.m + v[None, :] for u, v in ((b, a), (a, b), (a, a), (b, b)))
        else:
            rows = max(1, _CHUNK_ELEMENTS // n_act)
            self.chunks = [(q0, min(q0 + rows, n_act), _operator(coef_act[q0:q0 + rows].T, device, dense))
                           for q0 in range(0, n_act, rows)]

    def _empty(self, n_vars: int):
        dev = self.device
        self.n_pairs, self.m, self.pair_groups, self.active_groups, self.chunks = 0, 0, [], [], []
        self.flat = None
        self.coef = _operator(sp.csr_matrix((0, n_vars)), dev)
        self.coef_t = _operator(sp.csr_matrix((n_vars, 0)), dev)
        self.coef_act_t = self.coef_t
        self.const = torch.zeros(0, dtype=torch.float64, device=dev)
        self.ca = self.cb = torch.zeros(0, dtype=torch.long, device=dev)

    # -- maps between multipliers and matrices ------------------------------------------------------
    def pair_coefficients(self, y: torch.Tensor, with_const: bool) -> torch.Tensor:
        d = _mm(self.coef, y.reshape(-1, 1)).reshape(-1)
        return d + self.const if with_const else d

    def assemble(self, d: torch.Tensor) -> torch.Tensor:
        """Dense ``sum_q d_q (l_q r_q^T + r_q l_q^T)``."""
        n = self.size
        out = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for pg in self.pair_groups:
            g, h = self.groups[pg.ga], self.groups[pg.gb]
            dq = d[pg.index]
            if g.factor is None and h.factor is None:
                out.index_put_((g.offset + pg.ia, h.offset + pg.ib), dq, accumulate=True)
            elif h.factor is None:
                out[g.offset:g.offset + g.size].index_add_(1, h.offset + pg.ib, g.factor[:, pg.ia] * dq)
            elif g.factor is None:
                out[:, h.offset:h.offset + h.size].index_add_(0, g.offset + pg.ia, (h.factor[:, pg.ib] * dq).T)
            else:
                out[g.offset:g.offset + g.size, h.offset:h.offset + h.size] += \
                    (g.factor[:, pg.ia] * dq) @ h.factor[:, pg.ib].T
        return out + out.T

    def pair_values(self, y_mat: torch.Tensor) -> torch.Tensor:
        """``l_q^T Y r_q`` for every pair (``Y`` symmetric)."""
        val = torch.empty(self.n_pairs, dtype=torch.float64, device=self.device)
        for pg in self.pair_groups:
            g, h = self.groups[pg.ga], self.groups[pg.gb]
            gs, hs = slice(g.offset, g.offset + g.size), slice(h.offset, h.offset + h.size)
            if g.factor is None and h.factor is None:
                v = y_mat[g.offset + pg.ia, h.offset + pg.ib]
            elif h.factor is None:
                v = (g.factor[:, pg.ia] * y_mat[gs][:, h.offset + pg.ib]).sum(0)
            elif g.factor is None:
                v = (h.factor[:, pg.ib] * y_mat[hs][:, g.offset + pg.ia]).sum(0)
            else:
                v = (g.factor[:, pg.ia] * (y_mat[gs, hs] @ h.factor[:, pg.ib])).sum(0)
            val[pg.index] = v
        return val

    def adjoint(self, y_mat: torch.Tensor) -> torch.Tensor:
        """``(<F_i, Y>)_i`` for symmetric ``Y`` (linear part only)."""
        val = 2.0 * self.pair_values(y_mat)
        return _mm(self.coef_t, val.reshape(-1, 1)).reshape(-1), val

    def gram(self, y_mat: torch.Tensor) -> torch.Tensor:
        """``U^T Y U`` over the stacked active columns, computed block by block."""
        n, m = self.size, self.m
        v = torch.empty(n, m, dtype=torch.float64, device=self.device)
        for g in self.active_groups:
            cols = y_mat[:, g.offset:g.offset + g.size]
            v[:, g.start:g.start + g.width] = cols if g.factor is None else cols @ g.factor
        out = torch.empty(m, m, dtype=torch.float64, device=self.device)
        for g in self.active_groups:
            rows = v[g.offset:g.offset + g.size]
            out[g.start:g.start + g.width] = rows if g.factor is None else g.factor.T @ rows
        return (out + out.T) * 0.5

    def schur(self, ga: torch.Tensor, gb: torch.Tensor, h: torch.Tensor):
        """Add ``tr(F_i A F_j B)`` to ``h`` from ``ga = U^T A U`` and ``gb = U^T B U``.

        For ``S_q = l r^T + r l^T``: ``tr(S_q A S_q' B) = A_ba' B_ab' + A_ab' B_ba' + A_aa' B_bb' + A_bb' B_aa'``
        (``a, b`` the columns of pair ``q``, primes those of ``q'``). The first two are ``K1`` and its
        transpose (``A``, ``B`` symmetric), so ``H = C^T K1 C + (C^T K1 C)^T + C^T K2 C``.
        """
        if self.flat is not None:
            # Few pairs: gather the four pair-by-pair products directly (flat indices precomputed) and form
            # H = C^T (K1 + K1^T + K2) C with two products.
            iba, iab, iaa, ibb = self.flat
            k = torch.take(ga, iba) * torch.take(gb, iab)
            k = k + k.T
            k += torch.take(ga, iaa) * torch.take(gb, ibb)
            k += torch.take(ga, ibb) * torch.take(gb, iaa)
            h += _mm(self.coef_act_t, _mm(self.coef_act_t, k).T)
            return
        ca, cb = self.ca, self.cb
        # Column gathers are shared by all row chunks.
        ga_ca, ga_cb, gb_ca, gb_cb = ga[:, ca], ga[:, cb], gb[:, ca], gb[:, cb]
        h1 = torch.zeros_like(h)
        for q0, q1, chunk_t in self.chunks:
            a, b = ca[q0:q1], cb[q0:q1]
            k1 = ga_ca[b] * gb_cb[a]
            k2 = ga_ca[a] * gb_cb[b]
            k2 += ga_cb[b] * gb_ca[a]
            h1 += _mm(chunk_t, _mm(self.coef_act_t, k1.T).T)
            h += _mm(chunk_t, _mm(self.coef_act_t, k2.T).T)
        h += h1 + h1.T


def _sym(a: torch.Tensor) -> torch.Tensor:
    return (a + a.T) * 0.5


def _lanczos_min(op, n: int, steps: int, rng: np.random.Generator) -> float:
    """A safeguarded estimate of the smallest eigenvalue of the symmetric operator ``op`` (numpy in/out).

    Lanczos Ritz values approach the extreme eigenvalues from inside; subtracting the residual
    norm of the extreme Ritz pair moves the estimate to the safe side for the eigenvalue it
    approximates. The caller still verifies the step by a Cholesky factorization. The recurrence
    runs in numpy: its vectors are short, and a few dozen tiny device operations per call would
    cost more in launch and thread-synchronisation latency than the arithmetic.
    """
    k = min(steps, n)
    basis = np.empty((n, k))
    q = rng.standard_normal(n)
    q /= np.linalg.norm(q)
    alphas, betas = [], []
    beta = 0.0
    for j in range(k):
        basis[:, j] = q
        w = op(q)
        alpha = float(w @ q)
        # Full reorthogonalisation (twice is enough): cheap at these sizes and keeps Ritz values honest.
        w -= basis[:, :j + 1] @ (basis[:, :j + 1].T @ w)
        w -= basis[:, :j + 1] @ (basis[:, :j + 1].T @ w)
        alphas.append(alpha)
        beta = float(np.linalg.norm(w))
        if j == k - 1 or beta <= 1e-12 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        q = w / beta
    vals, vecs = scipy.linalg.eigh_tridiagonal(np.array(alphas), np.array(betas))
    return float(vals[0]) - abs(beta * vecs[-1, 0])


class NativeSolver:
    """Structured primal-dual interior-point solver (HKM, Mehrotra predictor-corrector) in torch.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> from lipbound.solvers.native import NativeSolver
    >>> net = lipbound.from_weights([np.array([[1.0, 2.0]]), np.array([[3.0]])], "relu")
    >>> prob = lipbound.formulations.lipsdp(net, "neuron")
    >>> res = NativeSolver().solve(prob.solve_program, tol=1e-10)
    >>> res.status, round(prob.solve_program.value(res.y), 6), res.info["device"]
    ('optimal', 6.708204, 'cpu')
    """

    name = "native"

    def solve(self, program: Program, verbose: bool = False, device: str | torch.device | None = None,
              tol: float = 1e-9, max_iter: int = 100, **options) -> SolveResult:
        """Solve ``program`` and return its multipliers.

        Parameters
        ----------
        program : Program
        verbose : bool
            Unused: one line per iteration is always logged at INFO on ``"lipbound"`` (shown by ``lipbound -v``).
        device : str or torch.device, optional
            ``"cpu"`` (default) or ``"cuda"``/``"cuda:k"``.
        tol : float
            Target relative duality gap and relative primal/dual infeasibility.
        max_iter : int
        **options
            ``step_fraction`` (fraction of the step to the cone boundary, default adaptive 0.9-0.99),
            ``lanczos_steps`` (default 30), ``threads`` (CPU threads for torch during this solve; the
            default is 1 for programs whose LMIs have at most 200 rows in all, where thread synchronisation
            costs more than it saves, and torch's setting otherwise. On a machine whose cores are busy with
            other work, 1 thread avoids OpenMP synchronisation stalls that can slow the solve by 5-20x).

        Returns
        -------
        SolveResult
            ``status`` is ``"optimal"`` when ``tol`` was met, else ``"max_iter"`` or ``"stalled"``
            with the best iterate (the strictly dual-feasible one of lowest objective when there is one, since
            each of those is a valid answer, else the one of smallest residuals); ``info`` has ``gap``
            (relative), ``iterations``, ``device``, ``primal_infeasibility``, ``dual_infeasibility``,
            ``objective`` and ``lower_objective``.
        """
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise SolverError(f"unknown option(s) for solver 'native': {', '.join(sorted(unknown))}; "
                              f"accepted: tol, max_iter, device, {', '.join(_OPTIONS)}.")
        if not tol > 0 or int(max_iter) < 0:
            raise SolverError(f"solver 'native' needs tol > 0 and max_iter >= 0 (got tol={tol}, max_iter={max_iter}).")
        max_iter = int(max_iter)
        dev = torch.device("cpu" if device is None else device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SolverError("solver 'native' was asked for device='cuda' but CUDA is not available here.")
        start = time.perf_counter()
        log.info("solving %s with native (HKM interior point) on %s: %d variables, LMI sizes %s",
                 program.name, dev, program.n_vars, [lmi.size for lmi in program.lmis])
        threads = options.pop("threads", None)
        if threads is None and dev.type == "cpu" and sum(lmi.size for lmi in program.lmis) <= _SINGLE_THREAD_SIZE:
            threads = 1
        saved = torch.get_num_threads()
        try:
            if threads is not None:
                torch.set_num_threads(int(threads))
            with torch.no_grad():
                run = _Run(program, dev, tol, max_iter, verbose, options)
                y, status, info = run.solve()
        finally:
            torch.set_num_threads(saved)
        info["device"] = str(dev)
        return SolveResult(y, status, self.name, time.perf_counter() - start, info)


class _Run:
    """State of one interior-point run (kept separate so the solver object stays stateless)."""

    def __init__(self, program: Program, dev: torch.device, tol: float, max_iter: int, verbose: bool,
                 options: dict):
        self.program = program
        self.dev = dev
        self.tol = float(tol)
        self.max_iter = max_iter
        self.verbose = verbose
        self.step_fraction = options.get("step_fraction")
        self.lanczos_steps = int(options.get("lanczos_steps", 30))
        self.rng = np.random.default_rng(0)
        self.lmis = [_StructuredLMI(lmi, program.n_vars, dev) for lmi in program.lmis]
        self.nn = torch.tensor(np.flatnonzero(program.nonneg), device=dev)
        self.b = -torch.tensor(np.asarray(program.objective, dtype=np.float64), device=dev)
        self.n = program.n_vars
        self.basis: torch.Tensor | None = None
        self.dual_feasible = False

    # -- helpers --------------------------------------------------------------------------------------
    def _say(self, msg: str, *args) -> None:
        log.info(msg, *args)  # the library never prints: the caller shows INFO lines (the CLI does with -v)

    def _adjoint(self, mats: list[torch.Tensor], x_lp: torch.Tensor) -> torch.Tensor:
        """``sum_t A_t(Y_t) - E^T x``."""
        out = torch.zeros(self.n, dtype=torch.float64, device=self.dev)
        for s, mat in zip(self.lmis, mats, strict=True):
            out += s.adjoint(mat)[0]
        out[self.nn] -= x_lp
        return out

    def _max_step(self, chol: torch.Tensor, d: torch.Tensor) -> float:
        """Largest ``alpha`` with ``L L^T + alpha d >= 0`` (estimate on the safe side; inf if none)."""
        n = d.shape[0]
        if n <= max(2 * self.lanczos_steps, _DENSE_STEP_SIZE):
            # Small blocks: the explicit L^-1 d L^-T and a dense eigenvalue solve cost less than
            # the Lanczos recurrence's per-step overhead, and give the exact step.
            b = torch.linalg.solve_triangular(chol, d, upper=False)
            b = _sym(torch.linalg.solve_triangular(chol, b.T, upper=False))
            lam = float(torch.linalg.eigvalsh(b)[0])
        elif self.dev.type == "cpu":
            lc, dc = chol.numpy(), d.numpy()

            def op(v):
                w = dc @ scipy.linalg.solve_triangular(lc, v, lower=True, trans="T", check_finite=False)
                return scipy.linalg.solve_triangular(lc, w, lower=True, check_finite=False)
            lam = _lanczos_min(op, n, self.lanczos_steps, self.rng)
        else:
            def op(v):
                t = torch.from_numpy(v).to(self.dev).reshape(-1, 1)
                w = d @ torch.linalg.solve_triangular(chol.T, t, upper=True)
                return torch.linalg.solve_triangular(chol, w, upper=False).reshape(-1).cpu().numpy()
            lam = _lanczos_min(op, n, self.lanczos_steps, self.rng)
        return math.inf if lam >= 0 else -1.0 / lam

    @staticmethod
    def _lp_step(v: torch.Tensor, dv: torch.Tensor) -> float:
        neg = dv < 0
        if not bool(neg.any()):
            return math.inf
        return float(torch.min(-v[neg] / dv[neg]))

    def _schur_factor(self, x_mats: list[torch.Tensor], zinv: list[torch.Tensor], x_lp: torch.Tensor,
                      s_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (projected, Jacobi-scaled) HKM Schur matrix and its Cholesky factor."""
        h = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.dev)
        for s, xm, zi in zip(self.lmis, x_mats, zinv, strict=True):
            if s.m:
                s.schur(s.gram(xm), s.gram(zi), h)
        h = _sym(h)
        h[self.nn, self.nn] += x_lp / s_lp
        if self.basis is not None:
            h = _sym(self.basis.T @ h @ self.basis)
        diag = torch.diagonal(h).clone()
        scale = torch.where(diag > 0, diag.rsqrt(), torch.ones_like(diag))
        hs = h * scale[:, None] * scale[None, :]
        eye = torch.eye(h.shape[0], dtype=torch.float64, device=self.dev)
        shift = 0.0
        for _ in range(8):
            chol, info = torch.linalg.cholesky_ex(hs + shift * eye)
            if int(info) == 0:
                return h, chol, scale
            shift = 1e-14 if shift == 0.0 else shift * 100.0
        raise ArithmeticError("Schur matrix is not positive definite")

    def _solve_schur(self, h: torch.Tensor, chol: torch.Tensor, scale: torch.Tensor,
                     rhs: torch.Tensor) -> torch.Tensor:
        def once(r):
            return torch.cholesky_solve((r * scale).reshape(-1, 1), chol).reshape(-1) * scale
        if self.basis is not None:
            rhs = self.basis.T @ rhs
        dy = once(rhs)
        # One step of iterative refinement recovers accuracy lost to the Schur matrix's conditioning.
        dy = dy + once(rhs - h @ dy)
        return dy if self.basis is None else self.basis @ dy

    def _range_basis(self, gram: torch.Tensor) -> torch.Tensor | None:
        """Orthonormal basis of the multiplier directions that change some constraint, or ``None`` (all do).

        Free multipliers can be redundant (e.g. a combination that leaves every LMI unchanged); the
        Schur matrix is then singular along those directions and an interior-point method stalls.
        ``gram = [tr(F_i F_j)]``: its null space restricted to the free multipliers is exactly the set of
        such directions (sign-constrained multipliers always change ``y[nonneg]``). We keep ``y`` in
        its orthogonal complement; the objective must vanish on the null space, or the program is
        unbounded.
        """
        free = torch.tensor(np.flatnonzero(~np.asarray(self.program.nonneg, dtype=bool)), device=self.dev)
        if free.numel() == 0:
            return None
        vals, vecs = torch.linalg.eigh(_sym(gram[free][:, free]))
        top = float(vals.max()) if vals.numel() else 0.0
        null = vals <= 64 * np.finfo(float).eps * free.numel() * max(top, np.finfo(float).tiny)
        n_null = int(null.sum())
        if n_null == 0:
            return None
        c_null = vecs[:, null].T @ (-self.b[free])
        if float(torch.linalg.vector_norm(c_null)) > 1e-9 * (1.0 + float(torch.linalg.vector_norm(self.b))):
            raise SolverError(f"{self.program.name} is unbounded: the objective changes along {n_null} "
                              "direction(s) of free multipliers that leave every LMI unchanged.")
        log.info("native: %d redundant free-multiplier direction(s) removed", n_null)
        n_nn = int(self.nn.numel())
        basis = torch.zeros(self.n, n_nn + free.numel() - n_null, dtype=torch.float64, device=self.dev)
        basis[self.nn, torch.arange(n_nn, device=self.dev)] = 1.0
        basis[free.reshape(-1, 1), n_nn + torch.arange(free.numel() - n_null, device=self.dev)] = vecs[:, ~null]
        return basis

    # -- the method ------------------------------------------------------------------------------------
    def solve(self) -> tuple[np.ndarray, str, dict]:
        """Run the method; returns ``(y, status, info)``."""
        dev, lmis, nn = self.dev, self.lmis, self.nn
        n_nn = int(nn.numel())
        zeros_y = torch.zeros(self.n, dtype=torch.float64, device=dev)
        c_mats = [-s.assemble(s.const) for s in lmis]
        # Norms of the F_i (via tr(F_i F_i) from G = U^T U) and of C set the SDPT3-style starting point.
        norm_a = torch.zeros(self.n, dtype=torch.float64, device=dev)
        h_id = torch.zeros(self.n, self.n, dtype=torch.float64, device=dev)
        for s in lmis:
            if s.m:
                g = s.gram(torch.eye(s.size, dtype=torch.float64, device=dev))
                s.schur(g, g, h_id)
        self.basis = self._range_basis(_sym(h_id))
        norm_a += torch.diagonal(h_id).clamp_min(0).sqrt()
        norm_a[nn] = torch.sqrt(norm_a[nn] ** 2 + 1.0)
        bmax = float(torch.max(1.0 + self.b.abs() / (1.0 + norm_a))) if self.n else 1.0
        x_mats, z_mats = [], []
        for s, cm in zip(lmis, c_mats, strict=True):
            nsz = s.size
            xi = max(10.0, math.sqrt(nsz), nsz * bmax)
            eta = max(10.0, math.sqrt(nsz), float(norm_a.max()) if self.n else 1.0, float(torch.linalg.norm(cm)))
            x_mats.append(xi * torch.eye(nsz, dtype=torch.float64, device=dev))
            z_mats.append(eta * torch.eye(nsz, dtype=torch.float64, device=dev))
        xi_lp = max(10.0, math.sqrt(max(n_nn, 1)), max(n_nn, 1) * bmax)
        eta_lp = max(10.0, math.sqrt(max(n_nn, 1)), float(norm_a.max()) if self.n else 1.0)
        x_lp = torch.full((n_nn,), xi_lp, dtype=torch.float64, device=dev)
        s_lp = torch.full((n_nn,), eta_lp, dtype=torch.float64, device=dev)
        y = zeros_y.clone()
        n_cone = sum(s.size for s in lmis) + n_nn
        norm_b = float(torch.linalg.vector_norm(self.b))
        self.norm_b1 = 1.0 + norm_b
        norm_c = math.sqrt(sum(float(torch.linalg.norm(cm)) ** 2 for cm in c_mats))

        best = (math.inf, y.clone(), {})
        best_feasible = (math.inf, None, {})
        status = "max_iter"
        alpha_p = alpha_d = 1.0
        x_chols = [torch.linalg.cholesky(xm) for xm in x_mats]
        it = 0
        stall = 0
        prev_merit = math.inf
        for it in range(self.max_iter + 1):
            # Residuals and objectives. Once dual feasible, Z = -M(y) and s = y[nonneg] by construction.
            if self.dual_feasible:
                rd, rd_lp = None, torch.zeros_like(s_lp)
            else:
                rd = [cm - s.assemble(s.pair_coefficients(y, False)) - zm
                      for s, cm, zm in zip(lmis, c_mats, z_mats, strict=True)]
                rd_lp = y[nn] - s_lp
            rp = self.b - self._adjoint(x_mats, x_lp)
            pobj = sum(float(torch.sum(cm * xm)) for cm, xm in zip(c_mats, x_mats, strict=True))
            dobj = float(self.b @ y)
            xz = sum(float(torch.sum(xm * zm)) for xm, zm in zip(x_mats, z_mats, strict=True)) \
                + float(x_lp @ s_lp)
            mu = xz / max(n_cone, 1)
            denom = 1.0 + abs(pobj) + abs(dobj)
            gap = max(abs(pobj - dobj), xz) / denom
            pinf = float(torch.linalg.vector_norm(rp)) / (1.0 + norm_b)
            dinf = 0.0 if rd is None else math.sqrt(sum(float(torch.linalg.norm(r)) ** 2 for r in rd)
                                                    + float(rd_lp @ rd_lp)) / (1.0 + norm_c)
            merit = max(gap, pinf, dinf)
            info = {"gap": gap, "iterations": it, "primal_infeasibility": pinf, "dual_infeasibility": dinf,
                    "objective": -dobj, "lower_objective": -pobj, "mu": mu}
            if merit < best[0]:
                best = (merit, y.clone(), dict(info))
            if self.dual_feasible and -dobj < best_feasible[0]:
                # Every dual-feasible iterate is a valid answer; the lowest objective is the best one.
                best_feasible = (-dobj, y.clone(), dict(info))
            self._say("native it %3d  obj %+.10e  lower %+.10e  gap %.2e  pinf %.2e  dinf %.2e  mu %.2e  "
                      "step %.3f %.3f", it, -dobj, -pobj, gap, pinf, dinf, mu, alpha_p, alpha_d)
            if merit <= self.tol:
                status = "optimal"
                break
            if it == self.max_iter:
                break
            # Slow but steady progress is fine (e.g. multipliers drifting to an optimum at infinity);
            # ten iterations without a 10% improvement of the best merit are not.
            stall = stall + 1 if merit > 0.9 * prev_merit else 0
            prev_merit = min(prev_merit, merit)
            if stall >= 10:
                status = "stalled"
                break
            try:
                step = self._iterate(y, x_mats, z_mats, x_lp, s_lp, x_chols, rd, rd_lp, rp, mu, n_cone, c_mats)
            except ArithmeticError as exc:
                log.info("native: stopping at iteration %d: %s", it, exc)
                status = "stalled"
                break
            y, x_mats, z_mats, x_lp, s_lp, x_chols, alpha_p, alpha_d = step
            if max(alpha_p, alpha_d) < 1e-10:
                status = "stalled"
                break
        if status == "optimal":
            return y.cpu().numpy(), status, info
        # Without convergence (e.g. the primal residual stagnating while the dual iterates still improve), return
        # the dual-feasible iterate with the lowest objective if there is one, else the one of smallest merit.
        _, y_best, info_best = best if best_feasible[1] is None else best_feasible
        return y_best.cpu().numpy(), status, info_best

    def _iterate(self, y: torch.Tensor, x_mats: list[torch.Tensor], z_mats: list[torch.Tensor], x_lp: torch.Tensor,
                 s_lp: torch.Tensor, x_chols: list[torch.Tensor], rd: list[torch.Tensor] | None,
                 rd_lp: torch.Tensor, rp: torch.Tensor, mu: float, n_cone: int, c_mats: list[torch.Tensor]):
        """One Mehrotra predictor-corrector step; returns the new iterates and the step lengths."""
        lmis = self.lmis
        z_chols, zinv = [], []
        for zm in z_mats:
            chol, info = torch.linalg.cholesky_ex(zm)
            if int(info) != 0:
                raise ArithmeticError("dual slack lost positive definiteness")
            z_chols.append(chol)
            zinv.append(_sym(torch.cholesky_inverse(chol)))
        h, h_chol, h_scale = self._schur_factor(x_mats, zinv, x_lp, s_lp)
        # X R_d Z^-1 is shared by the predictor and the corrector right-hand sides (zero once dual feasible).
        if rd is None:
            adj_t = torch.zeros(self.n, dtype=torch.float64, device=self.dev)
            rd = [torch.zeros_like(zm) for zm in z_mats]
        else:
            t_mats = [_sym(xm @ r @ zi) for xm, r, zi in zip(x_mats, rd, zinv, strict=True)]
            adj_t = self._adjoint(t_mats, x_lp * rd_lp / s_lp)

        def direction(rc_mats, rc_lp, refine):
            rhs = rp - self._adjoint(rc_mats, rc_lp) + adj_t
            dy = self._solve_schur(h, h_chol, h_scale, rhs)
            dz = [r - s.assemble(s.pair_coefficients(dy, False)) for s, r in zip(lmis, rd, strict=True)]
            ds = rd_lp + dy[self.nn]
            dx = [rc - _sym(xm @ d @ zi) for rc, xm, d, zi in zip(rc_mats, x_mats, dz, zinv, strict=True)]
            dx_lp = rc_lp - x_lp * ds / s_lp
            for _ in range(refine):
                # Near the optimum the Schur matrix is ill-conditioned and A(dX) drifts from R_p, which
                # would make primal infeasibility grow. Refine against the operator dX is built with.
                err = rp - self._adjoint(dx, dx_lp)
                size = float(torch.linalg.vector_norm(err))
                if size <= 1e-3 * float(torch.linalg.vector_norm(rp)) + 1e-3 * self.tol * self.norm_b1:
                    break
                dd = self._solve_schur(h, h_chol, h_scale, err)
                dy = dy + dd
                moves = [s.assemble(s.pair_coefficients(dd, False)) for s in lmis]
                dz = [d - mv for d, mv in zip(dz, moves, strict=True)]
                ds = ds + dd[self.nn]
                dx = [d + _sym(xm @ mv @ zi) for d, xm, mv, zi in zip(dx, x_mats, moves, zinv, strict=True)]
                dx_lp = dx_lp - x_lp * dd[self.nn] / s_lp
            return dy, dx, dz, dx_lp, ds

        def steps(dx, dz, dx_lp, ds):
            ap = min([self._max_step(c, d) for c, d in zip(x_chols, dx, strict=True)]
                     + [self._lp_step(x_lp, dx_lp)])
            ad = min([self._max_step(c, d) for c, d in zip(z_chols, dz, strict=True)]
                     + [self._lp_step(s_lp, ds)])
            return ap, ad

        # Predictor (affine scaling): target X Z = 0.
        dy, dx, dz, dx_lp, ds = direction([-xm for xm in x_mats], -x_lp, 0)
        ap, ad = steps(dx, dz, dx_lp, ds)
        ap, ad = min(1.0, ap), min(1.0, ad)
        mu_aff = (sum(float(torch.sum((xm + ap * d1) * (zm + ad * d2)))
                      for xm, d1, zm, d2 in zip(x_mats, dx, z_mats, dz, strict=True))
                  + float((x_lp + ap * dx_lp) @ (s_lp + ad * ds))) / max(n_cone, 1)
        sigma = min(1.0, max(0.0, mu_aff / mu) ** 3) if mu > 0 else 0.0
        # Corrector: centring plus Mehrotra's second-order term sym(dXp dZp Z^-1).
        rc_mats = [sigma * mu * zi - xm - _sym(d1 @ d2 @ zi)
                   for zi, xm, d1, d2 in zip(zinv, x_mats, dx, dz, strict=True)]
        rc_lp = sigma * mu / s_lp - x_lp - dx_lp * ds / s_lp
        gamma = self.step_fraction if self.step_fraction is not None else 0.9 + 0.09 * min(ap, ad)
        dy, dx, dz, dx_lp, ds = direction(rc_mats, rc_lp, 2)
        ap, ad = steps(dx, dz, dx_lp, ds)
        ap, ad = min(1.0, gamma * ap), min(1.0, gamma * ad)
        # The step estimates are checked by factorizing the new iterates (needed next time anyway).
        new_x, new_x_chols, ap = self._advance(lambda a: [m + a * d for m, d in zip(x_mats, dx, strict=True)], ap)

        def slack(a):
            return [cm - s.assemble(s.pair_coefficients(y + a * dy, False)) for s, cm in zip(lmis, c_mats, strict=True)]
        if self.dual_feasible:
            new_z, _, ad = self._advance(slack, ad)
            new_s = (y + ad * dy)[self.nn]
        else:
            new_z, _, ad = self._advance(lambda a: [m + a * d for m, d in zip(z_mats, dz, strict=True)], ad)
            new_s = s_lp + ad * ds
            if ad == 1.0:
                # After a full dual step the residual is zero up to rounding: from now on keep Z = -M(y)
                # exactly, so every later iterate (and the returned y) is strictly feasible in floating point.
                exact = slack(1.0)
                if all(int(torch.linalg.cholesky_ex(m)[1]) == 0 for m in exact):
                    new_z, new_s, self.dual_feasible = exact, (y + dy)[self.nn], True
        return (y + ad * dy, new_x, new_z, x_lp + ap * dx_lp, new_s, new_x_chols, ap, ad)

    @staticmethod
    def _advance(make, alpha: float):
        """``make(alpha)`` with ``alpha`` shrunk until every matrix has a Cholesky factor."""
        for _ in range(60):
            new = make(alpha)
            chols = []
            for m in new:
                chol, info = torch.linalg.cholesky_ex(m)
                if int(info) != 0:
                    break
                chols.append(chol)
            else:
                return new, chols, alpha
            alpha *= 0.8
        raise ArithmeticError("no step keeps the iterate positive definite")
