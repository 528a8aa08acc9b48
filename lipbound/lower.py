"""Lower bounds on the Lipschitz constant by attack: Jacobian power iteration, gradient ascent, pairs.

Any value returned is attained: either a Jacobian spectral norm ``||J(x)||_2`` at a point where the
network was evaluated (a lower bound wherever ``f`` is differentiable at ``x``, i.e. almost surely
for random starts), or a ratio ``||f(x) - f(x')|| / ||x - x'||`` of two evaluated points, which is a
lower bound everywhere. The witness is returned with the value.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import jvp, vjp

from lipbound.errors import OptionError
from lipbound.network import Network
from lipbound.options import check_device
from lipbound.progress import Progress

log = logging.getLogger("lipbound")


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
    dtype : str
        Floating-point type the network was evaluated in (always ``"float64"``: weights of a float16/bfloat16
        model are converted exactly to float64 on import, and the search runs in float64).
    """

    value: float
    x: np.ndarray
    direction: np.ndarray
    kind: str
    pair_value: float
    pair: tuple[np.ndarray, np.ndarray]
    time_s: float
    device: str
    dtype: str = "float64"

    def to_dict(self) -> dict:
        return {"value": self.value, "kind": self.kind, "pair_value": self.pair_value, "time_s": self.time_s,
                "device": self.device, "dtype": self.dtype, "x": self.x.tolist(),
                "direction": self.direction.tolist(), "pair": [p.tolist() for p in self.pair]}


def _as_network(model, input_shape) -> Network:
    from lipbound.graph import GraphNetwork

    if isinstance(model, (Network, GraphNetwork)):
        return model
    from lipbound.api import as_network

    if isinstance(model, torch.nn.Module):
        low = sorted({str(p.dtype) for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
        if low:
            log.info("lower bound: the model has %s parameters; the search evaluates the imported network (weights "
                     "converted exactly) in float64", ", ".join(low))
    return as_network(model, input_shape=input_shape)


#: Networks whose layers all have at most this many neurons are searched with one CPU thread by default.
SINGLE_THREAD_WIDTH = 2048


def _check_search(n_starts, steps, power_iters, scales, radius) -> None:
    """Raise :class:`OptionError` naming the first search parameter of the wrong type or range."""
    for name, value, minimum in (("n_starts", n_starts, 1), ("steps", steps, 0), ("power_iters", power_iters, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise OptionError(f"lower_bound: {name} must be an integer >= {minimum}, got {value!r}.")
    try:
        ok = len(scales) > 0 and all(not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in scales)
    except TypeError:
        ok = False
    if not ok:
        raise OptionError(f"lower_bound: scales must be a non-empty sequence of positive numbers, got {scales!r}.")
    if radius is not None and (isinstance(radius, bool) or not isinstance(radius, numbers.Real)
                               or not math.isfinite(radius) or radius < 0):
        raise OptionError(f"lower_bound: radius must be a finite number >= 0, got {radius!r}.")


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
                center=None, radius: float | None = None, domain=None,
                progress: Progress | None = None, threads: int | None = None) -> LowerBound:
    """Multi-start gradient ascent on ``||J(x)||_2`` plus pair ratios, in torch (CUDA when available).

    The network is evaluated in float64 whatever the model's own dtype (see :attr:`LowerBound.dtype`).

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
        ``"cuda"`` when available, else ``"cpu"``; asking for ``"cuda"`` without CUDA raises
        :class:`~lipbound.errors.OptionError`.
    progress : callable, optional
        ``progress(done, total, label)`` after each of the ``steps + 1`` ascent steps (see
        :mod:`lipbound.progress`); the search also logs its progress at INFO every 10 steps.
    threads : int, optional
        CPU threads for torch during the search. Default: 1 when every layer has at most
        :data:`SINGLE_THREAD_WIDTH` neurons (the batched products are then too small to gain from threads, and on
        a machine whose cores are busy OpenMP synchronisation made the search 8-20x slower: measured side by side
        in one process on a loaded 2-core machine, 784-300-300-10 and a 3-5-2 net), torch's setting otherwise.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> lb = lipbound.lower_bound(lipbound.from_weights([2 * np.eye(2)]), n_starts=4, steps=2)
    >>> round(lb.value, 6)
    2.0
    """
    _check_search(n_starts, steps, power_iters, scales, radius)
    device = str(check_device(device)) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral)
                                or threads < 1):
        raise OptionError(f"lower_bound: threads must be an integer >= 1, got {threads!r}.")
    start = time.perf_counter()
    net = _as_network(model, input_shape)
    if threads is None and device == "cpu" and max(net.dims) <= SINGLE_THREAD_WIDTH:
        threads = 1
    saved = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        return _search(net, n_starts, steps, power_iters, scales, seed, device, center, radius, domain, progress,
                       start)
    finally:
        torch.set_num_threads(saved)


def _search(net: Network, n_starts: int, steps: int, power_iters: int, scales, seed: int, device: str, center,
            radius, domain, progress: Progress | None, start: float) -> LowerBound:
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
    log.info("lower bound: %d starts x %d steps on %s (float64), network %s", n_starts, steps, device,
             net.summary())
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
        if progress is not None:
            progress(it + 1, steps + 1, f"best {float(best_sigma.max()):.6g}")
        if it % 10 == 0 or it == steps:
            log.info("lower bound: step %d/%d, best %.10g (%.1f s)", it, steps, float(best_sigma.max()),
                     time.perf_counter() - start)
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
