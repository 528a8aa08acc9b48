import numpy as np
import pytest
import scipy.io
import torch
from torch import nn

import lipbound
from lipbound import NetworkError, UnsupportedLayerError
from tests.conftest import shared_file

ALL_ACTIVATIONS = [nn.ReLU(), nn.LeakyReLU(0.2), nn.Tanh(), nn.Sigmoid(), nn.ELU(0.5), nn.Softplus(threshold=100),
                   nn.GELU(), nn.SiLU(), nn.Mish()]


@pytest.mark.parametrize("act", ALL_ACTIVATIONS, ids=lambda a: type(a).__name__)
def test_from_torch_matches_module(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), act, nn.Dropout(0.3), nn.Linear(5, 4), nn.Identity(),
                          act, nn.Linear(4, 2)).double()
    net = lipbound.from_torch(model, input_shape=(2, 3))
    assert net.dims == (6, 5, 4, 2)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(net(x.reshape(7, 6)).numpy(), model.eval()(x).numpy(), rtol=1e-12, atol=1e-12)


def test_functional_forward_and_consecutive_linears():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(self.a(x))))

    net = lipbound.from_torch(Net(), input_shape=3)
    assert [a.activation.name for a in net.activations] == ["identity", "relu"]


def test_unsupported_layers_are_all_listed():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 4), nn.Hardtanh(),
                          nn.Linear(4, 1))
    with pytest.raises(UnsupportedLayerError) as info:
        lipbound.from_torch(model, input_shape=4)
    names = [n.split(":")[0] for n, _ in info.value.nodes]
    assert names == ["1", "4"]
    assert "layer_norm" in str(info.value) and "hardtanh" in str(info.value)
    assert "LayerNorm" in str(info.value)  # the hint


def test_skip_connection_is_a_graph():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return x + torch.relu(self.fc(x))

    model = Skip().double()
    net = lipbound.from_torch(model, input_shape=3)
    assert isinstance(net, lipbound.GraphNetwork)
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), model(x).numpy(), rtol=1e-12, atol=1e-12)


def test_input_shape_checked():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(NetworkError, match="expects 4"):
        lipbound.from_torch(model, input_shape=5)
    net = lipbound.from_torch(nn.Sequential(nn.ReLU()), input_shape=5)
    assert 1.0 <= lipbound.certify(net, method="mp").upper_bound <= 1.0 + 1e-8


def test_small_softplus_threshold_rejected():
    with pytest.raises(UnsupportedLayerError, match="threshold"):
        lipbound.from_torch(nn.Sequential(nn.Linear(2, 2), nn.Softplus(), nn.Linear(2, 1)), input_shape=2)


def test_from_weights_numpy_and_torch_and_activation_params():
    w = [np.ones((3, 2)), torch.ones(1, 3)]
    net = lipbound.from_weights(w, "leaky_relu", negative_slope=0.25)
    assert net.activations[0].alpha[0] == 0.25 and net.activations[0].beta[0] == 1.0
    with pytest.raises(NetworkError, match="biases"):
        lipbound.from_weights(w, biases=[np.zeros(3)])


def test_load_mat_npz_pt(tmp_path):
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((4, 3)), rng.standard_normal((2, 4))]
    cell = np.empty((1, 2), dtype=object)
    cell[0, 0], cell[0, 1] = ws
    scipy.io.savemat(tmp_path / "n.mat", {"weights": cell})
    np.savez(tmp_path / "n.npz", W0=ws[0], W1=ws[1], b0=np.ones(4), b1=np.zeros(2))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    torch.save(model, tmp_path / "n.pt")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    net_mat = lipbound.load(tmp_path / "n.mat", activation="tanh")
    np.testing.assert_array_equal(net_mat.weights[1], ws[1])
    assert net_mat.activations[0].activation.name == "tanh"
    net_npz = lipbound.load(tmp_path / "n.npz")
    np.testing.assert_array_equal(net_npz.affines[0].bias, np.ones(4))
    with pytest.raises(NetworkError, match="trust_code=True"):
        lipbound.load(tmp_path / "n.pt")
    net_pt = lipbound.load(tmp_path / "n.pt", trust_code=True)
    assert net_pt.dims == (3, 4, 2)
    net_sd = lipbound.load(tmp_path / "sd.pt", activation="tanh")
    np.testing.assert_array_equal(net_sd.weights[0], net_pt.weights[0])
    with pytest.raises(NetworkError, match="unsupported file type"):
        (tmp_path / "n.txt").write_text("x")
        lipbound.load(tmp_path / "n.txt")
    with pytest.raises(FileNotFoundError):
        lipbound.load(tmp_path / "missing.mat")
    scipy.io.savemat(tmp_path / "bad.mat", {"other": np.ones(2)})
    with pytest.raises(NetworkError, match="no 'weights' or 'W'"):
        lipbound.load(tmp_path / "bad.mat")


def test_load_shared_lipsdp_file():
    net = lipbound.load(shared_file("lipsdp/random_weights.mat"))
    assert net.dims == (2, 10, 30, 20, 2)
