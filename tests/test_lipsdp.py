"""LipSDP formulations: published values, closed forms, soundness, solver agreement."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipbound
from lipbound import FormulationError, SolverError
from lipbound.formulations import lipsdp
from tests.conftest import random_net, shared_file

SOUNDNESS_ACTIVATIONS = [
    ("relu", {}), ("leaky_relu", {"negative_slope": 0.1}), ("leaky_relu", {"negative_slope": -0.5}),
    ("tanh", {}), ("sigmoid", {}), ("elu", {"alpha": 0.7}), ("elu", {"alpha": 2.0}), ("softplus", {}),
    ("identity", {}), ("gelu", {}), ("gelu_tanh", {}), ("silu", {}), ("mish", {}),
]


def product_norm(weights):
    p = weights[0]
    for w in weights[1:]:
        p = w @ p
    return np.linalg.norm(p, 2)


@pytest.mark.parametrize("method, published", [("lipsdp-neuron", 36.482), ("lipsdp-layer", 39.839)])
@pytest.mark.parametrize("solver", ["clarabel", "scs", "native"])
def test_published_lipsdp_values(method, published, solver):
    path = shared_file("lipsdp/random_weights.mat")
    cert = lipbound.certify(path, method=method, solver=solver)
    assert cert.certified
    assert abs(cert.upper_bound - published) / published < 1e-3
    assert cert.upper_bound >= cert.solver_bound * (1 - 1e-6)


@pytest.mark.parametrize("method", ["mp", "lipsdp-layer", "lipsdp-neuron"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 2)])
def test_single_linear_layer_is_exact(method, shape):
    w = np.random.default_rng(sum(shape)).standard_normal(shape)
    cert = lipbound.certify(lipbound.from_weights([w]), method=method)
    s = np.linalg.norm(w, 2)
    assert cert.certified and s <= cert.upper_bound <= s * (1 + 1e-6)


@pytest.mark.parametrize("dims", [[3, 4, 2], [5, 6, 6, 3], [2, 8, 8, 8, 1]])
def test_identity_activation_nets_are_exact(dims):
    net = random_net(dims, activation="identity", seed=len(dims))
    cert = lipbound.certify(net, method="lipsdp-neuron", solver="clarabel")
    exact = product_norm(net.weights)
    assert cert.certified and exact <= cert.upper_bound <= exact * (1 + 1e-5)


@pytest.mark.parametrize("dims", [[3, 5, 2], [4, 10, 10, 3], [6, 12, 12, 12, 2], [20, 30, 30, 5]])
def test_nonnegative_relu_nets_are_exact(dims):
    rng = np.random.default_rng(len(dims))
    weights = [np.abs(rng.standard_normal((dims[i + 1], dims[i]))) for i in range(len(dims) - 1)]
    net = lipbound.from_weights(weights, "relu")
    cert = lipbound.certify(net, method="lipsdp-neuron", solver="clarabel")
    exact = product_norm(weights)
    assert cert.certified and exact <= cert.upper_bound <= exact * (1 + 1e-5)


def sampled_ratio(net, n=2000, seed=0):
    """Largest ||f(x+d) - f(x)|| / ||d|| over random pairs, minus its own rounding error (so it is a lower bound)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.input_dim, generator=g, dtype=torch.float64) * 2
    d = torch.randn(n, net.input_dim, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-4, 1, (n, 1),
                                                                                                 generator=g)
    with torch.no_grad():
        fa, fb = net(x + d), net(x)
        rounding = 1e-12 * (1 + fa.norm(dim=1) + fb.norm(dim=1) + x.norm(dim=1))
        r = ((fa - fb).norm(dim=1) - rounding) / d.norm(dim=1)
    return float(r.max())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(act=st.sampled_from(SOUNDNESS_ACTIVATIONS), dims=st.lists(st.integers(1, 6), min_size=3, max_size=5),
       seed=st.integers(0, 10_000), form=st.sampled_from(["neuron", "layer"]))
def test_certified_bound_dominates_attack_and_sampling(act, dims, seed, form):
    name, params = act
    net = random_net(dims, activation=name, seed=seed, scale=1.5, **params)
    cert = lipbound.certify(net, method=f"lipsdp-{form}", solver="clarabel")
    assert cert.certified
    lb = lipbound.lower_bound(net, n_starts=12, steps=8, power_iters=10, seed=seed)
    assert cert.upper_bound >= lb.value * (1 - 1e-9)
    assert cert.upper_bound >= sampled_ratio(net, seed=seed) * (1 - 1e-9)
    mp = lipbound.certify(net, method="mp")
    assert mp.upper_bound >= lb.value * (1 - 1e-9)
    assert cert.upper_bound <= mp.upper_bound * (1 + 1e-6)  # a certified LipSDP bound never exceeds MP


