"""The campaign's judge (multiple-precision reference evaluation) and the JSON network descriptions."""

import json

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lipbound
from lipbound import Affine, Network
from lipbound.graph import Conv, GraphNetwork, LinearMap, Sum
from lipbound.network import HouseholderLayer, ImplicitLayer
from lipbound.soundness import FAMILIES, Reference, network_from_dict, network_to_dict, reproduce, trial_seed
from lipbound.soundness.reference import ACTIVATIONS, DISCOUNT_BITS, row_l1_norm, spectral_norm


def _floats(values) -> np.ndarray:
    return np.array([float(v) for v in values])


#: Families that import models while drawing (torch, ONNX): a refused import is a campaign finding, not a draw.
IMPORTING = ("cnn", "onnx")


def _networks(family: str, seed: int, n: int) -> list:
    """The networks of ``n`` trials (those whose model the importer refuses are skipped: at most half)."""
    out = []
    for i in range(n):
        try:
            out.append(reproduce(family, trial_seed(seed, i)).network)
        except lipbound.LipboundError:
            if family not in IMPORTING:
                raise
    assert 2 * len(out) >= n, f"{family}: the importer refused {n - len(out)} of {n} drawn models"
    return out


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "extreme-scale"])
def test_reference_agrees_with_the_ir_forward(family):
    for i, net in enumerate(_networks(family, 11, 6)):
        ref = Reference(net)
        x = np.random.default_rng(i).standard_normal((3, net.input_dim)) * 2
        y = net.forward(torch.tensor(x)).numpy()
        for k in range(3):
            got = _floats(ref(x[k]))
            # torch's implicit layers stop at a 1e-12 step; everything else is float64 rounding only.
            tol = 1e-10 if "implicit" in net.summary() else 1e-13
            assert np.max(np.abs(got - y[k])) <= tol * (1 + np.max(np.abs(got))), (family, i, k)


def test_every_activation_has_a_reference_definition():
    assert set(ACTIVATIONS) == set(lipbound.SUPPORTED_ACTIVATIONS)


def test_reference_is_exact_where_float64_underflows_and_overflows():
    tiny = Reference(lipbound.from_weights([np.array([[1e-300]]), np.array([[1e-300]])], "relu"))
    c = tiny.ctx
    assert tiny([1.0])[0] == c.mpf(1e-300) ** 2  # 1e-600: float64 gives 0
    huge = Reference(lipbound.from_weights([np.array([[1e300]]), np.array([[1e300]])], "identity"))
    assert huge([1e300])[0] == c.mpf(1e300) ** 3  # float64 gives inf
    assert huge.ratio([0.0], [1.0]) <= c.mpf(1e300) ** 2


def test_ratio_is_the_difference_quotient_less_the_margin():
    w = np.array([[3.0, 4.0], [1.0, -2.0]])
    ref = Reference(lipbound.from_weights([w], "identity"))
    c = ref.ctx
    v = np.linalg.svd(w)[2][0]
    exact_norm = spectral_norm([w])
    r = ref.ratio([0.5, -1.0], [0.5 + v[0], -1.0 + v[1]])
    assert r <= exact_norm * (1 + c.ldexp(1, -DISCOUNT_BITS + 2))
    assert r >= exact_norm * (1 - 1e-15)
    # l-infinity, output 0: |3 dx0 + 4 dx1| / max |dx| = 7 along (1, 1).
    assert float(ref.ratio([0.0, 0.0], [1.0, 1.0], norm="linf", output_index=0)) == pytest.approx(7.0, rel=1e-30)
    assert ref.ratio([1.0, 2.0], [1.0, 2.0]) == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(-1100, 1000), st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_pair_ratios_never_exceed_the_exact_constant_at_any_magnitude(exponent, seed, depth):
    """Property: for linear chains, every judged pair ratio is <= ||W_L ... W_0|| (computed exactly), whatever the
    magnitude of the weights (scaled by 2^exponent, down to the subnormal range and up to near overflow)."""
    rng = np.random.default_rng(seed)
    dims = rng.integers(1, 4, depth + 2)
    weights = [rng.standard_normal((dims[i + 1], dims[i])) for i in range(depth + 1)]
    weights[0] = np.ldexp(weights[0], exponent)
    net = lipbound.from_weights(weights, "identity", [rng.standard_normal(d) for d in dims[1:]])
    ref = Reference(net)
    exact = spectral_norm(net.weights)
    c = ref.ctx
    for _ in range(3):
        x = rng.standard_normal(dims[0])
        step = rng.standard_normal(dims[0]) * 10.0 ** rng.uniform(-8, 2)
        r = ref.ratio(x, x + step)
        assert r <= exact * (1 + c.ldexp(1, -DISCOUNT_BITS + 4)) + c.ldexp(1, -1074 - 200)


