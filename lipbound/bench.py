"""Benchmarks: methods and solvers side by side in one run, each in its own process (time limit, peak memory).

``lipbound bench SUITE`` writes JSON records ``{network, method, solver, norm, upper_bound, solver_bound,
certified, time_s, peak_rss_mb, status, ...}`` and a plot. Suites are defined in :data:`SUITES`.
Networks are described by small specs (a file with its layout, or a random net with a seed) so that each
worker process rebuilds them itself.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("lipbound")


@dataclass(frozen=True)
class NetSpec:
    """A network to rebuild in a worker: ``kind="file"`` (path, activation, architecture) or ``"random"``
    (dims, activation, seed, nonneg)."""

    label: str
    kind: str
    path: str = ""
    dims: tuple[int, ...] = ()
    activation: str = "relu"
    architecture: str = "feedforward"
    seed: int = 0
    nonneg: bool = False
    extra: dict = field(default_factory=dict)

    def build(self):
        import lipbound

        if self.kind == "file":
            return lipbound.load(self.path, activation=self.activation, architecture=self.architecture)
        rng = np.random.default_rng(self.seed)
        weights = []
        for i in range(len(self.dims) - 1):
            w = rng.standard_normal((self.dims[i + 1], self.dims[i])) / np.sqrt(self.dims[i])
            weights.append(np.abs(w) if self.nonneg else w)
        return lipbound.from_weights(weights, self.activation)


def _preload(method: str, solver: str) -> None:
    """Import what a run needs before its clock starts: a user certifying many networks pays imports once."""
    if method.startswith("eclipse"):
        try:
            import eclipse_nn.eclipsE  # noqa: F401
        except ImportError:  # reported by the run itself (lipbound.peers raises a clear SolverError)
            pass
    elif solver in ("clarabel", "scs", "mosek", "sdpa"):
        import cvxpy  # noqa: F401


def _certify_worker(spec: NetSpec, method: str, solver: str, options: dict, queue) -> None:
    import lipbound

    _preload(method, solver)
    start = time.perf_counter()
    try:
        net = spec.build()
        if method == "lower_bound":
            lb = lipbound.lower_bound(net, **options)
            record = {"value": lb.value, "device": lb.device, "status": "ok"}
        elif method.startswith("eclipse"):
            from lipbound.peers import eclipse_bound

            record = eclipse_bound(net, method)
        else:
            cert = lipbound.certify(net, method=method, solver=solver, **options)
            record = {"upper_bound": cert.upper_bound, "certified": cert.certified, "solver_bound": cert.solver_bound,
                      "status": cert.status, "reason": cert.reason, "eigen_defect": cert.eigen_defect,
                      "delta": cert.delta, "timings": cert.timings, "sizes": cert.sizes, "solver": cert.solver,
                      "solver_info": cert.solver_info}
    except Exception as exc:  # recorded, not hidden: the table shows the error
        record = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    record["time_s"] = time.perf_counter() - start
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(record)


def run_isolated(spec: NetSpec, method: str, solver: str = "auto", timeout: float = 600.0, **options) -> dict:
    """Run one certification (or ``method="lower_bound"``) in a fresh process with a time limit.

    Returns a record; on timeout or a killed process (e.g. out of memory) the record says so.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_certify_worker, args=(spec, method, solver, options, queue))
    start = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        record = {"status": "timeout", "error": f"no result within {timeout:.0f} s", "time_s": timeout}
    elif proc.exitcode != 0 and queue.empty():
        record = {"status": "killed", "error": f"process died (exit code {proc.exitcode}; out of memory?)",
                  "time_s": time.perf_counter() - start}
    else:
        record = queue.get()
    record.update({"network": spec.label, "method": method, "solver_requested": solver})
    record.update({k: v for k, v in options.items() if isinstance(v, (int, float, str, bool, type(None)))})
    log.info("bench %s %s %s: %s", spec.label, method, solver, record.get("upper_bound", record.get("error")))
    return record


def write_json(records: list[dict], path: str | Path) -> None:
    Path(path).write_text(json.dumps(records, indent=2, default=float))


def _exact_product_norm(spec: NetSpec) -> float:
    """``||W_L ... W_1||_2`` (the exact Lipschitz constant of a ReLU net with nonnegative weights, zero biases)."""
    net = spec.build()
    prod = net.weights[0]
    for w in net.weights[1:]:
        prod = w @ prod
    return float(np.linalg.norm(prod, 2))


#: (method, solver, options) runs per suite; "eclipse*" are the eclipse-nn peer.
#: ``reduce_input=False`` hands SCS the plain LipSDP program, as the peers' cvxpy code builds it.
LIPSDP_RUNS = [("mp", "auto", {}), ("lipsdp-neuron", "native", {}), ("lipsdp-neuron", "scs", {}),
               ("lipsdp-neuron", "scs", {"reduce_input": False}), ("lipsdp-neuron", "clarabel", {}),
               ("eclipse", "-", {}), ("eclipse-fast", "-", {})]
QC_RUNS = [("mp", "auto", {}), ("lipsdp-nsr", "native", {}), ("lipsdp-nsr", "scs", {}),
           ("lipsdp-nsr", "native", {"coupled": True}), ("lipsdp-nsr", "native", {"norm": "linf", "output_index": 8}),
           ("lipsdp-nsr", "scs", {"norm": "linf", "output_index": 8})]


