"""Quadratic constraints (QCs) of activation layers, as low-rank pieces over the multipliers.

A layer's QC is ``[dz; dphi]^T [[Qzz, Qzp], [Qzp^T, Qpp]] [dz; dphi] >= 0`` for all input pairs and all valid
multipliers. Each of ``Qzz``, ``Qzp``, ``Qpp`` is a sum of pieces ``F diag(coef @ y) G^T``.

* Slope restriction ``[alpha_i, beta_i]`` (LipSDP; Fazlyab et al. 2019): ``T = diag(lambda)``, ``lambda >= 0``
  (one per neuron, or one per layer), ``Qzz = -2 alpha beta T``, ``Qzp = (alpha + beta) T``, ``Qpp = -2 T``.
* GroupSort / MaxMin and Householder (Pauli et al., ICLR 2024): per group ``j`` with ``Pi_j = 1 1^T``
  (GroupSort) or ``I - v_j v_j^T`` (Householder), ``T = blkdiag(lambda_j I + gamma_j Pi_j)``,
  ``S = blkdiag(tau_j Pi_j)``, ``P = blkdiag(nu_j Pi_j)``, ``lambda >= 0`` and ``gamma, tau, nu`` free;
  ``Qzz = T - 2S``, ``Qzp = S + P``, ``Qpp = -T - 2P``. Valid because the maps are 1-Lipschitz and preserve
  ``Pi_j z`` (proofs in ``theory/qc.py``). ``coupled=False`` fixes ``S = P = 0`` (the authors' code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from lipbound.errors import FormulationError
from lipbound.network import GroupSortLayer, HouseholderLayer, SlopeRestricted
from lipbound.program import UNIT_ROUNDOFF


@dataclass(frozen=True, eq=False)
class Piece:
    """``F diag(coef @ y) G^T`` with ``F = left``, ``G = right`` (``None`` = identity), optional error bounds."""

    left: np.ndarray | None
    right: np.ndarray | None
    coef: sp.csr_matrix
    left_err: np.ndarray | None = None
    right_err: np.ndarray | None = None
    coef_ops: int = 3


@dataclass(frozen=True, eq=False)
class LayerQC:
    zz: tuple[Piece, ...]
    zp: tuple[Piece, ...]
    pp: tuple[Piece, ...]


@dataclass(frozen=True)
class VariableBlock:
    name: str
    size: int
    nonneg: bool


def _slope_variables(layer, slope_mode: str, groups: np.ndarray | None) -> np.ndarray:
    """Multiplier index (from 0) of each neuron: one per neuron, per channel (``groups``) or per layer."""
    if slope_mode == "neuron" or (slope_mode == "channel" and groups is None):
        return np.arange(layer.width)
    if slope_mode == "channel":
        return np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    if slope_mode == "layer":
        return np.zeros(layer.width, int)
    raise FormulationError(f"unknown multiplier granularity {slope_mode!r}; use 'neuron', 'channel' or 'layer'.")


def variables(layer, slope_mode: str, coupled: bool, index: int,
              groups: np.ndarray | None = None) -> list[VariableBlock]:
    """The multiplier blocks a layer's QC needs (``groups``: channel of each neuron, for ``slope_mode="channel"``)."""
    if isinstance(layer, SlopeRestricted):
        return [VariableBlock(f"lambda_{index}", int(_slope_variables(layer, slope_mode, groups).max()) + 1, True)]
    if isinstance(layer, (GroupSortLayer, HouseholderLayer)):
        n = layer.n_groups
        out = [VariableBlock(f"lambda_{index}", n, True), VariableBlock(f"gamma_{index}", n, False)]
        if coupled:
            out += [VariableBlock(f"tau_{index}", n, False), VariableBlock(f"nu_{index}", n, False)]
        return out
    raise FormulationError(f"no quadratic constraint for layer '{getattr(layer, 'name', layer)}' "
                           f"({type(layer).__name__}).")


def _rows(n_rows: int, columns: list[tuple[np.ndarray, np.ndarray]], n_vars: int) -> sp.csr_matrix:
    """Sparse (n_rows x n_vars) with entries ``value`` at (i, var_i) for each (var, value) column list."""
    r, c, v = [], [], []
    for var, val in columns:
        r.append(np.arange(n_rows))
        c.append(var)
        v.append(val)
    return sp.csr_matrix((np.concatenate(v), (np.concatenate(r), np.concatenate(c))), shape=(n_rows, n_vars))


