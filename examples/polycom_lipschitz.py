"""Certified local Lipschitz bounds of small PolyReLU and PolyNorm MLPs trained on sklearn's digits.

Usage::

    python examples/polycom_lipschitz.py --out polycom_lipschitz_out/ [--fast] [--method lipsdp-layer]

Trains (full batch Adam, CPU, seconds) two MLPs 64-32-32-10, one with :class:`lipbound.nn.PolyReLU` and one with
:class:`lipbound.nn.PolyNorm`, on the 8x8 digits (pixels scaled to [0, 1]; no download), then for l2 balls of radii
0.01, 0.1, 0.5 and 1.0 around a few test inputs reports

* PolyReLU: the certified local bound ``lipbound.certify(model, input_shape=64, domain=Ball(x0, r))``, the attack
  lower bound ``lipbound.lower_bound(model, domain=...)``, and the global fact (a PolyReLU of degree >= 2 is not
  globally Lipschitz, so only local bounds exist);
* PolyNorm: the composed certified local bound :func:`lipbound.polycom_certify.certify_polynorm_mlp` and a lower
  bound from Jacobian spectral norms (autograd, float64) at sampled points of the ball refined by projected
  gradient ascent (every value is a Jacobian norm attained inside the ball), plus the certified global bound.

Writes ``results.json`` and ``polycom_lipschitz.png`` (bounds against the radius, log scale) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# The script is run as a file from the repository root, so the repository is not on sys.path by default.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # headless: only files are written
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import lipbound  # noqa: E402
from lipbound.nn import PolyNorm, PolyReLU  # noqa: E402
from lipbound.polycom_certify import certify_polynorm_mlp  # noqa: E402
from lipbound.slopes import global_slope_bounds  # noqa: E402

RADII = (0.01, 0.1, 0.5, 1.0)


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits, pixels scaled to [0, 1], split 75/25 (stratified): ``X_train, X_test, y_train, y_test``."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                                              stratify=digits.target)
    return torch.tensor(x_tr), torch.tensor(x_te), torch.tensor(y_tr), torch.tensor(y_te)


def build_mlp(activation: type[PolyReLU] | type[PolyNorm], hidden: int, seed: int) -> torch.nn.Sequential:
    """``64 -> hidden -> hidden -> 10`` with the given PolyCom activation (order 3) after each hidden Linear."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), activation(), torch.nn.Linear(hidden, hidden),
                               activation(), torch.nn.Linear(hidden, 10))


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> float:
    """Full-batch Adam on the cross-entropy; returns the final training loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return float(loss.detach())


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def sampled_lower_bound(model: torch.nn.Module, center: np.ndarray, radius: float, samples: int, steps: int,
                        seed: int) -> float:
    """Largest Jacobian spectral norm found in the l2 ball: random points, then projected gradient ascent.

    Every value is ``||J(x)||_2`` at an evaluated point ``x`` of the ball (float64 autograd), so it is a lower
    bound on the local Lipschitz constant (the model is C^1).
    """
    f = copy.deepcopy(model).double()
    for p in f.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    c = torch.tensor(center, dtype=torch.float64)
    dirs = torch.randn(samples, c.numel(), generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    scale = torch.rand(samples, 1, generator=gen, dtype=torch.float64) ** (1.0 / c.numel())
    scale[0] = 0.0  # the centre itself
    x = c + radius * scale * dirs
    jac = torch.func.vmap(torch.func.jacrev(f))

    def project(z: torch.Tensor) -> torch.Tensor:
        d = z - c
        n = d.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return c + d * torch.clamp(radius / n, max=1.0)

    best = 0.0
    for _ in range(steps + 1):
        x = x.detach().requires_grad_(True)
        sigma = torch.linalg.matrix_norm(jac(x), ord=2)
        best = max(best, float(sigma.detach().max()))
        (grad,) = torch.autograd.grad(sigma.sum(), x)
        g = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-300)
        x = project(x.detach() + 0.1 * radius * g)
    return best


def polyrelu_global_fact(model: torch.nn.Module) -> str:
    """Whether the PolyReLU activations have a global slope bound (a degree >= 2 PolyReLU has none)."""
    facts = []
    for m in model.modules():
        if isinstance(m, PolyReLU):
            try:
                lo, hi = global_slope_bounds("polyrelu", coefficients=tuple(m.coefficients()))
                facts.append(f"slopes in [{lo:.3g}, {hi:.3g}]")
            except ValueError:
                facts.append("unbounded slope")
    if all(f == "unbounded slope" for f in facts):
        return "not globally Lipschitz (degree-3 PolyReLU: unbounded slope on x > 0)"
    return "; ".join(facts)


def run(args: argparse.Namespace) -> dict:
    """Train both models, certify and attack every (point, radius); return the results as a dict."""
    x_tr, x_te, y_tr, y_te = load_data(args.seed)
    models = {"PolyReLU": build_mlp(PolyReLU, args.hidden, args.seed),
              "PolyNorm": build_mlp(PolyNorm, args.hidden, args.seed)}
    out: dict = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                              if k != "out"}, "models": {}, "rows": []}
    for name, model in models.items():
        start = time.perf_counter()
        loss = train(model, x_tr, y_tr, args.steps, args.lr)
        model.eval()
        out["models"][name] = {"train_loss": loss, "train_acc": accuracy(model, x_tr, y_tr),
                               "test_acc": accuracy(model, x_te, y_te), "train_s": time.perf_counter() - start}
        print(f"{name:8s}: train loss {loss:.3f}, train acc {out['models'][name]['train_acc']:.3f}, "
              f"test acc {out['models'][name]['test_acc']:.3f} ({out['models'][name]['train_s']:.1f} s)")
    out["models"]["PolyReLU"]["global"] = polyrelu_global_fact(models["PolyReLU"])
    points = x_te[: args.points].double().numpy()
    for p, x0 in enumerate(points):
        for r in args.radii:
            domain = lipbound.Ball(x0, r)
            start = time.perf_counter()
            cert = lipbound.certify(models["PolyReLU"], method=args.method, input_shape=64, domain=domain)
            t_cert = time.perf_counter() - start
            lb = lipbound.lower_bound(models["PolyReLU"], input_shape=64, domain=domain, n_starts=args.starts,
                                      steps=args.ascent, device="cpu", seed=args.seed)
            out["rows"].append({"model": "PolyReLU", "point": p, "radius": r, "upper": cert.upper_bound,
                                "certified": cert.certified, "lower": lb.value, "certify_s": t_cert})
            start = time.perf_counter()
            pn = certify_polynorm_mlp(models["PolyNorm"], domain)
            t_cert = time.perf_counter() - start
            low = sampled_lower_bound(models["PolyNorm"], x0, r, args.starts, args.ascent, args.seed)
            out["rows"].append({"model": "PolyNorm", "point": p, "radius": r, "upper": pn.upper_bound,
                                "certified": True, "lower": low, "certify_s": t_cert,
                                "product_bound": pn.product_bound, "factors": list(pn.factors)})
            out["models"]["PolyNorm"]["global"] = pn.global_upper_bound  # the same for every domain
    return out


def print_table(results: dict) -> None:
    models = results["models"]
    print(f"global: PolyReLU MLP {models['PolyReLU']['global']}; "
          f"PolyNorm MLP certified global bound {models['PolyNorm']['global']:.4g}")
    print(f"\n{'model':8s} {'pt':>2s} {'radius':>6s} {'certified upper':>15s} {'lower':>10s} {'ratio':>7s} "
          f"{'time s':>7s}")
    for row in sorted(results["rows"], key=lambda r: (r["model"] != "PolyReLU", r["point"], r["radius"])):
        ratio = row["upper"] / row["lower"] if row["lower"] > 0 else float("inf")
        flag = "" if row["certified"] else "  (not certified)"
        print(f"{row['model']:8s} {row['point']:2d} {row['radius']:6.2f} {row['upper']:15.5g} {row['lower']:10.5g} "
              f"{ratio:7.2f} {row['certify_s']:7.2f}{flag}")


def plot(results: dict, path: Path) -> None:
    """Certified bound (solid) and lower bound (dashed) against the radius, one panel per model."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, name in zip(axes, ("PolyReLU", "PolyNorm"), strict=True):
        rows = [r for r in results["rows"] if r["model"] == name]
        for p in sorted({r["point"] for r in rows}):
            pr = sorted((r for r in rows if r["point"] == p), key=lambda r: r["radius"])
            radii = [r["radius"] for r in pr]
            line = ax.loglog(radii, [r["upper"] for r in pr], "o-", label=f"certified upper, test input {p}")[0]
            ax.loglog(radii, [r["lower"] for r in pr], "s--", color=line.get_color(),
                      label=f"lower bound, test input {p}")
        if name == "PolyNorm":
            ax.axhline(results["models"]["PolyNorm"]["global"], color="k", ls=":", label="certified global bound")
        else:
            ax.text(0.98, 0.02, "no global bound: not globally Lipschitz", transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=8)
        title = {"PolyReLU": f"PolyReLU MLP: lipbound.certify ({results['settings']['method']})",
                 "PolyNorm": "PolyNorm MLP: certify_polynorm_mlp (composed)"}[name]
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("l2 ball radius")
        ax.set_ylabel("local l2 Lipschitz constant")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("polycom_lipschitz_out"), help="output folder")
    parser.add_argument("--fast", action="store_true",
                        help="tiny settings (width 8, 40 steps, one input, two radii) for smoke tests")
    parser.add_argument("--method", default="lipsdp-neuron",
                        help="lipbound.certify method for PolyReLU (lipsdp-layer is faster and looser)")
    parser.add_argument("--points", type=int, default=3, help="number of test inputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.hidden, args.steps, args.lr, args.radii, args.starts, args.ascent = 32, 150, 5e-3, RADII, 16, 15
    if args.fast:
        args.hidden, args.steps, args.points, args.radii, args.starts, args.ascent = 8, 40, 1, (0.1, 1.0), 4, 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread avoids OpenMP spin-waiting on a shared machine
    try:
        results = run(args)
    finally:
        torch.set_num_threads(threads)
    print_table(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "polycom_lipschitz.png")
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'polycom_lipschitz.png'}")
    sound = all(r["lower"] <= r["upper"] for r in results["rows"] if r["certified"])
    return 0 if sound else 1


if __name__ == "__main__":
    sys.exit(main())
