"""Benchmarks: methods and solvers side by side in one run, each in its own process (time limit, peak memory).

``lipbound bench SUITE`` writes JSON records ``{network, method, solver, norm, upper_bound, solver_bound,
certified, time_s, peak_rss_mb, status, ...}`` and a plot. Suites are listed by :func:`suite`.
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
    (dims, activation, seed, nonneg; ``spectral``: every weight divided by its spectral norm, else by the square
    root of its input width)."""

    label: str
    kind: str
    path: str = ""
    dims: tuple[int, ...] = ()
    activation: str = "relu"
    architecture: str = "feedforward"
    seed: int = 0
    nonneg: bool = False
    spectral: bool = False
    extra: dict = field(default_factory=dict)

    def build(self):
        import lipbound

        if self.kind == "file":
            return lipbound.load(self.path, activation=self.activation, architecture=self.architecture)
        if self.kind == "cnn":
            import torch

            torch.manual_seed(self.seed)
            model = glipsdp_cnn(self.extra["channels"], self.extra["conv_layers"]).eval()
            return lipbound.from_torch(model, input_shape=(1, 14, 14))
        rng = np.random.default_rng(self.seed)
        weights = []
        for i in range(len(self.dims) - 1):
            w = rng.standard_normal((self.dims[i + 1], self.dims[i]))
            w = np.abs(w) if self.nonneg else w
            weights.append(w / np.linalg.norm(w, 2) if self.spectral else w / np.sqrt(self.dims[i]))
        return lipbound.from_weights(weights, self.activation)


def glipsdp_cnn(channels: int, conv_layers: int):
    """The convolutional networks of GLipSDP's scalability study (Pauli, Gramlich, Allgower, arXiv 2405.01125):
    14x14 single-channel inputs, ``conv_layers`` 3x3 convolutions of ``channels`` channels (stride 1, zero padding
    1) with ReLU, then a linear layer to 10 outputs; torch's default initialisation (seed it before calling)."""
    import torch
    from torch import nn

    layers: list = []
    for i in range(conv_layers):
        layers += [nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 14 * 14, 10)).to(torch.float32)


def _preload(method: str, solver: str) -> None:
    """Import what a run needs before its clock starts: a user certifying many networks pays imports once."""
    if method.startswith("eclipse"):
        try:
            import eclipse_nn.eclipsE  # noqa: F401
        except ImportError:  # reported by the run itself (lipbound.peers raises a clear SolverError)
            pass
    elif solver in ("clarabel", "scs", "mosek", "sdpa"):
        import cvxpy  # noqa: F401


def _run(net, method: str, solver: str, options: dict) -> dict:
    """One measured run on ``net``: a certificate, a lower bound or a peer's bound, as a record."""
    import lipbound

    if method == "lower_bound":
        lb = lipbound.lower_bound(net, **options)
        return {"value": lb.value, "device": lb.device, "status": "ok"}
    if method.startswith("eclipse"):
        from lipbound.peers import eclipse_bound

        return eclipse_bound(net, method)
    cert = lipbound.certify(net, method=method, solver=solver, **options)
    return {"upper_bound": cert.upper_bound, "certified": cert.certified, "solver_bound": cert.solver_bound,
            "status": cert.status, "reason": cert.reason, "eigen_defect": cert.eigen_defect,
            "delta": cert.delta, "timings": cert.timings, "sizes": cert.sizes, "solver": cert.solver,
            "solver_info": cert.solver_info, "notes": list(cert.notes)}


def _warm_up(method: str, solver: str, options: dict) -> dict:
    """Run the same method and solver once on a tiny network (4-8-8-10, seeded; a 1x4x4 CNN for the circulant
    solver) before the clock starts.

    Every method pays first-call costs once per process (torch's and LAPACK's lazy initialisation, cvxpy's first
    canonicalisation, the first rigorous check): 0.15 s of a cold 0.46 s native certificate of 784-50-50-10, under
    0.03 s of cvxpy+SCS's 8.4 s. A user certifying many networks pays them once, so every run of a suite is
    measured warm, peers included. A failure here is recorded, not raised: the measured run reports its own.
    """
    import lipbound

    rng = np.random.default_rng(0)
    if solver == "circulant":  # a convolutional chain: Conv(1 -> 2, 3x3) on 4x4 images, ReLU, a linear head
        import torch

        torch.manual_seed(0)
        tiny = lipbound.from_torch(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(),
                                                       torch.nn.Flatten(), torch.nn.Linear(32, 3)), (1, 4, 4))
    else:
        tiny = lipbound.from_weights([rng.standard_normal(shape) / 3 for shape in ((8, 4), (8, 8), (10, 8))])
    start = time.perf_counter()
    try:
        _run(tiny, method, solver, options)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"warm_up_s": time.perf_counter() - start, "warm_up_error": error}


