"""Assemble the l2 and l-infinity Lipschitz LMIs of a :class:`~lipbound.formulations.signal.SignalModel`.

**l2** (LipSDP, Fazlyab et al. 2019; NSR, Pauli et al. 2024): with ``v = [dx; dphi_1; ...; dphi_m]``,

    sum_k QC_k(z_k, phi_k) - rho ||dx||^2 + ||y||^2  <=  0      =>   L_2 <= sqrt(rho).

**l-infinity** for a scalar output ``c^T y`` (GeoLIP-style; Wang et al. 2022, QC paper Thms 2-3), with an
extra 1x1 block ``t``:

    [[1^T tau - 2 rho, c^T C v], [., sum_k QC_k - diag(tau) on dx]]  <=  0   =>  |c^T dy| <= rho ||dx||_inf.

(For ``w = [1; v]`` with ``||dx||_inf <= 1``: ``2 c^T dy <= 2 rho - (1^T tau - dx^T diag(tau) dx) - QC <= 2 rho``.)

**Exact scaling.** Each block's signal is divided by a power of two (``dphi_k' = dphi_k / 2^{e_k}``) and the
output by ``2^{e_out}``; coefficient matrices become ``P_kb 2^{e_b - e_k}``, which is exact. The LMI of the
scaled signals is a congruence of the original (QCs are invariant under scaling both ``z_k`` and ``phi_k``
by the same factor, with multipliers scaled by its square), so the bound is ``2^{e_out}`` times the scaled one.

**Splitting.** Blocks that no term couples form separate LMIs (e.g. the decoupled NSR chain, S = P = 0, is a
chain of layer-sized LMIs); the certificate's repair then uses one norm bound per LMI.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import scipy.sparse as sp

from lipbound.errors import FormulationError
from lipbound.formulations import qcs
from lipbound.formulations.scaling import choose_exponents, slope_exponents
from lipbound.formulations.signal import Lin, SignalModel, SignalStage, lmul, lmul_inexact, rescaled
from lipbound.network import GroupSortLayer, HouseholderLayer, SlopeRestricted, max_slope
from lipbound.program import LMI, DeferredWeights, Program, Term
from lipbound.rigorous import frobenius_bound, next_down, next_up, round_up, spectral_norm_bound, spectral_norm_estimate


@dataclass(frozen=True, eq=False)
class LipschitzProblem:
    """The programs of one Lipschitz SDP.

    ``program`` is checked by the certificate (unreduced); ``solve_program`` (same variables) goes to
    solvers (QR-reduced input block for l2). ``exponents`` are the power-of-two scaling exponents
    ``(e_in, e_1, ..., e_m, e_out)``.
    """

    program: Program
    solve_program: Program
    exponents: tuple[int, ...]
    norm: str
    notes: tuple[str, ...] = ()


def _norm_upper(lin: Lin, n: int) -> Fraction:
    if lin.mat is None:
        return Fraction(2) ** lin.power
    bound = spectral_norm_bound(lin.mat)
    if lin.err is not None:
        bound += frobenius_bound(lin.err)
    return bound * Fraction(2) ** lin.power


def _norm_estimate(lin: Lin, n: int) -> Fraction:
    """Floating-point estimate of the map's norm (error bounds left out), exact powers of two kept apart."""
    if lin.mat is None:
        return Fraction(2) ** lin.power
    return Fraction(spectral_norm_estimate(lin.mat)) * Fraction(2) ** lin.power


def _map_norm(model: SignalModel, b: int, lin: Lin, norm=_norm_upper) -> Fraction:
    """Rigorous norm of the map from block ``b``'s signal (for block 0: from ``dx``, through ``W_in``, as one
    product so that a balanced split of ``W_in`` costs nothing); ``norm=_norm_estimate``: its estimate."""
    if b == 0:
        lin = lmul_inexact(lin, model.input_map, None)
    return norm(lin, model.coefficient_dim(b))


def _signal_gains(model: SignalModel, norm=_norm_upper) -> list[Fraction | None]:
    """Rigorous upper bounds ``g_b >= ||v_b|| / ||dx||`` (Fractions; None past a non-contractive self-loop), or
    their estimates with ``norm=_norm_estimate``."""
    gains: list[Fraction | None] = [Fraction(1)]
    for k, stage in enumerate(model.stages, start=1):
        s = Fraction(max_slope(stage.layer))
        total, self_gain = Fraction(0), None
        for b, lin in stage.pre.items():
            if b == k:
                self_gain = norm(lin, stage.width)
                continue
            total += _map_norm(model, b, lin, norm) * gains[b]
        if self_gain is not None:
            contraction = s * self_gain
            gains.append(s * total / (1 - contraction) if contraction < 1 else None)
        else:
            gains.append(s * total)
        if gains[-1] is None:
            break
    return gains


