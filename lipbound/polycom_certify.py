"""Certified local l2 Lipschitz bounds of PolyNorm MLPs by composition over rigorous boxes.

A PolyNorm MLP ``Linear -> PolyNorm -> Linear -> ... -> Linear`` (a ``torch.nn.Sequential`` of ``torch.nn.Linear``
and :class:`lipbound.nn.PolyNorm`) is a composition ``f = g_K o ... o g_1`` with stage inputs ``z_1 = x``,
``z_{k+1} = g_k(z_k)``. Suppose every ``z_k(x)``, ``x`` in the (convex) domain, lies in a convex set ``S_k`` on
which ``g_k`` is ``L_k``-Lipschitz. Then ``||z_{k+1}(x) - z_{k+1}(x')|| <= L_k ||z_k(x) - z_k(x')||`` for
``x, x'`` in the domain, so ``prod_k L_k`` is a local Lipschitz bound of ``f`` (``product_bound``). The factors:

* Linear: a certified spectral norm ``||W||_2`` (:func:`lipbound.rigorous.spectral_norm_upper`, via
  :func:`lipbound.polynorm.interval_matrix_norm_upper`);
* PolyNorm: :func:`lipbound.polynorm.polynorm_local_lipschitz` on ``S_k = Z_k  n  {z : dist(z, C_k) <= P_k rho}``,
  where ``Z_k`` is a rigorous box of ``z_k``, ``C_k`` a box enclosing ``z_k(c)`` at the domain centre ``c``,
  ``rho`` the l2 radius of the domain around ``c`` and ``P_k`` a certified Lipschitz bound of ``x -> z_k``. The
  distance constraint gives ``||z||_2 >= ||C_k||_min - P_k rho`` on ``S_k``, which sharpens the normalisations.

The reported ``upper_bound`` is sharper: by the chain rule ``J_f(x) = M_K ... M_1`` with ``M_k`` the Jacobian of
``g_k`` at ``z_k(x)``, and each ``M_k`` lies in a certified midpoint-radius interval matrix for all ``x`` (``W``
itself, or :func:`lipbound.polynorm.polynorm_jacobian_enclosure` on ``S_k``). The product of any run of
consecutive stages is enclosed by rigorous midpoint-radius matrix products and bounded in norm; the best
splitting of the chain into runs (dynamic programming; single stages use their factors) bounds
``sup ||J_f||_2`` over the domain, hence the Lipschitz constant (mean value inequality, ``f`` is C^1).

The boxes ``Z_k`` are propagated with outward rounding as the intersection of three sound enclosures:

1. interval propagation: :meth:`lipbound.Box.linear_bounds` (``domain.linear_bounds`` for a first Linear, which
   uses the l2/linf geometry of a ball) and :func:`lipbound.polynorm.polynorm_output_enclosure`;
2. a Lipschitz ball: ``||z_k(x) - z_k(c)|| <= P_k rho`` with ``z_k(c)`` in ``C_k``;
3. a mean-value form: ``z_k(x) - z_k(c) = A (x - c)`` with ``A`` in the enclosure of the prefix product
   ``M_{k-1} ... M_1``, so each coordinate moves by at most ``(||C_j||_2 + ||R_j||_2) rho`` (rows of the centre
   and radius matrices), and by at most ``((|C| + R) h)_j`` for a box or linf domain of half-widths ``h``.

Weights, biases and PolyNorm coefficients are read as float64 (exact for float32 parameters); the bound is for the
exact real network with those parameters.

Examples
--------
>>> import torch, lipbound
>>> from lipbound.nn import PolyNorm
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), PolyNorm(), torch.nn.Linear(6, 2))
>>> cert = certify_polynorm_mlp(model, lipbound.Ball([0.1, 0.2, -0.3, 0.4], 0.05))
>>> cert.layers
('Linear', 'PolyNorm', 'Linear')
>>> bool(0 < cert.upper_bound <= cert.product_bound <= cert.global_upper_bound)
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

from lipbound.bounds import Ball, Box, DomainError
from lipbound.errors import UnsupportedLayerError
from lipbound.nn.polycom import PolyNorm
from lipbound.polynorm import (
    interval_matrix_norm_upper,
    polynorm_global_lipschitz,
    polynorm_jacobian_enclosure,
    polynorm_local_lipschitz,
    polynorm_output_enclosure,
)
from lipbound.program import UNIT_ROUNDOFF, gamma
from lipbound.rigorous import round_down, round_up, sqrt_up

__all__ = ["PolyNormCertificate", "certify_polynorm_mlp"]

_ETA = 2.0**-1022  # >= the underflow error of one product (half the subnormal spacing), generously


@dataclass(frozen=True)
class PolyNormCertificate:
    """A certified local l2 Lipschitz bound of a PolyNorm MLP on a domain.

    Attributes
    ----------
    upper_bound : float
        ``||f(x) - f(x')||_2 <= upper_bound ||x - x'||_2`` for ``x, x'`` in the domain: the best certified
        splitting of the Jacobian chain (at most ``product_bound``).
    product_bound : float
        ``prod(factors)`` rounded up (the plain composition bound).
    factors : tuple of float
        One certified factor per stage (spectral norm of a Linear, local constant of a PolyNorm).
    layers : tuple of str
        ``"Linear"`` or ``"PolyNorm"``, one per stage.
    box_widths : tuple of float
        Largest width ``max(upper - lower)`` of the box of each stage's input, then of the output (one more
        entry than ``layers``).
    global_upper_bound : float
        The product with PolyNorm's global constants instead (valid on all of ``R^n``), for comparison.
    norm : str
        Always ``"l2"``.
    """

    upper_bound: float
    product_bound: float
    factors: tuple[float, ...]
    layers: tuple[str, ...]
    box_widths: tuple[float, ...]
    global_upper_bound: float
    norm: str = "l2"

    def to_dict(self) -> dict:
        """A JSON-ready dictionary of the fields."""
        out = asdict(self)
        for key in ("factors", "layers", "box_widths"):
            out[key] = list(out[key])
        return out


def _stages(model: torch.nn.Module) -> list[torch.nn.Module]:
    if not isinstance(model, torch.nn.Sequential):
        raise UnsupportedLayerError(
            [("model", type(model).__name__)],
            "certify_polynorm_mlp expects a torch.nn.Sequential of torch.nn.Linear and lipbound.nn.PolyNorm.")
    stages = list(model.children())
    bad = [(f"model[{k}]", type(m).__name__) for k, m in enumerate(stages)
           if not isinstance(m, (torch.nn.Linear, PolyNorm))]
    if bad:
        raise UnsupportedLayerError(bad, "supported modules: torch.nn.Linear and lipbound.nn.PolyNorm.")
    if not stages:
        raise UnsupportedLayerError([("model", "empty Sequential")], "the model needs at least one module.")
    return stages


def _linear_params(layer: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    w = layer.weight.detach().cpu().to(torch.float64).numpy()
    b = np.zeros(w.shape[0]) if layer.bias is None else layer.bias.detach().cpu().to(torch.float64).numpy()
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
        raise ValueError(f"Linear layer {layer} has non-finite weights or biases.")
    return w, b


class _Geometry(NamedTuple):
    """A float centre ``c`` in the domain, ``rho`` with the domain inside the l2 ball ``B(c, rho)``, and for boxes
    and linf balls half-widths ``h`` with the domain inside ``[c - h, c + h]`` (else ``None``)."""

    center: np.ndarray
    rho: float
    half: np.ndarray | None


def _geometry(domain: Box | Ball) -> _Geometry:
    if isinstance(domain, Ball):
        c = np.array(domain.center)
        if domain.norm == "l2":
            return _Geometry(c, float(domain.radius), None)
        return _Geometry(c, sqrt_up(Fraction(domain.radius) ** 2 * domain.dim), np.full(domain.dim, domain.radius))
    lo, hi = domain.lower, domain.upper
    c = np.clip(0.5 * lo + 0.5 * hi, lo, hi)  # the centre must lie in the domain (subnormal halving rounds)
    half = np.nextafter(np.maximum(hi - c, c - lo), np.inf)
    return _Geometry(c, sqrt_up(sum((Fraction(float(h)) ** 2 for h in half), Fraction(0))), half)


def _row_norms_up(m: np.ndarray) -> np.ndarray:
    """Floats >= the l2 norms of the rows of ``m``."""
    sq = np.nextafter(m * m, np.inf)
    n = m.shape[1]
    total = np.nextafter(np.sum(sq, axis=1) * (1.0 + 4.0 * (n + 1) * UNIT_ROUNDOFF), np.inf)
    return np.nextafter(np.sqrt(total), np.inf)


def _mean_value_box(center_box: tuple[np.ndarray, np.ndarray], jac: tuple[np.ndarray, np.ndarray],
                    geometry: _Geometry) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounds of ``z(c) + A (x - c)`` over ``z(c)`` in ``center_box``, ``A`` in ``jac`` and ``x`` in the domain."""
    c, r = jac
    if not (_finite(center_box) and np.all(np.isfinite(c)) and np.all(np.isfinite(r))):
        return None
    spread = np.nextafter((_row_norms_up(c) + _row_norms_up(r)) * geometry.rho, np.inf)
    spread = np.nextafter(spread * (1.0 + 4.0 * UNIT_ROUNDOFF), np.inf)  # the sum and product above
    if geometry.half is not None:
        n = c.shape[1]
        box_spread = np.nextafter(((np.abs(c) + r) @ geometry.half) * (1.0 + 4.0 * (n + 3) * UNIT_ROUNDOFF)
                                  + (n + 4) * _ETA, np.inf)
        spread = np.minimum(spread, box_spread)
    return np.nextafter(center_box[0] - spread, -np.inf), np.nextafter(center_box[1] + spread, np.inf)


