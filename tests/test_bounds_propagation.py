"""Tests of :mod:`lipbound.bounds.propagation` on graph networks (IBP and CROWN through convolutions, pooling,
normalisation, skip connections and concatenations), of local slopes on graphs and of local certificates.

Soundness is checked against the float64 forward pass on sampled inputs (random, corners and boundary points)
and on inputs pushed towards the ends of every pre-activation interval by projected gradient steps, with the
tolerance ``TOL (1 + |z|)`` of :mod:`tests.test_bounds` (the float forward pass is itself inexact).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipbound
from lipbound.activations import ActivationSpec
from lipbound.bounds import Ball, Box, activation_bounds, local_slopes
from lipbound.errors import FormulationError
from lipbound.graph import Conv, GraphBuilder, GraphNetwork, LinearMap, Node, evaluate
from lipbound.network import Affine, GroupSortLayer, HouseholderLayer, ImplicitLayer, Network, SlopeRestricted

TOL = 1e-9
SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
ACTIVATIONS = [ActivationSpec("relu"), ActivationSpec("leaky_relu", {"negative_slope": 0.1}), ActivationSpec("tanh"),
               ActivationSpec("gelu"), ActivationSpec("softplus")]
BLOCKS = ["conv", "conv_s2", "batchnorm", "act", "skip", "avgpool", "maxpool", "concat", "dense", "sparse"]


# ------------------------------------------------------------------------------------------------
# Graph builders
# ------------------------------------------------------------------------------------------------


def _windows(shape: tuple[int, ...], k: int, stride: int) -> np.ndarray:
    """Flat input indices (n_out, k*k) of the k x k pooling windows of a (C, H, W) tensor."""
    c, h, w = shape
    idx = np.arange(c * h * w).reshape(c, h, w)
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    out = np.empty((c, ho, wo, k * k), dtype=np.int64)
    for i in range(ho):
        for j in range(wo):
            out[:, i, j] = idx[:, i * stride:i * stride + k, j * stride:j * stride + k].reshape(c, -1)
    return out.reshape(-1, k * k)


def add_maxpool(b: GraphBuilder, x: int, k: int = 2, stride: int = 2) -> int:
    """Max pooling as lipbound imports it: copy the windows, GroupSort of the window, select the maxima."""
    shape = b.shape(x)
    win = _windows(shape, k, stride)
    n_out, w = win.shape
    rows = np.arange(n_out * w)
    copy = sp.csr_matrix((np.ones(rows.size), (rows, win.reshape(-1))), shape=(rows.size, b.nodes[x].size))
    h = b.linear(x, copy, name="windows", kind="maxpool_windows")
    h = b.node(GroupSortLayer(n_out * w, w, name="maxpool"), [h], "maxpool")
    pick = sp.csr_matrix((np.ones(n_out), (np.arange(n_out), np.arange(n_out) * w + w - 1)), shape=(n_out, n_out * w))
    c, hh, ww = shape
    return b.linear(h, pick, name="select", kind="maxpool_select",
                    shape=(c, (hh - k) // stride + 1, (ww - k) // stride + 1))


def add_avgpool(b: GraphBuilder, x: int, k: int = 3, stride: int = 1) -> int:
    """Average pooling with the float coefficient fl(1/k^2) and its rounding bound as the error matrix."""
    shape = b.shape(x)
    win = _windows(shape, k, stride)
    n_out, w = win.shape
    coef = 1.0 / w
    err = abs(float(np.nextafter(coef, np.inf)) - coef)  # >= |fl(1/w) - 1/w|
    rows = np.repeat(np.arange(n_out), w)
    mat = sp.csr_matrix((np.full(rows.size, coef), (rows, win.reshape(-1))), shape=(n_out, b.nodes[x].size))
    emat = sp.csr_matrix((np.full(rows.size, err), (rows, win.reshape(-1))), shape=mat.shape)
    c, hh, ww = shape
    return b.linear(x, mat, err=emat, name="avgpool", kind="avgpool",
                    shape=(c, (hh - k) // stride + 1, (ww - k) // stride + 1))


def add_batchnorm(b: GraphBuilder, x: int, rng: np.random.Generator) -> int:
    """A folded BatchNorm: per-channel scale and shift with entrywise error bounds."""
    shape = b.shape(x)
    spatial = int(np.prod(shape[1:]))
    scale = np.repeat(rng.uniform(0.5, 2.0, shape[0]), spatial)
    shift = np.repeat(rng.normal(0, 0.3, shape[0]), spatial)
    u = 2.0**-53  # the importer's bounds for gamma / sqrt(var + eps) and the folded shift
    return b.node(LinearMap(sp.diags(scale, format="csr"), shift, sp.diags(4 * u * scale, format="csr"),
                            4 * u * (np.abs(shift) + 1.0), kind="batchnorm"), [x], "batchnorm", shape)


def random_graph(seed: int, blocks: list[str], spec: ActivationSpec, size: int = 6) -> GraphNetwork:
    """A CNN-like graph on a (1, size, size) input built from ``blocks`` (see :data:`BLOCKS`), ending in a flat
    dense head with 2 outputs. Every block keeps the graph valid; a block that does not fit is skipped."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder((1, size, size))
    cur = b.input
    for kind in blocks:
        shape = b.shape(cur)
        spatial = len(shape) == 3
        if kind.startswith("conv") and spatial and min(shape[1:]) >= 3:
            c_out = int(rng.integers(1, 4))
            stride = 2 if kind == "conv_s2" else 1
            w = rng.normal(0, 1.0 / np.sqrt(9 * shape[0]), (c_out, shape[0], 3, 3))
            cur = b.conv(cur, w, rng.normal(0, 0.2, c_out), stride=stride, padding=int(rng.integers(0, 2)),
                         name="conv")
        elif kind == "batchnorm":
            cur = add_batchnorm(b, cur, rng)
        elif kind == "act":
            cur = b.activation(cur, spec, name="act")
        elif kind == "skip":  # x + c * act(W x): a residual branch with an inexact coefficient
            n = b.nodes[cur].size
            h = b.linear(cur, rng.normal(0, 1.0 / np.sqrt(n), (n, n)), name="res_in", shape=shape)
            h = b.activation(h, spec, name="res_act")
            cur = b.add([cur, h], (1.0, 0.1), name="skip", errors=(0.0, 2.0**-56))
        elif kind == "avgpool" and spatial and min(shape[1:]) >= 3:
            cur = add_avgpool(b, cur)
        elif kind == "maxpool" and spatial and min(shape[1:]) >= 2:
            cur = add_maxpool(b, cur)
        elif kind == "concat" and spatial and min(shape[1:]) >= 3:
            w = rng.normal(0, 1.0 / np.sqrt(9 * shape[0]), (1, shape[0], 3, 3))
            h = b.conv(cur, w, None, padding=1, name="branch")
            h = b.activation(h, spec, name="branch_act")
            cur = b.concat([cur, h], name="concat", shape=(shape[0] + 1,) + shape[1:])
        elif kind == "dense":
            n = b.nodes[cur].size
            cur = b.linear(cur, rng.normal(0, 1.0 / np.sqrt(n), (6, n)), rng.normal(0, 0.2, 6), name="dense")
        elif kind == "sparse":
            n = b.nodes[cur].size
            m = sp.random(n, n, density=0.4, random_state=int(rng.integers(1 << 30)), format="csr")
            cur = b.linear(cur, m, rng.normal(0, 0.1, n), name="sparse", shape=shape)
    n = b.nodes[cur].size
    cur = b.linear(cur, rng.normal(0, 1.0 / np.sqrt(n), (2, n)), name="head")
    return b.build(cur, name=f"graph_{seed}")


