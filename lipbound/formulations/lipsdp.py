"""LipSDP-Neuron and LipSDP-Layer (Fazlyab et al., NeurIPS 2019) for slope-restricted activations.

For ``x_k = phi(W_{k-1} x_{k-1} + b)``, ``k = 1..l``, output ``W_l x_l``, with slopes of neuron ``i``
of layer ``k`` in ``[alpha_i, beta_i]``, the LMI in the signal ``v = [dx_0; dx_1; ...; dx_l]`` is

    sum_k QC_k(lambda_k) - rho E_0^T E_0 + E_l^T W_l^T W_l E_l  <=  0,

where ``QC_k`` is ``[dz; dx]^T [[-2 ab T, (a+b) T], [(a+b) T, -2 T]] [dz; dx]`` with ``dz = W_{k-1}
dx_{k-1}``, ``T = diag(lambda_k)`` (neuron) or ``lambda_k I`` (layer), ``lambda >= 0``. The LMI is
block tridiagonal; multiplier ``lambda_i`` enters through a rank-2 term. ``L = sqrt(rho)``.

Two exact transformations keep it well conditioned and small:

* **Power-of-two scaling.** ``W'_k = 2^{-e_k} W_k`` with ``2^{e_k} ~ ||W_k||``. The LMI of the scaled
  weights is the original LMI under the diagonal congruence ``diag(c_k I)`` with ``c_k = 2^{e_0+..+e_{k-1}}``
  and multipliers ``lambda' = c_k^2 lambda`` (valid for any activation, homogeneous or not), so
  ``L = 2^{sum e_k} L'``. Scaling by powers of two is exact in floating point.
* **QR input reduction** (solver side only). With ``W'_0^T = Q R`` (thin QR), the input block
  ``-rho I + W_0^T (.) W_0`` reduces to ``-rho I + R (.) R^T`` of size ``rank``: the eigenvalues of
  the full LMI are those of the reduced one plus ``-rho`` (``rho >= 0``). The certificate is always
  checked on the *unreduced* LMI, so the reduction's rounding never enters the certified bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import scipy.sparse as sp

from lipbound.errors import FormulationError
from lipbound.network import Network, SlopeRestricted
from lipbound.program import LMI, UNIT_ROUNDOFF, Program, Term, gamma
from lipbound.rigorous import exact_sum, round_up, spectral_norm_upper, sqrt_up

FORMS = ("neuron", "layer")


@dataclass(frozen=True, eq=False)
class LipSDPProblem:
    """The programs of one LipSDP instance.

    Attributes
    ----------
    program : Program
        The unreduced program; certificates are checked on it.
    solve_program : Program
        The (QR-reduced) program handed to solvers; it has the same variables as ``program``.
    exponents : tuple of int
        Power-of-two scaling exponents ``e_k`` per weight matrix.
    """

    program: Program
    solve_program: Program
    exponents: tuple[int, ...]
    form: str


def _check_slope_network(network: Network, method: str) -> list[SlopeRestricted]:
    acts = list(network.activations)
    bad = [(a.name, type(a).__name__) for a in acts if getattr(a, "qc", None) != "slope"]
    if bad:
        listing = ", ".join(f"{n} ({t})" for n, t in bad)
        raise FormulationError(f"{method} needs slope-restricted activations; not applicable to: {listing}.")
    return acts


def scaling_exponents(weights: list[np.ndarray]) -> tuple[int, ...]:
    """Exponents ``e_k = round(log2 ||W_k||_2)`` (0 for a zero matrix)."""
    out = []
    for w in weights:
        s = float(np.linalg.norm(w, 2)) if w.size else 0.0
        out.append(int(np.round(np.log2(s))) if s > 0 else 0)
    return tuple(out)


def _scaled(w: np.ndarray, e: int, index: int) -> np.ndarray:
    ws = np.ldexp(w, -e)
    if not np.array_equal(np.ldexp(ws, e), w):
        raise FormulationError(f"power-of-two scaling of weight {index} by 2^{-e} is not exact "
                               "(subnormal entries); pass exponents=0 for this layer.")
    return ws


def _selection(n_rows: int, var_index: np.ndarray, values: np.ndarray, n_vars: int) -> sp.csr_matrix:
    return sp.csr_matrix((values, (np.arange(n_rows), var_index)), shape=(n_rows, n_vars))


def merge_linear_layers(weights: list[np.ndarray], acts: list[SlopeRestricted]):
    """Fold activation layers with ``alpha == beta`` (exactly linear: ``x = a * z``) into the weights.

    LipSDP's multiplier for such a neuron would have to tend to infinity (its QC is an equality),
    so they are eliminated instead: ``W_{k+1} diag(a) W_k`` is computed in floating point together with
    an entrywise bound ``E`` on its distance to the exact product (``gamma_{n+3} |A| |B| + (1+4u) |A| E_B``,
    Higham Ch. 3), which the certificate's rounding radius absorbs.

    Returns ``(weights, errors, kept_activations)``; ``errors[k]`` is ``None`` for exact matrices.
    """
    ws: list[np.ndarray] = [weights[0]]
    errs: list[np.ndarray | None] = [None]
    kept: list[SlopeRestricted] = []
    for k, act in enumerate(acts):
        nxt = weights[k + 1]
        if not np.array_equal(act.alpha, act.beta):
            kept.append(act)
            ws.append(nxt)
            errs.append(None)
            continue
        a_hat = nxt * act.alpha
        b_hat, e_b = ws[-1], errs[-1]
        a_abs = np.abs(a_hat)
        err = gamma(b_hat.shape[0] + 3) * (a_abs @ np.abs(b_hat))
        if not np.all(act.alpha == 1.0):
            err = err + 2 * UNIT_ROUNDOFF * (a_abs @ np.abs(b_hat))
        if e_b is not None:
            err = err + (1 + 4 * UNIT_ROUNDOFF) * (a_abs @ e_b)
        ws[-1] = a_hat @ b_hat
        errs[-1] = err * (1 + 1e-12) + np.finfo(float).tiny
    return ws, errs, kept


def lipsdp(network: Network, form: str = "neuron", exponents: tuple[int, ...] | None = None,
           reduce_input: bool = True) -> LipSDPProblem:
    """Build the LipSDP-Neuron or LipSDP-Layer program of a network (l2 norm, whole output).

    Exactly linear activation layers (``alpha == beta``, e.g. identities inserted between two
    ``Linear`` layers) are folded into the weights first (:func:`merge_linear_layers`).

    Parameters
    ----------
    network : Network
        Affine layers and slope-restricted activations.
    form : {"neuron", "layer"}
    exponents : tuple of int, optional
        Power-of-two scaling exponents, one per (merged) weight matrix (recomputed when omitted;
        certificates store them).
    reduce_input : bool
        Apply the exact QR input reduction to the program handed to solvers.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.eye(2), np.eye(2)], activation="relu")
    >>> lipsdp(net).program.sizes
    {'n_vars': 3, 'lmi_sizes': [4]}
    """
    if form not in FORMS:
        raise FormulationError(f"unknown LipSDP form {form!r}; use one of {FORMS}.")
    weights, errors, acts = merge_linear_layers(network.weights, _check_slope_network(network, f"lipsdp-{form}"))
    if exponents is None:
        exponents = scaling_exponents(weights)
    exponents = tuple(int(e) for e in exponents)
    if len(exponents) != len(weights):
        raise FormulationError(f"got {len(exponents)} scaling exponents for {len(weights)} weight matrices.")
    ws = [_scaled(w, e, i) for i, (w, e) in enumerate(zip(weights, exponents, strict=True))]
    es = [None if err is None else np.ldexp(err, -e) for err, e in zip(errors, exponents, strict=True)]
    widths = [a.width for a in acts]
    n_lambda = sum(widths) if form == "neuron" else len(widths)
    n_vars = 1 + n_lambda
    nonneg = np.ones(n_vars, dtype=bool)
    objective = np.zeros(n_vars)
    objective[0] = 1.0
    variables = [("rho", slice(0, 1))]

    def build(first_left: np.ndarray, first_err: np.ndarray | None, n_first: int) -> LMI:
        blocks = [n_first] + widths
        terms = [Term(0, 0, None, None, _selection(n_first, np.zeros(n_first, int), -np.ones(n_first), n_vars),
                      coef_ops=0)]
        offset = 1
        for k, act in enumerate(acts, start=1):
            n = act.width
            var = offset + (np.arange(n) if form == "neuron" else np.zeros(n, int))
            left, lerr = (first_left, first_err) if k == 1 else (ws[k - 1].T, _t(es[k - 1]))
            ab = act.alpha * act.beta
            if np.any(ab != 0):
                terms.append(Term(k - 1, k - 1, left, left, _selection(n, var, -2.0 * ab, n_vars),
                                  left_err=lerr, right_err=lerr))
            s = act.alpha + act.beta
            if np.any(s != 0):
                terms.append(Term(k - 1, k, left, None, _selection(n, var, s, n_vars), left_err=lerr))
            terms.append(Term(k, k, None, None, _selection(n, var, np.full(n, -2.0), n_vars), coef_ops=0))
            offset += n if form == "neuron" else 1
        last_left, last_err = (first_left, first_err) if not acts else (ws[-1].T, _t(es[-1]))
        m = last_left.shape[1]
        terms.append(Term(len(acts), len(acts), last_left, last_left, sp.csr_matrix((m, n_vars)),
                          const=np.ones(m), coef_ops=0, left_err=last_err, right_err=last_err))
        return LMI(tuple(blocks), tuple(terms), name=f"lipsdp-{form}")

    offset = 1
    for k, n in enumerate(widths, start=1):
        size = n if form == "neuron" else 1
        variables.append((f"lambda_{k}", slice(offset, offset + size)))
        offset += size

    first = ws[0].T
    full_lmi = build(first, _t(es[0]), network.input_dim)
    if reduce_input and first.shape[0] > first.shape[1]:
        r_factor = np.linalg.qr(first, mode="r")
        solve_lmi = build(np.ascontiguousarray(r_factor), None, r_factor.shape[0])
    else:
        solve_lmi = full_lmi

    # Repair weight: ||v||^2 <= B ||dx_0||^2 for the scaled signals (see lipbound.certificate).
    slope_max = [float(np.max(np.maximum(np.abs(a.alpha), np.abs(a.beta)))) for a in acts]
    total, gain = Fraction(1), Fraction(1)
    for k in range(len(acts)):
        gain *= Fraction(round_up(Fraction(slope_max[k]) * Fraction(_norm_upper(ws[k], es[k])))) ** 2
        total += gain
    repair = round_up(total)
    scale = float(np.ldexp(1.0, sum(exponents)))

    def program(lmi: LMI) -> Program:
        return Program((lmi,), n_vars, objective, nonneg, (repair,), "sqrt", scale, rho_index=0, rho_block=0,
                       variables=tuple(variables), name=f"lipsdp-{form}")

    return LipSDPProblem(program(full_lmi), program(solve_lmi), exponents, form)


def _t(err: np.ndarray | None) -> np.ndarray | None:
    return None if err is None else err.T


def _norm_upper(w: np.ndarray, err: np.ndarray | None) -> float:
    """Rigorous bound on ||W + E||_2 for all |E| <= err: ||W^||_2 + ||err||_F."""
    bound = Fraction(spectral_norm_upper(w))
    if err is not None:
        bound += Fraction(sqrt_up(exact_sum((err * err).ravel()) * (1 + Fraction(2 * (err.size + 2), 2**53))))
    return round_up(bound)


def product_bound(network: Network) -> tuple[float, float]:
    """Matrix-product bound ``prod_k s_k ||W_k||_2`` (s_k: largest |slope| of layer k).

    Exactly linear layers are folded first, as in :func:`lipsdp`.

    Returns ``(certified, estimate)``: a rigorous upper bound from certified spectral norms, and the
    plain floating-point product.
    """
    acts = network.activations
    bad = [(a.name, type(a).__name__) for a in acts if getattr(a, "qc", None) != "slope"]
    if bad:
        raise FormulationError("mp for non-slope layers is provided by their own formulation: "
                               + ", ".join(f"{n} ({t})" for n, t in bad))
    weights, errors, kept = merge_linear_layers(network.weights, list(acts))
    cert, est = Fraction(1), 1.0
    for k, (w, err) in enumerate(zip(weights, errors, strict=True)):
        s = 1.0 if k == 0 else float(np.max(np.maximum(np.abs(kept[k - 1].alpha), np.abs(kept[k - 1].beta))))
        cert *= Fraction(_norm_upper(w, err)) * Fraction(s)
        est *= float(np.linalg.norm(w, 2)) * s
    return round_up(cert), est
