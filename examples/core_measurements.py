"""Measure certified bound, solver value, time, peak memory and eigenvalue defect per method and solver.

Each (network, method, solver) runs in its own subprocess so that peak resident memory (ru_maxrss) is
per run, with a wall-clock limit. Writes JSON and prints a table.

    python examples/core_measurements.py --out core_measurements.json [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

import numpy as np

NETWORKS = {
    "random_weights.mat (2-10-30-20-2)": ("file", "lipsdp/random_weights.mat"),
    "random ReLU 784-100-100-10": ("random", [784, 100, 100, 10]),
}
RUNS = [("mp", "closed-form"), ("lipsdp-layer", "clarabel"), ("lipsdp-layer", "scs"),
        ("lipsdp-neuron", "clarabel"), ("lipsdp-neuron", "scs"), ("lipsdp-layer", "native"),
        ("lipsdp-neuron", "native")]


def build(kind, spec):
    import lipbound

    if kind == "file":
        path = Path(__file__).resolve().parents[2] / "shared" / "data" / spec
        return lipbound.load(path)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((spec[i + 1], spec[i])) / np.sqrt(spec[i]) for i in range(len(spec) - 1)]
    return lipbound.from_weights(weights, "relu")


def _worker(kind, spec, method, solver, queue):
    import lipbound

    net = build(kind, spec)
    start = time.perf_counter()
    try:
        cert = lipbound.certify(net, method=method, solver="auto" if solver == "closed-form" else solver)
        record = {"upper_bound": cert.upper_bound, "certified": cert.certified, "solver_bound": cert.solver_bound,
                  "status": cert.status, "eigen_defect": cert.eigen_defect, "delta": cert.delta,
                  "time_s": cert.time_s, "timings": cert.timings, "sizes": cert.sizes}
    except Exception as exc:  # reported in the table, not hidden
        record = {"error": f"{type(exc).__name__}: {exc}", "time_s": time.perf_counter() - start}
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(record)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="core_measurements.json")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--solvers", default="closed-form,clarabel,scs,native")
    args = parser.parse_args()
    wanted = set(args.solvers.split(","))
    results = []
    ctx = mp.get_context("spawn")
    for label, (kind, spec) in NETWORKS.items():
        lb = None
        for method, solver in RUNS:
            if solver not in wanted:
                continue
            queue = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(kind, spec, method, solver, queue))
            proc.start()
            proc.join(args.timeout)
            if proc.is_alive():
                proc.kill()
                record = {"error": f"timeout after {args.timeout:.0f} s"}
            elif proc.exitcode != 0:
                record = {"error": f"process died (exit code {proc.exitcode}; out of memory?)"}
            else:
                record = queue.get()
            record.update({"network": label, "method": method, "solver": solver})
            results.append(record)
            print(json.dumps(record))
        import lipbound

        lb = lipbound.lower_bound(build(kind, spec))
        results.append({"network": label, "method": "lower_bound", "value": lb.value, "time_s": lb.time_s})
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{'network':<36}{'method':<15}{'solver':<12}{'certified':>14}{'solver value':>14}{'time s':>9}"
          f"{'peak MB':>9}{'eig defect':>12}")
    for r in results:
        if r["method"] == "lower_bound":
            print(f"{r['network']:<36}{'lower bound':<27}{r['value']:>14.6g}{'':>14}{r['time_s']:>9.2f}")
            continue
        if "error" in r:
            print(f"{r['network']:<36}{r['method']:<15}{r['solver']:<12}  {r['error']}")
            continue
        defect = "-" if r["eigen_defect"] is None else f"{r['eigen_defect']:.2e}"
        print(f"{r['network']:<36}{r['method']:<15}{r['solver']:<12}{r['upper_bound']:>14.6g}"
              f"{r['solver_bound']:>14.6g}{r['time_s']:>9.2f}{r['peak_rss_mb']:>9.0f}{defect:>12}")


if __name__ == "__main__":
    main()
