"""The public entry point: :func:`certify`, plus :func:`verify_certificate`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lipbound.certificate import Certificate, certify_multipliers, check_program
from lipbound.errors import FormulationError, LipboundError, OptionError, SolverError
from lipbound.formulations.circulant import channel_signal, circulant_exponents
from lipbound.formulations.lipsdp import lipsdp, lipsdp_nsr, lipsdp_rr, product_bound, product_estimate
from lipbound.importers import from_torch, load
from lipbound.network import Network
from lipbound.options import check_solver, check_solver_options
from lipbound.progress import Progress
from lipbound.solvers import choose_solver, get_solver
from lipbound.solvers.threads import ThreadPolicy, last_measured

log = logging.getLogger("lipbound")

METHODS = ("mp", "lipsdp-layer", "lipsdp-channel", "lipsdp-neuron", "lipsdp-nsr", "lipsdp-rr")
NORMS = ("l2", "linf")


def as_network(model, input_shape=None, activation: str = "relu", architecture: str = "feedforward",
               trust_code: bool = False):
    """Turn a Network/GraphNetwork, an ``nn.Module`` or a file path into the network IR."""
    from lipbound.graph import GraphNetwork

    if isinstance(model, (Network, GraphNetwork)):
        return model
    if isinstance(model, nn.Module):
        return from_torch(model, input_shape)
    if isinstance(model, (str, Path)):
        return load(model, activation=activation, architecture=architecture, input_shape=input_shape,
                    trust_code=trust_code)
    if type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx"):
        from lipbound.importers.onnx import from_onnx

        return from_onnx(model, input_shape=input_shape)
    raise TypeError(f"cannot certify a {type(model).__name__}: pass a lipbound.Network, an nn.Module, an ONNX "
                    "model or a path.")


@dataclass(frozen=True)
class MethodPlan:
    """Which methods ``method="all"`` runs on a network, and why the others are skipped.

    Attributes
    ----------
    run : tuple of str
        Methods that apply and give a bound of their own, in :data:`METHODS` order.
    skipped : dict
        ``method -> reason`` for every other method of :data:`METHODS`.
    """

    run: tuple[str, ...]
    skipped: dict = field(default_factory=dict)


def plan_methods(network: Network) -> MethodPlan:
    """The methods that apply to ``network`` (``--method all``), with the reason for each one skipped.

    LipSDP-Layer/Neuron need slope-restricted activations only. LipSDP-NSR applies to every network (its
    GroupSort/MaxMin/Householder constraints next to per-neuron slope constraints); LipSDP-RR applies when every
    non-slope-restricted layer is a MaxMin (GroupSort of group size 2). On a network without such layers NSR and RR
    build the LipSDP-Neuron program; they still run (they apply), and the notes say so. Per-channel multipliers
    differ from per-neuron ones only on convolutional layers: ``lipsdp-channel`` is skipped, with that reason, on
    networks without them.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> plan = plan_methods(lipbound.from_weights([np.eye(2), np.eye(2)], "maxmin"))
    >>> plan.run, sorted(plan.skipped)
    (('mp', 'lipsdp-nsr', 'lipsdp-rr'), ['lipsdp-channel', 'lipsdp-layer', 'lipsdp-neuron'])
    """
    from lipbound.formulations.lipsdp import _leaf_activations
    from lipbound.network import GroupSortLayer, SlopeRestricted

    other = [a for a in _leaf_activations(network) if not isinstance(a, SlopeRestricted)]
    listing = ", ".join(f"{a.name} ({type(a).__name__})" for a in other)
    skipped: dict[str, str] = {}
    if other:
        reason = f"needs slope-restricted activations; this network has {listing}"
        skipped["lipsdp-layer"] = skipped["lipsdp-neuron"] = skipped["lipsdp-channel"] = reason
        not_maxmin = [a for a in other if not (isinstance(a, GroupSortLayer) and a.group_size == 2)]
        if not_maxmin:
            skipped["lipsdp-rr"] = ("rewrites MaxMin (GroupSort of group size 2) only; this network has "
                                    + ", ".join(f"{a.name} ({type(a).__name__})" for a in not_maxmin))
    elif not _has_channels(network):
        skipped["lipsdp-channel"] = ("same program as lipsdp-neuron on this network: per-channel multipliers differ "
                                     "from per-neuron ones only on convolutional layers, and it has none")
    return MethodPlan(tuple(m for m in METHODS if m not in skipped), skipped)


def _has_channels(network) -> bool:
    """Whether some activation node has a channel structure (a multi-dimensional shape)."""
    from lipbound.graph import GraphNetwork

    return isinstance(network, GraphNetwork) and any(len(network.nodes[i].shape) > 1 and network.nodes[i].shape[0] > 1
                                                     and network.nodes[i].size > network.nodes[i].shape[0]
                                                     for i in network.activation_nodes)


def applicable_methods(network: Network) -> list[str]:
    """The methods ``method="all"`` runs on ``network`` (see :func:`plan_methods` for the skipped ones)."""
    return list(plan_methods(network).run)


def build_problem(network: Network, method: str, norm: str = "l2", output_index: int | None = None,
                  coupled: bool = False, exponents=None, reduce_input: bool = True):
    """The :class:`~lipbound.formulations.LipschitzProblem` of an SDP method."""
    if method in ("lipsdp-neuron", "lipsdp-layer", "lipsdp-channel"):
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


_BOUNDS_METHODS = ("crown", "ibp")
#: Keywords of :func:`certify` that certify_all passes on besides the solver's own options.
_CERTIFY_KEYWORDS = ("norm", "output_index", "domain", "bounds_method", "polish", "verbose", "reduce_input")
#: Scaling exponents beyond this size cannot come from a float network (|log2| of a float64 is < 1,100).
_MAX_EXPONENT = 4096


def _check_options(method: str, norm: str, solver: str, output_index, coupled, domain, bounds_method: str,
                   flags: dict, solver_options: dict) -> str:
    """Validate everything :func:`certify` takes before any work starts; return the solver's name."""
    from lipbound.bounds import Ball, Box

    if method not in METHODS:
        raise FormulationError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if norm not in NORMS:
        raise FormulationError(f"unknown norm {norm!r}; supported: {', '.join(NORMS)}.")
    if output_index is not None:
        if isinstance(output_index, bool) or not isinstance(output_index, numbers.Integral):
            raise OptionError(f"output_index must be an integer (the output row bounded in norm='linf'), got "
                              f"{output_index!r}.")
        if norm != "linf":
            raise OptionError(f"output_index={output_index} applies to norm='linf' only (it picks the scalar output "
                              "whose l-infinity bound is computed); the l2 bound covers all outputs at once. Drop "
                              "output_index or pass norm='linf'.")
    if not isinstance(coupled, bool):
        raise OptionError(f"coupled must be True or False, got {coupled!r}.")
    if coupled and method != "lipsdp-nsr":
        raise OptionError(f"coupled=True applies to method='lipsdp-nsr' only (it adds NSR's S and P multipliers); "
                          f"got method={method!r}.")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise OptionError(f"{name} must be True or False, got {value!r}.")
    if bounds_method not in _BOUNDS_METHODS:
        raise OptionError(f"unknown bounds_method {bounds_method!r}; choose one of {', '.join(_BOUNDS_METHODS)}.")
    if domain is not None and not isinstance(domain, (Box, Ball)):
        raise OptionError(f"domain must be a lipbound.Box or lipbound.Ball, got {type(domain).__name__}.")
    name = check_solver(solver)
    check_solver_options(name, solver_options)
    if name == "circulant" and (method != "lipsdp-channel" or norm != "l2" or domain is not None):
        raise OptionError(f"solver='circulant' solves the global l2 per-channel program of a convolutional chain "
                          f"(method='lipsdp-channel', norm='l2', no domain); got method={method!r}, norm={norm!r}"
                          f"{', a domain' if domain is not None else ''}.")
    return name


