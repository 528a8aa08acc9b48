"""Large problems for the native solver on a GPU: LipSDP-Neuron with thousands of neurons, l-infinity NSR, and
GLipSDP's deep MLP shapes; each network solved with the native strategies side by side.

    python examples/gpu_targets.py --out gpu_out [--device cuda] [--widths 4096,4096,4096,4096]
                                   [--solvers native,native-dense,native-chordal] [--glipsdp 64x64,32x32]
                                   [--linf path1.mat,path2.mat] [--tol 1e-9] [--schur-precision float32]

For each problem and solver: certified bound, solver bound, duality gap, iterations, layout (``strategy``,
``super_blocks``), solve / check / total time, device, the solver's peak GPU memory (``solver_info.peak_memory_mb``)
and that of the whole certification (``gpu_peak_mb``). Writes ``gpu_targets.json`` after every run.
Targets (issue 12): 784-4096x4-10 under 120 s and 40 GiB on one H200, 784-2048x4-10 under 20 s.
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
from lipbound.bench import GLIPSDP_WEIGHTS, suite


def _gpu_peak_mb(device: str) -> float | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def run(net, label: str, device: str, solver: str, **kwargs) -> dict:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        cert = lipbound.certify(net, solver=solver, device=device, **kwargs)
    except (lipbound.LipboundError, torch.cuda.OutOfMemoryError) as exc:
        record = {"network": label, "solver": solver, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                  "total_s": time.perf_counter() - start, "gpu_peak_mb": _gpu_peak_mb(device)}
        print(json.dumps(record, default=float), flush=True)
        return record
    record = {"network": label, "solver": solver, "method": kwargs.get("method", "lipsdp-neuron"),
              "norm": kwargs.get("norm", "l2"), "tol": kwargs.get("tol"),
              "schur_precision": kwargs.get("schur_precision"),
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
    parser.add_argument("--widths", default="2048,2048,2048,2048", help="hidden widths of a 784-...-10 ReLU net")
    parser.add_argument("--solvers", default="native,native-dense,native-chordal",
                        help="native solvers to run side by side on every network")
    parser.add_argument("--glipsdp", default="", help="GLipSDP MLP shapes WIDTHxMATRICES to run (e.g. 64x64,32x32)")
    parser.add_argument("--linf", default="", help="comma-separated MaxMin .mat files for l-infinity NSR (logit 8)")
    parser.add_argument("--logit", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-9, help="native solver's target relative gap")
    parser.add_argument("--schur-precision", default="float64", choices=["float64", "float32", "tf32"],
                        help="precision of the Gram products and Schur assembly (native solver option)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log solver iterations (INFO)")
    args = parser.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    solvers = [s for s in args.solvers.split(",") if s]
    extra = {"tol": args.tol, "schur_precision": args.schur_precision}
    records = []

    def save():
        (out / "gpu_targets.json").write_text(json.dumps(records, indent=2, default=float))

    widths = [int(w) for w in args.widths.split(",") if w]
    if widths:
        dims = [784] + widths + [10]
        rng = np.random.default_rng(0)
        weights = [rng.standard_normal((dims[i + 1], dims[i])) / np.sqrt(dims[i]) for i in range(len(dims) - 1)]
        net = lipbound.from_weights(weights, "relu")
        for solver in solvers:
            records.append(run(net, "-".join(map(str, dims)), args.device, solver, method="lipsdp-neuron", **extra))
            save()
        lb = lipbound.lower_bound(net, device=args.device)
        for rec in records:
            rec.update({"lower_bound": lb.value, "lower_bound_s": lb.time_s})
        save()
    shapes = {s.label: s for s in suite("glipsdp-mlp")}
    for shape in filter(None, args.glipsdp.split(",")):
        spec = shapes[f"glipsdp-{shape}"]
        for solver in solvers:
            rec = run(spec.build(), spec.label, args.device, solver, method="lipsdp-neuron", **extra)
            rec["weights"] = GLIPSDP_WEIGHTS
            records.append(rec)
            save()
    for path in filter(None, args.linf.split(",")):
        net = lipbound.load(path, activation="maxmin")
        for solver in solvers:
            records.append(run(net, Path(path).stem, args.device, solver, method="lipsdp-nsr", norm="linf",
                               output_index=args.logit, **extra))
            save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
