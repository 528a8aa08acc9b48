"""Throughput of the batch engines on the same small jobs: 1 vs 2 local workers, and Ray's added cost per job.

Builds N local-bound jobs (LipSDP-Neuron on a random ReLU net around N random points) and runs them with the
local engine (1 worker, then 2) and with Ray (a private loopback instance with 2 CPUs), alternating the engines
for ``--repeats`` rounds. Start-up (processes, imports, cluster) is timed apart from the jobs. Besides wall
times it reports each engine's overhead per job: worker time not spent inside jobs (``workers * wall - sum of
job times``), which stays meaningful on a busy machine where the jobs themselves slow down. Writes JSON:

    python examples/batch_throughput.py [--jobs 100] [--dims 16,32,32,4] [--repeats 3] [--out batch_throughput.json]

Run it on an otherwise idle machine: the ratio measures how well the engine uses the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lipbound import batch


def build(folder: Path, jobs: int, dims: list[int], method: str) -> batch.Manifest:
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(len(dims) - 1):
        arrays[f"W{i}"] = rng.standard_normal((dims[i + 1], dims[i])) / np.sqrt(dims[i])
        arrays[f"b{i}"] = rng.standard_normal(dims[i + 1]) * 0.1
    np.savez(folder / "net.npz", **arrays)
    np.save(folder / "points.npy", rng.uniform(-1, 1, (jobs, dims[0])))
    return batch.Manifest.from_dict({"models": ["net.npz"], "methods": [method],
                                     "domains": {"points": "points.npy", "radii": [0.1]}}, base_dir=folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--dims", default="16,32,32,4")
    parser.add_argument("--method", default="lipsdp-neuron")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--out", default="batch_throughput.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lipbound_throughput_"))
    manifest = build(folder, args.jobs, [int(d) for d in args.dims.split(",")], args.method)
    configs = [("local", 1), ("local", 2)]
    if not args.no_ray:
        configs.append(("ray", 2))
        batch.start_local_ray(num_cpus=2)
    runs = []
    load_before = os.getloadavg()
    for round_ in range(args.repeats):
        for engine, workers in configs:
            out = folder / f"{engine}{workers}_{round_}.jsonl"
            result = batch.run(manifest, out, engine=engine, workers=workers, fsync=True)
            assert result.ok == args.jobs, result
            times = [r["time_s"] for r in batch.read_records(out)]
            busy = sum(times)
            runs.append({"engine": engine, "workers": workers, "round": round_, "run_s": result.run_s,
                         "startup_s": result.startup_s, "jobs_per_s": result.jobs_per_s, "job_time_sum_s": busy,
                         "idle_s": workers * result.run_s - busy, "utilisation": busy / (workers * result.run_s)})
            print(f"round {round_} {engine} x{workers}: {result.run_s:.2f} s for {args.jobs} jobs "
                  f"({result.jobs_per_s:.2f} jobs/s; start-up {result.startup_s:.2f} s)", flush=True)
    def median_of(key, engine, workers):
        return statistics.median(r[key] for r in runs if (r["engine"], r["workers"]) == (engine, workers))

    median = {f"{e}{w}": median_of("run_s", e, w) for e, w in configs}
    # Engine overhead per job: worker time not spent inside jobs (dispatch, transfer, writing, idle), which
    # does not depend on how fast the jobs themselves ran (on a busy machine they slow down for everyone).
    overhead = {f"{e}{w}": 1000 * median_of("idle_s", e, w) / args.jobs for e, w in configs}
    summary = {"jobs": args.jobs, "dims": args.dims, "method": args.method, "repeats": args.repeats,
               "median_run_s": median, "speedup_2_vs_1_local_workers": median["local1"] / median["local2"],
               "overhead_ms_per_job": overhead,
               "utilisation": {f"{e}{w}": median_of("utilisation", e, w) for e, w in configs}}
    if not args.no_ray:
        summary["ray_added_cost_per_job_ms"] = 1000 * (median["ray2"] - median["local2"]) / args.jobs
        summary["ray_added_overhead_per_job_ms"] = overhead["ray2"] - overhead["local2"]
    report = {"summary": summary, "runs": runs, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "time": time.ctime()}}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
