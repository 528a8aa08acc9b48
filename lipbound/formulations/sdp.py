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

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import scipy.sparse as sp

from lipbound.errors import FormulationError
from lipbound.formulations import qcs
from lipbound.formulations.signal import Lin, SignalModel, lmul, lmul_inexact
from lipbound.network import max_slope
from lipbound.program import LMI, Program, Term
from lipbound.rigorous import exact_sum, round_up, spectral_norm_estimate, spectral_norm_upper, sqrt_up


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
    bound = Fraction(spectral_norm_upper(lin.mat)) * Fraction(2) ** lin.power
    if lin.err is not None:
        bound += Fraction(sqrt_up(exact_sum((lin.err * lin.err).ravel()) * (1 + Fraction(2 * (lin.err.size + 2),
                                                                                          2**53))))
    return bound


def _float_norm(lin: Lin) -> float:
    return float(np.ldexp(1.0 if lin.mat is None else spectral_norm_estimate(lin.mat), lin.power))


def _signal_gains(model: SignalModel, rigorous: bool, scales: list[int] | None = None):
    """Upper bounds ``g_b >= ||v_b|| / ||dx||`` (rigorous Fractions, or float estimates)."""
    norm = (lambda lin, n: _norm_upper(lin, n)) if rigorous else (lambda lin, n: Fraction(_float_norm(lin)))
    w_in = Fraction(spectral_norm_upper(model.input_map)) if rigorous else Fraction(
        spectral_norm_estimate(model.input_map))
    gains = [Fraction(1)]
    for k, stage in enumerate(model.stages, start=1):
        s = Fraction(max_slope(stage.layer))
        total, self_gain = Fraction(0), None
        for b, lin in stage.pre.items():
            nb = model.coefficient_dim(b)
            if b == k:
                self_gain = norm(lin, nb)
                continue
            gb = w_in if b == 0 else gains[b]
            total += norm(lin, nb) * gb
        if self_gain is not None:
            contraction = s * self_gain
            gains.append(s * total / (1 - contraction) if contraction < 1 else None)
        else:
            gains.append(s * total)
        if gains[-1] is None:
            break
    return gains, w_in


def _power(x: Fraction | float | None) -> int:
    if x is None or x <= 0:
        return 0
    return int(np.round(np.log2(float(x))))


def lipschitz_problem(model: SignalModel, norm: str = "l2", slope_mode: str = "neuron", coupled: bool = False,
                      output_index: int | None = None, exponents: tuple[int, ...] | None = None,
                      reduce_input: bool = True, name: str = "lipschitz") -> LipschitzProblem:
    """Build the l2 or l-infinity program of a signal model (see module docstring)."""
    if norm not in ("l2", "linf"):
        raise FormulationError(f"unknown norm {norm!r}; use 'l2' or 'linf'.")
    m = len(model.stages)
    if norm == "linf":
        if output_index is None:
            if model.output_dim != 1:
                raise FormulationError(f"norm='linf' bounds one scalar output; the network has {model.output_dim} "
                                       "outputs: pass output_index (the logit to bound).")
            output_index = 0
        if not 0 <= output_index < model.output_dim:
            raise FormulationError(f"output_index {output_index} out of range for {model.output_dim} outputs.")

    # -- scaling exponents (power of two per block), from float gain estimates
    if exponents is None:
        est, w_in_est = _signal_gains(model, rigorous=False)
        est = [g if g is not None else Fraction(1) for g in est]
        out_est = sum((Fraction(_float_norm(lin)) * (w_in_est if b == 0 else est[b])
                       for b, lin in model.output.items()), Fraction(0))
        exponents = (_power(w_in_est),) + tuple(_power(g) for g in est[1:]) + (_power(out_est),)
    exponents = tuple(int(e) for e in exponents)
    if len(exponents) != m + 2:
        raise FormulationError(f"expected {m + 2} scaling exponents, got {len(exponents)}.")
    e_in, e_blocks, e_out = exponents[0], (0,) + exponents[1:m + 1], exponents[m + 1]

    def block_exp(b: int) -> int:
        return e_in if b == 0 else e_blocks[b]

    w_in = np.ldexp(model.input_map, -e_in)
    if not np.array_equal(np.ldexp(w_in, e_in), model.input_map):
        raise FormulationError("power-of-two scaling of the input map is not exact (subnormal entries).")
    pre = [{b: lin.scaled(block_exp(b) - e_blocks[k]) for b, lin in stage.pre.items()}
           for k, stage in enumerate(model.stages, start=1)]
    out = {b: lin.scaled(block_exp(b) - e_out) for b, lin in model.output.items()}

    # -- variables
    var_blocks: list[qcs.VariableBlock] = [qcs.VariableBlock("rho", 1, True)]
    if norm == "linf":
        var_blocks.append(qcs.VariableBlock("tau", model.input_dim, True))
    stage_offsets = []
    for k, stage in enumerate(model.stages, start=1):
        blocks = qcs.variables(stage.layer, slope_mode, coupled, k)
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
    qc_list = [qcs.layer_qc(stage.layer, stage_offsets[k], n_vars, slope_mode, coupled)
               for k, stage in enumerate(model.stages)]

    def factor(b: int, lin: Lin, f: np.ndarray | None, f_err: np.ndarray | None, r_factor: np.ndarray | None):
        """Factor on block ``b`` of ``z^T F`` with ``z = lin v_b``: ``lin^T F`` (block 0: ``W_in^T lin^T F``).

        Returned as a ``Lin`` with ``power == 0``; ``mat=None`` only for the exact identity.
        """
        x = lmul_inexact(lin.T, f, f_err)
        if b == 0:
            if r_factor is not None:
                return Lin(np.ldexp(r_factor, x.power) if x.mat is None else r_factor @ x.materialised().mat)
            return lmul(w_in.T, x)
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

    # -- rigorous norm bounds of the (scaled) block signals for the certificate's repair weights
    scaled_model = SignalModel(model.input_dim, w_in, tuple(type(s)(s.layer, p_, s.name)
                                                            for s, p_ in zip(model.stages, pre, strict=True)),
                               out, model.output_dim)
    gains, _ = _signal_gains(scaled_model, rigorous=True)
    if norm == "linf":
        gains.append(None)  # the t block: its "signal" is the constant 1, handled below

    def repair_weight(component: list[int], t_block: int | None) -> float:
        if any(gains[b] is None for b in component if b != t_block):
            return float("inf")
        total = sum((gains[b] ** 2 for b in component if b != t_block), Fraction(0))
        if norm == "linf":
            total = (model.input_dim * total + (1 if t_block in component else 0)) / 2
        return round_up(total)

    def make_program(blocks: list[int], terms: list[Term]) -> Program:
        comps = _components(len(blocks), terms)
        t_block = len(blocks) - 1 if norm == "linf" else None
        lmis, weights, rho_lmi, rho_block = [], [], 0, 0
        rho_home = 0 if norm == "l2" else t_block
        for ci, comp in enumerate(comps):
            remap = {b: i for i, b in enumerate(comp)}
            sub = [Term(remap[t.row], remap[t.col], t.left, t.right, t.coef, t.const, t.coef_ops, t.left_err,
                        t.right_err, t.mirror) for t in terms if t.row in remap]
            lmis.append(LMI(tuple(blocks[b] for b in comp), tuple(sub), name=f"{name}[{ci}]"))
            weights.append(repair_weight(comp, t_block))
            if rho_home in remap:
                rho_lmi, rho_block = ci, remap[rho_home]
        return Program(tuple(lmis), n_vars, objective, nonneg, tuple(weights),
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
