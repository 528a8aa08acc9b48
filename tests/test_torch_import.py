"""Importing real torch models through torch.export: every supported operator reproduces the module exactly,
and what cannot be represented is refused by name."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipbound
import lipbound.nn as lnn
from lipbound import GraphNetwork, NetworkError, UnsupportedLayerError


def _module_lower_bound(model, shape, n=20) -> float:
    """Largest Jacobian spectral norm of the *module itself* at random points (an independent lower bound)."""
    gen = torch.Generator().manual_seed(3)
    dtype = next(model.parameters()).dtype
    best = 0.0
    for _ in range(n):
        x = torch.randn(1, *shape, dtype=dtype, generator=gen)
        jac = torch.autograd.functional.jacobian(lambda z: model(z).reshape(-1), x).reshape(-1, x.numel()).double()
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
    return best


def _assert_same(model, shape, atol=1e-12):
    model = model.double().eval()
    net = lipbound.from_torch(model, input_shape=shape)
    x = torch.randn(6, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).reshape(6, -1)
        got = net(x.reshape(6, -1))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-12, atol=atol)
    return net


class Wrap(nn.Module):
    """A module around a function of its input (for functional calls in ``forward``)."""

    def __init__(self, fn, *mods):
        super().__init__()
        self.fn = fn
        self.mods = nn.ModuleList(mods)

    def forward(self, x):
        return self.fn(x, *self.mods)


LAYERS = {
    "conv1d": (nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(3 * 5, 2)), (2, 9)),
    "conv2d_groups_dilation": (nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), nn.Tanh(),
                                             nn.Conv2d(6, 2, 2, stride=2), nn.Flatten()), (4, 6, 6)),
    "conv2d_same": (nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.ReLU(), nn.Flatten()), (1, 5, 5)),
    "avgpool": (nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1), nn.Flatten()), (2, 7, 7)),
    "avgpool_exclude_pad_ceil": (nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False,
                                                            ceil_mode=True), nn.Flatten()), (1, 6, 6)),
    "avgpool1d": (nn.Sequential(nn.AvgPool1d(2), nn.Flatten()), (3, 8)),
    "adaptive_avgpool": (nn.Sequential(nn.AdaptiveAvgPool2d((2, 3)), nn.Flatten()), (2, 7, 5)),
    "global_mean": (Wrap(lambda x: x.mean(dim=(2, 3))), (3, 4, 4)),
    "maxpool": (nn.Sequential(nn.MaxPool2d(2), nn.Flatten()), (2, 4, 6)),
    "maxpool_overlap_pad": (nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1, dilation=1), nn.Flatten()),
                            (2, 5, 5)),
    "maxpool_ceil": (nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Flatten()), (1, 5, 5)),
    "maxpool1d": (nn.Sequential(nn.MaxPool1d(3, stride=1), nn.Flatten()), (2, 6)),
    "batchnorm2d": (nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten()), (1, 5, 5)),
    "batchnorm1d": (nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)), (4,)),
    "flatten_view_permute": (Wrap(lambda x, fc: fc(x.permute(0, 2, 1).reshape(x.shape[0], -1)), nn.Linear(12, 3)),
                             (3, 4)),
    "add_sub_scale": (Wrap(lambda x, a, b: 0.5 * a(x) - b(x) + 3.0 * torch.relu(a(x)) / 7.0, nn.Linear(4, 4),
                           nn.Linear(4, 4)), (4,)),
    "concat_slice": (Wrap(lambda x, a: torch.cat([torch.relu(a(x))[:, 1:3], x[:, ::2], a(x)], dim=1),
                          nn.Linear(4, 5)), (4,)),
    "concat_channels": (Wrap(lambda x, c: torch.cat([F.relu(c(x)), x], dim=1).flatten(1), nn.Conv2d(2, 2, 1)),
                        (2, 3, 3)),
    "split_chunk": (Wrap(lambda x: torch.chunk(x, 2, dim=1)[1] - x.split([1, 3], dim=1)[1][:, :2]), (4,)),
    "pad": (Wrap(lambda x: F.pad(x, (1, 2), value=0.5)), (3,)),
    "functional_activations": (Wrap(lambda x, a: F.silu(F.elu(F.leaky_relu(a(x), 0.1), 0.5)) + F.gelu(F.tanh(x))
                                    + F.mish(x) + F.softplus(x, beta=2.0, threshold=60.0) + F.sigmoid(x),
                                    nn.Linear(3, 3)), (3,)),
    "gelu_tanh": (nn.Sequential(nn.Linear(3, 3), nn.GELU(approximate="tanh")), (3,)),
    "dropout_identity": (nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Identity(), nn.Linear(3, 1)), (3,)),
    "groupsort": (nn.Sequential(nn.Linear(4, 6), lnn.GroupSort(3), nn.Linear(6, 2)), (4,)),
    "maxmin_channels": (nn.Sequential(nn.Conv2d(1, 4, 3), lnn.MaxMin(), nn.Flatten()), (1, 4, 4)),
    "householder": (nn.Sequential(nn.Linear(3, 4), lnn.Householder([[1.0, 2.0], [-1.0, 0.5]]), nn.Linear(4, 1)),
                    (3,)),
    "householder_shared_conv": (nn.Sequential(nn.Conv2d(1, 4, 2), lnn.Householder([0.3, -1.0]), nn.Flatten()),
                                (1, 3, 3)),
    "torch_max_min": (Wrap(lambda x: torch.cat([torch.maximum(x[:, :2], x[:, 2:]), x.max(dim=1, keepdim=True)[0],
                                                 x.amin(dim=1, keepdim=True)], dim=1)), (4,)),
    "sort_dim": (Wrap(lambda x: torch.sort(x, dim=1).values.flatten(1)), (3, 2)),
    "clamp_relu": (Wrap(lambda x: torch.clamp(x, min=0) + x.clamp_min(0.0)), (3,)),
}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_operator_imports_exactly(case):
    torch.manual_seed(0)
    model, shape = LAYERS[case]
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    _assert_same(model, shape)


def test_bare_linear_and_chain_reduction():
    lin = nn.Linear(5, 3)
    net = lipbound.from_torch(lin)
    assert isinstance(net, lipbound.Network) and net.dims == (5, 3)
    cert = lipbound.certify(lin, input_shape=5, method="lipsdp-neuron")
    exact = float(np.linalg.norm(lin.weight.detach().double().numpy(), 2))
    assert cert.certified and exact <= cert.upper_bound <= exact * (1 + 1e-6)
    # flatten, a permutation before a Linear and a power-of-two gain keep a chain
    model = Wrap(lambda x, a, b: b(F.leaky_relu(2.0 * a(torch.flatten(x, 1)), 0.01)), nn.Linear(6, 4),
                 nn.Linear(4, 2))
    net = _assert_same(model, (2, 3))
    assert isinstance(net, lipbound.Network)


def test_unsupported_nodes_all_named_with_hints():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            h = self.norm(self.fc(x))
            return torch.softmax(h * torch.sigmoid(h), dim=1)

    with pytest.raises(UnsupportedLayerError) as info:
        lipbound.from_torch(Bad(), input_shape=4)
    kinds = " ".join(k for _, k in info.value.nodes)
    assert "layer_norm" in kinds and "softmax" in kinds and "product of two input-dependent" in kinds
    assert "LayerNorm" in str(info.value) and "logits" in str(info.value)


def test_data_dependent_control_flow_refused():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(UnsupportedLayerError, match="untraceable|control flow"):
        lipbound.from_torch(Branchy(), input_shape=3)


def test_overridden_forward_is_what_gets_certified():
    """Regression (issue 10): a MaxMin subclass returning 3 * MaxMin(x) was certified as plain MaxMin."""
    class Triple(lnn.MaxMin):
        def forward(self, x):
            return 3 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Triple(), nn.Linear(4, 2)).double()
    net = lipbound.from_torch(model, input_shape=4)
    cert = lipbound.certify(net, method="lipsdp-nsr")
    assert cert.certified and cert.upper_bound >= _module_lower_bound(model, (4,))
    plain = lipbound.certify(nn.Sequential(model[0], lnn.MaxMin(), model[2]), input_shape=4, method="lipsdp-nsr")
    assert cert.upper_bound == pytest.approx(3 * plain.upper_bound, rel=1e-6)


def test_hooks_are_refused_by_name_or_traced_on_request():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    handle = model[0].register_forward_hook(lambda m, i, o: 5 * o)
    pre = model[2].register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    with pytest.raises(UnsupportedLayerError) as info:
        lipbound.from_torch(model, input_shape=3)
    assert [n for n, _ in info.value.nodes] == ["0", "2"] and "allow_hooks" in str(info.value)
    net = lipbound.from_torch(model, input_shape=3, allow_hooks=True)
    cert = lipbound.certify(net, method="lipsdp-neuron")
    assert cert.upper_bound >= _module_lower_bound(model, (3,))
    handle.remove()
    pre.remove()
    plain = lipbound.certify(model, input_shape=3, method="lipsdp-neuron")
    assert cert.upper_bound == pytest.approx(10 * plain.upper_bound, rel=1e-6)  # relu(5 z) = 5 relu(z), times 2
    global_handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(UnsupportedLayerError, match="global"):
            lipbound.from_torch(model, input_shape=3)
    finally:
        global_handle.remove()


def test_parametrized_and_legacy_spectral_norm_weights_are_read_as_computed():
    torch.manual_seed(0)
    a = nn.utils.parametrizations.spectral_norm(nn.Linear(5, 4))
    b = nn.utils.spectral_norm(nn.Linear(4, 3))  # legacy pre-hook version
    model = nn.Sequential(a, nn.ReLU(), b)
    model.train()
    for _ in range(5):
        model(torch.randn(8, 5))  # power iterations update u, v
    model.eval()
    with torch.no_grad():
        w_a = a.weight.detach().double().numpy()
        w_b = b.weight.detach().double().numpy()
    net = lipbound.from_torch(model, input_shape=5)
    np.testing.assert_allclose(net.weights[0], w_a, rtol=1e-6)
    np.testing.assert_allclose(net.weights[1], w_b, rtol=1e-6)
    cert = lipbound.certify(net, method="mp")
    assert cert.upper_bound <= 1.0 + 1e-3  # spectrally normalised layers


def test_training_mode_warns_and_certifies_eval_function():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 1))
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        net = lipbound.from_torch(model, input_shape=3)
    assert net.dims == (3, 3, 1)
    assert model.training  # the caller's module is left as it was


def test_active_dropout_in_forward_is_refused():
    model = Wrap(lambda x, a: F.dropout(a(x), 0.5, training=True), nn.Linear(3, 3))
    with pytest.raises(UnsupportedLayerError, match="dropout"):
        lipbound.from_torch(model, input_shape=3)


def test_low_precision_models_import():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(torch.bfloat16)
    net = lipbound.from_torch(model, input_shape=4)
    np.testing.assert_array_equal(net.weights[0], model[0].weight.detach().double().numpy())
    assert lipbound.certify(net).certified


def test_torchscript_refused_with_export_hint(tmp_path):
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UnsupportedLayerError, match="torch.export"):
        lipbound.from_torch(scripted, input_shape=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(scripted, tmp_path / "m.pt")
    with pytest.raises(UnsupportedLayerError, match="TorchScript"):
        lipbound.load(tmp_path / "m.pt")


def test_mismatch_with_module_is_an_error(monkeypatch):
    from lipbound.importers import aten

    original = aten.AtenTranslator._op_relu if hasattr(aten.AtenTranslator, "_op_relu") else None
    assert original is None  # relu goes through the generic activation table

    def wrong(self, node, a):
        return self._activation(a["self"], lipbound.ActivationSpec("tanh"), node)
    monkeypatch.setattr(aten.AtenTranslator, "_op_relu", wrong, raising=False)
    with pytest.raises(NetworkError, match="does not reproduce"):
        lipbound.from_torch(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)), input_shape=3)


def test_input_shape_errors_are_specific():
    with pytest.raises(NetworkError, match="expects 4"):
        lipbound.from_torch(nn.Sequential(nn.Linear(4, 2)), input_shape=5)
    with pytest.raises(NetworkError, match="input_shape"):
        lipbound.from_torch(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_state_dict_pt2_and_safetensors_files(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    ref = lipbound.from_torch(model, input_shape=3)
    for name in ("sd.pth", "ckpt.pt"):
        net = lipbound.load(tmp_path / name, activation="tanh")
        np.testing.assert_array_equal(net.weights[1], ref.weights[1])
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "m.safetensors")
    assert lipbound.load(tmp_path / "m.safetensors", activation="tanh").dims == (3, 5, 2)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    torch.save(cnn.state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(NetworkError, match="load_state_dict"):
        lipbound.load(tmp_path / "cnn.pt")
    program = torch.export.export(cnn.eval(), (torch.randn(2, 1, 4, 4),))
    torch.export.save(program, tmp_path / "cnn.pt2")
    net = lipbound.load(tmp_path / "cnn.pt2")
    assert isinstance(net, GraphNetwork)
    x = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        np.testing.assert_allclose(net(x.double().reshape(3, -1)).numpy(), cnn(x).double().numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_corrupt_files_give_specific_errors(tmp_path):
    (tmp_path / "text.pt").write_text("not a torch file")
    (tmp_path / "empty.mat").write_bytes(b"")
    (tmp_path / "text.npz").write_text("nope")
    (tmp_path / "text.pt2").write_text("nope")
    for name, what in (("text.pt", "torch file"), ("empty.mat", ".mat"), ("text.npz", ".npz"),
                       ("text.pt2", "torch.export")):
        with pytest.raises(NetworkError, match=what):
            lipbound.load(tmp_path / name)


def test_npz_with_a_gap_in_the_layer_numbering_is_refused(tmp_path):
    np.savez(tmp_path / "gap.npz", W0=np.ones((3, 2)), W2=np.ones((1, 3)))
    with pytest.raises(NetworkError, match="missing W1"):
        lipbound.load(tmp_path / "gap.npz")


def test_deel_torchlip_networks_trained_and_exported_give_the_same_bound():
    tl = pytest.importorskip("deel.torchlip", reason="deel-torchlip is not installed (pip install 'lipbound[deel]')")
    torch.manual_seed(0)
    mlp = tl.Sequential(tl.SpectralLinear(8, 16), tl.GroupSort2(), tl.SpectralLinear(16, 16), tl.FullSort(),
                        tl.FrobeniusLinear(16, 1))
    cnn = tl.Sequential(tl.SpectralConv2d(1, 4, 3, padding=1), tl.GroupSort2(), tl.ScaledAvgPool2d(2),
                        tl.SpectralConv2d(4, 4, 3, padding=1), tl.MaxMin(), nn.Flatten(),
                        tl.SpectralLinear(8 * 3 * 3, 3))
    for model, shape in ((mlp, (8,)), (cnn, (1, 6, 6))):
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trained = lipbound.from_torch(model, input_shape=shape)
            exported = lipbound.from_torch(model.vanilla_export(), input_shape=shape)
        a = lipbound.certify(trained, method="lipsdp-nsr")
        b = lipbound.certify(exported, method="lipsdp-nsr")
        assert a.certified and a.upper_bound == pytest.approx(b.upper_bound, rel=1e-9)
        lower = _module_lower_bound(model, shape)
        # 1-Lipschitz by construction (up to the float32 rounding of the normalised weights)
        assert lower <= a.upper_bound <= 1.0 + 1e-6


def test_spectrally_normalised_mnist_style_models_with_gains():
    """The shape of published trained MNIST MLPs/CNNs: spectral-norm parametrised layers times constant gains,
    LeakyReLU(0.01), torch.flatten, AdaptiveAvgPool2d (all refused before the graph importer)."""
    sn = nn.utils.parametrizations.spectral_norm

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = sn(nn.Conv2d(1, 4, 3, padding=1)), sn(nn.Conv2d(4, 4, 3, stride=2, padding=1))
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = sn(nn.Linear(16, 10))

        def forward(self, x):
            h = F.leaky_relu(2.0 * self.c1(x), 0.01)
            h = F.leaky_relu(2.0 * self.c2(h), 0.01)
            return 2.0 * self.fc(torch.flatten(self.pool(h), 1))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = sn(nn.Linear(16, 12)), sn(nn.Linear(12, 10))

        def forward(self, x):
            return self.b(F.leaky_relu(2.0 * self.a(torch.flatten(x, 1)), 0.01))

    torch.manual_seed(0)
    for model, shape in ((CNN(), (1, 8, 8)), (MLP(), (1, 4, 4))):
        model.train()
        for _ in range(3):
            model(torch.randn(4, *shape))
        model.eval()
        net = lipbound.from_torch(model, input_shape=shape)
        cert = lipbound.certify(net, method="lipsdp-neuron")
        mp = lipbound.certify(net, method="mp")
        lower = _module_lower_bound(model, shape)
        assert cert.certified and lower <= cert.upper_bound <= mp.upper_bound * (1 + 1e-9)
        if isinstance(model, MLP):  # spectral_norm normalises a Linear's matrix (a conv's reshaped kernel only)
            assert mp.upper_bound <= 2.0 * (1 + 1e-3)
