"""Measure certified bound, solver value, time, peak memory and eigenvalue defect per method and solver.

Each (network, method, solver) runs in its own process (``lipbound.bench.run_isolated``: peak resident memory
per run, wall-clock limit). Writes JSON and prints a table.

    python examples/core_measurements.py --out core_measurements.json [--timeout 600]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lipbound.bench import NetSpec, run_isolated, write_json

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NETWORKS = [NetSpec("random_weights.mat (2-10-30-20-2)", "file", str(DATA / "lipsdp" / "random_weights.mat")),
            NetSpec("random ReLU 784-100-100-10", "random", dims=(784, 100, 100, 10))]
RUNS = [("mp", "auto"), ("lipsdp-layer", "clarabel"), ("lipsdp-layer", "scs"), ("lipsdp-layer", "native"),
        ("lipsdp-neuron", "clarabel"), ("lipsdp-neuron", "scs"), ("lipsdp-neuron", "native")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="core_measurements.json")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--solvers", default="auto,clarabel,scs,native")
    args = parser.parse_args()
    wanted = set(args.solvers.split(","))
    results = []
    for spec in NETWORKS:
        for method, solver in RUNS:
            if solver in wanted:
                results.append(run_isolated(spec, method, solver, args.timeout))
        results.append(run_isolated(spec, "lower_bound", timeout=args.timeout))
    write_json(results, args.out)
    print(f"{'network':<36}{'method':<15}{'solver':<10}{'certified':>12}{'solver value':>14}{'time s':>9}"
          f"{'peak MB':>9}{'eig defect':>12}")
    for r in results:
        if r["method"] == "lower_bound":
            value = r.get("value", float("nan"))
            print(f"{r['network']:<36}{'lower bound':<25}{value:>12.6g}{'':>14}{r['time_s']:>9.2f}")
        elif "error" in r:
            print(f"{r['network']:<36}{r['method']:<15}{r['solver_requested']:<10}  {r['error']}")
        else:
            defect = "-" if r["eigen_defect"] is None else f"{r['eigen_defect']:.2e}"
            print(f"{r['network']:<36}{r['method']:<15}{r['solver']:<10}{r['upper_bound']:>12.6g}"
                  f"{r['solver_bound']:>14.6g}{r['time_s']:>9.2f}{r['peak_rss_mb']:>9.0f}{defect:>12}")


if __name__ == "__main__":
    main()