def _expand_exponents(exponents, model: SignalModel) -> tuple[int, list[tuple[np.ndarray, np.ndarray | None]], int]:
    """Validate ``(e_in, E_1, ..., E_m, e_out)`` into per-neuron ``(exponents, factors)`` of every stage.

    ``E_k`` is an int (factor ``2^E_k`` for the block), a sequence of ints (one power of two per neuron) or
    ``{"exponents": [...], "factors": [...]}`` (factor ``f_i 2^e_i`` per neuron, ``f_i`` a positive float).
    Factors must be equal within every GroupSort/Householder group (other scalings would break those QCs). They
    are split exactly into a power of two and a mantissa in ``[1, 2)``.
    """
    m = len(model.stages)
    exponents = tuple(exponents)
    if len(exponents) != m + 2:
        raise FormulationError(f"expected {m + 2} scaling exponents (input, one per stage, output), got "
                               f"{len(exponents)}.")
    blocks = []
    for k, (e, stage) in enumerate(zip(exponents[1:m + 1], model.stages, strict=True), start=1):
        what = f"scaling of stage {k} ('{stage.name}')"
        if isinstance(e, dict):
            if set(e) != {"exponents", "factors"}:
                raise FormulationError(f"{what}: a dict entry must be {{'exponents': [...], 'factors': [...]}}, got "
                                       f"keys {sorted(e)}.")
            d = np.asarray(e["factors"], dtype=np.float64).reshape(-1)
            whole = np.asarray(e["exponents"]).reshape(-1)
            if d.shape != (stage.width,) or not np.all(np.isfinite(d)) or np.any(d <= 0) or \
                    whole.shape != (stage.width,) or not np.issubdtype(whole.dtype, np.integer):
                raise FormulationError(f"{what}: needs {stage.width} integer exponents and {stage.width} positive "
                                       "finite factors.")
            mant, expo = np.frexp(d)
            exps, factors = whole.astype(np.int64) + expo.astype(np.int64) - 1, 2 * mant
        else:
            arr = np.asarray(e).reshape(-1)
            if arr.size == 1:
                arr = np.full(stage.width, arr[0])
            if arr.shape != (stage.width,) or not np.issubdtype(arr.dtype, np.integer):
                raise FormulationError(f"{what}: needs one integer exponent or {stage.width} of them.")
            exps, factors = arr.astype(np.int64), None
        layer = stage.layer
        if isinstance(layer, (GroupSortLayer, HouseholderLayer)):
            for vec in (exps, factors):
                per_group = None if vec is None else vec.reshape(layer.n_groups, layer.group_size)
                if per_group is not None and np.any(per_group != per_group[:, :1]):
                    raise FormulationError(f"{what}: must be equal within each group of {layer.group_size} "
                                           "(GroupSort/Householder QCs need it).")
        blocks.append((exps, None if factors is None or np.all(factors == 1.0) else factors))
    ends = []
    for e in (exponents[0], exponents[m + 1]):
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)):
            raise FormulationError(f"input/output scaling exponents must be integers, got {e!r}.")
        ends.append(int(e))
    return ends[0], blocks, ends[1]


def _compact(e: np.ndarray) -> int | np.ndarray:
    """One integer for a uniform exponent vector (keeps identity maps implicit), else the vector."""
    return int(e[0]) if np.all(e == e[0]) else e


def _normalised_slopes(layer, g: np.ndarray):
    """The layer with sector ``[alpha / 2^g, beta / 2^g]`` (rounded outward where that is inexact)."""
    if not isinstance(layer, SlopeRestricted) or not np.any(g):
        return layer
    alpha, beta = np.ldexp(layer.alpha, -g), np.ldexp(layer.beta, -g)
    alpha = np.where(np.ldexp(alpha, g) != layer.alpha, next_down(alpha), alpha)
    beta = np.where(np.ldexp(beta, g) != layer.beta, next_up(beta), beta)
    return layer.with_slopes(alpha, beta)


