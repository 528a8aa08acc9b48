"""Convolutional networks of GLipSDP's published scalability shapes, certified side by side.

``certify_s`` is the certification time (formulation + solve + rigorous check; import and training excluded).

    python examples/cnn_glipsdp.py --out cnn_out [--channels 8,16,32] [--depths 2,4,8,16] [--device cuda]
                                   [--weights digits|random] [--methods mp,lipsdp-channel,lipsdp-neuron]
                                   [--dense-check] [--timeout 600]

Shapes (Pauli, Gramlich, Allgöwer, arXiv 2405.01125): 14x14 single-channel inputs, ``d`` convolutional layers of
``c`` channels with 3x3 kernels (stride 1, zero padding 1) and ReLU, then one linear layer to 10 outputs.
``--weights digits`` trains the network for a few epochs on scikit-learn's digits upsampled to 14x14 (no
download); ``--weights random`` uses torch's default initialisation. Each method runs in its own process with a
time limit (``lipbound.bench.run_isolated``); ``--dense-check`` also solves the program with the convolutions
unrolled into dense matrices (the same SDP: the bounds must agree within 1e-6). Published GLipSDP times (MATLAB +
MOSEK) are recorded next to ours. Writes ``cnn_glipsdp.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lipbound.bench import GLIPSDP_CNN_PUBLISHED as GLIPSDP_S
from lipbound.bench import glipsdp_cnn


def digits_14x14() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return F.interpolate(x, size=(14, 14), mode="bilinear", align_corners=False), torch.tensor(digits.target)


def make_model(channels: int, depth: int, weights: str, seed: int = 0, epochs: int = 5) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = glipsdp_cnn(channels, depth)
    info = {"weights": weights}
    if weights == "digits":
        x, y = digits_14x14()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(epochs):
            for i in range(0, len(x), 128):
                opt.zero_grad()
                F.cross_entropy(model(x[i:i + 128]), y[i:i + 128]).backward()
                opt.step()
        with torch.no_grad():
            info["train_accuracy"] = float((model(x).argmax(1) == y).float().mean())
    return model.eval(), info


def _certify_job(channels, depth, weights, seed, method, device, dense, queue):
    import lipbound
    from lipbound.graph import Conv, GraphNetwork, LinearMap, Node

    start = time.perf_counter()
    try:
        model, info = make_model(channels, depth, weights, seed)
        net = lipbound.from_torch(model, input_shape=(1, 14, 14))
        if dense:
            net = GraphNetwork(tuple(Node(n.name, LinearMap(n.op.matrix().toarray(), n.op.as_linear_map().bias)
                                          if isinstance(n.op, Conv) else n.op, n.inputs, n.shape)
                                     for n in net.nodes), net.output, net.name)
        if device and device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        options = {"device": device} if device and method != "mp" else {}
        cert = lipbound.certify(net, method=method, solver="native" if method != "mp" else "auto", **options)
        record = {"upper_bound": cert.upper_bound, "certified": cert.certified, "solver_bound": cert.solver_bound,
                  "status": cert.status, "timings": cert.timings, "sizes": cert.sizes, "solver_info": cert.solver_info,
                  "certify_s": cert.time_s, **info}
        if device and device.startswith("cuda"):
            record["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception as exc:  # recorded in the JSON, not hidden
        record = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    record["time_s"] = time.perf_counter() - start
    queue.put(record)


def run_one(channels, depth, weights, seed, method, device, dense, timeout) -> dict:
    import multiprocessing as mp
    import resource

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_certify_job, args=(channels, depth, weights, seed, method, device, dense, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        record = {"status": "timeout", "time_s": timeout}
    elif queue.empty():
        record = {"status": "killed", "error": f"exit code {proc.exitcode}"}
    else:
        record = queue.get()
    record.update({"channels": channels, "conv_layers": depth,
                   "method": method + (" (unrolled dense)" if dense else ""),
                   "device": device or "cpu", "glipsdp_published_s": GLIPSDP_S.get((channels, depth)),
                   "peak_rss_mb_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cnn_out")
    parser.add_argument("--channels", default="8")
    parser.add_argument("--depths", default="2")
    parser.add_argument("--methods", default="mp,lipsdp-channel,lipsdp-neuron")
    parser.add_argument("--weights", default="digits", choices=["digits", "random"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-check", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    skip: set = set()
    for c in (int(v) for v in args.channels.split(",")):
        for d in (int(v) for v in args.depths.split(",")):
            runs = [(m, False) for m in args.methods.split(",")]
            if args.dense_check:
                runs.append(("lipsdp-neuron", True))
            for method, dense in runs:
                if (c, method, dense) in skip:
                    continue
                rec = run_one(c, d, args.weights, args.seed, method, args.device, dense, args.timeout)
                records.append(rec)
                print(json.dumps({k: rec.get(k) for k in ("channels", "conv_layers", "method", "upper_bound",
                                                          "certified", "certify_s", "status", "glipsdp_published_s",
                                                          "gpu_peak_mb", "error")}, default=float), flush=True)
                if rec["status"] in ("timeout", "killed"):
                    skip.add((c, method, dense))  # deeper nets of this width would only time out too
                (out / "cnn_glipsdp.json").write_text(json.dumps(records, indent=2, default=float))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=6)
    raise SystemExit(main())
