"""Choosing the power-of-two scaling of a signal model from its data, so that the SDP's optimum is O(1).

The LMI of a :class:`~lipbound.formulations.signal.SignalModel` may be written over scaled signals
``z_k' = D_k^-1 z_k``, ``phi_k' = D_k^-1 phi_k`` (``D_k`` diagonal, powers of two) and a scaled output
``y' = y / 2^e_out``: every quadratic constraint of a neuron is invariant when its ``z_i`` and ``phi_i`` are
scaled by the same factor (multiplier times the factor squared), and GroupSort/Householder constraints when a
group's factor is shared. So the scaled LMI is a diagonal congruence of the original one: the same optimum,
exact in binary floating point. What the scaling changes is the *numerics*: an interior-point solver and the
certificate's Cholesky test work to a precision relative to the largest entries, so multipliers spread over
many orders of magnitude (``1e-11`` for the first layer of a deep net and ``1`` for the last, or a
``diag(1e8, 1e-8)`` layer) lose the small ones.

The exponents come from three cheap estimates, none of them a bound (the certificate proves whatever comes
out):

1. **Block level, with cancellations.** The product of layer norms ignores that signed weights cancel: the
   LipSDP value of 64 random 16x16 layers of norm 1 is about ``1e-5``, not ``1``. A greedy search for a worst
   input direction and activation pattern (power iteration on ``J = W_m S_m ... S_1 W_0`` with each slope set
   to its sector end that increases ``|u^T J x|``) estimates the Lipschitz constant ``L_hat``, cancellations
   included. The output is scaled by ``L_hat`` (so ``rho`` is O(1)) and the missing factor
   ``L_hat / prod ||W||`` is spread geometrically over the depth (each block's norm-product gain times
   ``(L_hat / prod ||W||)^(depth_k / depth_out)``): the multipliers of a deep chain grow geometrically with
   depth, and this makes them O(1).
2. **Neuron level.** A few sweeps of network balancing: each neuron's factor becomes the geometric mean of what
   flows in (slope times the row norm of its pre-activation map, in scaled coordinates) and the inverse of what
   flows out (the column norm of the maps reading it), with the input (``dx``) and the output (``y / L_hat``)
   pinned. ``Linear(diag(1e8, 1e-8)) -> ReLU -> Linear(diag(1e-8, 1e8))`` gets the factors ``1e8, 1e-8``
   (as powers of two) and its LMI becomes the identity's.
3. **Slopes.** Each neuron's sector is first normalised to a maximum slope in ``[1, 2)`` (``phi = c phi~``,
   sector ``[alpha / c, beta / c]``, readers of ``phi`` times ``c``), so that saturated activations with slopes
   near ``1e-300`` do not put ``alpha * beta`` below the floating-point range.

One multiplier per layer (LipSDP-Layer) is not invariant under per-neuron factors: in scaled coordinates it is
the multiplier ``lambda D^-2`` of the original network (still a valid QC, and for positively homogeneous
activations exactly LipSDP-Layer of the rebalanced network ``D W_k``, ``W_k+1 D^-1``, which computes the same
function). So for ``slope_mode="layer"`` a block keeps one factor unless its neurons' factors spread over more
than :data:`LAYER_SPREAD` powers of two (a badly balanced layer, where the rebalanced LipSDP-Layer is the
meaningful one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from lipbound.formulations.signal import Lin, SignalModel
from lipbound.network import GroupSortLayer, HouseholderLayer, SlopeRestricted

#: Largest spread (in powers of two) of per-neuron factors inside one block that LipSDP-Layer keeps as one factor.
LAYER_SPREAD = 6
#: Power-iteration restarts and (at most) steps of the worst-direction search; it stops when a step gains less than
#: _GAIN_TOL in log2.
_STARTS, _STEPS, _GAIN_TOL = 2, 25, 1e-3
#: Power iterations with the starting activation pattern before the greedy search changes it.
_PATTERN_POWER_STEPS = 6
#: Power iterations for the norm estimates.
_POWER_STEPS = 8
#: Balancing sweeps over the blocks.
_SWEEPS = 4
#: Largest sum of cubed widths for which :meth:`_Graph.chain_levels` runs (about 0.1 s on 2 cores).
_CHAIN_FLOPS = 1e9


@dataclass(frozen=True, eq=False)
class _Map:
    """``2^power * mat`` with ``max |mat|`` in ``[1/2, 1)`` (``mat=None``: ``2^power * I``), for overflow-free
    estimates at any magnitude."""

    mat: np.ndarray | None
    power: int

    @classmethod
    def of(cls, mat: np.ndarray | None, power: int = 0) -> _Map:
        if mat is None:
            return cls(None, power)
        big = float(np.max(np.abs(mat), initial=0.0))
        if big == 0.0 or not np.isfinite(big):
            return cls(np.zeros_like(mat), power)
        e = int(np.frexp(big)[1])
        return cls(np.ldexp(mat, -e), power + e)

    def apply(self, v: np.ndarray) -> np.ndarray:
        return v if self.mat is None else self.mat @ v

    def apply_t(self, v: np.ndarray) -> np.ndarray:
        return v if self.mat is None else self.mat.T @ v

    def squared(self) -> np.ndarray | None:
        return None if self.mat is None else self.mat * self.mat

    def log2_norm(self) -> float:
        """log2 of an estimate of the spectral norm (a few power iterations: scaling needs no more)."""
        if self.mat is None:
            return float(self.power)
        v = np.ones(self.mat.shape[1]) / np.sqrt(self.mat.shape[1])
        estimate = 0.0
        for _ in range(_POWER_STEPS):
            u = self.mat @ v
            v = self.mat.T @ u
            norm = float(np.linalg.norm(v))
            if norm == 0.0 or not np.isfinite(norm):
                break
            estimate, v = np.sqrt(norm), v / norm
        if estimate == 0.0:  # the start vector may lie in the null space: the largest entry is a lower bound
            estimate = float(np.max(np.abs(self.mat), initial=0.0))
        return float(self.power) + (float(np.log2(estimate)) if estimate > 0 else -np.inf)


def _lin_map(lin: Lin) -> _Map:
    return _Map.of(lin.mat, lin.power)


def slope_exponents(layer, slope_mode: str) -> np.ndarray:
    """Per-neuron ``g`` with ``max(|alpha_i|, |beta_i|) / 2^g_i`` in ``[1, 2)`` (0 for zero or unbounded slopes and
    for GroupSort/Householder); for ``slope_mode="layer"`` one value per block (the largest) unless they spread
    over more than :data:`LAYER_SPREAD` powers of two."""
    if not isinstance(layer, SlopeRestricted):
        return np.zeros(layer.width, dtype=np.int64)
    top = np.maximum(np.abs(layer.alpha), np.abs(layer.beta))
    usable = (top > 0) & np.isfinite(top)
    g = np.where(usable, np.frexp(np.where(usable, top, 1.0))[1] - 1, 0).astype(np.int64)
    if slope_mode == "layer" and int(np.max(g) - np.min(g)) <= LAYER_SPREAD:
        return np.full(layer.width, int(np.max(g)), dtype=np.int64)
    return g


def _logsumexp2(values: list[np.ndarray | float]) -> np.ndarray | float:
    """``log2(sum 2^v)`` elementwise over a list (``-inf`` entries are zeros)."""
    stacked = np.array(values, dtype=float)
    top = np.max(stacked, axis=0)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(np.isfinite(top), safe + np.log2(np.sum(np.exp2(stacked - safe), axis=0)), top)


class _Graph:
    """The signal model's maps in overflow-free form: incoming maps per stage (block 0 through ``W_in``),
    consumers per block, output maps, slopes (after normalisation) and self-loops."""

    def __init__(self, model: SignalModel, slope_exp: list[np.ndarray]):
        self.m = len(model.stages)
        self.sizes = [model.input_dim] + [s.width for s in model.stages]
        w_in = _Map.of(model.input_map)
        self.incoming: list[dict[int, _Map]] = [{}]
        self.consumers: list[list[int]] = [[] for _ in range(self.m + 1)]
        for k, stage in enumerate(model.stages, start=1):
            maps = {}
            for b, lin in stage.pre.items():
                mp = _lin_map(lin)
                if b == 0:  # coefficients of block 0 act on x_1 = W_in dx
                    prod = w_in.mat if mp.mat is None else mp.mat @ w_in.mat
                    mp = _Map.of(prod, mp.power + w_in.power)
                elif slope_exp[b - 1].any():  # readers of a slope-normalised block see phi = 2^g phi~
                    dense = np.eye(self.sizes[b]) if mp.mat is None else mp.mat
                    mp = _Map.of(np.ldexp(dense, slope_exp[b - 1][None, :]), mp.power)
                maps[b] = mp
                self.consumers[b].append(k)
            self.incoming.append(maps)
        self.output: dict[int, _Map] = {}
        for b, lin in model.output.items():
            mp = _lin_map(lin)
            if b == 0:
                prod = w_in.mat if mp.mat is None else mp.mat @ w_in.mat
                mp = _Map.of(prod, mp.power + w_in.power)
            elif slope_exp[b - 1].any():
                dense = np.eye(self.sizes[b]) if mp.mat is None else mp.mat
                mp = _Map.of(np.ldexp(dense, slope_exp[b - 1][None, :]), mp.power)
            self.output[b] = mp
        self.layers = [s.layer for s in model.stages]
        self.choice = [self._identity_choice(layer) for layer in self.layers]
        self.alpha, self.beta, self.top = [], [], []
        for layer, g in zip(self.layers, slope_exp, strict=True):
            if isinstance(layer, SlopeRestricted):
                a = np.where(np.isfinite(layer.alpha), np.ldexp(layer.alpha, -g), -1.0)
                b = np.where(np.isfinite(layer.beta), np.ldexp(layer.beta, -g), 1.0)
            else:
                a = b = np.ones(layer.width)
            self.alpha.append(a)
            self.beta.append(b)
            self.top.append(np.maximum(np.abs(a), np.abs(b)))

    # -- cheap structure estimates
    def depths(self) -> tuple[np.ndarray, int]:
        """Longest path (in stages) from the input to each block, and to the output."""
        depth = np.zeros(self.m + 1, dtype=int)
        for k in range(1, self.m + 1):
            depth[k] = 1 + max((depth[b] for b in self.incoming[k] if b != k), default=0)
        return depth, 1 + max((int(depth[b]) for b in self.output), default=0)

    def norm_product_gains(self) -> tuple[np.ndarray, float]:
        """log2 of the norm-product gains of each block's signal and of the output (per unit ``||dx||``)."""
        gains = np.zeros(self.m + 1)
        for k in range(1, self.m + 1):
            top = float(np.max(self.top[k - 1], initial=0.0))
            parts = [mp.log2_norm() + gains[b] for b, mp in self.incoming[k].items() if b != k]
            g = _logsumexp2(parts) if parts else -np.inf
            gains[k] = g + (np.log2(top) if top > 0 else -np.inf)
            if not np.isfinite(gains[k]):
                gains[k] = gains[k - 1] if k > 1 else 0.0
        out = [mp.log2_norm() + gains[b] for b, mp in self.output.items()]
        return gains, float(_logsumexp2(out)) if out else 0.0

    # -- the worst-direction search (power iteration with greedy activation patterns)
    def _forward(self, x: np.ndarray, slopes: list[np.ndarray]):
        vs, logs, zs = [x], [0.0], [None]
        for k in range(1, self.m + 1):
            parts, scales = [], []
            for b, mp in self.incoming[k].items():
                if b != k:
                    parts.append(mp.apply(vs[b]))
                    scales.append(mp.power + logs[b])
            z, lz = _combine(parts, scales, self.sizes[k])
            v = self._jacobian(k - 1, slopes[k - 1], z)
            if k in self.incoming[k]:  # implicit layer: v = S (P_kk v + z)
                loop = self.incoming[k][k]
                factor = np.exp2(float(loop.power))
                if loop.mat is not None and np.isfinite(factor):
                    a = np.eye(self.sizes[k]) - factor * (slopes[k - 1][:, None] * loop.mat)
                    try:
                        v = np.linalg.solve(a, v)
                    except np.linalg.LinAlgError:
                        pass
            v, lv = _normalised(v, lz)
            vs.append(v)
            logs.append(lv)
            zs.append(z)
        parts = [mp.apply(vs[b]) for b, mp in self.output.items()]
        y, ly = _combine(parts, [mp.power + logs[b] for b, mp in self.output.items()], None)
        return vs, logs, zs, y, ly

    def _backward(self, u: np.ndarray, slopes: list[np.ndarray], zs) -> tuple[np.ndarray, list, list]:
        """Adjoint of the input, the sign of each neuron's effect on ``u^T y`` per unit slope, and the adjoint of
        each stage's output."""
        adj_z: list[tuple[np.ndarray, float] | None] = [None] * (self.m + 1)
        signs: list[np.ndarray] = [np.zeros(n) for n in self.sizes[1:]]
        adjoints: list[np.ndarray] = [np.zeros(n) for n in self.sizes[1:]]
        for k in range(self.m, -1, -1):
            parts, scales = [], []
            if k in self.output:
                parts.append(self.output[k].apply_t(u))
                scales.append(self.output[k].power)
            for j in self.consumers[k]:
                if j != k and adj_z[j] is not None:
                    vec, lg = adj_z[j]
                    parts.append(self.incoming[j][k].apply_t(vec))
                    scales.append(self.incoming[j][k].power + lg)
            a, la = _combine(parts, scales, self.sizes[k])
            if k == 0:
                return a, signs, adjoints
            signs[k - 1] = np.sign(a * zs[k])
            adjoints[k - 1] = a
            if k in self.incoming[k]:
                loop = self.incoming[k][k]
                factor = np.exp2(float(loop.power))
                if loop.mat is not None and np.isfinite(factor):
                    m = np.eye(self.sizes[k]) - factor * (loop.mat.T * slopes[k - 1][None, :])
                    try:
                        a = np.linalg.solve(m, a)
                    except np.linalg.LinAlgError:
                        pass
            adj_z[k] = _normalised(self._jacobian(k - 1, slopes[k - 1], a, transpose=True), la)
        raise AssertionError("unreachable")

    def _jacobian(self, i: int, slopes: np.ndarray, z: np.ndarray, transpose: bool = False) -> np.ndarray:
        """The chosen Jacobian of stage ``i`` (or its transpose) applied to ``z``: the diagonal ``slopes`` of a
        slope-restricted layer, a permutation within each group of a GroupSort layer (``self.choice[i]``: the
        source of each output), the identity or the reflection per group of a Householder layer."""
        layer, choice = self.layers[i], self.choice[i]
        if isinstance(layer, GroupSortLayer):
            if transpose:
                out = np.zeros_like(z)
                out[choice] = z
                return out
            return z[choice]
        if isinstance(layer, HouseholderLayer):
            g = z.reshape(layer.n_groups, layer.group_size)
            proj = np.sum(g * layer.vectors, axis=1, keepdims=True)
            return np.where(choice[:, None], g - 2 * proj * layer.vectors, g).reshape(-1)
        return slopes * z

    def _choose(self, i: int, adjoint: np.ndarray, z: np.ndarray) -> None:
        """Greedy update of a group layer's Jacobian: the choice that maximises ``adjoint^T J z`` (for a
        permutation, pairing the groups' sorted entries: the rearrangement inequality)."""
        layer = self.layers[i]
        if isinstance(layer, GroupSortLayer):
            n, g = layer.n_groups, layer.group_size
            base = (np.arange(n) * g)[:, None]
            order_a = np.argsort(adjoint.reshape(n, g), axis=1) + base
            order_z = np.argsort(z.reshape(n, g), axis=1) + base
            choice = np.empty(layer.width, dtype=np.int64)
            choice[order_a.reshape(-1)] = order_z.reshape(-1)
            self.choice[i] = choice
        elif isinstance(layer, HouseholderLayer):
            a = adjoint.reshape(layer.n_groups, layer.group_size)
            g = z.reshape(layer.n_groups, layer.group_size)
            pa, pz = np.sum(a * layer.vectors, axis=1), np.sum(g * layer.vectors, axis=1)
            # a^T (I - 2 v v^T) z - a^T z = -2 (v^T a)(v^T z): reflect where that is positive
            self.choice[i] = pa * pz < 0

    @staticmethod
    def _identity_choice(layer):
        if isinstance(layer, GroupSortLayer):
            return np.arange(layer.width)
        if isinstance(layer, HouseholderLayer):
            return np.zeros(layer.n_groups, dtype=bool)
        return None

    def worst_direction_gain(self, seed: int = 0) -> float | None:
        """log2 of the largest ``||J x|| / ||x||`` found (a lower estimate of the Lipschitz constant), or None."""
        rng = np.random.default_rng(seed)
        best = -np.inf
        for _ in range(_STARTS):
            x = rng.standard_normal(self.sizes[0])
            x /= np.linalg.norm(x)
            slopes = [t.copy() for t in self.beta]
            self.choice = [self._identity_choice(layer) for layer in self.layers]
            # Power iterations with the starting pattern first: from a random x, ||J x|| of a deep chain is far
            # below ||J|| (J is nearly of rank one), and the greedy pattern updates below stop at the first step
            # that loses (glipsdp-16x64: 2^-62 found, 2^-55.5 for the all-slopes-one Jacobian alone).
            for _ in range(_PATTERN_POWER_STEPS):
                _, _, zs, y, ly = self._forward(x, slopes)
                if not np.isfinite(ly) or not np.any(y):
                    break
                best = max(best, ly)
                grad = self._backward(y, slopes, zs)[0]
                norm = float(np.linalg.norm(grad))
                if not np.isfinite(norm) or norm == 0.0:
                    break
                x = grad / norm
            previous = -np.inf
            for _ in range(_STEPS):
                _, _, zs, y, ly = self._forward(x, slopes)
                if not np.isfinite(ly) or not np.any(y) or ly < previous + _GAIN_TOL:
                    best = max(best, ly) if np.isfinite(ly) else best
                    break
                best, previous = max(best, ly), ly
                grad, signs, adjoints = self._backward(y, slopes, zs)
                for k, layer in enumerate(self.layers):
                    if isinstance(layer, SlopeRestricted):
                        slopes[k] = np.where(signs[k] >= 0, self.beta[k], self.alpha[k])
                    elif (k + 1) not in self.incoming[k + 1]:  # implicit layers keep the identity
                        self._choose(k, adjoints[k], zs[k + 1])
                norm = float(np.linalg.norm(grad))
                if not np.isfinite(norm) or norm == 0.0:
                    break
                x = grad / norm
        return float(best) if np.isfinite(best) else None

    # -- a feasible point of a chain (the levels of LipSDP's multipliers)
    def is_narrow_chain(self) -> bool:
        """A chain of slope-restricted stages whose widths' cubes sum to at most :data:`_CHAIN_FLOPS` (where
        :meth:`chain_levels` applies)."""
        m = self.m
        chain = all(set(self.incoming[k]) == {k - 1} for k in range(1, m + 1)) and set(self.output) == {m}
        return (m > 0 and chain and all(isinstance(layer, SlopeRestricted) for layer in self.layers)
                and sum(float(n) ** 3 for n in self.sizes[1:]) <= _CHAIN_FLOPS)

    def chain_levels(self, t: list[np.ndarray]) -> tuple[np.ndarray, float] | None:
        """Block levels and the output level (log2) of the sequential feasible point of LipSDP-Neuron on a chain
        of slope-restricted stages (ECLipsE-Fast's closed form, Xu and Sivaranjani 2024), computed in the
        coordinates of the per-neuron log2 factors ``t`` (blocks 1..m; a balanced network, so that one multiplier
        per layer fits every neuron), or None for other models and for chains too wide to be worth it
        (:data:`_CHAIN_FLOPS`). The block levels are relative to ``t``, the output level is absolute.

        With ``rho = 1`` and one multiplier ``lambda_k`` per layer, eliminating the blocks in order leaves
        ``S_0 = I`` and ``S_k = 2 lambda_k I - lambda_k^2 A_k`` with ``A_k = G_k P_k S_{k-1}^-1 P_k^T G_k``
        (``G_k = diag(alpha + beta)``); ``lambda_k = 1 / lambda_max(A_k)`` keeps every ``S_k`` positive definite,
        and ``rho = lambda_max(C S_m^-1 C^T)`` closes the chain (the ``alpha beta`` terms are left out: a scaling
        needs the levels, not the bound). Returned: ``-log2(lambda_k) / 2`` (the signal level at which block
        ``k``'s multipliers are O(1); the norm-product gains for a chain without cancellations) and
        ``log2(rho) / 2``. Every matrix is kept as ``2^power * mat`` with ``max |mat|`` near 1, so no magnitude
        overflows. A point of a deep signed chain is far from LipSDP's optimum (glipsdp-16x64: 2^-20.9 against an
        optimum of 2^-34.3), but its levels fall off with depth as the optimum's do; the worst-direction search
        (2^-55.5 there) gives the other side (:func:`choose_exponents`).
        """
        m = self.m
        if not self.is_narrow_chain():
            return None
        s_mat, s_log = None, 0.0  # S_{k-1} = 2^s_log * s_mat (None: the identity of block 0)
        levels = np.empty(m)
        for k in range(1, m + 1):
            mp = _scaled_map(self.incoming[k][k - 1], t[k - 1], t[k - 2] if k > 1 else np.zeros(self.sizes[0]))
            mat = mp.mat
            g = self.alpha[k - 1] + self.beta[k - 1]
            inner = mat @ mat.T if s_mat is None else mat @ _spd_solve(s_mat, mat.T)
            if inner is None:
                return None
            a = _symmetric(g[:, None] * inner * g[None, :])
            big = float(np.max(np.abs(a), initial=0.0))
            if big == 0.0 or not np.isfinite(big):
                return None
            e = int(np.frexp(big)[1])
            a = np.ldexp(a, -e)
            sigma = _largest_eigenvalue(a)
            if not sigma > 0:
                return None
            a_log = 2 * mp.power - s_log + e  # A_k = 2^a_log * a
            levels[k - 1] = (a_log + np.log2(sigma)) / 2  # -log2(lambda_k) / 2, lambda_k = 2^-a_log / sigma
            s_mat, s_log = (2.0 / sigma) * np.eye(len(a)) - a / sigma ** 2, -a_log
        n_out = self.sizes[m] if self.output[m].mat is None else self.output[m].mat.shape[0]
        out = _scaled_map(self.output[m], np.zeros(n_out), t[m - 1])
        c = out.mat
        inner = c @ _spd_solve(s_mat, c.T)
        if inner is None:
            return None
        rho = _largest_eigenvalue(_symmetric(inner))
        if not rho > 0:
            return None
        return levels, (np.log2(rho) + 2 * out.power - s_log) / 2

    # -- balancing
    def balance(self, t: list[np.ndarray], t_out: float, groups: list[np.ndarray | None]) -> list[np.ndarray]:
        """Sweeps of per-neuron (per-group) balancing of log2 factors ``t`` (block 0 pinned at 0, output at
        ``t_out``)."""
        t = [np.zeros(self.sizes[0])] + [x.astype(float).copy() for x in t]
        sq_in = [{b: mp.squared() for b, mp in self.incoming[k].items()} for k in range(self.m + 1)]
        sq_out = {b: mp.squared() for b, mp in self.output.items()}
        for _ in range(_SWEEPS):
            for k in range(1, self.m + 1):
                ins = []
                for b, mp in self.incoming[k].items():
                    ins.append(_log2_row_norms(sq_in[k][b], mp.power, t[b]))
                outs = []
                for j in self.consumers[k]:
                    outs.append(_log2_row_norms(_transpose(sq_in[j][k]), self.incoming[j][k].power, -t[j]))
                if k in self.output:
                    outs.append(_log2_row_norms(_transpose(sq_out[k]), self.output[k].power,
                                                np.full(1 if self.output[k].mat is None else
                                                        self.output[k].mat.shape[0], -t_out)))
                with np.errstate(divide="ignore"):
                    log_in = 2 * _logsumexp2(ins) + 2 * np.log2(self.top[k - 1]) if ins else np.full(self.sizes[k],
                                                                                                    -np.inf)
                log_out = 2 * _logsumexp2(outs) if outs else np.full(self.sizes[k], -np.inf)
                if groups[k - 1] is not None:
                    log_in = _group_sum(log_in, groups[k - 1])
                    log_out = _group_sum(log_out, groups[k - 1])
                with np.errstate(invalid="ignore"):  # inf - inf (a dead neuron): kept as it was, below
                    new = (log_in - log_out) / 4  # squared norms: d^2 = in / out
                ok = np.isfinite(new)
                t[k] = np.where(ok, new, t[k])
        return t[1:]


