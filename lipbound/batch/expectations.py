"""CI gates: compare a batch's recorded certificates with the expectations stated in its manifest.

Expectation keys (numbers): ``max_upper_bound`` (a budget: the certified bound must not exceed it), ``value``
with ``rtol``/``atol`` (a published bound: ours must not exceed ``value * (1 + rtol) + atol``),
``known_lower_bound`` (a value the true constant is known to reach: a certified bound below it is unsound) and
``max_gap`` (certified bound over the attack's lower bound; needs ``lower_bound: true``). Every job must also have
run and be certified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lipbound.batch.manifest import Job, as_manifest
from lipbound.batch.results import read_records


@dataclass(frozen=True)
class Violation:
    """A job that breaks its expectation (or failed, or was never run)."""

    job_id: str
    model: str
    method: str
    norm: str
    output_index: int | None
    region: str
    message: str

    def __str__(self) -> str:
        output = "" if self.output_index is None else f" output {self.output_index}"
        return f"{self.model} {self.method} {self.norm}{output} {self.region} [{self.job_id}]: {self.message}"


def region_label(domain: dict | None) -> str:
    """``global`` or ``source[point] l2 r=0.1``."""
    if not domain:
        return "global"
    return f"{domain.get('source')}[{domain.get('point')}] {domain.get('norm')} r={domain.get('radius'):g}"


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _essentials(record: dict) -> dict:
    """The few fields of a record the checks read (validated: records may come from anywhere)."""
    cert = record.get("certificate") if isinstance(record.get("certificate"), dict) else {}
    error = record.get("error") if isinstance(record.get("error"), dict) else {}
    message = str(error.get("message", "")).strip().splitlines()
    return {"status": record["status"], "certified": cert.get("certified") is True,
            "upper_bound": _number(cert.get("upper_bound")), "lower_bound": _number(cert.get("lower_bound")),
            "cert_status": str(cert.get("status", "")), "reason": str(cert.get("reason", "")),
            "error": f"{error.get('type', 'error')}: {message[0] if message else ''}"}


def evaluate(expect: dict, record: dict | None) -> list[str]:
    """What is wrong with one job's record (an empty list when it meets ``expect``)."""
    if record is None:
        return ["no result recorded (run the batch, or resume it)"]
    if record["status"] != "ok":
        return [f"job failed: {record['error']}"]
    if not record["certified"] or record["upper_bound"] is None:
        return [f"not certified ({record['cert_status']}): {record['reason']}".rstrip(": ")]
    ub = record["upper_bound"]
    problems = []
    if "max_upper_bound" in expect and ub > expect["max_upper_bound"]:
        problems.append(f"certified bound {ub:.8g} > max_upper_bound {expect['max_upper_bound']:.8g}")
    if "value" in expect:
        limit = expect["value"] * (1 + expect.get("rtol", 0.0)) + expect.get("atol", 0.0)
        if ub > limit:
            problems.append(f"certified bound {ub:.8g} exceeds the published value {expect['value']:.8g} beyond "
                            f"its tolerance (limit {limit:.8g})")
    if "known_lower_bound" in expect and ub < expect["known_lower_bound"]:
        problems.append(f"certified bound {ub:.8g} is below the known lower bound "
                        f"{expect['known_lower_bound']:.8g}: the certificate is unsound (please report this)")
    if "max_gap" in expect:
        lb = record["lower_bound"]
        if not lb:
            problems.append("max_gap needs a lower bound: add 'lower_bound: true' to the manifest")
        elif ub / lb > expect["max_gap"]:
            problems.append(f"gap {ub / lb:.6g} (certified {ub:.8g} / lower bound {lb:.8g}) > max_gap "
                            f"{expect['max_gap']:.6g}")
    return problems


def _violation(job: Job, message: str) -> Violation:
    return Violation(job.id, job.model.name, job.method, job.norm, job.output_index,
                     region_label(job.describe()["domain"]), message)


def check(manifest, results: str | Path, expectations: bool = True) -> list[Violation]:
    """Every violation of the manifest's expectations in ``results`` (the latest record of each job counts).

    With ``expectations=False`` only jobs that failed, were not certified or have no record are reported.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, lipbound
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> np.savez(folder / "net.npz", W0=np.eye(2), W1=3 * np.eye(2))
    >>> manifest = lipbound.batch.Manifest.from_dict({"models": ["net.npz"], "methods": ["mp"],
    ...                                               "expect": {"max_upper_bound": 2.5}}, base_dir=folder)
    >>> job = next(manifest.jobs())
    >>> with lipbound.batch.ResultsWriter(folder / "r.jsonl") as w:
    ...     w.append(lipbound.batch.execute_job(job.payload()))
    >>> [v.message for v in check(manifest, folder / "r.jsonl")]
    ['certified bound 3 > max_upper_bound 2.5']
    """
    manifest = as_manifest(manifest)
    latest = {}
    results = Path(results)
    if results.exists():
        for record in read_records(results):
            latest[record["job_id"]] = _essentials(record)
    violations = []
    for job in manifest.jobs():
        for message in evaluate(job.expect if expectations else {}, latest.get(job.id)):
            violations.append(_violation(job, message))
    return violations