def scaled_signal_model(model: SignalModel, slope_mode: str, exponents=None) -> tuple[SignalModel, int, tuple]:
    """The signal model in scaled coordinates, the output exponent, and the exponents used.

    Slopes are normalised (:func:`~lipbound.formulations.scaling.slope_exponents`, an exact reparametrisation)
    and every block is scaled by its factors (``exponents`` as in :func:`lipschitz_problem`; chosen from the data
    by :func:`~lipbound.formulations.scaling.choose_exponents` when None): stage maps become
    ``D_k^-1 P_kb D_b``, the output ``2^-e_out C_b D_b``, the input map ``W_in / 2^e_in``, with error bounds for
    whatever is inexact. ``slope_mode`` is ``"neuron"`` or ``"layer"``.
    """
    slope_exp = [slope_exponents(stage.layer, slope_mode) for stage in model.stages]
    if isinstance(exponents, str):
        if exponents != "norm":
            raise FormulationError(f"exponents must be a sequence, None (chosen from the data) or 'norm' (block "
                                   f"levels from norm products only), got {exponents!r}.")
        exponents = choose_exponents(model, slope_mode, slope_exp, cancellation=False)
    elif exponents is None:
        exponents = choose_exponents(model, slope_mode, slope_exp)
    e_in, e_blocks, e_out = _expand_exponents(exponents, model)

    def reader_exp(b: int) -> int | np.ndarray:
        """Exponents of what block ``b``'s readers see: the congruence and the slope normalisation."""
        return e_in if b == 0 else _compact(e_blocks[b - 1][0] + slope_exp[b - 1])

    def mantissa(b: int) -> np.ndarray | None:
        return None if b == 0 else e_blocks[b - 1][1]

    w_in = np.ldexp(model.input_map, -e_in)
    if not np.array_equal(np.ldexp(w_in, e_in), model.input_map):
        raise FormulationError(f"scaling the input map by 2^-{e_in} is not exact (entries near the subnormal range); "
                               "use a smaller input exponent.")
    pre = [{b: rescaled(lin, _compact(e_blocks[k - 1][0]), reader_exp(b), model.coefficient_dim(b), mantissa(k),
                        mantissa(b))
            for b, lin in stage.pre.items()} for k, stage in enumerate(model.stages, start=1)]
    out = {b: rescaled(lin, e_out, reader_exp(b), model.coefficient_dim(b), None, mantissa(b))
           for b, lin in model.output.items()}
    stages = tuple(SignalStage(_normalised_slopes(s.layer, g), p_, s.name, s.groups)
                   for s, p_, g in zip(model.stages, pre, slope_exp, strict=True))
    return SignalModel(model.input_dim, w_in, stages, out, model.output_dim, model.notes), e_out, tuple(exponents)


def signal_product_bound(model: SignalModel, exponents=None, rigorous: bool = True) -> tuple[float, float, tuple]:
    """Product bound over the signal model's paths, in balanced coordinates: ``(certified, estimate, exponents)``.

    With ``g_b`` the rigorous norm-product gains of the scaled block signals (``g_k = s_k sum_b ||P_kb|| g_b``,
    divided by ``1 - s_k ||P_kk||`` for a contractive self-loop), ``L <= 2^e_out sum_b ||C_b|| g_b``. For a chain
    this is the product of the layer norms of the rebalanced network ``D_k^-1 W_k D_k+1`` (the factors of
    LipSDP-Layer: one per block unless a block is badly balanced, see
    :func:`~lipbound.formulations.scaling.choose_exponents`): valid for every element-wise activation since
    diagonal slope matrices commute with ``D`` (and for GroupSort/Householder, whose Jacobians commute with
    group-constant factors). ``rigorous=False``: the same product of floating-point norm estimates (not a bound).
    """
    scaled, e_out, exponents = scaled_signal_model(model, "layer", exponents)
    norm = _norm_upper if rigorous else _norm_estimate
    gains = _signal_gains(scaled, norm)
    if len(gains) <= len(scaled.stages) or any(g is None for g in gains):
        return math.inf, math.inf, exponents
    total = Fraction(0)
    for b, lin in scaled.output.items():
        total += _map_norm(scaled, b, lin, norm) * gains[b]
    total *= Fraction(2) ** e_out
    return round_up(total), round_up(total), exponents


