"""CI gates: each expectation key, failed/uncertified/missing jobs, and check() over a results file."""

import pytest

from lipbound import batch
from lipbound.batch.expectations import evaluate
from tests.batch_fixtures import write_net


def essentials(ub=2.0, lb=None, certified=True, status="ok"):
    return {"status": status, "certified": certified, "upper_bound": ub, "lower_bound": lb, "cert_status": "optimal",
            "reason": "", "error": "BadZipFile: File is not a zip file"}


@pytest.mark.parametrize("expect, record, words", [
    ({}, essentials(), []),
    ({"max_upper_bound": 2.0}, essentials(2.0), []),
    ({"max_upper_bound": 1.9}, essentials(2.0), ["> max_upper_bound 1.9"]),
    ({"value": 1.9, "rtol": 0.1}, essentials(2.0), []),
    ({"value": 1.9, "rtol": 0.01}, essentials(2.0), ["exceeds the published value 1.9", "limit 1.919"]),
    ({"value": 1.9, "atol": 0.2}, essentials(2.0), []),
    ({"known_lower_bound": 2.5}, essentials(2.0), ["below the known lower bound 2.5", "unsound"]),
    ({"max_gap": 1.5}, essentials(2.0, 1.5), []),
    ({"max_gap": 1.2}, essentials(2.0, 1.5), ["gap 1.33333 ", "> max_gap 1.2"]),
    ({"max_gap": 1.2}, essentials(2.0, None), ["lower_bound: true"]),
    ({}, essentials(None, certified=False), ["not certified"]),
    ({}, essentials(status="failed"), ["job failed: BadZipFile"]),
    ({}, None, ["no result recorded"]),
])
def test_evaluate(expect, record, words):
    problems = evaluate(expect, record)
    assert bool(problems) == bool(words)
    for word in words:
        assert word in " ".join(problems)


def test_check_reads_the_latest_record_of_each_job(tmp_path):
    write_net(tmp_path / "small.npz", [3, 5, 2], seed=0, scale=0.5)
    write_net(tmp_path / "large.npz", [3, 5, 2], seed=0, scale=20.0)
    manifest = batch.Manifest.from_dict({"models": ["small.npz", "large.npz", "gone.npz"], "methods": ["mp"],
                                         "expect": {"max_upper_bound": 5.0}}, base_dir=tmp_path)
    jobs = list(manifest.jobs())
    out = tmp_path / "r.jsonl"
    with batch.ResultsWriter(out) as writer:
        for job in jobs[:2]:
            writer.append(batch.execute_job(job.payload()))
    violations = batch.check(manifest, out)
    assert [(v.model, v.job_id) for v in violations] == [("large", jobs[1].id), ("gone", jobs[2].id)]
    assert "max_upper_bound 5" in violations[0].message and "no result" in violations[1].message
    assert str(violations[0]).startswith("large mp l2 global [")
    assert [v.model for v in batch.check(manifest, out, expectations=False)] == ["gone"]
