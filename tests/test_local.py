"""Local (region) certificates: activation bounds -> per-neuron slopes -> LipSDP."""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipbound
from lipbound import Ball, Box
from lipbound.cli import main
from tests.conftest import random_net


def sampled_in_domain(net, domain, seed, n=1500):
    g = torch.Generator().manual_seed(seed)
    if isinstance(domain, Box):
        lo, hi = torch.from_numpy(np.array(domain.lower)), torch.from_numpy(np.array(domain.upper))
        x = lo + (hi - lo) * torch.rand(n, lo.numel(), generator=g, dtype=torch.float64)
        y = lo + (hi - lo) * torch.rand(n, lo.numel(), generator=g, dtype=torch.float64)
    else:
        c = torch.from_numpy(np.array(domain.center))
        d = torch.randn(n, c.numel(), generator=g, dtype=torch.float64)
        e = torch.randn(n, c.numel(), generator=g, dtype=torch.float64)
        if domain.norm == "l2":
            x = c + domain.radius * d / d.norm(dim=1, keepdim=True) * torch.rand(n, 1, generator=g, dtype=torch.float64)
            y = c + domain.radius * e / e.norm(dim=1, keepdim=True) * torch.rand(n, 1, generator=g, dtype=torch.float64)
        else:
            x = c + domain.radius * (2 * torch.rand(n, c.numel(), generator=g, dtype=torch.float64) - 1)
            y = c + domain.radius * (2 * torch.rand(n, c.numel(), generator=g, dtype=torch.float64) - 1)
    with torch.no_grad():
        fx, fy = net(x), net(y)
        num = (fx - fy).norm(dim=1) - 1e-12 * (1 + fx.norm(dim=1) + fy.norm(dim=1))
    return float((num / (x - y).norm(dim=1)).max())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(act=st.sampled_from(["relu", "tanh", "gelu", "gelu_tanh", "leaky_relu", "softplus"]),
       seed=st.integers(0, 10_000), radius=st.sampled_from([0.01, 0.1, 1.0]),
       kind=st.sampled_from(["l2", "linf", "box"]))
def test_local_bound_between_local_lower_bound_and_global_bound(act, seed, radius, kind):
    net = random_net([4, 8, 8, 2], activation=act, seed=seed, scale=1.5)
    center = np.random.default_rng(seed).standard_normal(4)
    domain = Box(center - radius, center + radius) if kind == "box" else Ball(center, radius, kind)
    glob = lipbound.certify(net)
    loc = lipbound.certify(net, domain=domain)
    assert loc.certified and lipbound.verify_certificate(loc, net).valid
    assert loc.upper_bound <= glob.upper_bound * (1 + 1e-6)
    lb = lipbound.lower_bound(net, domain=domain, n_starts=16, steps=10, seed=seed)
    assert loc.upper_bound >= max(lb.value, sampled_in_domain(net, domain, seed)) * (1 - 1e-9)


def test_stably_active_relu_region_is_linear():
    rng = np.random.default_rng(0)
    w0 = np.abs(rng.standard_normal((5, 3)))
    w1 = rng.standard_normal((2, 5))
    net = lipbound.from_weights([w0, w1], "relu", biases=[np.full(5, 10.0), np.zeros(2)])
    cert = lipbound.certify(net, domain=Ball(np.ones(3), 0.5))
    exact = np.linalg.norm(w1 @ w0, 2)
    assert exact <= cert.upper_bound <= exact * (1 + 1e-6)
    assert lipbound.stable_neurons(lipbound.activation_bounds(net, Ball(np.ones(3), 0.5)))["relu_1"] == (0, 5, 5)


def test_polyrelu_is_only_bounded_locally():
    rng = np.random.default_rng(2)
    ws = [rng.standard_normal((6, 3)) / 2, rng.standard_normal((2, 6)) / 2]
    net = lipbound.from_weights(ws, "polyrelu", coefficients=(0.0, 1 / 3, 1 / 3, 1 / 3))
    with pytest.raises(lipbound.LipboundError, match="domain"):
        lipbound.certify(net)
    with pytest.raises(lipbound.NetworkError, match="no global slope bound"):
        lipbound.certify(net, method="mp")
    domain = Ball(np.zeros(3), 0.5)
    cert = lipbound.certify(net, domain=domain)
    assert cert.certified and cert.upper_bound >= sampled_in_domain(net, domain, 0)
    bigger = lipbound.certify(net, domain=Ball(np.zeros(3), 2.0))
    assert bigger.upper_bound >= cert.upper_bound


def test_certificate_stores_the_region(tmp_path):
    net = random_net([3, 5, 2], seed=4)
    cert = lipbound.certify(net, domain=Ball(np.zeros(3), 0.3))
    saved = lipbound.Certificate.from_json(cert.to_json())
    assert saved.options["domain"] == {"type": "ball", "center": [0.0, 0.0, 0.0], "radius": 0.3, "norm": "l2"}
    assert lipbound.verify_certificate(saved, net).valid


def test_cli_local_certificate_and_bounds(tmp_path, capsys):
    import scipy.io

    rng = np.random.default_rng(0)
    cell = np.empty((1, 2), dtype=object)
    cell[0, 0], cell[0, 1] = rng.standard_normal((6, 3)), rng.standard_normal((2, 6))
    scipy.io.savemat(tmp_path / "n.mat", {"weights": cell})
    np.save(tmp_path / "x.npy", np.zeros(3))
    out = tmp_path / "o.json"
    assert main(["certify", str(tmp_path / "n.mat"), "--center", str(tmp_path / "x.npy"), "--radius", "0.1",
                 "--lower-bound", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["certified"] and record["upper_bound"] >= record["lower_bound"]
    assert main(["bounds", str(tmp_path / "n.mat"), "--center", str(tmp_path / "x.npy"), "--radius", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "inactive" in printed and "relu_1" in printed
    assert main(["certify", str(tmp_path / "n.mat"), "--radius", "0.1"]) == 1