def certify(model, method: str = "lipsdp-neuron", norm: str = "l2", solver: str = "auto",
            input_shape=None, activation: str = "relu", output_index: int | None = None, coupled: bool = False,
            domain=None, bounds_method: str = "crown", polish: bool = True, verbose: bool = False,
            reduce_input: bool = True, trust_code: bool = False, **solver_options) -> Certificate:
    """Certified upper bound on the Lipschitz constant of ``model``.

    Every option is validated before any work starts: an unknown or mistyped one raises an error naming it.

    Parameters
    ----------
    model : Network, GraphNetwork, nn.Module or path (.mat, .npz, .pt, .pth, .safetensors, .pt2, .onnx)
    method : {"mp", "lipsdp-layer", "lipsdp-channel", "lipsdp-neuron", "lipsdp-nsr", "lipsdp-rr"}
        ``mp``: product of certified per-layer bounds. ``lipsdp-neuron``/``-channel``/``-layer``: LipSDP for
        slope-restricted activations with one multiplier per neuron / per output channel of each convolutional
        layer / per layer. ``lipsdp-nsr``: adds the GroupSort/MaxMin/Householder quadratic
        constraints. ``lipsdp-rr``: MaxMin rewritten as residual ReLU (baseline). Residual and implicit
        layers are handled inside the SDP.
    norm : {"l2", "linf"}
        ``linf`` bounds ``|f_i(x) - f_i(x')| <= L ||x - x'||_inf`` for the scalar output ``output_index``.
    solver : {"auto", "clarabel", "scs", "mosek", "sdpa", "native", "native-dense", "native-chordal", "circulant"}
        ``auto`` picks by LMI size and logs the choice. ``native`` chooses the dense or chordal layout of each LMI
        from a cost model; ``native-dense`` / ``native-chordal`` force one. ``circulant``: ``lipsdp-channel`` (l2,
        global) of a convolutional chain through its torus restriction (:mod:`lipbound.formulations.circulant`;
        feasible for the network's program, at or above its optimum), checked on the network's program.
    input_shape : int or tuple, optional
        For ``nn.Module`` inputs.
    activation : str
        Activation of weight-only files.
    output_index : int, optional
        ``norm="linf"`` only: the output row bounded (required when there are several outputs).
    coupled : bool
        ``lipsdp-nsr`` only: include the S and P multipliers (the full QC) instead of S = P = 0.
    domain : lipbound.Box or lipbound.Ball, optional
        Certify the Lipschitz constant on this region only (a local bound): rigorous pre-activation bounds
        (``bounds_method``: ``"crown"`` or ``"ibp"``) give per-neuron slope ranges (stably inactive ReLUs get
        slope 0, stably active ones 1), which replace the global ones. The region is stored in the certificate.
    polish : bool
        Re-optimise ``rho`` for the solver's multipliers before checking (never loosens the bound).
    verbose : bool
        Show the solver's own output (progress is logged at INFO on ``logging.getLogger("lipbound")`` always).
    reduce_input : bool
        l2: hand the solver the LMI with the input block reduced by a QR factorisation of the first weight
        (same optimum, smaller cone; the certificate always checks the unreduced LMI). ``False`` gives the solver
        the plain LipSDP program as the peers' code builds it (for comparisons).
    trust_code : bool
        Allow loading a whole pickled ``nn.Module`` from a ``.pt`` file (this runs code stored in the file).
    **solver_options
        Settings of the solver, checked by name and type before solving: ``tol``, ``max_iter``, ``device``,
        ``step_fraction``, ``lanczos_steps``, ``threads`` (native); Clarabel's settings (``max_iter``,
        ``tol_gap_rel``, ...); SCS's (``eps_abs``, ``max_iters``, ...). MOSEK/SDPA settings pass through.

    Returns
    -------
    Certificate
        ``certified`` is ``True`` only if the rigorous check passed; ``upper_bound`` is then sound. A solve that
        stops more than 1e-4 short of optimal is retried once with norm-product scaling levels (the better
        certificate stands), and a non-optimal SDP bound above the product bound is replaced by the product
        bound (``options["product_fallback"]``, re-checked by :func:`verify_certificate`); a converged native
        answer certified more than 1e-6 above its value is replaced by a tighter earlier iterate of the run when
        one certifies (more than 1e-4: re-solved with tightened LMIs); for a network with nonnegative weights and
        slopes in ``[0, beta]`` (l2, global, ``solver`` auto or native) the multipliers come in closed form and
        ``solver`` is ``"closed-form"``. ``notes`` say when any of this happened.

    Raises
    ------
    FormulationError
        Unknown method or norm, or a method that does not apply to the network.
    OptionError
        An option that is unknown, mistyped, out of range or meaningless for the method/norm.
    SolverError
        An unknown or unavailable solver, or a solver that failed.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> cert = lipbound.certify(lipbound.from_weights([np.eye(2), np.eye(2)]), method="lipsdp-neuron")
    >>> cert.certified, round(cert.upper_bound, 6)
    (True, 1.0)
    """
    solver_name = _check_options(method, norm, solver, output_index, coupled, domain, bounds_method,
                                 {"polish": polish, "verbose": verbose, "reduce_input": reduce_input},
                                 solver_options)
    start = time.perf_counter()
    network = as_network(model, input_shape, activation, trust_code=trust_code)
    sizes = {"dims": list(network.dims), "n_hidden": network.n_hidden}
    options = {"output_index": output_index, "coupled": coupled, "domain": domain_to_dict(domain),
               "bounds_method": bounds_method, "reduce_input": reduce_input}
    if domain is not None:
        log.info("%s: local slope ranges on the %s domain (%s)", method, type(domain).__name__, bounds_method)
    network = localise(network, domain, bounds_method)
    if method == "mp":
        bound, estimate, scaling = product_bound(network, norm, output_index)
        finite = math.isfinite(bound)
        return Certificate(bound if finite else None, finite, estimate, method, "closed-form", norm, "closed_form",
                           reason="" if finite else "the product bound overflows the float64 range",
                           time_s=time.perf_counter() - start, sizes=sizes, network=network.summary(),
                           options=options, exponents=list(scaling))
    log.info("%s: formulating the %s program", method, norm)
    timings = {"formulate_s": 0.0, "solve_s": 0.0, "check_s": 0.0}

    def build(exponents):
        tick = time.perf_counter()
        built = build_problem(network, method, norm, output_index, coupled, exponents, reduce_input=reduce_input)
        timings["formulate_s"] += time.perf_counter() - tick
        return built

    def attempt(problem, strategy=None, margins=None):
        nonlocal solver_name
        if solver_name == "auto":
            solver_name = choose_solver(problem.solve_program)
            check_solver_options(solver_name, solver_options)
        tick = time.perf_counter()
        options = dict(solver_options, strategy=strategy) if strategy else solver_options
        solved = problem.solve_program if margins is None else problem.solve_program.tightened(margins)
        result = get_solver(solver_name).solve(solved, verbose=verbose, **options)
        timings["solve_s"] += time.perf_counter() - tick
        log.info("%s: %s returned '%s' after %.2f s; rigorous check of its answer (LMI sizes %s)", method,
                 solver_name, result.status, time.perf_counter() - tick, [lmi.size for lmi in problem.program.lmis])
        return problem, result, check(problem, result.y)

    def check(problem, multipliers):
        tick = time.perf_counter()
        device = solver_options.get("device") if solver_name.startswith("native") or solver_name == "circulant" \
            else None
        # On the CPU the check follows the native solver's thread policy (numpy's BLAS included): one thread
        # for small orders (784-50-50-10's 884-row check: 28 ms on one thread, 33-75 ms on numpy's default two
        # beside torch's pool), the count the last solve measured for middle orders, all cores from the crossover.
        cpu = device is None or torch.device(device).type == "cpu"
        scope = ThreadPolicy(forced=solver_options.get("threads"), middle=last_measured()).scope(
            max(lmi.size for lmi in problem.program.lmis)) if cpu else contextlib.nullcontext()
        with scope:
            checked = certify_multipliers(problem.program, multipliers, polish=polish, device=device,
                                          solve_program=problem.solve_program)
        timings["check_s"] += time.perf_counter() - tick
        return checked

    circulant = solver_name == "circulant"
    if circulant:
        # One integer exponent per block (the torus embedding needs uniform scaling).
        tick = time.perf_counter()
        signal = channel_signal(network)
        exponents = circulant_exponents(signal)
        timings["formulate_s"] += time.perf_counter() - tick
    problem = build(exponents if circulant else None)
    closed = _closed_form(network, method, norm, solver_name, problem, check, timings) if domain is None else None
    if closed is not None:
        solver_name = "closed-form"
        result, (report, y, raw) = closed
    elif circulant:
        result = _circulant(network, problem, signal, solver_options, timings)
        report, y, raw = check(problem, result.y)
    else:
        problem, result, (report, y, raw) = attempt(problem)
    notes = list(problem.notes)
    if closed is not None:
        notes.append(f"multipliers in closed form (nonnegative weights, slopes in [0, beta]): LipSDP's optimum is "
                     f"||T|| = {result.info['all_active_norm']:.10g} for the all-active map T; no SDP solve")
    value = problem.solve_program.value(result.y)
    if _converged_out_of_reach(result, report, value, _TRAIL_REACH):
        # Earlier iterates of the run keep more of their margin (one decade of the gap more each) and are checked
        # first: a check costs a fraction of a solve (glipsdp-16x64 on 2 cores: 1.4 s against 10 s). They are tried
        # from _TRAIL_REACH on (cheap); the re-solve below only from _REACH.
        first = report
        for earlier in result.trail[:_TRAIL_CHECKS]:
            found = check(problem, earlier)
            if found[0].certified and found[0].bound <= value * (1 + _REACH) and (
                    not report.certified or found[0].bound < report.bound):
                log.info("%s: the answer's check certified %s; an earlier iterate of the run certifies %.10g", method,
                         f"{first.bound:.6g}" if first.certified else "nothing", found[0].bound)
                report, y, raw = found
                if found[0].bound <= value * (1 + _TRAIL_REACH):
                    break
        if report is not first:
            notes.append(_boundary_note(value, first, "an earlier iterate of the same run"))
    if not circulant and _converged_out_of_reach(result, report, value):
        # An interior-point answer is singular up to rounding in the directions the optimum leaves tight; when those
        # are decoupled from rho (deep chains: glipsdp-16x64 had eigenvalues of -6e-12 in its last blocks against a
        # rounding radius of 5e-10), no enlargement of rho proves the point and the repair costs orders of magnitude
        # (certified 0.19 for a value of 4.8e-11). Re-solved with every LMI tightened by twice its rounding radius
        # at the answer, the point keeps that margin everywhere (certified 4e-9 above the value).
        margins = [2.0 * float(np.max(lmi.rounding_bound(y).row_sums(), initial=0.0)) for lmi in problem.program.lmis]
        log.info("%s: the check of the solver's answer (value %.6g) %s; re-solving with the LMIs tightened by %s",
                 method, value, f"certified {report.bound:.6g}" if report.certified else "failed",
                 ", ".join(f"{v:.3g}" for v in margins))
        retry = attempt(problem, None, margins)
        rep2 = retry[2][0]
        if rep2.certified and (not report.certified or rep2.bound < report.bound):
            notes.append(_boundary_note(value, report, "a solve with every LMI tightened by twice its rounding radius"))
            problem, result, (report, y, raw) = retry
    # Retries of a solve that stopped short, the better certificate standing: (1) the native solver's other cone
    # layout, when it chose the layout itself (on an H200, 784-2048x4-10 stalled at gap 1 in the chordal layout and
    # was solved in the dense one; a 14x14 CNN with 8 channels and 4 conv layers the other way round); (2) block
    # levels from norm products alone (the searched scaling levels can be far off on deep signed nets, whose program
    # is then badly scaled). The rescaled program is skipped when its levels are the searched ones, and tried first
    # when they differ by _FAR_LEVELS powers of two or more: then the scaling is the likelier culprit (glipsdp-32x32,
    # levels 28 apart: the other layout stalled too, 20.7 s on 2 cores, before the rescaled solve reached the optimum).
    retries = []
    if not circulant and _stopped_short(result, report, problem.solve_program.value(result.y)):
        other = _other_layout(solver_name, solver_options, problem.solve_program, result)
        try:
            rescaled = build("norm")
            distance = _scaling_distance(problem.exponents, rescaled.exponents)
        except (LipboundError, ArithmeticError) as exc:
            log.warning("%s: no rescaled retry: the norm-product scaling could not be formulated (%s)", method, exc)
            rescaled, distance = None, 0.0
        scaling = [(rescaled, None, "norm-product scaling levels")] if distance > 0 else []
        layout = [] if other is None else [(None, other, f"the native solver's {other} layout")]
        retries = scaling + layout if distance >= _FAR_LEVELS else layout + scaling
        if rescaled is not None and not scaling:
            log.info("%s: the norm-product scaling levels are the searched ones; no rescaled retry", method)
    for retry_problem, strategy, what in retries:
        if not _stopped_short(result, report, problem.solve_program.value(result.y)):
            break
        log.info("%s: the solve stopped ('%s'); retrying with %s", method, result.status, what)
        retry = attempt(retry_problem or problem, strategy)
        rep2 = retry[2][0]
        if rep2.certified and (not report.certified or rep2.bound < report.bound):
            notes.append(f"a solve stopped ('{result.status}', " + (
                f"certified {report.bound:.6g}" if report.certified else "not certified") +
                f"); this certificate comes from a further solve with {what}.")
            problem, result, (report, y, raw) = retry
            notes = list(problem.notes) + notes
    sizes.update(problem.program.sizes)
    sizes["solve_lmi_sizes"] = [lmi.size for lmi in problem.solve_program.lmis]
    upper, certified, reason = report.bound, report.certified, report.reason
    if result.status != "optimal" or not certified:
        # LipSDP's optimum is never above the product bound; a solve that stopped short may be. Then the product
        # bound is the certificate (recorded in the options, so that verify_certificate re-checks it too).
        fallback = _product_fallback(network, norm, output_index, upper if certified else math.inf)
        if fallback is not None:
            mp_bound, mp_exponents = fallback
            notes.append(f"the solver stopped ('{result.status}') with " + (
                f"certified bound {upper:.6g}" if certified else f"no certified bound ({reason})") +
                f"; the product bound {mp_bound:.6g} is smaller and is reported (LipSDP's optimum is never above "
                "it).")
            options["product_fallback"] = {"exponents": list(mp_exponents)}
            upper, certified, reason = mp_bound, True, ""
    if certified:
        log.info("%s: certified %.10g (check %.2f s)", method, upper, timings["check_s"])
    else:
        log.warning("certification failed for %s/%s: %s", method, solver_name, reason)
    return Certificate(
        upper_bound=upper, certified=certified, solver_bound=problem.solve_program.value(result.y),
        method=method, solver=solver_name, norm=norm, status=result.status, reason=reason,
        time_s=time.perf_counter() - start, sizes=sizes,
        eigen_defect=max(raw.eigen_defects) if raw.eigen_defects else None,
        delta=max(report.deltas) if report.deltas else None,
        repair_weight=max(report.repair_weights) if report.repair_weights else None,
        deltas=[float(d) for d in report.deltas],
        multipliers=[float(v) for v in y], exponents=list(problem.exponents), network=network.summary(),
        timings=timings, options=options, notes=notes, solver_info=_jsonable(result.info))


