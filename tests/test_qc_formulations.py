"""GroupSort/MaxMin/Householder formulations (LipSDP-NSR, RR), l-infinity, residual and implicit models."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group

import lipbound
from lipbound import Affine, Network
from lipbound.activations import ActivationSpec
from lipbound.network import GroupSortLayer, HouseholderLayer, ResidualBlock, SlopeRestricted
from tests.conftest import FORMULATION_CASES, formulation_problem, implicit_net, shared_file

I2 = np.eye(2)


def certify(net, method="lipsdp-nsr", **kw):
    kw.setdefault("solver", "clarabel")
    cert = lipbound.certify(net, method=method, **kw)
    assert cert.certified, cert.reason
    assert lipbound.verify_certificate(cert, net).valid
    return cert


def test_one_maxmin_layer_nsr_is_1_and_rr_is_sqrt2():
    net = lipbound.from_weights([I2, I2], "maxmin")
    assert certify(net).upper_bound == pytest.approx(1.0, abs=1e-6)
    assert certify(net, coupled=True).upper_bound == pytest.approx(1.0, abs=1e-6)
    assert certify(net, method="lipsdp-rr").upper_bound == pytest.approx(np.sqrt(2), abs=1e-6)
    assert certify(net).upper_bound >= 1.0 and certify(net, method="lipsdp-rr").upper_bound >= np.sqrt(2)


def test_residual_maxmin_closed_forms():
    plus = lipbound.from_weights([I2, I2, I2], "maxmin", architecture="residual")
    assert isinstance(plus.layers[1], ResidualBlock)
    assert certify(plus).upper_bound == pytest.approx(2.0, abs=1e-6)
    zero = lipbound.from_weights([I2, 0 * I2, I2], "maxmin", architecture="residual")
    assert certify(zero).upper_bound == pytest.approx(1.0, abs=1e-6)


def orthogonal_net(kind, width=8, depth=3, seed=0):
    rng = np.random.default_rng(seed)
    layers = []
    for k in range(depth):
        layers.append(Affine(ortho_group.rvs(width, random_state=rng), name=f"q{k}"))
        if k < depth - 1:
            if kind == "householder":
                layers.append(HouseholderLayer(rng.standard_normal((width // 2, 2))))
            else:
                layers.append(GroupSortLayer(width, {"maxmin": 2, "groupsort4": 4, "fullsort": width}[kind]))
    return Network(tuple(layers))


@pytest.mark.parametrize("kind", ["maxmin", "groupsort4", "fullsort", "householder"])
def test_orthogonal_gnp_networks_have_bound_one(kind):
    net = orthogonal_net(kind)
    cert = certify(net)
    assert 1.0 - 1e-9 <= cert.upper_bound <= 1.0 + 1e-6
    lb = lipbound.lower_bound(net, n_starts=8, steps=5)
    assert lb.value == pytest.approx(1.0, abs=1e-6)


def test_nsr_on_slope_nets_equals_lipsdp_neuron():
    rng = np.random.default_rng(1)
    net = lipbound.from_weights([rng.standard_normal((6, 4)), rng.standard_normal((6, 6)), rng.standard_normal((2, 6))],
                                "tanh")
    a, b = certify(net, "lipsdp-neuron"), certify(net, "lipsdp-nsr")
    assert a.upper_bound == pytest.approx(b.upper_bound, rel=1e-6)
    with pytest.raises(lipbound.FormulationError, match="lipsdp-nsr"):
        lipbound.certify(orthogonal_net("maxmin"), method="lipsdp-neuron")


def random_mixed_net(seed, kinds, width, depth, n_in, n_out, scale):
    rng = np.random.default_rng(seed)
    layers, d = [], n_in
    for k in range(depth):
        layers.append(Affine(rng.standard_normal((width, d)) * scale / np.sqrt(d), rng.standard_normal(width) * 0.1))
        kind = kinds[k % len(kinds)]
        if kind == "maxmin":
            layers.append(GroupSortLayer(width, 2))
        elif kind == "fullsort":
            layers.append(GroupSortLayer(width, width))
        elif kind == "householder":
            layers.append(HouseholderLayer(rng.standard_normal((width // 2, 2))))
        else:
            layers.append(SlopeRestricted(ActivationSpec(kind), width))
        d = width
    layers.append(Affine(rng.standard_normal((n_out, d)) * scale / np.sqrt(d)))
    return Network(tuple(layers))


def sampled_l2(net, seed, n=1500):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.input_dim, generator=g, dtype=torch.float64) * 2
    d = torch.randn(n, net.input_dim, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 1, (n, 1),
                                                                                                 generator=g)
    with torch.no_grad():
        fa, fb = net(x + d), net(x)
        num = (fa - fb).norm(dim=1) - 1e-12 * (1 + fa.norm(dim=1) + fb.norm(dim=1) + x.norm(dim=1))
    return float((num / d.norm(dim=1)).max())


def sampled_linf(net, index, seed, n=1500):
    """max ||grad f_index||_1 at random points (a lower bound on the l-inf -> |.| constant) and random pairs."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, net.input_dim, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    grad = torch.autograd.grad(net(x)[:, index].sum(), x)[0]
    d = torch.sign(grad) * 1e-3
    with torch.no_grad():
        diff = (net(x + d)[:, index] - net(x)[:, index]).abs() - 1e-12 * (1 + net(x).abs().sum(1))
        pair = float((diff / d.abs().amax(1)).max())
    return max(float(grad.abs().sum(1).max()) * (1 - 1e-9), pair)


