"""Input domains (boxes and norm balls) and rigorous bounds of linear functions over them.

:class:`Box` and :class:`Ball` are the public domains; :class:`Concretizer` is their torch form used by the
propagation: it bounds ``a x + d`` over the domain for dense rows ``a`` (the dual norm for balls) and ``A x + b``
for a graph operator (:class:`~lipbound.bounds.operators.LinearOperator`) applied to the input itself, so the
first linear map is concretised over the domain, not over its enclosing box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lipbound.bounds.operators import (
    F64,
    LinearOperator,
    abs_term,
    bound_sum,
    box_spread,
    center_radius,
    center_terms,
    inexact_spread,
    nan_to,
    operator_box,
    rel,
)
from lipbound.errors import LipboundError
from lipbound.rigorous import outward_down as _dn
from lipbound.rigorous import outward_up as _up


class DomainError(LipboundError, ValueError):
    """An input domain is invalid (shape, NaN/inf, empty) or does not match the network."""


class Concretizer:
    """Rigorous lower/upper bounds of linear functions over a domain (torch, float64).

    ``kind`` is ``"box"`` (``radius`` a vector with the box inside ``[center - radius, center + radius]``) or
    ``"l2"``/``"linf"`` (``radius`` a scalar); ``box`` is a box containing the domain.
    """

    def __init__(self, kind: str, center: torch.Tensor, radius: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor]):
        self.kind = kind
        self.center = center
        self.radius = radius
        self.box = box

    @classmethod
    def from_box(cls, lo: torch.Tensor, hi: torch.Tensor) -> Concretizer:
        c, r = center_radius(lo, hi)
        return cls("box", c, r, (lo, hi))

    def _dual_norm(self, sq_or_abs: torch.Tensor, n: int) -> torch.Tensor:
        """A float >= the dual norm of rows whose squares (l2) or absolute values (linf) sum to ``sq_or_abs``."""
        if self.kind == "l2":  # exact sum <= fl(sum) (1 + rel) + underflow
            return _up(torch.sqrt(_up(_up(sq_or_abs * (1.0 + rel(n))) + abs_term(n))))
        return _up(_up(sq_or_abs * (1.0 + rel(n))) + abs_term(n))

    def spread(self, a: torch.Tensor) -> torch.Tensor:
        """A float >= max over the domain of ``a (x - c)``, per row (the dual norm for balls)."""
        if self.kind == "box":
            return box_spread(a, self.radius)
        sums = (a * a).sum(-1) if self.kind == "l2" else a.abs().sum(-1)
        return nan_to(_up(self.radius * self._dual_norm(sums, a.shape[-1])), math.inf)

    def bounds(self, a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds of ``a x + d`` over the domain, ``a`` dense (..., m, n)."""
        t, err = center_terms(a, d, self.center)
        return bound_sum(t, self.spread(a), err)

    def lower(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.bounds(a, d)[0]

    def upper(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.bounds(a, d)[1]

    def operator_bounds(self, a: LinearOperator) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds of ``A x + b`` over the domain, for every ``A``, ``b`` within the operator's error bounds."""
        if self.kind == "box":
            return operator_box(a, *self.box)
        n = a.fwd_terms
        c = self.center
        t = a.matvec(c) + a.bias
        err = nan_to(_up(_up(rel(n + 1) * (a.abs_matvec(c.abs()) + a.bias.abs())) + abs_term(n)),
                     math.inf)
        sums = a.sq_row_sums() if self.kind == "l2" else a.abs_row_sums()
        spread = nan_to(_up(self.radius * self._dual_norm(sums, n)), math.inf)
        xmax = torch.maximum(self.box[0].abs(), self.box[1].abs())
        return bound_sum(t, inexact_spread(a, spread, xmax), err)


# ----------------------------------------------------------------------------------------------
# Input domains
# ----------------------------------------------------------------------------------------------


def _vector(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise DomainError(f"{what} must be a 1-D array of real numbers, got {type(value).__name__}.") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise DomainError(f"{what} must be a non-empty 1-D array (n,), got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise DomainError(f"{what} (shape {arr.shape}) must be finite; entry {i} is {arr[i]}.")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Box:
    """The box ``{x : lower <= x <= upper}`` (elementwise).

    Parameters
    ----------
    lower, upper : array_like, shape (n,)
        Finite ends with ``lower <= upper``; ``lower == upper`` gives a single point.

    Examples
    --------
    >>> box = Box([-1.0, 0.0], [1.0, 2.0])
    >>> box.dim
    2
    >>> lo, hi = box.linear_bounds([[1.0, -1.0]])  # x_0 - x_1 over the box
    >>> float(lo[0]) <= -3.0, float(hi[0]) >= 1.0
    (True, True)
    """

    lower: np.ndarray
    upper: np.ndarray

    def __post_init__(self):
        lower = _vector(self.lower, "Box lower")
        upper = _vector(self.upper, "Box upper")
        if lower.shape != upper.shape:
            raise DomainError(f"Box lower has shape {lower.shape} but upper has shape {upper.shape}; they must match.")
        if np.any(lower > upper):
            i = int(np.flatnonzero(lower > upper)[0])
            raise DomainError(f"Box (shape {lower.shape}) is empty: lower[{i}] = {lower[i]} > upper[{i}] = {upper[i]}.")
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)

    @property
    def dim(self) -> int:
        """Dimension ``n`` of the domain."""
        return int(self.lower.size)

    def enclosing_box(self) -> tuple[np.ndarray, np.ndarray]:
        """The box itself, as ``(lower, upper)`` copies.

        Examples
        --------
        >>> Box([0.0], [1.0]).enclosing_box()
        (array([0.]), array([1.]))
        """
        return self.lower.copy(), self.upper.copy()

    def linear_bounds(self, a: Any, b: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Rigorous bounds of ``a x + b`` over the box: ``a c + b -+ |a| r`` (centre ``c``, half-widths ``r``).

        Parameters
        ----------
        a : array_like, shape (m, n) or (n,)
        b : array_like, shape (m,), optional

        Returns
        -------
        lower, upper : ndarray, shape (m,)
            Outward rounded: they enclose the exact range.

        Examples
        --------
        >>> lo, hi = Box([0.0, 0.0], [1.0, 1.0]).linear_bounds([1.0, 1.0], [0.5])
        >>> float(lo[0]) <= 0.5 <= 2.5 <= float(hi[0])
        True
        """
        return _linear_bounds(self, a, b)

    def concretizer(self, device: torch.device) -> Concretizer:
        """The box in torch form on ``device`` (for the propagation)."""
        lo = torch.tensor(self.lower, dtype=F64, device=device)
        hi = torch.tensor(self.upper, dtype=F64, device=device)
        return Concretizer.from_box(lo, hi)


@dataclass(frozen=True, eq=False)
class Ball:
    """The norm ball ``{x : ||x - center|| <= radius}`` with ``norm`` ``"l2"`` or ``"linf"``.

    Parameters
    ----------
    center : array_like, shape (n,)
    radius : float
        Finite and ``>= 0`` (``0`` gives a single point).
    norm : {"l2", "linf"}

    Examples
    --------
    >>> ball = Ball([0.0, 0.0], 1.0, norm="l2")
    >>> lo, hi = ball.linear_bounds([[3.0, 4.0]])  # 3 x_0 + 4 x_1 ranges over [-5, 5]
    >>> bool(-5.000001 < lo[0] <= -5.0), bool(5.0 <= hi[0] < 5.000001)
    (True, True)
    """

    center: np.ndarray
    radius: float
    norm: str = "l2"

    def __post_init__(self):
        center = _vector(self.center, "Ball center")
        try:
            radius = float(self.radius)
        except (TypeError, ValueError) as exc:
            raise DomainError(f"Ball radius must be a real number, got {self.radius!r}.") from exc
        if not math.isfinite(radius) or radius < 0:
            raise DomainError(f"Ball radius must be finite and >= 0, got {radius} (center shape {center.shape}).")
        if self.norm not in ("l2", "linf"):
            raise DomainError(f"Ball norm must be 'l2' or 'linf', got {self.norm!r}.")
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "radius", radius)

    @property
    def dim(self) -> int:
        """Dimension ``n`` of the domain."""
        return int(self.center.size)

    def enclosing_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Outward-rounded ``(center - radius, center + radius)``.

        Examples
        --------
        >>> lo, hi = Ball([1.0], 0.5, norm="linf").enclosing_box()
        >>> bool(lo[0] <= 0.5 and hi[0] >= 1.5)
        True
        """
        return _dn(self.center - self.radius), _up(self.center + self.radius)

    def linear_bounds(self, a: Any, b: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Rigorous bounds of ``a x + b`` over the ball: ``a c + b -+ radius ||a_i||_*`` (dual norm).

        The dual norm is ``||.||_2`` for the l2 ball and ``||.||_1`` for the linf ball.

        Parameters
        ----------
        a : array_like, shape (m, n) or (n,)
        b : array_like, shape (m,), optional

        Returns
        -------
        lower, upper : ndarray, shape (m,)

        Examples
        --------
        >>> lo, hi = Ball([0.0, 0.0], 1.0, norm="linf").linear_bounds([[1.0, -2.0]])
        >>> bool(lo[0] <= -3.0 and hi[0] >= 3.0)
        True
        """
        return _linear_bounds(self, a, b)

    def concretizer(self, device: torch.device) -> Concretizer:
        """The ball in torch form on ``device`` (for the propagation)."""
        c = torch.tensor(self.center, dtype=F64, device=device)
        lo, hi = (torch.tensor(v, dtype=F64, device=device) for v in self.enclosing_box())
        return Concretizer(self.norm, c, torch.tensor(self.radius, dtype=F64, device=device), (lo, hi))


Domain = Box | Ball


def _linear_bounds(domain: Domain, a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    if a.ndim != 2 or a.shape[1] != domain.dim:
        raise DomainError(f"linear_bounds: a must have shape (m, {domain.dim}) for this domain, got {a.shape}.")
    b = np.zeros(a.shape[0]) if b is None else np.asarray(b, dtype=np.float64).reshape(-1)
    if b.shape != (a.shape[0],):
        raise DomainError(f"linear_bounds: b must have shape ({a.shape[0]},), got {b.shape}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise DomainError("linear_bounds: a and b must be finite.")
    dev = torch.device("cpu")
    lo, hi = domain.concretizer(dev).bounds(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64))
    return lo.numpy(), hi.numpy()