def _intersect(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.maximum(a[0], b[0]), np.minimum(a[1], b[1])
    if np.any(lo > hi):
        raise ArithmeticError("two enclosures of the same layer do not overlap (an internal soundness error).")
    return lo, hi


def _ball_image(w: np.ndarray, b: np.ndarray, center_box: tuple[np.ndarray, np.ndarray],
                radius: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounds of ``W y + b`` over ``y`` within l2 distance ``radius`` of some point of ``center_box``."""
    clo, chi = center_box
    mid = 0.5 * clo + 0.5 * chi
    half = np.nextafter(np.maximum(chi - mid, mid - clo), np.inf)
    total = round_up(Fraction(radius) + Fraction(sqrt_up(sum((Fraction(float(h)) ** 2 for h in half),
                                                              Fraction(0)))))
    if not (math.isfinite(total) and np.all(np.isfinite(mid))):
        return None
    return Ball(mid, total, norm="l2").linear_bounds(w, b)


def _finite(box: tuple[np.ndarray, np.ndarray]) -> bool:
    return bool(np.all(np.isfinite(box[0])) and np.all(np.isfinite(box[1])))


def _polynorm_range(coefficients: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """PolyNorm's global output range ``a_0 -+ sqrt(D) sum_i |a_i|`` (each ``|x_k**i / s_i| < sqrt(D)``)."""
    spread = round_up(Fraction(sqrt_up(dim)) * sum((abs(Fraction(float(c))) for c in coefficients[1:]), Fraction(0)))
    a0 = float(coefficients[0])
    return np.full(dim, round_down(Fraction(a0) - Fraction(spread))), np.full(dim, round_up(Fraction(a0) + spread))


def _midrad(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float centre ``C`` and radius ``R`` with ``[lo, hi]`` inside ``[C - R, C + R]`` (entrywise)."""
    mid = 0.5 * lo + 0.5 * hi
    return mid, np.nextafter(np.maximum(hi - mid, mid - lo), np.inf)


def _midrad_matmul(a: tuple[np.ndarray, np.ndarray],
                   b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Midpoint-radius enclosure of ``{A B}`` over ``|A - Ca| <= Ra``, ``|B - Cb| <= Rb`` (Rump's product).

    ``|A B - Ca Cb| <= |Ca| Rb + Ra (|Cb| + Rb)`` and ``|fl(Ca Cb) - Ca Cb| <= gamma_n |Ca| |Cb| + n eta``. The radius
    is a sum of nonnegative dot products of length ``n``: each is at most ``(fl + n eta) / (1 - gamma_n)``, and the
    factor ``1 + 8 (n + 4) u`` (with the added ``(n + 4) eta`` terms) covers these and the three additions.
    """
    (ca, ra), (cb, rb) = a, b
    n = ca.shape[1]
    c = ca @ cb
    abs_ca = np.abs(ca)
    spread = abs_ca @ rb + ra @ (np.abs(cb) + rb) + gamma(n) * (abs_ca @ np.abs(cb))
    r = np.nextafter(np.nextafter(spread * (1.0 + 8.0 * (n + 4) * UNIT_ROUNDOFF), np.inf) + 4 * (n + 4) * _ETA,
                     np.inf)
    return c, np.where(np.isnan(r), np.inf, r)


def _chain_bound(matrices: list[tuple[np.ndarray, np.ndarray]], factors: list[float]) -> float:
    """``min`` over splittings of the chain ``M_K ... M_1`` of the product of the segments' certified norms.

    A single stage contributes its certified factor; a longer segment the norm bound of the midpoint-radius
    enclosure of its product (:func:`lipbound.polynorm.interval_matrix_norm_upper`). Every splitting gives a
    sound bound (submultiplicativity), so the minimum (dynamic programming) is sound.
    """
    count = len(matrices)
    best = [1.0] + [math.inf] * count
    for j in range(count):
        if not math.isfinite(best[j]):
            continue
        prod = None
        for k in range(j, count):
            prod = matrices[k] if prod is None else _midrad_matmul(matrices[k], prod)
            if k == j:
                seg = factors[k]
            elif np.all(np.isfinite(prod[0])) and np.all(np.isfinite(prod[1])):
                lo = np.nextafter(prod[0] - prod[1], -np.inf)
                hi = np.nextafter(prod[0] + prod[1], np.inf)
                seg = interval_matrix_norm_upper(lo, hi)["bound"]
            else:
                seg = math.inf
            best[k + 1] = min(best[k + 1], _mul_up(best[j], seg))
    return best[count]


def _min_norm_down(center_box: tuple[np.ndarray, np.ndarray], reach: float) -> float:
    """A float <= ``min ||z||_2`` over ``z`` within l2 distance ``reach`` of the box ``center_box`` (or 0)."""
    lo, hi = center_box
    if not (math.isfinite(reach) and _finite(center_box)):
        return 0.0
    mig = np.where((lo <= 0) & (hi >= 0), 0.0, np.minimum(np.abs(lo), np.abs(hi)))
    norm = math.nextafter(math.sqrt(round_down(sum((Fraction(float(m)) ** 2 for m in mig), Fraction(0)))), 0.0)
    return max(0.0, round_down(Fraction(norm) - Fraction(reach)))


def _mul_up(x: float, y: float) -> float:
    if math.isinf(x) or math.isinf(y):
        return math.inf
    return round_up(Fraction(x) * Fraction(y))


def certify_polynorm_mlp(model: torch.nn.Module, domain: Box | Ball) -> PolyNormCertificate:
    """Certified local l2 Lipschitz bound of a ``torch.nn.Sequential`` of ``Linear`` and ``PolyNorm`` on a domain.

    Parameters
    ----------
    model : torch.nn.Sequential
        Modules ``torch.nn.Linear`` and :class:`lipbound.nn.PolyNorm` in any order (typically
        ``Linear -> PolyNorm -> ... -> Linear``); PolyNorm normalises over the whole layer width.
    domain : lipbound.Box or lipbound.Ball
        The input region (l2 or linf ball, or box); the bound holds for pairs of points in it.

    Returns
    -------
    PolyNormCertificate

    Raises
    ------
    UnsupportedLayerError
        If the model is not a Sequential of those modules (every offending module is named).
    lipbound.DomainError
        If the domain's dimension does not match the first layer.

    Examples
    --------
    >>> import torch, lipbound
    >>> from lipbound.nn import PolyNorm
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), PolyNorm(order=2), torch.nn.Linear(5, 1))
    >>> cert = certify_polynorm_mlp(model, lipbound.Box([0.0, 0.0, 0.0], [0.1, 0.1, 0.1]))
    >>> len(cert.factors), len(cert.box_widths)
    (3, 4)
    """
    if not isinstance(domain, (Box, Ball)):
        raise DomainError(f"domain must be a lipbound.Box or lipbound.Ball, got {type(domain).__name__}.")
    stages = _stages(model)
    geometry = _geometry(domain)
    rho = geometry.rho
    box = domain.enclosing_box()
    center_box = (geometry.center.copy(), geometry.center.copy())
    jac = (np.eye(domain.dim), np.zeros((domain.dim, domain.dim)))  # enclosure of d z_k / d x over the domain
    prefix, product, product_global = 1.0, 1.0, 1.0
    factors: list[float] = []
    matrices: list[tuple[np.ndarray, np.ndarray]] = []
    layers: list[str] = []
    widths: list[float] = []
    dim = domain.dim
    for k, stage in enumerate(stages):
        widths.append(float(np.max(box[1] - box[0])))
        if isinstance(stage, torch.nn.Linear):
            w, b = _linear_params(stage)
            if w.shape[1] != dim:
                raise DomainError(f"model[{k}] (Linear) expects {w.shape[1]} inputs but receives {dim} "
                                  f"({'the domain' if k == 0 else 'the previous layer'}).")
            if k == 0:
                new_box = domain.linear_bounds(w, b)
            elif _finite(box):
                new_box = Box(*box).linear_bounds(w, b)
            else:
                new_box = (np.full(w.shape[0], -np.inf), np.full(w.shape[0], np.inf))
            ball = _ball_image(w, b, center_box, _mul_up(prefix, rho))
            if ball is not None:
                new_box = _intersect(new_box, ball)
            center_box = Box(*center_box).linear_bounds(w, b)
            factor = global_factor = interval_matrix_norm_upper(w, w)["bound"]  # ||W||_2, underflow-safe
            matrix = (w, np.zeros_like(w))
            layers.append("Linear")
            dim = w.shape[0]
        else:
            if stage.eps < np.finfo(np.float64).tiny:
                raise ValueError(f"model[{k}] (PolyNorm) has eps = {stage.eps}; a normal float > 0 is required.")
            coefs = stage.coefficients()
            global_factor = polynorm_global_lipschitz(coefs, dim, stage.eps)
            reach_in = _mul_up(prefix, rho)
            min_norm = _min_norm_down(center_box, reach_in)  # ||z|| on S_k (module notes)
            if _finite(box):
                factor = polynorm_local_lipschitz(coefs, stage.eps, box[0], box[1], min_norm)
                new_box = polynorm_output_enclosure(coefs, stage.eps, box[0], box[1], min_norm)
                matrix = _midrad(*polynorm_jacobian_enclosure(coefs, stage.eps, box[0], box[1], min_norm))
            else:  # overflowed pre-activation bounds: the global facts still hold
                factor, new_box = global_factor, _polynorm_range(coefs, dim)
                matrix = (np.zeros((dim, dim)), np.full((dim, dim), np.inf))
            # ||y(x) - y(c)|| <= factor ||z(x) - z(c)|| <= factor * prefix * rho (z(x), z(c) in S_k, which is convex)
            y_center = polynorm_output_enclosure(coefs, stage.eps, *center_box, min_norm)
            reach = _mul_up(factor, reach_in)
            if math.isfinite(reach):
                new_box = _intersect(new_box, (np.nextafter(y_center[0] - reach, -np.inf),
                                               np.nextafter(y_center[1] + reach, np.inf)))
            center_box = y_center
            layers.append("PolyNorm")
        matrices.append(matrix)
        factors.append(factor)
        jac = _midrad_matmul(matrix, jac)
        mean_value = _mean_value_box(center_box, jac, geometry)
        if mean_value is not None:
            new_box = _intersect(new_box, mean_value)
        product = _mul_up(product, factor)
        prefix = _chain_bound(matrices, factors)  # a certified Lipschitz bound of x -> (next stage input)
        product_global = _mul_up(product_global, global_factor)
        box = new_box
    widths.append(float(np.max(box[1] - box[0])))
    return PolyNormCertificate(upper_bound=prefix, product_bound=product, factors=tuple(factors),
                               layers=tuple(layers), box_widths=tuple(widths), global_upper_bound=product_global)
