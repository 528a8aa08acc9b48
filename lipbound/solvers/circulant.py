"""``solver="circulant"``: a primal-dual interior-point method for the torus restriction of per-channel LipSDP.

The program (:mod:`lipbound.formulations.circulant`) is ``minimize rho`` subject to
``blockdiag_w M_w(y) + U U^* <= 0`` and ``lambda >= 0``, where ``M_w(y) = Q_w C(y) Q_w^*`` is the LMI's block at
torus frequency ``w`` (``Q_w = [I, A_w]``: unit vectors and the columns ``K_k(w)^* e_c`` of every channel
multiplier; ``C(y)`` places each multiplier's coefficients on pairs of columns) and ``U`` the head, whose rank-``h``
term couples the frequencies. The coupling is split exactly (the arrow pattern is chordal, Agler's theorem):

    [[M_w(y), U_w], [U_w^*, -Y_w]] <= 0 for every w,    sum_w Y_w <= I,

with one Hermitian ``h x h`` variable ``Y_w`` per frequency; one frequency of each conjugate pair ``{w, -w}`` is
kept (the data are real, so the pair's blocks are conjugate; :func:`conjugate_pairs`) and the coupling reads
``sum_w mult_w Re(Y_w) <= I``. That is an SDP with about ``T_1 T_2 / 2`` small cones (order
``n + h``), one ``h x h`` cone and the multipliers' signs, solved by the infeasible-start primal-dual
path-following method with the HKM direction and Mehrotra's predictor-corrector (as the native solver). Its
Schur matrix has an arrow structure: the multipliers ``y`` couple everything, each ``Y_w`` only its own cone and
the coupling cone, whose contribution is the same ``h^2 x h^2`` block for every pair of frequencies. The ``Y``
part is eliminated frequency by frequency (Woodbury for the coupling), leaving an ``m x m`` system: an
iteration costs ``O(T_1 T_2 ((n + h)^3 + r^2 (n + h) + P^2 m^2 + h^6 + m h^4))`` for ``m`` multipliers,
``r = n + h + m`` factor columns and ``P`` pairs per multiplier, instead of ``O((n H W)^3)`` and more for the
network's own LMI.

Why our own: no solver reachable from cvxpy eliminates the ``Y`` variables this way (the program has
``T_1 T_2 h^2`` of them: 22,500 for a 14x14 image and 10 outputs), and the native solver's Schur matrix is dense
in all variables. The multipliers it returns are an answer like any solver's: :mod:`lipbound.certificate` checks
them on the network's program (re-optimising ``rho`` there).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from lipbound.errors import SolverError
from lipbound.formulations.circulant import CirculantChain
from lipbound.solvers.base import SolveResult
from lipbound.solvers.cones import lp_step

log = logging.getLogger("lipbound")

#: A stopped run whose answer is within this factor of tol is "optimal_inaccurate" (as the native solver).
_INACCURATE = 10.0


def _hermitian_basis(h: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A real basis of the ``h x h`` Hermitian matrices: ``e_a e_a^T``, then ``e_a e_b^T + e_b e_a^T`` and
    ``i (e_a e_b^T - e_b e_a^T)`` for ``a < b``; as a dense ``(h^2, h, h)`` tensor and as entry lists
    ``E_j = sum_t coef[j, t] e_row[j, t] e_col[j, t]^T`` (two entries each, the second 0 on the diagonal)."""
    rows, cols, coefs = [], [], []
    for a in range(h):
        rows.append((a, a))
        cols.append((a, a))
        coefs.append((1.0, 0.0))
    for a in range(h):
        for b in range(a + 1, h):
            rows += [(a, b), (a, b)]
            cols += [(b, a), (b, a)]
            coefs += [(1.0, 1.0), (1j, -1j)]
    row = torch.tensor(rows, device=device)
    col = torch.tensor(cols, device=device)
    coef = torch.tensor(coefs, dtype=torch.complex128, device=device)
    dense = torch.zeros(h * h, h, h, dtype=torch.complex128, device=device)
    for t in range(2):
        dense[torch.arange(h * h, device=device), row[:, t], col[:, t]] += coef[:, t]
    return dense, row, col, coef


