"""The soundness campaign: certify random networks of every family and judge each bound against a lower bound.

For each trial a family draws a :class:`~lipbound.soundness.families.Case`; every run is certified with
:func:`lipbound.certify`, and the trial's lower bound is the best of

* input pairs: proposed by a float64 Jacobian search on the network (or on its power-of-two rescaled copy) and by
  :func:`lipbound.lower_bound` (l2), judged in 256-bit arithmetic by
  :class:`~lipbound.soundness.reference.Reference` (both points checked to lie in the domain, exactly);
* the case's exact constant where it is known (linear and nonnegative ReLU chains, diagonal chains).

Each run ends in one of: ``ok`` (certified, bound >= lower bound), ``violation`` (certified below the lower bound,
or a certified bound that is not a number), ``uncertified`` (``certified=False``, or a :class:`SolverError`),
``refused`` (another :class:`~lipbound.errors.LipboundError`: unsupported input), ``crash`` (any other exception,
or no answer within the time limit). A certified infinite bound is counted apart (``certified_inf``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import statistics
import sys
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import mpmath
import numpy as np
import torch

from lipbound.errors import LipboundError, SolverError
from lipbound.soundness.description import network_to_dict
from lipbound.soundness.families import FAMILIES, Case, Run
from lipbound.soundness.reference import DISCOUNT_BITS, PREC, Reference
from lipbound.soundness.search import candidate_pairs, inside, project, rank_pairs

log = logging.getLogger("lipbound")

#: Trials per family of the default (small) campaign, which the test suite runs.
DEFAULT_TRIALS = 2
#: Seconds one certification may take before it counts as a crash (a hang).
TIME_LIMIT = 600.0


class RunTimeout(Exception):
    """A certification did not return within the campaign's time limit."""


