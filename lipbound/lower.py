"""Lower bounds on the Lipschitz constant by attack: Jacobian power iteration, gradient ascent, pairs.

Any value returned is attained: either a Jacobian spectral norm ``||J(x)||_2`` at a point where the
network was evaluated (a lower bound wherever ``f`` is differentiable at ``x``, i.e. almost surely
for random starts), or a ratio ``||f(x) - f(x')|| / ||x - x'||`` of two evaluated points, which is a
lower bound everywhere. The witness is returned with the value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import jvp, vjp

from lipbound.network import Network


@dataclass(frozen=True)
class LowerBound:
    """A lower bound on the l2 Lipschitz constant with its witness.

    Attributes
    ----------
    value : float
        max of the best Jacobian norm and the best pair ratio found.
    x : numpy array
        Witness point (the Jacobian point, or the first point of the pair).
    direction : numpy array
        Unit input direction attaining it (top right singular vector, or the normalised pair difference).
    kind : str
        ``"jacobian"`` or ``"pair"``.
    pair_value : float
        Best pair ratio (a lower bound even at non-differentiable points).
    pair : tuple of two numpy arrays
        The two inputs attaining ``pair_value``.
    time_s : float
    device : str
    """

    value: float
    x: np.ndarray
    direction: np.ndarray
    kind: str
    pair_value: float
    pair: tuple[np.ndarray, np.ndarray]
    time_s: float
    device: str

    def to_dict(self) -> dict:
        return {"value": self.value, "kind": self.kind, "pair_value": self.pair_value, "time_s": self.time_s,
                "device": self.device, "x": self.x.tolist(), "direction": self.direction.tolist(),
                "pair": [p.tolist() for p in self.pair]}


def _as_network(model, input_shape) -> Network:
    from lipbound.graph import GraphNetwork

    if isinstance(model, (Network, GraphNetwork)):
        return model
    from lipbound.api import as_network

    return as_network(model, input_shape=input_shape)


def _top_singular(f, x: torch.Tensor, v: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched power iteration on J(x)^T J(x) with JVP/VJP; returns (sigma per row, unit v per row)."""
    _, pullback = vjp(f, x)
    for _ in range(iters):
        _, jv = jvp(f, (x,), (v,))
        (jtjv,) = pullback(jv)
        norm = jtjv.norm(dim=1, keepdim=True)
        # Keep the previous direction where J^T J v vanishes (underflow or an exact null direction).
        v = torch.where(norm > 0, jtjv / torch.where(norm > 0, norm, torch.ones_like(norm)), v)
    v = v / v.norm(dim=1, keepdim=True)
    _, jv = jvp(f, (x,), (v,))
    return jv.norm(dim=1), v