#: The closed-form multipliers stand when their certificate is within this relative distance of ``||T||`` (a lower
#: bound on LipSDP's optimum): then they are the optimum to that accuracy, and no solver could do better.
_CLOSED_FORM_GAP = 1e-7


def _closed_form(network, method: str, norm: str, solver_name: str, problem, check, timings: dict):
    """LipSDP-Neuron (l2) of a network with nonnegative weights and slopes in ``[0, beta]``: the optimal
    multipliers in closed form (:mod:`lipbound.formulations.monotone`), checked; ``(SolveResult, check)`` when
    they certify within ``_CLOSED_FORM_GAP`` of their lower bound, else ``None`` (the solver runs). Only for the
    default solvers (``auto``, ``native``): a named solver or layout is run as asked."""
    if method != "lipsdp-neuron" or norm != "l2" or solver_name not in ("auto", "native"):
        return None
    weights = getattr(network, "weights", None)
    if weights is not None and any(np.any(np.asarray(w) < 0) for w in weights):
        return None  # signed: not even the signal model is needed (0.17 s for a 784-2048x4-10 net)
    from lipbound.formulations.lipsdp import _signal
    from lipbound.formulations.monotone import stationary_multipliers
    from lipbound.solvers.base import SolveResult

    tick = time.perf_counter()
    try:
        found = stationary_multipliers(problem, _signal(network))
    except (LipboundError, ArithmeticError, ValueError) as exc:
        log.info("%s: no closed-form multipliers (%s)", method, exc)
        return None
    finally:
        timings["solve_s"] += time.perf_counter() - tick
    if found is None:
        return None
    y, lower = found
    checked = check(problem, y)
    report = checked[0]
    if not (report.certified and math.isfinite(lower) and report.bound <= lower * (1 + _CLOSED_FORM_GAP)):
        log.info("%s: the closed-form multipliers certified %s against ||T|| = %.10g; solving instead", method,
                 f"{report.bound:.10g}" if report.certified else "nothing", lower)
        return None
    log.info("%s: closed-form multipliers (nonnegative network) certified %.10g, ||T|| = %.10g", method,
             report.bound, lower)
    info = {"all_active_norm": lower, "relative_gap": report.bound / lower - 1 if lower > 0 else math.inf}
    return SolveResult(checked[1], "optimal", "closed-form", time.perf_counter() - tick, info), checked


