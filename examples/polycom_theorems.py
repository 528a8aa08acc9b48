"""Run every PolyCom theory check (``theory/polycom.py``), print PASS/FAIL lines and save plots.

Usage::

    python examples/polycom_theorems.py --out polycom_out/ [--fast]

Writes to ``--out``:

* ``theorem2_sawtooth.png``: exact sup error of Yarotsky's ReLU sawtooth approximation of ``x**2`` against
  its size (log scale), with the lower bound every ReLU network of that size obeys; PolyReLU is exact with
  2 units.
* ``theorem3_rate_d{d}_n{n}.png``: log-log sup error against network size for the Theorem 3 construction,
  PolyReLU (exact products) and ReLU (sawtooth products), with the predicted slope ``-n/d``.
* ``results.json``: every check's name, status, kind (exact proof / measurement) and numbers.

The exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

# The script is run as a file from the repository root, so the repository is not on sys.path by default.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # headless: only files are written
import matplotlib.pyplot as plt  # noqa: E402

from theory.polycom import CheckResult, run_all  # noqa: E402


def plot_sawtooth(result: CheckResult, path: Path) -> None:
    """Plot the exact sawtooth errors and the ReLU lower bound ``eps >= 4**(-N)/8`` against units ``N``."""
    data = result.data
    units, errors = data["units"], data["errors"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.semilogy(units, errors, "o-", label="ReLU sawtooth (Yarotsky), exact sup error $2^{-2m-2}$")
    n_range = list(range(1, max(units) + 1))
    ax.semilogy(n_range, [4.0 ** (-n) / 8 for n in n_range], "k--",
                label="lower bound for any ReLU net with N units: $4^{-N}/8$")
    ax.axvline(2, color="tab:red", lw=1.5, label="PolyReLU: exact ($x^2$, error 0) with 2 units")
    ax.set_xlabel("network size N (units)")
    ax.set_ylabel(r"$\sup_{[0,1]} |f(x) - x^2|$")
    ax.set_title("x^2 on [0,1]: ReLU size ~ ln(1/eps), PolyReLU exact")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rate(result: CheckResult, path: Path) -> None:
    """Log-log plot of sup error against units, PolyReLU vs ReLU, with the predicted slope ``-n/d``."""
    data = result.data
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.loglog(data["polyrelu_units"], data["polyrelu_errors"], "o-", color="tab:red",
              label=f"PolyReLU (exact products), fitted slope {data['polyrelu_slope']:.2f}")
    ax.loglog(data["relu_units"], data["relu_errors"], "s-", color="tab:blue",
              label=f"ReLU (sawtooth products), fitted slope {data['relu_slope']:.2f}")
    x0, y0 = data["polyrelu_units"][0], data["polyrelu_errors"][0]
    xs = [x0, data["polyrelu_units"][-1]]
    ax.loglog(xs, [y0 * (x / x0) ** data["predicted"] for x in xs], "k--",
              label=f"predicted slope -n/d = {data['predicted']:.2f}")
    ax.set_xlabel("network size (units)")
    ax.set_ylabel("sup error on grid")
    ax.set_title(f"Theorem 3 construction, d = {data['d']}, n = {data['n']}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks, print the results, write plots and ``results.json``; return the exit status."""
    parser = argparse.ArgumentParser(description="PolyCom theorem checks with plots.")
    parser.add_argument("--out", default="polycom_out/", help="output directory (created if missing)")
    parser.add_argument("--fast", action="store_true", help="coarse grids, as used by the tests")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = run_all(fast=args.fast)
    for res in results:
        print(res.line())
        print(f"    {res.note}")
        if res.name == "theorem2_sawtooth_separation":
            plot_sawtooth(res, out / "theorem2_sawtooth.png")
        elif res.name.startswith("theorem3_rate"):
            plot_rate(res, out / f"{res.name}.png")
    (out / "results.json").write_text(json.dumps([_jsonable(r.as_dict()) for r in results], indent=2))
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed; plots and results.json in {out}/")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
