"""Data-driven scaling of the signal model: exact for badly balanced and deep networks, any magnitude, re-checkable."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipbound
from lipbound import Ball, Box, FormulationError
from lipbound.activations import ActivationSpec
from lipbound.certificate import Certificate
from lipbound.formulations import lipsdp
from lipbound.network import Affine, GroupSortLayer, ImplicitLayer, Network, ResidualBlock, SlopeRestricted
from tests.conftest import exact_norm_at_most, exact_product


def signed_chain(depth, width, seed=1665, factor=1.0):
    """``depth`` signed random ``width x width`` matrices of spectral norm ``factor`` each, ReLU (issue 12)."""
    rng = np.random.default_rng(seed)
    weights = []
    for _ in range(depth):
        w = rng.standard_normal((width, width))
        weights.append(w / np.linalg.norm(w, 2) * factor)
    return lipbound.from_weights(weights, "relu")


@pytest.mark.parametrize("method", ["lipsdp-neuron", "lipsdp-layer", "mp"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh"])
def test_badly_balanced_layer_is_certified_exactly(method, activation):
    # Linear(diag(1e8, 1e-8)) -> act -> Linear(diag(1e-8, 1e8)) has Lipschitz constant 1 (slope 1 at 0 for tanh).
    # Before: lipsdp-neuron 2.0e11, lipsdp-layer 5e15, mp 1e16.
    net = lipbound.from_weights([np.diag([1e8, 1e-8]), np.diag([1e-8, 1e8])], activation)
    cert = lipbound.certify(net, method=method, solver="clarabel")
    assert cert.certified and 1.0 <= cert.upper_bound <= 1.0 + 1e-6
    again = Certificate.from_json(cert.to_json())
    check = lipbound.verify_certificate(again, net)
    assert check.valid and check.recomputed_bound <= cert.upper_bound


def test_badly_balanced_groupsort_layer_uses_one_factor_per_group():
    w0, w1 = np.diag([1e8, 1e8, 1e-8, 1e-8]), np.diag([1e-8, 1e-8, 1e8, 1e8])
    net = Network.from_layers([Affine(w0), GroupSortLayer(4, 2), Affine(w1)])
    for method in ("lipsdp-nsr", "mp"):
        cert = lipbound.certify(net, method=method, solver="clarabel")
        assert cert.certified and 1.0 <= cert.upper_bound <= 1.0 + 1e-6, method
        assert lipbound.verify_certificate(cert, net).valid


@pytest.mark.slow
def test_deep_signed_chain_is_certified_at_its_sdp_optimum_at_any_scale():
    # 32 signed 6x6 layers of norm 1: LipSDP ~1.1e-5 while the product of norms is 1. Before the data-driven
    # scaling the program's optimum was ~1e-10 and the certified bound 2.18e-5 (solver 2.05e-5, not converged).
    base = lipbound.certify(signed_chain(32, 6), method="lipsdp-neuron", solver="native")
    scaled = lipbound.certify(signed_chain(32, 6, factor=1.25), method="lipsdp-neuron", solver="native")
    mp = lipbound.certify(signed_chain(32, 6), method="mp")
    assert base.certified and scaled.certified
    assert base.upper_bound <= base.solver_bound * (1 + 1e-4)
    normalised = scaled.upper_bound / 1.25**32
    assert abs(normalised - base.upper_bound) <= 1e-6 * base.upper_bound
    assert 2 ** -8 <= base.multipliers[0] <= 2 ** 8  # the scaled program's rho is O(1)
    assert base.upper_bound <= mp.upper_bound
    lb = lipbound.lower_bound(signed_chain(32, 6), n_starts=8, steps=20)
    assert base.upper_bound >= lb.value


@pytest.mark.parametrize("scale", [1e-150, 1e-40, 1e40, 1e150])
def test_scaled_program_optimum_is_order_one_at_any_magnitude(scale):
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal((5, 4)) * scale, rng.standard_normal((5, 5)), rng.standard_normal((2, 5))]
    cert = lipbound.certify(lipbound.from_weights(weights, "relu"), method="lipsdp-neuron", solver="clarabel")
    reference = lipbound.certify(lipbound.from_weights([w / scale if i == 0 else w for i, w in enumerate(weights)],
                                                       "relu"), method="lipsdp-neuron", solver="clarabel")
    assert cert.certified and 2 ** -8 <= cert.multipliers[0] <= 2 ** 8
    assert abs(cert.upper_bound / scale - reference.upper_bound) <= 1e-6 * reference.upper_bound


def test_nonnegative_chain_at_the_end_of_the_float_range_is_exact():
    rng = np.random.default_rng(4)
    weights = [np.abs(rng.standard_normal((4, 3))) * 2.0**-500, np.abs(rng.standard_normal((4, 4))) * 2.0**-500,
               np.abs(rng.standard_normal((2, 4))) * 2.0**-60]
    cert = lipbound.certify(lipbound.from_weights(weights, "relu"), method="lipsdp-neuron", solver="clarabel")
    assert cert.certified and exact_norm_at_most(exact_product(weights), cert.upper_bound)
    exact = np.linalg.norm(np.ldexp(weights[2] @ np.ldexp(weights[1] @ weights[0], 1000), 60), 2)
    assert cert.upper_bound <= np.ldexp(exact, -1060) * (1 + 1e-6) + 5e-324


def test_exponents_are_validated():
    net = lipbound.from_weights([np.eye(2), np.eye(2)], "relu")
    with pytest.raises(FormulationError, match="expected 3"):
        lipsdp(net, exponents=(0, 0))
    with pytest.raises(FormulationError, match="integer"):
        lipsdp(net, exponents=(0, [0.5, 1.0], 0))
    with pytest.raises(FormulationError, match="dict entry"):
        lipsdp(net, exponents=(0, {"factors": [1.0, 1.0]}, 0))
    maxmin = Network.from_layers([Affine(np.eye(4)), GroupSortLayer(4, 2), Affine(np.eye(4))])
    with pytest.raises(FormulationError, match="within each group"):
        lipbound.formulations.lipsdp_nsr(maxmin, exponents=(0, [0, 1, 0, 0], 0))


def test_certificate_with_group_breaking_exponents_is_rejected_not_raised():
    maxmin = Network.from_layers([Affine(np.eye(4)), GroupSortLayer(4, 2), Affine(np.eye(4))])
    cert = lipbound.certify(maxmin, method="lipsdp-nsr", solver="clarabel")
    tampered = Certificate.from_dict({**cert.to_dict(), "exponents": [0, [0, 3, 0, 0], 0]})
    result = lipbound.verify_certificate(tampered, maxmin)
    assert not result.valid and "group" in result.reason


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
@pytest.mark.parametrize("domain", [Ball(np.ones(3), 0.1), Box(np.ones(3) - 0.01, np.ones(3) + 0.01)])
def test_saturated_activations_certify_locally(activation, domain):
    # Slopes down to ~1e-300 on the region: before, the Rump shift raised on NaN and the scaling on log2(0).
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((4, 3)) * 1e3, rng.standard_normal((4, 4)) * 1e3, rng.standard_normal((2, 4))]
    biases = [rng.standard_normal(4) * 1e3, rng.standard_normal(4) * 1e3, np.zeros(2)]
    net = lipbound.from_weights(weights, activation, biases)
    for method in ("lipsdp-neuron", "lipsdp-layer", "mp"):
        cert = lipbound.certify(net, method=method, domain=domain, solver="clarabel")
        assert cert.certified and cert.upper_bound >= lipbound.lower_bound(net, domain=domain, n_starts=4,
                                                                          steps=5).value


# -- certified >= evaluated difference quotients and exact closed forms, at every magnitude, every formulation.
# Positively homogeneous networks (zero biases): scaling the first map by 2^a and the last by 2^b scales the
# Lipschitz constant (and the local one on the same region) by exactly 2^(a+b), so difference quotients of the O(1)
# network give exact lower bounds at any magnitude. Smooth activations: the Jacobian at 0 is the weight product
# times phi'(0)^depth, an exact closed form at any magnitude.
HOMOGENEOUS = ["relu-neuron", "relu-layer", "relu-mp", "leaky-neuron", "maxmin-nsr", "maxmin-nsr-coupled",
               "maxmin-rr", "maxmin-mp", "residual-nsr", "implicit-relu", "relu-local", "relu-linf"]
SMOOTH_AT_ZERO = {"tanh": Fraction(1), "sigmoid": Fraction(1, 4), "gelu": Fraction(1, 2), "identity": Fraction(1)}


def _homogeneous_case(family, seed):
    rng = np.random.default_rng(seed)
    dims = [int(d) for d in rng.integers(2, 5, size=3)] + [2]
    dims[1] += dims[1] % 2
    dims[2] += dims[2] % 2
    if family.startswith("residual"):
        return Network.from_layers([Affine(rng.standard_normal((4, dims[0]))),
                                    ResidualBlock(Affine(rng.standard_normal((4, 4)) / 2), GroupSortLayer(4, 2)),
                                    Affine(rng.standard_normal((2, 4)))]), "lipsdp-nsr", {"coupled": True}
    if family.startswith("implicit"):
        w = rng.standard_normal((4, 4))
        layer = ImplicitLayer(w * 0.6 / np.linalg.norm(w, 2), rng.standard_normal((4, dims[0])),
                              SlopeRestricted(ActivationSpec("relu"), 4))
        return Network.from_layers([Affine(np.eye(dims[0])), layer, Affine(rng.standard_normal((2, 4)))]), \
            "lipsdp-nsr", {}
    act = {"relu": "relu", "leaky": "leaky_relu", "maxmin": "maxmin"}[family.split("-")[0]]
    weights = [rng.standard_normal((dims[i + 1], dims[i])) for i in range(3)]
    net = lipbound.from_weights(weights, act, **({"negative_slope": 0.2} if act == "leaky_relu" else {}))
    kind = family.split("-", 1)[1]
    method = {"neuron": "lipsdp-neuron", "layer": "lipsdp-layer", "mp": "mp", "nsr": "lipsdp-nsr",
              "nsr-coupled": "lipsdp-nsr", "rr": "lipsdp-rr", "local": "lipsdp-neuron",
              "linf": "lipsdp-neuron"}[kind]
    options = {"coupled": True} if kind == "nsr-coupled" else {}
    if kind == "local":
        options["domain"] = Ball(rng.standard_normal(dims[0]), 0.5)
    if kind == "linf":
        options.update(norm="linf", output_index=0)
    return net, method, options


def _scaled(net, a, b):
    """The network with its first map times 2^a and its last map times 2^b (exact)."""
    layers = list(net.layers)
    first, last = layers[0], layers[-1]
    if isinstance(layers[1], ImplicitLayer):
        imp = layers[1]
        layers[1] = ImplicitLayer(imp.weight, np.ldexp(imp.input_weight, a), imp.activation, imp.bias, imp.name)
    else:
        layers[0] = Affine(np.ldexp(first.weight, a), np.ldexp(first.bias, a), first.name)
    layers[-1] = Affine(np.ldexp(last.weight, b), np.ldexp(last.bias, b), last.name)
    return Network.from_layers(layers)


def _linf_lower_bound(net, index, seed) -> float:
    """``max ||grad f_index(x)||_1`` over random points: an l-infinity-to-scalar Lipschitz lower bound."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, net.input_dim, generator=g, dtype=torch.float64, requires_grad=True)
    net(x)[:, index].sum().backward()
    return float(x.grad.abs().sum(dim=1).max())


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(HOMOGENEOUS), seed=st.integers(0, 10_000), a=st.integers(-990, 990),
       b=st.integers(-990, 990))