def _circulant(network, problem, signal, solver_options: dict, timings: dict):
    """The torus restriction of ``problem`` (:mod:`lipbound.formulations.circulant`) solved by its interior-point
    method (:mod:`lipbound.solvers.circulant`); the multipliers are checked on ``problem`` by the caller."""
    from lipbound.formulations.circulant import circulant_chain
    from lipbound.solvers.circulant import solve_circulant

    tick = time.perf_counter()
    chain = circulant_chain(network, problem, signal)
    timings["formulate_s"] += time.perf_counter() - tick
    tick = time.perf_counter()
    result = solve_circulant(chain, **solver_options)
    timings["solve_s"] += time.perf_counter() - tick
    log.info("lipsdp-channel: circulant returned '%s' after %.2f s (%d iterations, %d frequencies of %d rows); "
             "rigorous check on the network's program (LMI sizes %s)", result.status, result.time_s,
             result.info["iterations"], result.info["frequencies"], result.info["block_size"],
             [lmi.size for lmi in problem.program.lmis])
    return result


#: Scalings whose levels differ by this many powers of two (somewhere) count as far apart (see certify's retries).
_FAR_LEVELS = 8


def _scaling_distance(a, b) -> float:
    """Largest difference, in powers of two, between the levels of two scalings ``(e_in, E_1, ..., e_out)`` (entries
    as in :func:`~lipbound.formulations.lipschitz_problem`: ints, per-neuron lists, or exponent/factor dicts);
    ``inf`` when they are not comparable."""
    def levels(entry) -> np.ndarray:
        if isinstance(entry, dict):
            return np.asarray(entry["exponents"], dtype=float) + np.log2(np.asarray(entry["factors"], dtype=float))
        return np.asarray(entry, dtype=float).reshape(-1)

    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, z in zip(a, b, strict=True):
        try:
            diff = np.abs(levels(x) - levels(z))
        except (KeyError, TypeError, ValueError):
            return math.inf
        worst = max(worst, float(np.max(diff, initial=0.0)))
    return worst


