"""Large problems for the native solver on a GPU: LipSDP-Neuron with thousands of neurons, l-infinity NSR.

    python examples/gpu_targets.py --out gpu_out [--device cuda] [--widths 2048,2048,2048,2048]
                                   [--linf path1.mat,path2.mat] [--tol 1e-6]

For each problem: certified bound, solver bound, duality gap, iterations, solve / check / total time, device and
peak GPU memory. Writes ``gpu_targets.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

import lipbound


def _gpu_peak_mb(device: str) -> float | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def run(net, label: str, device: str, **kwargs) -> dict:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cert = lipbound.certify(net, solver="native", device=device, **kwargs)
    record = {"network": label, "method": kwargs.get("method", "lipsdp-neuron"), "norm": kwargs.get("norm", "l2"),
              "tol": kwargs.get("tol"),
              "upper_bound": cert.upper_bound, "certified": cert.certified, "solver_bound": cert.solver_bound,
              "status": cert.status, "solver_info": cert.solver_info, "timings": cert.timings,
              "total_s": time.perf_counter() - start, "gpu_peak_mb": _gpu_peak_mb(device), "sizes": cert.sizes,
              "eigen_defect": cert.eigen_defect, "delta": cert.delta, "reason": cert.reason}
    mp = lipbound.certify(net, method="mp", **{k: v for k, v in kwargs.items() if k in ("norm", "output_index")})
    record["mp"] = mp.upper_bound
    print(json.dumps(record, default=float), flush=True)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--widths", default="2048,2048,2048,2048")
    parser.add_argument("--linf", default="", help="comma-separated MaxMin .mat files for l-infinity NSR (logit 8)")
    parser.add_argument("--logit", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-9, help="native solver's target relative gap")
    parser.add_argument("-v", "--verbose", action="store_true", help="log solver iterations (INFO)")
    args = parser.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    widths = [int(w) for w in args.widths.split(",") if w]
    if widths:
        dims = [784] + widths + [10]
        rng = np.random.default_rng(0)
        weights = [rng.standard_normal((dims[i + 1], dims[i])) / np.sqrt(dims[i]) for i in range(len(dims) - 1)]
        net = lipbound.from_weights(weights, "relu")
        rec = run(net, "-".join(map(str, dims)), args.device, method="lipsdp-neuron", tol=args.tol)
        lb = lipbound.lower_bound(net, device=args.device)
        rec.update({"lower_bound": lb.value, "lower_bound_s": lb.time_s})
        records.append(rec)
    for path in filter(None, args.linf.split(",")):
        net = lipbound.load(path, activation="maxmin")
        records.append(run(net, Path(path).stem, args.device, method="lipsdp-nsr", norm="linf",
                           output_index=args.logit, tol=args.tol))
    (out / "gpu_targets.json").write_text(json.dumps(records, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