@pytest.mark.parametrize("solver", ["clarabel", "scs", "native"])
def test_solvers_agree(solver):
    net = random_net([6, 10, 10, 3], seed=5)
    ref = lipbound.certify(net, method="lipsdp-neuron", solver="clarabel")
    cert = lipbound.certify(net, method="lipsdp-neuron", solver=solver)
    assert cert.certified and abs(cert.upper_bound - ref.upper_bound) / ref.upper_bound < 1e-4


def test_neuron_at_most_layer_at_most_mp():
    net = random_net([8, 12, 12, 4], seed=11)
    b = {m: lipbound.certify(net, method=m).upper_bound for m in ("mp", "lipsdp-layer", "lipsdp-neuron")}
    assert b["lipsdp-neuron"] <= b["lipsdp-layer"] * (1 + 1e-6) <= b["mp"] * (1 + 2e-6)


def test_qr_reduction_and_scaling_do_not_change_the_bound():
    net = random_net([40, 6, 6, 2], seed=2, scale=4.0)
    full = lipsdp(net, reduce_input=False)
    reduced = lipsdp(net)
    assert reduced.solve_program.lmis[0].size == 6 + 6 + 6 < full.solve_program.lmis[0].size
    a = lipbound.certify(net, solver="clarabel")
    unscaled = lipsdp(net, exponents=(0, 0, 0, 0), reduce_input=False)
    from lipbound.certificate import certify_multipliers
    from lipbound.solvers import get_solver

    res = get_solver("clarabel").solve(unscaled.solve_program)
    report, _, _ = certify_multipliers(unscaled.program, res.y)
    assert abs(report.bound - a.upper_bound) / a.upper_bound < 1e-5


def test_certify_can_hand_the_solver_the_unreduced_program():
    net = random_net([40, 6, 6, 2], seed=2, scale=4.0)
    reduced = lipbound.certify(net, solver="native")
    full = lipbound.certify(net, solver="native", reduce_input=False)
    assert full.sizes["solve_lmi_sizes"] == full.sizes["lmi_sizes"] != reduced.sizes["solve_lmi_sizes"]
    assert full.options["reduce_input"] is False and full.certified
    assert abs(full.upper_bound - reduced.upper_bound) <= 1e-7 * reduced.upper_bound


def test_chain_lmi_has_a_block_tridiagonal_pattern():
    net = random_net([5, 4, 4, 4, 4, 2], seed=0)
    pattern = lipsdp(net).program.lmis[0].pattern
    nb = len(pattern.sizes)
    expected = np.abs(np.subtract.outer(np.arange(nb), np.arange(nb))) <= 1
    assert np.array_equal(pattern.adjacency, expected)


def test_deep_nonnegative_chain_is_certified_tightly():
    # 30 blocks: the certificate's Rump shift uses the block-tridiagonal structure (dense constants would cost
    # about 10x more slack: 4e-8 instead of 4e-9 relative).
    rng = np.random.default_rng(7)
    dims = [4] + [10] * 30 + [1]
    weights = [np.abs(rng.standard_normal((dims[i + 1], dims[i]))) / np.sqrt(dims[i]) for i in range(len(dims) - 1)]
    cert = lipbound.certify(lipbound.from_weights(weights, "relu"), solver="native")
    exact = product_norm(weights)
    assert cert.certified and exact <= cert.upper_bound <= exact * (1 + 1e-8)


def test_leaky_relu_uses_its_slope_range():
    net = random_net([4, 6, 3], activation="leaky_relu", negative_slope=1.0, seed=3)  # exactly linear
    cert = lipbound.certify(net)
    exact = product_norm(net.weights)
    assert exact <= cert.upper_bound <= exact * (1 + 1e-5)


def test_bad_method_norm_solver():
    net = random_net([2, 3, 1])
    with pytest.raises(FormulationError, match="unknown method"):
        lipbound.certify(net, method="lipsdp-network")
    with pytest.raises(FormulationError, match="unknown norm 'l1'"):
        lipbound.certify(net, norm="l1")
    with pytest.raises(FormulationError, match="output_index"):
        lipbound.certify(random_net([2, 3, 2]), norm="linf")
    with pytest.raises(SolverError, match="unknown solver"):
        lipbound.certify(net, solver="gurobi")


def test_mosek_without_licence_is_a_clear_error():
    import cvxpy as cp

    net = random_net([2, 3, 1])
    if "MOSEK" in cp.installed_solvers():
        try:
            cert = lipbound.certify(net, solver="mosek")
        except SolverError as exc:
            assert "licence" in str(exc) or "MOSEK" in str(exc)
            pytest.skip(f"MOSEK installed without a usable licence: {exc}")
        assert cert.certified
    else:
        with pytest.raises(SolverError, match="not installed"):
            lipbound.certify(net, solver="mosek")


def test_auto_picks_native():
    cert = lipbound.certify(random_net([3, 4, 2]), solver="auto")
    assert cert.solver == "native" and cert.certified