def trial_seed(seed: int, index: int) -> int:
    """The seed of trial ``index`` of a campaign with seed ``seed`` (the same for every family)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def reproduce(family: str, seed: int) -> Case:
    """The case of a campaign trial, rebuilt from its family and trial seed (as printed in the report).

    Examples
    --------
    >>> from lipbound.soundness import reproduce
    >>> case = reproduce("slope", 12345)
    >>> case.network.summary() == reproduce("slope", 12345).network.summary()
    True
    """
    if family not in FAMILIES:
        raise LipboundError(f"unknown soundness family {family!r}; families: {', '.join(FAMILIES)}.")
    return FAMILIES[family].sample(np.random.default_rng([seed, zlib.crc32(family.encode())]))


@contextmanager
def _time_limit(seconds: float | None):
    """Raise :class:`RunTimeout` in the block after ``seconds`` (SIGALRM; only in the main thread, else no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise RunTimeout(f"no answer within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _number(value):
    """A float for JSON (non-finite values as strings, which strict JSON readers accept)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _mp_text(value) -> str:
    return mpmath.nstr(value, 17, min_fixed=-3, max_fixed=6) if value is not None else "-"


def _point_text(x) -> list:
    """A witness point for JSON: floats where exact, else 30-digit strings (mpmath numbers of any magnitude)."""
    out = []
    for v in x:
        f = float(v)
        out.append(f if math.isfinite(f) and mpmath.mpf(f) == v else mpmath.nstr(v, 30))
    return out


def _attack_pairs(case: Case, network, seed: int) -> list:
    """The pair of :func:`lipbound.lower_bound` and two pairs along its best direction (inside the domain)."""
    import lipbound

    lb = lipbound.lower_bound(network, n_starts=12, steps=8, power_iters=8, seed=seed % 2**31, device="cpu",
                              domain=case.domain)
    x = torch.tensor(lb.x, dtype=torch.float64)
    d = torch.tensor(lb.direction, dtype=torch.float64)
    size = 1.0 + float(x.abs().max())
    pairs = [lb.pair] + [(project(x, case.domain).numpy(), project(x + h * size * d, case.domain).numpy())
                         for h in (1e-6, 1e-3)]
    return [(a, b) for a, b in pairs if inside(case.domain, a) and inside(case.domain, b)]


def lower_bound_of(case: Case, seed: int, notes: dict | None = None) -> tuple:
    """``(lower, witness, kind)``: the best judged pair ratio or the exact constant, whichever is larger.

    ``lower`` is an mpmath number (a proved lower bound of the Lipschitz constant on the case's domain, up to the
    ``2^-128`` margin of :mod:`lipbound.soundness.reference`), ``witness`` the pair ``(x, x2)`` or ``None``.
    An exception of :func:`lipbound.lower_bound` (library code) does not stop the judge: it is stored in
    ``notes["attack_error"]`` and the other pairs are judged.
    """
    judge = case.reference or Reference(case.network)
    search = case.search_network or case.network
    rng = np.random.default_rng([seed, 7])
    pairs = candidate_pairs(search, rng, case.norm, case.output_index, case.domain, **case.search)
    if case.norm == "l2" and case.attack:
        try:
            pairs += _attack_pairs(case, search, seed)
        except Exception as exc:  # a library crash: reported with the trial
            if notes is not None:
                notes["attack_error"] = f"{type(exc).__name__}: {exc}"
                notes["attack_traceback"] = traceback.format_exc(limit=-6)
    best, witness, kind = judge.ctx.zero if hasattr(judge, "ctx") else mpmath.mpf(0), None, "pair"
    for x, x2 in rank_pairs(search, pairs, case.norm, case.output_index) + list(case.pairs):
        r = judge.ratio(x, x2, case.norm, case.output_index)
        if r > best:
            best, witness = r, (x, x2)
    if case.exact is not None and case.exact >= best:
        best, kind = case.exact, "exact"
    return best, witness, kind


def _reproducer(family: str, seed: int, run: Run) -> str:
    opts = "".join(f", {k}={v!r}" for k, v in run.options)
    return (f"from lipbound.soundness import reproduce; import lipbound; case = reproduce({family!r}, {seed}); "
            f"lipbound.certify(case.network, method={run.method!r}, solver={run.solver!r}, norm=case.norm, "
            f"output_index=case.output_index, domain=case.domain{opts})")


def _certify(case: Case, run: Run, lower, time_limit: float | None) -> dict:
    import lipbound

    record: dict = {"run": run.label}
    start = time.perf_counter()
    try:
        with _time_limit(time_limit):
            cert = lipbound.certify(case.network, method=run.method, solver=run.solver, norm=case.norm,
                                    output_index=case.output_index, domain=case.domain, **run.kwargs)
    except RunTimeout as exc:
        record.update(status="crash", error=f"RunTimeout: {exc}")
    except SolverError as exc:
        record.update(status="uncertified", reason=f"SolverError: {exc}")
    except LipboundError as exc:
        record.update(status="refused", reason=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a crash of the library: recorded with its traceback, never hidden
        record.update(status="crash", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=-6))
    else:
        upper = cert.upper_bound
        record["upper"] = _number(upper)
        if not cert.certified:
            record.update(status="uncertified", reason=cert.reason)
        elif upper is None or math.isnan(upper) or upper < 0:
            record.update(status="violation", reason=f"certified bound {upper!r} is not a nonnegative number")
        elif math.isinf(upper):
            record.update(status="certified_inf")
        elif lower is not None and mpmath.mpf(upper) < lower:
            record.update(status="violation", reason=f"certified {upper!r} < lower bound {_mp_text(lower)}")
        else:
            record["status"] = "ok"
            if lower is not None and lower > 0:
                record["ratio"] = _number(mpmath.mpf(upper) / lower)
    record["time_s"] = time.perf_counter() - start
    return record


def run_trial(family: str, seed: int, index: int = 0, time_limit: float | None = TIME_LIMIT) -> dict:
    """Draw the case of ``(family, seed)``, certify every run and judge it; returns the trial's record.

    A violation or crash adds the network's JSON description, the witness pair and a one-line reproducer per
    failing run to the record. When the family cannot draw its network because the library fails while building
    it (an importer), the record has one pseudo-run ``draw``, ``refused`` or ``crash``.

    Examples
    --------
    >>> rec = run_trial("exact", 3)
    >>> rec["lower_kind"], {r["status"] for r in rec["runs"]}
    ('exact', {'ok'})
    """
    start = time.perf_counter()
    try:
        case = reproduce(family, seed)
    except Exception as exc:  # the library failed on a drawn model (an importer refusing or crashing)
        return _draw_failure(family, seed, index, exc, start)
    from lipbound.api import domain_to_dict

    record: dict = {"family": family, "index": index, "seed": seed, "variant": case.variant,
                    "network": case.network.summary(), "params": case.params, "norm": case.norm,
                    "output_index": case.output_index, "domain": domain_to_dict(case.domain)}
    lower = witness = None
    try:
        lower, witness, kind = lower_bound_of(case, seed, record)
        record.update(lower=_mp_text(lower), lower_float=_number(lower), lower_kind=kind)
    except Exception as exc:  # the judge failed: the runs are still certified, and the failure is reported
        record["eval_error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=-6)
    record["runs"] = [_certify(case, run, lower, time_limit) for run in case.runs]
    failing = [(run, r) for run, r in zip(case.runs, record["runs"], strict=True)
               if r["status"] in ("violation", "crash")]
    if failing or "eval_error" in record or "attack_error" in record:
        record["description"] = network_to_dict(case.network)
        if witness is not None:
            record["witness"] = [_point_text(witness[0]), _point_text(witness[1])]
        for run, r in failing:
            r["reproduce"] = _reproducer(family, seed, run)
    record["time_s"] = time.perf_counter() - start
    return record


def _draw_failure(family: str, seed: int, index: int, exc: Exception, start: float) -> dict:
    """The record of a trial whose network could not be built: families that import models (torch, ONNX) call
    the library while drawing, so its errors are findings. One pseudo-run ``draw`` says ``refused`` (a
    :class:`~lipbound.errors.LipboundError`, e.g. an operator the importer does not read) or ``crash``."""
    status, key = ("refused", "reason") if isinstance(exc, LipboundError) else ("crash", "error")
    run = {"run": "draw", "status": status, key: f"{type(exc).__name__}: {exc}",
           "reproduce": f"from lipbound.soundness import reproduce; reproduce({family!r}, {seed})"}
    if status == "crash":
        run["traceback"] = traceback.format_exc(limit=-6)
    return {"family": family, "index": index, "seed": seed, "variant": "draw failed", "network": None,
            "params": {}, "norm": None, "output_index": None, "domain": None, "runs": [run],
            "time_s": time.perf_counter() - start}


_STATUSES = ("ok", "violation", "crash", "refused", "uncertified", "certified_inf")


def _shape(message: str) -> str:
    """A message with its numbers replaced by '#', to count messages of one kind together."""
    return re.sub(r"[-+]?\d[\d.]*(e[-+]?\d+)?", "#", message)[:200]


def _median(values: list[float]):
    return statistics.median(values) if values else None


def summarize(records: Iterable[dict]) -> dict:
    """Per-family counts (trials, certificates, each status, judge errors), median and smallest upper/lower
    ratios, time, a breakdown by variant and by run, the refusal and non-certification messages, and the list
    of violations and crashes with their reproducers."""
    out: dict = {}
    for rec in records:
        fam = out.setdefault(rec["family"], {"trials": 0, "certificates": 0, **{s: 0 for s in _STATUSES},
                                             "eval_errors": 0, "time_s": 0.0, "_ratios": [], "variants": {},
                                             "runs": {}, "refusals": Counter(), "uncertified_reasons": Counter(),
                                             "failures": []})
        fam["trials"] += 1
        fam["time_s"] += rec["time_s"]
        variant = fam["variants"].setdefault(rec["variant"], {"trials": 0, **{s: 0 for s in _STATUSES},
                                                             "_ratios": []})
        variant["trials"] += 1
        for key in ("eval_error", "attack_error"):
            if key in rec:
                fam["eval_errors"] += 1
                fam["failures"].append({"seed": rec["seed"], "variant": rec["variant"], "status": key,
                                        "error": rec[key], "description": rec.get("description"),
                                        "traceback": rec.get(key.replace("error", "traceback"))})
        for r in rec["runs"]:
            status = r["status"]
            fam["certificates"] += 1
            fam[status] += 1
            variant[status] += 1
            per_run = fam["runs"].setdefault(r["run"], {"certificates": 0, **{s: 0 for s in _STATUSES},
                                                        "_ratios": []})
            per_run["certificates"] += 1
            per_run[status] += 1
            if isinstance(r.get("ratio"), float):
                for group in (fam, per_run, variant):
                    group["_ratios"].append(r["ratio"])
            if status == "refused":
                fam["refusals"][_shape(r["reason"])] += 1
            elif status == "uncertified":
                fam["uncertified_reasons"][_shape(r.get("reason") or "")] += 1
            elif status in ("violation", "crash"):
                fam["failures"].append({
                    "seed": rec["seed"], "variant": rec["variant"], "run": r["run"], "status": status,
                    "error": r.get("error", r.get("reason")), "upper": r.get("upper"), "lower": rec.get("lower"),
                    "reproduce": r.get("reproduce"), "traceback": r.get("traceback"),
                    "witness": rec.get("witness"), "description": rec.get("description")})
    for fam in out.values():
        for group in (fam, *fam["runs"].values(), *fam["variants"].values()):
            ratios = group.pop("_ratios")
            group["median_ratio"], group["min_ratio"] = _median(ratios), (min(ratios) if ratios else None)
        fam["refusals"] = dict(fam["refusals"].most_common())
        fam["uncertified_reasons"] = dict(fam["uncertified_reasons"].most_common())
    return out


def format_table(summary: dict) -> str:
    """The per-family table: trials, certificates, violations, crashes, judge errors (the judge's own failures
    and crashes of :func:`lipbound.lower_bound`), refused, uncertified, certified-infinite, ratios, time."""
    keys = ("trials", "certificates", "violation", "crash", "eval_errors", "refused", "uncertified", "certified_inf")
    head = (f"{'family':<15}{'trials':>7}{'certs':>7}{'violations':>11}{'crashes':>8}{'judge err':>10}"
            f"{'refused':>8}{'uncertified':>12}{'cert. inf':>10}{'median ub/lb':>13}{'min ub/lb':>11}{'time [s]':>10}")
    lines = [head, "-" * len(head)]
    totals: Counter = Counter()
    for name, fam in summary.items():
        med = "-" if fam["median_ratio"] is None else f"{fam['median_ratio']:.4g}"
        low = "-" if fam["min_ratio"] is None else f"{fam['min_ratio']:.6g}"
        counts = "".join(f"{fam[k]:>{w}}" for k, w in zip(keys, (7, 7, 11, 8, 10, 8, 12, 10), strict=True))
        lines.append(f"{name:<15}{counts}{med:>13}{low:>11}{fam['time_s']:>10.1f}")
        totals.update({k: fam[k] for k in keys})
        totals["time"] += fam["time_s"]
    counts = "".join(f"{totals[k]:>{w}}" for k, w in zip(keys, (7, 7, 11, 8, 10, 8, 12, 10), strict=True))
    lines += ["-" * len(head), f"{'total':<15}{counts}{'':>24}{totals['time']:>10.1f}"]
    return "\n".join(lines)


def _init_worker(level: int) -> None:
    logging.getLogger("lipbound").setLevel(level)
    torch.set_num_threads(1)


def _task(args: tuple) -> dict:
    return run_trial(*args)


def run_campaign(out_dir: str | Path | None = None, trials: int = DEFAULT_TRIALS, seed: int = 0,
                 families: list[str] | None = None, workers: int = 1, time_limit: float | None = TIME_LIMIT,
                 progress: Callable[[dict], None] | None = None) -> dict:
    """Run ``trials`` trials of each family; write ``<out_dir>/soundness.json`` and return its content.

    Parameters
    ----------
    out_dir : path, optional
        Where ``soundness.json`` goes (written along the way, every 100 trials, and at the end).
    trials : int
        Trials per family (the default is the small campaign the tests run; the full one is 1,000).
    seed : int
        Campaign seed; trial ``i`` of every family uses :func:`trial_seed` ``(seed, i)``.
    families : list of str, optional
        Names from :data:`~lipbound.soundness.families.FAMILIES` (default: all).
    workers : int
        Processes running trials side by side (1: in this process).
    time_limit : float, optional
        Seconds per certification; a run past it counts as a crash.
    progress : callable, optional
        Called with each trial's record as it completes.

    Returns
    -------
    dict
        ``{"config": ..., "summary": {family: counts}, "trials": [records]}`` (see :func:`summarize`).

    Examples
    --------
    >>> result = run_campaign(trials=1, families=["exact"])
    >>> result["summary"]["exact"]["violation"], result["summary"]["exact"]["crash"]
    (0, 0)
    """
    names = list(FAMILIES) if families is None else list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise LipboundError(f"unknown soundness famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                            f"choose from {', '.join(FAMILIES)}.")
    if int(trials) < 1 or int(workers) < 1:
        raise LipboundError(f"the campaign needs trials >= 1 and workers >= 1 (got {trials} and {workers}).")
    tasks = [(name, trial_seed(seed, i), i, time_limit) for name in names for i in range(int(trials))]
    config = {"trials": int(trials), "seed": seed, "families": names, "workers": int(workers),
              "time_limit_s": time_limit, "judge_precision_bits": PREC, "judge_margin": f"2^-{DISCOUNT_BITS}",
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": sys.version.split()[0],
              "torch": torch.__version__}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []

    def collect(rec: dict) -> None:
        records.append(rec)
        if progress is not None:
            progress(rec)
        if out is not None and len(records) % 100 == 0:
            _write(out, config, names, records)

    start = time.perf_counter()
    if workers == 1:
        # The networks are tiny: one intra-op thread is much faster, and on a loaded machine spinning OpenMP
        # threads made some forward passes 1000x slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for task in tasks:
                collect(run_trial(*task))
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        level = logging.getLogger("lipbound").getEffectiveLevel()
        with ProcessPoolExecutor(int(workers), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(level,)) as pool:
            for future in as_completed([pool.submit(_task, t) for t in tasks]):
                collect(future.result())
    config["wall_time_s"] = time.perf_counter() - start
    config["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return _write(out, config, names, records)


def _write(out: Path | None, config: dict, names: list[str], records: list[dict]) -> dict:
    order = {n: i for i, n in enumerate(names)}
    records.sort(key=lambda r: (order[r["family"]], r["index"]))
    summary = summarize(records)
    result = {"config": config, "summary": {n: summary[n] for n in names if n in summary}, "trials": records}
    if out is not None:
        path = out / "soundness.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(path)
    return result
