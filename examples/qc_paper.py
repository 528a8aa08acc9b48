"""Reproduce the ICLR 2024 QC paper's networks (Pauli et al., arXiv 2401.14033) with lipbound.

For the 13 ``weights_l2_*`` MaxMin networks and the 5 ``resweights_*`` residual networks of
``../shared/data/qcs_maxmin``: matrix product (MP), LipSDP-RR (where it finishes), LipSDP-NSR in l2, NSR and MP
in l-infinity for logit 8, and a lower bound; each run in its own process with a time limit. Prints a table,
writes ``results.csv``/``results.json`` and ``ratios.png`` (bound / lower bound per network and method).

    python examples/qc_paper.py --out qc_paper_out [--solver native] [--device cuda] [--timeout 300] [--only 2fc]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from lipbound.bench import NetSpec, run_isolated

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qcs_maxmin"
LOGIT = 8


def networks(data: Path, only: str | None) -> list[NetSpec]:
    specs = []
    for path in sorted(data.glob("weights_l2_*.mat"), key=lambda p: (int(p.stem.split("_")[2][:-2]),
                                                                      int(p.stem.split("_")[3]))):
        specs.append(NetSpec(path.stem, "file", str(path), activation="maxmin"))
    for path in sorted(data.glob("resweights_*.mat")):
        specs.append(NetSpec(path.stem, "file", str(path), activation="maxmin", architecture="residual"))
    return [s for s in specs if only is None or only in s.label]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="qc_paper_out")
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--only", default=None, help="substring filter on network names")
    parser.add_argument("--skip", default="", help="comma-separated runs to skip: rr, nsr, nsr-coupled, mp-l2, "
                                                   "mp-linf, linf, lb")
    parser.add_argument("--device", default=None, help="device of the native solver (cpu, cuda)")
    parser.add_argument("--data", default=str(DATA), help="folder with the QC paper's .mat files")
    args = parser.parse_args()
    data = Path(args.data)
    if not data.exists():
        print(f"data folder not found: {data}")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    runs = [("mp", "l2", {}), ("rr", "l2", {}), ("nsr", "l2", {}), ("nsr-coupled", "l2", {"coupled": True}),
            ("mp", "linf", {"output_index": LOGIT}), ("nsr", "linf", {"output_index": LOGIT})]
    records = []
    for spec in networks(data, args.only):
        for short, norm, opts in runs:
            if short in skip or f"{short}-{norm}" in skip or (norm == "linf" and "linf" in skip):
                continue
            method = {"mp": "mp", "rr": "lipsdp-rr", "nsr": "lipsdp-nsr", "nsr-coupled": "lipsdp-nsr"}[short]
            if args.device and method != "mp":
                opts = {**opts, "device": args.device}
            rec = run_isolated(spec, method, args.solver, args.timeout, norm=norm, **opts)
            rec["run"] = f"{short} {norm}"
            records.append(rec)
            print(f"{spec.label:<26}{rec['run']:<18}{_fmt(rec.get('upper_bound')):>14}{rec['time_s']:>9.2f}s "
                  f"{rec.get('solver', '')} {rec.get('error', '')}", flush=True)
        if "lb" not in skip:
            lb = run_isolated(spec, "lower_bound", timeout=args.timeout,
                              **({"device": args.device} if args.device else {}))
            lb["run"] = "lower bound l2"
            records.append(lb)
            print(f"{spec.label:<26}{'lower bound l2':<18}{_fmt(lb.get('value')):>14}{lb['time_s']:>9.2f}s", flush=True)
        (out / "results.json").write_text(json.dumps(records, indent=2, default=float))
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["network", "run", "bound", "certified", "solver", "time_s", "peak_rss_mb", "error"])
        for r in records:
            writer.writerow([r["network"], r["run"], r.get("upper_bound", r.get("value")), r.get("certified"),
                             r.get("solver", ""), f"{r['time_s']:.3f}", r.get("peak_rss_mb"), r.get("error", "")])
    _plot(records, out / "ratios.png")
    print(f"wrote {out}/results.json, results.csv, ratios.png")
    return 0


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.6g}"


def _plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(r["network"] for r in records))
    lower = {r["network"]: r.get("value") for r in records if r["run"] == "lower bound l2"}
    runs = ["mp l2", "rr l2", "nsr l2", "nsr-coupled l2"]
    fig, ax = plt.subplots(figsize=(max(8, len(nets) * 0.7), 4.5))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        xs, ys = [], []
        for j, net in enumerate(nets):
            rec = next((r for r in records if r["network"] == net and r["run"] == run), None)
            if rec and rec.get("upper_bound") and lower.get(net):
                xs.append(j + i * width)
                ys.append(rec["upper_bound"] / lower[net])
        ax.bar(xs, ys, width=width, label=run)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(nets))])
    ax.set_xticklabels(nets, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("certified l2 bound / lower bound")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