def _scaled_map(mp: _Map, row_log2: np.ndarray, col_log2: np.ndarray) -> _Map:
    """``diag(2^-row_log2) M diag(2^col_log2)`` for ``M = mp`` (dense), overflow-free."""
    mat = np.eye(len(row_log2)) if mp.mat is None else mp.mat
    shift = col_log2[None, :] - row_log2[:, None]
    top = float(np.max(shift)) if shift.size else 0.0
    if not np.isfinite(top):
        return _Map.of(mat, mp.power)
    top = np.floor(top)
    return _Map.of(mat * np.exp2(shift - top), mp.power + int(top))


def _symmetric(a: np.ndarray) -> np.ndarray:
    return (a + a.T) / 2


def _spd_solve(s_mat: np.ndarray, rhs: np.ndarray) -> np.ndarray | None:
    """``s_mat^-1 rhs`` by Cholesky (None when ``s_mat`` is not numerically positive definite)."""
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(s_mat), rhs)
    except (np.linalg.LinAlgError, ValueError):
        return None


def _largest_eigenvalue(a: np.ndarray) -> float:
    n = a.shape[0]
    return float(scipy.linalg.eigh(a, eigvals_only=True, subset_by_index=[n - 1, n - 1])[0])


def _transpose(sq: np.ndarray | None) -> np.ndarray | None:
    return None if sq is None else sq.T


