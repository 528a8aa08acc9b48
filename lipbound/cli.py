"""Command-line interface: ``lipbound certify``, ``bounds``, ``bench``, ``demo`` (also ``python -m lipbound``).

The library logs and reports progress through callbacks; this module prints. Progress of long loops is a tqdm
bar on stderr (when stderr is a terminal); with ``-v`` the library's log lines are shown on stderr too, each
stamped with the seconds since the command started. Exit codes: 0 every bound certified, 1 bad input or an
error (named in the message), 2 a bound could not be certified.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lipbound.api import METHODS, NORMS, as_network, certify_all
from lipbound.certificate import Certificate
from lipbound.errors import LipboundError, OptionError
from lipbound.lower import lower_bound

EXIT_OK, EXIT_BAD_INPUT, EXIT_NOT_CERTIFIED = 0, 1, 2

log = logging.getLogger("lipbound")


class UsageError(LipboundError):
    """A command line that argparse cannot parse (exit code 1, like any bad input)."""


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 on a usage error, which this CLI reserves for 'not certified'."""

    def error(self, message: str):
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


def _fmt(value, spec=".6g") -> str:
    return "-" if value is None else format(value, spec)


def format_table(certs: list[Certificate]) -> str:
    """A plain-text table: method, certified bound, solver value, lower bound, gap, time; skipped methods are
    listed below it with the reason."""
    header = f"{'method':<15}{'solver':<12}{'certified bound':>17}{'solver value':>15}{'lower bound':>13}" \
             f"{'gap (ub/lb)':>13}{'time [s]':>10}  status"
    lines = [header, "-" * len(header)]
    for c in certs:
        if c.status == "skipped":
            continue
        ub = _fmt(c.upper_bound) if c.certified else "NOT CERTIFIED"
        lines.append(f"{c.method:<15}{c.solver:<12}{ub:>17}{_fmt(c.solver_bound):>15}{_fmt(c.lower_bound):>13}"
                     f"{_fmt(c.gap, '.4f'):>13}{c.time_s:>10.3f}  {c.status}{(': ' + c.reason) if c.reason else ''}")
    lines += [f"skipped {c.method}: {c.reason}" for c in certs if c.status == "skipped"]
    return "\n".join(lines)


def _json_record(c: Certificate) -> dict:
    keys = ("method", "solver", "norm", "upper_bound", "certified", "solver_bound", "lower_bound", "time_s")
    record = {k: getattr(c, k) for k in keys}
    record.update({"status": c.status, "reason": c.reason, "eigen_defect": c.eigen_defect, "delta": c.delta,
                   "sizes": c.sizes, "network": c.network})
    return record


# -- argument types: each failure names the flag (argparse adds "argument --flag:") -----------------------------


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 20,50, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    values = [s.strip() for s in text.split(",") if s.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _nonnegative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


# -- inputs ---------------------------------------------------------------------------------------------------


def load_center(path: str, input_dim: int) -> np.ndarray:
    """The input point of ``--center``: a ``.npy`` array or a text file of numbers, with ``input_dim`` entries.

    Raises :class:`OptionError` naming the file and the expected size otherwise.
    """
    p = Path(path)
    expected = f"expected a .npy array or a text file of {input_dim} numbers (the network's input size)"
    if not p.is_file():
        raise OptionError(f"--center {path}: no such file; {expected}.")
    if p.suffix == ".npy":
        try:
            x = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise OptionError(f"--center {path}: not a readable .npy file ({exc}); {expected}.") from exc
    else:
        try:
            x = np.array(p.read_text().replace(",", " ").split(), dtype=np.float64)
        except (ValueError, UnicodeDecodeError) as exc:
            raise OptionError(f"--center {path}: not a .npy file nor a text file of numbers ({exc}); "
                              f"{expected}.") from exc
    try:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"--center {path}: holds {x.dtype} data, not numbers; {expected}.") from exc
    if x.size != input_dim:
        raise OptionError(f"--center {path}: has {x.size} numbers, but the network takes {input_dim} inputs.")
    if not np.all(np.isfinite(x)):
        raise OptionError(f"--center {path}: contains NaN or inf; {expected}.")
    return x


