"""Closed-form LipSDP-Neuron multipliers of networks with nonnegative weights (monotone networks).

When every map of the (scaled) signal model is entrywise nonnegative and every activation's slopes lie in
``[0, beta_i]``, the Jacobians of the network are entrywise between 0 and the *all-active* map
``T = C B_m P_m ... B_1 P_1 W_in`` (``B_k = diag(beta)``), so the Lipschitz constant is at most ``||T||_2``, and
LipSDP's value is at least ``||T||_2`` (the QCs admit ``dphi_k = B_k dz_k``): LipSDP's optimum is ``||T||_2``.

It is attained in closed form. With ``u_0`` the top right singular vector of ``T`` (nonnegative: Perron) and ``v``
the signal vector ``[u_0; B_1 z_1; ...]`` of the all-active direction, the LMI matrix ``M(y)`` of multipliers with
``M(y) v = 0`` is *Metzler* (nonnegative off the diagonal: every coupling is a product of nonnegative maps and
multipliers), and a symmetric Metzler matrix with a positive vector in its kernel has largest eigenvalue 0
(Perron-Frobenius for ``M + cI >= 0``). ``M(y) v = 0`` is linear in ``y`` (rho included): a sparse least-squares
solve gives the optimal multipliers. The rigorous check then proves them like any solver's answer; this module
only proposes them, and nothing is claimed unless the check certifies.

This is the structure of the deep nonnegative chains of the benchmark suites (``4-20x100-1``: the interior-point
method took 46.7 s on 2 cores for the same optimum).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from lipbound.formulations.sdp import LipschitzProblem, scaled_signal_model
from lipbound.formulations.signal import SignalModel
from lipbound.network import SlopeRestricted
from lipbound.program import placed_rows

log = logging.getLogger("lipbound")

#: The closed form is tried for signal models with at most this many input dimensions times neurons (the
#: all-active map is formed column by column from the identity) ...
_MAX_WORK = 1 << 28
#: ... and at most this sum of cubed stage widths (the sparse factorisation of the normal equations is block
#: banded with one block per stage: 4-20x100-1 has 8e5; a 784-2048x4-10 net, 3.4e10, is left to the solver).
_MAX_FACTOR_WORK = 1e10


def _nonnegative_lin(lin) -> bool:
    return lin.mat is None or bool(np.all(lin.mat >= 0))


def applies(model: SignalModel) -> str | None:
    """``None`` when the closed form applies to ``model``, else why not (for the log)."""
    for k, stage in enumerate(model.stages, start=1):
        layer = stage.layer
        if not isinstance(layer, SlopeRestricted):
            return f"stage {k} is not slope-restricted"
        if layer.alpha is not None and np.any(np.asarray(layer.alpha) != 0):
            return f"stage {k} has a nonzero lower slope"
        if any(b >= k for b in stage.pre):
            return f"stage {k} reads itself or a later stage (an implicit layer)"
        if not all(_nonnegative_lin(lin) for lin in stage.pre.values()):
            return f"stage {k} has a negative weight"
    if not all(_nonnegative_lin(lin) for lin in model.output.values()) or np.any(model.input_map < 0):
        return "the input or output map has a negative weight"
    work = model.input_dim * (model.input_map.shape[0] + sum(s.width for s in model.stages))
    if work > _MAX_WORK:
        return f"the all-active map would take {work} products to form"
    cubes = sum(float(s.width) ** 3 for s in model.stages)
    if cubes > _MAX_FACTOR_WORK:
        return f"the stages are too wide for the sparse solve (sum of cubed widths {cubes:.3g})"
    return None


def _all_active(model: SignalModel, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Block signals ``[x, v_1, ..., v_m]`` and output of the all-active linear map at inputs ``x`` (columns)."""
    x1 = model.input_map @ x
    blocks = [x]
    for stage in model.stages:
        z = sum(lin.dense(model.coefficient_dim(b)) @ (x1 if b == 0 else blocks[b]) for b, lin in stage.pre.items())
        beta = np.broadcast_to(np.asarray(stage.layer.beta, dtype=float), (stage.width,))
        blocks.append(beta[:, None] * z)
    out = sum(lin.dense(model.coefficient_dim(b)) @ (x1 if b == 0 else blocks[b]) for b, lin in model.output.items())
    return blocks, out