KIND_SETS = [["maxmin"], ["fullsort"], ["householder"], ["maxmin", "relu"], ["householder", "tanh"],
             ["maxmin", "householder"]]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.sampled_from(KIND_SETS), depth=st.integers(1, 3), n_in=st.integers(1, 5), n_out=st.integers(1, 3),
       seed=st.integers(0, 10_000), coupled=st.booleans())
def test_nsr_l2_soundness(kinds, depth, n_in, n_out, seed, coupled):
    net = random_mixed_net(seed, kinds, 4, depth, n_in, n_out, 1.5)
    cert = certify(net, coupled=coupled)
    lb = lipbound.lower_bound(net, n_starts=12, steps=6, power_iters=8, seed=seed)
    assert cert.upper_bound >= max(lb.value, sampled_l2(net, seed)) * (1 - 1e-9)
    assert lipbound.certify(net, method="mp").upper_bound >= cert.upper_bound * (1 - 1e-6)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.sampled_from(KIND_SETS), depth=st.integers(1, 2), seed=st.integers(0, 10_000))
def test_nsr_linf_soundness(kinds, depth, seed):
    net = random_mixed_net(seed, kinds, 4, depth, 3, 2, 1.5)
    cert = certify(net, norm="linf", output_index=1)
    assert cert.upper_bound >= sampled_linf(net, 1, seed)
    mp = lipbound.certify(net, method="mp", norm="linf", output_index=1)
    assert mp.upper_bound >= sampled_linf(net, 1, seed)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_blocks=st.integers(1, 3), act=st.sampled_from(["maxmin", "relu", "tanh"]))
def test_residual_soundness_and_rr(seed, n_blocks, act):
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((4, 3))] + [rng.standard_normal((4, 4)) * 0.7 for _ in range(n_blocks)] + \
         [rng.standard_normal((2, 4))]
    net = lipbound.from_weights(ws, act, architecture="residual")
    cert = certify(net)
    assert cert.upper_bound >= sampled_l2(net, seed) * (1 - 1e-9)
    assert cert.upper_bound >= lipbound.lower_bound(net, n_starts=12, steps=6, seed=seed).value * (1 - 1e-9)
    assert cert.upper_bound <= lipbound.certify(net, method="mp").upper_bound * (1 + 1e-6)
    coupled = certify(net, coupled=True)
    assert coupled.upper_bound <= cert.upper_bound * (1 + 1e-6)
    assert coupled.upper_bound >= sampled_l2(net, seed) * (1 - 1e-9)
    if act == "maxmin":
        rr = certify(net, method="lipsdp-rr")
        assert rr.upper_bound >= lipbound.lower_bound(net, n_starts=12, steps=6, seed=seed).value * (1 - 1e-9)


@pytest.mark.parametrize("act", ["tanh", "relu", "maxmin"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_implicit_layers(act, seed):
    net = implicit_net(seed, act=act)
    x = torch.randn(5, 3, dtype=torch.float64)
    z = net.layers[1].forward(x)
    np.testing.assert_allclose(z.numpy(), net.layers[1].activation.forward(z @ torch.from_numpy(
        np.array(net.layers[1].weight)).T + x @ torch.from_numpy(np.array(net.layers[1].input_weight)).T
        + torch.from_numpy(np.array(net.layers[1].bias))).numpy(), atol=1e-10)
    cert = certify(net)
    assert any("well-posedness" in note for note in cert.notes)
    assert cert.upper_bound >= sampled_l2(net, seed) * (1 - 1e-9)
    assert cert.upper_bound <= lipbound.certify(net, method="mp").upper_bound * (1 + 1e-6)


def test_coupled_never_looser_than_decoupled():
    net = random_mixed_net(3, ["maxmin"], 6, 3, 4, 2, 2.0)
    dec, cou = certify(net), certify(net, coupled=True)
    assert cou.upper_bound <= dec.upper_bound * (1 + 1e-6)


def test_torch_modules_import_with_their_semantics():
    from torch import nn

    from lipbound.nn import GroupSort, Householder, MaxMin

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), MaxMin(), nn.Linear(6, 6), GroupSort(3), nn.Linear(6, 4),
                          Householder([1.0, 2.0], num_features=4), nn.Linear(4, 2)).double()
    net = lipbound.from_torch(model, input_shape=3)
    assert [type(a).__name__ for a in net.activations] == ["GroupSortLayer", "GroupSortLayer", "HouseholderLayer"]
    x = torch.randn(10, 3, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), model(x).numpy(), atol=1e-12)
    cert = certify(net)
    assert cert.upper_bound >= lipbound.lower_bound(net, n_starts=16, steps=10).value