def test_homogeneous_formulations_are_sound_at_every_magnitude(family, seed, a, b):
    base, method, options = _homogeneous_case(family, seed)
    cert = lipbound.certify(_scaled(base, a, b), method=method, solver="clarabel", **options)
    if not cert.certified:
        assert a + b > 1000 and "overflow" in cert.reason  # only an overflowing bound may be refused
        return
    if options.get("norm") == "linf":
        lb = _linf_lower_bound(base, options["output_index"], seed)
    else:
        lb = lipbound.lower_bound(base, n_starts=6, steps=8, domain=options.get("domain"), seed=seed).value
    assert Fraction(cert.upper_bound) >= Fraction(lb) * Fraction(1 - 1e-9) * Fraction(2) ** (a + b)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(act=st.sampled_from(sorted(SMOOTH_AT_ZERO)), seed=st.integers(0, 10_000),
       exps=st.lists(st.integers(-330, 330), min_size=3, max_size=3),
       method=st.sampled_from(["lipsdp-neuron", "lipsdp-layer", "mp"]), nonneg_relu=st.booleans())
def test_closed_forms_are_below_the_certified_bound_at_every_magnitude(act, seed, exps, method, nonneg_relu):
    rng = np.random.default_rng(seed)
    dims = [int(d) for d in rng.integers(1, 4, size=3)] + [int(rng.integers(1, 3))]
    weights = [np.ldexp(rng.standard_normal((dims[i + 1], dims[i])), exps[i]) for i in range(3)]
    slope = SMOOTH_AT_ZERO[act]
    if nonneg_relu:  # ||W_L ... W_1|| exactly for a non-negative ReLU chain
        weights, act, slope = [np.abs(w) for w in weights], "relu", Fraction(1)
    cert = lipbound.certify(lipbound.from_weights(weights, act), method=method, solver="clarabel")
    if not cert.certified:
        assert sum(exps) > 1000 and "overflow" in cert.reason
        return
    assert exact_norm_at_most(exact_product(weights, slope), cert.upper_bound)


