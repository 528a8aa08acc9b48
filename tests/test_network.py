import numpy as np
import pytest
import torch

import lipbound
from lipbound import ActivationSpec, Affine, Network, NetworkError, SlopeRestricted


def test_from_layers_inserts_exact_identities():
    net = Network.from_layers([Affine(np.ones((3, 2))), Affine(np.ones((1, 3)))])
    assert net.dims == (2, 3, 1)
    assert net.activations[0].activation.name == "identity"
    assert np.all(net.activations[0].alpha == 1) and np.all(net.activations[0].beta == 1)
    net2 = Network.from_layers([SlopeRestricted(ActivationSpec("relu"), 2), Affine(np.ones((1, 2)))])
    assert net2.dims == (2, 2, 1)


def test_forward_matches_definition():
    rng = np.random.default_rng(0)
    w0, w1 = rng.standard_normal((4, 3)), rng.standard_normal((2, 4))
    b0, b1 = rng.standard_normal(4), rng.standard_normal(2)
    net = lipbound.from_weights([w0, w1], "tanh", [b0, b1])
    x = rng.standard_normal((5, 3))
    expected = np.tanh(x @ w0.T + b0) @ w1.T + b1
    np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (np.array([[np.nan, 1.0]]), "NaN or inf"),
    (np.array([[np.inf, 1.0]]), "NaN or inf"),
    (np.ones(3), "2-D"),
])
def test_bad_weights_raise(bad, match):
    with pytest.raises(NetworkError, match=match):
        lipbound.from_weights([bad])


def test_shape_mismatch_names_the_layer():
    with pytest.raises(NetworkError, match="shape mismatch at layer 2 \\('linear_1'\\)"):
        lipbound.from_weights([np.ones((3, 2)), np.ones((1, 4))])


def test_empty_network_raises():
    with pytest.raises(NetworkError, match="empty"):
        lipbound.from_weights([])
    with pytest.raises(NetworkError, match="empty"):
        Network(())


def test_bias_shape_and_slopes_validated():
    with pytest.raises(NetworkError, match="bias of layer"):
        Affine(np.ones((3, 2)), np.ones(2), name="fc")
    with pytest.raises(NetworkError, match="alpha > beta"):
        SlopeRestricted(ActivationSpec("relu"), 2, alpha=[0, 2], beta=[1, 1])


def test_unknown_activation_and_parameters():
    with pytest.raises(NetworkError, match="unknown activation 'swish2'"):
        ActivationSpec("swish2")
    with pytest.raises(NetworkError, match="takes parameters"):
        ActivationSpec("relu", {"slope": 1})


def test_weights_are_immutable_copies():
    w = np.ones((2, 2))
    net = lipbound.from_weights([w])
    w[0, 0] = 5.0
    assert net.weights[0][0, 0] == 1.0
    with pytest.raises(ValueError):
        net.weights[0][0, 0] = 3.0


def test_softplus_forward_does_not_overflow():
    # log(1 + exp(beta x)) / beta is finite for every finite x; torch's own form gave inf for beta x > 709.
    net = lipbound.from_weights([np.eye(1) * 1e300, np.eye(1)], "softplus")
    assert float(net(torch.tensor([[1.0]], dtype=torch.float64))) == 1e300
    spec = ActivationSpec("softplus", {"beta": 2.0})
    x = torch.tensor([-1e4, -3.0, 0.0, 3.0, 400.0, 1e4], dtype=torch.float64)
    expected = torch.tensor([0.0, np.log1p(np.exp(-6.0)) / 2, np.log(2.0) / 2, 3 + np.log1p(np.exp(-6.0)) / 2,
                             400.0, 1e4], dtype=torch.float64)
    torch.testing.assert_close(spec.torch(x), expected, rtol=1e-15, atol=0.0)
    flipped = ActivationSpec("softplus", {"beta": -2.0})  # log(1 + exp(-2x)) / -2 = -softplus_2(-x)
    torch.testing.assert_close(flipped.torch(x), -spec.torch(-x), rtol=1e-15, atol=0.0)