def _domain(args, network):
    """The region given by --center/--radius (or None)."""
    if getattr(args, "center", None) is None:
        if getattr(args, "radius", None) is not None:
            raise OptionError("--radius needs --center (a .npy or text file with the input point).")
        return None
    from lipbound.bounds import Ball

    if args.radius is None:
        raise OptionError("--center needs --radius.")
    return Ball(load_center(args.center, network.input_dim), args.radius, norm=args.ball_norm or args.norm)


# -- rendering progress ---------------------------------------------------------------------------------------


class _ElapsedFormatter(logging.Formatter):
    """``[  12.3s] message``: seconds since the command started."""

    def __init__(self, start: float):
        super().__init__()
        self.start = start

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"[{record.created - self.start:7.1f}s] {level}{record.getMessage()}"


@contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Show the library's log on stderr (INFO with -v, else warnings), routed through tqdm so that progress bars
    and log lines do not overwrite each other; restored afterwards."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ElapsedFormatter(time.time()))
    saved = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False
    try:
        with logging_redirect_tqdm(loggers=[log]):
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


@contextmanager
def _bar(desc: str, unit: str) -> Iterator:
    """A tqdm bar on stderr (disabled when stderr is not a terminal), as a ``progress(done, total, label)``."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False, dynamic_ncols=True)

    def update(done: int, total: int, label: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(label, refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


# -- commands -------------------------------------------------------------------------------------------------


def _run_certify(network, methods, solver, want_lower, json_path, verbose, seed=0, norm="l2", output_index=None,
                 coupled=False, domain=None) -> list[Certificate]:
    with _bar("certify", "method") as progress:
        certs = certify_all(network, methods=methods, solver=solver, verbose=verbose, norm=norm,
                            output_index=output_index, coupled=coupled, domain=domain, progress=progress)
    if domain is not None:
        print(f"local bounds on the {domain.norm} ball of radius {domain.radius:g} around the given center")
    if want_lower and norm != "l2":
        print("lower bound: only for the l2 norm; skipped")
    elif want_lower:
        with _bar("lower bound", "step") as progress:
            lb = lower_bound(network, seed=seed, domain=domain, progress=progress)
        certs = [c.with_lower_bound(lb.value) if c.status != "skipped" else c for c in certs]
        print(f"lower bound {lb.value:.6g} ({lb.kind}, {lb.time_s:.2f} s on {lb.device}, {lb.dtype})")
    print(format_table(certs))
    if json_path:
        records = [_json_record(c) for c in certs]
        Path(json_path).write_text(json.dumps(records[0] if len(records) == 1 else records, indent=2))
        print(f"wrote {json_path}")
    return certs


def _exit_code(certs: list[Certificate]) -> int:
    ran = [c for c in certs if c.status != "skipped"]
    return EXIT_OK if ran and all(c.certified for c in ran) else EXIT_NOT_CERTIFIED


def cmd_certify(args) -> int:
    if args.output_index is not None and args.norm != "linf":
        raise OptionError(f"--output-index {args.output_index} applies to --norm linf only (it picks the output "
                          "bounded in l-infinity); the l2 bound covers all outputs. Drop it or add --norm linf.")
    if args.coupled and args.method not in ("lipsdp-nsr", "all"):
        raise OptionError(f"--coupled applies to --method lipsdp-nsr (or all) only; got --method {args.method}.")
    network = as_network(args.path, activation=args.activation, architecture=args.architecture,
                         input_shape=args.input_shape, trust_code=args.trust_code)
    domain = _domain(args, network)
    print(network.summary())
    methods = None if args.method == "all" else [args.method]
    certs = _run_certify(network, methods, args.solver, args.lower_bound, args.json, args.verbose, norm=args.norm,
                         output_index=args.output_index, coupled=args.coupled, domain=domain)
    return _exit_code(certs)


def cmd_demo(args) -> int:
    from lipbound.demo import train_digits_mlp

    model, accuracy = train_digits_mlp(seed=args.seed, epochs=args.epochs)
    print(f"demo: MLP 64-32-32-10 (ReLU) trained on scikit-learn's digits, test accuracy {accuracy:.3f}")
    network = as_network(model, input_shape=64)
    certs = _run_certify(network, None, args.solver, True, args.json, args.verbose, seed=args.seed)
    return _exit_code(certs)


def cmd_bounds(args) -> int:
    from lipbound.bounds import activation_bounds, stable_neurons

    network = as_network(args.path, activation=args.activation, architecture=args.architecture,
                         input_shape=args.input_shape, trust_code=args.trust_code)
    domain = _domain(args, network)
    if domain is None:
        raise OptionError("lipbound bounds needs --center and --radius.")
    bounds = activation_bounds(network, domain, method=args.method)
    stable = stable_neurons(bounds)
    print(network.summary())
    print(f"{'layer':<24}{'neurons':>8}{'min lower':>14}{'max upper':>14}{'mean width':>12}{'inactive':>10}"
          f"{'active':>8}")
    for name, (lo, hi) in bounds.items():
        inactive, active, total = stable.get(name, (0, 0, lo.size))
        print(f"{name:<24}{lo.size:>8}{lo.min():>14.5g}{hi.max():>14.5g}{(hi - lo).mean():>12.4g}{inactive:>10}"
              f"{active:>8}")
    return EXIT_OK


def _bench_names() -> set[str]:
    """Every solver and method name a bench run can be selected by."""
    from lipbound import bench
    from lipbound.solvers import SOLVERS

    names = set(METHODS) | set(SOLVERS) | {"auto"}
    for runs in (getattr(bench, "LIPSDP_RUNS", []), getattr(bench, "QC_RUNS", [])):
        names.update(name for method, solver, _ in runs for name in (method, solver) if name != "-")
    return names


def cmd_bench(args) -> int:
    from lipbound.bench import run_suite

    if args.suite == "soundness":
        return _run_soundness(args)
    if args.solvers:
        unknown = sorted(set(args.solvers) - _bench_names())
        if unknown:
            raise OptionError(f"--solvers: unknown name(s) {', '.join(unknown)}; choose from "
                              f"{', '.join(sorted(_bench_names()))}.")
    if args.device is not None:
        from lipbound.options import check_device

        check_device(args.device, "--device")
    try:
        records = run_suite(args.suite, args.out, args.solvers, args.sizes, args.timeout, args.device,
                            networks=args.networks, progress=print)
    except ValueError as exc:
        raise OptionError(str(exc)) from exc
    if not records:
        raise OptionError(f"nothing to run: no network and run of suite {args.suite!r} matches --sizes "
                          f"{args.sizes} / --solvers {args.solvers} / --networks {args.networks}.")
    print(f"wrote {args.out}/{args.suite}.json and {args.suite}.png")
    return EXIT_OK


def cmd_batch(args) -> int:
    from lipbound import batch

    manifest = batch.Manifest.from_file(args.manifest)
    out = Path(args.out or Path(args.manifest).with_suffix(".results.jsonl").name)
    try:
        result = batch.run(manifest, out, args.engine, workers=args.workers, address=args.address,
                           gpus_per_job=args.gpus_per_job, max_retries=args.max_retries, resume=args.resume,
                           progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"interrupted: the finished jobs are in {out}; continue with --resume", file=sys.stderr)
        return 130
    folder = Path(args.summary or f"{out.with_suffix('')}_summary")
    summary = batch.summarize(out, manifest, folder)
    print(summary.table)
    ran = result.ok + result.failed
    print(f"{summary.counts['ok']} of {result.total} jobs done ({result.skipped} in earlier runs), "
          f"{summary.counts['failed']} failed, {summary.counts['uncertified']} not certified"
          + (f"; this run {result.jobs_per_s:.3g} jobs/s on {result.workers} {result.engine} worker(s)" if ran else ""))
    print(f"results: {out}; table, plots: {folder}")
    problems = batch.check(manifest, out, expectations=args.check)
    for problem in problems[:50]:
        print(f"FAIL {problem}")
    if len(problems) > 50:
        print(f"... and {len(problems) - 50} more")
    if args.check:
        print(f"check: {len(problems)} violation(s)" if problems else f"check: all {result.total} jobs pass")
        return 1 if problems else 0
    return 2 if problems else 0


def _run_soundness(args) -> int:
    """``lipbound bench soundness``: exit 0 when no violation and no crash was found, 3 otherwise."""
    import time

    from lipbound.soundness import DEFAULT_TRIALS, format_table, run_campaign

    families = args.families.split(",") if args.families else None
    trials = DEFAULT_TRIALS if args.trials is None else args.trials
    done: dict[str, int] = {}
    start = time.perf_counter()

    def progress(record: dict) -> None:
        name = record["family"]
        done[name] = done.get(name, 0) + 1
        bad = [r["status"] for r in record["runs"] if r["status"] in ("violation", "crash")]
        if bad or "eval_error" in record or "attack_error" in record:
            print(f"{name} seed {record['seed']}: {', '.join(bad) or 'judge error'} ({record['variant']})")
        if done[name] == trials or done[name] % max(1, trials // 10) == 0:
            print(f"{name}: {done[name]}/{trials} trials, {time.perf_counter() - start:.0f} s", flush=True)

    logger = logging.getLogger("lipbound")
    level = logger.level
    if not args.verbose:  # uncertified runs are counted in the table, not logged one by one
        logger.setLevel(logging.ERROR)
    try:
        result = run_campaign(args.out, trials, args.seed, families, args.workers, args.timeout, progress)
    finally:
        logger.setLevel(level)
    print(format_table(result["summary"]))
    print(f"wrote {Path(args.out) / 'soundness.json'}")
    failed = sum(f["violation"] + f["crash"] + f["eval_errors"] for f in result["summary"].values())
    return 3 if failed else 0


def _region_args(p) -> None:
    p.add_argument("--center", default=None, help=".npy (or text) file with the input point (local certificate)")
    p.add_argument("--radius", type=_nonnegative, default=None, help="radius of the ball around --center")
    p.add_argument("--ball-norm", default=None, choices=list(NORMS), help="norm of the ball (default: --norm)")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid shape {text!r}: use comma-separated sizes, e.g. 1,28,28") from None
    if not shape or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"invalid shape {text!r}: sizes must be positive")
    return shape


def _file_args(p) -> None:
    p.add_argument("--input-shape", type=_shape, default=None, metavar="C,H,W",
                   help="shape of one input (without batch) for a pickled module (--trust-code)")
    p.add_argument("--trust-code", action="store_true",
                   help="allow .pt files holding a whole pickled nn.Module (loading runs code from the file)")


def build_parser() -> argparse.ArgumentParser:
    from lipbound import __version__

    # -v is accepted before and after the subcommand; SUPPRESS keeps a subcommand from resetting a leading -v.
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="show progress lines (stamped with elapsed seconds) and solver output")
    parser = _Parser(prog="lipbound", description="Certified Lipschitz bounds of neural networks.",
                     epilog="exit codes: 0 every bound certified, 1 bad input or error, 2 a bound not certified")
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="show progress lines (stamped with elapsed seconds) and solver output")
    parser.add_argument("--version", action="version", version=f"lipbound {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("certify", parents=[verbose], help="certify a network file (.mat, .npz, .pt)")
    p.add_argument("path")
    p.add_argument("--method", default="lipsdp-neuron", choices=list(METHODS) + ["all"],
                   help="all: every method that applies (the others are listed with the reason)")
    p.add_argument("--solver", default="auto", help="auto, native, native-dense, native-chordal, clarabel, scs, mosek, "
                   "sdpa, circulant (lipsdp-channel of convolutional chains, see the README)")
    p.add_argument("--norm", default="l2", choices=list(NORMS))
    p.add_argument("--output-index", type=int, default=None, help="output row bounded by --norm linf")
    p.add_argument("--activation", default="relu",
                   help="activation of weight-only files (default relu; maxmin for the QC paper's files)")
    p.add_argument("--architecture", default="feedforward", choices=["feedforward", "residual"],
                   help="layout of weight-only files (residual: the QC paper's resweights_* files)")
    p.add_argument("--coupled", action="store_true", help="lipsdp-nsr: include the S and P multipliers")
    _file_args(p)
    _region_args(p)
    p.add_argument("--lower-bound", action="store_true", help="also compute a lower bound (attack)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.set_defaults(func=cmd_certify)

    bd = sub.add_parser("bounds", parents=[verbose],
                        help="pre-activation ranges and stable neurons on a ball around an input")
    bd.add_argument("path")
    bd.add_argument("--activation", default="relu")
    _file_args(bd)
    bd.add_argument("--architecture", default="feedforward", choices=["feedforward", "residual"])
    bd.add_argument("--method", default="crown", choices=["crown", "ibp"])
    bd.add_argument("--norm", default="l2", choices=list(NORMS), help="norm of the ball")
    _region_args(bd)
    bd.set_defaults(func=cmd_bounds)

    b = sub.add_parser("bench", parents=[verbose],
                       help="run methods/solvers side by side on a suite; writes JSON and a plot")
    b.add_argument("suite", choices=["random", "deep", "qc", "glipsdp-mlp", "glipsdp-cnn", "threads", "soundness"],
                   help="glipsdp-mlp: GLipSDP's MLP table shapes (published MOSEK/GLipSDP times in the JSON); "
                        "glipsdp-cnn: its 14x14 CNNs, 8/16/32 channels x 2-16 conv layers (published GLipSDP times); "
                        "threads: the data for the native solver's thread policy (threads.json); soundness: random "
                        "networks of every family, certified bounds against lower bounds (exit 3 on a violation or "
                        "crash)")
    b.add_argument("--out", default="bench_out")
    b.add_argument("--sizes", type=_positive_ints, default=None,
                   help="comma-separated widths (random: n of 784-n-n-10; glipsdp-mlp: widths or numbers of "
                   "weight matrices; glipsdp-cnn: channels or conv layers)")
    b.add_argument("--solvers", type=_names, default=None,
                   help="comma-separated solvers/methods to run (default: all)")
    b.add_argument("--networks", type=_names, default=None, help="comma-separated network labels of the suite to "
                   "run (e.g. 784-500-200-50-10; default: all)")
    b.add_argument("--timeout", type=_positive, default=600.0, help="seconds per run (each in its own process)")
    b.add_argument("--device", default=None, help="device for the native solvers (cpu, cuda)")
    b.add_argument("--trials", type=int, default=None, help="soundness: trials per family (default 2; the full "
                   "campaign: 1000)")
    b.add_argument("--seed", type=int, default=0, help="soundness: campaign seed")
    b.add_argument("--families", default=None, help="soundness: comma-separated families (default: all)")
    b.add_argument("--workers", type=int, default=1, help="soundness: processes running trials side by side")
    b.set_defaults(func=cmd_bench)

    bt = sub.add_parser("batch", parents=[verbose],
                        help="run a manifest of certificates (local pool or Ray) into a JSONL file")
    bt.add_argument("manifest", help="YAML or JSON manifest (models, methods, norms, outputs, domains, expect)")
    bt.add_argument("--out", default=None, help="results file (JSON Lines; default MANIFEST.results.jsonl)")
    bt.add_argument("--engine", default="local", choices=["local", "ray"])
    bt.add_argument("--address", default=None, help="Ray cluster: auto or HOST:PORT (default: a private one)")
    bt.add_argument("--workers", type=int, default=None, help="jobs at once (default: CPU cores / cluster)")
    bt.add_argument("--gpus-per-job", type=float, default=None, help="Ray: GPUs per job (default 1 for cuda)")
    bt.add_argument("--max-retries", type=int, default=3, help="re-runs of a job whose worker process died")
    bt.add_argument("--resume", action="store_true", help="skip jobs already in --out; re-run failed ones")
    bt.add_argument("--check", action="store_true", help="exit 1 if a job fails or breaks its expectation")
    bt.add_argument("--summary", default=None, help="folder for the table and plots (default OUT_summary)")
    bt.add_argument("--no-progress", action="store_true", help="no progress bar")
    bt.set_defaults(func=cmd_batch)

    d = sub.add_parser("demo", parents=[verbose],
                       help="train a small MLP on sklearn digits (no download) and certify it with every method")
    d.add_argument("--solver", default="auto")
    d.add_argument("--epochs", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", metavar="OUT")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit code (0 certified, 1 bad input or error, 2 not certified)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    with _logging(args.verbose):
        try:
            return args.func(args)
        except (LipboundError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