def layer_qc(layer, offsets: list[int], n_vars: int, slope_mode: str, coupled: bool,
             groups: np.ndarray | None = None) -> LayerQC:
    """The QC pieces of ``layer`` whose multiplier blocks start at ``offsets`` (as from :func:`variables`)."""
    if isinstance(layer, SlopeRestricted):
        if not (np.all(np.isfinite(layer.alpha)) and np.all(np.isfinite(layer.beta))):
            raise FormulationError(f"activation '{layer.name}' ({layer.activation.describe()}) has no global slope "
                                   "bound; certify it on a region (domain=Box(...) or Ball(...)).")
        n = layer.width
        var = offsets[0] + _slope_variables(layer, slope_mode, groups)
        ab, s = layer.alpha * layer.beta, layer.alpha + layer.beta
        zz = (Piece(None, None, _rows(n, [(var, -2.0 * ab)], n_vars)),) if np.any(ab != 0) else ()
        zp = (Piece(None, None, _rows(n, [(var, s)], n_vars)),) if np.any(s != 0) else ()
        pp = (Piece(None, None, _rows(n, [(var, np.full(n, -2.0))], n_vars), coef_ops=0),)
        return LayerQC(zz, zp, pp)
    n, g, ng = layer.width, layer.group_size, layer.n_groups
    group = np.repeat(np.arange(ng), g)
    lam, gam = offsets[0] + np.arange(ng), offsets[1] + np.arange(ng)
    tau = offsets[2] + np.arange(ng) if coupled else None
    nu = offsets[3] + np.arange(ng) if coupled else None
    one = np.ones(n)

    def per_group(blocks: list[tuple[np.ndarray, float]], rows_per_group: bool) -> sp.csr_matrix:
        """Coefficient rows: per neuron (expanded over the group) or per group."""
        if rows_per_group:
            return _rows(ng, [(b, np.full(ng, w)) for b, w in blocks], n_vars)
        return _rows(n, [(b[group], w * one) for b, w in blocks], n_vars)

    t_minus_2s = [(gam, 1.0)] + ([(tau, -2.0)] if coupled else [])
    s_plus_p = [(tau, 1.0), (nu, 1.0)] if coupled else []
    minus_t_minus_2p = [(gam, -1.0)] + ([(nu, -2.0)] if coupled else [])
    if isinstance(layer, GroupSortLayer):
        e = np.kron(np.eye(ng), np.ones((g, 1)))
        zz = [Piece(None, None, per_group([(lam, 1.0)], False), coef_ops=0),
              Piece(e, e, per_group(t_minus_2s, True), coef_ops=0)]
        zp = [Piece(e, e, per_group(s_plus_p, True), coef_ops=0)] if coupled else []
        pp = [Piece(None, None, per_group([(lam, -1.0)], False), coef_ops=0),
              Piece(e, e, per_group(minus_t_minus_2p, True), coef_ops=0)]
        return LayerQC(tuple(zz), tuple(zp), tuple(pp))
    # Householder: blkdiag(c_j (I - v_j v_j^T)) = diag(E c) - V diag(c) V^T; V holds the unit vectors, whose
    # floating-point normalisation is off by at most (g + 4) u relative per entry.
    v = np.zeros((n, ng))
    v[np.arange(n), group] = layer.vectors.ravel()
    v_err = 2 * (g + 4) * UNIT_ROUNDOFF * np.abs(v) + np.finfo(float).tiny * (v != 0)

    def pi_pieces(blocks, with_lambda_sign: float | None):
        expanded = list(blocks) + ([(lam, with_lambda_sign)] if with_lambda_sign is not None else [])
        out = [Piece(None, None, per_group(expanded, False), coef_ops=0)]
        if blocks:
            out.append(Piece(v, v, per_group([(b, -w) for b, w in blocks], True), left_err=v_err, right_err=v_err,
                             coef_ops=0))
        return out

    zz = pi_pieces(t_minus_2s, 1.0)
    zp = pi_pieces(s_plus_p, None) if coupled else []
    pp = pi_pieces(minus_t_minus_2p, -1.0)
    return LayerQC(tuple(zz), tuple(zp), tuple(pp))
