"""Tightness at every scale (issue 12): deep signed ReLU chains, their rescaled copies, and the product bound.

The network: ``depth`` random ``width x width`` matrices (``numpy.random.default_rng(seed)``, standard normal,
each divided by its spectral norm), ReLU, no biases. Its product of spectral norms is exactly 1 while its LipSDP
value decays geometrically with depth (about ``1e-5`` at 64 layers), which is what made the program's optimum
``1e-11`` before the data-driven scaling. Each run certifies LipSDP-Neuron on the network and on copies with
every weight multiplied by each ``--factors`` value (the same problem up to ``factor^depth``), and the product
bound; all bounds are reported normalised by ``factor^depth``. Writes JSON and prints a table.

    python examples/deep_scaling.py --depth 64 --out deep_scaling.json [--solver native] [--tol 1e-8]

Timings are those of the machine it runs on (take them side by side, one process).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import lipbound


def signed_chain(depth: int, width: int, seed: int, factor: float = 1.0) -> lipbound.Network:
    rng = np.random.default_rng(seed)
    weights = []
    for _ in range(depth):
        w = rng.standard_normal((width, width))
        weights.append(w / np.linalg.norm(w, 2) * factor)
    return lipbound.from_weights(weights, "relu")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1665)
    parser.add_argument("--factors", default="1,1.25")
    parser.add_argument("--solver", default="native")
    parser.add_argument("--tol", type=float, default=None, help="solver tolerance (default: the solver's)")
    parser.add_argument("--device", default=None, help="native solver device, e.g. cuda")
    parser.add_argument("--out", default="deep_scaling.json")
    args = parser.parse_args()
    options = {} if args.tol is None else {"tol": args.tol}
    if args.device is not None:
        options["device"] = args.device
    rows = []
    for factor in (float(f) for f in args.factors.split(",")):
        net = signed_chain(args.depth, args.width, args.seed, factor)
        norm = factor ** args.depth
        start = time.perf_counter()
        cert = lipbound.certify(net, method="lipsdp-neuron", solver=args.solver, **options)
        elapsed = time.perf_counter() - start
        mp = lipbound.certify(net, method="mp")
        rows.append({"depth": args.depth, "width": args.width, "seed": args.seed, "factor": factor,
                     "solver": cert.solver, "status": cert.status, "certified": cert.certified,
                     "certified_normalised": None if cert.upper_bound is None else cert.upper_bound / norm,
                     "solver_normalised": None if cert.solver_bound is None else cert.solver_bound / norm,
                     "mp_normalised": mp.upper_bound / norm if mp.upper_bound else None,
                     "rho_scaled_program": cert.multipliers[0] if cert.multipliers else None,
                     "iterations": cert.solver_info.get("iterations"), "time_s": elapsed,
                     "timings": cert.timings, "reason": cert.reason})
        r = rows[-1]
        print(f"factor {factor:<6g} certified {r['certified_normalised']!s:<24} solver {r['solver_normalised']!s:<24} "
              f"mp {r['mp_normalised']!s:<24} rho' {r['rho_scaled_program']!s:<12.6} {elapsed:8.1f} s "
              f"{cert.status}", flush=True)
    certified = [r["certified_normalised"] for r in rows if r["certified_normalised"]]
    spread = (max(certified) - min(certified)) / min(certified) if certified else None
    summary = {"runs": rows, "relative_spread_over_factors": spread,
               "lipsdp_over_mp": [r["certified_normalised"] / r["mp_normalised"] for r in rows
                                  if r["certified_normalised"] and r["mp_normalised"]]}
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"relative spread of the certified bound over factors: {summary['relative_spread_over_factors']}")


if __name__ == "__main__":
    main()