def _stopped_short(result, report, solver_value: float) -> bool:
    """Whether a solve is worth retrying: not optimal and either uncertified, or its relative gap above 1e-4, or
    its certified bound more than 1e-4 above the solver's value (a point the repair had to move far). A solve that
    stopped at its last digits (gap 1.7e-9, certified 3e-5 above its value) is not retried."""
    if result.status == "optimal":
        return False
    if not report.certified:
        return True
    gap = result.info.get("gap")
    if isinstance(gap, (int, float)) and not gap <= 1e-4:
        return True
    return not report.bound <= abs(solver_value) * (1 + 1e-4)


#: Relative gap at or below which a solve counts as converged, and relative excess of its certified bound over its
#: value above which it is repeated with tightened LMIs (see certify). The excess is a cost, not a soundness matter:
#: glipsdp-32x32 certified 1.9e-6 above its value, and a tightened solve (10 s more on 2 cores) did no better.
_CONVERGED_GAP, _REACH = 1e-6, 1e-4
#: Relative excess above which the earlier iterates of a converged run are checked too (a check each, no solve).
_TRAIL_REACH = 1e-6
#: Earlier iterates of a converged run checked before a re-solve with tightened LMIs (most accurate first).
_TRAIL_CHECKS = 3


def _boundary_note(value: float, report, source: str) -> str:
    return (f"the solver's answer (value {value:.10g}) was too close to the boundary of the LMI for its check to "
            "reach its value (" + (f"certified {report.bound:.10g}" if report.certified else "not certified") +
            f"); this certificate comes from {source}.")


