"""Closed-form LipSDP-Neuron multipliers of nonnegative networks: the solver's optimum, certified, at any scale."""

from fractions import Fraction

import numpy as np
import pytest
import torch

import lipbound
from lipbound import Box
from lipbound.activations import ActivationSpec
from lipbound.formulations.lipsdp import _signal
from lipbound.formulations.monotone import applies
from lipbound.network import Affine, ImplicitLayer, Network, ResidualBlock, SlopeRestricted
from tests.conftest import exact_norm_at_most, exact_product


def nonnegative_net(dims, activation="relu", seed=0, scale=1.0, dead_row=False):
    rng = np.random.default_rng(seed)
    weights = [np.abs(rng.standard_normal((m, n))) / np.sqrt(n) * scale
               for n, m in zip(dims[:-1], dims[1:], strict=True)]
    if dead_row:
        weights[0][1] = 0.0
    biases = [rng.standard_normal(w.shape[0]) for w in weights]
    return lipbound.from_weights(weights, activation, biases=biases), weights


def all_active_norm(weights, slope=1.0):
    prod = weights[0]
    for w in weights[1:]:
        prod = w @ (slope * prod)
    return float(np.linalg.norm(prod, 2))


@pytest.mark.parametrize("activation, slope", [("relu", 1.0), ("sigmoid", 0.25), ("tanh", 1.0)])
@pytest.mark.parametrize("dims", [(3, 4, 2), (4, 6, 5, 6, 1), (2,) + (3,) * 12 + (2,)])
def test_closed_form_is_the_solvers_optimum(activation, slope, dims):
    net, weights = nonnegative_net(dims, activation, seed=len(dims))
    cert = lipbound.certify(net)
    assert cert.certified and cert.solver == "closed-form" and cert.status == "optimal"
    assert any("closed form" in note for note in cert.notes)
    ref = lipbound.certify(net, solver="clarabel")
    assert ref.solver == "clarabel" and ref.certified
    assert abs(cert.upper_bound - ref.upper_bound) <= 1e-6 * ref.upper_bound
    # LipSDP's value is ||T|| for the all-active map T: the certificate is within 1e-7 of it, never below it.
    exact = all_active_norm(weights, slope)
    assert exact * (1 - 1e-12) <= cert.upper_bound <= exact * (1 + 1e-7)
    assert lipbound.verify_certificate(cert, net).valid


def test_closed_form_bound_is_proved_above_the_exact_norm():
    net, weights = nonnegative_net((3, 3, 3, 2), seed=5)
    cert = lipbound.certify(net)
    assert cert.solver == "closed-form"
    assert exact_norm_at_most(exact_product(weights, Fraction(1)), cert.upper_bound)
    assert not exact_norm_at_most(exact_product(weights, Fraction(1)), cert.upper_bound * (1 - 1e-6))


def test_closed_form_bounds_evaluated_pairs():
    net, _ = nonnegative_net((5, 8, 8, 3), seed=11)
    cert = lipbound.certify(net)
    assert cert.solver == "closed-form"
    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.standard_normal((400, 5)))
    d = torch.as_tensor(rng.standard_normal((400, 5)) * 10.0 ** rng.uniform(-6, 1, (400, 1)))
    with torch.no_grad():
        ratio = torch.linalg.vector_norm(net(x + d) - net(x), dim=1) / torch.linalg.vector_norm(d, dim=1)
    assert float(ratio.max()) <= cert.upper_bound
    assert lipbound.lower_bound(net).value <= cert.upper_bound


@pytest.mark.parametrize("power", [-250, 250])
def test_closed_form_at_extreme_scales(power):
    # Four layers scaled by 2^250 each: the product is 2^1000 times the unscaled one (near the float64 limit).
    net, weights = nonnegative_net((3, 5, 5, 5, 2), seed=3)
    big = lipbound.from_weights([np.ldexp(w, power) for w in weights], "relu")
    base = lipbound.certify(lipbound.from_weights(weights, "relu"))
    cert = lipbound.certify(big)
    assert cert.certified and cert.solver == "closed-form"
    assert cert.upper_bound == pytest.approx(np.ldexp(base.upper_bound, 4 * power), rel=1e-8)
    assert lipbound.verify_certificate(cert, big).valid


