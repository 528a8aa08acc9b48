"""Rigorous a-posteriori certificates of LMI solutions.

**Why the check is sound.** Let ``v`` be the stacked (scaled) signal differences of two inputs, so
that every quadratic constraint satisfies ``v^T QC v >= 0`` for multipliers of the right sign.
Suppose ``M(y) <= delta I`` for the program's LMI ``M`` (``delta >= 0``) and ``||v||^2 <= B ||dx||^2``.
For LipSDP, ``v^T M v = v^T QC v - rho ||dx||^2 + ||W_l dx_l||^2``, hence

    ||f(x) - f(x')||^2 <= rho ||dx||^2 - v^T QC v + delta ||v||^2 <= (rho + delta B) ||dx||^2.

So ``L <= scale * sqrt(objective + sum_t delta_t B_t)``. We (1) clip sign-constrained multipliers,
(2) assemble ``M`` in float64 with an entrywise rounding radius, (3) prove ``delta I - M`` positive
definite with Rump's Cholesky test (:func:`~lipbound.rigorous.rump_positive_definite`), and (4)
evaluate the bound with exact rationals and upward rounding. ``B`` comes from rigorously bounded
spectral norms. Before checking, ``rho`` is re-optimised for the solver's multipliers by block
elimination (:func:`optimal_rho`), which removes most of a loose solver's infeasibility; both the
raw and the re-optimised point are checked and the smaller certified bound is kept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch

from lipbound.program import LMI, BlockTridiagonal, Program, is_block_tridiagonal, known_weights
from lipbound.rigorous import (
    dense_top_eigenvalue,
    eigenvalue_defect,
    negative_semidefinite_defect,
    round_up,
    sqrt_up,
)

#: LMIs of a chain with at least this many rows (and three or more blocks) are assembled and checked block by block
#: (:class:`~lipbound.program.BlockTridiagonal`): ``sum_k b_k^3`` work and ``sum_k b_k^2`` memory instead of ``N^3``
#: and ``N^2``. Below it the dense matrix is small and one LAPACK call beats a loop over blocks.
BANDED_MIN_ROWS = 1024


def banded(lmi: LMI) -> bool:
    """Whether the certificate checks ``lmi`` block by block (block tridiagonal, three or more blocks, at least
    :data:`BANDED_MIN_ROWS` rows)."""
    return len(lmi.block_sizes) >= 3 and lmi.size >= BANDED_MIN_ROWS and is_block_tridiagonal(lmi.pattern)


def assemble_for_check(lmi: LMI, y: np.ndarray, device: str | None = None):
    """``M(y)`` as the check holds it: a :class:`~lipbound.program.BlockTridiagonal` matrix (on ``device``) when
    :func:`banded`, else the dense numpy matrix."""
    if banded(lmi):
        return lmi.assemble_banded(y, device=device)
    return lmi.assemble(y)


@dataclass(frozen=True)
class CheckReport:
    """Outcome of the rigorous check of one multiplier vector.

    ``eigen_defects`` (floating-point estimates of each LMI's largest eigenvalue at the solver's point) are filled
    in by :func:`certify_multipliers`; the rigorous check itself does not need them and leaves them empty.
    ``repair_weights`` are the program's norm bounds ``B_t`` when known: deferred ones are computed only when some
    LMI needs a repair (``delta > 0``), so the tuple is empty for a check proved with ``delta = 0`` everywhere.
    """

    certified: bool
    bound: float | None
    objective: float
    deltas: tuple[float, ...]
    eigen_defects: tuple[float, ...]
    repair_weights: tuple[float, ...]
    reason: str = ""


def check_program(program: Program, y: np.ndarray, device: str | None = None,
                  delta_hints: tuple[float, ...] | None = None, rho_on_boundary: bool = False,
                  strict_rho: bool = False, assemble: Callable[[int, np.ndarray], np.ndarray] | None = None
                  ) -> CheckReport:
    """Rigorously bound the program's output from multipliers ``y`` (any source, any accuracy).

    Negative values of sign-constrained multipliers make the certificate invalid (callers clip first with
    :meth:`Program.clip`); non-finite values likewise. ``device="cuda"`` runs the eigenvalue estimate and Rump's
    test (its passes over the matrix and its factorisations) on the GPU. ``delta_hints`` (one per LMI, e.g. from a
    saved certificate) are tried first and proved again. ``rho_on_boundary``: ``rho`` was re-optimised to make its
    LMI singular, so ``delta = 0`` is not attempted there (it cannot be proved; the attempt costs a factorisation).
    ``strict_rho``: the LMI holding ``rho`` must be proved with ``delta = 0`` (no repair), else the check fails at
    once (used to try slightly enlarged ``rho``). ``assemble(t, y)``, when given, returns ``M_t(y)`` as
    :meth:`~lipbound.program.LMI.assemble` does (the enlarged-rho search passes one that re-uses the sum of the
    terms without ``rho``); the rounding bound is always that of the whole LMI at ``y``.

    The reported bound is ``2^scale_exponent * g(objective @ y + sum_t delta_t B_t)``, evaluated exactly in
    rationals and rounded up once, at every magnitude: it is ``+inf`` (and not certified) when it overflows, and
    never rounds to 0 unless it is exactly 0.
    """
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    empty = CheckReport(False, None, math.nan, (), (), known_weights(program.repair_weights))
    if y.shape != (program.n_vars,):
        return _replace(empty, reason=f"expected {program.n_vars} multipliers, got {y.size}")
    if not np.all(np.isfinite(y)):
        return _replace(empty, reason="multipliers contain NaN or inf")
    if np.any(y[program.nonneg] < 0):
        i = int(np.flatnonzero(program.nonneg & (y < 0))[0])
        return _replace(empty, reason=f"multiplier {i} must be >= 0 but is {y[i]!r}")
    objective = sum((Fraction(float(c)) * Fraction(float(v)) for c, v in zip(program.objective, y, strict=True)
                     if c != 0), Fraction(0))
    total = objective

    def failed(reason: str, deltas) -> CheckReport:
        return CheckReport(False, None, float(objective), tuple(deltas), (), known_weights(program.repair_weights),
                           reason=reason)

    deltas: list[float] = []
    for t, lmi in enumerate(program.lmis):
        m = assemble_for_check(lmi, y, device) if assemble is None else assemble(t, y)
        bound = lmi.rounding_bound(y)
        hint = None if not delta_hints or t >= len(delta_hints) else float(delta_hints[t])
        strict = strict_rho and t == program.rho_lmi
        try:
            delta = negative_semidefinite_defect(m, bound, device=device, first=hint, pattern=lmi.pattern,
                                                 try_zero=not (rho_on_boundary and t == program.rho_lmi),
                                                 zero_only=strict)
        except ArithmeticError as exc:
            return failed(str(exc), deltas)
        deltas.append(delta)
        if delta == 0:
            continue
        try:
            weight = program.repair_weights[t]
        except ArithmeticError as exc:
            return failed(f"no norm bound B for the repair of LMI {t}: {exc}", deltas)
        if not math.isfinite(weight):
            return failed("the LMI is not strictly feasible and no finite norm bound B exists for its signals "
                          "(a non-contractive implicit layer, or a norm bound beyond the float range)", deltas)
        total += Fraction(delta) * Fraction(weight)
    scale = Fraction(2) ** program.scale_exponent
    total = max(total, Fraction(0))
    bound = sqrt_up(total * scale * scale) if program.output_map == "sqrt" else round_up(total * scale)
    if not math.isfinite(bound):
        return failed("the certified bound overflows the float64 range (it is larger than 1.8e308)", deltas)
    return CheckReport(True, bound, float(objective), tuple(deltas), (), known_weights(program.repair_weights))


def _replace(report: CheckReport, **changes) -> CheckReport:
    data = asdict(report)
    data.update(changes)
    return CheckReport(**data)


def optimal_rho(program: Program, y: np.ndarray, device: str | None = None,
                assemble: Callable[[int, np.ndarray], object] | None = None) -> float | None:
    """Smallest ``rho >= 0`` making its LMI feasible for the other multipliers of ``y`` (floating point).

    ``rho`` enters only as ``-w rho I`` on block ``rho_block`` of LMI ``rho_lmi``, so with
    ``M(0, lambda) = [[X, Y^T], [Y, Z]]`` (``X`` that block) the LMI holds iff ``Z < 0`` and
    ``w rho >= lambda_max(X - Y^T Z^{-1} Y)``. Returns ``None`` when ``Z`` is not negative definite.
    ``device="cuda"`` runs the factorisation on the GPU (it is the costly step for large LMIs). ``assemble(t, y)``
    as in :func:`check_program` (it may return a torch tensor, already on the device).
    """
    if program.rho_index is None:
        return None
    lmi = program.lmis[program.rho_lmi]
    y0 = np.array(y, dtype=np.float64, copy=True)
    y0[program.rho_index] = 0.0
    m = assemble_for_check(lmi, y0, device) if assemble is None else assemble(program.rho_lmi, y0)
    off = lmi.offsets
    b = program.rho_block
    if isinstance(m, BlockTridiagonal):
        top = _banded_rho_complement(m, b)
        return None if top is None else max(top / program.rho_weight, 0.0)
    inside = np.zeros(lmi.size, dtype=bool)
    inside[off[b]:off[b + 1]] = True
    on_gpu = device is not None and str(device).startswith("cuda")
    if on_gpu or not isinstance(m, np.ndarray):
        mt = torch.as_tensor(m, device=device if on_gpu else m.device)
        ins = torch.as_tensor(inside, device=mt.device)
        x = mt[ins][:, ins].cpu().numpy()
        if inside.all():
            s = x
        else:
            c, info = torch.linalg.cholesky_ex(-mt[~ins][:, ~ins])
            if int(info) != 0:
                return None
            v = torch.linalg.solve_triangular(c, mt[~ins][:, ins], upper=False)
            s = x + (v.T @ v).cpu().numpy()
    elif inside.all():
        s = m[np.ix_(inside, inside)]
    else:
        x = m[np.ix_(inside, inside)]
        yb = m[np.ix_(~inside, inside)]
        z = m[np.ix_(~inside, ~inside)]
        try:
            c = scipy.linalg.cholesky(-z, lower=True, check_finite=False)
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
            return None
        v = scipy.linalg.solve_triangular(c, yb, lower=True, check_finite=False)
        s = x + v.T @ v
    top = dense_top_eigenvalue((s + s.T) / 2)
    if not math.isfinite(top):  # a nearly singular Z (the Schur complement overflowed): no estimate
        return None
    return max(top / program.rho_weight, 0.0)


def _banded_rho_complement(m: BlockTridiagonal, b: int) -> float | None:
    """``lambda_max(X - Y^T Z^-1 Y)`` for block ``b`` (``X``) of a block-tridiagonal ``m`` and the rest ``Z``
    (floating point; ``None`` unless ``Z`` is negative definite). ``Z`` splits into the chains before and after
    ``b``; each meets ``b`` through one block, so only the block of ``(-Z)^-1`` next to ``b`` is needed: the Schur
    complements ``T_k = P_kk - P_(j,k)^T T_j^-1 P_(j,k)`` of ``P = -Z``, eliminated from the far end towards ``b``
    (``j`` the block eliminated before ``k``)."""

    def coupling(j: int, k: int) -> torch.Tensor:
        """Block ``(j, k)`` of ``m`` for neighbours ``j`` and ``k``."""
        return m.lower[k] if j == k + 1 else m.lower[j].mT

    s = m.diag[b].clone()
    for chain in (range(len(m.diag) - 1, b, -1), range(0, b)):
        factor, prev = None, None
        for k in chain:
            t = -m.diag[k]
            if factor is not None:
                v = torch.linalg.solve_triangular(factor, coupling(prev, k), upper=False)
                t = t - v.mT @ v
            factor, info = torch.linalg.cholesky_ex(t)
            if int(info) != 0:
                return None
            prev = k
        if factor is not None:
            v = torch.linalg.solve_triangular(factor, coupling(prev, b), upper=False)
            s = s + v.mT @ v
    top = dense_top_eigenvalue(((s + s.mT) / 2).cpu().numpy())
    return top if math.isfinite(top) else None


#: Relative enlargements ``2^-k`` of the re-optimised ``rho`` tried before repairing with ``delta`` (then refined
#: between the last failure and the first success, to within a factor 2, while the enlargement exceeds
#: ``2^-_RHO_BUMP_FINE``: below that it moves the bound by less than 1e-8 relative, and each refinement costs a
#: factorisation of the whole LMI; a 784-256x4-10 check took 6 attempts and 11 factorisations to go from
#: ``2^-28`` to ``2^-29``). The first try, ``2^-30``, moves the bound by at most 4.7e-10 relative: searched down
#: from ``2^-44`` one exponent at a time, the smallest enlargement proved was ``2^-31`` to ``2^-33`` on
#: 784-n-n-10 (n = 50, 100, 200) and GLipSDP-shaped stacks (16x8, 32x4, 64x4), where the earlier first tries
#: ``2^-40`` and ``2^-34`` failed and cost two factorisations of the whole LMI each time. When ``2^-30`` fails, the
#: coarsest enlargement ``2^-5`` is tried next and the bisection starts from the pair: a point that no enlargement
#: proves (an interior-point answer too close to the boundary in directions decoupled from rho, as on glipsdp-16x64,
#: where the answer and two earlier iterates each failed every try) costs three factorisations instead of five.
#: ``2^-26`` (the fine limit, 1.5e-8 relative) comes between them: the circulant answers of deep CNNs, checked on the
#: network's program, need about that much (c8-d4: 2^-30 failed, then 2^-5, -17, -23 and -26 were proved, five
#: factorisations of a 6468-row LMI where two now suffice).
_RHO_BUMP_EXPONENTS = (30, 26, 5)
_RHO_BUMP_FINE = 26


class _RhoAssembly:
    """``assemble(t, y2)`` for multipliers ``y2`` that differ from ``y`` in ``rho`` only (the certificate's tries).

    The sum of the rho LMI's terms without ``rho`` is assembled once (0.35 s per assembly of an 8976-row LMI, and a
    check makes up to a dozen); on CUDA it stays on the GPU that runs Rump's test and each call adds the rho terms
    there (no numpy copy of the whole matrix, no transfer). Only the summation order of each entry changes, which
    the rounding bound covers (:meth:`~lipbound.program.LMI.assemble`).
    """

    def __init__(self, program: Program, y: np.ndarray, device: str | None):
        self.program, self.y = program, y
        lmi = program.lmis[program.rho_lmi]
        uses_rho = [sp.csc_matrix(t.coef)[:, [program.rho_index]].count_nonzero() > 0 for t in lmi.terms]
        self.with_rho = tuple(t for t, u in zip(lmi.terms, uses_rho, strict=True) if u)
        others = tuple(t for t, u in zip(lmi.terms, uses_rho, strict=True) if not u)
        self.device = device
        self.banded = banded(lmi)
        if self.banded:
            self.partial = lmi.assemble_banded(y, terms=others, device=device)
        else:
            self.partial = lmi.assemble(y, terms=others)
            if device is not None and str(device).startswith("cuda"):
                self.partial = torch.as_tensor(self.partial, device=device)

    def __call__(self, t: int, y2: np.ndarray):
        program = self.program
        if t != program.rho_lmi:
            return assemble_for_check(program.lmis[t], y2, self.device)
        rest = np.delete(np.arange(program.n_vars), program.rho_index)
        if not np.array_equal(y2[rest], self.y[rest]):
            raise ValueError("_RhoAssembly: the multipliers differ from the cached ones in more than rho.")
        into = self.partial.clone() if hasattr(self.partial, "clone") else self.partial.copy()
        if self.banded:
            return program.lmis[t].assemble_banded(y2, terms=self.with_rho, into=into)
        return program.lmis[t].assemble(y2, terms=self.with_rho, into=into)


def _enlarged_rho(program: Program, y: np.ndarray, rho: float, device: str | None,
                  assemble: _RhoAssembly | None = None):
    """The smallest tried ``rho (1 + 2^-k)`` for which the LMI is proved strictly feasible, with its report.

    ``rho`` on the boundary makes the LMI singular; slightly above it, the LMI is strictly feasible when the other
    multipliers are (an interior-point answer), and the bound needs no repair at all. How far above depends on how
    well the solver's point is centred: coarse steps first, then bisection of ``k``.
    """
    assemble = assemble or _RhoAssembly(program, y, device)

    def attempt(k: int):
        y2 = y.copy()
        y2[program.rho_index] = round_up(Fraction(rho) * (1 + Fraction(1, 2**k)))
        report = check_program(program, y2, device, strict_rho=True, assemble=assemble)
        return (report, y2) if report.certified else None

    failed = None
    for k in _RHO_BUMP_EXPONENTS:
        found = attempt(k)
        if found is None:
            failed = k
            continue
        while failed is not None and failed - k > 1 and k < _RHO_BUMP_FINE:
            mid = (failed + k) // 2
            better = attempt(mid)
            if better is None:
                failed = mid
            else:
                found, k = better, mid
        return found
    return None


def certify_multipliers(program: Program, y: np.ndarray, polish: bool = True, device: str | None = None,
                        solve_program: Program | None = None) -> tuple[CheckReport, np.ndarray, CheckReport]:
    """Clip, optionally re-optimise ``rho``, check.

    With ``polish``, ``rho`` is re-optimised for the other multipliers (:func:`optimal_rho`) and then enlarged by
    a tiny relative amount until the LMI is proved strictly feasible (no repair term at all: the bound is
    ``sqrt(rho)`` rounded up, to the solver's own precision at any scale of the program); if that fails, the
    re-optimised point is repaired with ``delta`` (see :func:`check_program`).

    Returns the best report, the multipliers it used, and a report on the solver's raw (clipped) point whose
    ``eigen_defects`` show how infeasible the solver's answer was. The raw point is checked rigorously only
    when the re-optimised one is unavailable or fails (re-optimising ``rho`` cannot loosen the bound by more
    than the repair it saves, and the full check of a large LMI is the expensive step). The reported eigenvalue
    defects are those of ``solve_program`` (the program the solver saw) when given.
    """
    y = program.clip(y)
    target = solve_program or program
    split = _RhoAssembly(program, y, device) if polish and program.rho_index is not None else None
    shared = split if target is program else None  # no reduced program: its matrices are the checked ones
    defects = tuple(eigenvalue_defect(assemble_for_check(lmi, y, device) if shared is None or t != program.rho_lmi
                                      else shared(t, y), device) for t, lmi in enumerate(target.lmis))
    raw = CheckReport(False, None, float(program.objective @ y), (), defects, known_weights(program.repair_weights),
                      reason="not checked")
    if split is not None:
        # The reduced program has the same optimal rho for given multipliers and a much smaller rho block.
        rho = optimal_rho(target, y, device, assemble=shared)
        if rho is not None:
            found = _enlarged_rho(program, y, rho, device, split) if rho > 0 else None
            if found is not None and found[1][program.rho_index] <= rho * (1 + 2.0**-20):
                return found[0], found[1], raw
            # A large enlargement (a poorly centred point): the repair may do better, keep the smaller bound.
            y2 = y.copy()
            y2[program.rho_index] = rho
            report = check_program(program, y2, device, rho_on_boundary=rho > 0)
            candidates = [c for c in (found, (report, y2) if report.certified else None) if c is not None]
            if candidates:
                best = min(candidates, key=lambda c: c[0].bound)
                return best[0], best[1], raw
    report = check_program(program, y, device)
    return report, y, _replace(report, eigen_defects=defects)


@dataclass(frozen=True)
class Certificate:
    """Result of :func:`lipbound.certify`.

    Attributes
    ----------
    upper_bound : float or None
        The certified Lipschitz upper bound (``None`` when certification failed).
    certified : bool
        Whether ``upper_bound`` passed the rigorous check.
    solver_bound : float or None
        What the solver's own answer claims (``scale * sqrt(rho)``), unchecked.
    method, solver, norm : str
        ``solver`` is ``"closed-form"`` for ``mp`` and for LipSDP-Neuron multipliers computed in closed form
        (nonnegative networks, :mod:`lipbound.formulations.monotone`; no SDP solve).
    status : str
        Solver status (``"optimal"``, ``"optimal_inaccurate"``, ...; ``"closed_form"`` for ``mp``).
    reason : str
        Why certification failed, or notes.
    time_s : float
        Wall-clock time of formulation + solve + check.
    sizes : dict
        Problem sizes (variables, LMI sizes, network dims).
    eigen_defect : float or None
        Floating-point ``lambda_max`` of the LMI at the solver's raw answer (> 0 means infeasible).
    delta, repair_weight : float or None
        The proved ``M <= delta I`` and the norm bound ``B`` used in the repair (largest over the LMIs; ``None``
        when every LMI was proved with ``delta = 0`` and ``B`` was never computed).
    deltas : list of float
        ``delta`` per LMI (a re-check tries them first and proves them again).
    multipliers : list of float
        The checked multipliers (``rho`` first), in the unscaled program's variables.
    exponents : list of int
        Power-of-two scaling exponents used by the formulation (needed to re-check).
    network : str
        Summary of the network the certificate is about.
    lower_bound : float or None
        A lower bound, when one was computed.
    timings : dict
        Seconds spent formulating, solving and checking.
    options : dict
        Formulation options needed to rebuild the program (``output_index``, ``coupled``).
    notes : list of str
        Assumptions the bound rests on (e.g. well-posedness of implicit layers).
    solver_info : dict
        The backend's own statistics (iterations, duality gap, ...).
    """

    upper_bound: float | None
    certified: bool
    solver_bound: float | None
    method: str
    solver: str
    norm: str
    status: str
    reason: str = ""
    time_s: float = 0.0
    sizes: dict = field(default_factory=dict)
    eigen_defect: float | None = None
    delta: float | None = None
    repair_weight: float | None = None
    deltas: list = field(default_factory=list)
    multipliers: list = field(default_factory=list)
    exponents: list = field(default_factory=list)
    network: str = ""
    lower_bound: float | None = None
    timings: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    solver_info: dict = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """``upper_bound / lower_bound`` when both exist."""
        if self.upper_bound is None or not self.lower_bound:
            return None
        return self.upper_bound / self.lower_bound

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> Certificate:
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Certificate:
        return cls.from_dict(json.loads(text))

    def with_lower_bound(self, value: float) -> Certificate:
        data = self.to_dict()
        data["lower_bound"] = float(value)
        return Certificate(**data)
