"""Solver interface, registry and the ``auto`` choice."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from lipbound.errors import SolverError
from lipbound.program import Program

log = logging.getLogger("lipbound")


@dataclass(frozen=True)
class SolveResult:
    """Multipliers returned by a backend, with its own status (never trusted alone)."""

    y: np.ndarray
    status: str
    solver: str
    time_s: float
    info: dict = field(default_factory=dict)


def get_solver(name: str):
    """Return the backend object for ``name`` (raises :class:`SolverError` if unknown or unavailable)."""
    from lipbound.solvers.cvxpy_backend import CvxpySolver

    key = name.lower()
    if key == "native":
        from lipbound.solvers.native import NativeSolver

        return NativeSolver()
    if key in CvxpySolver.NAMES:
        return CvxpySolver(key)
    raise SolverError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)} or 'auto'.")


SOLVERS = ("clarabel", "scs", "mosek", "sdpa", "native")


def available_solvers() -> list[str]:
    """Solvers usable on this machine (installed; MOSEK needs a licence, checked at solve time; ``native`` always)."""
    import cvxpy as cp

    installed = set(cp.installed_solvers())
    names = {"clarabel": "CLARABEL", "scs": "SCS", "mosek": "MOSEK", "sdpa": "SDPA"}
    # The native solver needs only torch, a hard dependency: it is always available.
    return [k for k, v in names.items() if v in installed] + ["native"]


# Clarabel keeps a dense (N(N+1)/2)^2 block per PSD cone of size N: measured here (2 cores), N = 62
# takes 2.0 s, N = 96 takes 35-55 s, and N ~ 180 exhausts 24 GB. Above this size SCS (first order) is
# the only open choice through cvxpy.
CLARABEL_MAX_LMI = 70


def choose_solver(program: Program) -> str:
    """The ``auto`` rule: Clarabel (accurate) for small LMIs, SCS for larger ones. Logged."""
    size = max(lmi.size for lmi in program.lmis)
    choice = "clarabel" if size <= CLARABEL_MAX_LMI else "scs"
    log.info("solver=auto: LMI size %d -> %s", size, choice)
    return choice