def test_norm_product_levels_on_request():
    # exponents="norm": block levels from norm products only (certify's retry after a stopped solve); the
    # worst-direction search finds the 64-layer chain's cancellations (output level 2^-52 here), the norm
    # product does not (2^-1).
    from lipbound.formulations.lipsdp import lipsdp

    net = signed_chain(64, 6)
    searched, plain = lipsdp(net, "neuron").exponents, lipsdp(net, "neuron", "norm").exponents
    assert plain[-1] > searched[-1] + 10
    with pytest.raises(lipbound.FormulationError, match="'norm'"):
        lipsdp(net, "neuron", "bogus")


def _sequential_feasible_point(weights):
    """ECLipsE-Fast's closed form for a ReLU chain, written out directly: multipliers ``lambda_k`` and the bound."""
    s = np.eye(weights[0].shape[1])
    lams = []
    for w in weights[:-1]:
        a = w @ np.linalg.solve(s, w.T)
        lam = 1.0 / np.linalg.eigvalsh((a + a.T) / 2)[-1]
        s = 2 * lam * np.eye(len(a)) - lam ** 2 * a
        lams.append(lam)
    c = weights[-1]
    return np.array(lams), float(np.sqrt(np.linalg.eigvalsh(c @ np.linalg.solve(s, c.T))[-1]))


