"""Small model and point files for the batch tests (written to a temporary folder)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_net(path: Path, dims, seed: int = 0, scale: float = 1.0) -> Path:
    """A random ReLU network as ``.npz`` (W0, b0, ...)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for i in range(len(dims) - 1):
        arrays[f"W{i}"] = rng.standard_normal((dims[i + 1], dims[i])) * scale / np.sqrt(dims[i])
        arrays[f"b{i}"] = rng.standard_normal(dims[i + 1]) * 0.1
    np.savez(path, **arrays)
    return path


def write_points(path: Path, n: int, dim: int, seed: int = 0) -> Path:
    np.save(path, np.random.default_rng(seed).uniform(-1, 1, (n, dim)))
    return path


def write_manifest(folder: Path, data: dict, name: str = "batch.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def descendants(pid: int) -> set[int]:
    """Pids of all processes below ``pid`` (from /proc; empty where /proc is missing)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def fake_task(payload: dict) -> dict:
    """Stands in for ``execute_job`` in engine tests: kills its own process for ids starting with ``die``."""
    import time

    if payload["id"].startswith("die"):
        os._exit(3)
    time.sleep(payload.get("sleep", 0.05))
    return {"job_id": payload["id"], "status": "ok", "job": payload.get("job"), "worker": f"pid:{os.getpid()}",
            "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


def fake_payloads(n: int, dying: tuple[int, ...] = (), sleep: float = 0.05) -> list[dict]:
    return [{"id": f"{'die' if i in dying else 'job'}{i:03d}", "job": {"i": i}, "sleep": sleep} for i in range(n)]