def suite(name: str, sizes: list[int] | None = None, data_dir: str | Path | None = None) -> list[NetSpec]:
    """Networks of a benchmark suite: ``random`` (784-n-n-10 signed ReLU), ``deep`` (4-w-...-w-1 nonnegative,
    exact value known), ``qc`` (the ICLR 2024 MaxMin networks in ``data_dir``)."""
    if name == "random":
        specs = [NetSpec(f"784-{n}-{n}-10", "random", dims=(784, n, n, 10), seed=n)
                 for n in (sizes or [20, 50, 100, 200, 400, 1000])]
        if not sizes or 500 in sizes:
            specs.append(NetSpec("784-500-200-50-10", "random", dims=(784, 500, 200, 50, 10), seed=500))
        return specs
    if name == "deep":
        out = []
        for width, depth in [(20, 2), (20, 10), (50, 10), (20, 50), (100, 10), (50, 50), (20, 100), (100, 30)]:
            if sizes and width * depth not in sizes and width not in sizes:
                continue
            out.append(NetSpec(f"4-{width}x{depth}-1", "random", dims=(4,) + (width,) * depth + (1,), seed=depth,
                               nonneg=True))
        return out
    if name == "qc":
        folder = Path(data_dir) if data_dir else Path(__file__).resolve().parents[2] / "shared" / "data" / "qcs_maxmin"
        specs = [NetSpec(p.stem, "file", str(p), activation="maxmin") for p in sorted(folder.glob("weights_l2_*.mat"))]
        specs += [NetSpec(p.stem, "file", str(p), activation="maxmin", architecture="residual")
                  for p in sorted(folder.glob("resweights_*.mat"))]
        if sizes:
            specs = [s for s in specs if any(f"_{n}" in s.label for n in sizes)]
        return specs
    raise ValueError(f"unknown suite {name!r}; use random, deep or qc.")


def run_suite(name: str, out_dir: str | Path, solvers: list[str] | None = None, sizes: list[int] | None = None,
              timeout: float = 600.0, device: str | None = None, progress=print,
              networks: list[str] | None = None) -> list[dict]:
    """Run a suite side by side, write ``<out_dir>/<name>.json`` and ``<name>.png``; return the records.

    ``solvers`` keeps the runs whose solver or method is listed; ``networks`` keeps the suite's networks with
    these labels (an unknown label is an error, not an empty run).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = QC_RUNS if name == "qc" else LIPSDP_RUNS
    records = []
    skip_rest: set[tuple] = set()
    specs = suite(name, sizes)
    if networks:
        unknown = set(networks) - {s.label for s in specs}
        if unknown:
            raise ValueError(f"suite {name!r} has no network(s) {', '.join(sorted(unknown))}; it has "
                             f"{', '.join(s.label for s in specs)}.")
        specs = [s for s in specs if s.label in networks]
    for spec in specs:
        exact = _exact_product_norm(spec) if spec.nonneg else None
        for method, solver, opts in runs:
            key = (method, solver, tuple(sorted(opts.items())))
            if solvers and solver not in solvers and method not in solvers:
                continue
            if key in skip_rest:
                records.append({"network": spec.label, "method": method, "solver_requested": solver, **opts,
                                "status": "skipped", "error": "a smaller network of this suite already timed out"})
                continue
            options = dict(opts)
            if solver == "native" and device:
                options["device"] = device
            rec = run_isolated(spec, method, solver, timeout, **options)
            rec["hidden_neurons"] = int(sum(spec.dims[1:-1])) if spec.dims else None
            if exact is not None:
                rec["exact"] = exact
            records.append(rec)
            if rec.get("status") in ("timeout", "killed"):
                skip_rest.add(key)
            progress(_line(rec))
        write_json(records, out / f"{name}.json")
    _plot_times(records, out / f"{name}.png", name)
    return records


def _line(r: dict) -> str:
    value = r.get("upper_bound")
    shown = "-" if value is None else f"{value:.7g}"
    flag = "" if r.get("certified", True) else " (uncertified)"
    extra = f" exact {r['exact']:.7g}" if "exact" in r else ""
    solver = r.get("solver", r["solver_requested"]) + (" (unreduced)" if r.get("reduce_input") is False else "")
    return (f"{r['network']:<22}{r['method']:<15}{solver:<13}"
            f"{r.get('norm', 'l2'):<5}{shown:>14}{flag}{extra}  {r['time_s']:.2f} s  "
            f"{r.get('peak_rss_mb', 0):.0f} MB  {r.get('status', '')} {r.get('error', '')}")


def _plot_times(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[tuple[float, float]]] = {}
    for i, r in enumerate(records):
        if r.get("upper_bound") is None:
            continue
        label = f"{r['method']} / {r.get('solver', r['solver_requested'])}"
        if r.get("norm", "l2") != "l2":
            label += f" ({r['norm']})"
        if r.get("coupled"):
            label += " coupled"
        if r.get("reduce_input") is False:
            label += " unreduced"
        x = r.get("hidden_neurons") or i
        groups.setdefault(label, []).append((x, r["time_s"]))
    for label, pts in groups.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("hidden neurons")
    ax.set_ylabel("time [s] (formulate + solve + certify)")
    ax.set_title(f"lipbound bench {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