def test_paper_2fc_nets_nsr_below_mp():
    for w in (16, 32):
        net = lipbound.load(shared_file(f"qcs_maxmin/weights_l2_2fc_{w}.mat"), activation="maxmin")
        nsr = certify(net, solver="native")
        assert nsr.upper_bound <= lipbound.certify(net, method="mp").upper_bound
        assert certify(net, solver="native", coupled=True).upper_bound <= nsr.upper_bound * (1 + 1e-6)


def test_paper_18fc_32_values():
    net = lipbound.load(shared_file("qcs_maxmin/weights_l2_18fc_32.mat"), activation="maxmin")
    assert lipbound.certify(net, method="mp").upper_bound == pytest.approx(73405, rel=1e-3)
    nsr = certify(net, solver="native")
    assert nsr.upper_bound == pytest.approx(17432, rel=1e-3)


def test_paper_resweights_5_32_beats_the_authors_formulation():
    net = lipbound.load(shared_file("qcs_maxmin/resweights_5_32.mat"), activation="maxmin", architecture="residual")
    assert net.dims == (784, 32, 32, 32, 10)
    cert = certify(net, solver="native")
    assert cert.upper_bound <= 33.04
    assert cert.upper_bound >= lipbound.lower_bound(net, n_starts=16, steps=10).value


def test_deel_torchlip_modules_keep_their_semantics():
    torchlip = pytest.importorskip("deel.torchlip", reason="deel-torchlip is not installed (optional)")
    from torch import nn

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), torchlip.GroupSort2(), nn.Linear(4, 4), torchlip.MaxMin(),
                          nn.Linear(8, 6), torchlip.HouseHolder(6, theta_initializer="normal"),
                          nn.Linear(6, 2)).double()
    net = lipbound.from_torch(model, input_shape=3)
    x = torch.randn(50, 3, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), model(x).numpy(), atol=1e-12)
    cert = certify(net)
    assert cert.upper_bound >= lipbound.lower_bound(net, n_starts=16, steps=10).value


def _reference_assembly(lmi, y):
    """Every product added densely, then the lower triangle mirrored (the definition of the assembled LMI)."""
    off = lmi.offsets
    m = np.zeros((lmi.size, lmi.size))
    for t in lmi.terms:
        block = t.product(t.diagonal_values(y))
        rs, cs = slice(off[t.row], off[t.row + 1]), slice(off[t.col], off[t.col + 1])
        m[rs, cs] += block
        if t.row != t.col or t.mirror:
            m[cs, rs] += block.T
    return np.tril(m) + np.tril(m, -1).T


@pytest.mark.parametrize("case", FORMULATION_CASES)
def test_lmi_assembly_is_exactly_symmetric_and_matches_the_dense_definition(case):
    rng = np.random.default_rng(0)
    problem = formulation_problem(case, 0)
    for program in (problem.program, problem.solve_program):
        for lmi in program.lmis:
            y = rng.standard_normal(program.n_vars)
            m = lmi.assemble(y)
            assert np.array_equal(m, m.T)
            assert np.array_equal(m, _reference_assembly(lmi, y))


def test_rr_names_a_maxmin_inside_an_implicit_layer():
    from lipbound.network import ImplicitLayer

    rng = np.random.default_rng(0)
    net = Network.from_layers([Affine(rng.standard_normal((4, 3))),
                               ImplicitLayer(0.05 * rng.standard_normal((4, 4)), rng.standard_normal((4, 4)),
                                             GroupSortLayer(4, 2), np.zeros(4), name="eq"),
                               Affine(rng.standard_normal((2, 4)))])
    with pytest.raises(lipbound.FormulationError, match="inside an implicit layer"):
        lipbound.certify(net, method="lipsdp-rr")
