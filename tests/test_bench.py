import json

import numpy as np
import pytest

from lipbound import bench
from lipbound.bench import NetSpec, run_isolated, run_suite, suite


def test_suites_and_their_filters():
    labels = [s.label for s in suite("random", [20])]
    assert labels == ["784-20-20-10"]
    assert "784-500-200-50-10" in [s.label for s in suite("random")]
    deep = suite("deep", [20])
    assert deep and all(s.nonneg and s.dims[0] == 4 and s.dims[-1] == 1 for s in deep)
    with pytest.raises(ValueError, match="unknown suite"):
        suite("nope")


def test_unknown_network_label_is_an_error_not_an_empty_run(tmp_path):
    with pytest.raises(ValueError, match="no network"):
        run_suite("random", tmp_path, solvers=["mp"], networks=["784-1-1-10"])


def test_run_isolated_records_bound_time_and_memory():
    spec = NetSpec("tiny", "random", dims=(5, 4, 3), seed=0)
    rec = run_isolated(spec, "lipsdp-neuron", "native", timeout=300)
    assert rec["status"] == "optimal" and rec["certified"]
    assert rec["time_s"] > 0 and rec["peak_rss_mb"] > 0
    net = spec.build()
    assert rec["upper_bound"] <= np.prod([np.linalg.norm(w, 2) for w in net.weights]) * (1 + 1e-9)
    plain = run_isolated(spec, "lipsdp-neuron", "native", timeout=300, reduce_input=False)
    assert plain["reduce_input"] is False and "(unreduced)" in bench._line(plain)
    assert abs(plain["upper_bound"] - rec["upper_bound"]) <= 1e-7 * rec["upper_bound"]


def test_run_suite_writes_json_and_plot(tmp_path, monkeypatch):
    specs = [NetSpec("4-3x2-1", "random", dims=(4, 3, 3, 1), seed=1, nonneg=True)]
    monkeypatch.setattr(bench, "suite", lambda name, sizes=None: specs)
    records = run_suite("deep", tmp_path, solvers=["mp", "native"], progress=lambda line: None)
    assert {(r["method"], r["solver_requested"]) for r in records} == {("mp", "auto"), ("lipsdp-neuron", "native")}
    saved = json.loads((tmp_path / "deep.json").read_text())
    assert len(saved) == 2 and (tmp_path / "deep.png").stat().st_size > 0
    for r in saved:
        assert r["upper_bound"] >= r["exact"] * (1 - 1e-12)
