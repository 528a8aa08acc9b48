"""The command line: exit codes (0 certified, 1 bad input, 2 not certified), messages naming the culprit,
-v on either side of the subcommand, progress, --version, ``python -m lipbound``, ``--method all``."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import lipbound
from lipbound.certificate import Certificate
from lipbound.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_mat(path, weights):
    cell = np.empty((1, len(weights)), dtype=object)
    for i, w in enumerate(weights):
        cell[0, i] = w
    scipy.io.savemat(path, {"weights": cell})
    return str(path)


@pytest.fixture
def relu_mat(tmp_path):
    rng = np.random.default_rng(0)
    return write_mat(tmp_path / "net.mat", [rng.standard_normal((5, 3)), rng.standard_normal((2, 5))])


def test_certify_all_methods_writes_json(relu_mat, tmp_path, capsys):
    out = tmp_path / "out.json"
    code = main(["certify", relu_mat, "--method", "all", "--lower-bound", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "lipsdp-neuron" in printed and "lower bound" in printed
    assert "skipped lipsdp-channel: same program as lipsdp-neuron" in printed
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == list(lipbound.METHODS)
    ran = [r for r in records if r["status"] != "skipped"]
    assert [r["method"] for r in ran] == ["mp", "lipsdp-layer", "lipsdp-neuron", "lipsdp-nsr", "lipsdp-rr"]
    for r in ran:
        assert set(r) >= {"method", "solver", "norm", "upper_bound", "certified", "solver_bound", "lower_bound",
                          "time_s"}
        assert r["certified"] and r["upper_bound"] >= r["lower_bound"]
    for r in records:
        if r["method"] == "lipsdp-channel":
            assert r["status"] == "skipped" and not r["certified"]
            assert "lipsdp-neuron" in r["reason"]


def test_method_all_on_a_maxmin_net_runs_nsr_and_rr(tmp_path, capsys):
    path = write_mat(tmp_path / "mm.mat", [np.eye(2), np.eye(2)])
    out = tmp_path / "mm.json"
    assert main(["certify", path, "--activation", "maxmin", "--method", "all", "--json", str(out)]) == 0
    records = {r["method"]: r for r in json.loads(out.read_text())}
    assert records["lipsdp-nsr"]["certified"] and records["lipsdp-rr"]["certified"]
    assert records["lipsdp-nsr"]["upper_bound"] == pytest.approx(1.0, abs=1e-6)
    for m in ("lipsdp-layer", "lipsdp-neuron"):
        assert records[m]["status"] == "skipped" and "slope-restricted" in records[m]["reason"]
    assert "skipped lipsdp-layer: needs slope-restricted activations" in capsys.readouterr().out
    assert main(["certify", path, "--activation", "maxmin", "--method", "all", "--coupled"]) == 0


def test_certify_single_method_json_is_an_object(tmp_path):
    path = write_mat(tmp_path / "n.mat", [np.eye(2), np.eye(2)])
    out = tmp_path / "o.json"
    assert main(["certify", path, "--activation", "tanh", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["method"] == "lipsdp-neuron" and abs(record["upper_bound"] - 1.0) < 1e-6


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["certify", str(tmp_path / "missing.mat")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_not_certified_exits_2(relu_mat, monkeypatch, capsys):
    failed = Certificate(None, False, 1.0, "lipsdp-neuron", "native", "l2", "max_iter", reason="LMI not proved")
    monkeypatch.setattr("lipbound.cli.certify_all", lambda *a, **k: [failed])
    assert main(["certify", relu_mat]) == 2
    assert "NOT CERTIFIED" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "culprit"), [
    (["--norm", "l2", "--output-index", "1"], "--output-index 1 applies to --norm linf only"),
    (["--output-index", "0"], "--output-index 0 applies to --norm linf only"),
    (["--coupled"], "--coupled applies to --method lipsdp-nsr"),
    (["--method", "mp", "--coupled"], "--coupled applies to --method lipsdp-nsr"),
    (["--solver", "bogus"], "unknown solver 'bogus'"),
    (["--method", "bogus"], "argument --method: invalid choice: 'bogus'"),
    (["--radius", "0.1"], "--radius needs --center"),
    (["--radius", "-1", "--center", "x.npy"], "argument --radius: expected a finite number >= 0, got '-1'"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
])
def test_bad_certify_options_exit_1_naming_the_culprit(relu_mat, argv, culprit, capsys):
    assert main(["certify", relu_mat, *argv]) == 1
    captured = capsys.readouterr()
    assert culprit in captured.err and "Traceback" not in captured.err
    assert "NOT CERTIFIED" not in captured.out


def test_usage_errors_exit_1(capsys):
    assert main([]) == 1
    assert "usage: lipbound" in capsys.readouterr().err
    assert main(["nosuchcommand"]) == 1


def test_center_files(relu_mat, tmp_path, capsys):
    text = tmp_path / "x.txt"
    text.write_text("0.1, -0.2\n0.3\n")
    assert main(["certify", relu_mat, "--center", str(text), "--radius", "0.1"]) == 0
    assert "local bounds on the l2 ball of radius 0.1" in capsys.readouterr().out
    np.save(tmp_path / "x.npy", np.array([0.1, -0.2, 0.3]))
    assert main(["certify", relu_mat, "--center", str(tmp_path / "x.npy"), "--radius", "0.1"]) == 0
    capsys.readouterr()

    np.save(tmp_path / "short.npy", np.zeros(2))
    assert main(["certify", relu_mat, "--center", str(tmp_path / "short.npy"), "--radius", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "short.npy" in err and "has 2 numbers, but the network takes 3 inputs" in err

    words = tmp_path / "words.txt"
    words.write_text("this is not a vector")
    assert main(["certify", relu_mat, "--center", str(words), "--radius", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "words.txt" in err and "3 numbers" in err

    fake = tmp_path / "fake.npy"
    fake.write_text("0.1 0.2 0.3")
    assert main(["certify", relu_mat, "--center", str(fake), "--radius", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "fake.npy: not a readable .npy file" in err

    assert main(["certify", relu_mat, "--center", str(tmp_path / "none.npy"), "--radius", "0.1"]) == 1
    assert "none.npy: no such file" in capsys.readouterr().err
    assert main(["bounds", relu_mat, "--center", str(tmp_path / "short.npy"), "--radius", "0.1"]) == 1
    assert "takes 3 inputs" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "culprit"), [
    (["--sizes", "abc"], "argument --sizes: expected comma-separated positive integers"),
    (["--sizes", "20,-3"], "argument --sizes"),
    (["--solvers", "bogus"], "--solvers: unknown name(s) bogus"),
    (["--solvers", "native,bogus2"], "bogus2"),
    (["--timeout", "0"], "argument --timeout: expected a number > 0"),
    (["--device", "gpu"], "--device='gpu' is not a torch device"),
    (["--networks", "no-such-net"], "has no network(s) no-such-net"),
])
def test_bad_bench_arguments_exit_1(tmp_path, argv, culprit, capsys):
    assert main(["bench", "random", "--out", str(tmp_path), *argv]) == 1
    assert culprit in capsys.readouterr().err
    assert not (tmp_path / "random.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_bench_cuda_without_cuda_exits_1(tmp_path, capsys):
    assert main(["bench", "random", "--out", str(tmp_path), "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_bench_with_nothing_selected_exits_1(tmp_path, capsys):
    # The qc suite keeps networks whose label contains "_<size>"; no QC network has a 999999 in its name.
    assert main(["bench", "qc", "--out", str(tmp_path), "--sizes", "999999"]) == 1
    assert "nothing to run" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_on_either_side_shows_each_progress_line_once(relu_mat, where, capsys):
    argv = ["certify", relu_mat, "--lower-bound"]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "native it" not in captured.out  # the library never prints
    lines = captured.err.splitlines()
    assert sum("native it   0 " in line for line in lines) == 1
    for stage in ("lipsdp-neuron: formulating", "rigorous check of its answer", "lipsdp-neuron: certified",
                  "lower bound: step 0/60", "lower bound: step 60/60"):
        assert sum(stage in line for line in lines) == 1, stage
    stamped = [line for line in lines if line.startswith("[") and "s] " in line]
    assert len(stamped) == len(lines) and len(lines) > 5  # every line carries the elapsed seconds


def test_quiet_without_verbose(relu_mat, capsys):
    assert main(["certify", relu_mat]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "native it" not in captured.out


def test_progress_bars_on_a_terminal(relu_mat, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["certify", relu_mat, "--method", "all", "--lower-bound"]) == 0
    shown = terminal.getvalue()
    assert "certify" in shown and "lipsdp-neuron" in shown and "method" in shown
    assert "lower bound" in shown and "step" in shown and "best" in shown


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lipbound {lipbound.__version__}"
    assert main(["certify", "--help"]) == 0
    assert "-v, --verbose" in capsys.readouterr().out


def test_python_dash_m_lipbound():
    run = subprocess.run([sys.executable, "-m", "lipbound", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == f"lipbound {lipbound.__version__}"


def test_demo_runs(capsys):
    assert main(["demo", "--epochs", "30"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "lipsdp-neuron" in out and "NOT CERTIFIED" not in out
    assert all(m in out for m in ("mp ", "lipsdp-layer ", "lipsdp-nsr ", "lipsdp-rr "))
    assert "skipped lipsdp-channel" in out