def conjugate_pairs(torus: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One frequency of each pair ``{w, -w}`` of the torus (flat C-order indices, the first of the pair) and the
    pair's size (1 where ``w = -w``, else 2).

    The network's data are real, so every block at ``-w`` is the complex conjugate of the block at ``w`` and holds
    exactly when that one does; with ``Y_-w = conj(Y_w)`` (no loss: the program is invariant under that
    reflection and convex, so the mean of a feasible point and its reflection is feasible with the same ``rho``)
    the coupling becomes ``sum_w mult_w Re(Y_w) <= I`` over the kept frequencies. That halves every per-frequency
    cost; the 14 x 14 image's 225 frequencies become 113.
    """
    grid = np.indices(torus).reshape(len(torus), -1)
    partner = np.ravel_multi_index(tuple((-grid) % np.array(torus)[:, None]), torus)
    index = np.arange(partner.size)
    keep = np.flatnonzero(index <= partner)
    return keep, np.where(partner[keep] == keep, 1.0, 2.0)


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.mH)


class _Arrow:
    """The torus program's data and operators (batched over frequencies)."""

    def __init__(self, chain: CirculantChain, device: torch.device):
        cd = torch.complex128
        self.dev = device
        ch = chain.channels
        self.n = n = sum(ch)
        self.h = h = chain.head.shape[2]
        self.big = big = n + h
        off = np.concatenate([[0], np.cumsum(ch)]).astype(int)
        self.m = m = chain.n_vars
        keep, mult = conjugate_pairs(chain.torus)
        self.torus_frequencies = int(np.prod(chain.torus))
        self.nf = nf = keep.size
        lam = m - 1
        self.r = big + lam
        # Q_w = [I | A_w]: the a-column of multiplier (k, c) is K_k(w)^* e_c, in block k - 1's rows.
        q = torch.zeros(nf, big, self.r, dtype=cd, device=device)
        q[:, :, :big] = torch.eye(big, dtype=cd, device=device)
        col = big
        for k, sym in enumerate(chain.symbols, start=1):
            q[:, off[k - 1]:off[k], col:col + ch[k]] = torch.tensor(sym[keep], dtype=cd, device=device).mH
            col += ch[k]
        self.q = q
        # C_w = -[[0, U_w], [U_w^*, 0]]: the head's rows sit in block d.
        c = torch.zeros(nf, big, big, dtype=cd, device=device)
        head = torch.tensor(chain.head[keep], dtype=cd, device=device)
        c[:, off[-2]:off[-1], n:] = -head
        c[:, n:, off[-2]:off[-1]] = -head.mH
        self.c = c
        # dM_w/dy_i = sum_p w_ip q_{u_ip} q_{v_ip}^*: rho has -e_j e_j^* over block 0; lambda_(k,c) has
        # -2 alpha beta a a^* + (alpha + beta) (a e^* + e a^*) - 2 e e^*.
        terms = max(4, ch[0])
        u = np.zeros((m, terms), dtype=np.int64)
        v = np.zeros((m, terms), dtype=np.int64)
        w = np.zeros((m, terms))
        u[0, :ch[0]] = v[0, :ch[0]] = np.arange(ch[0])
        w[0, :ch[0]] = -1.0
        alpha, beta = np.concatenate(chain.alpha), np.concatenate(chain.beta)
        e = np.concatenate([off[k] + np.arange(ch[k]) for k in range(1, len(ch))])
        a = big + np.arange(lam)
        u[1:, :4] = np.stack([a, a, e, e], axis=1)
        v[1:, :4] = np.stack([a, e, a, e], axis=1)
        w[1:, :4] = np.stack([-2.0 * alpha * beta, alpha + beta, alpha + beta, np.full(lam, -2.0)], axis=1)
        keep = np.any(w != 0, axis=0)
        self.u = torch.tensor(u[:, keep], device=device)
        self.v = torch.tensor(v[:, keep], device=device)
        self.w = torch.tensor(w[:, keep], dtype=torch.float64, device=device)
        self.basis, self.b_row, self.b_col, self.b_coef = _hermitian_basis(h, device)
        row, col, coef = self.b_row, self.b_col, self.b_coef
        # The coupling cone sees mult_w Re(Y_w): the weight of each of Y_w's coordinates there (0 for the
        # imaginary ones, whose real part is 0).
        real = (coef[:, 0].imag == 0).to(torch.float64)
        self.couple = torch.as_tensor(mult, dtype=torch.float64, device=device)[:, None] * real[None, :]
        self.corner_gather = []
        for t in range(2):
            for t2 in range(2):
                flat = (((col[:, t, None] * h + row[None, :, t2]) * h + col[None, :, t2]) * h + row[:, t, None])
                c = (coef[:, t, None] * coef[None, :, t2]).reshape(-1)
                imag = c.imag != 0  # Re(+-i z) = -+Im z
                self.corner_gather.append((2 * flat.reshape(-1) + imag.long(),
                                           torch.where(imag, -c.imag, c.real).to(torch.float64)))
        self.corner = slice(n, big)

    # -- the maps ---------------------------------------------------------------------------------------
    def slack_y(self, y: torch.Tensor) -> torch.Tensor:
        """``A_w^T(y) = M_w(y)`` (the multipliers' part of every cone's matrix)."""
        coef = torch.zeros(self.r, self.r, dtype=torch.float64, device=self.dev)
        coef.index_put_((self.u.reshape(-1), self.v.reshape(-1)), (y[:, None] * self.w).reshape(-1), accumulate=True)
        return self.q @ coef.to(self.q.dtype) @ self.q.mH

    def hermitian(self, vec: torch.Tensor) -> torch.Tensor:
        """``(nf, h^2)`` real coordinates -> ``(nf, h, h)`` Hermitian matrices."""
        return torch.einsum("fa,aij->fij", vec.to(self.basis.dtype), self.basis)

    def contract(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``sum_kl E_j[k, l] left[..., k] right[..., l]`` for every basis element ``j`` (complex)."""
        out = 0
        for t in range(2):
            out = out + self.b_coef[:, t] * left[..., self.b_row[:, t]] * right[..., self.b_col[:, t]]
        return out

    def coordinates(self, mats: torch.Tensor) -> torch.Tensor:
        """``Re tr(E_j X)`` for every basis element: the adjoint of :meth:`hermitian`."""
        out = 0
        for t in range(2):
            out = out + self.b_coef[:, t] * mats[..., self.b_col[:, t], self.b_row[:, t]]
        return out.real

    def adjoint_y(self, x: torch.Tensor) -> torch.Tensor:
        """``(Re sum_w tr(F_i(w) X_w))_i``."""
        gram = self.q.mH @ x @ self.q
        return (self.w * gram[:, self.v, self.u].sum(0).real).sum(1)

    def cone_slack(self, y: torch.Tensor, yv: torch.Tensor) -> torch.Tensor:
        """``Z_w = C_w - A_w^T(y, Y_w)`` with ``A_w^T(y, Y) = [[M_w(y), 0], [0, -Y]]``."""
        z = self.c - self.slack_y(y)
        z[:, self.corner, self.corner] += self.hermitian(yv)
        return _sym(z)

    # -- the Schur matrix ---------------------------------------------------------------------------------
    def schur(self, x: torch.Tensor, zi: torch.Tensor, xc: torch.Tensor, zci: torch.Tensor, lp: torch.Tensor):
        """Blocks of the symmetrised HKM Schur matrix ``<F_a, sym(X F_b Z^-1)>``: ``(yy (m x m), yY (nf, m, h^2),
        YY (nf, h^2, h^2), coupling (h^2 x h^2))``; ``lp`` is ``x / s`` of the multipliers' signs."""
        q, u, v, w = self.q, self.u, self.v, self.w
        gx = q.mH @ x @ q
        gz = q.mH @ zi @ q
        terms = u.shape[1]
        yy = torch.zeros(self.m, self.m, dtype=torch.float64, device=self.dev)
        for p in range(terms):
            rows_x = gx[:, v[:, p]]
            for p2 in range(terms):
                k = rows_x[:, :, u[:, p2]] * gz[:, v[:, p2]][:, :, u[:, p]].transpose(1, 2)
                yy += w[:, p, None] * w[None, :, p2] * k.sum(0).real
        yy = 0.5 * (yy + yy.T)
        yy.diagonal()[1:] += lp
        cs = self.corner
        # tr(F_i X (-E_b) Z^-1) = -sum_p w_ip (Q^* X)[v_p, corner] E_b (Z^-1 Q)[corner, u_p], and the transposed
        # product tr((-E_b) X F_i Z^-1) likewise: their mean is the symmetrised entry.
        left_x, right_z = q.mH @ x[:, :, cs], zi[:, cs, :] @ q
        left_z, right_x = q.mH @ zi[:, :, cs], x[:, cs, :] @ q
        right_z, right_x = right_z.transpose(1, 2), right_x.transpose(1, 2)  # (nf, r, h)
        yv = torch.zeros(self.nf, self.m, self.h * self.h, dtype=torch.float64, device=self.dev)
        for p in range(terms):
            both = self.contract(left_x[:, v[:, p], None], right_z[:, u[:, p], None]) \
                + self.contract(left_z[:, v[:, p], None], right_x[:, u[:, p], None])
            yv -= 0.5 * w[None, :, p, None] * both[:, :, 0].real
        xcc, zcc = x[:, cs, cs], zi[:, cs, cs]
        yyv = self._corner_block(xcc, zcc)
        coupling = self._corner_block(xc[None], zci[None])[0]
        return yy, yv, yyv, coupling

    def _corner_block(self, xcc: torch.Tensor, zcc: torch.Tensor) -> torch.Tensor:
        """``Re tr(E_a X E_b Z^-1)``, symmetrised, for ``h x h`` blocks (batched)."""
        # tr(E_a X E_b Z^-1) = sum_{t, t'} ca_t cb_t' X[col_a_t, row_b_t'] Z^-1[col_b_t', row_a_t]: gathers from the
        # products X[p, q] Z^-1[s, u] (h^4 per frequency).
        prod = torch.view_as_real(xcc[:, :, :, None, None] * zcc[:, None, None, :, :]).reshape(xcc.shape[0], -1)
        out = 0
        for index, sign in self.corner_gather:  # coefficients are 0, +-1 or +-i: Re(c z) is +-Re z or +-Im z
            out = out + sign * prod[:, index]
        out = out.reshape(-1, self.h * self.h, self.h * self.h)
        return 0.5 * (out + out.transpose(1, 2))


def _cholesky(mat: torch.Tensor, what: str) -> torch.Tensor:
    """Cholesky factor(s) of (batched) ``mat``, shifted by growing multiples of its largest diagonal entry when
    rounding has made it indefinite (the Schur matrix is near-singular at the last digits of a solve)."""
    lo, info = torch.linalg.cholesky_ex(mat)
    shift = 1e-15
    top = float(torch.diagonal(mat, dim1=-2, dim2=-1).abs().max())
    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    while bool(info.any()) and shift < 1e-8:
        lo, info = torch.linalg.cholesky_ex(mat + shift * top * eye)
        shift *= 100.0
    if bool(info.any()):
        raise ArithmeticError(f"{what} is not positive definite")
    return lo


class _Schur:
    """The arrow-structured Schur system, factored once per iteration: ``Y`` eliminated per frequency (Woodbury
    for the coupling cone's block ``C_w Kc C_w'`` between frequencies ``w`` and ``w'``, ``C_w = diag(couple_w)``
    the weights of ``Y_w``'s coordinates in the coupling), an ``m x m`` system for ``y``. Every block is
    Jacobi-scaled before its factorisation (its accuracy is then relative to each row's own size)."""

    def __init__(self, yy, yv, yyv, coupling, couple):
        dev = yy.device
        hh = yyv.shape[1]
        eye = torch.eye(hh, dtype=torch.float64, device=dev)
        self.d_scale = torch.diagonal(yyv, dim1=1, dim2=2).clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
        ds = self.d_scale
        self.d_lo = _cholesky(yyv * ds[:, :, None] * ds[:, None, :], "a frequency's block of the Schur matrix")
        # B = D + E Kc E^T (E stacks the C_w): B^-1 = D^-1 - D^-1 E (I + Kc S)^-1 Kc E^T D^-1, S = sum C D^-1 C.
        self.couple = couple
        dinv = self._dinv(eye.expand(yyv.shape[0], -1, -1))
        dinv_sum = (couple[:, :, None] * dinv * couple[:, None, :]).sum(0)
        self.core = torch.linalg.solve(eye + coupling @ dinv_sum, coupling)  # (I + Kc S)^-1 Kc
        self.yv = yv
        dinv_yv = self._dinv(yv.transpose(1, 2))  # (nf, hh, m)
        s_yv = (couple[:, :, None] * dinv_yv).sum(0)  # E^T D^-1 M_Yy
        reduced = yy - torch.einsum("fma,fan->mn", yv, dinv_yv) + s_yv.T @ self.core @ s_yv
        reduced = 0.5 * (reduced + reduced.T)
        diag = torch.diagonal(reduced)
        if not bool((diag > 0).all()):
            raise ArithmeticError("the reduced Schur matrix lost positive definiteness (cancellation)")
        self.scale = diag.rsqrt()
        self.r_lo = _cholesky(reduced * self.scale[:, None] * self.scale[None, :], "the reduced Schur matrix")

    def _dinv(self, r: torch.Tensor) -> torch.Tensor:
        """``D_w^-1 r_w`` for ``r`` of shape ``(nf, hh, k)``."""
        ds = self.d_scale[:, :, None]
        return torch.cholesky_solve(r * ds, self.d_lo) * ds

    def _binv(self, r: torch.Tensor) -> torch.Tensor:
        """``B^-1 r`` for ``r`` of shape ``(nf, hh)``."""
        t = self._dinv(r[:, :, None])[:, :, 0]
        corr = self.core @ (self.couple * t).sum(0)
        return t - self._dinv((self.couple * corr[None, :])[:, :, None])[:, :, 0]

    def solve(self, ry: torch.Tensor, rv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._binv(rv)
        rhs = ry - torch.einsum("fma,fa->m", self.yv, t)
        dy = torch.cholesky_solve((rhs * self.scale)[:, None], self.r_lo)[:, 0] * self.scale
        dyv = self._binv(rv - torch.einsum("fma,m->fa", self.yv, dy))
        return dy, dyv


#: Relative accuracy of a step length found by bisection (:func:`_max_step`); the iteration takes 0.9-0.99 of it.
_STEP_RTOL = 1e-3


def _max_step(lo: torch.Tensor, d: torch.Tensor, exact: bool | None = None) -> float:
    """The largest ``a <= 1`` with ``L L^* + a d >= 0`` (batched; the iteration never steps further than 1).

    ``exact`` (the default on the CPU): from the smallest eigenvalue of ``L^-1 d L^-*``. Otherwise (the default on
    CUDA) by bisection on ``a`` with batched Cholesky factorisations of ``I + a L^-1 d L^-*``: on an H200 one
    batched eigenvalue solve of 225 blocks of order 267 took 0.69 s and made 95 % of an iteration's time, a
    factorisation 1.8 ms. The bisection returns a length that factors, within a factor ``1 + _STEP_RTOL`` of the
    largest one (or after halving 60 times: ``0``)."""
    t = torch.linalg.solve_triangular(lo, d, upper=False)
    t = _sym(torch.linalg.solve_triangular(lo, t.mH, upper=False))
    if exact if exact is not None else t.device.type == "cpu":
        low = float(torch.linalg.eigvalsh(t).min())
        return 1.0 if low >= -1.0 else -1.0 / low
    eye = torch.eye(t.shape[-1], dtype=t.dtype, device=t.device)

    def factors(a: float) -> bool:
        return not bool(torch.linalg.cholesky_ex(eye + a * t)[1].any())

    if factors(1.0):
        return 1.0
    high, low = 1.0, 0.5
    while not factors(low):
        high, low = low, low / 2
        if low < 2.0**-60:
            return 0.0
    while high > low * (1 + _STEP_RTOL):
        mid = math.sqrt(high * low) if high > 2 * low else 0.5 * (high + low)
        if factors(mid):
            low = mid
        else:
            high = mid
    return low


def solve_circulant(chain: CirculantChain, tol: float = 1e-6, max_iter: int = 100,
                    device: str | torch.device | None = None) -> SolveResult:
    """Minimise ``rho`` over the torus program of ``chain`` (see the module docstring).

    ``status`` is ``"optimal"`` when the relative gap and infeasibilities are at most ``tol``, ``"optimal_inaccurate"``
    within ``10 tol``, else ``"max_iter"`` or ``"stalled"`` with the iterate of smallest residuals. ``info``:
    ``iterations``, ``gap``, ``primal_infeasibility``, ``dual_infeasibility``, ``objective`` (``rho``),
    ``lower_objective``, ``frequencies`` (kept: one per conjugate pair), ``torus_frequencies``, ``block_size``,
    ``device`` and, on CUDA, ``peak_memory_mb``.
    """
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SolverError("solver 'circulant' was asked for device='cuda' but CUDA is not available here.")
    start = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad():
        run = _Run(_Arrow(chain, dev), tol, max_iter)
        y, status, info = run.solve()
    info.update(frequencies=run.ar.nf, torus_frequencies=run.ar.torus_frequencies, block_size=run.ar.big,
                device=str(dev))
    if dev.type == "cuda":
        info["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return SolveResult(y, status, "circulant", time.perf_counter() - start, info)


class _Run:
    """One interior-point run on :class:`_Arrow` (state kept apart from the data)."""

    def __init__(self, arrow: _Arrow, tol: float, max_iter: int):
        self.ar = arrow
        self.tol = float(tol)
        self.max_iter = int(max_iter)

    def _hkm(self, x, d, zi):
        return _sym(x @ d @ zi)

    def _adjoint(self, xf, xc, x_lp):
        """``(A(X) + A_lp(x))``: the y part and the per-frequency Y part."""
        ar = self.ar
        ay = ar.adjoint_y(xf)
        ay[1:] -= x_lp
        av = -ar.coordinates(xf[:, ar.corner, ar.corner]) + ar.couple * ar.coordinates(xc)[None]
        return ay, av

    def _assemble(self, dy, dyv):
        """``A^T(dw)`` for every cone: frequencies, coupling, and the signs (``-E dy``)."""
        ar = self.ar
        mf = ar.slack_y(dy)
        mf[:, ar.corner, ar.corner] -= ar.hermitian(dyv)
        return _sym(mf), ar.hermitian(ar.couple * dyv).sum(0), -dy[1:]

    def solve(self):
        ar, dev = self.ar, self.ar.dev
        big, h, m, nf = ar.big, ar.h, ar.m, ar.nf
        cd = torch.complex128
        eye_f = torch.eye(big, dtype=cd, device=dev).expand(nf, -1, -1)
        eye_h = torch.eye(h, dtype=cd, device=dev)
        norm_c = float(torch.linalg.vector_norm(ar.c))
        coef_norm = float(torch.linalg.vector_norm(ar.q, dim=1).max() ** 2) * float(ar.w.abs().max())
        xi = max(10.0, math.sqrt(big))
        eta = max(10.0, math.sqrt(big), norm_c, coef_norm)
        xf, zf = xi * eye_f.clone(), eta * eye_f.clone()
        xc, zc = xi * eye_h.clone(), eta * eye_h.clone()
        x_lp = torch.full((m - 1,), xi, dtype=torch.float64, device=dev)
        s_lp = torch.full((m - 1,), eta, dtype=torch.float64, device=dev)
        y = torch.zeros(m, dtype=torch.float64, device=dev)
        yv = torch.zeros(nf, h * h, dtype=torch.float64, device=dev)
        b = torch.zeros(m, dtype=torch.float64, device=dev)
        b[0] = -1.0
        n_cone = nf * big + h + (m - 1)
        best = (math.inf, y.clone(), {})
        status = "max_iter"
        info: dict = {}
        history: list[tuple[float, float]] = []
        for it in range(self.max_iter + 1):
            zf_now, zc_now, s_now = ar.cone_slack(y, yv), eye_h - ar.hermitian(ar.couple * yv).sum(0), y[1:]
            rd, rd_c, rd_lp = zf_now - zf, _sym(zc_now - zc), s_now - s_lp
            ay, av = self._adjoint(xf, xc, x_lp)
            rp_y, rp_v = b - ay, -av
            pobj = float(torch.einsum("fij,fji->", ar.c, xf).real) + float(torch.diagonal(xc).real.sum())
            dobj = float(b @ y)
            xz = float(torch.einsum("fij,fji->", xf, zf).real) + float(torch.einsum("ij,ji->", xc, zc).real) \
                + float(x_lp @ s_lp)
            mu = xz / n_cone
            scale = max(abs(pobj) + abs(dobj), 1e-300)
            gap = max(abs(pobj - dobj), xz) / scale
            pinf = math.sqrt(float(rp_y @ rp_y) + float((rp_v ** 2).sum()))
            dinf = math.sqrt(float(torch.linalg.vector_norm(rd) ** 2 + torch.linalg.vector_norm(rd_c) ** 2)
                             + float(rd_lp @ rd_lp)) / (1.0 + norm_c)
            merit = max(gap, pinf, dinf)
            info = {"iterations": it, "gap": gap, "primal_infeasibility": pinf, "dual_infeasibility": dinf,
                    "objective": -dobj, "lower_objective": -pobj}
            if merit < best[0]:
                best = (merit, y.clone(), dict(info))
            log.info("circulant it %3d  rho %+.10e  lower %+.10e  gap %.2e  pinf %.2e  dinf %.2e", it, -dobj, -pobj,
                     gap, pinf, dinf)
            if merit <= self.tol:
                status = "optimal"
                break
            # Stalled: neither the best merit nor mu fell by 10 % in 8 iterations. The relative gap alone sits near 1
            # while the lower bound crosses 0 (c16-d8: rho fell from 506 to 22 in 11 iterations at gap 1.0-3.1,
            # and a rule on the gap alone stopped it there).
            history.append((best[0], mu))
            if it == self.max_iter or (len(history) > 8 and history[-1][0] > 0.9 * history[-9][0]
                                       and history[-1][1] > 0.9 * history[-9][1]):
                status = "stalled" if it < self.max_iter else status
                break
            try:
                step = self._step(y, yv, xf, zf, xc, zc, x_lp, s_lp, rd, rd_c, rd_lp, rp_y, rp_v, mu, n_cone)
            except ArithmeticError as exc:
                log.info("circulant: stopping at iteration %d: %s", it, exc)
                status = "stalled"
                break
            y, yv, xf, zf, xc, zc, x_lp, s_lp = step
        merit, y_best, info_best = best
        if status != "optimal" and merit <= _INACCURATE * self.tol:
            status = "optimal_inaccurate"
        return y_best.cpu().numpy(), status, info_best

    def _step(self, y, yv, xf, zf, xc, zc, x_lp, s_lp, rd, rd_c, rd_lp, rp_y, rp_v, mu, n_cone):
        ar = self.ar
        lzf, info = torch.linalg.cholesky_ex(zf)
        lzc, info_c = torch.linalg.cholesky_ex(zc)
        lxf, info_x = torch.linalg.cholesky_ex(xf)
        lxc, info_xc = torch.linalg.cholesky_ex(xc)
        if bool(info.any()) or bool(info_c) or bool(info_x.any()) or bool(info_xc):
            raise ArithmeticError("an iterate lost positive definiteness")
        zfi, zci = torch.cholesky_inverse(lzf), torch.cholesky_inverse(lzc)
        schur = _Schur(*ar.schur(xf, zfi, xc, zci, x_lp / s_lp), ar.couple)
        adj_ty, adj_tv = self._adjoint(self._hkm(xf, rd, zfi), self._hkm(xc, rd_c, zci), x_lp * rd_lp / s_lp)

        rp_norm = math.sqrt(float(rp_y @ rp_y) + float((rp_v ** 2).sum()))

        def direction(rc_f, rc_c, rc_lp, refine=6):
            ay, av = self._adjoint(rc_f, rc_c, rc_lp)
            dy, dyv = schur.solve(rp_y - ay + adj_ty, rp_v - av + adj_tv)
            af, ac, alp = self._assemble(dy, dyv)
            dzf, dzc, ds = rd - af, rd_c - ac, rd_lp - alp
            dxf = rc_f - self._hkm(xf, dzf, zfi)
            dxc = rc_c - self._hkm(xc, dzc, zci)
            dx_lp = rc_lp - x_lp * ds / s_lp
            # Near the optimum the Schur matrix is ill-conditioned and A(dX) drifts from R_p; refine against the
            # operator dX is built with (as the native solver does).
            for _ in range(refine):
                ey, ev = self._adjoint(dxf, dxc, dx_lp)
                ey, ev = rp_y - ey, rp_v - ev
                size = math.sqrt(float(ey @ ey) + float((ev ** 2).sum()))
                if size <= 1e-3 * rp_norm + 1e-3 * self.tol:
                    break
                ddy, ddv = schur.solve(ey, ev)
                mf, mc, mlp = self._assemble(ddy, ddv)
                dy, dyv = dy + ddy, dyv + ddv
                dzf, dzc, ds = dzf - mf, dzc - mc, ds - mlp
                dxf = dxf + self._hkm(xf, mf, zfi)
                dxc = dxc + self._hkm(xc, mc, zci)
                dx_lp = dx_lp + x_lp * mlp / s_lp
            return dy, dyv, dxf, dzf, dxc, dzc, dx_lp, ds

        def steps(d):
            _, _, dxf, dzf, dxc, dzc, dx_lp, ds = d
            ap = min(_max_step(lxf, dxf), _max_step(lxc[None], dxc[None]), lp_step(x_lp, dx_lp))
            ad = min(_max_step(lzf, dzf), _max_step(lzc[None], dzc[None]), lp_step(s_lp, ds))
            return min(1.0, ap), min(1.0, ad)

        pred = direction(-xf, -xc, -x_lp)
        ap, ad = steps(pred)
        pred_steps = (round(ap, 4), round(ad, 4))
        _, _, dxf, dzf, dxc, dzc, dx_lp, ds = pred
        mu_aff = (float(torch.einsum("fij,fji->", xf + ap * dxf, zf + ad * dzf).real)
                  + float(torch.einsum("ij,ji->", xc + ap * dxc, zc + ad * dzc).real)
                  + float((x_lp + ap * dx_lp) @ (s_lp + ad * ds))) / n_cone
        expon = max(1.0, min(3.0, 3.0 * min(ap, ad) ** 2))
        sigma = min(1.0, max(0.0, mu_aff / mu) ** expon)
        corr = direction(sigma * mu * zfi - xf - self._hkm(dxf, dzf, zfi),
                         sigma * mu * zci - xc - self._hkm(dxc, dzc, zci),
                         sigma * mu / s_lp - x_lp - dx_lp * ds / s_lp)
        ap, ad = steps(corr)
        log.debug("circulant steps: predictor %s sigma %.3e corrector %.3e %.3e", pred_steps, sigma, ap, ad)
        gamma = 0.9 + 0.09 * min(ap, ad)
        ap, ad = min(1.0, gamma * ap), min(1.0, gamma * ad)
        dy, dyv, dxf, dzf, dxc, dzc, dx_lp, ds = corr
        return (y + ad * dy, yv + ad * dyv, xf + ap * dxf, zf + ad * dzf, xc + ap * dxc, zc + ad * dzc,
                x_lp + ap * dx_lp, s_lp + ad * ds)
