"""Batch summaries: table rows per model/method/region, medians over points, plots and JSON."""

import json

import numpy as np
import pytest

from lipbound import batch
from tests.batch_fixtures import write_net, write_points


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    write_net(folder / "a.npz", [3, 6, 6, 2], seed=0)
    write_net(folder / "b.npz", [3, 6, 2], seed=1)
    write_points(folder / "p.npy", 3, 3)
    manifest = batch.Manifest.from_dict({
        "models": ["a.npz", "b.npz", "missing.npz"], "methods": ["mp", "lipsdp-neuron"],
        "domains": ["global", {"points": "p.npy", "radii": [0.01, 0.1, 1.0]}],
        "lower_bound": {"n_starts": 4, "steps": 2}}, base_dir=folder)
    out = folder / "r.jsonl"
    with batch.ResultsWriter(out, fsync=False) as writer:
        for job in manifest.jobs():
            writer.append(batch.execute_job(job.payload()))
    return manifest, out


def test_rows_summarise_points_per_radius(results, tmp_path):
    manifest, out = results
    summary = batch.summarize(out, manifest, tmp_path / "summary")
    assert summary.counts == {"jobs": 60, "ok": 40, "failed": 20, "uncertified": 0, "missing": 0}
    rows = {(r["model"], r["method"], r["region"]): r for r in summary.rows}
    assert len(rows) == 3 * 2 * 4
    local = rows[("a", "lipsdp-neuron", "l2 r=0.1")]
    bounds = [rec["certificate"]["upper_bound"] for rec in batch.read_records(out)
              if rec["job"]["model"] == "a" and rec["job"]["method"] == "lipsdp-neuron"
              and (rec["job"]["domain"] or {}).get("radius") == 0.1]
    assert local["jobs"] == 3 and local["bound"] == pytest.approx(np.median(bounds))
    assert local["bound_max"] == max(bounds) and local["lower_bound"] <= local["bound"]
    glob = rows[("a", "mp", "global")]
    assert glob["jobs"] == 1 and glob["gap"] >= 1.0 and glob["time_s"] > 0
    assert rows[("missing", "mp", "global")]["failed"] == 1
    lines = summary.table.splitlines()
    assert len(lines) == 2 + len(rows) and "bound (med)" in lines[0]
    for name in ("bounds_per_model.png", "local_bounds.png", "time_per_job.png"):
        assert (tmp_path / "summary" / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "summary" / "summary.json").read_text())
    assert saved["counts"] == summary.counts and len(saved["rows"]) == len(rows)


def test_summary_without_manifest_counts_every_record(results):
    _, out = results
    summary = batch.summarize(out)
    assert summary.counts["jobs"] == 60 and "missing" not in summary.counts and summary.plots == []
