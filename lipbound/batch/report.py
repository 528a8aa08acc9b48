"""The summary of a batch: a table (global bounds per model and method; local bounds per radius over the
points) and plots (certified bound per model, local bound versus radius per point with the lower bounds, time per
job)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lipbound.batch.expectations import _number
from lipbound.batch.manifest import as_manifest
from lipbound.batch.results import read_records

log = logging.getLogger("lipbound")

#: At most this many model/method panels in the local-bound plot (the table has them all).
MAX_PANELS = 12


@dataclass(frozen=True)
class Summary:
    """Rows of the summary table, its text, the plot files written and the job counts."""

    rows: list
    table: str
    plots: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "counts": self.counts, "plots": [str(p) for p in self.plots]}


def _facts(record: dict) -> dict | None:
    """The fields of a record the summary uses (validated; ``None`` for a record without a job description)."""
    job = record.get("job")
    if not isinstance(job, dict):
        return None
    cert = record.get("certificate") if isinstance(record.get("certificate"), dict) else {}
    domain = job.get("domain") if isinstance(job.get("domain"), dict) else None
    certified = cert.get("certified") is True
    return {"model": str(job.get("model")), "method": str(job.get("method")), "norm": str(job.get("norm")),
            "output": job.get("output_index"), "status": record["status"], "certified": certified,
            "bound": _number(cert.get("upper_bound")) if certified else None,
            "lower": _number(cert.get("lower_bound")), "time": _number(record.get("time_s")),
            "radius": None if domain is None else _number(domain.get("radius")),
            "ball": None if domain is None else str(domain.get("norm")),
            "point": None if domain is None else f"{domain.get('source')}[{domain.get('point')}]"}


def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _rows(facts: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for f in facts:
        groups[(f["model"], f["method"], f["norm"], f["output"], f["ball"], f["radius"])].append(f)
    rows = []
    for (model, method, norm, output, ball, radius), items in groups.items():
        bounds = [f["bound"] for f in items if f["bound"] is not None]
        gaps = [f["bound"] / f["lower"] for f in items if f["bound"] is not None and f["lower"]]
        rows.append({"model": model, "method": method, "norm": norm, "output": output,
                     "region": "global" if radius is None else f"{ball} r={radius:g}", "radius": radius,
                     "ball_norm": ball, "jobs": len(items), "failed": sum(f["status"] != "ok" for f in items),
                     "uncertified": sum(f["status"] == "ok" and not f["certified"] for f in items),
                     "bound": _median(bounds), "bound_max": max(bounds) if bounds else None,
                     "lower_bound": _median([f["lower"] for f in items]), "gap": _median(gaps),
                     "time_s": _median([f["time"] for f in items])})
    rows.sort(key=lambda r: (r["model"], r["method"], r["norm"], str(r["output"]), r["radius"] is not None,
                             r["ball_norm"] or "", r["radius"] or 0.0))
    return rows


def _fmt(value, spec=".6g") -> str:
    return "-" if value is None else format(value, spec)


def format_rows(rows: list[dict]) -> str:
    """Plain-text table; a local row summarises its points (median bound, max bound, median gap)."""
    header = (f"{'model':<22}{'method':<15}{'norm':<6}{'out':>4}  {'region':<14}{'jobs':>6}{'failed':>7}"
              f"{'bound (med)':>14}{'bound (max)':>14}{'lower (med)':>14}{'gap (med)':>11}{'time/job':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        out = "-" if r["output"] is None else str(r["output"])
        failed = r["failed"] + r["uncertified"]
        lines.append(f"{r['model'][:21]:<22}{r['method']:<15}{r['norm']:<6}{out:>4}  {r['region']:<14}"
                     f"{r['jobs']:>6}{failed:>7}{_fmt(r['bound']):>14}{_fmt(r['bound_max']):>14}"
                     f"{_fmt(r['lower_bound']):>14}{_fmt(r['gap'], '.4f'):>11}{_fmt(r['time_s'], '.3f'):>10}")
    return "\n".join(lines)


def _plot_global(rows: list[dict], path: Path) -> Path | None:
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["radius"] is None and r["bound"] is not None]
    if not rows:
        return None
    models = sorted({r["model"] for r in rows})
    series = sorted({(r["method"], r["norm"], str(r["output"])) for r in rows})
    step = 0.6 / max(1, len(series) - 1) if len(series) > 1 else 0.0
    fig = Figure(figsize=(max(6.0, 0.9 * len(models) + 3), 4.5))
    ax = fig.subplots()
    for k, key in enumerate(series):
        chosen = [(models.index(r["model"]), r) for r in rows if (r["method"], r["norm"], str(r["output"])) == key]
        xs = [i - 0.3 + k * step if len(series) > 1 else i for i, _ in chosen]
        label = f"{key[0]} {key[1]}" + ("" if key[2] == "None" else f" out {key[2]}")
        ax.plot(xs, [r["bound"] for _, r in chosen], "o", label=label)
        lows = [(x, r["lower_bound"]) for x, (_, r) in zip(xs, chosen, strict=True) if r["lower_bound"]]
        if lows:
            ax.plot(*zip(*lows, strict=True), "k_", markersize=14)
    values = [r["bound"] for r in rows] + [r["lower_bound"] for r in rows if r["lower_bound"]]
    if max(values) > 20 * min(values):
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1.1 * max(values))
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_xlim(-0.7, len(models) - 0.3)
    ax.set_ylabel("certified Lipschitz bound")
    ax.set_title("Certified bound per model (black dash: attained lower bound)", fontsize="medium")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _plot_local(facts: list[dict], path: Path) -> Path | None:
    from matplotlib.figure import Figure

    local = [f for f in facts if f["radius"] is not None and f["bound"] is not None and f["radius"] > 0]
    if not local:
        return None
    panels = defaultdict(list)
    for f in local:
        panels[(f["model"], f["method"], f["norm"], f["output"])].append(f)
    keys = sorted(panels, key=str)
    if len(keys) > MAX_PANELS:
        log.info("batch summary: plotting the first %d of %d model/method panels", MAX_PANELS, len(keys))
        keys = keys[:MAX_PANELS]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        curves = defaultdict(list)
        for f in panels[key]:
            curves[(f["point"], f["ball"])].append(f)
        for items in curves.values():
            items.sort(key=lambda f: f["radius"])
            radii = [f["radius"] for f in items]
            ax.plot(radii, [f["bound"] for f in items], "-", color="tab:blue", alpha=0.35, lw=1)
            lows = [(f["radius"], f["lower"]) for f in items if f["lower"]]
            if lows:
                ax.plot(*zip(*lows, strict=True), "--", color="tab:orange", alpha=0.35, lw=1)
        ax.plot([], [], "-", color="tab:blue", label="certified (one line per point)")
        ax.plot([], [], "--", color="tab:orange", label="lower bound (attack)")
        ax.set_xscale("log")
        ax.set_xlabel("radius")
        ax.set_ylabel("local Lipschitz bound")
        output = "" if key[3] is None else f" out {key[3]}"
        ax.set_title(f"{key[0]}: {key[1]} {key[2]}{output}", fontsize="medium")
        ax.legend(fontsize="x-small")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _plot_times(facts: list[dict], path: Path) -> Path | None:
    from matplotlib.figure import Figure

    by_method = defaultdict(list)
    for f in facts:
        if f["time"] is not None and f["time"] > 0:
            by_method[f["method"]].append(f["time"])
    if not by_method:
        return None
    all_times = [t for ts in by_method.values() for t in ts]
    bins = np.geomspace(min(all_times), max(all_times) * 1.0001, 30) if max(all_times) > min(all_times) else 10
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for method, times in sorted(by_method.items()):
        ax.hist(times, bins=bins, alpha=0.6, label=f"{method} ({len(times)} jobs, median {np.median(times):.3g} s)")
    ax.set_xscale("log")
    ax.set_xlabel("time per job [s]")
    ax.set_ylabel("jobs")
    ax.set_title("Time per job")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def summarize(results: str | Path, manifest=None, out_dir: str | Path | None = None) -> Summary:
    """Table (and, with ``out_dir``, plots plus ``summary.json``/``summary.txt``) of a batch's results.

    With ``manifest``, only its jobs count (the latest record of each); otherwise every record of the file.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, lipbound
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> np.savez(folder / "net.npz", W0=np.eye(2), W1=3 * np.eye(2))
    >>> manifest = lipbound.batch.Manifest.from_dict({"models": ["net.npz"], "methods": ["mp"]}, base_dir=folder)
    >>> with lipbound.batch.ResultsWriter(folder / "r.jsonl") as w:
    ...     w.append(lipbound.batch.execute_job(next(manifest.jobs()).payload()))
    >>> summary = summarize(folder / "r.jsonl", manifest)
    >>> summary.rows[0]["model"], round(summary.rows[0]["bound"], 6), summary.counts["ok"]
    ('net', 3.0, 1)
    """
    wanted = None if manifest is None else {job.id for job in as_manifest(manifest).jobs()}
    latest: dict[str, dict] = {}
    for record in read_records(results):
        if wanted is not None and record["job_id"] not in wanted:
            continue
        facts = _facts(record)
        if facts is not None:
            latest[record["job_id"]] = facts
    facts = list(latest.values())
    counts = {"jobs": len(facts), "ok": sum(f["status"] == "ok" for f in facts),
              "failed": sum(f["status"] != "ok" for f in facts),
              "uncertified": sum(f["status"] == "ok" and not f["certified"] for f in facts)}
    if wanted is not None:
        counts["missing"] = len(wanted) - len(facts)
    rows = _rows(facts)
    table = format_rows(rows)
    plots = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for draw, name in ((_plot_global, "bounds_per_model.png"), (_plot_local, "local_bounds.png"),
                           (_plot_times, "time_per_job.png")):
            written = draw(rows if draw is _plot_global else facts, out_dir / name)
            if written is not None:
                plots.append(written)
        summary = Summary(rows, table, plots, counts)
        (out_dir / "summary.txt").write_text(table + "\n")
        (out_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
        return summary
    return Summary(rows, table, plots, counts)
