"""The local engine and the driver: every job recorded exactly once with a valid certificate, through worker
deaths, a corrupt model, interrupts and resumes; the CLI's exit codes."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import lipbound
from lipbound import batch
from lipbound.batch.engines import LocalEngine
from lipbound.cli import main
from tests.batch_fixtures import ROOT, fake_payloads, fake_task, records, write_manifest, write_net, write_points


def study(folder, models=("a.npz", "b.npz"), **changes) -> dict:
    write_net(folder / "a.npz", [4, 8, 8, 2], seed=0)
    write_net(folder / "b.npz", [4, 16, 16, 3], seed=1)
    write_points(folder / "pa.npy", 2, 4)
    data = {"models": list(models), "methods": ["mp", "lipsdp-neuron"],
            "domains": ["global", {"points": "pa.npy", "radii": [0.1, 1.0]}]}
    return {**data, **changes}


def check_exactly_once(manifest: batch.Manifest, out) -> list[dict]:
    """Every job of the manifest has one record, certified and valid against a fresh re-check."""
    found = records(out)
    ids = [r["job_id"] for r in found]
    assert len(ids) == len(set(ids)), "duplicated records"
    jobs = {j.id: j for j in manifest.jobs()}
    assert set(ids) == set(jobs), "lost or foreign records"
    networks = {}
    for r in found:
        if r["status"] != "ok":
            continue
        job = jobs[r["job_id"]]
        cert = lipbound.Certificate.from_dict(r["certificate"])
        net = networks.setdefault(job.model.path, lipbound.load(job.model.path))
        assert cert.certified and lipbound.verify_certificate(cert, net).valid
        assert r["job"]["method"] == job.method == cert.method
    return found


def test_local_batch_matches_direct_certificates_and_records_bad_models(tmp_path):
    data = study(tmp_path, models=("a.npz",))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    data["models"] = ["bad.npz", "a.npz", "missing.npz"]
    data["lower_bound"] = {"n_starts": 4, "steps": 3}
    manifest = batch.Manifest.from_dict(data, base_dir=tmp_path)
    result = batch.run(manifest, tmp_path / "r.jsonl", workers=2)
    assert (result.total, result.ok, result.failed, result.skipped, result.workers) == (30, 10, 20, 0, 2)
    found = check_exactly_once(manifest, tmp_path / "r.jsonl")
    errors = {r["job"]["model"]: r["error"] for r in found if r["status"] == "failed"}
    assert set(errors) == {"bad", "missing"}
    assert "no such file" in errors["missing"]["message"] and "zip" in errors["bad"]["message"].lower()
    assert all(r["certificate"] is None for r in found if r["status"] == "failed")
    net = lipbound.load(tmp_path / "a.npz")
    points = np.load(tmp_path / "pa.npy")
    for r in found:
        job = r["job"]
        if job["model"] != "a":
            continue
        domain = None if job["domain"] is None else lipbound.Ball(points[job["domain"]["point"]],
                                                                  job["domain"]["radius"])
        direct = lipbound.certify(net, method=job["method"], domain=domain)
        assert r["certificate"]["upper_bound"] == pytest.approx(direct.upper_bound, rel=1e-7)
        assert r["lower_bound"]["value"] <= r["certificate"]["upper_bound"]
        assert r["engine"] == "local" and r["attempts"] == 1 and r["time_s"] > 0 and ":" in r["worker"]


def test_killed_worker_every_job_once(tmp_path, caplog):
    manifest = batch.Manifest.from_dict(study(tmp_path), base_dir=tmp_path)
    killed = []

    def kill_once(record):
        if len(killed) == 0 and record["status"] == "ok":
            pid = int(record["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)  # a pool process of this test (it just reported to us)
            killed.append(pid)

    result = batch.run(manifest, tmp_path / "r.jsonl", workers=2, on_record=kill_once)
    assert killed and result.failed == 0 and result.ok == result.total == 20
    found = check_exactly_once(manifest, tmp_path / "r.jsonl")
    assert killed[0] not in {int(r["worker"].rsplit(":", 1)[1]) for r in found[3:]}
    assert "died" in caplog.text and all(r["attempts"] == 1 for r in found)


def test_a_job_that_always_kills_its_worker_fails_alone_after_retries(caplog):
    engine = LocalEngine(workers=2, max_retries=1, task=fake_task, warm_up=None)
    got = []
    engine.start()
    try:
        engine.run(fake_payloads(8, dying=(2,)), got.append)
    finally:
        engine.close()
    by_id = {r["job_id"]: r for r in got}
    assert len(got) == len(by_id) == 8
    dead = by_id.pop("die002")
    assert dead["status"] == "failed" and dead["error"]["type"] == "WorkerDied" and dead["attempts"] == 2
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in by_id.values())


def test_interrupt_then_resume(tmp_path):
    manifest = batch.Manifest.from_dict(study(tmp_path, models=("a.npz",)), base_dir=tmp_path)
    out = tmp_path / "r.jsonl"
    seen = []

    def interrupt(record):
        seen.append(record["job_id"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.run(manifest, out, workers=2, on_record=interrupt)
    assert len(records(out)) == 3 and not multiprocessing.active_children()
    with pytest.raises(lipbound.errors.BatchError, match="--resume"):
        batch.run(manifest, out, workers=2)
    result = batch.run(manifest, out, workers=2, resume=True)
    assert (result.skipped, result.ok, result.total) == (3, 7, 10)
    check_exactly_once(manifest, out)
    again = batch.run(manifest, out, workers=2, resume=True)
    assert (again.skipped, again.ok) == (10, 0)


def test_resume_reruns_failed_jobs(tmp_path):
    data = study(tmp_path, models=("a.npz",), domains=["global"], methods=["mp"])
    manifest = batch.Manifest.from_dict(data, base_dir=tmp_path)
    job = next(manifest.jobs())
    (tmp_path / "keep.npz").write_bytes((tmp_path / "a.npz").read_bytes())
    (tmp_path / "a.npz").unlink()
    out = tmp_path / "r.jsonl"
    # The job id was fixed while the file existed; a run without it records the failure ...
    with batch.ResultsWriter(out) as writer:
        writer.append(batch.execute_job(job.payload()))
    assert records(out)[0]["status"] == "failed"
    # ... and once the file is back, resume re-runs it and keeps one record.
    (tmp_path / "a.npz").write_bytes((tmp_path / "keep.npz").read_bytes())
    result = batch.run(manifest, out, workers=1, resume=True)
    assert (result.ok, result.skipped) == (1, 0)
    assert [r["status"] for r in records(out)] == ["ok"]


def test_cli_check_exit_codes_and_summary(tmp_path, capsys):
    data = study(tmp_path, models=("a.npz",), methods=["mp"], domains=["global"])
    write_net(tmp_path / "big.npz", [4, 8, 8, 2], seed=0, scale=30.0)
    data["models"] = ["a.npz", "big.npz"]
    data["expect"] = {"max_upper_bound": 50.0}
    path = write_manifest(tmp_path, data)
    out = tmp_path / "r.jsonl"
    code = main(["batch", str(path), "--out", str(out), "--workers", "1", "--check", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 1
    fails = [line for line in printed.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "big" in fails[0] and "> max_upper_bound 50" in fails[0]
    assert "a " in printed and "global" in printed
    assert {p.name for p in (tmp_path / "r_summary").iterdir()} >= {"summary.txt", "summary.json",
                                                                   "bounds_per_model.png", "time_per_job.png"}
    # Without --check, a broken expectation alone does not fail the run; --resume computes nothing again.
    assert main(["batch", str(path), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "2 of 2 jobs done (2 in earlier runs)" in capsys.readouterr().out
    assert main(["batch", str(path), "--out", str(out), "--no-progress"]) == 1
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_sigint_then_resume(tmp_path):
    manifest = write_manifest(tmp_path, study(tmp_path))
    out = tmp_path / "r.jsonl"
    command = [sys.executable, "-m", "lipbound.cli", "batch", str(manifest), "--out", str(out), "--workers", "2",
               "--no-progress"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (not out.exists() or len(out.read_text().splitlines()) < 4) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err
    done = len(records(out))
    assert 4 <= done < 20
    with open(out, "ab") as fh:  # a crash in the middle of a write: the half line must not survive
        fh.write(b'{"job_id": "half-writ')
    finished = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert f"20 of 20 jobs done ({done} in earlier runs)" in finished.stdout
    check_exactly_once(batch.Manifest.from_file(manifest), out)
    assert json.loads(out.read_text().splitlines()[-1])["job_id"] != "half-writ"


def test_engine_choice_and_gpu_requests():
    from lipbound.batch.engines import RayEngine, make_engine
    from lipbound.errors import BatchError

    assert isinstance(make_engine("local", workers=3), LocalEngine)
    assert make_engine("ray", device="cuda").gpus_per_job == 1.0
    assert make_engine("ray", device="cuda", gpus_per_job=0.5).gpus_per_job == 0.5
    assert make_engine("ray").gpus_per_job == 0.0 and isinstance(make_engine("ray"), RayEngine)
    with pytest.raises(BatchError, match="--address applies to --engine ray"):
        make_engine("local", address="auto")
    with pytest.raises(BatchError, match="unknown engine 'dask'"):
        make_engine("dask")


def test_local_engine_gives_each_worker_process_its_own_gpu():
    engine = LocalEngine(workers=3, max_retries=0, task=fake_task, warm_up=None, gpus=[4, 7])
    got = []
    engine.start()
    try:
        engine.run(fake_payloads(12, sleep=0.02), got.append)
    finally:
        engine.close()
    by_process = {}
    for record in got:
        by_process.setdefault(record["worker"], set()).add(record["visible_gpus"])
    assert len(got) == 12 and all(len(gpus) == 1 for gpus in by_process.values())
    seen = sorted(g for gpus in by_process.values() for g in gpus)
    assert set(seen) <= {"4", "7"} and (len(seen) < 3 or seen == ["4", "4", "7"])  # GPU ids dealt round robin
    assert LocalEngine(gpus=[0, 1]).workers == 2  # one process per GPU by default