def test_spectral_and_row_norms_match_numpy_and_scale_exactly():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((2, 4))
    assert float(spectral_norm([a, b])) == pytest.approx(np.linalg.norm(b @ a, 2), rel=1e-13)
    assert float(row_l1_norm([a, b], 1)) == pytest.approx(np.abs(b @ a)[1].sum(), rel=1e-13)
    scaled = spectral_norm([np.ldexp(a, -1000), np.ldexp(b, -100)])  # the product's norm is near 2^-1100
    assert float(scaled) == 0.0  # below float64's subnormal range, but not for the judge:
    assert abs(scaled / mpmath.ldexp(spectral_norm([a, b]), -1100) - 1) < mpmath.mpf(2) ** -120


def test_implicit_reference_is_the_fixed_point():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 3))
    w *= 0.8 / np.linalg.norm(w, 2)
    layer = ImplicitLayer(w, rng.standard_normal((3, 2)), lipbound.SlopeRestricted(lipbound.ActivationSpec("tanh"), 3),
                          rng.standard_normal(3))
    ref = Reference(Network.from_layers([Affine(np.eye(2)), layer, Affine(np.eye(3))]))
    c = ref.ctx
    x = [0.3, -1.2]
    z = ref(x)
    drive = [sum(c.mpf(u) * c.mpf(v) for u, v in zip(row, x, strict=True)) + c.mpf(b)
             for row, b in zip(layer.input_weight, layer.bias, strict=True)]
    again = [c.tanh(sum(c.mpf(wij) * zj for wij, zj in zip(row, z, strict=True)) + d)
             for row, d in zip(layer.weight, drive, strict=True)]
    assert max(abs(s - t) for s, t in zip(z, again, strict=True)) < c.ldexp(1, -200)


def test_householder_reference_reflects_with_exact_unit_vectors():
    v = np.array([[1.0, 2.0]])
    net = Network.from_layers([Affine(np.eye(2)), HouseholderLayer(v), Affine(np.eye(2))])
    ref = Reference(net)
    c = ref.ctx
    z = [c.mpf(-1.0), c.mpf(0.5)]  # v^T z < 0: reflected, and the reflection keeps the norm exactly
    out = ref([-1.0, 0.5])
    assert abs(sum(t * t for t in out) - sum(t * t for t in z)) < c.ldexp(1, -240)
    assert _floats(ref([1.0, 1.0])).tolist() == [1.0, 1.0]  # v^T z > 0: identity


def _same_linear_operators(a, b) -> bool:
    """Whether two networks (chains or graphs) have bit-identical weights, biases and error bounds."""
    if isinstance(a, GraphNetwork):
        def data(op):
            if isinstance(op, LinearMap):
                return [op.dense(), op.bias, op.dense_err(), op.bias_err]
            if isinstance(op, Conv):
                return [op.weight, op.bias, op.weight_err]
            return [np.array(op.coefficients), np.array(op.errors)] if isinstance(op, Sum) else []
        return len(a.nodes) == len(b.nodes) and all(
            type(m.op) is type(n.op) and m.inputs == n.inputs and m.shape == n.shape
            and all((u is None and v is None) or np.array_equal(u, v) for u, v in zip(data(m.op), data(n.op),
                                                                                      strict=True))
            for m, n in zip(a.nodes, b.nodes, strict=True))
    return all(np.array_equal(u.weight, v.weight) and np.array_equal(u.bias, v.bias)
               for u, v in zip(a.affines, b.affines, strict=True))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_network_descriptions_round_trip_through_json(family):
    for i, net in enumerate(_networks(family, 5, 3)):
        again = network_from_dict(json.loads(json.dumps(network_to_dict(net))))
        assert again.summary() == net.summary()
        assert _same_linear_operators(again, net)
        x = torch.tensor(np.random.default_rng(i).standard_normal((4, net.input_dim)))
        y, y2 = net.forward(x), again.forward(x)
        assert torch.allclose(y, y2, rtol=1e-12, atol=0) or not torch.all(torch.isfinite(y))


def test_description_keeps_narrowed_slopes_and_rejects_unknown_layers():
    net = lipbound.from_weights([np.eye(2), np.eye(2)], "relu")
    narrowed = net.with_slopes([(np.array([0.0, 1.0]), np.array([1.0, 1.0]))])
    data = json.loads(json.dumps(network_to_dict(narrowed)))
    assert np.array_equal(network_from_dict(data).activations[0].alpha, [0.0, 1.0])
    data["layers"][1]["type"] = "conv"
    with pytest.raises(lipbound.NetworkError, match="unknown layer type 'conv'"):
        network_from_dict(data)
