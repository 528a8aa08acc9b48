"""Running a batch: expand the manifest, skip the jobs the results file already holds, stream the rest through
an engine and append each record the moment it arrives."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lipbound.batch.engines import make_engine
from lipbound.batch.manifest import Manifest, as_manifest
from lipbound.batch.results import open_results

log = logging.getLogger("lipbound")


@dataclass(frozen=True)
class BatchResult:
    """Counts and times of one :func:`run` (the records themselves are in ``out``).

    ``skipped``: jobs already done in ``out`` before this run (``resume``). ``uncertified``: jobs that ran but
    whose bound did not pass the rigorous check (they count as ``ok`` runs). ``startup_s``: starting the engine
    (processes, imports, cluster); ``run_s``: the jobs.
    """

    out: Path
    engine: str
    workers: int
    total: int
    skipped: int
    ok: int
    failed: int
    uncertified: int
    startup_s: float
    run_s: float

    @property
    def jobs_per_s(self) -> float:
        """Throughput of this run's jobs (start-up excluded)."""
        done = self.ok + self.failed
        return done / self.run_s if self.run_s > 0 else float("nan")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        data["jobs_per_s"] = self.jobs_per_s
        return data


def run(manifest: Manifest | str | Path | dict, out: str | Path, engine: str = "local", *, workers: int | None = None,
        address: str | None = None, gpus_per_job: float | None = None, cpus_per_job: float = 1.0,
        max_retries: int = 3, resume: bool = False, progress: bool = False,
        on_record: Callable[[dict], None] | None = None, fsync: bool = True,
        ray_init_options: dict | None = None) -> BatchResult:
    """Run every job of ``manifest`` and append one JSON record per job to ``out`` (JSON Lines).

    Parameters
    ----------
    manifest : Manifest, path of a YAML/JSON manifest, or the same structure as a dict
    out : path
        Results file. It must not exist (or be empty) unless ``resume=True``.
    engine : {"local", "ray"}
        ``local``: a pool of spawned processes on this machine (scripts that call this need the usual
        ``if __name__ == "__main__":`` guard). ``ray``: Ray tasks (``pip install 'lipbound[ray]'``) on the cluster
        at ``address`` (``"auto"`` or ``"HOST:PORT"``), or on a private loopback-only instance when ``address``
        is ``None``.
    workers : int, optional
        Jobs at once (default: CPU cores, or one per GPU for a CUDA batch on the local engine, each worker process
        seeing its own GPU; Ray: the cluster's CPUs or GPUs per job).
    gpus_per_job : float, optional
        Ray: GPUs reserved per job (default 1 when the manifest's ``device`` is CUDA, else 0).
    max_retries : int
        Re-runs of a job whose worker process died, before it is recorded as failed.
    resume : bool
        Skip the jobs already recorded as ``ok`` in ``out``; re-run failed ones (their old records are removed,
        so each job ends with exactly one record).
    progress : bool
        Show a progress bar (tqdm, on stderr) with ok/failed counts and the ETA.
    on_record : callable, optional
        Called with each record after it is written (custom progress, early stopping by raising).
    fsync : bool
        ``fsync`` after each record (crash safety; turn off for very many tiny jobs on slow disks).

    Returns
    -------
    BatchResult

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, lipbound
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> np.savez(folder / "net.npz", W0=np.eye(2), W1=3 * np.eye(2))
    >>> manifest = lipbound.batch.Manifest.from_dict({"models": ["net.npz"], "methods": ["mp", "lipsdp-neuron"]},
    ...                                               base_dir=folder)
    >>> result = lipbound.batch.run(manifest, folder / "results.jsonl", workers=1)
    >>> result.ok, result.failed
    (2, 0)
    >>> sorted(round(r["certificate"]["upper_bound"], 6) for r in lipbound.batch.read_records(result.out))
    [3.0, 3.0]
    """
    manifest = as_manifest(manifest)
    out = Path(out)
    job_ids = {job.id for job in manifest.jobs()}
    writer, done = open_results(out, resume, job_ids, fsync)
    todo = len(job_ids - done)
    if engine == "local" and todo:
        default = os.cpu_count() or 1
        if manifest.device is not None and manifest.device.startswith("cuda"):
            import torch

            default = max(1, torch.cuda.device_count())  # one worker process per GPU
        workers = min(workers or default, todo)  # no idle processes for a short batch
    runner = make_engine(engine, workers, address, gpus_per_job, manifest.device, max_retries, cpus_per_job,
                         ray_init_options)
    counts = {"ok": 0, "failed": 0, "uncertified": 0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo, unit="job", desc=f"batch ({engine})", dynamic_ncols=True)

    def accept(record: dict) -> None:
        record["engine"] = runner.name
        writer.append(record)
        counts[record["status"]] += 1
        certificate = record.get("certificate")
        if certificate is not None and not certificate.get("certified"):
            counts["uncertified"] += 1
        if bar is not None:
            bar.update()
            bar.set_postfix(ok=counts["ok"], failed=counts["failed"], refresh=False)
        if on_record is not None:
            on_record(record)

    log.info("batch: %d jobs, %d already done, %d to run on the %s engine", len(job_ids), len(done), todo,
             runner.name)
    start = time.perf_counter()
    try:
        if todo:
            runner.start()
        started = time.perf_counter()
        if todo:
            runner.run((job.payload() for job in manifest.jobs() if job.id not in done), accept)
        finished = time.perf_counter()
    finally:
        runner.close()
        writer.close()
        if bar is not None:
            bar.close()
    return BatchResult(out, runner.name, int(runner.workers or 0), len(job_ids), len(done), counts["ok"],
                       counts["failed"], counts["uncertified"], started - start, finished - started)
