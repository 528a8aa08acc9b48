"""Prepare a batch: local bounds of the demo network around 100 digits at radii 0.01, 0.1 and 1.

Trains the demo MLP (64-32-32-10 on scikit-learn's bundled digits, a few seconds), saves its weights
(``demo.npz``: W0, b0, ...; plain arrays, nothing to unpickle), the digits (``digits.npz``) and a manifest
(``batch.yaml``) in FOLDER, then prints the commands that run it:

    python examples/batch_digits.py [--folder digits_batch] [--points 100] [--radii 0.01,0.1,1]
    lipbound batch digits_batch/batch.yaml --out digits.jsonl --workers 2          # local processes
    lipbound batch digits_batch/batch.yaml --out digits_ray.jsonl --engine ray     # Ray
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MANIFEST = """\
# Local l2 bounds of the demo network (LipSDP-Neuron) around {points} digits, plus its global bound.
models: [demo.npz]
methods: [lipsdp-neuron]
norms: [l2]
domains:
  - global
  - points: {{file: digits.npz, key: x, rows: [0, {points}], scale: 0.0625}}   # pixels 0..16 -> 0..1
    radii: [{radii}]
    ball_norm: l2
lower_bound: {{n_starts: 16, steps: 20}}     # attack per job: the gap is in the summary
expect: {{max_upper_bound: 100}}             # --check fails if any certified bound exceeds it
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="digits_batch")
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--radii", default="0.01,0.1,1")
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    from lipbound.demo import train_digits_mlp

    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, accuracy = train_digits_mlp(epochs=args.epochs)
    linears = [m for m in model if hasattr(m, "weight")]
    arrays = {}
    for i, layer in enumerate(linears):
        arrays[f"W{i}"] = layer.weight.detach().double().numpy()
        arrays[f"b{i}"] = layer.bias.detach().double().numpy()
    np.savez(folder / "demo.npz", **arrays)
    digits = load_digits()
    np.savez(folder / "digits.npz", x=digits.data.astype(np.float64), y=digits.target)
    radii = ", ".join(str(float(r)) for r in args.radii.split(","))
    (folder / "batch.yaml").write_text(MANIFEST.format(points=args.points, radii=radii))
    print(f"demo network: 64-32-32-10, test accuracy {accuracy:.3f}; wrote {folder}/demo.npz, digits.npz, "
          "batch.yaml")
    print(f"run:  lipbound batch {folder}/batch.yaml --out digits.jsonl --workers 2")
    print(f"  or  lipbound batch {folder}/batch.yaml --out digits_ray.jsonl --engine ray")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
