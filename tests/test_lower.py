import numpy as np
import pytest

import lipbound
from tests.conftest import random_net


def test_linear_network_lower_bound_is_exact():
    w = np.random.default_rng(0).standard_normal((4, 6))
    lb = lipbound.lower_bound(lipbound.from_weights([w]), n_starts=4, steps=3)
    assert abs(lb.value - np.linalg.norm(w, 2)) < 1e-9 * np.linalg.norm(w, 2)
    assert np.isclose(np.linalg.norm(lb.direction), 1.0)


def test_witness_pair_reproduces_the_value():
    net = random_net([4, 16, 16, 2], activation="tanh", seed=3)
    lb = lipbound.lower_bound(net, n_starts=16, steps=20)
    assert lb.pair_value > 0 and lb.value >= lb.pair_value
    import torch

    a, b = (torch.from_numpy(p[None]) for p in lb.pair)
    ratio = float((net(b) - net(a)).norm() / (b - a).norm())
    assert ratio == pytest.approx(lb.pair_value, rel=1e-9)
    x = torch.from_numpy(lb.x[None])
    d = torch.from_numpy(lb.direction[None]) * 1e-7
    assert float((net(x + d) - net(x)).norm() / d.norm()) <= lb.value * (1 + 1e-3)


def test_lower_bound_accepts_modules_and_local_balls():
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    lb = lipbound.lower_bound(model, input_shape=3, n_starts=8, steps=5)
    lb_local = lipbound.lower_bound(model, input_shape=3, n_starts=8, steps=5, center=np.zeros(3), radius=0.1)
    assert np.linalg.norm(lb_local.x) <= 0.1 * (1 + 1e-12)
    assert lb.value > 0 and lb_local.value >= 0
