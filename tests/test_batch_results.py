"""Results files: one complete JSON line per record, safe reading of foreign files, resume preparation."""

import json

import numpy as np
import pytest

from lipbound.batch.results import ResultsWriter, encode_record, open_results, prepare_resume, read_records
from lipbound.errors import BatchError


def rec(job_id, status="ok", **extra):
    return {"job_id": job_id, "status": status, **extra}


def test_each_record_is_one_line_of_plain_json(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsWriter(path) as writer:
        writer.append(rec("a", value=np.float64(1.5), count=np.int64(3), array=np.arange(3)))
        writer.append(rec("b", "failed", error={"message": "line one\nline two"}))
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    first = json.loads(lines[0])
    assert first == {"job_id": "a", "status": "ok", "value": 1.5, "count": 3, "array": [0, 1, 2]}
    assert [r["job_id"] for r in read_records(path)] == ["a", "b"]


def test_unserialisable_values_are_refused_not_pickled():
    with pytest.raises(TypeError, match="not JSON data"):
        encode_record(rec("a", thing=object()))


def test_foreign_lines_are_skipped(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join([json.dumps(rec("a")), "garbage", json.dumps([1, 2]), json.dumps({"job_id": 3}),
                               json.dumps(rec("b", "weird")), json.dumps({"py/object": "os.system", "job_id": "c",
                                                                          "status": "ok"}), ""]))
    assert [r["job_id"] for r in read_records(path)] == ["a", "c"]
    assert "skipped 4 line(s)" in caplog.text


def test_existing_file_needs_resume(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec("a")) + "\n")
    with pytest.raises(BatchError, match="--resume"):
        open_results(path, False, {"a"})
    (tmp_path / "empty.jsonl").write_text("")
    writer, done = open_results(tmp_path / "empty.jsonl", False, {"a"})
    writer.close()
    assert done == set()


def test_resume_cuts_a_half_written_record_before_appending(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(encode_record(rec("a")) + encode_record(rec("b"))[:17])
    writer, done = open_results(path, True, {"a", "b"})
    writer.append(rec("b"))
    writer.close()
    assert done == {"a"}
    assert [r["job_id"] for r in read_records(path)] == ["a", "b"]
    assert len(path.read_text().splitlines()) == 2


def test_resume_drops_failed_records_of_the_batch_only(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [rec("a"), rec("b", "failed"), rec("c", "failed"), rec("other", "failed"), rec("a")]
    path.write_bytes(b"".join(encode_record(r) for r in lines) + b"not a record\n")
    done = prepare_resume(path, {"a", "b", "c", "d"})
    assert done == {"a"}
    kept = path.read_text().splitlines()
    assert [json.loads(line)["job_id"] for line in kept[:-1]] == ["a", "other"] and kept[-1] == "not a record"


def test_resume_without_failures_leaves_the_file_untouched(tmp_path):
    path = tmp_path / "r.jsonl"
    data = encode_record(rec("a")) + encode_record(rec("zzz", "failed"))
    path.write_bytes(data)
    before = path.stat().st_ino
    assert prepare_resume(path, {"a", "b"}) == {"a"}
    assert path.read_bytes() == data and path.stat().st_ino == before
