"""cvxpy backends: Clarabel, SCS, MOSEK and SDPA.

The LMI is passed as one sparse affine map ``vec(M) = F y + f0`` (built from the program's low-rank
terms, never as dense products), so cvxpy's compilation stays proportional to the non-zeros.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from lipbound.errors import SolverError
from lipbound.program import Program
from lipbound.solvers.base import SolveResult

log = logging.getLogger("lipbound")

_DEFAULTS = {
    "scs": {"eps_abs": 1e-7, "eps_rel": 1e-7, "max_iters": 100_000},
    "clarabel": {},
    "mosek": {},
    "sdpa": {},
}


class CvxpySolver:
    """Solve a :class:`Program` with a conic solver through cvxpy."""

    NAMES = ("clarabel", "scs", "mosek", "sdpa")

    def __init__(self, name: str):
        self.name = name

    def _check_available(self):
        import cvxpy as cp

        installed = cp.installed_solvers()
        if self.name.upper() not in installed:
            extra = {"mosek": "pip install 'lipbound[mosek]' and a MOSEK licence",
                     "sdpa": "pip install sdpa-python"}.get(self.name, f"pip install {self.name}")
            raise SolverError(f"solver '{self.name}' is not installed ({extra}); installed: {', '.join(installed)}.")
        if self.name == "mosek":
            try:
                import mosek

                with mosek.Env() as env, env.Task(0, 0) as task:
                    task.optimize()
            except Exception as exc:
                raise SolverError(f"MOSEK is installed but not usable (licence?): {exc}. Use solver='clarabel' "
                                  "or 'scs', which need no licence.") from exc

    def solve(self, program: Program, verbose: bool = False, **options) -> SolveResult:
        """Solve and return the multipliers; raises :class:`SolverError` when no point comes back."""
        import cvxpy as cp

        self._check_available()
        start = time.perf_counter()
        y = cp.Variable(program.n_vars)
        constraints = []
        if program.nonneg.any():
            constraints.append(y[np.flatnonzero(program.nonneg)] >= 0)
        for lmi in program.lmis:
            f, f0 = lmi.vectorized(program.n_vars)
            n = lmi.size
            matrix = cp.reshape(f @ y + f0, (n, n), order="F")
            # The map is exactly symmetric by construction; symmetrising tells cvxpy so at no cost in accuracy.
            constraints.append((matrix + matrix.T) / 2 << 0)
        problem = cp.Problem(cp.Minimize(program.objective @ y), constraints)
        opts = dict(_DEFAULTS[self.name])
        opts.update(options)
        log.info("solving %s (%s) with %s: %d variables, LMI sizes %s", program.name, "cvxpy", self.name,
                 program.n_vars, [lmi.size for lmi in program.lmis])
        try:
            problem.solve(solver=self.name.upper(), verbose=verbose, **opts)
        except cp.error.SolverError as exc:
            raise SolverError(f"{self.name} failed on {program.name}: {exc}") from exc
        elapsed = time.perf_counter() - start
        status = str(problem.status)
        if y.value is None or status in ("infeasible", "unbounded", "infeasible_inaccurate", "unbounded_inaccurate"):
            raise SolverError(f"{self.name} returned status '{status}' on {program.name} with no usable point.")
        info = {"solver_time_s": problem.solver_stats.solve_time if problem.solver_stats else None,
                "iterations": problem.solver_stats.num_iters if problem.solver_stats else None,
                "objective": float(problem.value) if problem.value is not None else None}
        return SolveResult(np.asarray(y.value, dtype=np.float64), status, self.name, elapsed, info)
