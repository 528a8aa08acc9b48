"""Tests of the PolyReLU / PolyNorm torch modules against the definitions and the official conventions."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lipbound.nn.polycom as polycom
from lipbound.nn.polycom import (
    PolyNorm,
    PolyReLU,
    official_to_paper,
    paper_coefficients,
    paper_to_official,
    poly_norm,
    poly_relu,
)


def np_polyrelu(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Definition: sum_i a_i max(x, 0)**i, with max(x, 0)**0 = 1."""
    r = np.maximum(x, 0.0)
    return sum(a[i] * r**i for i in range(len(a)))


def np_polynorm(x: np.ndarray, a: np.ndarray, eps: float) -> np.ndarray:
    """Definition: a_0 + sum_{i>=1} a_i x**i / sqrt(mean(x**(2i), last axis) + eps)."""
    out = np.full_like(x, a[0])
    for i in range(1, len(a)):
        xi = x**i
        out = out + a[i] * xi / np.sqrt(np.mean(xi * xi, axis=-1, keepdims=True) + eps)
    return out


def official_polynorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The official repository's formula (order 3), written independently of the module."""

    def norm(v: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)

    return weight[0] * norm(x**3) + weight[1] * norm(x**2) + weight[2] * norm(x) + bias


# -- initialisation and coefficient order ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [PolyReLU, PolyNorm])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_official_initialisation(cls, order):
    module = cls(order=order)
    assert module.weight.shape == (order,) and module.bias.shape == (1,)
    expected = np.array([0.0] + [1.0 / order] * order)
    np.testing.assert_allclose(module.coefficients(), expected, rtol=1e-7)
    np.testing.assert_allclose(paper_coefficients(module), expected, rtol=1e-7)


def test_coefficient_order_is_reversed_official_storage():
    act = PolyReLU(order=3)
    with torch.no_grad():
        act.weight.copy_(torch.tensor([3.0, 2.0, 1.0]))  # official: w[0] x^3 + w[1] x^2 + w[2] x + b
        act.bias.fill_(0.5)
    assert act.coefficients().tolist() == [0.5, 1.0, 2.0, 3.0]
    x = torch.tensor([2.0, -1.0])
    # 0.5 + 1*2 + 2*4 + 3*8 = 34.5, and the constant a_0 = 0.5 for x < 0
    assert act(x).tolist() == [34.5, 0.5]


def test_set_coefficients_roundtrip_and_conversions():
    a = [0.25, -1.5, 0.75, 2.0]
    for module in (PolyReLU(3), PolyNorm(3)):
        module.set_coefficients(a)
        assert module.coefficients().tolist() == a
        assert module.weight.detach().tolist() == [2.0, 0.75, -1.5]
        assert module.bias.item() == 0.25
    w, b = paper_to_official(a)
    assert official_to_paper(w, b).tolist() == a
    assert official_to_paper(torch.tensor(w), torch.tensor(b)).tolist() == a
    with pytest.raises(ValueError, match="expected 4 coefficients"):
        PolyReLU(3).set_coefficients([1.0, 2.0])


def test_paper_coefficient_tensor_is_differentiable_view():
    act = PolyNorm(order=2)
    coeffs = act.paper_coefficient_tensor()
    coeffs.sum().backward()
    assert torch.equal(act.weight.grad, torch.ones(2)) and torch.equal(act.bias.grad, torch.ones(1))