def small_cnn(seed: int = 0, pool: str = "avg", spec: ActivationSpec | None = None, size: int = 5,
              scale: float = 1.0) -> GraphNetwork:
    """conv -> BatchNorm -> act -> conv -> act (+ skip) -> pooling -> dense head, on 1 x size x size inputs
    (``scale`` multiplies the convolution weights)."""
    spec = spec or ActivationSpec("relu")
    rng = np.random.default_rng(seed)
    b = GraphBuilder((1, size, size))
    h = b.conv(b.input, rng.normal(0, 0.4 * scale, (2, 1, 3, 3)), rng.normal(0, 0.1, 2), padding=1, name="conv1")
    h = add_batchnorm(b, h, rng)
    h = b.activation(h, spec, name="act1")
    g = b.conv(h, rng.normal(0, 0.3 * scale, (2, 2, 3, 3)), rng.normal(0, 0.1, 2), padding=1, name="conv2")
    g = b.activation(g, spec, name="act2")
    h = b.add([h, g], name="skip")
    h = add_maxpool(b, h) if pool == "max" else add_avgpool(b, h)
    n = b.nodes[h].size
    h = b.linear(h, rng.normal(0, 1.0 / np.sqrt(n), (2, n)), rng.normal(0, 0.1, 2), name="head")
    return b.build(h, name="small_cnn")