def lower_bound(model, input_shape=None, n_starts: int = 64, steps: int = 60, power_iters: int = 20,
                scales: tuple[float, ...] = (0.1, 1.0, 10.0), seed: int = 0, device: str | None = None,
                center=None, radius: float | None = None, domain=None) -> LowerBound:
    """Multi-start gradient ascent on ``||J(x)||_2`` plus pair ratios, in torch (CUDA when available).

    Parameters
    ----------
    model : Network, nn.Module or path
    n_starts : int
        Number of random starting points (run as one batch).
    steps : int
        Gradient-ascent steps on the Jacobian's top singular value.
    scales : tuple of float
        Standard deviations of the Gaussian starting points (global search), cycled over the starts.
    center, radius : optional
        Restrict the search to the l2 ball of this centre and radius (local lower bound).
    domain : lipbound.Box or lipbound.Ball, optional
        Restrict the search to this region instead (l2 or l-infinity balls, boxes).
    device : str, optional
        ``"cuda"`` when available, else ``"cpu"``.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> lb = lipbound.lower_bound(lipbound.from_weights([2 * np.eye(2)]), n_starts=4, steps=2)
    >>> round(lb.value, 6)
    2.0
    """
    start = time.perf_counter()
    net = _as_network(model, input_shape)
    box = None
    if domain is not None:
        from lipbound.bounds import Ball

        if isinstance(domain, Ball) and domain.norm == "l2":
            center, radius = domain.center, float(domain.radius)
        else:
            lo, hi = (domain.center - domain.radius, domain.center + domain.radius) if isinstance(domain, Ball) \
                else (domain.lower, domain.upper)
            box = (torch.tensor(np.array(lo, dtype=np.float64)), torch.tensor(np.array(hi, dtype=np.float64)))
            center, radius = (box[0] + box[1]).numpy() / 2, float(np.max(np.asarray(hi) - np.asarray(lo)) / 2)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n0 = net.input_dim
    f = net.forward
    if center is not None:
        c = torch.tensor(np.array(center, dtype=np.float64).reshape(1, n0))
        x = c + radius * torch.randn(n_starts, n0, generator=gen, dtype=torch.float64) / np.sqrt(n0)
    else:
        sc = torch.tensor([scales[i % len(scales)] for i in range(n_starts)], dtype=torch.float64)
        x = sc[:, None] * torch.randn(n_starts, n0, generator=gen, dtype=torch.float64)

    def project(z):
        if box is not None:
            return torch.minimum(torch.maximum(z, box[0].to(z.device)), box[1].to(z.device))
        if center is None:
            return z
        cc = c.to(device)
        d = z - cc
        nrm = d.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return cc + d * torch.clamp(radius / nrm, max=1.0)

    x = project(x.to(device))
    v = torch.randn(n_starts, n0, generator=gen, dtype=torch.float64).to(device)
    v = v / v.norm(dim=1, keepdim=True)

    best_sigma = torch.full((n_starts,), -1.0, dtype=torch.float64, device=device)
    best_x, best_v = x.clone(), v.clone()
    step = 0.05 * (radius if radius is not None else float(np.mean(scales)))
    for it in range(steps + 1):
        with torch.no_grad():
            sigma, v = _top_singular(f, x, v, power_iters if it == 0 else max(3, power_iters // 4))
        better = sigma > best_sigma
        best_sigma = torch.where(better, sigma, best_sigma)
        best_x[better], best_v[better] = x[better], v[better]
        if it == steps:
            break
        xg = x.clone().requires_grad_(True)
        _, jv = jvp(f, (xg,), (v,))
        grad = torch.autograd.grad(jv.norm(dim=1).sum(), xg, allow_unused=True)[0]
        if grad is None or not torch.any(grad != 0):
            # Piecewise-linear networks have a locally constant Jacobian: jump to new random points.
            noise = torch.randn(n_starts, n0, generator=gen, dtype=torch.float64).to(device)
            x = project(x + step * noise * np.sqrt(1.0 / n0) * 10)
        else:
            g = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-300)
            x = project(x + step * g)
    # Turn the best Jacobian directions into evaluated pairs (lower bounds even at kinks).
    with torch.no_grad():
        pair_best, pair_idx, pair_dir, pair_other = -1.0, 0, best_v[0], best_x[0]
        base = f(best_x)
        for t in (1e-4, 1e-3, 1e-2):
            h = t * (radius if radius is not None else 1.0)
            x2 = best_x + h * best_v
            if center is not None:
                x2 = project(x2)
            dx = (x2 - best_x).norm(dim=1).clamp_min(1e-300)
            f2 = f(x2)
            # Discount an estimate of the rounding error of the difference, so the ratio stays a lower bound.
            rounding = 1e-13 * (1 + f2.norm(dim=1) + base.norm(dim=1) + best_x.norm(dim=1))
            ratio = ((f2 - base).norm(dim=1) - rounding).clamp_min(0) / dx
            i = int(torch.argmax(ratio))
            if float(ratio[i]) > pair_best:
                pair_best, pair_idx, pair_dir, pair_other = float(ratio[i]), i, best_v[i], x2[i]
    i = int(torch.argmax(best_sigma))
    jac_best = float(best_sigma[i])
    if pair_best >= jac_best:
        value, kind, wx, wd = pair_best, "pair", best_x[pair_idx], pair_dir
    else:
        value, kind, wx, wd = jac_best, "jacobian", best_x[i], best_v[i]
    pair = (best_x[pair_idx].cpu().numpy(), pair_other.cpu().numpy())
    return LowerBound(value, wx.cpu().numpy(), wd.cpu().numpy(), kind, pair_best, pair,
                      time.perf_counter() - start, device)