@pytest.mark.parametrize("exponent", [-300, 0, 300])
def test_chain_levels_are_the_sequential_feasible_point_at_any_magnitude(exponent):
    from lipbound.formulations.scaling import _Graph, slope_exponents
    from lipbound.formulations.signal import signal_model

    rng = np.random.default_rng(3)
    dims = [5, 7, 6, 7, 4, 3]
    weights = [rng.standard_normal((b, a)) for a, b in zip(dims[:-1], dims[1:], strict=True)]
    lams, bound = _sequential_feasible_point(weights)
    scaled = [np.ldexp(w, exponent) for w in weights]  # 2^(5 * 300) overflows any product of the weights
    model = signal_model(lipbound.from_weights(scaled, "relu"))
    graph = _Graph(model, [slope_exponents(s.layer, "neuron") for s in model.stages])
    levels, t_out = graph.chain_levels([np.zeros(n) for n in graph.sizes[1:]])
    assert levels == pytest.approx(-np.log2(lams) / 2 + exponent * np.arange(1, len(lams) + 1), abs=1e-9)
    assert t_out == pytest.approx(np.log2(bound) + exponent * len(weights), abs=1e-9)
    # Not a chain of slope-restricted stages: no levels.
    maxmin = signal_model(lipbound.from_weights([rng.standard_normal((6, 4)), rng.standard_normal((2, 6))], "maxmin"))
    other = _Graph(maxmin, [slope_exponents(s.layer, "neuron") for s in maxmin.stages])
    assert other.chain_levels([np.zeros(n) for n in other.sizes[1:]]) is None