# ------------------------------------------------------------------------------------------------
# References: node values, samples, inputs pushed to the interval ends
# ------------------------------------------------------------------------------------------------


def node_values(graph: GraphNetwork, x: torch.Tensor) -> list[torch.Tensor]:
    values = [x.reshape(x.shape[0], -1)]
    for node in graph.nodes[1:]:
        values.append(evaluate(node.op, [values[j] for j in node.inputs]))
    return values


def make_domain(kind: str, center: np.ndarray, radius: float):
    if kind == "box":
        return Box(center - radius, center + radius * np.linspace(0.5, 1.5, center.size))
    return Ball(center, radius, norm=kind)


def project(domain, x: torch.Tensor) -> torch.Tensor:
    if isinstance(domain, Box):
        return torch.clamp(x, torch.tensor(domain.lower), torch.tensor(domain.upper))
    c = torch.tensor(domain.center)
    r = domain.radius * (1 - 1e-9)  # the margin absorbs the rounding of c + offset
    if domain.norm == "linf":
        return c + torch.clamp(x - c, -r, r)
    d = x - c
    return c + d * torch.clamp(r / d.norm(dim=1, keepdim=True).clamp_min(1e-300), max=1.0)


def sample_points(domain, rng: np.random.Generator, n: int) -> torch.Tensor:
    if isinstance(domain, Box):
        lo, hi = domain.lower, domain.upper
        corners = np.where(rng.random((n, lo.size)) < 0.5, lo, hi)
        inner = lo + (hi - lo) * rng.random((n, lo.size))
        pts = np.vstack([corners, inner])
    else:
        g = rng.standard_normal((2 * n, domain.dim))
        if domain.norm == "linf":
            g = np.sign(g) * np.where(rng.random(g.shape) < 0.7, 1.0, rng.random(g.shape))
        else:
            g = g / np.linalg.norm(g, axis=1, keepdims=True) * np.where(rng.random((2 * n, 1)) < 0.5, 1.0,
                                                                        rng.random((2 * n, 1)))
        pts = domain.center + domain.radius * g
    return project(domain, torch.from_numpy(pts))


def extremal_points(graph: GraphNetwork, domain, node: int, rng: np.random.Generator, steps: int = 25,
                    max_neurons: int = 40) -> torch.Tensor:
    """Inputs pushed (projected gradient steps) towards the minimum and the maximum of entries of node ``node``."""
    n = graph.nodes[node].size
    neurons = rng.choice(n, size=min(n, max_neurons), replace=False)
    idx = torch.from_numpy(np.concatenate([neurons, neurons]))
    sign = torch.cat([torch.ones(len(neurons)), -torch.ones(len(neurons))]).double()
    x = sample_points(domain, rng, len(idx))[:len(idx)].clone()
    scale = domain.radius if isinstance(domain, Ball) else float(np.max(domain.upper - domain.lower)) / 2
    for it in range(steps):
        x.requires_grad_(True)
        z = node_values(graph, x)[node]
        obj = (sign * z[torch.arange(len(idx)), idx]).sum()
        (grad,) = torch.autograd.grad(obj, x)
        step = scale * 0.5 * (1 - it / steps)
        with torch.no_grad():
            if isinstance(domain, Ball) and domain.norm == "l2":
                x = x + step * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-300)
            else:
                x = x + step * torch.sign(grad)
            x = project(domain, x)
    return x.detach()