def _converged_out_of_reach(result, report, solver_value: float, reach: float | None = None) -> bool:
    """Whether a solve converged (a reported gap of at most ``_CONVERGED_GAP``: the native solver) but its
    certificate is missing or more than ``reach`` (default ``_REACH``) relative above its value: the answer is too
    close to the LMI's boundary for the rounding radius."""
    gap = result.info.get("gap")
    if not isinstance(gap, (int, float)) or not gap <= _CONVERGED_GAP or not solver_value > 0:
        return False
    reach = _REACH if reach is None else reach
    return not report.certified or not report.bound <= solver_value * (1 + reach)


def _other_layout(solver_name: str, solver_options: dict, program, result) -> str | None:
    """The native layout a retry should use (``"dense"`` or ``"chordal"``), or None: only when the native solver
    chose the layouts itself and the program has an LMI with a chordal layout."""
    if solver_name != "native" or solver_options.get("strategy", "auto") != "auto":
        return None
    from lipbound.solvers.native import choose_layout

    if not any(choose_layout(lmi, "chordal").nb > 1 for lmi in program.lmis):
        return None
    return "dense" if "chordal" in str(result.info.get("strategy", "")) else "chordal"


def _product_fallback(network, norm: str, output_index, than: float):
    """``(bound, exponents)`` of the product bound when it is finite and smaller than ``than``, else None.

    In l2 its estimate comes first: the rigorous bound is at least the estimate (up to rounding, covered by a margin
    of 1e-6), so an estimate above ``than`` means no fallback without proving any norm (784-4096x4-10 on an H200
    host: 13.5 s of proofs for a product bound of 27.1 against a certificate of 5.23)."""
    try:
        if norm == "l2" and math.isfinite(than):
            estimate = product_estimate(network, output_index)
            if estimate is not None and estimate >= than * (1 + 1e-6):
                log.info("the product bound's estimate %.6g is above the certificate %.6g: no fallback", estimate, than)
                return None
        bound, _, exponents = product_bound(network, norm, output_index)
    except (LipboundError, ArithmeticError) as exc:
        log.info("no product bound to fall back on: %s", exc)
        return None
    return (bound, exponents) if math.isfinite(bound) and bound < than else None


def _jsonable(info: dict) -> dict:
    """The entries of a solver's ``info`` that JSON holds as they are: scalars and lists of numbers."""
    def plain(v) -> bool:
        return isinstance(v, (int, float, str, bool, type(None)))

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in info.items()
            if plain(v) or (isinstance(v, (list, tuple)) and all(isinstance(e, (int, float)) for e in v))}


@dataclass(frozen=True)
class Verification:
    """Outcome of :func:`verify_certificate`: ``valid`` and, when it is not, the ``reason``."""

    valid: bool
    recomputed_bound: float | None
    reason: str = ""


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _real_list(value, what: str, *, integers: bool = False) -> str:
    """Why ``value`` is not a list of finite reals (integers), or ``""``."""
    if not isinstance(value, (list, tuple)):
        return f"{what} must be a list, got {type(value).__name__}"
    kind = numbers.Integral if integers else numbers.Real
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, kind):
            return f"{what}[{i}] must be {'an integer' if integers else 'a real number'}, got {v!r}"
        if not integers and not math.isfinite(v):
            return f"{what}[{i}] is not finite ({v!r})"
    return ""