def lipschitz_problem(model: SignalModel, norm: str = "l2", slope_mode: str = "neuron", coupled: bool = False,
                      output_index: int | None = None, exponents: tuple[int, ...] | None = None,
                      reduce_input: bool = True, name: str = "lipschitz") -> LipschitzProblem:
    """Build the l2 or l-infinity program of a signal model (see module docstring)."""
    if norm not in ("l2", "linf"):
        raise FormulationError(f"unknown norm {norm!r}; use 'l2' or 'linf'.")
    if norm == "linf":
        if output_index is None:
            if model.output_dim != 1:
                raise FormulationError(f"norm='linf' bounds one scalar output; the network has {model.output_dim} "
                                       "outputs: pass output_index (the logit to bound).")
            output_index = 0
        if not 0 <= output_index < model.output_dim:
            raise FormulationError(f"output_index {output_index} out of range for {model.output_dim} outputs.")

    model, e_out, exponents = scaled_signal_model(model, slope_mode, exponents)
    w_in, out = model.input_map, model.output
    pre = [stage.pre for stage in model.stages]

    # -- variables
    var_blocks: list[qcs.VariableBlock] = [qcs.VariableBlock("rho", 1, True)]
    if norm == "linf":
        var_blocks.append(qcs.VariableBlock("tau", model.input_dim, True))
    stage_offsets = []
    for k, stage in enumerate(model.stages, start=1):
        blocks = qcs.variables(stage.layer, slope_mode, coupled, k, stage.groups)
        offs = []
        for vb in blocks:
            offs.append(sum(v.size for v in var_blocks))
            var_blocks.append(vb)
        stage_offsets.append(offs)
    n_vars = sum(v.size for v in var_blocks)
    nonneg = np.concatenate([np.full(v.size, v.nonneg) for v in var_blocks])
    variables, pos = [], 0
    for vb in var_blocks:
        variables.append((vb.name, slice(pos, pos + vb.size)))
        pos += vb.size
    objective = np.zeros(n_vars)
    objective[0] = 1.0
    qc_list = [qcs.layer_qc(stage.layer, stage_offsets[k], n_vars, slope_mode, coupled, stage.groups)
               for k, stage in enumerate(model.stages)]

    def factor(b: int, lin: Lin, f: np.ndarray | None, f_err: np.ndarray | None, r_factor: np.ndarray | None):
        """Factor on block ``b`` of ``z^T F`` with ``z = lin v_b``: ``lin^T F`` (block 0: ``W_in^T lin^T F``).

        Returned as a ``Lin`` with ``power == 0``; ``mat=None`` only for the exact identity.
        """
        x = lmul_inexact(lin.T, f, f_err)
        if b == 0:
            if r_factor is not None:
                return Lin(np.ldexp(r_factor, x.power) if x.mat is None else r_factor @ x.materialised().mat)
            return lmul(w_in.T, x).materialised()
        if x.mat is None:
            n = model.stages[b - 1].width
            return x if x.power == 0 else Lin(np.ldexp(np.eye(n), x.power))
        return x.materialised()

    def build(r_factor: np.ndarray | None) -> tuple[list[int], list[Term]]:
        n0 = model.input_dim if r_factor is None else r_factor.shape[0]
        blocks = [n0] + [s.width for s in model.stages]
        terms: list[Term] = []

        def sel(rows: int, columns) -> sp.csr_matrix:
            r = np.concatenate([np.arange(rows)] * len(columns))
            c = np.concatenate([col for col, _ in columns])
            v = np.concatenate([val for _, val in columns])
            return sp.csr_matrix((v, (r, c)), shape=(rows, n_vars))

        if norm == "l2":
            terms.append(Term(0, 0, None, None, sel(n0, [(np.zeros(n0, int), -np.ones(n0))]), coef_ops=0))
        for k, (qc, pre_k) in enumerate(zip(qc_list, pre, strict=True), start=1):
            keys = sorted(pre_k)
            for piece in qc.zz:
                facs = {b: factor(b, pre_k[b], piece.left, piece.left_err, r_factor) for b in keys}
                for i, b in enumerate(keys):
                    for b2 in keys[i:]:
                        terms.append(Term(b, b2, facs[b].mat, facs[b2].mat, piece.coef, coef_ops=piece.coef_ops,
                                          left_err=facs[b].err, right_err=facs[b2].err))
            for piece in qc.zp:
                for b in keys:
                    fz = factor(b, pre_k[b], piece.left, piece.left_err, r_factor)
                    terms.append(Term(b, k, fz.mat, piece.right, piece.coef, coef_ops=piece.coef_ops,
                                      left_err=fz.err, right_err=piece.right_err, mirror=(b == k)))
            for piece in qc.pp:
                terms.append(Term(k, k, piece.left, piece.right, piece.coef, coef_ops=piece.coef_ops,
                                  left_err=piece.left_err, right_err=piece.right_err))
        keys = sorted(out)
        if norm == "l2":
            facs = {b: factor(b, out[b], None, None, r_factor) for b in keys}
            p = model.output_dim
            for i, b in enumerate(keys):
                for b2 in keys[i:]:
                    terms.append(Term(b, b2, facs[b].mat, facs[b2].mat, sp.csr_matrix((p, n_vars)),
                                      const=np.ones(p), coef_ops=0, left_err=facs[b].err, right_err=facs[b2].err))
        else:
            t = len(blocks)
            blocks.append(1)
            tau = np.arange(1, 1 + model.input_dim)
            corner = sp.csr_matrix((np.concatenate([np.ones(model.input_dim), [-2.0]]),
                                    (np.zeros(model.input_dim + 1, int), np.concatenate([tau, [0]]))),
                                   shape=(1, n_vars))
            terms.append(Term(t, t, None, None, corner, coef_ops=0))
            terms.append(Term(0, 0, None, None, sel(model.input_dim, [(tau, -np.ones(model.input_dim))]), coef_ops=0))
            for b in keys:
                full_map = out[b].materialised()
                dense = full_map.dense(model.coefficient_dim(b))
                row = dense[output_index:output_index + 1]
                err = None if full_map.err is None else full_map.err[output_index:output_index + 1]
                fac = factor(b, Lin(row, err), None, None, None)
                terms.append(Term(b, t, fac.mat, None, sp.csr_matrix((1, n_vars)), const=np.ones(1), coef_ops=0,
                                  left_err=fac.err))
        return blocks, terms

    # -- rigorous norm bounds of the (scaled) block signals for the certificate's repair weights, computed when a check
    # first needs one (never, for a certificate proved with delta = 0)
    @functools.cache
    def signal_gains() -> list:
        gains = _signal_gains(model)
        if norm == "linf":
            gains.append(None)  # the t block: its "signal" is the constant 1, handled below
        return gains

    def repair_weight(component: list[int], t_block: int | None) -> float:
        gains = signal_gains()
        if any(gains[b] is None for b in component if b != t_block):
            return float("inf")
        total = sum((gains[b] ** 2 for b in component if b != t_block), Fraction(0))
        if norm == "linf":
            total = (model.input_dim * total + (1 if t_block in component else 0)) / 2
        return round_up(total)

    def make_program(blocks: list[int], terms: list[Term]) -> Program:
        comps = _components(len(blocks), terms)
        t_block = len(blocks) - 1 if norm == "linf" else None
        lmis, rho_lmi, rho_block = [], 0, 0
        rho_home = 0 if norm == "l2" else t_block
        for ci, comp in enumerate(comps):
            remap = {b: i for i, b in enumerate(comp)}
            sub = [Term(remap[t.row], remap[t.col], t.left, t.right, t.coef, t.const, t.coef_ops, t.left_err,
                        t.right_err, t.mirror) for t in terms if t.row in remap]
            lmis.append(LMI(tuple(blocks[b] for b in comp), tuple(sub), name=f"{name}[{ci}]"))
            if rho_home in remap:
                rho_lmi, rho_block = ci, remap[rho_home]
        weights = DeferredWeights(len(comps), lambda: [repair_weight(comp, t_block) for comp in comps])
        return Program(tuple(lmis), n_vars, objective, nonneg, weights,
                       "sqrt" if norm == "l2" else "linear", e_out, rho_index=0,
                       rho_block=rho_block, rho_lmi=rho_lmi, rho_weight=1.0 if norm == "l2" else 2.0,
                       variables=tuple(variables), name=name)

    full = make_program(*build(None))
    reduce = norm == "l2" and reduce_input and w_in.shape[0] < model.input_dim
    solve = make_program(*build(np.linalg.qr(w_in.T, mode="r"))) if reduce else full
    return LipschitzProblem(full, solve, exponents, norm, model.notes)


def _components(n_blocks: int, terms: list[Term]) -> list[list[int]]:
    parent = list(range(n_blocks))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for t in terms:
        parent[find(t.row)] = find(t.col)
    groups: dict[int, list[int]] = {}
    for b in range(n_blocks):
        groups.setdefault(find(b), []).append(b)
    return sorted(groups.values())
