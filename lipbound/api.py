"""The public entry point: :func:`certify`, plus :func:`verify_certificate`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from lipbound.certificate import Certificate, certify_multipliers, check_program
from lipbound.errors import FormulationError, SolverError
from lipbound.formulations.lipsdp import lipsdp, lipsdp_nsr, lipsdp_rr, product_bound
from lipbound.importers import from_torch, load
from lipbound.network import Network
from lipbound.solvers import choose_solver, get_solver

log = logging.getLogger("lipbound")

METHODS = ("mp", "lipsdp-layer", "lipsdp-neuron", "lipsdp-nsr", "lipsdp-rr")
NORMS = ("l2", "linf")


def as_network(model, input_shape=None, activation: str = "relu", architecture: str = "feedforward") -> Network:
    """Turn a Network, an ``nn.Module`` or a file path into a :class:`Network`."""
    if isinstance(model, Network):
        return model
    if isinstance(model, nn.Module):
        return from_torch(model, input_shape)
    if isinstance(model, (str, Path)):
        return load(model, activation=activation, architecture=architecture)
    raise TypeError(f"cannot certify a {type(model).__name__}: pass a lipbound.Network, an nn.Module or a path.")


def applicable_methods(network: Network) -> list[str]:
    """The methods that apply to a network (``--method all``): LipSDP-Layer/Neuron for slope-restricted
    activations only; NSR (and RR when every group layer is MaxMin) otherwise."""
    from lipbound.formulations.lipsdp import _leaf_activations
    from lipbound.network import GroupSortLayer, SlopeRestricted

    leaves = list(_leaf_activations(network))
    if all(isinstance(a, SlopeRestricted) for a in leaves):
        return ["mp", "lipsdp-layer", "lipsdp-neuron"]
    methods = ["mp", "lipsdp-nsr"]
    if all(isinstance(a, SlopeRestricted) or (isinstance(a, GroupSortLayer) and a.group_size == 2) for a in leaves):
        methods.append("lipsdp-rr")
    return methods


def build_problem(network: Network, method: str, norm: str = "l2", output_index: int | None = None,
                  coupled: bool = False, exponents=None, reduce_input: bool = True):
    """The :class:`~lipbound.formulations.LipschitzProblem` of an SDP method."""
    if method in ("lipsdp-neuron", "lipsdp-layer"):
        return lipsdp(network, method.split("-", 1)[1], exponents, reduce_input, norm=norm, output_index=output_index)
    if method == "lipsdp-nsr":
        return lipsdp_nsr(network, coupled, norm, output_index, exponents, reduce_input)
    if method == "lipsdp-rr":
        return lipsdp_rr(network, norm, output_index, exponents, reduce_input)
    raise FormulationError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")


def domain_to_dict(domain) -> dict | None:
    """JSON form of a :class:`~lipbound.bounds.Box` / :class:`~lipbound.bounds.Ball` (stored in certificates)."""
    from lipbound.bounds import Ball, Box

    if domain is None:
        return None
    if isinstance(domain, Box):
        return {"type": "box", "lower": domain.lower.tolist(), "upper": domain.upper.tolist()}
    if isinstance(domain, Ball):
        return {"type": "ball", "center": domain.center.tolist(), "radius": float(domain.radius), "norm": domain.norm}
    raise TypeError(f"domain must be a lipbound.Box or lipbound.Ball, got {type(domain).__name__}.")


def domain_from_dict(data: dict | None):
    from lipbound.bounds import Ball, Box

    if not data:
        return None
    if data["type"] == "box":
        return Box(np.array(data["lower"]), np.array(data["upper"]))
    return Ball(np.array(data["center"]), data["radius"], data.get("norm", "l2"))


def localise(network: Network, domain, bounds_method: str = "crown") -> Network:
    """The network with per-neuron slopes narrowed to ``domain`` (identity when ``domain`` is None)."""
    if domain is None:
        return network
    from lipbound.bounds import local_slopes

    return local_slopes(network, domain, bounds_method)


def certify(model, method: str = "lipsdp-neuron", norm: str = "l2", solver: str = "auto",
            input_shape=None, activation: str = "relu", output_index: int | None = None, coupled: bool = False,
            domain=None, bounds_method: str = "crown", polish: bool = True, verbose: bool = False,
            reduce_input: bool = True, **solver_options) -> Certificate:
    """Certified upper bound on the Lipschitz constant of ``model``.

    Parameters
    ----------
    model : Network, nn.Module or path (.mat, .npz, .pt)
    method : {"mp", "lipsdp-layer", "lipsdp-neuron", "lipsdp-nsr", "lipsdp-rr"}
        ``mp``: product of certified per-layer bounds. ``lipsdp-neuron``/``-layer``: LipSDP for
        slope-restricted activations. ``lipsdp-nsr``: adds the GroupSort/MaxMin/Householder quadratic
        constraints. ``lipsdp-rr``: MaxMin rewritten as residual ReLU (baseline). Residual and implicit
        layers are handled inside the SDP.
    norm : {"l2", "linf"}
        ``linf`` bounds ``|f_i(x) - f_i(x')| <= L ||x - x'||_inf`` for the scalar output ``output_index``.
    solver : {"auto", "clarabel", "scs", "mosek", "sdpa", "native"}
        ``auto`` picks by LMI size and logs the choice.
    input_shape : int or tuple, optional
        For ``nn.Module`` inputs.
    activation : str
        Activation of weight-only files.
    output_index : int, optional
        The output row bounded by ``norm="linf"`` (required when there are several outputs).
    coupled : bool
        ``lipsdp-nsr`` only: include the S and P multipliers (the full QC) instead of S = P = 0.
    domain : lipbound.Box or lipbound.Ball, optional
        Certify the Lipschitz constant on this region only (a local bound): rigorous pre-activation bounds
        (``bounds_method``: ``"crown"`` or ``"ibp"``) give per-neuron slope ranges (stably inactive ReLUs get
        slope 0, stably active ones 1), which replace the global ones. The region is stored in the certificate.
    polish : bool
        Re-optimise ``rho`` for the solver's multipliers before checking (never loosens the bound).
    reduce_input : bool
        l2: hand the solver the LMI with the input block reduced by a QR factorisation of the first weight
        (same optimum, smaller cone; the certificate always checks the unreduced LMI). ``False`` gives the solver
        the plain LipSDP program as the peers' code builds it (for comparisons).
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
        raise FormulationError(f"unknown norm {norm!r}; supported: {', '.join(NORMS)}.")
    start = time.perf_counter()
    network = as_network(model, input_shape, activation)
    sizes = {"dims": list(network.dims), "n_hidden": network.n_hidden}
    options = {"output_index": output_index, "coupled": coupled, "domain": domain_to_dict(domain),
               "bounds_method": bounds_method, "reduce_input": reduce_input}
    network = localise(network, domain, bounds_method)
    if method == "mp":
        bound, estimate, scaling = product_bound(network, norm, output_index)
        finite = math.isfinite(bound)
        return Certificate(bound if finite else None, finite, estimate, method, "closed-form", norm, "closed_form",
                           reason="" if finite else "the product bound overflows the float64 range",
                           time_s=time.perf_counter() - start, sizes=sizes, network=network.summary(),
                           options=options, exponents=list(scaling))
    problem = build_problem(network, method, norm, output_index, coupled, reduce_input=reduce_input)
    t_form = time.perf_counter() - start
    solver_name = choose_solver(problem.solve_program) if solver == "auto" else solver.lower()
    result = get_solver(solver_name).solve(problem.solve_program, verbose=verbose, **solver_options)
    t_solve = time.perf_counter() - start - t_form
    device = solver_options.get("device") if solver_name == "native" else None
    report, y, raw = certify_multipliers(problem.program, result.y, polish=polish, device=device,
                                         solve_program=problem.solve_program)
    sizes.update(problem.program.sizes)
    sizes["solve_lmi_sizes"] = [lmi.size for lmi in problem.solve_program.lmis]
    timings = {"formulate_s": t_form, "solve_s": t_solve, "check_s": time.perf_counter() - start - t_form - t_solve}
    if not report.certified:
        log.warning("certification failed for %s/%s: %s", method, solver_name, report.reason)
    return Certificate(
        upper_bound=report.bound, certified=report.certified, solver_bound=problem.solve_program.value(result.y),
        method=method, solver=solver_name, norm=norm, status=result.status, reason=report.reason,
        time_s=time.perf_counter() - start, sizes=sizes,
        eigen_defect=max(raw.eigen_defects) if raw.eigen_defects else None,
        delta=max(report.deltas) if report.deltas else None,
        repair_weight=max(report.repair_weights) if report.repair_weights else None,
        deltas=[float(d) for d in report.deltas],
        multipliers=[float(v) for v in y], exponents=list(problem.exponents), network=network.summary(),
        timings=timings, options=options, notes=list(problem.notes), solver_info=_jsonable(result.info))


def _jsonable(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool, type(None)))}


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
    opts = certificate.options or {}
    network = localise(network, domain_from_dict(opts.get("domain")), opts.get("bounds_method", "crown"))
    if certificate.method == "mp":
        bound, _, _ = product_bound(network, certificate.norm, opts.get("output_index"),
                                    tuple(certificate.exponents) or None)
    else:
        if certificate.method not in METHODS:
            return Verification(False, None, f"unknown method {certificate.method!r}")
        try:
            problem = build_problem(network, certificate.method, certificate.norm, opts.get("output_index"),
                                    bool(opts.get("coupled", False)), tuple(certificate.exponents))
        except FormulationError as exc:
            return Verification(False, None, str(exc))
        report = check_program(problem.program, np.asarray(certificate.multipliers, dtype=np.float64),
                               delta_hints=tuple(certificate.deltas) or None)
        if not report.certified:
            return Verification(False, None, report.reason)
        bound = report.bound
    if bound <= certificate.upper_bound:
        return Verification(True, bound)
    return Verification(False, bound, f"recomputed certified bound {bound!r} exceeds the claimed "
                                      f"{certificate.upper_bound!r}")


def certify_all(model, methods=None, solver: str = "auto", **kwargs) -> list[Certificate]:
    """Run several methods (default: :func:`applicable_methods`); a method whose solver fails yields an
    uncertified entry with the reason."""
    network = as_network(model, kwargs.pop("input_shape", None), kwargs.pop("activation", "relu"))
    methods = applicable_methods(network) if methods is None else methods
    out = []
    for method in methods:
        try:
            out.append(certify(network, method=method, solver=solver, **kwargs))
        except SolverError as exc:
            out.append(Certificate(None, False, None, method, solver, kwargs.get("norm", "l2"), "solver_error",
                                   reason=str(exc), network=network.summary()))
    return out
