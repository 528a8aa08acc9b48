"""Certified local l2 Lipschitz bounds of PolyNorm MLPs by composition over rigorous boxes.

A PolyNorm MLP ``Linear -> PolyNorm -> Linear -> ... -> Linear`` (a ``torch.nn.Sequential`` of ``torch.nn.Linear``
and :class:`lipbound.nn.PolyNorm`) is a composition ``f = g_K o ... o g_1``. If every stage input ``z_k(x)`` stays
in a box ``Z_k`` for all ``x`` in the domain, then ``Lip(f; domain) <= prod_k Lip(g_k; Z_k)``: for ``x, x'`` in the
(convex) domain, ``||z_{k+1}(x) - z_{k+1}(x')|| <= Lip(g_k; Z_k) ||z_k(x) - z_k(x')||`` because both points lie in
``Z_k`` and ``Z_k`` is convex. The factors are

* Linear: a certified spectral norm ``||W||_2`` (:func:`lipbound.rigorous.spectral_norm_upper`);
* PolyNorm: :func:`lipbound.polynorm.polynorm_local_lipschitz` on ``Z_k``.

The boxes are propagated with outward rounding and are the intersection of two sound enclosures:

1. interval propagation: :meth:`lipbound.Box.linear_bounds` (``domain.linear_bounds`` for a first Linear, which
   uses the l2/linf geometry of a ball) and :func:`lipbound.polynorm.polynorm_output_enclosure`;
2. a Lipschitz ball: with the domain centre ``c``, its l2 radius ``rho`` and the certified prefix constant
   ``L_k``, ``||z_k(x) - z_k(c)|| <= L_k rho``, and ``z_k(c)`` is enclosed by propagating the point ``c``; the
   image of that ball under the next Linear is bounded with :meth:`lipbound.Ball.linear_bounds`.

Weights, biases and PolyNorm coefficients are read as float64 (exact for float32 parameters); the bound is for the
exact real network with those parameters.

Examples
--------
>>> import torch, lipbound
>>> from lipbound.nn import PolyNorm
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), PolyNorm(), torch.nn.Linear(6, 2))
>>> cert = certify_polynorm_mlp(model, lipbound.Ball([0.1, 0.2, -0.3, 0.4], 0.05))
>>> cert.layers
('Linear', 'PolyNorm', 'Linear')
>>> bool(0 < cert.upper_bound <= cert.global_upper_bound)
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

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
from lipbound.rigorous import round_down, round_up, spectral_norm_upper, sqrt_up

__all__ = ["PolyNormCertificate", "certify_polynorm_mlp"]


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


def _domain_center_radius(domain: Box | Ball) -> tuple[np.ndarray, float]:
    """A float centre ``c`` and a float ``rho`` with the domain inside the l2 ball ``B(c, rho)``."""
    if isinstance(domain, Ball):
        if domain.norm == "l2":
            return np.array(domain.center), float(domain.radius)
        return np.array(domain.center), sqrt_up(Fraction(domain.radius) ** 2 * domain.dim)
    lo, hi = domain.lower, domain.upper
    c = np.clip(0.5 * lo + 0.5 * hi, lo, hi)  # the centre must lie in the domain (subnormal halving rounds)
    half = np.nextafter(np.maximum(hi - c, c - lo), np.inf)
    return c, sqrt_up(sum((Fraction(float(h)) ** 2 for h in half), Fraction(0)))


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


_ETA = 2.0**-1022  # >= the underflow error of one product (half the subnormal spacing), generously


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
    center, rho = _domain_center_radius(domain)
    box = domain.enclosing_box()
    center_box = (center.copy(), center.copy())
    prefix, prefix_global = 1.0, 1.0
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
            factor = spectral_norm_upper(w)
            global_factor = factor
            matrices.append((w, np.zeros_like(w)))
            layers.append("Linear")
            dim = w.shape[0]
        else:
            if stage.eps < np.finfo(np.float64).tiny:
                raise ValueError(f"model[{k}] (PolyNorm) has eps = {stage.eps}; a normal float > 0 is required.")
            coefs = stage.coefficients()
            global_factor = polynorm_global_lipschitz(coefs, dim, stage.eps)
            if _finite(box):
                factor = polynorm_local_lipschitz(coefs, stage.eps, box[0], box[1])
                new_box = polynorm_output_enclosure(coefs, stage.eps, box[0], box[1])
                matrices.append(_midrad(*polynorm_jacobian_enclosure(coefs, stage.eps, box[0], box[1])))
            else:  # overflowed pre-activation bounds: the global facts still hold
                factor, new_box = global_factor, _polynorm_range(coefs, dim)
                matrices.append((np.zeros((dim, dim)), np.full((dim, dim), np.inf)))
            # ||y(x) - y(c)|| <= factor ||z(x) - z(c)|| <= factor * prefix * rho (both in the box, which is convex)
            y_center = polynorm_output_enclosure(coefs, stage.eps, *center_box)
            reach = _mul_up(_mul_up(factor, prefix), rho)
            if math.isfinite(reach):
                new_box = _intersect(new_box, (np.nextafter(y_center[0] - reach, -np.inf),
                                               np.nextafter(y_center[1] + reach, np.inf)))
            center_box = y_center
            layers.append("PolyNorm")
        factors.append(factor)
        prefix = _mul_up(prefix, factor)
        prefix_global = _mul_up(prefix_global, global_factor)
        box = new_box
    widths.append(float(np.max(box[1] - box[0])))
    return PolyNormCertificate(upper_bound=_chain_bound(matrices, factors), product_bound=prefix,
                               factors=tuple(factors), layers=tuple(layers), box_widths=tuple(widths),
                               global_upper_bound=prefix_global)
