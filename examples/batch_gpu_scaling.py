"""GPU scaling of a batch: the same LipSDP-Neuron certificates of 784-1024-1024-10 networks on 1 GPU, then 2.

Writes random ReLU networks (one per job) to a temporary folder and runs the batch (native solver,
``device="cuda"``) on 1 GPU, then on 2: with ``--engine local`` (default) one worker process per GPU, each seeing only
its own GPU; with ``--engine ray`` a private Ray instance (loopback only) offering 1, then 2 GPUs, each job reserving
one. Writes the throughput ratio and per-job times as JSON:

    python examples/batch_gpu_scaling.py [--engine local|ray] [--jobs 8] [--dims 784,1024,1024,10]
                                         [--out batch_gpu_scaling.json]

Needs at least 2 CUDA GPUs (and Ray for ``--engine ray``: ``pip install 'lipbound[ray]'``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from lipbound import batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--dims", default="784,1024,1024,10")
    parser.add_argument("--gpus", default="1,2", help="GPU counts to compare")
    parser.add_argument("--device", default="cuda", help="cpu only checks the script (Ray's GPU slots then fake)")
    parser.add_argument("--out", default="batch_gpu_scaling.json")
    parser.add_argument("--engine", default="local", choices=["local", "ray"])
    args = parser.parse_args()
    import torch

    dims = [int(d) for d in args.dims.split(",")]
    gpu_counts = [int(g) for g in args.gpus.split(",")]
    if args.device != "cpu" and torch.cuda.device_count() < max(gpu_counts):
        raise SystemExit(f"needs {max(gpu_counts)} CUDA GPUs, found {torch.cuda.device_count()}")
    folder = Path(tempfile.mkdtemp(prefix="lipbound_gpu_scaling_"))
    models = []
    for seed in range(args.jobs):
        rng = np.random.default_rng(seed)
        arrays = {}
        for i in range(len(dims) - 1):
            arrays[f"W{i}"] = rng.standard_normal((dims[i + 1], dims[i])) / np.sqrt(dims[i])
            arrays[f"b{i}"] = rng.standard_normal(dims[i + 1]) * 0.1
        np.savez(folder / f"net{seed}.npz", **arrays)
        models.append(f"net{seed}.npz")
    manifest = batch.Manifest.from_dict({"models": models, "methods": ["lipsdp-neuron"], "solver": "native",
                                         "device": args.device}, base_dir=folder)
    runs = []
    for gpus in gpu_counts:
        out = folder / f"gpus{gpus}.jsonl"
        if args.engine == "local":
            result = batch.run(manifest, out, engine="local", workers=gpus, progress=False)
        else:
            import ray

            batch.start_local_ray(num_cpus=2 * gpus, num_gpus=gpus)
            try:
                result = batch.run(manifest, out, engine="ray", gpus_per_job=1, progress=False)
            finally:
                ray.shutdown()
        records = list(batch.read_records(out))
        runs.append({"gpus": gpus, "run_s": result.run_s, "startup_s": result.startup_s, "ok": result.ok,
                     "failed": result.failed, "jobs_per_s": result.jobs_per_s,
                     "jobs": [{"model": r["job"]["model"], "time_s": r["time_s"], "worker": r["worker"],
                               "upper_bound": (r["certificate"] or {}).get("upper_bound"),
                               "certified": (r["certificate"] or {}).get("certified"),
                               "error": r["error"]} for r in records]})
        print(f"{gpus} GPU(s): {result.ok} ok, {result.failed} failed, {result.run_s:.1f} s "
              f"({result.jobs_per_s:.3f} jobs/s; start-up {result.startup_s:.1f} s)", flush=True)
    by_gpus = {r["gpus"]: r for r in runs}
    summary = {"jobs": args.jobs, "dims": args.dims, "engine": args.engine,
               "run_s": {g: r["run_s"] for g, r in by_gpus.items()}}
    if 1 in by_gpus and 2 in by_gpus:
        summary["speedup_2_vs_1_gpu"] = by_gpus[1]["run_s"] / by_gpus[2]["run_s"]
    report = {"summary": summary, "runs": runs, "machine": {"gpus": [torch.cuda.get_device_name(i) for i in
              range(torch.cuda.device_count())], "platform": platform.platform(), "time": time.ctime()}}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