def _exponents_problem(value) -> str:
    """Why ``value`` is not a list of scaling entries (an integer, a list of integers, or ``{"exponents": [...],
    "factors": [...]}`` per block, integers within +-_MAX_EXPONENT), or ``""``. Sizes are checked against the
    network when the program is rebuilt."""
    if not isinstance(value, (list, tuple)):
        return f"exponents must be a list, got {type(value).__name__}"
    for i, e in enumerate(value):
        what = f"exponents[{i}]"
        if isinstance(e, dict):
            if set(e) != {"exponents", "factors"}:
                return f"{what} must be {{'exponents': [...], 'factors': [...]}}, got keys {sorted(map(str, e))}"
            problem = _real_list(e["exponents"], what + "['exponents']", integers=True) or \
                _real_list(e["factors"], what + "['factors']")
            ints = e["exponents"]
        elif isinstance(e, (list, tuple)):
            problem, ints = _real_list(e, what, integers=True), e
        elif isinstance(e, bool) or not isinstance(e, numbers.Integral):
            return f"{what} must be an integer, a list of integers or a dict, got {e!r}"
        else:
            problem, ints = "", [e]
        if problem:
            return problem
        if any(abs(v) > _MAX_EXPONENT for v in ints):
            return f"{what}: scaling exponents out of range (|e| <= {_MAX_EXPONENT})"
    return ""


