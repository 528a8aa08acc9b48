"""Validation of user options before any work starts: solver names and settings, devices.

A misspelt or mistyped option must fail at once with an :class:`~lipbound.errors.OptionError` naming it (not
after minutes of formulation with a raw ``TypeError`` from inside a solver, and never be ignored). The accepted
setting names come from the solvers themselves where they can be listed (the native solver's signature and
``_OPTIONS``, Clarabel's ``DefaultSettings``); SCS has no such list, so its documented settings are listed here.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from lipbound.errors import OptionError, SolverError

#: The settings of SCS 3 (https://www.cvxgrp.org/scs/api/settings.html) plus cvxpy's own SCS switches.
_SCS_SETTINGS: dict[str, type] = {
    "normalize": bool, "scale": float, "adaptive_scale": bool, "rho_x": float, "max_iters": int, "eps_abs": float,
    "eps_rel": float, "eps_infeas": float, "alpha": float, "time_limit_secs": float, "warm_start": bool,
    "acceleration_lookback": int, "acceleration_interval": int, "write_data_filename": str,
    "log_csv_filename": str, "use_indirect": bool, "gpu": bool, "mkl": bool, "use_quad_obj": bool,
}


def check_device(device: Any, what: str = "device") -> torch.device:
    """A usable ``torch.device`` for ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:k"``, a ``torch.device``).

    Raises :class:`OptionError` naming ``what`` for an unparsable device or CUDA that is not available here.

    Examples
    --------
    >>> check_device("cpu")
    device(type='cpu')
    """
    if not isinstance(device, (str, torch.device)):
        raise OptionError(f"{what} must be a string such as 'cpu' or 'cuda', got {device!r}.")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise OptionError(f"{what}={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:<k>'.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{what}={str(device)!r} but CUDA is not available on this machine; use 'cpu' "
                              "(or leave it unset to pick CUDA only when present).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"{what}={str(device)!r} but this machine has {torch.cuda.device_count()} CUDA "
                              "device(s).")
    elif dev.type != "cpu":
        raise OptionError(f"{what}={str(device)!r}: only 'cpu' and 'cuda' devices are supported.")
    return dev


def check_solver(name: Any) -> str:
    """The lower-case solver name; :class:`SolverError` for an unknown one or one that is not installed here.

    Examples
    --------
    >>> check_solver("Native")
    'native'
    """
    from lipbound.solvers import SOLVERS, available_solvers

    if not isinstance(name, str) or name.lower() not in (*SOLVERS, "auto"):
        raise SolverError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)} or 'auto'.")
    key = name.lower()
    # The native solver needs only torch; listing the others imports cvxpy, which native runs never need.
    if key not in ("auto", "native", "circulant") and key not in available_solvers():
        raise SolverError(f"solver {key!r} is not installed here (available: {', '.join(available_solvers())}); "
                          "see the README's Solvers section for how to install it.")
    return key


def _real(name: str, value: Any, *, positive: bool = False, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"solver option {name!r} must be a real number, got {value!r}.")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise OptionError(f"solver option {name!r} must be finite, got {value!r}.")
    if v < 0 or (positive and v == 0):
        raise OptionError(f"solver option {name!r} must be {'> 0' if positive else '>= 0'}, got {value!r}.")
    return v


def _integer(name: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(f"solver option {name!r} must be an integer, got {value!r}.")
    if value < minimum:
        raise OptionError(f"solver option {name!r} must be >= {minimum}, got {value!r}.")
    return int(value)


def _typed(name: str, value: Any, kind: type) -> Any:
    """Check ``value`` against the type of a setting's default: tolerances (``tol*``, ``eps*``) must be > 0,
    other reals and integers >= 0 (no setting of these solvers takes a negative number)."""
    if kind is bool:
        if not isinstance(value, bool):
            raise OptionError(f"solver option {name!r} must be True or False, got {value!r}.")
        return value
    if kind is int:
        return _integer(name, value)
    if kind is float:
        return _real(name, value, positive="tol" in name or name.startswith("eps"), allow_inf="time" in name)
    if not isinstance(value, kind):
        raise OptionError(f"solver option {name!r} must be a {kind.__name__}, got {value!r}.")
    return value


def _native_checks() -> dict[str, Callable[[str, Any], Any]]:
    return {
        "tol": lambda n, v: _real(n, v, positive=True),
        "max_iter": lambda n, v: _integer(n, v),
        "device": lambda n, v: v if v is None else check_device(v, "device"),
        "step_fraction": lambda n, v: v if v is None else _fraction(n, v),
        "lanczos_steps": lambda n, v: _integer(n, v, minimum=1),
        "threads": lambda n, v: v if v is None else _integer(n, v, minimum=1),
    }


def _fraction(name: str, value: Any) -> float:
    v = _real(name, value, positive=True)
    if v >= 1:
        raise OptionError(f"solver option {name!r} must lie in (0, 1), got {value!r}.")
    return v


def _accepted(solver: str) -> dict[str, Callable[[str, Any], Any]] | None:
    """Setting name -> checker for ``solver``; ``None`` when the solver's settings cannot be listed."""
    if solver == "native":
        from lipbound.solvers import native

        params = [p for p in inspect.signature(native.NativeSolver.solve).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in ("self", "program", "verbose")]
        names = [p.name for p in params] + list(getattr(native, "_OPTIONS", ()))
        checks = _native_checks()
        return {n: checks.get(n, lambda _n, v: v) for n in names}
    if solver == "circulant":
        checks = _native_checks()
        return {n: checks[n] for n in ("tol", "max_iter", "device")}
    if solver == "clarabel":
        import clarabel

        defaults = clarabel.DefaultSettings()
        kinds = {n: type(getattr(defaults, n)) for n in dir(defaults)
                 if not n.startswith("_") and not callable(getattr(defaults, n)) and n != "verbose"}
        return {n: (lambda n_, v, k=k: _typed(n_, v, k)) for n, k in kinds.items()}
    if solver == "scs":
        return {n: (lambda n_, v, k=k: _typed(n_, v, k)) for n, k in _SCS_SETTINGS.items()}
    return None


def check_solver_options(solver: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validate ``options`` for ``solver`` (a name from :func:`check_solver`, ``"auto"`` meaning native).

    Unknown names raise :class:`OptionError` listing the accepted ones; wrong types or ranges raise it naming the
    option. MOSEK and SDPA settings are passed through unchecked (their settings cannot be listed without them).

    Examples
    --------
    >>> check_solver_options("native", {"tol": 1e-8})
    {'tol': 1e-08}
    >>> check_solver_options("native", {"tol": "abc"})
    Traceback (most recent call last):
    ...
    lipbound.errors.OptionError: solver option 'tol' must be a real number, got 'abc'.
    """
    key = "native" if solver == "auto" else solver
    accepted = _accepted(key)
    if accepted is None:
        return dict(options)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionError(f"unknown option(s) for solver {key!r}: {', '.join(unknown)}; accepted: "
                          f"{', '.join(sorted(accepted))}. (Options of certify() itself: method, norm, solver, "
                          "input_shape, activation, output_index, coupled, domain, bounds_method, polish, verbose, "
                          "reduce_input.)")
    for name, value in options.items():
        accepted[name](name, value)
    return dict(options)
