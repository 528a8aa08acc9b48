import numpy as np
import pytest
import torch

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_without_cuda_is_an_option_error():
    with pytest.raises(lipbound.errors.OptionError, match="device='cuda' but CUDA is not available"):
        lipbound.lower_bound(lipbound.from_weights([np.eye(2)]), device="cuda")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"device": "tpu"}, "device='tpu'"),
    ({"n_starts": 0}, "n_starts must be an integer >= 1"),
    ({"steps": 2.5}, "steps must be an integer >= 0"),
    ({"power_iters": "3"}, "power_iters"),
    ({"scales": ()}, "scales must be a non-empty sequence of positive numbers"),
    ({"scales": (1.0, -1.0)}, "scales"),
    ({"radius": -0.1, "center": np.zeros(2)}, "radius must be a finite number >= 0"),
    ({"threads": 0}, "threads must be an integer >= 1"),
])
def test_bad_search_parameters_are_named(kwargs, match):
    with pytest.raises(lipbound.errors.OptionError, match=match):
        lipbound.lower_bound(lipbound.from_weights([np.eye(2)]), **kwargs)


def test_progress_callback_and_log(caplog):
    import logging

    seen = []
    with caplog.at_level(logging.INFO, logger="lipbound"):
        lipbound.lower_bound(random_net([3, 5, 2]), n_starts=4, steps=12,
                             progress=lambda d, t, label: seen.append((d, t, label)))
    assert [d for d, _, _ in seen] == list(range(1, 14)) and {t for _, t, _ in seen} == {13}
    assert all(label.startswith("best ") for _, _, label in seen)
    steps = [r.getMessage() for r in caplog.records if "lower bound: step" in r.getMessage()]
    assert [m.split(",")[0] for m in steps] == ["lower bound: step 0/12", "lower bound: step 10/12",
                                                 "lower bound: step 12/12"]
    assert all(m.endswith(" s)") for m in steps)


def test_threads_are_restored():
    before = torch.get_num_threads()
    lipbound.lower_bound(random_net([3, 5, 2]), n_starts=4, steps=2)
    lipbound.lower_bound(random_net([3, 5, 2]), n_starts=4, steps=2, threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_are_searched_in_float64(dtype, caplog):
    import logging

    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)
    net = lipbound.api.as_network(model, input_shape=3)
    with caplog.at_level(logging.INFO, logger="lipbound"):
        lb = lipbound.lower_bound(model, input_shape=3, n_starts=8, steps=5)
    assert lb.dtype == "float64" and lb.to_dict()["dtype"] == "float64"
    assert any(f"the model has {dtype} parameters" in r.getMessage() and "in float64" in r.getMessage()
               for r in caplog.records)
    weights = [m.weight.detach().double().numpy() for m in model if isinstance(m, nn.Linear)]
    assert np.array_equal(net.weights[0], weights[0])  # the exact float64 values of the low-precision weights
    a, b = (torch.from_numpy(p[None]) for p in lb.pair)
    assert float((net(b) - net(a)).norm() / (b - a).norm()) == pytest.approx(lb.pair_value, rel=1e-9)
    assert lb.value >= lb.pair_value > 0
