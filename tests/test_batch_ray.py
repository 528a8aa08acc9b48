"""The Ray engine on a private cluster started by the tests (loopback only, dashboard off, 2 CPUs): a killed
worker, a job that kills every worker, an interrupted driver and resume, 500 small jobs with bounded driver
memory, and the CLI attaching to the cluster by address."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc

import pytest

from lipbound import batch
from lipbound.batch.engines import RayEngine
from tests.batch_fixtures import (
    ROOT,
    cmdline,
    descendants,
    fake_payloads,
    fake_task,
    records,
    write_manifest,
    write_net,
    write_points,
)
from tests.test_batch_engines import check_exactly_once, study

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'lipbound[ray]'")


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    temp = tempfile.mkdtemp(prefix="lbray")
    batch.start_local_ray(num_cpus=2, _temp_dir=temp, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    address = ray.get_runtime_context().gcs_address
    try:
        assert address.startswith("127.0.0.1:"), f"the test cluster must listen on loopback only, got {address}"
        yield address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def kill_a_busy_worker(out, after: int, timeout: float = 120.0) -> list:
    """In a thread: once ``out`` holds ``after`` records, SIGKILL a worker of this process's own cluster while it
    runs a job (its title is ``ray::execute_job``). The list gets the pid."""
    killed = []

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < after):
            time.sleep(0.01)
        while time.monotonic() < deadline and not killed:
            for pid in descendants(os.getpid()):
                if cmdline(pid).startswith("ray::execute_job"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_killed_busy_worker_every_job_once(cluster, tmp_path):
    manifest = batch.Manifest.from_dict(study(tmp_path), base_dir=tmp_path)
    killed = kill_a_busy_worker(tmp_path / "r.jsonl", after=2)
    result = batch.run(manifest, tmp_path / "r.jsonl", engine="ray")
    assert killed, "no worker was caught running a job"
    assert (result.ok, result.failed, result.total, result.engine) == (20, 0, 20, "ray")
    found = check_exactly_once(manifest, tmp_path / "r.jsonl")
    assert all(r["engine"] == "ray" for r in found)
    assert killed[0] not in {int(r["worker"].rsplit(":", 1)[1]) for r in found[-5:]}


def test_job_that_always_kills_its_worker_is_recorded_failed(cluster):
    engine = RayEngine(max_retries=1, task=fake_task)
    got = []
    engine.start()
    try:
        engine.run(fake_payloads(6, dying=(3,)), got.append)
    finally:
        engine.close()
    by_id = {r["job_id"]: r for r in got}
    assert len(got) == len(by_id) == 6
    dead = by_id.pop("die003")
    assert dead["status"] == "failed" and dead["error"]["type"] == "WorkerCrashedError"
    assert "after Ray's 1 retries" in dead["error"]["message"]
    assert all(r["status"] == "ok" for r in by_id.values())


def test_interrupt_then_resume(cluster, tmp_path):
    manifest = batch.Manifest.from_dict(study(tmp_path, models=("a.npz",)), base_dir=tmp_path)
    out = tmp_path / "r.jsonl"
    seen = []

    def interrupt(record):
        seen.append(record)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.run(manifest, out, engine="ray", on_record=interrupt)
    assert len(records(out)) == 4 and ray.is_initialized()
    result = batch.run(manifest, out, engine="ray", resume=True)
    assert (result.skipped, result.ok, result.failed) == (4, 6, 0)
    check_exactly_once(manifest, out)


def test_corrupt_model_on_ray(cluster, tmp_path):
    data = study(tmp_path, models=("a.npz",), domains=["global"])
    (tmp_path / "bad.npz").write_bytes(b"\x00" * 64)
    data["models"] = ["a.npz", "bad.npz"]
    manifest = batch.Manifest.from_dict(data, base_dir=tmp_path)
    result = batch.run(manifest, tmp_path / "r.jsonl", engine="ray")
    assert (result.ok, result.failed) == (2, 2)
    failed = [r for r in check_exactly_once(manifest, tmp_path / "r.jsonl") if r["status"] == "failed"]
    assert {r["job"]["model"] for r in failed} == {"bad"} and all(r["error"]["message"] for r in failed)


def _peak_driver_memory(folder, n_points: int) -> tuple[int, batch.BatchResult]:
    write_points(folder / f"p{n_points}.npy", n_points, 4, seed=n_points)
    manifest = batch.Manifest.from_dict({"models": ["a.npz"], "methods": ["mp"], "domains": {
        "points": f"p{n_points}.npy", "radii": [0.5], "bounds_method": "ibp"}}, base_dir=folder)
    out = folder / f"r{n_points}.jsonl"
    tracemalloc.start()
    try:
        result = batch.run(manifest, out, engine="ray", fsync=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if n_points <= 100:
        check_exactly_once(manifest, out)
    ids = [r["job_id"] for r in batch.read_records(out)]
    assert len(ids) == len(set(ids)) == n_points == result.ok
    return peak, result


@pytest.mark.slow
def test_500_small_jobs_with_bounded_driver_memory(cluster, tmp_path):
    write_net(tmp_path / "a.npz", [4, 8, 8, 2])
    small, _ = _peak_driver_memory(tmp_path, 100)
    large, result = _peak_driver_memory(tmp_path, 500)
    record_bytes = (tmp_path / "r500.jsonl").stat().st_size / 500
    # Nothing per finished job stays in the driver: 400 more jobs add far less than their records' size.
    assert large - small < 0.25 * 400 * record_bytes, (small, large, record_bytes)
    assert result.failed == 0


@pytest.mark.slow
def test_cli_attaches_to_the_cluster_by_address(cluster, tmp_path):
    data = study(tmp_path, models=("a.npz",), methods=["mp"], domains=["global"])
    data["expect"] = {"max_upper_bound": 1e6}
    path = write_manifest(tmp_path, data, "batch.json")
    out = tmp_path / "r.jsonl"
    run = subprocess.run([sys.executable, "-m", "lipbound.cli", "batch", str(path), "--out", str(out), "--engine",
                          "ray", "--address", cluster, "--check", "--no-progress"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "check: all 1 jobs pass" in run.stdout
    assert [r["engine"] for r in records(out)] == ["ray"]


def test_gpu_jobs_on_a_cluster_without_gpus_are_refused(cluster):
    from lipbound.errors import BatchError

    engine = RayEngine(gpus_per_job=1)
    with pytest.raises(BatchError, match="asks for 1 GPU.* has 0"):
        engine.start()
    engine.close()
    assert ray.is_initialized()