def test_deep_signed_chain_is_solved_at_the_chain_levels():
    # 40 signed 8 x 8 layers of spectral norm 1: with levels from the worst direction alone (2^-51 at the output)
    # the first solve stalled (certified 5.85) and only a rescaled retry reached the optimum; the chain's feasible
    # point puts the output level between that and its own bound (2^-13.7), and the first solve reaches it.
    net = signed_chain(40, 8, seed=2)
    _, ecl = _sequential_feasible_point(net.weights)
    cert = lipbound.certify(net, method="lipsdp-neuron", solver="native")
    assert cert.certified and not cert.notes
    assert cert.upper_bound <= ecl
    assert cert.upper_bound == pytest.approx(cert.solver_bound, rel=1e-6)
    dense = lipbound.certify(net, method="lipsdp-neuron", solver="native-dense")
    assert dense.upper_bound == pytest.approx(cert.upper_bound, rel=1e-6)


@pytest.mark.parametrize("trail_checks", [3, 0])
def test_converged_answer_out_of_reach_is_certified_near_its_value(trail_checks, caplog, monkeypatch):
    # 64 signed 8 x 8 layers: the solver converges (value 2.27e-10), but its answer is close to singular up to
    # rounding in the last blocks, which rho does not reach: the check alone certified 6.5e-4 (1.5e-5 above the value
    # once the implied sign constraints left the solver's LP cone). An earlier iterate of the run (further from the
    # boundary) is proved within 1e-6 of the value; without earlier iterates (and re-solving from 1e-6 above the
    # value on), the program re-solved with the LMI tightened by twice its rounding radius is.
    import logging

    import lipbound.api

    monkeypatch.setattr(lipbound.api, "_TRAIL_CHECKS", trail_checks)
    if not trail_checks:
        monkeypatch.setattr(lipbound.api, "_REACH", 1e-6)
    net = signed_chain(64, 8, seed=7)
    with caplog.at_level(logging.INFO, logger="lipbound"):
        # One thread: the answer's distance to the boundary is a matter of rounding, and a run whose thread count
        # is measured on its own iterations (one of them on two threads) can end on an answer the check reaches.
        cert = lipbound.certify(net, method="lipsdp-neuron", solver="native", threads=1)
    what = "an earlier iterate" if trail_checks else "tightened"
    assert cert.certified and any(what in n for n in cert.notes)
    assert ("re-solving with the LMIs tightened" in caplog.text) == (trail_checks == 0)
    assert cert.upper_bound == pytest.approx(cert.solver_bound, rel=1e-6)
    assert lipbound.verify_certificate(cert.to_json(), net).valid


def test_tightened_program_shifts_every_diagonal_block():
    net = signed_chain(3, 4, seed=1)
    program = lipsdp(net, "neuron").program
    y = np.abs(np.random.default_rng(0).standard_normal(program.n_vars))
    tight = program.tightened([0.25])
    assert np.array_equal(tight.lmis[0].assemble(y), program.lmis[0].assemble(y) + 0.25 * np.eye(program.lmis[0].size))
    assert tight.objective is program.objective and tight.rho_index == program.rho_index
    with pytest.raises(ValueError, match="one margin per LMI"):
        program.tightened([])
    with pytest.raises(ValueError, match="finite"):
        program.tightened([float("nan")])