def _stationarity_system(lmi, v: np.ndarray, n_vars: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """``(J, r)`` with ``M(y) v = J y - r`` (``M`` the LMI, linear in ``y``)."""
    off = lmi.offsets
    rows, rhs = [], np.zeros(lmi.size)

    def add(block: int, factor, weights: np.ndarray, term) -> None:
        # rows of ``block`` receive factor diag(weights) d, with d = coef y + const
        a = sp.diags(weights) if factor is None else sp.csr_matrix(factor * weights[None, :])
        placed = placed_rows(a, off[block], lmi.size)
        rows.append(placed @ term.coef)
        if term.const is not None:
            rhs[:] -= placed @ term.const

    for t in lmi.terms:
        vr, vc = v[off[t.row]:off[t.row + 1]], v[off[t.col]:off[t.col + 1]]
        if t.row == t.col and t.left is None and t.right is None:
            add(t.row, None, vr * (2.0 if t.mirror else 1.0), t)
            continue
        add(t.row, t.left, vc if t.right is None else t.right.T @ vc, t)
        if t.row != t.col or t.mirror:
            add(t.col, t.right, vr if t.left is None else t.left.T @ vr, t)
    jac = sp.csr_matrix((lmi.size, n_vars)) if not rows else sum(rows[1:], rows[0]).tocsr()
    return jac, rhs


def stationary_multipliers(problem: LipschitzProblem, model: SignalModel) -> tuple[np.ndarray, float] | None:
    """Closed-form optimal multipliers ``y`` of a LipSDP-Neuron l2 ``problem`` of a nonnegative ``model``, and
    ``||T||_2`` (in floating point, in the network's units), or ``None`` when the closed form does not apply.

    ``model`` is the unscaled signal model the problem was built from; the problem's scaling exponents give the
    coordinates of its LMI. The multipliers are a proposal: certify them with
    :func:`~lipbound.certificate.certify_multipliers`.
    """
    program = problem.program
    if problem.norm != "l2" or program.rho_index is None or len(program.lmis) != 1:
        return None
    why = applies(model)
    if why is not None:
        log.debug("closed-form multipliers: not applicable (%s)", why)
        return None
    # Power-of-two scaling and positive factors keep every map nonnegative: applies(scaled) holds too.
    scaled, e_out, _ = scaled_signal_model(model, "neuron", problem.exponents)
    lmi = program.lmis[0]
    if tuple(lmi.block_sizes) != tuple(scaled.block_sizes):
        return None
    with np.errstate(all="ignore"):
        _, t_map = _all_active(scaled, np.eye(scaled.input_dim))
        if not np.all(np.isfinite(t_map)) or t_map.size == 0:
            return None
        _, s, vt = np.linalg.svd(np.atleast_2d(t_map), full_matrices=False)
        u0 = np.abs(vt[0])
        blocks, _ = _all_active(scaled, u0[:, None])
        v = np.concatenate([b.reshape(-1) for b in blocks])
        if not np.all(np.isfinite(v)) or not np.any(v > 0):
            return None
        jac, rhs = _stationarity_system(lmi, v, program.n_vars)
        normal = (jac.T @ jac).tocsc()
        # Multipliers that no equation reaches (zero columns) stay 0; the rest solve the normal equations, with one
        # step of refinement.
        used = np.asarray(abs(normal).sum(axis=0)).reshape(-1) > 0
        y = np.zeros(program.n_vars)
        if not used.any():
            return None
        try:
            lu = spla.splu(normal[used][:, used])
            y[used] = lu.solve(jac.T[used] @ rhs)
            y[used] += lu.solve(jac.T[used] @ (rhs - jac @ y))
        except RuntimeError:  # singular normal equations
            return None
    if not np.all(np.isfinite(y)):
        return None
    with np.errstate(over="ignore"):  # ||T|| beyond the float range: inf, and certify solves instead
        return y, float(np.ldexp(s[0], e_out))
