"""Where jobs run: a local process pool (default, no extra dependency) or a Ray cluster (``lipbound[ray]``).

Both engines take job payloads lazily, keep a bounded number in flight (driver memory does not grow with the
batch) and hand each finished record to a callback as soon as it arrives. Neither schedules anything itself:
the pool is :class:`concurrent.futures.ProcessPoolExecutor` (spawned processes), the cluster is Ray's.

Worker death. Ray re-runs a task whose worker died (``max_retries``) and then reports it; the engine records
the job as failed with Ray's reason. A process pool cannot say which job killed it: when one worker dies the
executor breaks and every job in flight fails. The local engine therefore restarts the pool and re-runs those
jobs one at a time; a job that kills a pool while running alone is charged an attempt, so innocent neighbours
are never charged, and after ``max_retries`` re-runs it is recorded as failed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator

from lipbound.batch.worker import error_record, execute_job, warm_up
from lipbound.errors import BatchError

log = logging.getLogger("lipbound")

OnRecord = Callable[[dict], None]

WORKER_DIED = "WorkerDied"


def _start_on_gpu(threads: int, gpus, warm) -> None:
    """Pool initializer: take one GPU id from the queue ``gpus`` and make it this process's only visible GPU (before
    torch touches CUDA), then warm up."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())
    if warm is not None:
        warm(threads)


class LocalEngine:
    """A pool of ``workers`` spawned processes on this machine, each using ``cores // workers`` threads.

    Parameters
    ----------
    workers : int, optional
        Processes (default: the number of CPU cores; with ``gpus``, one per GPU).
    gpus : sequence of int, optional
        GPU ids to spread the processes over (process ``i`` sees only GPU ``gpus[i % len(gpus)]`` as its
        ``cuda`` device). For ``device: cuda`` batches on one multi-GPU machine, without Ray.
    max_retries : int
        Re-runs of a job whose process died (killed, out of memory, crashed) before it is recorded as failed.
    task : callable
        What runs a job payload and returns its record (default :func:`~lipbound.batch.worker.execute_job`); a
        module-level function, so spawned processes can import it.
    warm_up : callable or None
        Run once in each new process with the thread count (default: import the library, set the threads).
    """

    name = "local"

    def __init__(self, workers: int | None = None, max_retries: int = 3, task: Callable[[dict], dict] = execute_job,
                 warm_up: Callable[[int], object] | None = warm_up, gpus=None):
        cores = os.cpu_count() or 1
        self.gpus = None if not gpus else [int(g) for g in gpus]
        self.workers = max(1, int(workers or (len(self.gpus) if self.gpus else cores)))
        self.threads = max(1, cores // self.workers)
        self.max_retries = int(max_retries)
        self.task = task
        self.warm_up = warm_up
        self._pool = None

    def _new_pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        if self.gpus:
            queue = context.Queue()
            for i in range(self.workers):
                queue.put(self.gpus[i % len(self.gpus)])
            return ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_on_gpu,
                                       initargs=(self.threads, queue, self.warm_up))
        return ProcessPoolExecutor(self.workers, mp_context=context,
                                   initializer=self.warm_up, initargs=(self.threads,) if self.warm_up else ())

    def start(self) -> None:
        """Start the processes and import the library in each (so the first jobs do not pay for it)."""
        self._pool = self._new_pool()
        if self.warm_up is not None:
            for future in [self._pool.submit(self.warm_up, self.threads) for _ in range(self.workers)]:
                future.result()

    def run(self, payloads: Iterable[dict], on_record: OnRecord) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        source: Iterator[dict] = iter(payloads)
        isolate: collections.deque = collections.deque()  # in flight when a pool broke: re-run one at a time
        crashes: dict[str, int] = collections.defaultdict(int)
        pending: dict = {}
        exhausted = False
        while True:
            limit = 1 if isolate else self.workers + 1  # one queued job keeps every process busy
            broken = False
            while len(pending) < limit and not broken:
                if isolate:
                    payload = isolate.popleft()
                else:
                    payload = None if exhausted else next(source, None)
                    if payload is None:
                        exhausted = True
                        break
                try:
                    pending[self._pool.submit(self.task, payload)] = payload
                except BrokenProcessPool:
                    isolate.appendleft(payload)
                    broken = True
            if not pending and not broken:
                return
            suspects = []
            if pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    payload = pending.pop(future)
                    try:
                        record = future.result()
                    except BrokenProcessPool:
                        broken = True
                        suspects.append(payload)
                    else:
                        record["attempts"] = crashes[payload["id"]] + 1
                        on_record(record)
            if broken:
                for future, payload in pending.items():
                    if future.done() and future.exception() is None:
                        record = future.result()
                        record["attempts"] = crashes[payload["id"]] + 1
                        on_record(record)
                    else:
                        suspects.append(payload)
                pending.clear()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                self._charge(suspects, crashes, isolate, on_record)

    def _charge(self, suspects: list[dict], crashes: dict, isolate: collections.deque, on_record: OnRecord) -> None:
        if not suspects:
            log.warning("batch: a worker process died while idle; restarting the pool")
            return
        if len(suspects) > 1:
            log.warning("batch: a worker process died with %d jobs in flight; re-running them one at a time",
                        len(suspects))
            isolate.extendleft(reversed(suspects))
            return
        payload = suspects[0]
        crashes[payload["id"]] += 1
        if crashes[payload["id"]] > self.max_retries:
            record = error_record(payload, WORKER_DIED, f"the worker process died (killed, out of memory or "
                                  f"crashed) on each of {crashes[payload['id']]} attempts")
            record["attempts"] = crashes[payload["id"]]
            on_record(record)
        else:
            log.warning("batch: job %s killed its worker process; retry %d of %d", payload["id"],
                        crashes[payload["id"]], self.max_retries)
            isolate.appendleft(payload)

    def close(self) -> None:
        """Stop the pool; running jobs are terminated (their results were not recorded, so resume re-runs them)."""
        if self._pool is None:
            return
        # Python >= 3.14 has terminate_workers(); before that the executor only lets running jobs finish, which
        # would keep an interrupted driver waiting, so the processes are terminated through its process table.
        terminate = getattr(self._pool, "terminate_workers", None)
        if terminate is not None:
            terminate()
        else:
            for process in list(getattr(self._pool, "_processes", {}).values()):
                if process.is_alive():
                    process.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None


