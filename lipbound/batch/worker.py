"""What a worker process does with one job: load the model, certify, optionally attack; return a JSON record.

Runs inside local pool processes and Ray tasks alike. Every ``Exception`` of a job becomes a ``failed`` record
(so one bad model never stops a batch); only the death of the process itself is left to the engine's retries.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections import OrderedDict
from pathlib import Path

import numpy as np

#: Loaded networks of this process, keyed by file, contents and load options (jobs of one model share it).
_NETWORKS: OrderedDict = OrderedDict()
_NETWORK_CACHE_SIZE = 4
#: File hashes of this process, keyed by (path, mtime, size), so a model is hashed once per change.
_HASHES: dict = {}
_THREADS: list = [None]


def worker_name() -> str:
    """``host:pid`` of this process (stored with each record)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def limit_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch and the BLAS libraries (workers share the machine's cores)."""
    if not threads or _THREADS[0] == threads:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        threadpool_limits(limits=threads)
    _THREADS[0] = threads


def warm_up(threads: int | None = None) -> int:
    """Import the library and set the thread count before the first job (the pool's start-up); returns the pid."""
    import lipbound.api  # noqa: F401 - the import is the warm-up

    limit_threads(threads)
    return os.getpid()


def _sha256(path: Path) -> str | None:
    from lipbound.batch.manifest import file_sha256

    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def _network(job: dict, load_kwargs: dict):
    from lipbound import load
    from lipbound.errors import BatchError

    path = Path(job["path"])
    expected = job["model_sha256"]
    if expected is not None:
        actual = _sha256(path)
        if actual is not None and actual != expected:
            raise BatchError(f"model file {path} changed since the batch was expanded (sha256 {actual[:12]}... "
                             f"!= {expected[:12]}...); re-run the batch so the job ids match the new file.")
    key = (str(path), expected, repr(sorted(load_kwargs.items())))
    if key in _NETWORKS:
        _NETWORKS.move_to_end(key)
        return _NETWORKS[key]
    network = load(path, **load_kwargs)
    _NETWORKS[key] = network
    while len(_NETWORKS) > _NETWORK_CACHE_SIZE:
        _NETWORKS.popitem(last=False)
    return network


def error_record(payload: dict, error_type: str, message: str, worker: str | None = None,
                 trace: str | None = None) -> dict:
    """A ``failed`` record for a job (used by workers and by engines when a worker died)."""
    from lipbound import __version__

    return {"job_id": payload["id"], "status": "failed", "job": payload["job"], "certificate": None,
            "lower_bound": None, "error": {"type": error_type, "message": message[:4000], "traceback": trace},
            "worker": worker, "started_at": None, "finished_at": _now(), "time_s": None,
            "lipbound_version": __version__}


def execute_job(payload: dict) -> dict:
    """Run one job (a :meth:`~lipbound.batch.Job.payload`) and return its JSON-ready record.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, lipbound
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> np.savez(folder / "net.npz", W0=np.eye(2), W1=2 * np.eye(2))
    >>> job = next(lipbound.batch.Manifest.from_dict({"models": ["net.npz"], "methods": ["mp"]},
    ...                                               base_dir=folder).jobs())
    >>> record = execute_job(job.payload())
    >>> record["status"], round(record["certificate"]["upper_bound"], 6)
    ('ok', 2.0)
    """
    from lipbound import __version__

    start = time.perf_counter()
    record = {"job_id": payload["id"], "status": "ok", "job": payload["job"], "certificate": None,
              "lower_bound": None, "error": None, "worker": worker_name(), "started_at": _now()}
    job = payload["job"]
    try:
        from lipbound import Ball, certify, lower_bound

        limit_threads(payload.get("threads"))
        network = _network(job, payload["load"])
        domain = None
        if job["domain"] is not None:
            d = job["domain"]
            domain = Ball(np.asarray(payload["center"], dtype=np.float64), d["radius"], d["norm"])
        options = dict(job["options"])
        if job["device"] is not None:
            options["device"] = job["device"]
        cert = certify(network, method=job["method"], norm=job["norm"], solver=job["solver"],
                       output_index=job["output_index"], domain=domain,
                       bounds_method=(job["domain"] or {}).get("bounds_method", "crown"), **options)
        if job["lower_bound"] is not None and job["norm"] == "l2":
            lb = lower_bound(network, domain=domain, device=job["device"], **job["lower_bound"])
            cert = cert.with_lower_bound(lb.value)
            record["lower_bound"] = {"value": lb.value, "kind": lb.kind, "pair_value": lb.pair_value,
                                     "time_s": lb.time_s, "device": lb.device}
        record["certificate"] = cert.to_dict()
    except Exception as exc:  # noqa: BLE001 - every job error is recorded, never raised into the batch
        record.update(status="failed", error={"type": type(exc).__name__, "message": str(exc)[:4000],
                                              "traceback": traceback.format_exc(limit=-8)})
    record.update(finished_at=_now(), time_s=time.perf_counter() - start, lipbound_version=__version__)
    return record
