"""The positive semidefinite cone of one LMI, on a dense or a chordal (block-tridiagonal) layout.

The interior-point method (:mod:`lipbound.solvers.native`) sees each LMI through a :class:`SemidefiniteCone`.
Both strategies are the same code on a different :class:`~lipbound.solvers.lowrank.Layout`:

* **dense**: one super-block; ``X`` and ``Z`` are full matrices (the classical HKM method).
* **chordal**: a chain of ``nb`` super-blocks of size ``b`` whose pattern ``E`` is block tridiagonal (cliques =
  consecutive super-block pairs). This is the *completion method* of Fukuda, Kojima, Murota and Nakata
  (SIAM J. Optim. 2000; Nakata et al., Math. Program. 2003, SDPA-C): the slack ``Z`` lives on ``E``
  and is factorised by a block Cholesky recursion without fill; the primal ``X`` is kept only on ``E`` (only
  those entries enter any constraint or objective), and the HKM direction uses its **maximum-determinant
  completion** ``X^`` (whose inverse has pattern ``E``; on the central path ``X^ = mu Z^-1`` exactly, so the
  path and its limit, the LipSDP optimum, are those of the dense method). ``X`` stays in the cone of
  PSD-completable matrices iff every clique block is PSD (Grone et al. 1984), which is how step lengths are
  taken: one batched eigenvalue problem over the cliques.

Costs per iteration of the chordal layout: ``Z^-1`` and ``X^`` are formed densely by block recursions
(``Z^-1_{s,l} = -Lambda_s^-1 Z_{s,s+1} Z^-1_{s+1,l}``; ``X^_{s,l} = X_{s,s+1} X_{s+1,s+1}^-1 X^_{s+1,l}``), each
``O(nb^2 b^3) = O(N^2 b)`` instead of ``O(N^3)``, and the HKM products ``Pi_E(X^ dZ Z^-1)`` cost ``O(N^2 b)``
too (only the blocks on ``E`` of the outer product are formed). The Schur matrix itself is dense in the
multipliers (``Z^-1`` and ``X^`` are dense), which is why both strategies share its construction and
factorisation.

One approximation, in the corrector only: Mehrotra's second-order term ``Pi_E(dX dZ Z^-1)`` uses the predictor's
``dX`` on ``E`` instead of its dense HKM form (which would cost ``O(N^3)``). It only shapes the centring target;
residuals and convergence tests are unaffected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import torch

from lipbound.solvers.lowrank import LowRankLMI

# Cliques (and whole small cones) up to this size get exact step lengths from a batched dense eigenvalue solve
# (measured crossover with the Lanczos estimate on 2 CPU cores: about 250).
_EXACT_STEP_SIZE = 256
# Step lengths of at most this many cliques go through LAPACK one clique at a time on the CPU (see _pencil_min).
_PENCIL_LAPACK_BATCH = 8


def _pencil_min(chol: torch.Tensor, d: torch.Tensor) -> float:
    """Smallest eigenvalue over ``c`` of ``L_c^-1 D_c L_c^-T`` (``chol``, ``d``: ``(k, n, n)``, ``D_c`` symmetric).

    On the CPU, LAPACK's reduction of the symmetric-definite pencil (``dsygst``: ``n^3`` flops, where two
    triangular solves take ``2 n^3``) and its selected-eigenvalue driver (``dsyevx``, the smallest eigenvalue
    only) for each of up to ``_PENCIL_LAPACK_BATCH`` matrices: 0.75 ms instead of 1.1 ms at ``n = 150`` and 2.1
    instead of 3.1 ms at ``n = 250`` on 2 cores, four times per iteration. Larger batches (many small cliques) and
    other devices run torch's batched solves and eigenvalues.
    """
    if chol.device.type == "cpu" and chol.shape[0] <= _PENCIL_LAPACK_BATCH:
        lam = math.inf
        for lc, dc in zip(chol.numpy(), d.numpy(), strict=True):
            red, info = scipy.linalg.lapack.dsygst(dc, lc, itype=1, lower=1)
            if info != 0:
                raise ArithmeticError(f"LAPACK dsygst failed (info {info}) in a step length")
            lam = min(lam, float(scipy.linalg.eigh(red, lower=True, eigvals_only=True, subset_by_index=[0, 0],
                                                   driver="evx", check_finite=False)[0]))
        return lam
    t = torch.linalg.solve_triangular(chol, d, upper=False)
    t = torch.linalg.solve_triangular(chol, t.transpose(1, 2), upper=False)
    return float(torch.linalg.eigvalsh((t + t.transpose(1, 2)) * 0.5).min())


def lp_step(v: torch.Tensor, dv: torch.Tensor) -> float:
    """The largest ``a`` with ``v + a dv >= 0`` for ``v > 0`` (``inf`` when no entry decreases): the step to the
    boundary of the nonnegative orthant (the sign constraints' cone of every interior-point method here)."""
    neg = dv < 0
    return math.inf if not bool(neg.any()) else float(torch.min(-v[neg] / dv[neg]))


def symmetrised(a: torch.Tensor) -> torch.Tensor:
    """``(A + A^T) / 2`` of a square matrix with one temporary (the dense layout's N x N matrices are GBs each)."""
    out = a + a.T
    out *= 0.5
    return out


@dataclass
class DualFactor:
    """Block Cholesky factor of the slack ``Z`` (plus padding): diagonal factors ``ld`` (lower) and ``lw[s] =
    L_ss^-1 Z_{s,s+1}`` (so ``L_{s+1,s} = lw[s]^T``); ``inverse`` is ``Z^-1`` on the padded grid once formed."""

    ld: torch.Tensor | None  # None once a large dense cone has formed Z^-1 (see SemidefiniteCone.inverse)
    lw: torch.Tensor
    inverse: torch.Tensor | None = None


@dataclass
class PrimalFactor:
    """Cholesky factors of the clique blocks of ``X`` (plus padding) and, once formed, its max-det completion."""

    cliques: torch.Tensor
    completion: torch.Tensor | None = None
    #: ``L_c^-1`` of every clique, formed once (the predictor and the corrector both take a primal step) when the
    #: step estimate would otherwise run many narrow triangular solves on CUDA.
    inverse_cliques: torch.Tensor | None = None


class SemidefiniteCone:
    """The cone ``{Z >= 0}`` of one LMI and its dual, on the layout of ``lowrank`` (see the module docstring).

    Matrices on the pattern are banded tensors of shape ``(2 nb - 1, b, b)`` (diagonal blocks, then the blocks
    above them); padded positions hold zeros, and the factorisations add the identity there.
    """

    def __init__(self, lowrank: LowRankLMI, lanczos_steps: int, rng: np.random.Generator):
        self.lowrank = lowrank
        layout = lowrank.layout
        self.nb, self.b = layout.nb, layout.b
        self.n = lowrank.size
        self.n_pad = layout.padded_size
        self.dev = lowrank.device
        self.lanczos_steps = lanczos_steps
        self.rng = rng
        nb = self.nb
        self.weights = torch.cat([torch.ones(nb, dtype=torch.float64, device=self.dev),
                                  torch.full((nb - 1,), 2.0, dtype=torch.float64, device=self.dev)])
        real = torch.tensor(layout.real_mask(), device=self.dev).reshape(nb, self.b)
        self.real = real.reshape(-1)
        self.mask = None
        self.pad = None
        if layout.padded:
            # The padded positions form a decoupled identity block in Z and X; directions vanish there.
            rf = real.to(torch.float64)
            self.mask = torch.cat([rf[:, :, None] * rf[:, None, :],
                                   rf[:-1, :, None] * rf[1:, None, :]])
            self.pad = torch.zeros(2 * nb - 1, self.b, self.b, dtype=torch.float64, device=self.dev)
            self.pad[:nb] = torch.diag_embed(1.0 - rf)
        self.idx = torch.arange(nb, device=self.dev)

    # -- banded matrices ------------------------------------------------------------------------------
    def assemble(self, d: torch.Tensor) -> torch.Tensor:
        return self.lowrank.assemble(d)

    def adjoint(self, band: torch.Tensor) -> torch.Tensor:
        return self.lowrank.adjoint(band)

    def eye(self, value: float) -> torch.Tensor:
        out = torch.zeros(2 * self.nb - 1, self.b, self.b, dtype=torch.float64, device=self.dev)
        out[:self.nb] = torch.diag_embed(value * self.real.reshape(self.nb, self.b).to(torch.float64))
        return out

    def inner(self, a: torch.Tensor, c: torch.Tensor) -> float:
        """``<A, C>`` of two symmetric matrices given by their bands."""
        return float((a * c).sum((1, 2)) @ self.weights)

    def norm(self, a: torch.Tensor) -> float:
        return math.sqrt(max(self.inner(a, a), 0.0))

    def _full(self, band: torch.Tensor) -> torch.Tensor:
        return band if self.pad is None else band + self.pad

    def band_of(self, dense: torch.Tensor) -> torch.Tensor:
        """``Pi_E`` of a dense symmetric matrix on the padded grid, masked to the LMI's own rows."""
        nb, b = self.nb, self.b
        view = dense.view(nb, b, nb, b)
        out = torch.empty(2 * nb - 1, b, b, dtype=dense.dtype, device=self.dev)
        out[:nb] = view[self.idx, :, self.idx, :]
        if nb > 1:
            out[nb:] = view[self.idx[:-1], :, self.idx[1:], :]
        return out if self.mask is None else out * self.mask

    def to_dense(self, band: torch.Tensor) -> torch.Tensor:
        nb, b = self.nb, self.b
        out = torch.zeros(self.n_pad, self.n_pad, dtype=band.dtype, device=self.dev)
        view = out.view(nb, b, nb, b)
        view[self.idx, :, self.idx, :] = band[:nb]
        if nb > 1:
            view[self.idx[:-1], :, self.idx[1:], :] = band[nb:]
            view[self.idx[1:], :, self.idx[:-1], :] = band[nb:].transpose(1, 2)
        return out

    def matvec(self, band: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``B V`` for banded ``B`` and ``V`` with ``nb b`` rows (accumulated in place: memory-bound sizes)."""
        nb, b = self.nb, self.b
        vv = v.reshape(nb, b, -1)
        out = torch.bmm(band[:nb], vv)
        if nb > 1:
            out[:-1].baddbmm_(band[nb:], vv[1:])
            out[1:].baddbmm_(band[nb:].transpose(1, 2), vv[:-1])
        return out.reshape(v.shape)

    # -- factorisations --------------------------------------------------------------------------------
    def factor_dual(self, z: torch.Tensor) -> DualFactor | None:
        """Block Cholesky of ``Z`` (no fill on a block-tridiagonal pattern), or ``None`` if not positive definite."""
        nb, b = self.nb, self.b
        full = self._full(z)
        ld = torch.empty(nb, b, b, dtype=torch.float64, device=self.dev)
        lw = torch.empty(nb - 1, b, b, dtype=torch.float64, device=self.dev)
        lam = full[0]
        for s in range(nb):
            chol, info = torch.linalg.cholesky_ex(lam)
            if int(info) != 0:
                return None
            ld[s] = chol
            if s < nb - 1:
                w = torch.linalg.solve_triangular(chol, full[nb + s], upper=False)
                lw[s] = w
                lam = full[s + 1] - w.T @ w
        return DualFactor(ld, lw)

    def inverse(self, f: DualFactor) -> torch.Tensor:
        """Dense ``Z^-1`` by the block recursion ``Z^-1_{s,l} = -Phi_s Z^-1_{s+1,l}``, ``Phi_s = Lambda_s^-1 Z_{s,s+1}``
        (``Lambda_s`` the Schur complements of the block Cholesky factorisation): ``O(N^2 b)``."""
        if f.inverse is not None:
            return f.inverse
        nb, b, n = self.nb, self.b, self.n_pad
        lam_inv = torch.cholesky_inverse(f.ld)
        if nb == 1:
            f.inverse = symmetrised(lam_inv[0])
            del lam_inv
            if n > _EXACT_STEP_SIZE:
                # A large dense cone needs only Z^-1 from here on (its step estimate and HKM products use Z^-1; the
                # factor serves small cones' exact steps and the chordal solves): free the N x N factor.
                f.ld = None
            return f.inverse
        phi = torch.linalg.solve_triangular(f.ld[:-1].transpose(1, 2), f.lw, upper=True)
        sig = torch.empty(n, n, dtype=torch.float64, device=self.dev)
        last = slice((nb - 1) * b, n)
        sig[last, last] = lam_inv[-1]
        for s in range(nb - 2, -1, -1):
            r, rest = slice(s * b, (s + 1) * b), slice((s + 1) * b, n)
            blk = -(phi[s] @ sig[(s + 1) * b:(s + 2) * b, rest])
            sig[r, rest] = blk
            sig[rest, r] = blk.T
            d = lam_inv[s] - blk[:, :b] @ phi[s].T
            sig[r, r] = (d + d.T) * 0.5
        f.inverse = sig
        return sig

    def _dense_factor(self, f: DualFactor) -> torch.Tensor:
        """The block Cholesky factor as a dense lower-triangular matrix (for small cones)."""
        nb, b = self.nb, self.b
        out = torch.zeros(self.n_pad, self.n_pad, dtype=torch.float64, device=self.dev)
        view = out.view(nb, b, nb, b)
        view[self.idx, :, self.idx, :] = f.ld
        if nb > 1:
            view[self.idx[1:], :, self.idx[:-1], :] = f.lw.transpose(1, 2)
        return out

    def _cliques(self, band: torch.Tensor) -> torch.Tensor:
        """Clique blocks ``[[X_{s+1,s+1}, X_{s+1,s}], [X_{s,s+1}, X_ss]]`` (the later super-block first, so that
        their Cholesky factors hold the completion's regression ``Psi_s`` and conditional covariances)."""
        nb, b = self.nb, self.b
        if nb == 1:
            return band[:1]
        k = torch.empty(nb - 1, 2 * b, 2 * b, dtype=band.dtype, device=self.dev)
        k[:, :b, :b] = band[1:nb]
        k[:, :b, b:] = band[nb:].transpose(1, 2)
        k[:, b:, :b] = band[nb:]
        k[:, b:, b:] = band[:nb - 1]
        return k

    def factor_primal(self, x: torch.Tensor) -> PrimalFactor | None:
        """Cholesky factors of ``X``'s clique blocks, or ``None`` unless ``X`` has a positive definite completion."""
        chol, info = torch.linalg.cholesky_ex(self._cliques(self._full(x)))
        if bool((info != 0).any()):
            return None
        return PrimalFactor(chol)

    def _markov(self, f: PrimalFactor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Psi_s = X_{s,s+1} X_{s+1,s+1}^-1`` and Cholesky factors of ``Delta_s = X_ss - Psi_s X_{s+1,s}`` (``Delta``
        of the last super-block: ``X_ss``), from the clique factors ``[[L11, 0], [L21, L22]]``: ``Psi_s = L21 L11^-1``,
        ``chol(Delta_s) = L22``. The completion is ``X^ = T^-1 Delta T^-T`` with ``T = I - Psi`` (block upper
        bidiagonal): the blocks form a Gauss-Markov chain, each conditionally independent of the later ones
        given its successor."""
        b = self.b
        chol = f.cliques
        l11, l21 = chol[:, :b, :b], chol[:, b:, :b]
        psi = torch.linalg.solve_triangular(l11.transpose(1, 2), l21.transpose(1, 2), upper=True).transpose(1, 2)
        delta = torch.cat([chol[:, b:, b:], l11[-1:]])
        return psi, delta

    def completion(self, x: torch.Tensor, f: PrimalFactor) -> torch.Tensor:
        """Dense maximum-determinant completion ``X^`` of ``X`` on ``E``: ``X^_{s,l} = Psi_s X^_{s+1,l}`` for
        ``l >= s + 2`` (see :meth:`_markov`)."""
        if f.completion is not None:
            return f.completion
        nb, b, n = self.nb, self.b, self.n_pad
        full = self._full(x)
        if nb == 1:
            f.completion = full[0]
            return f.completion
        psi, _ = self._markov(f)
        out = torch.empty(n, n, dtype=torch.float64, device=self.dev)
        for s in range(nb - 1, -1, -1):
            r = slice(s * b, (s + 1) * b)
            out[r, r] = full[s]
            if s < nb - 1:
                nxt = slice((s + 1) * b, (s + 2) * b)
                out[r, nxt] = full[nb + s]
                out[nxt, r] = full[nb + s].T
            if s < nb - 2:
                rest = slice((s + 2) * b, n)
                blk = psi[s] @ out[(s + 1) * b:(s + 2) * b, rest]
                out[r, rest] = blk
                out[rest, r] = blk.T
        f.completion = out
        return out

    def half_dual(self, f: DualFactor, rhs: torch.Tensor) -> torch.Tensor:
        """``L^-1 R`` (``Z = L L^T``) for a dense ``R`` with ``nb b`` rows, by block forward substitution."""
        nb = self.nb
        r = rhs.reshape(nb, self.b, -1)
        w = torch.empty_like(r)
        for s in range(nb):
            rs = r[s] if s == 0 else r[s] - f.lw[s - 1].T @ w[s - 1]
            w[s] = torch.linalg.solve_triangular(f.ld[s], rs, upper=False)
        return w.reshape(rhs.shape)

    def half_primal(self, f: PrimalFactor, rhs: torch.Tensor) -> torch.Tensor:
        """``R^T D`` where ``X^ = R R^T``: ``L_X^T D`` (dense layout), ``chol(Delta)^T T^-T D`` (chordal, see
        :meth:`_markov`), for a dense ``D`` with ``nb b`` rows."""
        nb, b = self.nb, self.b
        if nb == 1:
            return f.cliques[0].T @ rhs
        psi, delta = self._markov(f)
        w = rhs.reshape(nb, b, -1).clone()
        for s in range(nb - 1):
            w[s + 1] += psi[s].T @ w[s]
        return torch.bmm(delta.transpose(1, 2), w).reshape(rhs.shape)

    def solve_dual(self, f: DualFactor, rhs: torch.Tensor) -> torch.Tensor:
        """``Z^-1 R`` for a dense ``R`` on the padded grid, by block forward and back substitution (``O(N^2 b)``)."""
        nb = self.nb
        w = self.half_dual(f, rhs).reshape(nb, self.b, -1)
        v = torch.empty_like(w)
        for s in range(nb - 1, -1, -1):
            ws = w[s] if s == nb - 1 else w[s] - f.lw[s] @ v[s + 1]
            v[s] = torch.linalg.solve_triangular(f.ld[s].T, ws, upper=True)
        return v.reshape(rhs.shape)

    # -- HKM products ----------------------------------------------------------------------------------
    def times_dense(self, band: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Dense ``B D`` for banded ``B``."""
        return self.matvec(band, dense.reshape(self.n_pad, self.n_pad)).reshape(self.n_pad, self.n_pad)

    def sym_product_band(self, a: torch.Tensor, c: torch.Tensor, transpose_a: bool = False) -> torch.Tensor:
        """``Pi_E(sym(A C))`` for dense ``A`` and ``C`` (``A^T C`` when ``transpose_a``): only the blocks on ``E``
        are formed."""
        nb, b, n = self.nb, self.b, self.n_pad
        if nb == 1:
            # One product and one symmetrised copy (the banded path below holds the product and two temporaries of
            # N x N at once: 9.4 GB more at the peak of 784-4096x4-10 on the dense layout).
            return symmetrised((a.T if transpose_a else a) @ c).unsqueeze(0)
        # Row blocks of A (column blocks of A^T) and column blocks of C as strided views that BLAS reads in place
        # (leading dimension n): a transposed copy of C cost 22 ms of a 35 ms product at N = 2112 on 2 cores.
        av = a.reshape(n, nb, b).permute(1, 2, 0) if transpose_a else a.reshape(nb, b, n)
        cc = c.reshape(n, nb, b).permute(1, 0, 2)
        diag = torch.bmm(av, cc)
        out = torch.empty(2 * nb - 1, b, b, dtype=a.dtype, device=self.dev)
        out[:nb] = (diag + diag.transpose(1, 2)) * 0.5
        if nb > 1:
            sup = torch.bmm(av[:-1], cc[1:])
            sub = torch.bmm(av[1:], cc[:-1])
            out[nb:] = (sup + sub.transpose(1, 2)) * 0.5
        return out

    def hkm(self, xhat: torch.Tensor, d: torch.Tensor, zinv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Pi_E(sym(X^ D Z^-1))`` for banded ``D``, and the dense ``D Z^-1`` (reused by :meth:`second_order`)."""
        q = self.times_dense(d, zinv)
        return self.sym_product_band(xhat, q), q

    def second_order(self, dx: torch.Tensor, dz: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                     xhat: torch.Tensor, xf: PrimalFactor, zf: DualFactor) -> torch.Tensor:
        """Mehrotra's term ``Pi_E(sym(dX dZ Z^-1))`` for the predictor ``dX = -X^ - sym(X^ Q)`` (``Q = dZ Z^-1``,
        ``p = Pi_E(sym(X^ Q))``).

        Dense layout: ``dX`` itself. Chordal: ``dX`` is dense (only its part on ``E`` is stored), and
        ``sym(dX Q) = -sym(X^ Q) - sym(X^ Q Q) / 2 - Q^T X^ Q / 2``; the last two are formed on ``E`` only, with
        sparse solves instead of dense products: ``Q Q = dZ (Z^-1 Q)`` and ``Q^T X^ Q = V^T V`` with
        ``V = chol(Delta)^T T^-T Q`` (:meth:`_markov`). ``O(N^2 b)``.
        """
        if self.nb == 1:
            return symmetrised(dx[0] @ q).unsqueeze(0)
        qq = self.times_dense(dz, self.solve_dual(zf, q))
        t2 = self.sym_product_band(xhat, qq)
        v = self.half_primal(xf, q)
        t3 = self.sym_product_band(v, v, transpose_a=True)
        out = -p - 0.5 * t2 - 0.5 * t3
        return out if self.mask is None else out * self.mask

    # -- step lengths ----------------------------------------------------------------------------------
    def max_step_primal(self, f: PrimalFactor, dx: torch.Tensor) -> float:
        """Largest ``alpha`` with ``X + alpha dX`` PSD-completable: the smallest over cliques (estimate on the safe
        side for large cliques; the caller verifies by factorising)."""
        chol = f.cliques
        dk = self._cliques(dx)
        if chol.shape[-1] <= _EXACT_STEP_SIZE:
            lam = _pencil_min(chol, dk)
        else:
            if self.dev.type == "cuda" and f.inverse_cliques is None:
                # One batched solve with the identity (about (2b)^3 flops per clique, at the GPU's rate) replaces the
                # 2 x 9 narrow solves of each of the two estimates of the iteration.
                eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=self.dev).expand_as(chol)
                f.inverse_cliques = torch.linalg.solve_triangular(chol, eye, upper=False)
            lam = self._clique_krylov_min(chol, dk, inverse=f.inverse_cliques)
        return math.inf if lam >= 0 else -1.0 / lam

    def max_step_dual(self, z: torch.Tensor, f: DualFactor, dz: torch.Tensor) -> float:
        """Largest ``alpha`` with ``Z + alpha dZ >= 0``: exact for small cones, else block Krylov on the pencil
        ``(dZ, Z)`` with ``Z^-1`` (the caller verifies by factorising)."""
        if self.n_pad <= _EXACT_STEP_SIZE:
            lam = _pencil_min(self._dense_factor(f).unsqueeze(0), self.to_dense(dz).unsqueeze(0))
        else:
            lam = self._block_krylov_min(self._full(z), dz, self.inverse(f))
        return math.inf if lam >= 0 else -1.0 / lam

    def _start_vectors(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Seeded Gaussian start vectors, drawn on the cone's device (a host draw and copy per estimate took 0.4 s of
        a 19 s solve on an H200: the copy from pageable memory waits for the queue)."""
        gen = torch.Generator(device=self.dev).manual_seed(int(self.rng.integers(2**31)))
        return torch.randn(shape, generator=gen, dtype=torch.float64, device=self.dev)

    def _block_krylov_min(self, z: torch.Tensor, dz: torch.Tensor, zinv: torch.Tensor, width: int = 8,
                          steps: int = 8) -> float:
        """Safeguarded estimate of the smallest eigenvalue of the pencil ``(dZ, Z)`` (banded, ``Z`` positive
        definite) from the block Krylov space of ``Z^-1 dZ`` (``steps + 1`` blocks of ``width`` vectors): each block
        step reads the dense ``Z^-1`` once, where single-vector Lanczos would read it once per vector.

        Rayleigh-Ritz on the pencil gives a Ritz value ``theta >= lambda_min``; subtracting the residual norm
        ``||Z^-1 r||_Z`` of its Ritz vector moves the estimate to the safe side (the caller verifies the step). With
        8 x 9 vectors the steps match 30-step Lanczos (4-20x30-1: 26 iterations; 8 x 5 vectors took 38).
        """
        v = self._start_vectors((self.n_pad, width))
        v = v * self.real[:, None]
        basis, _ = torch.linalg.qr(v)
        block = basis
        for _ in range(steps):
            w = zinv @ self.matvec(dz, block)
            for _ in range(2):
                w = w - basis @ (basis.T @ w)
            q, r = torch.linalg.qr(w)
            keep = r.diagonal().abs() > 1e-10 * max(float(r.diagonal().abs().max()), np.finfo(float).tiny)
            if not bool(keep.any()):
                break
            block = q[:, keep]
            basis = torch.cat([basis, block], dim=1)
        a = (basis.T @ self.matvec(dz, basis)).cpu()
        m = (basis.T @ self.matvec(z, basis)).cpu()
        # Z-orthonormalise the basis through the eigendecomposition of its Gram matrix, dropping directions that
        # rounding leaves numerically dependent (Z is nearly singular close to the optimum). Small problems, solved
        # by torch on the CPU: numpy's LAPACK would run them on all cores, which costs far more than it saves.
        mv, mvec = torch.linalg.eigh((m + m.T) * 0.5)
        keep = mv > 1e-12 * mv.max()
        p = mvec[:, keep] / mv[keep].sqrt()
        vals, vecs = torch.linalg.eigh(p.T @ ((a + a.T) * 0.5) @ p)
        u = basis @ (p @ vecs[:, 0]).to(self.dev)
        res = self.matvec(dz, u) - float(vals[0]) * self.matvec(z, u)
        return float(vals[0]) - math.sqrt(max(float(res @ (zinv @ res)), 0.0))

    def _clique_krylov_min(self, chol: torch.Tensor, dk: torch.Tensor, width: int = 8,
                           inverse: torch.Tensor | None = None) -> float:
        """Safeguarded estimate of the smallest eigenvalue over cliques ``c`` of ``T_c = L_c^-1 dX_c L_c^-T``
        (``X_c = L_c L_c^T``), from block Krylov spaces of all cliques at once (batched triangular solves and
        products, ``lanczos_steps`` vectors per clique in blocks of ``width``).

        Replaces single-vector Lanczos one clique at a time (868 small calls on 784-2048x4-10); measured: the same
        iteration counts and times on 2 CPU cores and on an H200 (where the GPU work of the direction dominates); the
        exact steps from dense eigenvalues are no longer on that net (its stall is not the estimate's doing). One
        batched call per block step instead. ``inverse`` (the ``L_c^-1``, optional) turns the two triangular solves
        of each block step into products: on an H200 a solve with 8 right-hand sides against an 8976-row factor
        took 3.3 ms (latency bound), the product far less. Rayleigh-Ritz gives Ritz values
        ``theta >= lambda_min``; subtracting the residual norm of the extreme Ritz pair moves the estimate to the safe
        side for the eigenvalue it approximates (the caller verifies the step by factorising).
        """
        c, n, _ = chol.shape
        blocks = max(1, -(-min(self.lanczos_steps, n) // width))
        v = self._start_vectors((c, n, width))
        lt = chol.transpose(1, 2)

        def apply(x: torch.Tensor) -> torch.Tensor:
            if inverse is not None:
                return torch.bmm(inverse, torch.bmm(dk, torch.bmm(inverse.transpose(1, 2), x)))
            w = torch.bmm(dk, torch.linalg.solve_triangular(lt, x, upper=True))
            return torch.linalg.solve_triangular(chol, w, upper=False)

        basis, _ = torch.linalg.qr(v)
        block = basis
        for _ in range(blocks - 1):
            w = apply(block)
            # Full reorthogonalisation (twice), and once more after the QR: a block that has (nearly) converged to
            # an invariant subspace leaves rounding noise whose QR directions need not be orthogonal to the basis.
            for _ in range(2):
                w = w - torch.bmm(basis, torch.bmm(basis.transpose(1, 2), w))
            block, _ = torch.linalg.qr(w)
            block = block - torch.bmm(basis, torch.bmm(basis.transpose(1, 2), block))
            block, _ = torch.linalg.qr(block)
            basis = torch.cat([basis, block], dim=2)
        t = torch.bmm(basis.transpose(1, 2), apply(basis))
        vals, vecs = torch.linalg.eigh((t + t.transpose(1, 2)) * 0.5)
        u = torch.bmm(basis, vecs[:, :, :1])
        res = apply(u) - vals[:, :1, None] * u
        return float((vals[:, 0] - torch.linalg.vector_norm(res, dim=(1, 2))).min())