def assert_contains(graph: GraphNetwork, bounds: dict, x: torch.Tensor) -> None:
    with torch.no_grad():
        values = node_values(graph, x)
    for i in graph.activation_nodes:
        name = graph.nodes[i].name
        z = values[graph.nodes[i].inputs[0]].numpy()
        lo, hi = bounds[name]
        slack = TOL * (1 + np.abs(z))
        assert np.all(z >= lo - slack), f"{name}: lower bound violated by {np.max(lo - z)}"
        assert np.all(z <= hi + slack), f"{name}: upper bound violated by {np.max(z - hi)}"


def assert_subset(inner: dict, outer: dict) -> None:
    for name in outer:
        assert np.all(inner[name][0] >= outer[name][0]), name
        assert np.all(inner[name][1] <= outer[name][1]), name


def check_sound(graph: GraphNetwork, domain, rng: np.random.Generator, extremal: bool = True) -> tuple[dict, dict]:
    ibp = activation_bounds(graph, domain, method="ibp")
    crown = activation_bounds(graph, domain, method="crown")
    assert list(ibp) == list(crown) == [graph.nodes[i].name for i in graph.activation_nodes]
    assert_subset(crown, ibp)
    x = sample_points(domain, rng, 100)
    assert_contains(graph, ibp, x)
    assert_contains(graph, crown, x)
    if extremal:
        for i in graph.activation_nodes:
            assert_contains(graph, crown, extremal_points(graph, domain, graph.nodes[i].inputs[0], rng))
    return ibp, crown


# ------------------------------------------------------------------------------------------------
# Soundness per operator and on random graphs
# ------------------------------------------------------------------------------------------------


def _around(op_builder, in_shape=(2, 5, 5)) -> GraphNetwork:
    """input -> conv -> tanh -> [operator under test] -> relu -> head: the operator's output is a pre-activation
    whose input is itself bounded by a nonlinearity (so CROWN goes through the operator)."""
    rng = np.random.default_rng(0)
    b = GraphBuilder(in_shape)
    h = b.conv(b.input, rng.normal(0, 0.5, (2, in_shape[0], 3, 3)), rng.normal(0, 0.1, 2), padding=1, name="c0")
    h = b.activation(h, ActivationSpec("tanh"), name="pre")
    h = op_builder(b, h, rng)
    h = b.activation(h, ActivationSpec("relu"), name="post")
    n = b.nodes[h].size
    return b.build(b.linear(h, rng.normal(0, 1, (2, n)), name="head"))