def _certify_worker(spec: NetSpec, method: str, solver: str, options: dict, queue) -> None:
    _preload(method, solver)
    warm = _warm_up(method, solver, options)
    start = time.perf_counter()
    try:
        record = _run(spec.build(), method, solver, options)
    except Exception as exc:  # recorded, not hidden: the table shows the error
        record = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    record["time_s"] = time.perf_counter() - start
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record.update(warm)
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
#: Both layouts of the native solver next to its automatic choice (deep chains are where they differ).
STRATEGY_RUNS = [("lipsdp-neuron", "native-dense", {}), ("lipsdp-neuron", "native-chordal", {})]
DEEP_RUNS = LIPSDP_RUNS + STRATEGY_RUNS
GLIPSDP_RUNS = [("mp", "auto", {}), ("lipsdp-neuron", "native", {})] + STRATEGY_RUNS

#: Published times (seconds) of GLipSDP's MLP scalability study (``ppauli/GLipSDP``, Scalability/results/
#: results_all_FC_trained*.mat; MATLAB, YALMIP, MOSEK 11): LipSDP solved by MOSEK, and GLipSDP, per hidden width
#: and number of weight matrices of trained MNIST MLPs (the width x width stack only). Context, not a side-by-side
#: measurement: other machine, other (trained) weights.
GLIPSDP_PUBLISHED = {
    16: {2: (0.005, 0.008), 4: (0.017, 0.017), 8: (0.066, 0.039), 16: (0.39, 0.087), 32: (2.25, 0.20),
         64: (9.8, 0.38)},
    32: {2: (0.018, 0.044), 4: (0.081, 0.15), 8: (0.42, 0.37), 16: (2.70, 0.82), 32: (11.3, 1.96),
         64: (83.7, 3.95)},
    64: {2: (0.11, 0.39), 4: (0.83, 1.90), 8: (2.85, 5.09), 16: (12.1, 14.1), 32: (96.1, 29.4),
         64: (830.4, 65.9)},
}
#: Published GLipSDP times (seconds; MATLAB + MOSEK) for the CNNs of :func:`glipsdp_cnn`, per (channels, conv
#: layers), from the paper's scalability figure and text. Context, not a side-by-side measurement.
GLIPSDP_CNN_PUBLISHED = {(8, 2): 0.13, (8, 16): 0.89, (32, 2): 24.4, (32, 8): 269.0, (32, 16): 548.0}
GLIPSDP_CNN_RUNS = [("mp", "auto", {}), ("lipsdp-channel", "circulant", {}), ("lipsdp-channel", "native", {}),
                    ("lipsdp-neuron", "native", {})]
GLIPSDP_WEIGHTS = ("random signed Gaussian weights, each divided by its spectral norm (seeded); GLipSDP's published "
                   "times are for trained MNIST MLPs, of which only the width x width stack was analysed")


def suite(name: str, sizes: list[int] | None = None, data_dir: str | Path | None = None) -> list[NetSpec]:
    """Networks of a benchmark suite: ``random`` (784-n-n-10 signed ReLU), ``deep`` (4-w-...-w-1 nonnegative,
    exact value known), ``qc`` (the ICLR 2024 MaxMin networks in ``data_dir``), ``glipsdp-mlp`` (784-w-...-w-10
    ReLU with d weight matrices, the shapes of GLipSDP's MLP table, random signed weights of spectral norm 1;
    ``sizes`` filters widths or depths), ``threads`` (the thread-policy measurement's networks)."""
    if name == "glipsdp-mlp":
        out = []
        for width, row in GLIPSDP_PUBLISHED.items():
            for depth in row:
                if sizes and width not in sizes and depth not in sizes:
                    continue
                out.append(NetSpec(f"glipsdp-{width}x{depth}", "random", dims=(784,) + (width,) * (depth - 1) + (10,),
                                   seed=1000 * width + depth, spectral=True,
                                   extra={"width": width, "matrices": depth}))
        return out
    if name == "glipsdp-cnn":
        out = []
        for channels in (8, 16, 32):
            for depth in (2, 4, 8, 16):
                if sizes and channels not in sizes and depth not in sizes:
                    continue
                out.append(NetSpec(f"cnn-c{channels}-d{depth}", "cnn", seed=100 * channels + depth,
                                   extra={"channels": channels, "conv_layers": depth}))
        return out
    if name == "threads":
        specs = [NetSpec(f"784-{n}-{n}-10", "random", dims=(784, n, n, 10), seed=n) for n in (50, 100, 200, 400, 1000)]
        specs += [NetSpec("4-20x100-1", "random", dims=(4,) + (20,) * 100 + (1,), seed=100, nonneg=True),
                  NetSpec("glipsdp-64x16", "random", dims=(784,) + (64,) * 15 + (10,), seed=64016, spectral=True)]
        if sizes:
            specs = [s for s in specs if any(str(n) in s.label for n in sizes)]
        return specs
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
    raise ValueError(f"unknown suite {name!r}; use random, deep, qc, glipsdp-mlp, glipsdp-cnn or threads.")