def _parse_certificate(certificate) -> tuple[Certificate | None, str]:
    """The certificate as a :class:`Certificate` whose fields have the types the check needs, or the reason why
    it is not one. Accepts a Certificate, its ``to_dict()`` or its JSON text."""
    if isinstance(certificate, str):
        try:
            certificate = json.loads(certificate)
        except ValueError as exc:
            return None, f"the certificate is not valid JSON ({exc})"
    if isinstance(certificate, dict):
        known = {f.name for f in fields(Certificate)}
        unknown = sorted(set(certificate) - known, key=str)
        if unknown:
            return None, f"unknown certificate field(s): {', '.join(map(str, unknown))}"
        missing = [f.name for f in fields(Certificate) if f.default is MISSING and f.default_factory is MISSING
                   and f.name not in certificate]
        if missing:
            return None, f"missing certificate field(s): {', '.join(missing)}"
        certificate = Certificate(**certificate)
    if not isinstance(certificate, Certificate):
        return None, f"expected a lipbound.Certificate, its dict or JSON, got {type(certificate).__name__}"
    c = certificate
    if c.certified is not True:
        return None, "the certificate does not claim a certified bound"
    if not _is_real(c.upper_bound) or not math.isfinite(c.upper_bound):
        return None, f"the claimed bound {c.upper_bound!r} is not a finite number"
    if not isinstance(c.method, str) or c.method not in METHODS:
        return None, f"unknown method {c.method!r}"
    if not isinstance(c.norm, str) or c.norm not in NORMS:
        return None, f"unknown norm {c.norm!r}"
    opts = c.options if c.options is not None else {}
    if not isinstance(opts, dict):
        return None, f"options must be a dict, got {type(opts).__name__}"
    index = opts.get("output_index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, numbers.Integral)):
        return None, f"output_index must be an integer or null, got {index!r}"
    if index is not None and c.norm != "linf":
        return None, f"output_index applies to norm 'linf' only, the certificate is for {c.norm!r}"
    if not isinstance(opts.get("coupled", False), bool):
        return None, f"coupled must be true or false, got {opts.get('coupled')!r}"
    if opts.get("bounds_method", "crown") not in _BOUNDS_METHODS:
        return None, f"unknown bounds_method {opts.get('bounds_method')!r}"
    if c.method != "mp":
        problem = (_real_list(c.multipliers, "multipliers") or _exponents_problem(c.exponents)
                   or _real_list(c.deltas if c.deltas is not None else [], "deltas"))
        if problem:
            return None, problem
        if any(d < 0 for d in c.deltas or []):
            return None, "deltas must be >= 0"
    return c, ""


def verify_certificate(certificate, model, input_shape=None, activation: str = "relu") -> Verification:
    """Re-check a (possibly saved) certificate against a network from scratch. Never raises.

    The program is rebuilt from the network and the stored scaling exponents; the stored
    multipliers are checked rigorously; the certificate is valid iff the recomputed certified bound
    is finite and ``<= certificate.upper_bound``. Nothing stored besides the multipliers, the
    exponents and the claimed bound is trusted. A certificate that does not fit the network (other sizes, a
    domain of another dimension, another number of multipliers), a corrupted one (wrong types or lengths, NaN,
    an unknown method) and a model that cannot be imported all give ``valid=False`` with the ``reason``.

    Parameters
    ----------
    certificate : Certificate, dict (``Certificate.to_dict()``) or str (its JSON)
    model : Network, nn.Module or path
    input_shape, activation : as for :func:`certify`

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.eye(2), np.eye(2)])
    >>> lipbound.verify_certificate(lipbound.certify(net), net).valid
    True
    >>> lipbound.verify_certificate({"certified": True}, net).reason
    'missing certificate field(s): upper_bound, solver_bound, method, solver, norm, status'
    """
    try:
        cert, problem = _parse_certificate(certificate)
    except (TypeError, ValueError) as exc:  # e.g. a dict whose keys are not strings
        return Verification(False, None, f"malformed certificate ({type(exc).__name__}: {exc})")
    if cert is None:
        return Verification(False, None, problem)
    # A certificate that cannot be checked is not valid: every failure below becomes the reason.
    try:
        network = as_network(model, input_shape, activation)
    except Exception as exc:
        return Verification(False, None, f"could not build the network to check against ({type(exc).__name__}: "
                                         f"{exc})")
    try:
        return _verify(cert, network)
    except Exception as exc:
        log.info("verify_certificate: %s: %s", type(exc).__name__, exc)
        return Verification(False, None, f"the certificate does not fit this network ({type(exc).__name__}: "
                                         f"{exc})")


def _verify(cert: Certificate, network: Network) -> Verification:
    dims = cert.sizes.get("dims") if isinstance(cert.sizes, dict) else None
    if dims is not None and list(dims) != list(network.dims):
        return Verification(False, None, f"the certificate is for a network with layer sizes {list(dims)}, this "
                                         f"network has {list(network.dims)}")
    opts = cert.options or {}
    network = localise(network, domain_from_dict(opts.get("domain")), opts.get("bounds_method", "crown"))
    if cert.method == "mp":
        bound, _, _ = product_bound(network, cert.norm, opts.get("output_index"), tuple(cert.exponents) or None)
    else:
        problem = build_problem(network, cert.method, cert.norm, opts.get("output_index"),
                                bool(opts.get("coupled", False)), tuple(cert.exponents))
        report = check_program(problem.program, np.asarray(cert.multipliers, dtype=np.float64),
                               delta_hints=tuple(float(d) for d in cert.deltas) or None)
        fallback = opts.get("product_fallback")
        if isinstance(fallback, dict):  # the product bound was smaller than what the solve reached
            problem_text = _exponents_problem(fallback.get("exponents"))
            if problem_text:
                return Verification(False, None, f"product_fallback: {problem_text}")
            mp, _, _ = product_bound(network, cert.norm, opts.get("output_index"),
                                     tuple(fallback["exponents"]) or None)
            bound = min(mp, report.bound) if report.certified else mp
        elif not report.certified:
            return Verification(False, None, report.reason)
        else:
            bound = report.bound
    if bound <= cert.upper_bound:
        return Verification(True, bound)
    return Verification(False, bound, f"recomputed certified bound {bound!r} exceeds the claimed "
                                      f"{cert.upper_bound!r}")


def certify_all(model, methods=None, solver: str = "auto", progress: Progress | None = None,
                **kwargs) -> list[Certificate]:
    """Run several methods on one network; one :class:`Certificate` per method, in order.

    ``methods=None`` runs every method that applies (:func:`plan_methods`); the others appear with status
    ``"skipped"`` and the reason, as do planned methods that turn out not to apply (e.g. ``mp`` on a
    non-contractive implicit layer). A method whose solver fails yields an uncertified entry with the reason.
    Options are validated once, before the first method runs. ``coupled=True`` goes to ``lipsdp-nsr`` only.
    ``progress(done, total, method)`` is called before each method and once at the end.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> certs = certify_all(lipbound.from_weights([np.eye(2), np.eye(2)]))
    >>> [(c.method, c.status) for c in certs]  # doctest: +NORMALIZE_WHITESPACE
    [('mp', 'closed_form'), ('lipsdp-layer', 'optimal'), ('lipsdp-channel', 'skipped'),
     ('lipsdp-neuron', 'optimal'), ('lipsdp-nsr', 'optimal'), ('lipsdp-rr', 'optimal')]
    """
    network = as_network(model, kwargs.pop("input_shape", None), kwargs.pop("activation", "relu"),
                         trust_code=kwargs.pop("trust_code", False))
    norm = kwargs.get("norm", "l2")
    coupled = kwargs.pop("coupled", False)
    if methods is None:
        plan = plan_methods(network)
        run, skipped = list(plan.run), dict(plan.skipped)
    else:
        run, skipped = list(methods), {}
    if coupled and "lipsdp-nsr" not in run:
        why = f" ({skipped['lipsdp-nsr']})" if "lipsdp-nsr" in skipped else ""
        raise OptionError(f"coupled=True applies to lipsdp-nsr only, which does not run here{why}.")
    solver_options = {k: v for k, v in kwargs.items() if k not in _CERTIFY_KEYWORDS}
    for method in run:
        _check_options(method, norm, solver, kwargs.get("output_index"), coupled and method == "lipsdp-nsr",
                       kwargs.get("domain"), kwargs.get("bounds_method", "crown"),
                       {k: kwargs[k] for k in ("polish", "verbose", "reduce_input") if k in kwargs}, solver_options)
    results: dict[str, Certificate] = {}
    for i, method in enumerate(run):
        if progress is not None:
            progress(i, len(run), method)
        try:
            results[method] = certify(network, method=method, solver=solver,
                                      coupled=coupled and method == "lipsdp-nsr", **kwargs)
        except SolverError as exc:
            results[method] = Certificate(None, False, None, method, solver, norm, "solver_error", reason=str(exc),
                                          network=network.summary())
        except FormulationError as exc:
            if methods is not None:
                raise
            skipped[method] = str(exc)
    if progress is not None:
        progress(len(run), len(run), "done")
    out = []
    for method in METHODS if methods is None else run:
        if method in results:
            out.append(results[method])
        elif method in skipped:
            log.info("%s skipped: %s", method, skipped[method])
            out.append(Certificate(None, False, None, method, "-", norm, "skipped", reason=skipped[method],
                                   network=network.summary()))
    return out
