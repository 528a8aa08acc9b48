"""lipbound.testing.assert_certified_below: passes within budget, explains failures."""

import numpy as np
import pytest
import torch
from torch import nn

import lipbound
from lipbound.testing import assert_certified_below
from tests.conftest import random_net


def test_within_budget_returns_the_certificate():
    net = lipbound.from_weights([np.diag([3.0, 1.0]), np.eye(2)])
    cert = assert_certified_below(net, 3.0 + 1e-6)
    assert cert.certified and cert.upper_bound == pytest.approx(3.0, abs=1e-6)


def test_module_with_options():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    cert = assert_certified_below(model, 1e3, input_shape=4, method="lipsdp-layer", norm="linf", output_index=1)
    assert (cert.method, cert.norm) == ("lipsdp-layer", "linf")


def test_over_budget_for_real():
    net = lipbound.from_weights([np.diag([3.0, 1.0]), np.eye(2)])
    with pytest.raises(AssertionError) as info:
        assert_certified_below(net, 2.0)
    message = str(info.value)
    for word in ("certified Lipschitz bound 3", "budget 2", "lipsdp-neuron", "solver native", "lower bound 3",
                 "gap", "really exceeds the budget"):
        assert word in message


def test_loose_method_suggests_a_tighter_one():
    net = random_net([4, 8, 8, 2], seed=4)
    product = lipbound.certify(net, method="mp").upper_bound
    tighter = lipbound.certify(net, method="lipsdp-neuron").upper_bound
    assert tighter < product
    budget = (product + tighter) / 2  # above the true constant: any attained lower bound is below it
    with pytest.raises(AssertionError, match="may be within budget") as info:
        assert_certified_below(net, budget, method="mp", attack={"n_starts": 4, "steps": 3})
    assert "(mp, solver closed-form, l2 norm)" in str(info.value)
    with pytest.raises(AssertionError) as info:
        assert_certified_below(net, budget, method="mp", attack=False)
    assert "lower bound" not in str(info.value)


def test_local_region_is_named_and_used():
    net = random_net([3, 6, 2], seed=2)
    ball = lipbound.Ball(np.zeros(3), 0.05)
    local = lipbound.certify(net, domain=ball).upper_bound
    with pytest.raises(AssertionError, match="on a l2 ball"):
        assert_certified_below(net, local * 0.5, domain=ball, attack={"n_starts": 4, "steps": 3})


def test_uncertified_result_fails_with_the_reason(monkeypatch):
    failed = lipbound.Certificate(None, False, 1.0, "lipsdp-neuron", "scs", "l2", "max_iters",
                                  reason="the LMI could not be proved negative semidefinite")
    monkeypatch.setattr(lipbound.testing, "certify", lambda *a, **k: failed)
    with pytest.raises(AssertionError, match="no certified Lipschitz bound .* max_iters; the LMI could not"):
        assert_certified_below(lipbound.from_weights([np.eye(2)]), 10.0)