# -- values against the definitions ---------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_polyrelu_matches_numpy_definition(order):
    rng = np.random.default_rng(order)
    a = rng.standard_normal(order + 1)
    x = rng.standard_normal((4, 5, 7)) * 2.0
    act = PolyReLU(order=order).double()
    act.set_coefficients(a)
    got = act(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, np_polyrelu(x, a), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(poly_relu(torch.from_numpy(x), a).numpy(), np_polyrelu(x, a), rtol=1e-13,
                               atol=1e-13)


@pytest.mark.parametrize("order,eps", [(1, 1e-6), (2, 1e-3), (3, 1e-6), (4, 0.5)])
def test_polynorm_matches_numpy_definition(order, eps):
    rng = np.random.default_rng(10 + order)
    a = rng.standard_normal(order + 1)
    x = rng.standard_normal((3, 6, 16))
    x[0, 0] = 0.0  # an all-zero token: only eps keeps the normalisation finite
    act = PolyNorm(order=order, eps=eps).double()
    act.set_coefficients(a)
    got = act(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, np_polynorm(x, a, eps), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[0, 0], np.full(16, a[0]))


def test_polynorm_matches_official_formula():
    torch.manual_seed(0)
    act = PolyNorm(order=3, eps=1e-6).double()
    act.set_coefficients([0.1, -0.4, 0.3, 0.9])
    x = torch.randn(2, 4, 32, dtype=torch.float64)
    ref = official_polynorm(x, act.weight.double(), act.bias.double(), 1e-6)
    torch.testing.assert_close(act(x), ref, rtol=1e-12, atol=1e-12)


def test_polynorm_normalises_over_last_dim_only():
    act = PolyNorm(order=3).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    # each row is processed independently: evaluating rows one at a time gives the same result
    rows = torch.stack([act(x[i]) for i in range(5)])
    torch.testing.assert_close(act(x), rows, rtol=0, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(coeffs=st.lists(st.floats(-3, 3), min_size=2, max_size=5),
       values=st.lists(st.floats(-4, 4), min_size=1, max_size=12))
def test_polyrelu_definition_property(coeffs, values):
    a = np.array(coeffs)
    x = np.array(values)
    got = poly_relu(torch.from_numpy(x), a).numpy()
    np.testing.assert_allclose(got, np_polyrelu(x, a), rtol=1e-12, atol=1e-12)
    assert np.all(got[x <= 0] == a[0])  # relu(x)**0 = 1: the output is exactly a_0 on x <= 0


# -- Lemma 1 / Theorem 1 with the torch modules ----------------------------------------------------------


def test_relu_and_square_special_cases_are_exact_in_float64():
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    act = PolyReLU(order=3).double()
    act.set_coefficients([0, 1, 0, 0])
    assert torch.equal(act(x), torch.relu(x))
    act.set_coefficients([0, 0, 1, 0])
    assert torch.equal(act(x) + act(-x), x * x)  # x^2 from two ReLU^2 units, exact


def test_theorem1_relu_mlp_equals_polyrelu_mlp_exactly():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)]
    relu_net = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2]).double()
    acts = [PolyReLU(order=3), PolyReLU(order=3)]
    for act in acts:
        act.set_coefficients([0, 1, 0, 0])
    poly_net = torch.nn.Sequential(layers[0], acts[0], layers[1], acts[1], layers[2]).double()
    x = torch.randn(256, 4, dtype=torch.float64)
    assert torch.equal(relu_net(x), poly_net(x))
    n_relu = sum(p.numel() for p in relu_net.parameters())
    n_poly = sum(p.numel() for p in poly_net.parameters())
    assert n_poly - n_relu == 2 * 4  # same weights; only the shared activation coefficients are added


# -- gradients, dtype, device ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PolyReLU, PolyNorm])
def test_gradients_flow_to_input_and_coefficients(cls):
    module = cls(order=3).double()
    module.set_coefficients([0.1, 0.5, -0.3, 0.2])
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))
    module(x).pow(2).sum().backward()
    for grad in (x.grad, module.weight.grad, module.bias.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_coefficient_gradients_match_analytic_values():
    act = PolyReLU(order=3).double()
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    act(x).sum().backward()
    r = torch.relu(x)
    # d/d a_i of sum_x sum_j a_j r^j is sum_x r^i; weight[j] is a_{3-j}
    torch.testing.assert_close(act.weight.grad, torch.stack([(r**3).sum(), (r**2).sum(), r.sum()]))
    torch.testing.assert_close(act.bias.grad, torch.tensor([3.0], dtype=torch.float64))


@pytest.mark.parametrize("cls", [PolyReLU, PolyNorm])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_output_follows_input_dtype(cls, dtype):
    module = cls(order=3)  # float32 parameters
    x = torch.randn(2, 8).to(dtype)
    y = module(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert module.weight.dtype == torch.float32  # parameters themselves are untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [PolyReLU, PolyNorm])
def test_cuda_matches_cpu(cls):
    module = cls(order=3).double()
    module.set_coefficients([0.1, 0.5, -0.3, 0.2])
    x = torch.randn(4, 32, dtype=torch.float64)
    y_cpu = module(x)
    y_gpu = module(x.cuda())  # parameters stay on the CPU and are moved for the call
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-12, atol=1e-12)
    module.cuda()(x.cuda()).sum().backward()
    assert module.weight.grad is not None and module.weight.grad.device.type == "cuda"


# -- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PolyReLU, PolyNorm])
@pytest.mark.parametrize("order", [0, -1, 2.5, True, "3", None])
def test_bad_order_raises(cls, order):
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        cls(order=order)


def test_numpy_integer_order_is_accepted():
    assert PolyReLU(order=np.int64(2)).order == 2


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf"), "1e-6", None, True])
def test_bad_eps_raises(eps):
    with pytest.raises(ValueError, match="eps must be a finite"):
        PolyNorm(order=3, eps=eps)


@pytest.mark.parametrize("cls", [PolyReLU, PolyNorm])
def test_integer_input_raises(cls):
    with pytest.raises(TypeError, match="floating-point"):
        cls()(torch.arange(4))


def test_polynorm_scalar_input_raises():
    with pytest.raises(ValueError, match="feature"):
        poly_norm(torch.tensor(1.0), [0.0, 1.0])


def test_repr_mentions_order_and_eps():
    assert "order=3, eps=1e-06" in repr(PolyNorm())
    assert "order=2" in repr(PolyReLU(order=2))


def test_module_doctests_pass():
    result = doctest.testmod(polycom, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0