def _log2_row_norms(sq: np.ndarray | None, power: int, col_log2: np.ndarray) -> np.ndarray:
    """log2 of the row norms of ``2^power * M diag(2^col_log2)`` given ``sq = M * M`` (None: identity)."""
    if sq is None:
        return power + col_log2
    top = float(np.max(col_log2, initial=-np.inf))
    if not np.isfinite(top):
        return np.full(sq.shape[0], -np.inf)
    sums = sq @ np.exp2(2 * (col_log2 - top))
    with np.errstate(divide="ignore"):
        return power + top + 0.5 * np.log2(sums)


def _group_sum(log_vals: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per-neuron log2 of the sum of ``2^log_vals`` over each neuron's group."""
    out = np.empty_like(log_vals)
    for g in np.unique(groups):
        sel = groups == g
        out[sel] = _logsumexp2(list(log_vals[sel]))
    return out


def _combine(parts: list[np.ndarray], scales: list[float], n: int | None) -> tuple[np.ndarray, float]:
    """``sum_i 2^scales_i parts_i`` as a unit vector and its log2 norm."""
    if not parts:
        return np.zeros(n if n is not None else 0), -np.inf
    finite = [s for s in scales if np.isfinite(s)]
    if not finite:
        return np.zeros_like(parts[0]), -np.inf
    top = max(finite)
    total = sum(np.exp2(s - top) * p for p, s in zip(parts, scales, strict=True) if np.isfinite(s))
    return _normalised(total, top)


def _normalised(v: np.ndarray, log_scale: float) -> tuple[np.ndarray, float]:
    norm = float(np.linalg.norm(v))
    if norm == 0.0 or not np.isfinite(norm) or not np.isfinite(log_scale):
        return np.zeros_like(v), -np.inf
    return v / norm, log_scale + float(np.log2(norm))


def _groups(layer) -> np.ndarray | None:
    if isinstance(layer, (GroupSortLayer, HouseholderLayer)):
        return np.repeat(np.arange(layer.n_groups), layer.group_size)
    return None


def choose_exponents(model: SignalModel, slope_mode: str, slope_exp: list[np.ndarray],
                     cancellation: bool = True) -> tuple:
    """Scaling exponents ``(e_in, E_1, ..., E_m, e_out)`` for :func:`~lipbound.formulations.lipschitz_problem`,
    from the data (see the module docstring); ``E_k`` is an int (one factor for the block), a list of ints (one
    power of two per neuron) or ``{"exponents": [...], "factors": [...]}`` (real factors, for ``"layer"`` on badly
    balanced blocks). ``slope_exp``: the slope normalisation (:func:`slope_exponents`). ``cancellation=False``
    skips the worst-direction search: block levels from norm products only (what :func:`lipbound.certify` retries
    with when a solve at the searched levels stops short).

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> from lipbound.formulations.signal import signal_model
    >>> model = signal_model(lipbound.from_weights([np.diag([1e8, 1e-8]), np.diag([1e-8, 1e8])], "relu"))
    >>> choose_exponents(model, "neuron", [np.zeros(2, dtype=int)])
    (27, [27, -27], 0)
    """
    graph = _Graph(model, slope_exp)
    gains, out_np = graph.norm_product_gains()
    depth, depth_out = graph.depths()
    worst = graph.worst_direction_gain() if cancellation else None
    groups = [_groups(layer) for layer in graph.layers]
    chain = None
    if cancellation and graph.is_narrow_chain():  # the balancing below is not repeated for other models
        plain = graph.balance([np.full(graph.sizes[k], gains[k]) for k in range(1, graph.m + 1)], out_np, groups)
        chain = graph.chain_levels(plain)
    if chain is None:
        cancellation = 0.0 if worst is None else min(worst - out_np, 0.0)
        t_out = out_np + cancellation
        start = [np.full(graph.sizes[k], gains[k] + cancellation * depth[k] / depth_out)
                 for k in range(1, graph.m + 1)]
        balanced = graph.balance(start, t_out, groups)
    else:
        # LipSDP's optimum lies between the worst direction found (below the Lipschitz constant) and the chain's
        # feasible point (found in balanced coordinates): the output level is their midpoint (in log2), and the
        # missing factor falls off with depth as the multipliers do.
        levels, t_chain = chain
        t_out = t_chain if worst is None else (t_chain + min(worst, t_chain)) / 2
        balanced = [plain[k - 1] + levels[k - 1] + (t_out - t_chain) * depth[k] / depth_out
                    for k in range(1, graph.m + 1)]
    blocks: list[int | list[int] | dict] = []
    for t in balanced:
        e = np.round(t).astype(np.int64)
        if np.all(e == e[0]):
            blocks.append(int(e[0]))
        elif slope_mode != "layer":
            blocks.append([int(v) for v in e])
        elif int(np.max(e) - np.min(e)) <= LAYER_SPREAD:
            blocks.append(int(np.round(np.mean(t))))
        else:
            # The multiplier lambda D^-2 of a badly balanced layer: powers of two would leave up to a factor
            # sqrt(2) of imbalance per neuron, which LipSDP-Layer pays in full.
            blocks.append(_factors(t))
    e_in = w_in_exponent(model.input_map)
    e_out = int(np.round(t_out)) if np.isfinite(t_out) else 0
    return (e_in, *blocks, e_out)


def _factors(t: np.ndarray) -> dict:
    """Real factors ``2^t`` as ``{"exponents": floor(t), "factors": 2^frac(t)}`` (any magnitude, JSON-exact)."""
    whole = np.floor(t)
    return {"exponents": [int(v) for v in whole], "factors": [float(v) for v in np.exp2(t - whole)]}


def w_in_exponent(w_in: np.ndarray) -> int:
    """A power of two near ``||W_in||`` by which ``W_in`` divides exactly (no bits lost below the subnormals)."""
    big = float(np.max(np.abs(w_in), initial=0.0))
    if big == 0.0:
        return 0
    e = int(np.round(_Map.of(w_in).log2_norm()))
    nonzero = np.abs(w_in[w_in != 0])
    # Dividing by 2^e keeps every bit when the smallest entry's last mantissa bit stays >= 2^-1074.
    lowest = int(np.min(np.frexp(nonzero)[1])) - 53
    return min(e, lowest + 1074)
