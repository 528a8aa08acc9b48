import json

import numpy as np
import scipy.io

from lipbound.cli import main


def write_mat(path, weights):
    cell = np.empty((1, len(weights)), dtype=object)
    for i, w in enumerate(weights):
        cell[0, i] = w
    scipy.io.savemat(path, {"weights": cell})


def test_certify_all_methods_writes_json(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_mat(tmp_path / "net.mat", [rng.standard_normal((5, 3)), rng.standard_normal((2, 5))])
    out = tmp_path / "out.json"
    code = main(["certify", str(tmp_path / "net.mat"), "--method", "all", "--lower-bound", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "lipsdp-neuron" in printed and "lower bound" in printed
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["mp", "lipsdp-layer", "lipsdp-neuron"]
    for r in records:
        assert set(r) >= {"method", "solver", "norm", "upper_bound", "certified", "solver_bound", "lower_bound",
                          "time_s"}
        assert r["certified"] and r["upper_bound"] >= r["lower_bound"]


def test_certify_single_method_json_is_an_object(tmp_path):
    write_mat(tmp_path / "n.mat", [np.eye(2), np.eye(2)])
    out = tmp_path / "o.json"
    assert main(["certify", str(tmp_path / "n.mat"), "--activation", "tanh", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["method"] == "lipsdp-neuron" and abs(record["upper_bound"] - 1.0) < 1e-6


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["certify", str(tmp_path / "missing.mat")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_demo_runs(capsys):
    assert main(["demo", "--epochs", "30"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "lipsdp-neuron" in out and "NOT CERTIFIED" not in out