@contextlib.contextmanager
def _loopback_node():
    """Make Ray treat this machine's node as ``127.0.0.1`` while it starts or attaches.

    Ray binds its servers to the machine's network address unless it believes it runs without cluster support;
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's own switch for single-machine use, read from the environment by
    the processes it starts and from ``ray_constants`` by this one) makes it use the loopback address.
    """
    try:
        from ray._private import ray_constants
    except ImportError:  # the switch moved: Ray then reads the variable only at import
        ray_constants = None
    variable = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    previous_env = os.environ.get(variable)
    previous_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[variable] = "0"
    if previous_flag is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous_env
        if previous_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = previous_flag


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None, **init_options):
    """Start a private Ray instance on this machine that listens on the loopback address only, dashboard off.

    Returns Ray's context; ``ray.shutdown()`` stops the instance. Other drivers attach with its
    ``ray.get_runtime_context().gcs_address`` (``127.0.0.1:PORT``).
    """
    import ray

    init_options.setdefault("log_to_driver", False)
    with _loopback_node():
        context = ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **init_options)
    address = ray.get_runtime_context().gcs_address
    if not _is_loopback(address):
        log.warning("batch: the local Ray instance listens on %s, not on the loopback address only", address)
    return context


class RayEngine:
    """Jobs as Ray tasks on a cluster: ``address`` ``"auto"`` (the running cluster), ``"HOST:PORT"``, or
    ``None`` to start a private instance on this machine (loopback only). When Ray is already initialised in
    this process, that connection is used (and left open).

    Parameters
    ----------
    address : str, optional
    workers : int, optional
        Jobs running at once (default: the cluster's CPUs / ``cpus_per_job``, or its GPUs / ``gpus_per_job``);
        also the CPUs of a private instance.
    gpus_per_job, cpus_per_job : float
        Resources Ray reserves for each job (GPU jobs: ``gpus_per_job=1`` with ``device="cuda"``).
    max_retries : int
        Ray's re-runs of a task whose worker died; then the job is recorded as failed with Ray's reason.
    init_options : dict, optional
        More :func:`ray.init` keywords (e.g. ``runtime_env``).
    task : callable
        What runs a job payload and returns its record (default :func:`~lipbound.batch.worker.execute_job`).
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, gpus_per_job: float = 0.0,
                 cpus_per_job: float = 1.0, max_retries: int = 3, init_options: dict | None = None,
                 task: Callable[[dict], dict] = execute_job):
        self.address = address
        self.workers = workers
        self.gpus_per_job = float(gpus_per_job or 0.0)
        self.cpus_per_job = float(cpus_per_job)
        self.max_retries = int(max_retries)
        self.init_options = dict(init_options or {})
        self.task = task
        self._started = False
        self._ray = None
        self._pending: dict = {}

    def start(self) -> None:
        try:
            import ray
        except ImportError as exc:
            raise BatchError("engine='ray' needs Ray: pip install 'lipbound[ray]' (or pip install ray).") from exc
        self._ray = ray
        if not ray.is_initialized():
            try:
                if self.address is None:
                    start_local_ray(num_cpus=self.workers, **self.init_options)
                else:
                    options = {"log_to_driver": False, **self.init_options}
                    with _loopback_node() if _is_loopback(self.address) else contextlib.nullcontext():
                        ray.init(address=self.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BatchError(f"cannot start or reach Ray at address {self.address!r}: {exc}. Start a cluster "
                                 "with 'ray start --head' and pass its address, or omit --address for a private "
                                 "one on this machine.") from exc
            self._started = True
        resources = ray.cluster_resources()
        if self.workers is None:
            if self.gpus_per_job > 0:
                self.workers = max(1, int(resources.get("GPU", 0) // self.gpus_per_job))
            else:
                self.workers = max(1, int(resources.get("CPU", 1) // max(self.cpus_per_job, 1e-9)))
        if self.gpus_per_job > resources.get("GPU", 0):
            raise BatchError(f"each job asks for {self.gpus_per_job:g} GPU(s) but the Ray cluster has "
                             f"{resources.get('GPU', 0):g}; lower --gpus-per-job or add GPU nodes.")
        threads = max(1, int(self.cpus_per_job))
        task = ray.remote(warm_up).options(num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job)
        ray.get([task.remote(threads) for _ in range(self.workers)])

    def run(self, payloads: Iterable[dict], on_record: OnRecord) -> None:
        ray = self._ray
        task = ray.remote(self.task).options(num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job,
                                               max_retries=self.max_retries, retry_exceptions=False)
        threads = max(1, int(self.cpus_per_job))
        source = iter(payloads)
        window = 2 * self.workers  # Ray always has the next job queued, the driver holds O(workers) references
        exhausted = False
        pending = self._pending
        while True:
            while not exhausted and len(pending) < window:
                payload = next(source, None)
                if payload is None:
                    exhausted = True
                    break
                payload = {**payload, "threads": threads}
                pending[task.remote(payload)] = payload
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                payload = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    reason = str(exc).strip().splitlines()
                    record = error_record(payload, type(exc).__name__,
                                          f"{reason[0] if reason else exc!r} (after Ray's {self.max_retries} "
                                          f"retries)\n" + "\n".join(reason[1:]))
                record["attempts"] = None
                on_record(record)

    def close(self) -> None:
        ray = self._ray
        if ray is None:
            return
        # Queued tasks are dropped; running ones get a KeyboardInterrupt (their workers live on for the next
        # batch). Their results were never recorded, so a resume runs them again.
        for ref in list(self._pending):
            try:
                ray.cancel(ref)
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                log.debug("batch: could not cancel a Ray task: %s", exc)
        self._pending.clear()
        if self._started:
            ray.shutdown()
            self._started = False


def make_engine(engine: str, workers: int | None = None, address: str | None = None,
                gpus_per_job: float | None = None, device: str | None = None, max_retries: int = 3,
                cpus_per_job: float = 1.0, ray_init_options: dict | None = None):
    """The engine named ``engine`` (``"local"`` or ``"ray"``)."""
    if engine == "local":
        if address is not None:
            raise BatchError("--address applies to --engine ray only.")
        if gpus_per_job:
            log.warning("batch: --gpus-per-job applies to the Ray engine; the local engine gives each worker process "
                        "one of this machine's GPUs")
        gpus = None
        if device is not None and device.startswith("cuda"):
            import torch

            count = torch.cuda.device_count()
            if count == 0:
                raise BatchError("the batch asks for device cuda but this machine has no CUDA GPU.")
            gpus = list(range(count))
            log.info("batch: local engine on %d GPU(s), one per worker process", count)
        return LocalEngine(workers, max_retries, gpus=gpus)
    if engine == "ray":
        if gpus_per_job is None:
            gpus_per_job = 1.0 if device is not None and device.startswith("cuda") else 0.0
        return RayEngine(address, workers, gpus_per_job, cpus_per_job, max_retries, ray_init_options)
    raise BatchError(f"unknown engine {engine!r}; choose 'local' or 'ray'.")
