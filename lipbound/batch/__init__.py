"""Certify at scale: batches of independent certificates that stream to JSON Lines, resume, survive worker loss
and run on a local process pool or a Ray cluster.

Examples
--------
>>> import numpy as np, tempfile, pathlib, lipbound
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> np.savez(folder / "net.npz", W0=np.eye(2), W1=np.ones((1, 2)))
>>> manifest = lipbound.batch.Manifest.from_dict({"models": ["net.npz"], "methods": ["mp", "lipsdp-neuron"]},
...                                               base_dir=folder)
>>> [job.method for job in manifest.jobs()]
['mp', 'lipsdp-neuron']
"""

from lipbound.batch.driver import BatchResult, run
from lipbound.batch.engines import LocalEngine, RayEngine, start_local_ray
from lipbound.batch.expectations import Violation, check
from lipbound.batch.manifest import DomainSpec, Job, JobDomain, Manifest, ModelSpec, PointsSpec
from lipbound.batch.report import Summary, summarize
from lipbound.batch.results import ResultsWriter, read_records
from lipbound.batch.worker import execute_job

__all__ = [
    "BatchResult", "DomainSpec", "Job", "JobDomain", "LocalEngine", "Manifest", "ModelSpec", "PointsSpec",
    "RayEngine", "ResultsWriter", "Summary", "Violation", "check", "execute_job", "read_records", "run",
    "start_local_ray", "summarize",
]
