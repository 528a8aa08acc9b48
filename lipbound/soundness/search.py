"""Candidate input pairs for the campaign's lower bounds: float64 search by Jacobians, with autograd.

The search only proposes pairs; it never decides. Its float64 ratios rank the candidates, and the best ones are
judged in multiple precision (:class:`~lipbound.soundness.reference.Reference`), which also checks that both
points lie in the input domain. The search only calls ``network.forward`` (any batched float64 function), so it
serves every network family, graph networks included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import torch

from lipbound.bounds import Ball, Box

_F64 = torch.float64
Pair = tuple[np.ndarray, np.ndarray]


def project(x: torch.Tensor, domain) -> torch.Tensor:
    """Into the domain (a hair inside its boundary), or unchanged without a domain."""
    if domain is None:
        return x
    if isinstance(domain, Box):
        lo, hi = (torch.tensor(np.array(v), dtype=_F64) for v in (domain.lower, domain.upper))
        return torch.minimum(torch.maximum(x, lo), hi)
    c = torch.tensor(np.array(domain.center), dtype=_F64)
    r = domain.radius * (1 - 1e-12)
    if domain.norm == "linf":
        return torch.minimum(torch.maximum(x, c - r), c + r)
    d = x - c
    n = d.norm(dim=-1, keepdim=True)
    return c + d * torch.clamp(r / torch.where(n > 0, n, torch.ones_like(n)), max=1.0)


def inside(domain, x) -> bool:
    """Whether the float vector ``x`` lies in the domain, decided exactly (rational arithmetic)."""
    if domain is None:
        return True
    x = [float(v) for v in x]
    if isinstance(domain, Box):
        return all(lo <= v <= hi for lo, v, hi in zip(domain.lower, x, domain.upper, strict=True))
    diffs = [Fraction(v) - Fraction(float(c)) for v, c in zip(x, domain.center, strict=True)]
    r = Fraction(float(domain.radius))
    if domain.norm == "linf":
        return all(abs(d) <= r for d in diffs)
    return sum(d * d for d in diffs) <= r * r


def _sample(rng: np.random.Generator, n: int, dim: int, domain) -> torch.Tensor:
    """``n`` points: uniform in the domain, or Gaussian at scales 0.1, 1, 10 (cycled) plus the origin."""
    if domain is None:
        scales = np.array([(0.1, 1.0, 10.0)[i % 3] for i in range(n)])[:, None]
        pts = rng.standard_normal((n, dim)) * scales
        pts[0] = 0.0
        return torch.tensor(pts, dtype=_F64)
    if isinstance(domain, Box):
        pts = domain.lower + rng.random((n, dim)) * (domain.upper - domain.lower)
    elif domain.norm == "linf":
        pts = domain.center + domain.radius * rng.uniform(-1, 1, (n, dim))
    else:
        d = rng.standard_normal((n, dim))
        d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-300)
        pts = domain.center + domain.radius * d * rng.random((n, 1)) ** (1.0 / dim)
    pts[0] = domain.center if isinstance(domain, Ball) else (domain.lower + domain.upper) / 2
    return project(torch.tensor(pts, dtype=_F64), domain)


def _jacobians(forward: Callable, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Per-point Jacobian rows ``(batch, len(rows), dim)`` by one backward pass per output row."""
    x = x.detach().clone().requires_grad_(True)
    y = forward(x)
    out = []
    for j in rows:
        (g,) = torch.autograd.grad(y[:, j].sum(), x, retain_graph=True, allow_unused=True)
        out.append(torch.zeros_like(x) if g is None else g)
    return torch.stack(out, dim=1).detach()


