"""Tests of theory/qc.py: every exact check passes, the counterexamples are what they claim, and a float
sampling cross-check of the QCs against lipbound's own torch modules."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from lipbound.nn.groupsort import GroupSort, Householder, MaxMin
from theory import qc

REPO_ROOT = Path(__file__).resolve().parents[1]

EXPECTED_KINDS = {
    "groupsort_qc_size2": "proof",
    "groupsort_qc_size3": "exact case analysis",
    "groupsort_qc_size4": "exact case analysis",
    "householder_qc_dim2": "proof",
    "householder_qc_dim3": "proof",
    "qc_block_diagonal_split": "proof",
    "maxmin_not_slope_restricted": "proof",
    "lipsdp_network_qc_invalid": "proof",
    "relu_neuron_qc_valid": "proof",
    "qc_rigorous_sampling": "rigorous sampling",
}


@pytest.mark.parametrize("name", list(qc.CHECKS))
def test_theory_check_passes(name):
    result = qc.CHECKS[name]()
    assert result.passed, result.details
    assert result.name == name
    assert result.kind == EXPECTED_KINDS[name]
    assert result.line().startswith("PASS  " + name)


def test_every_check_has_an_expected_kind():
    assert set(qc.CHECKS) == set(EXPECTED_KINDS)


def test_groupsort_case_counts():
    assert qc.check_groupsort_qc(3).data["cases"] == 36


# ------------------------------------------------------------------------------------------------------------
# Counterexamples, re-evaluated independently of theory/qc.py's own helpers.
# ------------------------------------------------------------------------------------------------------------


def test_lipsdp_network_counterexample_values():
    result = qc.check_lipsdp_network_qc_invalid()
    assert result.data["notes_example"] == Fraction(-54509, 500000)
    assert result.data["integer_example"] == Fraction(-2)
    for x, y in qc.LIPSDP_NETWORK_COUNTEREXAMPLES.values():
        # T = (e1 - e2)(e1 - e2)^T, alpha = 0, beta = 1: form = 2 d (e - d), d = dphi1 - dphi2, e = dx1 - dx2.
        dphi = [max(a, 0) - max(b, 0) for a, b in zip(x, y, strict=True)]
        d = dphi[0] - dphi[1]
        e = (x[0] - y[0]) - (x[1] - y[1])
        assert 2 * d * (e - d) < 0


def test_lipsdp_network_notes_example_is_close_to_the_float_one():
    x, y = qc.LIPSDP_NETWORK_COUNTEREXAMPLES["notes_example"]
    assert [float(c) for c in x] == [-0.736, -0.163]
    assert [float(c) for c in y] == [-0.482, 0.599]


def test_maxmin_counterexample_with_the_torch_module():
    x, y = qc.MAXMIN_SLOPE_COUNTEREXAMPLE
    module = MaxMin()
    xt = torch.tensor([[float(c) for c in x]], dtype=torch.float64)
    yt = torch.tensor([[float(c) for c in y]], dtype=torch.float64)
    dx = (xt - yt)[0].numpy()
    dphi = (module(xt) - module(yt))[0].numpy()
    # Integer data: float64 arithmetic is exact here.
    for t1, t2 in [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (1e-6, 3.0), (0.25, 0.5)]:
        t = np.diag([t1, t2])
        form = 2 * dx @ t @ dphi - 2 * dphi @ t @ dphi
        assert form == -6.0 * (t1 + t2) < 0
    assert qc.check_maxmin_not_slope_restricted().data["form_coefficients"] == (Fraction(-6), Fraction(-6))


def test_qc_form_exact_rejects_mismatched_lengths():
    ones = [[Fraction(1)] * 2 for _ in range(2)]
    with pytest.raises(ValueError, match="groups cover 2 features"):
        qc.qc_form_exact([Fraction(1)] * 3, [Fraction(1)] * 3, [ones], [(Fraction(1),) * 4])


# ------------------------------------------------------------------------------------------------------------
# Float sampling cross-check of the QC with random multipliers, using the torch modules.
# ------------------------------------------------------------------------------------------------------------


def _sample_inputs(rng: np.random.Generator, samples: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((samples, n)) * rng.choice([0.01, 1.0, 100.0], size=(samples, 1))
    y = x + rng.standard_normal((samples, n)) * rng.choice([1e-3, 0.1, 1.0, 10.0], size=(samples, 1))
    # A third of the samples on a small integer grid, so ties inside a group (sort boundaries) occur often.
    grid = slice(0, samples // 3)
    x[grid] = rng.integers(-3, 4, size=(samples // 3, n))
    y[grid] = rng.integers(-3, 4, size=(samples // 3, n))
    return x, y


def _qc_ratios(module: torch.nn.Module, pis: np.ndarray, x: np.ndarray, y: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """QC form / |dx|^2 per sample, with fresh random multipliers (lam >= 0, gam, tau, nu free) per sample,
    divided by the rounding scale ``1 + (|x| + |y|) / |dx|``.

    The float error of ``dphi`` is about ``eps (|x| + |y|)``, so the error of form / |dx|^2 grows like
    ``(|x| + |y|) / |dx|``; normalising by it lets one absolute tolerance cover all input scales.
    """
    samples, n = x.shape
    num_groups, g, _ = pis.shape
    with torch.no_grad():
        dphi = (module(torch.from_numpy(x)) - module(torch.from_numpy(y))).numpy()
    dx = x - y
    lam = rng.uniform(0.0, 2.0, (samples, num_groups, 1, 1))
    gam, tau, nu = (rng.standard_normal((samples, num_groups, 1, 1)) * 3.0 for _ in range(3))
    eye = np.eye(g)
    t = lam * eye + gam * pis
    s, p = tau * pis, nu * pis
    dxg, dpg = dx.reshape(samples, num_groups, g), dphi.reshape(samples, num_groups, g)

    def bilinear(u, m, w):
        return np.einsum("bja,bjac,bjc->b", u, m, w)

    form = bilinear(dxg, t - 2 * s, dxg) + 2 * bilinear(dxg, s + p, dpg) - bilinear(dpg, t + 2 * p, dpg)
    norm2 = np.einsum("bi,bi->b", dx, dx)
    keep = norm2 > 0
    scale = 1.0 + (np.linalg.norm(x, axis=1) + np.linalg.norm(y, axis=1))[keep] / np.sqrt(norm2[keep])
    return form[keep] / norm2[keep] / scale


def _ones_pis(num_groups: int, g: int) -> np.ndarray:
    return np.ones((num_groups, g, g))


@pytest.mark.parametrize(
    "label, module_factory, num_groups, g",
    [
        ("MaxMin n=8", lambda rng: MaxMin(), 4, 2),
        ("GroupSort4 n=8", lambda rng: GroupSort(4), 2, 4),
        ("FullSort n=8", lambda rng: GroupSort(None), 1, 8),
    ],
)
def test_groupsort_qc_float_sampling(label, module_factory, num_groups, g):
    rng = np.random.default_rng(sum(map(ord, label)))
    x, y = _sample_inputs(rng, 20000, num_groups * g)
    ratios = _qc_ratios(module_factory(rng), _ones_pis(num_groups, g), x, y, rng)
    assert ratios.size > 19000  # dx = 0 samples are dropped; nearly all must remain
    assert ratios.min() >= -1e-11, f"{label}: min normalised QC/|dx|^2 = {ratios.min()}"


def test_householder_qc_float_sampling():
    rng = np.random.default_rng(11)
    num_groups, g = 3, 3
    vectors = rng.standard_normal((num_groups, g))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    module = Householder(vectors)
    x, y = _sample_inputs(rng, 20000, num_groups * g)
    # Project a quarter of the x's onto the reflection boundaries v_j^T x_j = 0 (up to rounding), where the
    # branch of the activation switches.
    boundary = slice(5000, 10000)
    xg = x[boundary].reshape(-1, num_groups, g)
    xg -= np.einsum("bj,ja->bja", np.einsum("bja,ja->bj", xg, vectors), vectors)
    x[boundary] = xg.reshape(-1, num_groups * g)
    pis = np.eye(g) - vectors[:, :, None] * vectors[:, None, :]
    ratios = _qc_ratios(module, pis, x, y, rng)
    assert ratios.min() >= -1e-11, f"min normalised QC/|dx|^2 = {ratios.min()}"


def test_float_sampler_detects_invalid_constraints():
    """The sampler has teeth: it finds the violations that theory/qc.py proves exist."""
    rng = np.random.default_rng(12)
    x, y = _sample_inputs(rng, 20000, 2)
    with torch.no_grad():
        dphi = (MaxMin()(torch.from_numpy(x)) - MaxMin()(torch.from_numpy(y))).numpy()
    dx = x - y
    t = rng.uniform(0.0, 1.0, (20000, 2))
    slope_form = 2 * np.sum(t * dx * dphi, axis=1) - 2 * np.sum(t * dphi * dphi, axis=1)
    assert np.mean(slope_form < -1e-9) > 0.05
    # Coupled LipSDP-Network multiplier on ReLU: form = 2 d (e - d).
    relu_dphi = np.maximum(x, 0) - np.maximum(y, 0)
    d = relu_dphi[:, 0] - relu_dphi[:, 1]
    e = dx[:, 0] - dx[:, 1]
    assert np.mean(2 * d * (e - d) < -1e-9) > 0.01


# ------------------------------------------------------------------------------------------------------------
# Command-line driver.
# ------------------------------------------------------------------------------------------------------------


def test_module_runs_as_script_and_prints_pass_lines():
    completed = subprocess.run([sys.executable, "-m", "theory.qc"], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=False, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == len(qc.CHECKS) + 1
    assert all(line.startswith("PASS  ") for line in lines[:-1])
    assert lines[-1] == f"{len(qc.CHECKS)}/{len(qc.CHECKS)} checks passed"


def test_main_reports_failures(monkeypatch, capsys):
    failing = qc.CheckResult(name="always_fails", passed=False, kind="proof", details="deliberate")
    monkeypatch.setattr(qc, "CHECKS", {"relu_neuron_qc_valid": qc.check_relu_neuron_qc_valid,
                                       "always_fails": lambda: failing})
    assert qc.main() == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PASS  relu_neuron_qc_valid  [proof]")
    assert out[1] == "FAIL  always_fails  [proof]  deliberate"
    assert out[2] == "1/2 checks passed"
