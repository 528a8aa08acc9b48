"""IBP and CROWN on convolutional graphs side by side: time, tightness and stable neurons (CPU or CUDA).

Networks (random weights, torch's default initialisation, seed 0), imported with :func:`lipbound.from_torch`:

* ``plain``: ReLU CNNs on 1x14x14 inputs with 3x3 kernels (padding 1), c channels and d convolutional layers and a
  linear head to 10 classes -- the shapes of GLipSDP's convolutional benchmark (issue 11);
* ``resnet``: the same plus BatchNorm (eval mode, random statistics) after the first convolution, skip connections
  ``x + relu(conv(x))`` for the other layers and a 2x2 max pooling before the head.

Domain: the l2 ball of radius ``--radius`` around a random input in [0, 1]^196. For each network and method: the
time of :func:`lipbound.activation_bounds`, the mean width of the last pre-activation layer relative to IBP, and
the number of stable ReLUs.

    python examples/graph_bounds.py [--shapes 8x2,8x4,32x2] [--radius 0.1] [--device cpu] [--out graph_bounds.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

import lipbound


class ResNet(nn.Module):
    def __init__(self, c: int, d: int):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(d - 1))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(c * 7 * 7, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        for conv in self.convs:
            h = h + torch.relu(conv(h))
        return self.head(torch.flatten(self.pool(h), 1))


def network(kind: str, c: int, d: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "resnet":
        model = ResNet(c, d)
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.2, 0.2)
            model.bn.running_var.uniform_(0.5, 2.0)
        return model.double().eval()
    layers: list[nn.Module] = [nn.Conv2d(1, c, 3, padding=1), nn.ReLU()]
    for _ in range(d - 1):
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
    layers += [nn.Flatten(), nn.Linear(c * 14 * 14, 10)]
    return nn.Sequential(*layers).double().eval()


def measure(kind: str, c: int, d: int, radius: float, device: str) -> list[dict]:
    graph = lipbound.from_torch(network(kind, c, d), input_shape=(1, 14, 14))
    relus = {node.name for node in graph.nodes if isinstance(node.op, lipbound.SlopeRestricted)}
    domain = lipbound.Ball(np.random.default_rng(0).uniform(0, 1, 196), radius)
    rows, reference = [], None
    for method in ("ibp", "crown"):
        lipbound.activation_bounds(graph, domain, method=method, device=device)  # warm-up (kernels, caches)
        start = time.perf_counter()
        bounds = lipbound.activation_bounds(graph, domain, method=method, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        last = list(bounds)[-1]
        width = float(np.mean(bounds[last][1] - bounds[last][0]))
        reference = reference or width
        stable = lipbound.stable_neurons({k: v for k, v in bounds.items() if k in relus})
        rows.append({"network": kind, "channels": c, "conv_layers": d, "n_hidden": graph.n_hidden, "method": method,
                     "device": device, "radius": radius, "time_s": elapsed, "last_layer": last,
                     "last_width": width, "width_vs_ibp": width / reference,
                     "stable": int(sum(a + b for a, b, _ in stable.values())),
                     "relu_neurons": int(sum(n for _, _, n in stable.values()))})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x2,8x4,32x2", help="comma-separated CxD (channels x conv layers)")
    parser.add_argument("--networks", default="plain,resnet")
    parser.add_argument("--radius", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="graph_bounds.json")
    args = parser.parse_args()
    rows = []
    print(f"{'network':>8}{'c':>4}{'d':>4}{'hidden':>8}{'method':>8}{'time s':>10}{'width/IBP':>11}{'stable':>9}")
    for kind in args.networks.split(","):
        for shape in args.shapes.split(","):
            c, d = (int(v) for v in shape.split("x"))
            for row in measure(kind, c, d, args.radius, args.device):
                rows.append(row)
                print(f"{kind:>8}{c:>4}{d:>4}{row['n_hidden']:>8}{row['method']:>8}{row['time_s']:>10.3f}"
                      f"{row['width_vs_ibp']:>11.3f}{row['stable']:>9}", flush=True)
                with open(args.out, "w") as fh:
                    json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
