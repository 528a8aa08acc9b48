"""Solver backends: each takes a :class:`~lipbound.program.Program` and returns multipliers.

Backends never report bounds: every answer goes through :mod:`lipbound.certificate`.
"""

from lipbound.solvers.base import SOLVERS, SolveResult, available_solvers, choose_solver, get_solver

__all__ = ["SOLVERS", "SolveResult", "available_solvers", "choose_solver", "get_solver"]
