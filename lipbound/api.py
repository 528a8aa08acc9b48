"""The public entry point: :func:`certify`, plus :func:`verify_certificate`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from lipbound.certificate import Certificate, certify_multipliers, check_program
from lipbound.errors import FormulationError, SolverError
from lipbound.formulations.lipsdp import lipsdp, product_bound
from lipbound.importers import from_torch, load
from lipbound.network import Network
from lipbound.solvers import choose_solver, get_solver

log = logging.getLogger("lipbound")

METHODS = ("mp", "lipsdp-layer", "lipsdp-neuron")
NORMS = ("l2",)


def as_network(model, input_shape=None, activation: str = "relu") -> Network:
    """Turn a Network, an ``nn.Module`` or a file path into a :class:`Network`."""
    if isinstance(model, Network):
        return model
    if isinstance(model, nn.Module):
        return from_torch(model, input_shape)
    if isinstance(model, (str, Path)):
        return load(model, activation=activation)
    raise TypeError(f"cannot certify a {type(model).__name__}: pass a lipbound.Network, an nn.Module or a path.")


def _lipsdp_form(method: str) -> str:
    return method.split("-", 1)[1]


def certify(model, method: str = "lipsdp-neuron", norm: str = "l2", solver: str = "auto",
            input_shape=None, activation: str = "relu", polish: bool = True, verbose: bool = False,
            **solver_options) -> Certificate:
    """Certified upper bound on the Lipschitz constant of ``model``.

    Parameters
    ----------
    model : Network, nn.Module or path (.mat, .npz, .pt)
    method : {"mp", "lipsdp-layer", "lipsdp-neuron"}
        ``mp``: product of certified spectral norms (times slope maxima). ``lipsdp-*``: the LipSDP
        programs, solved by ``solver`` and checked rigorously.
    norm : {"l2"}
    solver : {"auto", "clarabel", "scs", "mosek", "sdpa"}
        ``auto`` picks by LMI size and logs the choice.
    input_shape : int or tuple, optional
        For ``nn.Module`` inputs.
    activation : str
        Activation of weight-only files.
    polish : bool
        Re-optimise ``rho`` for the solver's multipliers before checking (never loosens the bound).
    **solver_options
        Passed to the solver (e.g. ``eps_abs=1e-9`` for SCS, ``max_iter=500`` for Clarabel).

    Returns
    -------
    Certificate
        ``certified`` is ``True`` only if the rigorous check passed; ``upper_bound`` is then sound.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> cert = lipbound.certify(lipbound.from_weights([np.eye(2), np.eye(2)]), method="lipsdp-neuron")
    >>> cert.certified, round(cert.upper_bound, 6)
    (True, 1.0)
    """
    if method not in METHODS:
        raise FormulationError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if norm not in NORMS:
        raise FormulationError(f"norm {norm!r} is not supported for {method}; supported: {', '.join(NORMS)}.")
    start = time.perf_counter()
    network = as_network(model, input_shape, activation)
    sizes = {"dims": list(network.dims), "n_hidden": network.n_hidden}
    if method == "mp":
        bound, estimate = product_bound(network)
        return Certificate(bound, True, estimate, method, "closed-form", norm, "closed_form",
                           time_s=time.perf_counter() - start, sizes=sizes, network=network.summary())
    problem = lipsdp(network, _lipsdp_form(method))
    t_form = time.perf_counter() - start
    solver_name = choose_solver(problem.solve_program) if solver == "auto" else solver.lower()
    result = get_solver(solver_name).solve(problem.solve_program, verbose=verbose, **solver_options)
    t_solve = time.perf_counter() - start - t_form
    report, y, raw = certify_multipliers(problem.program, result.y, polish=polish)
    sizes.update(problem.program.sizes)
    sizes["solve_lmi_sizes"] = [lmi.size for lmi in problem.solve_program.lmis]
    timings = {"formulate_s": t_form, "solve_s": t_solve, "check_s": time.perf_counter() - start - t_form - t_solve}
    if not report.certified:
        log.warning("certification failed for %s/%s: %s", method, solver_name, report.reason)
    return Certificate(
        upper_bound=report.bound, certified=report.certified, solver_bound=problem.solve_program.value(result.y),
        method=method, solver=solver_name, norm=norm, status=result.status, reason=report.reason,
        time_s=time.perf_counter() - start, sizes=sizes,
        eigen_defect=raw.eigen_defects[0] if raw.eigen_defects else None,
        delta=report.deltas[0] if report.deltas else None,
        repair_weight=report.repair_weights[0] if report.repair_weights else None,
        multipliers=[float(v) for v in y], exponents=list(problem.exponents), network=network.summary(),
        timings=timings)


@dataclass(frozen=True)
class Verification:
    """Outcome of :func:`verify_certificate`."""

    valid: bool
    recomputed_bound: float | None
    reason: str = ""


def verify_certificate(certificate: Certificate, model, input_shape=None, activation: str = "relu") -> Verification:
    """Re-check a (possibly saved) certificate against a network from scratch.

    The program is rebuilt from the network and the stored scaling exponents; the stored
    multipliers are checked rigorously; the certificate is valid iff the recomputed certified bound
    is finite and ``<= certificate.upper_bound``. Nothing stored besides the multipliers, the
    exponents and the claimed bound is trusted.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.eye(2), np.eye(2)])
    >>> lipbound.verify_certificate(lipbound.certify(net), net).valid
    True
    """
    network = as_network(model, input_shape, activation)
    if not certificate.certified or certificate.upper_bound is None:
        return Verification(False, None, "the certificate does not claim a certified bound")
    if certificate.method == "mp":
        bound, _ = product_bound(network)
    else:
        if certificate.method not in METHODS:
            return Verification(False, None, f"unknown method {certificate.method!r}")
        try:
            problem = lipsdp(network, _lipsdp_form(certificate.method), exponents=tuple(certificate.exponents))
        except FormulationError as exc:
            return Verification(False, None, str(exc))
        report = check_program(problem.program, np.asarray(certificate.multipliers, dtype=np.float64))
        if not report.certified:
            return Verification(False, None, report.reason)
        bound = report.bound
    if bound <= certificate.upper_bound:
        return Verification(True, bound)
    return Verification(False, bound, f"recomputed certified bound {bound!r} exceeds the claimed "
                                      f"{certificate.upper_bound!r}")


def certify_all(model, methods=METHODS, solver: str = "auto", **kwargs) -> list[Certificate]:
    """Run several methods; a method that fails yields an uncertified entry with the reason."""
    network = as_network(model, kwargs.pop("input_shape", None), kwargs.pop("activation", "relu"))
    out = []
    for method in methods:
        try:
            out.append(certify(network, method=method, solver=solver, **kwargs))
        except SolverError as exc:
            out.append(Certificate(None, False, None, method, solver, kwargs.get("norm", "l2"), "solver_error",
                                   reason=str(exc), network=network.summary()))
    return out
