"""``solver="native"``: a structured primal-dual interior-point SDP solver in torch (float64, CPU or CUDA).

Algorithm
---------
A :class:`~lipbound.program.Program` is the *dual* standard-form SDP

    max  b^T y   s.t.  Z_t = C_t - A_t^T(y) >= 0 (every LMI t),   s = E y >= 0,

with ``b = -objective``, ``C_t = -M_t(0)``, ``A_t^T(y) = M_t(y) - M_t(0)`` and ``E`` selecting the
sign-constrained multipliers. Its primal is ``min sum_t <C_t, X_t>`` s.t. ``sum_t A_t(X_t) - E^T x = b``,
``X_t >= 0``, ``x >= 0``. We run an **infeasible-start primal-dual path-following method with the
HKM direction and Mehrotra's predictor-corrector** (as in SDPT3 and CSDP).

Each LMI's cone is handled by one of two strategies (:mod:`lipbound.solvers.cones`), the same code on two
layouts: **dense** (full ``X``, ``Z``) and **chordal** (a block-tridiagonal chain of cliques: ``Z`` factored
without fill, ``X`` kept on the pattern and completed to its maximum-determinant completion; per-iteration
kernels ``O(N^2 b)`` instead of ``O(N^3)``). ``strategy="auto"`` picks per LMI from a measured cost model
(:func:`choose_layout`; on CUDA dense, measured); the solver names ``native-dense`` and ``native-chordal`` force one.

Why this route:

* **No feasible start is needed.** The iterates ``(X, y, Z)`` start at scaled identities; residuals
  shrink geometrically and vanish after the first full step. No phase 1 and no formulation-specific
  warm start, so any Program (free multipliers, several LMIs, general objective) is handled.
* **HKM keeps the Schur matrix cheap and structured.** Its Schur matrix is
  ``H_ij = sum_t tr(F_ti X_t F_tj Z_t^-1) + [i = j nonneg] x_i / s_i`` (symmetric positive definite),
  which needs only ``X`` and ``Z^-1`` (NT would need the scaling matrix, which has no sparse form).
* **Low-rank factors, never dense ``F_i``** (:mod:`lipbound.solvers.lowrank`): ``H`` is gathered from
  ``G_X = U^T X U`` and ``G_Z = U^T Z^-1 U`` over the stacked factor columns ``U``.

Stopping rule (relative to the optimum's magnitude, not to 1)
-------------------------------------------------------------
With ``p = <C, X>`` and ``d = b^T y`` (so ``-d`` is the program's objective at ``y`` and ``-p`` a lower bound
when ``X`` is feasible), ``scale = |p| + |d|`` (about twice the optimum's magnitude) and the residuals
``r_p = b - A(X) + E^T x``, ``R_d = C - A^T(y) - Z``:

* ``gap = max(|p - d|, <X, Z>) / scale``;
* ``primal_infeasibility = ||r_p|| / ||b||`` (relative to the data: ``X`` only certifies the lower bound);
* ``dual_infeasibility = max(||R_d|| / ||C||, ||R_d|| ||X|| / scale)``: the second term is what the residual can
  move the objective by (``p - d = <X, Z> + <R_d, X> - y^T r_p``), relative to the optimum;
* ``rounding_floor = 16 u (||C|| + ||(y_i ||F_i||)_i||) ||X|| / scale``: even a slack re-assembled exactly as
  ``Z = C - A^T(y)`` (``R_d = 0`` from the first full dual step on) carries rounding errors of that size, so a
  program whose optimum lies below the rounding level of its own data (e.g. an unscaled 64-layer net: optimum
  1e-22 against entries of order 1) is never reported optimal, however feasible its slack looks in float64.

``status="optimal"`` means all four are at most ``tol``. Nothing is divided by ``1 + |objective|``, so a program
whose optimum is 1e-10 (deep nets have tiny Lipschitz constants) is solved to the same relative accuracy as
one whose optimum is 1: the solver is covariant under scalings of ``b`` and ``C`` (the starting point is
chosen on the normalised data, see :meth:`_Run.solve`), so an exactly rescaled program gives the same
iterates, rescaled. (``scale`` is floored at ``1e-30`` of the data's natural unit ``||b|| ||C|| / max ||F_i||``
only to avoid ``0/0`` when the optimum is exactly zero.)

Numerical safeguards, each for an observed failure mode:

* Step lengths to the cone boundary: exact (batched dense eigenvalue solves) for cliques/cones up to 256,
  else block Krylov estimates; always checked by the Cholesky factorisation of the new iterate (needed next anyway)
  with backtracking.
* After the first full dual step the dual residual is zero up to rounding; from then on ``Z = -M(y)``
  is re-assembled exactly, so every later ``y`` is strictly feasible in floating point.
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

import contextlib
import logging
import math
import time

import numpy as np
import torch

from lipbound.errors import SolverError
from lipbound.program import LMI, Program
from lipbound.solvers.base import SolveResult
from lipbound.solvers.cones import DualFactor, PrimalFactor, SemidefiniteCone, lp_step, symmetrised
from lipbound.solvers.lowrank import Layout, LowRankLMI, chordal_layout, dense_layout
from lipbound.solvers.threads import ThreadPolicy

log = logging.getLogger("lipbound")

_OPTIONS = ("step_fraction", "lanczos_steps", "threads", "strategy", "schur_precision")
# Rounding error of an assembled slack entry, in units of its terms' magnitude (16 unit roundoffs).
_ROUNDING_FLOOR = 16 * 2.0**-53
#: A stopped run whose best answer is within this factor of tol is "optimal_inaccurate".
_INACCURATE = 10.0
SCHUR_PRECISIONS = ("float64", "float32", "tf32")
STRATEGIES = ("auto", "dense", "chordal")

# Cost model of one iteration's cone work in seconds (the Schur matrix's assembly and factorisation are the same
# for both layouts and left out). Dense: ~15 N^3 flops (inverse, three HKM products of 4 N^3, Mehrotra's term).
# Chordal: ~40 N_pad^2 b flops (the same products formed on the pattern, the completion and inverse recursions,
# sparse solves for Mehrotra's term) at the same rate, plus ~0.5 ms per super-block for the sequential recursions'
# small operations. Fitted to per-iteration times of both layouts on ReLU chains of widths 16-400 with 3-32
# layers (2 shared CPU cores, one thread): with these constants the choice was at most 4 % slower than the faster
# layout on every measured chain (the chordal layout was never slower from four super-blocks on).
_FLOP_RATE = 2e10
_DENSE_FLOPS = 15.0
_CHORDAL_FLOPS = 40.0
_BLOCK_OVERHEAD_S = 5e-4


def layout_costs(lmi: LMI) -> tuple[float, float, Layout]:
    """Modelled seconds per iteration of the dense and the chordal layout of ``lmi``, and the chordal layout."""
    chordal = chordal_layout(lmi)
    n = float(lmi.size)
    dense = _DENSE_FLOPS * n ** 3 / _FLOP_RATE
    if chordal.nb < 3:
        return dense, math.inf, chordal
    cost = _CHORDAL_FLOPS * float(chordal.padded_size) ** 2 * chordal.b / _FLOP_RATE + _BLOCK_OVERHEAD_S * chordal.nb
    return dense, cost, chordal


def choose_layout(lmi: LMI, strategy: str = "auto", device: str | torch.device | None = None) -> Layout:
    """The layout of ``lmi`` for ``strategy``: ``"dense"``, ``"chordal"`` (when the pattern has at least three
    super-blocks, else dense), or ``"auto"``: on CPU the cheaper by :func:`layout_costs`, on CUDA dense.

    The cost model was fitted on CPU cores. On an H200 the dense layout's large products run near the GPU's rate
    while the chordal layout's recursions are many smaller sequential operations, and the dense layout was faster
    per iteration *and* converged where the chordal one stalled: 784-2048x4-10 (seed 2048) dense 0.49 s per
    iteration, optimal after 38 iterations (18.7 s, certified 4.2496), chordal 0.78 s per iteration, stalled at
    gap 1 (two runs of 26 s and 18 s, certified 4.8145); 784-4096x4-10 dense 2.2 s per iteration, within 10 tol
    after 37 (81.5 s), chordal stalled at gap 1.27 after 96.7 s. Both layouts keep dense ``N x N`` matrices (the
    chordal one its completion and ``Z^-1``), so the memory is alike (15.6 vs 17.7 GB at 784-2048x4-10).

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.eye(4)] * 6, "relu")
    >>> lmi = lipbound.formulations.lipsdp(net).solve_program.lmis[0]
    >>> choose_layout(lmi, "chordal").nb, choose_layout(lmi, "dense").nb
    (6, 1)
    """
    if strategy not in STRATEGIES:
        raise SolverError(f"unknown native strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    if strategy == "dense":
        return dense_layout(lmi)
    dense, chordal, layout = layout_costs(lmi)
    if layout.nb < 3:
        return dense_layout(lmi)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if strategy == "chordal" or (chordal < dense and not on_gpu):
        return layout
    return dense_layout(lmi)


class NativeSolver:
    """Structured primal-dual interior-point solver (HKM, Mehrotra predictor-corrector) in torch.

    ``strategy`` fixes the cone layout for every LMI (``None``: the ``strategy`` option, default ``"auto"``).

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

    def __init__(self, strategy: str | None = None):
        if strategy is not None and strategy not in STRATEGIES:
            raise SolverError(f"unknown native strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        self.strategy = strategy
        self.name = "native" if strategy in (None, "auto") else f"native-{strategy}"

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
            Target relative duality gap and relative infeasibilities (see the module docstring: relative to
            the optimum's magnitude, not to 1).
        max_iter : int
        **options
            ``strategy`` (``"auto"``, ``"dense"`` or ``"chordal"``; the layout of every LMI, default auto),
            ``step_fraction`` (fraction of the step to the cone boundary, default adaptive 0.9-0.99),
            ``lanczos_steps`` (Krylov vectors per clique of the primal step estimate for cliques above 256 rows,
            default 72), ``threads`` (CPU threads for every operation; by default one
            thread, and all cores only for dense operations of order at least
            :data:`~lipbound.solvers.threads.CROSSOVER`, see :mod:`lipbound.solvers.threads`),
            ``schur_precision`` (``"float64"``, default; ``"float32"`` or, on CUDA, ``"tf32"``: the Gram products and
            the Schur assembly, the largest memory and work of wide nets, in that precision. Directions are still
            refined against the float64 operators, and the first iteration whose directions lose their accuracy
            switches to float64 for the rest of the run; every answer is checked in float64 by the certificate).

        Returns
        -------
        SolveResult
            ``status`` is ``"optimal"`` when ``tol`` was met, ``"optimal_inaccurate"`` when the run stopped (numerical
            trouble, no progress, the iteration limit) within ``10 tol``, else ``"max_iter"`` or ``"stalled"``
            with the best iterate (the strictly dual-feasible one of lowest objective when there is one, since
            each of those is a valid answer, else the one of smallest residuals); ``info`` has ``gap``
            (relative), ``iterations``, ``device``, ``primal_infeasibility``, ``dual_infeasibility``,
            ``objective``, ``lower_objective``, ``strategy`` (per LMI), ``super_blocks`` and, on CUDA,
            ``peak_memory_mb``.
        """
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise SolverError(f"unknown option(s) for solver {self.name!r}: {', '.join(sorted(unknown))}; "
                              f"accepted: tol, max_iter, device, {', '.join(_OPTIONS)}.")
        if not tol > 0 or int(max_iter) < 0:
            raise SolverError(f"solver {self.name!r} needs tol > 0 and max_iter >= 0 (got tol={tol}, "
                              f"max_iter={max_iter}).")
        strategy = options.pop("strategy", None)
        if self.strategy not in (None, "auto"):
            if strategy not in (None, self.strategy):
                raise SolverError(f"solver {self.name!r} fixes strategy={self.strategy!r}; got strategy={strategy!r}.")
            strategy = self.strategy
        strategy = strategy or "auto"
        max_iter = int(max_iter)
        dev = torch.device("cpu" if device is None else device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SolverError(f"solver {self.name!r} was asked for device='cuda' but CUDA is not available here.")
        start = time.perf_counter()
        layouts = [choose_layout(lmi, strategy, dev) for lmi in program.lmis]
        log.info("solving %s with native (HKM interior point) on %s: %d variables, LMI sizes %s, super-blocks %s",
                 program.name, dev, program.n_vars, [lmi.size for lmi in program.lmis],
                 [f"{lay.nb}x{lay.b}" for lay in layouts])
        threads = options.pop("threads", None)
        policy = ThreadPolicy(forced=threads) if dev.type == "cpu" else ThreadPolicy(forced=torch.get_num_threads())
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with policy.scope(0), torch.no_grad():
            run = _Run(program, dev, tol, max_iter, verbose, options, layouts, policy)
            y, status, info = run.solve()
            if status == "stalled" and run.dropped_signs:
                # Without the sign constraints the LMIs imply, the Schur matrix lacks the LP cone's diagonal
                # term; on a badly scaled program (an optimum below the data's rounding level) the run can
                # stall far from the optimum (gap 1.5 where the run with them reached 1e-9). Run again with
                # them and keep the better answer.
                log.info("native: stopped ('%s', gap %.2e) without the implied sign constraints; solving again "
                         "with them", status, info["gap"])
                again = _Run(program, dev, tol, max_iter, verbose, options, layouts, policy, keep_signs=True)
                found = again.solve()
                if _merit(found[2]) < _merit(info):
                    run, (y, status, info) = again, found
        # Earlier strictly feasible iterates, most accurate first, without the one returned.
        trail = tuple(v for _, v in sorted(run.trail.items(), reverse=True) if not np.array_equal(v, y))
        info["device"] = str(dev)
        info["strategy"] = ",".join("dense" if lay.nb == 1 else "chordal" for lay in layouts)
        info["super_blocks"] = ",".join(f"{lay.nb}x{lay.b}" for lay in layouts)
        if policy.tuned:
            info["threads_middle_orders"] = policy.middle
            info["threads_measured_iterations_s"] = list(policy.tuned)
        if dev.type == "cuda":
            info["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        return SolveResult(y, status, self.name, time.perf_counter() - start, info, trail)


def _merit(info: dict) -> float:
    """How far a run's answer is from tol: its largest relative residual (gap, infeasibilities)."""
    return max(info.get(k, math.inf) for k in ("gap", "primal_infeasibility", "dual_infeasibility"))


#: Dual-feasible iterates whose relative gap is at most this are kept, the first of each decade of the gap
#: (``SolveResult.trail``): further from the boundary than the answer, for a certificate the answer cannot give.
_TRAIL_GAP = 1e-4


class _Run:
    """State of one interior-point run (kept separate so the solver object stays stateless)."""

    def __init__(self, program: Program, dev: torch.device, tol: float, max_iter: int, verbose: bool,
                 options: dict, layouts: list[Layout], policy: ThreadPolicy, keep_signs: bool = False):
        self.program = program
        self.dev = dev
        self.tol = float(tol)
        self.max_iter = max_iter
        self.verbose = verbose
        self.policy = policy
        self.step_fraction = options.get("step_fraction")
        precision = options.get("schur_precision", "float64")
        if precision not in SCHUR_PRECISIONS:
            raise SolverError(f"unknown schur_precision {precision!r}; choose one of {', '.join(SCHUR_PRECISIONS)}.")
        self.schur_precision = precision
        rng = np.random.default_rng(0)
        lanczos_steps = int(options.get("lanczos_steps", 72))
        self.cones = [SemidefiniteCone(LowRankLMI(lmi, program.n_vars, dev, layout), lanczos_steps, rng)
                      for lmi, layout in zip(program.lmis, layouts, strict=True)]
        # Sign constraints the LMIs imply (Program.implied_nonnegative: every multiplier of a ReLU net's LipSDP-Neuron
        # program, and rho) are left out of the LP cone on the CPU unless keep_signs: fewer complementarity pairs,
        # 2-5 fewer iterations on 784-n-n-10 (n = 50 ... 400), 784-500-200-50-10 and GLipSDP-shaped stacks
        # (glipsdp-32x32: optimal in 26 iterations, where the run with them stopped 'optimal_inaccurate' after 32).
        # Not on CUDA: 784-2048x4-10 on an H200 took 46 iterations without them (19.5 s, 'optimal_inaccurate')
        # against 39 with them (13.7 s).
        keep_signs = keep_signs or dev.type == "cuda"
        signs = program.nonneg if keep_signs else program.nonneg & ~program.implied_nonnegative()
        self.dropped_signs = int(np.count_nonzero(program.nonneg & ~signs))
        self.nn = torch.tensor(np.flatnonzero(signs), device=dev)
        self.b = -torch.tensor(np.asarray(program.objective, dtype=np.float64), device=dev)
        self.n = program.n_vars
        self.basis: torch.Tensor | None = None
        self.dual_feasible = False
        self.trail: dict[int, np.ndarray] = {}  # first dual-feasible iterate per decade of the gap

    # -- helpers --------------------------------------------------------------------------------------
    def _say(self, msg: str, *args) -> None:
        log.info(msg, *args)  # the library never prints: the caller shows INFO lines (the CLI does with -v)

    def _adjoint(self, mats: list[torch.Tensor], x_lp: torch.Tensor) -> torch.Tensor:
        """``sum_t A_t(Y_t) - E^T x``."""
        out = torch.zeros(self.n, dtype=torch.float64, device=self.dev)
        for cone, mat in zip(self.cones, mats, strict=True):
            out += cone.adjoint(mat)
        out[self.nn] -= x_lp
        return out

    def _assemble(self, cone: SemidefiniteCone, y: torch.Tensor) -> torch.Tensor:
        return cone.assemble(cone.lowrank.pair_coefficients(y, False))

    @staticmethod
    def _slack(cone: SemidefiniteCone, y: torch.Tensor) -> torch.Tensor:
        """``C - A^T(y) = -M(y)``, assembled from the pair coefficients ``coef y + const`` at once."""
        out = cone.assemble(cone.lowrank.pair_coefficients(y, True))
        out.neg_()
        return out

    @staticmethod
    def _inner_c(cone: SemidefiniteCone, x: torch.Tensor) -> float:
        """``<C, X> = -<M(0), X> = -2 const . (l_q^T X r_q)_q``."""
        lr = cone.lowrank
        if not lr.n_pairs:
            return 0.0
        return -2.0 * float(lr.const @ lr.pair_values(x))

    def _schur_factor(self, xhat: list[torch.Tensor], zinv: list[torch.Tensor], x_lp: torch.Tensor,
                      s_lp: torch.Tensor) -> tuple[torch.Tensor, object, torch.Tensor]:
        """The (projected) HKM Schur matrix, the Cholesky factor of its Jacobi-scaled form, and the scaling."""
        h = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.dev)
        for cone, xh, zi in zip(self.cones, xhat, zinv, strict=True):
            lr = cone.lowrank
            if lr.m:
                # Threads by the cone's order (policy): below the crossover, the count measured on this run's own
                # iterations (the chordal layout's batched products gain 1.8x from a second quiet core).
                with self.policy.scope(cone.n_pad), _tf32(self.schur_precision == "tf32"):
                    low = self.schur_precision != "float64"
                    ga = lr.gram(xh.float() if low else xh)
                    gz = lr.gram(zi.float() if low else zi)
                lr.schur(ga, gz, h)
                del ga, gz
        h = symmetrised(h)
        h[self.nn, self.nn] += x_lp / s_lp
        if self.basis is not None:
            h = symmetrised(self.basis.T @ h @ self.basis)
        diag = torch.diagonal(h).clone()
        scale = torch.where(diag > 0, diag.rsqrt(), torch.ones_like(diag))
        # In place where it can be (the Schur matrix of 784-4096x4-10 is 2.1 GB): the scaled copy, then its shifts.
        hs = h * scale[:, None]
        hs *= scale[None, :]
        shift = 0.0
        with self.policy.scope(h.shape[0]):
            for _ in range(8):
                if shift == 0.0:
                    chol, info = torch.linalg.cholesky_ex(hs)
                else:
                    shifted = hs.clone()
                    shifted.diagonal().add_(shift)
                    chol, info = torch.linalg.cholesky_ex(shifted)
                    del shifted
                if int(info) == 0:
                    return h, chol, scale
                shift = 1e-14 if shift == 0.0 else shift * 100.0
        raise ArithmeticError("Schur matrix is not positive definite")

    def _schur_eigen(self, h: torch.Tensor, scale: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                        torch.Tensor]:
        """Eigenvectors and inverted eigenvalues (0 below ``n eps`` of the largest) of the Jacobi-scaled Schur matrix:
        a least-squares solver for :meth:`_solve_schur`."""
        with self.policy.scope(h.shape[0]):
            vals, vecs = torch.linalg.eigh(h * scale[:, None] * scale[None, :])
        keep = vals > h.shape[0] * np.finfo(float).eps * float(vals.abs().max())
        return (vecs, torch.where(keep, 1.0 / torch.where(keep, vals, 1.0), 0.0)), scale

    def _solve_schur(self, h: torch.Tensor, chol, scale: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        def once(r):
            if isinstance(chol, tuple):
                vecs, inv = chol
                return vecs @ (inv * (vecs.T @ (r * scale))) * scale
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
        vals, vecs = torch.linalg.eigh(symmetrised(gram[free][:, free]))
        top = float(vals.max()) if vals.numel() else 0.0
        null = vals <= 64 * np.finfo(float).eps * free.numel() * max(top, np.finfo(float).tiny)
        n_null = int(null.sum())
        if n_null == 0:
            return None
        c_null = vecs[:, null].T @ (-self.b[free])
        if float(torch.linalg.vector_norm(c_null)) > 1e-9 * float(torch.linalg.vector_norm(self.b)):
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
        dev, cones, nn = self.dev, self.cones, self.nn
        n_nn = int(nn.numel())
        # C = -M(0) is not kept (an N x N matrix per LMI): <C, X> = -2 const . pair_values(X) and the slack
        # C - A^T(y) = -M(y) is one assembly of the pair coefficients with the constant (see _slack).
        c_mats = [-cone.assemble(cone.lowrank.const) for cone in cones]
        # Norms of the F_i (via tr(F_i F_i) from G = U^T U) set the starting point and detect redundancy.
        h_id = torch.zeros(self.n, self.n, dtype=torch.float64, device=dev)
        for cone in cones:
            lr = cone.lowrank
            if lr.m:
                eye = torch.diag(cone.real.to(torch.float64))
                g = lr.gram(eye)
                del eye
                lr.schur(g, g, h_id)
                # The Gram matrix of the factor columns is m x m (8.4 GiB at 784-4096x4-10): kept alive for the
                # whole run by this frame, it was a fifth of that net's peak memory.
                del g
        self.basis = self._range_basis(symmetrised(h_id))
        norm_a = torch.diagonal(h_id).clamp_min(0).sqrt()
        del h_id
        norm_a[nn] = torch.sqrt(norm_a[nn] ** 2 + 1.0)
        norm_b = float(torch.linalg.vector_norm(self.b))
        norm_c = math.sqrt(sum(cone.norm(cm) ** 2 for cone, cm in zip(cones, c_mats, strict=True)))
        del c_mats
        # The starting point is SDPT3's, computed on the data normalised to ||b|| = ||C|| = 1 and scaled back: the
        # iterates are then covariant under scalings of b and C (an exactly rescaled program is solved alike).
        sb = norm_b if norm_b > 0 else 1.0
        sc = norm_c if norm_c > 0 else 1.0
        b_hat = self.b.abs() / sb
        bmax = float(torch.max((1.0 + b_hat) / (1.0 + norm_a))) if self.n else 1.0
        amax = float(norm_a.max()) if self.n else 1.0
        xs, zs = [], []
        for cone in cones:
            nsz = cone.n
            xi = max(10.0, math.sqrt(nsz), nsz * bmax)
            eta = max(10.0, math.sqrt(nsz), amax, norm_c / sc)
            xs.append(cone.eye(xi * sb))
            zs.append(cone.eye(eta * sc))
        xi_lp = max(10.0, math.sqrt(max(n_nn, 1)), max(n_nn, 1) * bmax)
        eta_lp = max(10.0, math.sqrt(max(n_nn, 1)), amax)
        x_lp = torch.full((n_nn,), xi_lp * sb, dtype=torch.float64, device=dev)
        s_lp = torch.full((n_nn,), eta_lp * sc, dtype=torch.float64, device=dev)
        y = torch.zeros(self.n, dtype=torch.float64, device=dev)
        n_cone = sum(cone.n for cone in cones) + n_nn
        self.norm_b = sb
        # The objective's natural unit (b^T y with y ~ C / F): floors the optimum's magnitude against 0/0 only.
        # (A separate name from the rounding floor below: the first version reused one variable, so from the second
        # iteration on the gap was relative to max(|p| + |d|, previous rounding floor), absolute for optima below
        # about 1e-7; an unscaled 30-layer net looked converged at objective 1e-18 against 1.6e-20.)
        unit_floor = 1e-30 * sb * sc / max(amax, np.finfo(float).tiny)

        best = (math.inf, y.clone(), {})
        best_feasible = (math.inf, None, {})
        status = "max_iter"
        alpha_p = alpha_d = 1.0
        xfs = [cone.factor_primal(x) for cone, x in zip(cones, xs, strict=True)]
        zfs = [cone.factor_dual(z) for cone, z in zip(cones, zs, strict=True)]
        it = 0
        history: list[tuple[float, float]] = []  # best merit and best mu after each iteration
        floored = 0  # consecutive iterations within tol except for the rounding floor
        info: dict = {}
        order = max(cone.n_pad for cone in cones)
        for it in range(self.max_iter + 1):
            # The whole iteration runs on the policy's threads for the largest cone (orders below the crossover:
            # the count measured on the first iterations, see ThreadPolicy.observe).
            tick = time.perf_counter()
            with self.policy.scope(order):
                # Residuals and objectives. Once dual feasible, Z = -M(y) and s = y[nonneg] by construction.
                if self.dual_feasible:
                    rd, rd_lp = None, torch.zeros_like(s_lp)
                else:
                    rd = [self._slack(cone, y) - zm for cone, zm in zip(cones, zs, strict=True)]
                    rd_lp = y[nn] - s_lp
                rp = self.b - self._adjoint(xs, x_lp)
                pobj = sum(self._inner_c(cone, xm) for cone, xm in zip(cones, xs, strict=True))
                dobj = float(self.b @ y)
                xz = sum(cone.inner(xm, zm) for cone, xm, zm in zip(cones, xs, zs, strict=True)) + float(x_lp @ s_lp)
                mu = xz / max(n_cone, 1)
                scale = max(abs(pobj) + abs(dobj), unit_floor)
                gap = max(abs(pobj - dobj), xz) / scale
                pinf = float(torch.linalg.vector_norm(rp)) / sb
                x_norm = math.sqrt(sum(cone.norm(xm) ** 2 for cone, xm in zip(cones, xs, strict=True))
                                   + float(x_lp @ x_lp))
                # Even a slack re-assembled exactly as Z = C - A^T(y) carries rounding errors of about
                # u * (|C| + sum_i |y_i| |F_i|) per entry: a dual residual never below that floor (which is far below
                # tol for a well-scaled program, but not when the optimum is below the data's rounding level).
                magnitude = norm_c + float(torch.linalg.vector_norm(y * norm_a))
                floor = _ROUNDING_FLOOR * magnitude * x_norm / scale
                dinf = 0.0
                if rd is not None:
                    rd_norm = math.sqrt(sum(cone.norm(r) ** 2 for cone, r in zip(cones, rd, strict=True))
                                        + float(rd_lp @ rd_lp))
                    dinf = max(rd_norm / sc, rd_norm * x_norm / scale)
                merit = max(gap, pinf, dinf, floor)
                info = {"gap": gap, "iterations": it, "primal_infeasibility": pinf, "dual_infeasibility": dinf,
                        "rounding_floor": floor, "objective": -dobj, "lower_objective": -pobj, "mu": mu}
                if merit < best[0]:
                    best = (merit, y.clone(), dict(info))
                if self.dual_feasible and -dobj < best_feasible[0]:
                    # Every dual-feasible iterate is a valid answer; the lowest objective is the best one.
                    best_feasible = (-dobj, y.clone(), dict(info))
                if self.dual_feasible and gap <= _TRAIL_GAP:
                    decade = math.floor(-math.log10(max(gap, 1e-300)))
                    if decade not in self.trail:
                        self.trail[decade] = y.cpu().numpy()
                self._say("native it %3d  obj %+.10e  lower %+.10e  gap %.2e  pinf %.2e  dinf %.2e  floor %.1e  "
                          "mu %.2e  step %.3f %.3f", it, -dobj, -pobj, gap, pinf, dinf, floor, mu, alpha_p, alpha_d)
                if merit <= self.tol:
                    status = "optimal"
                    break
                if it == self.max_iter:
                    break
                # Slow but steady progress is fine (e.g. multipliers drifting to an optimum at infinity, mu falling
                # while the relative gap waits for the iterates to reach a tiny optimum's scale, or short steps through
                # a deep chain's long infeasible phase); ten iterations that improve neither the best merit nor the
                # best mu by 10 % in all are not. Within _INACCURATE tol (the answer is already "optimal_inaccurate"),
                # three iterations that halve neither are the last digits' stagnation (4-20x100-1 spent 16 of its 49
                # iterations, a third of its time, moving the merit from 7.7e-9 to 4.2e-9 against tol 1e-9).
                # Converged but for the rounding floor: further iterations cannot lower it (it is the data's
                # rounding level against the optimum's magnitude, fixed by the program's scaling), so three such
                # iterations end the run. glipsdp-32x32 with norm-product scaling reached gap 1e-9 at iteration 44
                # and ran 34 more.
                floored = floored + 1 if max(gap, pinf, dinf) <= self.tol < floor else 0
                if floored >= 3:
                    log.info("native: converged to tol except for the rounding floor %.1e (the optimum lies below the "
                             "rounding level of the program's data): stopping", floor)
                    status = "stalled"
                    break
                best_merit, best_mu = history[-1] if history else (math.inf, math.inf)
                history.append((min(best_merit, merit), min(best_mu, mu)))
                window, factor = (3, 0.5) if history[-1][0] <= _INACCURATE * self.tol else (10, 0.9)
                if len(history) > window:
                    then, now = history[-window - 1], history[-1]
                    if now[0] > factor * then[0] and now[1] > factor * then[1]:
                        status = "stalled"
                        break
                try:
                    step = self._iterate(y, xs, zs, x_lp, s_lp, xfs, zfs, rd, rd_lp, rp, mu, n_cone)
                except ArithmeticError as exc:
                    log.info("native: stopping at iteration %d: %s", it, exc)
                    status = "stalled"
                    break
                y, xs, zs, x_lp, s_lp, xfs, zfs, alpha_p, alpha_d = step
                if max(alpha_p, alpha_d) < 1e-10:
                    status = "stalled"
                    break
            self.policy.observe(time.perf_counter() - tick)

        if status == "optimal":
            return y.cpu().numpy(), status, info
        # Without convergence (e.g. the primal residual stagnating while the dual iterates still improve), return
        # the dual-feasible iterate with the lowest objective if there is one, else the one of smallest merit.
        _, y_best, info_best = best if best_feasible[1] is None else best_feasible
        merit = max(info_best[k] for k in ("gap", "primal_infeasibility", "dual_infeasibility", "rounding_floor"))
        if merit <= _INACCURATE * self.tol:
            # Numerical trouble at the last digits (a Schur matrix that stops being positive definite, steps that
            # stop gaining) with the answer within a small factor of tol: cvxpy's name for it.
            status = "optimal_inaccurate"
        return y_best.cpu().numpy(), status, info_best

    def _iterate(self, y: torch.Tensor, xs: list[torch.Tensor], zs: list[torch.Tensor], x_lp: torch.Tensor,
                 s_lp: torch.Tensor, xfs: list[PrimalFactor], zfs: list[DualFactor],
                 rd: list[torch.Tensor] | None, rd_lp: torch.Tensor, rp: torch.Tensor, mu: float, n_cone: int):
        """One Mehrotra predictor-corrector step; returns the new iterates, their factors and the step lengths."""
        cones = self.cones
        if any(f is None for f in zfs):
            raise ArithmeticError("dual slack lost positive definiteness")
        if any(f is None for f in xfs):
            raise ArithmeticError("primal iterate lost positive definiteness")
        zinv, xhat = [], []
        for cone, x, xf, zf in zip(cones, xs, xfs, zfs, strict=True):
            with self.policy.scope(cone.n_pad):
                zinv.append(cone.inverse(zf))
                xhat.append(cone.completion(x, xf))
        state = (xs, zs, x_lp, s_lp, xfs, zfs, rd, rd_lp, rp, mu, n_cone, zinv, xhat)
        schur = self._schur_factor(xhat, zinv, x_lp, s_lp)
        found = self._directions(schur, *state)
        if found is None and self.schur_precision != "float64":
            log.info("native: reduced-precision Schur directions lost their accuracy; float64 from now on")
            self.schur_precision = "float64"
            schur = self._schur_factor(xhat, zinv, x_lp, s_lp)
            found = self._directions(schur, *state)
        if found is None:
            # Every direction lost its accuracy: near the optimum of a dual-degenerate program (the optimal
            # multipliers are not unique) the Schur matrix is singular to working precision. Solve it in the
            # least-squares sense on its numerically nonzero spectrum instead (an O(n^3) eigendecomposition,
            # only at such iterations).
            found = self._directions(schur[:1] + self._schur_eigen(schur[0], schur[2]), *state)
        if found is None:
            raise ArithmeticError("the search directions lost their accuracy (ill-conditioned Schur matrix)")
        dy, dx, dz, dx_lp, ds, ap, ad = found
        # Only the directions and step estimates above use the Schur factor, Z^-1, the completion and the inverse
        # clique factors: free them before the new iterates are formed (each N x N, 2.2 GiB at 784-4096x4-10).
        del schur, state, found, zinv, xhat
        for f in xfs:
            f.inverse_cliques = f.completion = None
        for f in zfs:
            f.inverse = None
        # The step estimates are checked by factorizing the new iterates (needed next time anyway).
        new_x, new_xfs, ap = self._advance(lambda a: [m + a * d for m, d in zip(xs, dx, strict=True)],
                                           [cone.factor_primal for cone in cones], ap)

        def slack(a):
            return [self._slack(cone, y + a * dy) for cone in cones]
        factor_dual = [cone.factor_dual for cone in cones]
        if self.dual_feasible:
            new_z, new_zfs, ad = self._advance(slack, factor_dual, ad)
            new_s = (y + ad * dy)[self.nn]
        else:
            new_z, new_zfs, ad = self._advance(lambda a: [m + a * d for m, d in zip(zs, dz, strict=True)],
                                               factor_dual, ad)
            new_s = s_lp + ad * ds
            if ad == 1.0:
                # After a full dual step the residual is zero up to rounding: from now on keep Z = -M(y)
                # exactly, so every later iterate (and the returned y) is strictly feasible in floating point.
                exact = slack(1.0)
                exact_f = [f(m) for f, m in zip(factor_dual, exact, strict=True)]
                if all(f is not None for f in exact_f):
                    new_z, new_zfs, new_s, self.dual_feasible = exact, exact_f, (y + dy)[self.nn], True
        return (y + ad * dy, new_x, new_z, x_lp + ap * dx_lp, new_s, new_xfs, new_zfs, ap, ad)

    def _directions(self, schur, xs, zs, x_lp, s_lp, xfs, zfs, rd, rd_lp, rp, mu, n_cone, zinv, xhat):
        """Predictor and corrector with one Schur factorisation: ``(dy, dX, dZ, dx, ds, alpha_p, alpha_d)`` with the
        step lengths already shortened, or ``None`` when no direction is accurate."""
        cones = self.cones
        h, h_chol, h_scale = schur

        def hkm(t: int, d: torch.Tensor):
            cone = cones[t]
            with self.policy.scope(cone.n_pad):
                return cone.hkm(xhat[t], d, zinv[t])

        # X R_d Z^-1 is shared by the predictor and the corrector right-hand sides (zero once dual feasible).
        if rd is None:
            adj_t = torch.zeros(self.n, dtype=torch.float64, device=self.dev)
        else:
            adj_t = self._adjoint([hkm(t, r)[0] for t, r in enumerate(rd)], x_lp * rd_lp / s_lp)
        rp_norm = float(torch.linalg.vector_norm(rp))

        # Memory (the dense layout of 784-4096x4-10 holds 2.4 GB per N x N matrix): the dual residual is not stored
        # once it is zero, the corrector drops D Z^-1 as soon as dX is formed, and the predictor's matrices are
        # dropped once the corrector's right-hand side is built (recomputed in the rare fallback to the predictor).
        def direction(rc_mats, rc_lp, refine, keep_products=False):
            rhs = rp - self._adjoint(rc_mats, rc_lp) + adj_t
            dy = self._solve_schur(h, h_chol, h_scale, rhs)
            if rd is None:
                dz = [-self._assemble(cone, dy) for cone in cones]
            else:
                dz = [r - self._assemble(cone, dy) for cone, r in zip(cones, rd, strict=True)]
            ds = rd_lp + dy[self.nn]
            prods = [hkm(t, d) for t, d in enumerate(dz)]
            # dX = R_c - P in place of R_c (the callers build the R_c for this call only).
            dx = [rc.sub_(p) for rc, (p, _) in zip(rc_mats, prods, strict=True)]
            if not keep_products:
                prods = None
            dx_lp = rc_lp - x_lp * ds / s_lp
            for it in range(refine + 1):
                # Near the optimum the Schur matrix is ill-conditioned and A(dX) drifts from R_p, which
                # would make primal infeasibility grow. Refine against the operator dX is built with.
                err = rp - self._adjoint(dx, dx_lp)
                size = float(torch.linalg.vector_norm(err))
                if size <= 1e-3 * rp_norm + 1e-3 * self.tol * self.norm_b or it == refine:
                    break
                dd = self._solve_schur(h, h_chol, h_scale, err)
                dy = dy + dd
                moves = [self._assemble(cone, dd) for cone in cones]
                for d, mv in zip(dz, moves, strict=True):
                    d.sub_(mv)  # dZ and dX are this call's own tensors: updated in place
                ds = ds + dd[self.nn]
                for t, (d, mv) in enumerate(zip(dx, moves, strict=True)):
                    d.add_(hkm(t, mv)[0])
                del moves
                dx_lp = dx_lp - x_lp * dd[self.nn] / s_lp
            # A step of length a changes R_p to (1 - a) R_p + a err: an error far above R_p (and above the
            # tolerance's scale) would throw the iterate off primal feasibility; such a direction is rejected.
            accurate = size <= max(0.9 * rp_norm, 100.0 * self.tol * self.norm_b)
            return dy, dx, dz, dx_lp, ds, prods, accurate

        def steps(dx, dz, dx_lp, ds):
            ap = min([cone.max_step_primal(f, d) for cone, f, d in zip(cones, xfs, dx, strict=True)]
                     + [lp_step(x_lp, dx_lp)])
            ad = min([cone.max_step_dual(z, f, d) for cone, z, f, d in zip(cones, zs, zfs, dz, strict=True)]
                     + [lp_step(s_lp, ds)])
            return ap, ad

        # Predictor (affine scaling): target X Z = 0.
        pred = direction([-xm for xm in xs], -x_lp, 0, keep_products=True)
        dy, dx, dz, dx_lp, ds, prods, pred_accurate = pred
        del pred
        ap, ad = steps(dx, dz, dx_lp, ds)
        ap, ad = min(1.0, ap), min(1.0, ad)
        mu_aff = (sum(cone.inner(xm + ap * d1, zm + ad * d2)
                      for cone, xm, d1, zm, d2 in zip(cones, xs, dx, zs, dz, strict=True))
                  + float((x_lp + ap * dx_lp) @ (s_lp + ad * ds))) / max(n_cone, 1)
        # Mehrotra's sigma = (mu_aff / mu)^e with SDPT3's adaptive exponent: short predictor steps (a poorly
        # centred iterate, typical of degenerate programs near the optimum) centre more (e -> 1).
        expon = max(1.0, min(3.0, 3.0 * min(ap, ad) ** 2))
        sigma = min(1.0, max(0.0, mu_aff / mu) ** expon) if mu > 0 else 0.0
        gamma = self.step_fraction if self.step_fraction is not None else 0.9 + 0.09 * min(ap, ad)
        pred_steps = (ap, ad)
        # Corrector: centring plus Mehrotra's second-order term sym(dXp dZp Z^-1). Near the optimum of a degenerate
        # program the Schur matrix can be numerically singular and the corrector's right-hand side excite its
        # null space (steps of 1e-13 were observed); then fall back to centring alone, and last to the predictor.
        second = [cone.second_order(dx[t], dz[t], q, p, xhat[t], xfs[t], zfs[t])
                  for t, (cone, (p, q)) in enumerate(zip(cones, prods, strict=True))]
        second_lp = dx_lp * ds / s_lp
        del prods, dx, dz, dy
        corr = None
        for with_second in (True, False):
            rc_mats = []
            for cone, zi, xm, so in zip(cones, zinv, xs, second, strict=True):
                rc = cone.band_of(zi)  # a copy: updated in place (N x N temporaries of the dense layout)
                rc *= sigma * mu
                rc -= xm
                if with_second:
                    rc -= so
                rc_mats.append(rc)
            rc_lp = sigma * mu / s_lp - x_lp - (second_lp if with_second else 0.0)
            second = [None] * len(cones)  # used by the first pass only
            corr = None
            corr = direction(rc_mats, rc_lp, 2)
            ap, ad = steps(*corr[1:5])
            if corr[-1] and min(ap, ad) >= 0.5 * min(pred_steps):
                break
        else:
            if not pred_accurate:
                return None
            del corr
            corr, (ap, ad) = direction([-xm for xm in xs], -x_lp, 0), pred_steps
        dy, dx, dz, dx_lp, ds = corr[:5]
        return dy, dx, dz, dx_lp, ds, min(1.0, gamma * ap), min(1.0, gamma * ad)

    @staticmethod
    def _advance(make, factor, alpha: float):
        """``make(alpha)`` with ``alpha`` shrunk until every matrix factorises; returns the matrices, their factors
        and ``alpha``."""
        for _ in range(60):
            new = make(alpha)
            factors = []
            for f, m in zip(factor, new, strict=True):
                fac = f(m)
                if fac is None:
                    break
                factors.append(fac)
            else:
                return new, factors, alpha
            alpha *= 0.8
        raise ArithmeticError("no step keeps the iterate positive definite")


@contextlib.contextmanager
def _tf32(enabled: bool):
    """Let CUDA float32 products use TF32 tensor cores inside the block (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or saved
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