def _conv(**kw):
    def build(b, h, rng):
        c_in = b.shape(h)[0]
        groups = kw.get("groups", 1)
        w = rng.normal(0, 0.5, (2 * groups, c_in // groups, 3, 3))
        err = None if not kw.get("inexact") else np.full(w.shape, 1e-3)
        return b.conv(h, w, rng.normal(0, 0.1, 2 * groups), stride=kw.get("stride", 1), padding=kw.get("padding", 0),
                      dilation=kw.get("dilation", 1), groups=groups, weight_err=err)
    return build


def _conv1d(b, h, rng):
    n = b.nodes[h].size
    h = b.linear(h, np.eye(n), name="to_1d", shape=(2, n // 2))
    return b.conv(h, rng.normal(0, 0.5, (3, 2, 3)), rng.normal(0, 0.1, 3), stride=2, padding=1, name="c1d")


def _dense_inexact(b, h, rng):
    n = b.nodes[h].size
    return b.linear(h, rng.normal(0, 0.3, (7, n)), rng.normal(0, 0.1, 7), err=np.full((7, n), 1e-4), name="dense")


def _sparse_inexact(b, h, rng):
    n = b.nodes[h].size
    m = sp.random(9, n, density=0.3, random_state=1, format="csr")
    op = LinearMap(m, rng.normal(0, 0.1, 9), err=abs(m) * 1e-3, bias_err=np.full(9, 1e-3), kind="sparse")
    return b.node(op, [h], "sparse", (9,))


def _sum_inexact(b, h, rng):
    n = b.nodes[h].size
    g = b.linear(h, rng.normal(0, 0.3, (n, n)), name="mix", shape=b.shape(h))
    return b.add([h, g, h], (0.3, -1.0, 2.0), name="sum", errors=(1e-3, 0.0, 0.0))


def _concat(b, h, rng):
    g = b.conv(h, rng.normal(0, 0.5, (1, 2, 3, 3)), None, padding=1, name="side")
    return b.concat([g, h, g], name="cat")


def _householder(b, h, rng):
    n = b.nodes[h].size
    h = b.node(HouseholderLayer(rng.normal(0, 1, (n // 2, 2)), name="hh"), [h], "hh")
    return b.linear(h, rng.normal(0, 0.3, (6, n)), name="after_hh")


OPERATORS = {
    "conv": _conv(), "conv_stride_pad": _conv(stride=2, padding=1), "conv_dilated": _conv(dilation=2, padding=2),
    "conv_groups": _conv(groups=2, padding=1), "conv_inexact": _conv(inexact=True, padding=1), "conv1d": _conv1d,
    "dense_inexact": _dense_inexact, "sparse_inexact": _sparse_inexact, "batchnorm": add_batchnorm,
    "avgpool": lambda b, h, rng: add_avgpool(b, h, 3, 2), "maxpool": lambda b, h, rng: add_maxpool(b, h),
    "maxpool_overlapping": lambda b, h, rng: add_maxpool(b, h, 3, 1), "sum_inexact": _sum_inexact,
    "concat": _concat, "householder": _householder,
}


@pytest.mark.parametrize("name", list(OPERATORS))
@pytest.mark.parametrize("kind", ["box", "l2", "linf"])
def test_operator_bounds_are_sound(name, kind):
    graph = _around(OPERATORS[name])
    rng = np.random.default_rng(3)
    domain = make_domain(kind, rng.uniform(-1, 1, graph.input_dim), 0.4 if kind == "l2" else 0.15)
    check_sound(graph, domain, rng)


@given(blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6), spec=st.sampled_from(ACTIVATIONS),
       kind=st.sampled_from(["box", "l2", "linf"]), seed=st.integers(0, 2**16),
       radius=st.sampled_from([0.0, 1e-6, 0.1, 0.5]))
@settings(max_examples=40, **SETTINGS)
def test_random_graphs_are_sound(blocks, spec, kind, seed, radius):
    graph = random_graph(seed, ["act"] + blocks + ["act"], spec)
    rng = np.random.default_rng(seed)
    domain = make_domain(kind, rng.uniform(-1, 1, graph.input_dim), radius)
    ibp, crown = check_sound(graph, domain, rng, extremal=radius > 0)
    if radius == 0.0:  # a single point: every pre-activation is pinned down up to rounding
        for lo, hi in crown.values():
            assert np.all(hi - lo <= 1e-9 * (1 + np.abs(lo)))


def test_convolutions_give_the_bounds_of_their_dense_matrices():
    graph = small_cnn(1)
    dense_nodes = tuple(Node(n.name, n.op.as_linear_map(), n.inputs, n.shape) if isinstance(n.op, Conv) else n
                        for n in graph.nodes)
    dense = GraphNetwork(dense_nodes, graph.output, graph.name)
    domain = Ball(np.random.default_rng(0).uniform(0, 1, 25), 0.3)
    for method in ("ibp", "crown"):
        a = activation_bounds(graph, domain, method=method)
        b = activation_bounds(dense, domain, method=method)
        for k in a:
            np.testing.assert_allclose(a[k][0], b[k][0], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(a[k][1], b[k][1], rtol=1e-12, atol=1e-12)


def test_crown_goes_through_skips_and_convolutions():
    graph = small_cnn(2, spec=ActivationSpec("tanh"))
    domain = Box(np.full(25, 0.2), np.full(25, 0.6))
    ibp = activation_bounds(graph, domain, method="ibp")
    crown = activation_bounds(graph, domain, method="crown")
    ratio = np.mean(crown["act2"][1] - crown["act2"][0]) / np.mean(ibp["act2"][1] - ibp["act2"][0])
    assert ratio < 0.9, ratio


def test_chain_networks_take_the_graph_path():
    rng = np.random.default_rng(0)
    net = lipbound.from_weights([rng.normal(size=(5, 3)), rng.normal(size=(5, 5)), rng.normal(size=(2, 5))], "gelu")
    domain = Ball(np.zeros(3), 0.5, norm="linf")
    chain = activation_bounds(net, domain)
    graph = activation_bounds(GraphNetwork.from_network(net), domain)
    assert list(graph) == [n.name for n in GraphNetwork.from_network(net).nodes if n.is_activation]
    for (lo, hi), (glo, ghi) in zip(chain.values(), graph.values(), strict=True):
        np.testing.assert_array_equal(lo, glo)
        np.testing.assert_array_equal(hi, ghi)


@pytest.mark.parametrize("scale", [1e-200, 1e-20, 1e20, 1e120])
def test_huge_and_tiny_weights_on_graphs_stay_sound(scale):
    graph = small_cnn(7, pool="max", spec=ActivationSpec("tanh"), scale=scale)
    domain = Box(np.full(25, -1.0), np.ones(25))
    for method in ("ibp", "crown"):
        bounds = activation_bounds(graph, domain, method=method)
        assert_contains(graph, bounds, sample_points(domain, np.random.default_rng(0), 50))
        for lo, hi in bounds.values():
            assert not np.any(np.isnan(lo)) and not np.any(np.isnan(hi))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bounds_are_sound_and_match_cpu():
    graph = small_cnn(8, pool="max", spec=ActivationSpec("gelu"))
    domain = Ball(np.random.default_rng(8).uniform(0, 1, 25), 0.2)
    cpu = activation_bounds(graph, domain)
    gpu = activation_bounds(graph, domain, device="cuda")
    assert_contains(graph, gpu, sample_points(domain, np.random.default_rng(0), 200))
    for k in cpu:  # the same bounds up to the summation order of the products
        np.testing.assert_allclose(gpu[k][0], cpu[k][0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(gpu[k][1], cpu[k][1], rtol=1e-9, atol=1e-12)


def test_maxpool_is_crossed_by_its_box_and_logged(caplog):
    graph = small_cnn(0, pool="max")
    with caplog.at_level(logging.WARNING, logger="lipbound"):
        activation_bounds(graph, Ball(np.zeros(25), 0.1))
    assert "no linear relaxation" in caplog.text and "'maxpool' (GroupSortLayer)" in caplog.text


def test_large_convolutions_are_chunked(monkeypatch):
    from lipbound.bounds import propagation

    graph = small_cnn(3)
    domain = Box(np.zeros(25), np.full(25, 0.5))
    whole = activation_bounds(graph, domain)
    monkeypatch.setattr(propagation, "CROWN_ENTRIES", 64)  # a few rows per backward pass
    chunked = activation_bounds(graph, domain)
    for k in whole:  # the same bounds up to the summation order of the products
        np.testing.assert_allclose(whole[k][0], chunked[k][0], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(whole[k][1], chunked[k][1], rtol=1e-13, atol=1e-15)
    assert_contains(graph, chunked, sample_points(domain, np.random.default_rng(0), 100))


def test_graph_refusals_name_the_node():
    rng = np.random.default_rng(0)
    act = SlopeRestricted(ActivationSpec("relu"), 3, name="eq_relu")
    implicit = ImplicitLayer(0.1 * rng.standard_normal((3, 3)), rng.standard_normal((3, 2)), act, name="deq")
    graph = GraphNetwork.from_network(Network((Affine(np.eye(2)), implicit, Affine(np.ones((1, 3))))))
    with pytest.raises(FormulationError, match="implicit layer 'deq' is not supported"):
        activation_bounds(graph, Box(np.zeros(2), np.ones(2)))
    cnn = small_cnn(0)
    with pytest.raises(lipbound.DomainError, match=r"takes 25 inputs \(input shape 1x5x5, flattened in C order\)"):
        activation_bounds(cnn, Box(np.zeros(5), np.ones(5)))


# ------------------------------------------------------------------------------------------------
# Local slopes, local certificates and lower bounds on graphs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_local_slopes_of_graphs_narrow_slope_restricted_nodes(pool):
    graph = small_cnn(4, pool=pool, spec=ActivationSpec("tanh"))
    rng = np.random.default_rng(4)
    domain = Ball(rng.uniform(0, 1, 25), 0.2, norm="linf")
    local = local_slopes(graph, domain)
    assert isinstance(local, GraphNetwork) and [n.name for n in local.nodes] == [n.name for n in graph.nodes]
    bounds = activation_bounds(graph, domain)
    x1, x2 = sample_points(domain, rng, 100), sample_points(domain, rng, 100)
    v1, v2 = node_values(graph, x1), node_values(graph, x2)
    for i in graph.activation_nodes:
        old, new = graph.nodes[i].op, local.nodes[i].op
        if not isinstance(old, SlopeRestricted):
            assert new is old  # GroupSort keeps its global quadratic constraints
            continue
        assert np.all(new.alpha >= old.alpha) and np.all(new.beta <= old.beta)
        assert np.mean(new.beta - new.alpha) < 0.9 * np.mean(old.beta - old.alpha)
        z = graph.nodes[i].inputs[0]
        assert np.all(slope_range_contains(new, v1[z], v2[z], *bounds[graph.nodes[i].name]))
    np.testing.assert_array_equal(local(x1).numpy(), graph(x1).numpy())


def slope_range_contains(layer: SlopeRestricted, z1: torch.Tensor, z2: torch.Tensor, lo, hi) -> np.ndarray:
    """Whether the difference quotients of the layer's activation between ``z1`` and ``z2`` lie in
    ``[alpha, beta]`` (up to float evaluation noise)."""
    a, b = np.clip(z1.numpy(), lo, hi), np.clip(z2.numpy(), lo, hi)
    fa = layer.activation.torch(torch.from_numpy(a)).numpy()
    fb = layer.activation.torch(torch.from_numpy(b)).numpy()
    far = np.abs(a - b) > 1e-6
    q = np.where(far, (fa - fb) / np.where(far, a - b, 1.0), 0.5 * (layer.alpha + layer.beta))
    return (q >= layer.alpha - 1e-6) & (q <= layer.beta + 1e-6)


def _local_pairs(graph: GraphNetwork, domain: Ball, rng: np.random.Generator, n: int = 300) -> float:
    x = sample_points(domain, rng, n)
    d = torch.from_numpy(rng.standard_normal(x.shape))
    y = project(domain, x + 1e-3 * domain.radius * d / d.norm(dim=1, keepdim=True))
    with torch.no_grad():
        ratio = (graph(x) - graph(y)).norm(dim=1) / (x - y).norm(dim=1).clamp_min(1e-300)
    return float(ratio.max())


@pytest.mark.parametrize("spec", [ActivationSpec("relu"), ActivationSpec("tanh")], ids=["relu", "tanh"])
def test_local_certificate_of_a_cnn_bounds_sampled_pairs_and_the_attack(spec):
    graph = small_cnn(5, spec=spec, size=4)
    rng = np.random.default_rng(5)
    domain = Ball(rng.uniform(0, 1, 16), 0.1)
    glob = lipbound.certify(graph, method="lipsdp-neuron")
    local = lipbound.certify(graph, method="lipsdp-neuron", domain=domain)
    assert glob.certified and local.certified
    assert local.upper_bound <= glob.upper_bound * (1 + 1e-6)
    assert local.options["domain"]["radius"] == 0.1
    assert local.upper_bound >= _local_pairs(graph, domain, rng)
    lower = lipbound.lower_bound(graph, domain=domain, n_starts=8, steps=10)
    assert lower.value <= local.upper_bound
    assert lipbound.verify_certificate(local, graph).valid


def test_local_certificate_of_a_maxpool_cnn():
    graph = small_cnn(6, pool="max", size=4)
    rng = np.random.default_rng(6)
    domain = Ball(rng.uniform(0, 1, 16), 0.1, norm="linf")
    local = lipbound.certify(graph, method="lipsdp-nsr", domain=domain)
    assert local.certified and local.upper_bound >= _local_pairs(graph, domain, rng)
    assert lipbound.lower_bound(graph, domain=domain, n_starts=8, steps=10).value <= local.upper_bound
