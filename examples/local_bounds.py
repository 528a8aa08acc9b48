"""Global vs local certified bounds on l2 balls of several radii, with local lower bounds and stable neurons.

Networks: the demo MLP (64-32-32-10 on sklearn digits, around a test digit) and a random 784-100-100-10 ReLU
net (around a random input).

    python examples/local_bounds.py [--radii 0.01,0.1,1] [--out local_bounds.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import lipbound
from lipbound.demo import train_digits_mlp


def report(label: str, net, x0: np.ndarray, radii: list[float]) -> list[dict]:
    glob = lipbound.certify(net)
    rows = []
    print(f"{label}: global certified {glob.upper_bound:.6g} ({glob.time_s:.2f} s)")
    print(f"{'radius':>8}{'local bound':>14}{'lower bound':>14}{'ratio':>8}{'stable %':>10}{'bounds s':>10}"
          f"{'certify s':>11}")
    for r in radii:
        domain = lipbound.Ball(x0, r)
        start = time.perf_counter()
        bounds = lipbound.activation_bounds(net, domain)
        t_bounds = time.perf_counter() - start
        stable = lipbound.stable_neurons(bounds)
        n_stable = sum(a + b for a, b, _ in stable.values())
        n_total = sum(t for _, _, t in stable.values())
        cert = lipbound.certify(net, domain=domain)
        lb = lipbound.lower_bound(net, domain=domain)
        row = {"network": label, "radius": r, "global": glob.upper_bound, "local": cert.upper_bound,
               "lower_bound": lb.value, "stable_fraction": n_stable / n_total, "bounds_s": t_bounds,
               "certify_s": cert.time_s, "certified": cert.certified}
        rows.append(row)
        print(f"{r:>8g}{cert.upper_bound:>14.6g}{lb.value:>14.6g}{cert.upper_bound / lb.value:>8.3f}"
              f"{100 * n_stable / n_total:>10.1f}{t_bounds:>10.3f}{cert.time_s:>11.2f}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radii", default="0.01,0.1,1")
    parser.add_argument("--out", default="local_bounds.json")
    args = parser.parse_args()
    radii = [float(r) for r in args.radii.split(",")]
    from sklearn.datasets import load_digits

    model, _ = train_digits_mlp()
    rows = report("demo 64-32-32-10", lipbound.from_torch(model, input_shape=64), load_digits().data[0] / 16.0, radii)
    rng = np.random.default_rng(0)
    dims = [784, 100, 100, 10]
    weights = [rng.standard_normal((dims[i + 1], dims[i])) / np.sqrt(dims[i]) for i in range(3)]
    biases = [rng.standard_normal(dims[i + 1]) * 0.1 for i in range(3)]
    net = lipbound.from_weights(weights, "relu", biases)
    rows += report("random 784-100-100-10", net, rng.uniform(0, 1, 784), radii)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