def test_dead_neuron_still_agrees_with_the_solver():
    net, _ = nonnegative_net((4, 6, 6, 2), seed=2, dead_row=True)
    cert = lipbound.certify(net)
    ref = lipbound.certify(net, solver="clarabel")
    assert cert.certified
    assert abs(cert.upper_bound - ref.upper_bound) <= 1e-6 * ref.upper_bound


def test_nonnegative_residual_network():
    # x -> x + G relu(W x): every map nonnegative, so the all-active map bounds every Jacobian here too.
    rng = np.random.default_rng(7)
    relu = SlopeRestricted(ActivationSpec("relu"), 4)
    net = Network.from_layers([Affine(np.abs(rng.standard_normal((4, 3)))),
                               ResidualBlock(Affine(np.abs(rng.standard_normal((4, 4))) / 2), relu,
                                             Affine(np.abs(rng.standard_normal((4, 4))) / 2)),
                               Affine(np.abs(rng.standard_normal((2, 4))))])
    cert = lipbound.certify(net)
    ref = lipbound.certify(net, solver="clarabel")
    assert cert.certified and cert.solver == "closed-form"
    assert abs(cert.upper_bound - ref.upper_bound) <= 1e-6 * ref.upper_bound
    assert lipbound.verify_certificate(cert, net).valid


def test_wide_stages_are_left_to_the_solver(monkeypatch):
    import lipbound.formulations.monotone as monotone

    net, _ = nonnegative_net((3, 6, 6, 2), seed=6)
    monkeypatch.setattr(monotone, "_MAX_FACTOR_WORK", 400.0)
    assert "too wide" in applies(_signal(net))
    assert lipbound.certify(net).solver != "closed-form"


def test_closed_form_only_where_it_applies():
    net, _ = nonnegative_net((3, 4, 4, 2), seed=4)
    assert lipbound.certify(net, solver="clarabel").solver == "clarabel"  # a named solver runs as asked
    assert lipbound.certify(net, solver="native-dense").solver == "native-dense"
    assert lipbound.certify(net, method="lipsdp-layer").solver != "closed-form"
    local = lipbound.certify(net, domain=Box(-np.ones(3), np.ones(3)))
    assert local.solver != "closed-form" and local.certified
    signed = lipbound.from_weights([np.array([[1.0, -1.0], [0.5, 1.0]]), np.array([[1.0, 2.0]])])
    assert lipbound.certify(signed).solver != "closed-form"


def test_applies_names_why_not():
    net, _ = nonnegative_net((3, 4, 2), "leaky_relu", seed=1)
    assert "nonzero lower slope" in applies(_signal(net))
    signed = lipbound.from_weights([np.array([[1.0, -1.0], [0.5, 1.0]]), np.array([[1.0, 2.0]])])
    assert "negative weight" in applies(_signal(signed))
    relu = SlopeRestricted(ActivationSpec("relu"), 2)
    implicit = Network.from_layers([Affine(np.eye(2)), ImplicitLayer(0.3 * np.ones((2, 2)), np.eye(2), relu),
                                    Affine(np.ones((1, 2)))])
    why = applies(_signal(implicit))
    assert why is not None and "implicit" in why
    ok, _ = nonnegative_net((3, 4, 2), seed=1)
    assert applies(_signal(ok)) is None


def test_overflowing_norm_is_reported_not_warned(recwarn):
    net = lipbound.from_weights([np.full((3, 2), 1e300), np.full((1, 3), 1e300)])
    cert = lipbound.certify(net)
    assert not cert.certified and "overflows the float64 range" in cert.reason
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