def _sanitized(jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(J / scale, scale, finite)``: Jacobians with a non-finite entry (an overflowed forward pass) zeroed and
    flagged; those with entries outside ``[2^-500, 2^500]`` scaled by their largest entry, so that the SVD neither
    over- nor underflows (networks with weights of 1e+-300); the others unchanged (``scale = 1``)."""
    finite = torch.isfinite(jac).flatten(1).all(dim=1)
    jac = torch.where(finite[:, None, None], jac, torch.zeros_like(jac))
    top = jac.abs().flatten(1).amax(dim=1)
    scale = torch.where((top > 2.0**500) | ((top < 2.0**-500) & (top > 0)), top, torch.ones_like(top))
    return jac / scale[:, None, None], scale, finite


def _score(jac: torch.Tensor, norm: str) -> torch.Tensor:
    """``||J||_2`` (l2) or ``||J_i||_1`` (l-infinity, one row); non-finite Jacobians score -inf."""
    jac, scale, finite = _sanitized(jac)
    if norm == "l2":
        try:
            s = torch.linalg.matrix_norm(jac, ord=2)
        except torch.linalg.LinAlgError:  # LAPACK did not converge on some matrix: take them one by one
            s = torch.tensor([_norm_or_nan(m) for m in jac.numpy()], dtype=jac.dtype)
    else:
        s = jac[:, 0].abs().sum(dim=1)
    s = s * scale
    return torch.where(finite & torch.isfinite(s), s, torch.full_like(s, -torch.inf))


def _norm_or_nan(m: np.ndarray) -> float:
    try:
        return float(np.linalg.norm(m, 2))
    except np.linalg.LinAlgError:
        return math.nan


def _directions(jac: torch.Tensor, norm: str) -> torch.Tensor:
    """The input direction of steepest growth: top right singular vector (l2), ``sign(J_i)`` (l-infinity); zero
    for a non-finite Jacobian (its pairs are then dropped)."""
    jac, _, _ = _sanitized(jac)
    if norm == "linf":
        return torch.sign(jac[:, 0])
    try:
        return torch.linalg.svd(jac, full_matrices=False).Vh[:, 0]
    except torch.linalg.LinAlgError:  # LAPACK did not converge on some matrix: take them one by one
        out = torch.zeros(jac.shape[0], jac.shape[2], dtype=jac.dtype)
        for k, m in enumerate(jac.numpy()):
            try:
                out[k] = torch.from_numpy(np.linalg.svd(m)[2][0])
            except np.linalg.LinAlgError:
                pass
        return out


def candidate_pairs(network, rng: np.random.Generator, norm: str = "l2", output_index: int | None = None,
                    domain=None, n_points: int = 96, keep: int = 8, rounds: int = 12) -> list[Pair]:
    """Input pairs likely to have a large difference quotient.

    Random points (in the domain if there is one) are ranked by their Jacobian norm (``||J||_2``, or the 1-norm of
    row ``output_index`` for ``norm="linf"``); the best ``keep`` are improved by ``rounds`` of random hill climbing
    with shrinking steps; each gives pairs ``x -+ h d / 2`` along its steepest direction ``d`` for ``h`` from 1e-6
    to 1e-1 of the point's scale. Random far-apart pairs are added.

    Parameters
    ----------
    network : object with ``forward`` (batched float64 torch) and ``input_dim``
    rng : numpy Generator

    Returns
    -------
    list of (x, x2) float64 arrays, all inside ``domain``.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.array([[3.0, 4.0]])])
    >>> pairs = candidate_pairs(net, np.random.default_rng(0))
    >>> x, x2 = pairs[0]                      # along the top singular vector (3, 4) / 5
    >>> f = lambda v: net.forward(torch.tensor(v[None]))[0, 0].item()
    >>> round(abs(f(x2) - f(x)) / float(np.linalg.norm(x2 - x)), 6)
    5.0
    """
    forward, dim = network.forward, network.input_dim
    rows = [output_index or 0] if norm == "linf" else list(range(network.output_dim))
    x = _sample(rng, n_points, dim, domain)
    score = _score(_jacobians(forward, x, rows), norm)
    top = torch.argsort(score, descending=True)[:keep]
    best, best_score = x[top], score[top]
    width = 0.3 * (best.abs().amax(dim=1, keepdim=True) + 1.0) if domain is None else _domain_width(domain)
    for _ in range(rounds):
        trial = project(best + width * torch.tensor(rng.standard_normal(best.shape), dtype=_F64), domain)
        s = _score(_jacobians(forward, trial, rows), norm)
        better = s > best_score
        best[better], best_score[better] = trial[better], s[better]
        width = width / 2
    jac = _jacobians(forward, best, rows)
    d = _directions(jac, norm)
    d = d / torch.clamp(d.abs().amax(dim=1, keepdim=True), min=1e-300)
    size = (best.abs().amax(dim=1, keepdim=True) + 1.0) if domain is None else _domain_width(domain)
    pairs: list[Pair] = []
    for h in (1e-6, 1e-4, 1e-2, 1e-1):
        lo = project(best - h * size * d / 2, domain)
        hi = project(best + h * size * d / 2, domain)
        pairs += [(a.numpy(), b.numpy()) for a, b in zip(lo, hi, strict=True)]
    far = _sample(rng, 2 * keep, dim, domain)
    pairs += [(a.numpy(), b.numpy()) for a, b in zip(far[:keep], far[keep:], strict=True)]
    return [(a, b) for a, b in pairs if np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and not np.array_equal(a, b)
            and inside(domain, a) and inside(domain, b)]


def _domain_width(domain) -> float:
    if isinstance(domain, Box):
        return float(np.max(domain.upper - domain.lower)) / 2 or 1e-300
    return float(domain.radius) or 1e-300


def rank_pairs(network, pairs: list[Pair], norm: str = "l2", output_index: int | None = None,
               keep: int = 6) -> list[Pair]:
    """The ``keep`` pairs with the largest float64 difference quotients (duplicates removed)."""
    if not pairs:
        return []
    a = torch.tensor(np.array([p[0] for p in pairs]), dtype=_F64)
    b = torch.tensor(np.array([p[1] for p in pairs]), dtype=_F64)
    with torch.no_grad():
        fa, fb = network.forward(a), network.forward(b)
    if norm == "l2":
        ratio = (fa - fb).norm(dim=1) / (a - b).norm(dim=1)
    else:
        i = output_index or 0
        ratio = (fa[:, i] - fb[:, i]).abs() / (a - b).abs().amax(dim=1)
    ratio = torch.nan_to_num(ratio, nan=-1.0, posinf=-1.0)
    order = torch.argsort(ratio, descending=True).tolist()
    out: list[Pair] = []
    seen = set()
    for k in order:
        key = (pairs[k][0].tobytes(), pairs[k][1].tobytes())
        if key not in seen:
            seen.add(key)
            out.append(pairs[k])
        if len(out) == keep:
            break
    return out
