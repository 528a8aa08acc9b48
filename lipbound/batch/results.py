"""Batch results as JSON Lines: one record per job, appended atomically, read back safely for ``--resume``.

Only the driver writes. Each record is one ``write()`` of one complete line to a file opened with
``O_APPEND``, then ``fsync``: a crash loses at most the line being written, never corrupts an earlier one. A
partial last line (power loss mid-write) is cut off when the file is opened for resuming, before anything is
appended after it. Records are plain JSON (never pickles), so a results file from elsewhere is safe to read:
lines that are not records are skipped and counted in the log.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lipbound.errors import BatchError

log = logging.getLogger("lipbound")

STATUSES = ("ok", "failed")


def is_record(value) -> bool:
    """Whether ``value`` has the two fields resume relies on: a string ``job_id`` and a known ``status``."""
    return isinstance(value, dict) and isinstance(value.get("job_id"), str) and value.get("status") in STATUSES


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON data")


def encode_record(record: dict) -> bytes:
    """One line of JSON (numpy scalars and arrays become numbers and lists)."""
    return (json.dumps(record, separators=(",", ":"), default=_json_default) + "\n").encode()


def _lines(path: Path) -> Iterator[tuple[bytes, dict | None]]:
    """``(raw line, record or None)`` for each complete line; a trailing partial line is not yielded."""
    skipped = 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                log.warning("results %s: ignoring a partial last line (%d bytes) from an interrupted write",
                            path, len(line))
                break
            try:
                value = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                value = None
            if not is_record(value):
                if line.strip():
                    skipped += 1
                value = None
            yield line, value
    if skipped:
        log.warning("results %s: skipped %d line(s) that are not batch records", path, skipped)


def read_records(path: str | Path) -> Iterator[dict]:
    """The records of a results file, in file order (one pass; nothing is kept).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.jsonl"
    >>> _ = path.write_text('{"job_id": "a", "status": "ok"}\\nnot json\\n{"job_id": "b", "sta')
    >>> [r["job_id"] for r in read_records(path)]
    ['a']
    """
    for _, record in _lines(Path(path)):
        if record is not None:
            yield record


def _cut_partial_tail(path: Path) -> None:
    """Truncate the file after its last newline (drops a half-written record)."""
    with open(path, "r+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            size = min(1 << 16, pos)
            fh.seek(pos - size)
            chunk = fh.read(size)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                pos = pos - size + newline + 1
                break
            pos -= size
        if pos < end:
            log.warning("results %s: removing %d bytes of a half-written record", path, end - pos)
            fh.truncate(pos)
            fh.flush()
            os.fsync(fh.fileno())


def _replace_atomically(path: Path, lines: Iterator[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        for line in lines:
            fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepare_resume(path: Path, job_ids: set[str]) -> set[str]:
    """Make ``path`` ready to append to and return the ids of the batch's jobs already done.

    Done means a record with status ``ok``. Failed records of the batch's jobs are removed (by an atomic
    rewrite), so their re-run leaves exactly one record per job; records of other batches are kept as they are.
    """
    _cut_partial_tail(path)
    done: set[str] = set()
    failed: set[str] = set()
    duplicates = 0
    for _, record in _lines(path):
        if record is None or record["job_id"] not in job_ids:
            continue
        if record["status"] == "ok":
            duplicates += record["job_id"] in done
            done.add(record["job_id"])
        else:
            failed.add(record["job_id"])
    if failed or duplicates:
        def kept() -> Iterator[bytes]:
            seen: set[str] = set()
            for line, record in _lines(path):
                if record is not None and record["job_id"] in job_ids:
                    if record["status"] != "ok" or record["job_id"] in seen:
                        continue
                    seen.add(record["job_id"])
                yield line

        log.info("results %s: re-running %d failed job(s)", path, len(failed - done))
        _replace_atomically(path, kept())
    return done


class ResultsWriter:
    """Appends records to a JSON Lines file, one ``write()`` and (by default) one ``fsync`` per record."""

    def __init__(self, path: str | Path, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        data = memoryview(encode_record(record))
        while data:
            written = os.write(self._fd, data)
            data = data[written:]
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_results(path: str | Path, resume: bool, job_ids: set[str], fsync: bool = True
                 ) -> tuple[ResultsWriter, set[str]]:
    """A writer for ``path`` and the ids already done (empty unless ``resume``).

    An existing non-empty file is only appended to with ``resume=True``; otherwise :class:`BatchError`.
    """
    path = Path(path)
    done: set[str] = set()
    if path.exists() and path.stat().st_size > 0:
        if not resume:
            raise BatchError(f"results file {path} exists; pass --resume (resume=True) to continue that batch, or "
                             "choose another --out.")
        done = prepare_resume(path, job_ids)
    return ResultsWriter(path, fsync), done