def run_suite(name: str, out_dir: str | Path, solvers: list[str] | None = None, sizes: list[int] | None = None,
              timeout: float = 600.0, device: str | None = None, progress=print,
              networks: list[str] | None = None) -> list[dict]:
    """Run a suite side by side, write ``<out_dir>/<name>.json`` and ``<name>.png``; return the records.

    ``solvers`` keeps the runs whose solver or method is listed; ``networks`` keeps the suite's networks with
    these labels (an unknown label is an error, not an empty run).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if name == "threads":
        return measure_threads(out, sizes, timeout, progress=progress, networks=networks)
    runs = {"qc": QC_RUNS, "deep": DEEP_RUNS, "glipsdp-mlp": GLIPSDP_RUNS,
            "glipsdp-cnn": GLIPSDP_CNN_RUNS}.get(name, LIPSDP_RUNS)
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
            if (solver.startswith("native") or solver == "circulant") and device:
                options["device"] = device
            rec = run_isolated(spec, method, solver, timeout, **options)
            rec["hidden_neurons"] = int(sum(spec.dims[1:-1])) if spec.dims else None
            if spec.kind == "cnn":
                rec["hidden_neurons"] = spec.extra["channels"] * spec.extra["conv_layers"] * 14 * 14
                rec.update({"channels": spec.extra["channels"], "conv_layers": spec.extra["conv_layers"],
                            "published_glipsdp_s": GLIPSDP_CNN_PUBLISHED.get(
                                (spec.extra["channels"], spec.extra["conv_layers"])),
                            "weights": "torch default initialisation (seeded); GLipSDP's published times are for "
                                       "trained networks"})
            if exact is not None:
                rec["exact"] = exact
            if name == "glipsdp-mlp":
                mosek, glip = GLIPSDP_PUBLISHED[spec.extra["width"]][spec.extra["matrices"]]
                rec.update({"width": spec.extra["width"], "matrices": spec.extra["matrices"],
                            "published_mosek_lipsdp_s": mosek, "published_glipsdp_s": glip,
                            "weights": GLIPSDP_WEIGHTS})
            records.append(rec)
            if rec.get("status") in ("timeout", "killed"):
                skip_rest.add(key)
            progress(_line(rec))
        write_json(records, out / f"{name}.json")
    _plot_times(records, out / f"{name}.png", name)
    return records


#: Matrix orders of the thread-policy kernel measurements (``lipbound bench threads``).
THREAD_ORDERS = (250, 500, 1000, 2000, 3000, 4000, 6000, 8000)


def _kernel_worker(threads: int, orders: tuple[int, ...], queue) -> None:
    """Time a float64 Cholesky factorisation and a product of each order with ``threads`` threads (median of 3)."""
    import torch

    torch.set_num_threads(threads)
    rows = []
    for n in orders:
        gen = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, dtype=torch.float64, generator=gen)
        spd = a @ a.T + n * torch.eye(n, dtype=torch.float64)
        for kernel, fn in (("cholesky", lambda m=spd: torch.linalg.cholesky(m)), ("matmul", lambda m=a: m @ m)):
            fn()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            rows.append({"kernel": kernel, "order": n, "threads": threads, "time_s": float(np.median(times))})
    queue.put(rows)


def fit_crossover(kernels: list[dict], margin: float = 0.9) -> float:
    """Smallest order from which, for every kernel and every larger measured order, the fastest multi-thread run
    takes at most ``margin`` times the one-thread time (``inf`` if more threads never pay).

    Examples
    --------
    >>> rows = [{"kernel": "cholesky", "order": n, "threads": t, "time_s": s}
    ...         for n, t, s in [(500, 1, 1.0), (500, 8, 3.0), (2000, 1, 1.0), (2000, 8, 0.4)]]
    >>> fit_crossover(rows)
    2000.0
    """
    orders = sorted({k["order"] for k in kernels})
    pays = {}
    for n in orders:
        ok = True
        for kernel in {k["kernel"] for k in kernels}:
            rows = [k for k in kernels if k["order"] == n and k["kernel"] == kernel]
            one = [k["time_s"] for k in rows if k["threads"] == 1]
            more = [k["time_s"] for k in rows if k["threads"] > 1]
            ok &= bool(one and more and min(more) <= margin * one[0])
        pays[n] = ok
    for i, n in enumerate(orders):
        if all(pays[m] for m in orders[i:]):
            return float(n)
    return float("inf")


def measure_threads(out: Path, sizes: list[int] | None = None, timeout: float = 600.0, progress=print,
                    networks: list[str] | None = None, orders: tuple[int, ...] = THREAD_ORDERS) -> list[dict]:
    """``lipbound bench threads``: the data behind the native solver's thread policy, written to ``threads.json``.

    Times dense kernels (Cholesky, product) of several orders with 1, 2, 4, ... threads (each thread count in a
    fresh process) and fits the crossover order (:func:`fit_crossover`; the value for
    :data:`lipbound.solvers.threads.CROSSOVER`); then solves the ``threads`` suite's networks with the policy and
    with every forced thread count, so the JSON shows whether the policy is ever slower than a forced count.
    """
    from lipbound.solvers.threads import CROSSOVER, available_cores

    cores = available_cores()
    counts = sorted({t for t in (1, 2, 4, 8, 16, 32, 64, cores) if t <= cores})
    ctx = mp.get_context("spawn")
    kernels: list[dict] = []
    for t in counts:
        queue = ctx.Queue()
        proc = ctx.Process(target=_kernel_worker, args=(t, tuple(orders), queue))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            progress(f"kernels with {t} threads: no result within {timeout:.0f} s")
            continue
        if not queue.empty():
            kernels += queue.get()
        progress(f"kernels with {t} threads: " + ", ".join(f"{k['kernel']} {k['order']} {k['time_s']:.3g} s"
                                                          for k in kernels if k["threads"] == t))
    crossover = fit_crossover(kernels)
    specs = suite("threads", sizes)
    if networks:
        specs = [s for s in specs if s.label in networks]
    solves = []
    for spec in specs:
        for t in [None] + counts:
            rec = run_isolated(spec, "lipsdp-neuron", "native", timeout, **({} if t is None else {"threads": t}))
            rec["threads"] = "policy" if t is None else t
            solves.append(rec)
            progress(_line(rec) + f"  threads={rec['threads']}")
    summary = {"cores": cores, "thread_counts": counts, "fitted_crossover": crossover, "current_crossover": CROSSOVER,
               "note": "fitted_crossover is the value for lipbound/solvers/threads.py CROSSOVER", "kernels": kernels,
               "solves": solves}
    (out / "threads.json").write_text(json.dumps(summary, indent=2, default=float))
    _plot_threads(solves, out / "threads.png")
    return kernels + solves


def _plot_threads(solves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["network"] for r in solves):
        pts = sorted((r["threads"], r["time_s"]) for r in solves if r["network"] == label
                     and isinstance(r["threads"], int) and r.get("upper_bound") is not None)
        policy = [r["time_s"] for r in solves if r["network"] == label and r["threads"] == "policy"]
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            if policy:
                ax.axhline(policy[0], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("torch threads (dotted: the solver's policy)")
    ax.set_ylabel("time [s]")
    ax.set_title("lipbound bench threads")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _line(r: dict) -> str:
    value = r.get("upper_bound")
    shown = "-" if value is None else f"{value:.7g}"
    flag = "" if r.get("certified", True) else " (uncertified)"
    extra = f" exact {r['exact']:.7g}" if "exact" in r else ""
    if r.get("published_mosek_lipsdp_s") is not None:
        extra += f" [published: MOSEK {r['published_mosek_lipsdp_s']:g} s, GLipSDP {r['published_glipsdp_s']:g} s]"
    elif r.get("published_glipsdp_s") is not None:
        extra += f" [published: GLipSDP {r['published_glipsdp_s']:g} s]"
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
