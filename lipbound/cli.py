"""Command-line interface: ``lipbound certify``, ``lipbound demo``.

The library logs; this module prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lipbound.api import METHODS, NORMS, as_network, certify_all
from lipbound.certificate import Certificate
from lipbound.errors import LipboundError
from lipbound.lower import lower_bound


def _fmt(value, spec=".6g") -> str:
    return "-" if value is None else format(value, spec)


def format_table(certs: list[Certificate]) -> str:
    """A plain-text table: method, certified bound, solver value, lower bound, gap, time."""
    header = f"{'method':<15}{'solver':<12}{'certified bound':>17}{'solver value':>15}{'lower bound':>13}" \
             f"{'gap (ub/lb)':>13}{'time [s]':>10}  status"
    lines = [header, "-" * len(header)]
    for c in certs:
        ub = _fmt(c.upper_bound) if c.certified else "NOT CERTIFIED"
        lines.append(f"{c.method:<15}{c.solver:<12}{ub:>17}{_fmt(c.solver_bound):>15}{_fmt(c.lower_bound):>13}"
                     f"{_fmt(c.gap, '.4f'):>13}{c.time_s:>10.3f}  {c.status}{(': ' + c.reason) if c.reason else ''}")
    return "\n".join(lines)


def _json_record(c: Certificate) -> dict:
    keys = ("method", "solver", "norm", "upper_bound", "certified", "solver_bound", "lower_bound", "time_s")
    record = {k: getattr(c, k) for k in keys}
    record.update({"status": c.status, "reason": c.reason, "eigen_defect": c.eigen_defect, "delta": c.delta,
                   "sizes": c.sizes, "network": c.network})
    return record


def _domain(args):
    """The region given by --center/--radius (or None)."""
    if getattr(args, "center", None) is None:
        if getattr(args, "radius", None) is not None:
            raise LipboundError("--radius needs --center (a .npy file with the input point).")
        return None
    import numpy as np

    from lipbound.bounds import Ball

    if args.radius is None:
        raise LipboundError("--center needs --radius.")
    return Ball(np.load(args.center).reshape(-1), args.radius, norm=args.ball_norm or args.norm)


def _run_certify(network, methods, solver, want_lower, json_path, verbose, seed=0, norm="l2", output_index=None,
                 coupled=False, domain=None) -> list[Certificate]:
    certs = certify_all(network, methods=methods, solver=solver, verbose=verbose, norm=norm,
                        output_index=output_index, coupled=coupled, domain=domain)
    if domain is not None:
        print(f"local bounds on the {domain.norm} ball of radius {domain.radius:g} around the given center")
    if want_lower and norm != "l2":
        print("lower bound: only for the l2 norm; skipped")
    elif want_lower:
        lb = lower_bound(network, seed=seed, domain=domain)
        certs = [c.with_lower_bound(lb.value) for c in certs]
        print(f"lower bound {lb.value:.6g} ({lb.kind}, {lb.time_s:.2f} s on {lb.device})")
    print(format_table(certs))
    if json_path:
        records = [_json_record(c) for c in certs]
        Path(json_path).write_text(json.dumps(records[0] if len(records) == 1 else records, indent=2))
        print(f"wrote {json_path}")
    return certs


def cmd_certify(args) -> int:
    network = as_network(args.path, activation=args.activation, architecture=args.architecture)
    print(network.summary())
    methods = None if args.method == "all" else [args.method]
    certs = _run_certify(network, methods, args.solver, args.lower_bound, args.json, args.verbose, norm=args.norm,
                         output_index=args.output_index, coupled=args.coupled, domain=_domain(args))
    return 0 if all(c.certified for c in certs) else 2


def cmd_demo(args) -> int:
    from lipbound.demo import train_digits_mlp

    model, accuracy = train_digits_mlp(seed=args.seed, epochs=args.epochs)
    print(f"demo: MLP 64-32-32-10 (ReLU) trained on scikit-learn's digits, test accuracy {accuracy:.3f}")
    network = as_network(model, input_shape=64)
    certs = _run_certify(network, None, args.solver, True, args.json, args.verbose, seed=args.seed)
    return 0 if all(c.certified for c in certs) else 2


def cmd_bounds(args) -> int:
    from lipbound.bounds import activation_bounds, stable_neurons

    network = as_network(args.path, activation=args.activation, architecture=args.architecture)
    domain = _domain(args)
    if domain is None:
        raise LipboundError("lipbound bounds needs --center and --radius.")
    bounds = activation_bounds(network, domain, method=args.method)
    stable = stable_neurons(bounds)
    print(network.summary())
    print(f"{'layer':<24}{'neurons':>8}{'min lower':>14}{'max upper':>14}{'mean width':>12}{'inactive':>10}"
          f"{'active':>8}")
    for name, (lo, hi) in bounds.items():
        inactive, active, total = stable.get(name, (0, 0, lo.size))
        print(f"{name:<24}{lo.size:>8}{lo.min():>14.5g}{hi.max():>14.5g}{(hi - lo).mean():>12.4g}{inactive:>10}"
              f"{active:>8}")
    return 0


def cmd_bench(args) -> int:
    from lipbound.bench import run_suite

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    solvers = args.solvers.split(",") if args.solvers else None
    networks = args.networks.split(",") if args.networks else None
    try:
        run_suite(args.suite, args.out, solvers, sizes, args.timeout, args.device, networks=networks)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/{args.suite}.json and {args.suite}.png")
    return 0


def _region_args(p) -> None:
    p.add_argument("--center", default=None, help=".npy file with the input point (local certificate)")
    p.add_argument("--radius", type=float, default=None, help="radius of the ball around --center")
    p.add_argument("--ball-norm", default=None, choices=list(NORMS), help="norm of the ball (default: --norm)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipbound", description="Certified Lipschitz bounds of neural networks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show solver output")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("certify", help="certify a network file (.mat, .npz, .pt)")
    p.add_argument("path")
    p.add_argument("--method", default="lipsdp-neuron", choices=list(METHODS) + ["all"])
    p.add_argument("--solver", default="auto", help="auto, native, clarabel, scs, mosek, sdpa")
    p.add_argument("--norm", default="l2", choices=list(NORMS))
    p.add_argument("--output-index", type=int, default=None, help="output row bounded by --norm linf")
    p.add_argument("--activation", default="relu",
                   help="activation of weight-only files (default relu; maxmin for the QC paper's files)")
    p.add_argument("--architecture", default="feedforward", choices=["feedforward", "residual"],
                   help="layout of weight-only files (residual: the QC paper's resweights_* files)")
    p.add_argument("--coupled", action="store_true", help="lipsdp-nsr: include the S and P multipliers")
    _region_args(p)
    p.add_argument("--lower-bound", action="store_true", help="also compute a lower bound (attack)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.set_defaults(func=cmd_certify)

    bd = sub.add_parser("bounds", help="pre-activation ranges and stable neurons on a ball around an input")
    bd.add_argument("path")
    bd.add_argument("--activation", default="relu")
    bd.add_argument("--architecture", default="feedforward", choices=["feedforward", "residual"])
    bd.add_argument("--method", default="crown", choices=["crown", "ibp"])
    bd.add_argument("--norm", default="l2", choices=list(NORMS), help="norm of the ball")
    _region_args(bd)
    bd.set_defaults(func=cmd_bounds)

    b = sub.add_parser("bench", help="run methods/solvers side by side on a suite; writes JSON and a plot")
    b.add_argument("suite", choices=["random", "deep", "qc", "glipsdp-mlp", "threads"],
                   help="glipsdp-mlp: GLipSDP's MLP table shapes (published MOSEK/GLipSDP times in the JSON); "
                        "threads: the data for the native solver's thread policy (threads.json)")
    b.add_argument("--out", default="bench_out")
    b.add_argument("--sizes", default=None, help="comma-separated widths (random: n of 784-n-n-10; glipsdp-mlp: "
                   "widths or numbers of weight matrices)")
    b.add_argument("--solvers", default=None, help="comma-separated solvers/methods to run (default: all)")
    b.add_argument("--networks", default=None, help="comma-separated network labels of the suite to run "
                   "(e.g. 784-500-200-50-10; default: all)")
    b.add_argument("--timeout", type=float, default=600.0, help="seconds per run (each in its own process)")
    b.add_argument("--device", default=None, help="device for the native solvers (cpu, cuda)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="train a small MLP on sklearn digits (no download) and certify it")
    d.add_argument("--solver", default="auto")
    d.add_argument("--epochs", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", metavar="OUT")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (LipboundError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
