"""The graph IR: construction and validation, the interpreter, chain round trips, and formulations on graphs
(skip connections, convolutions, pooling) checked against chains, unrolled dense programs and evaluated pairs."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

import lipbound
import lipbound.nn as lnn
from lipbound import ActivationSpec, GraphNetwork, NetworkError
from lipbound.graph import Conv, GraphBuilder, LinearMap, Node
from lipbound.network import Affine, Network, ResidualBlock, SlopeRestricted


def _jacobian_lower(f, n_in: int, norm: str = "l2", output_index=None, n: int = 30, seed: int = 0,
                    shape=None) -> float:
    """Largest Jacobian norm of ``f`` (batch -> batch) at random points: an independent lower bound."""
    if shape is not None:
        g = f
        f = lambda z: g(z.reshape(z.shape[0], *shape))  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for k in range(n):
        x = (0.3 + k % 3) * torch.randn(1, n_in, dtype=torch.float64, generator=gen)
        jac = torch.autograd.functional.jacobian(lambda z: f(z).reshape(-1), x).reshape(-1, n_in)
        if norm == "l2":
            best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
        else:
            best = max(best, float(jac[output_index].abs().sum()))
    return best


def test_builder_validation_and_interpreter():
    b = GraphBuilder((2,))
    h = b.linear(b.input, np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, -1.0]), name="fc")
    r = b.activation(h, "relu", name="relu")
    out = b.add([b.input, r], coefficients=[2.0, -1.0], name="mix")
    net = b.build(out, name="g")
    x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    np.testing.assert_allclose(net(x).numpy(), [[2.0, -2.0]])
    assert net.dims == (2, 2, 2) and net.n_hidden == 2 and "sum" in net.summary()
    with pytest.raises(NetworkError, match="shape mismatch at node 'bad'"):
        GraphNetwork(net.nodes[:2] + (Node("bad", LinearMap(np.eye(3)), (1,), (3,)),), -1)
    with pytest.raises(NetworkError, match="do not precede"):
        GraphNetwork((net.nodes[0], Node("loop", LinearMap(np.eye(2)), (1,), (2,))), -1)
    dead = GraphBuilder((2,))
    dead.linear(dead.input, np.eye(2), name="unused")
    keep = dead.linear(dead.input, np.eye(2), name="used")
    assert [n.name for n in dead.build(keep).nodes] == ["input", "used"]  # build prunes what is unused
    with pytest.raises(NetworkError, match="do not contribute"):
        GraphNetwork(tuple(dead.nodes), keep)


def test_conv_matrix_equals_its_forward():
    rng = np.random.default_rng(0)
    conv = Conv(rng.standard_normal((4, 2, 3, 2)), None, (4, 5, 6), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                groups=2)
    dense = conv.forward(torch.eye(conv.in_dim, dtype=torch.float64)).T.numpy()
    np.testing.assert_array_equal(conv.matrix().toarray(), dense)
    ref = F.conv2d(torch.zeros(1, 4, 5, 6, dtype=torch.float64), torch.tensor(conv.weight), None, (2, 1), (1, 2),
                   (1, 2), 2)
    assert conv.out_shape == tuple(ref.shape[1:]) == (4, 3, 8)


def _residual_pair(seed=0, act=None):
    torch.manual_seed(seed)
    act = nn.ReLU() if act is None else act

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
            self.act = act

        def forward(self, x):
            h = self.a(x)
            h = h + self.act(self.b(h))
            h = h + self.c(torch.tanh(h))
            return self.d(h)

    model = Res().double()
    w = {k: (m.weight.detach().numpy(), m.bias.detach().numpy()) for k, m in model.named_children() if k != "act"}
    act_layer = lipbound.from_torch(nn.Sequential(nn.Linear(6, 6), act), input_shape=6).activations[0]
    chain = Network.from_layers([
        Affine(*w["a"]),
        ResidualBlock(Affine(*w["b"]), SlopeRestricted(act_layer.activation, 6)),
        ResidualBlock(Affine(np.eye(6)), SlopeRestricted(ActivationSpec("tanh"), 6), Affine(*w["c"])),
        Affine(*w["d"])])
    return model, chain


@pytest.mark.parametrize("method", ["lipsdp-neuron", "lipsdp-layer", "mp"])
def test_skip_connections_in_forward_certify_like_residual_blocks(method):
    model, chain = _residual_pair()
    graph = lipbound.from_torch(model, input_shape=5)
    assert isinstance(graph, GraphNetwork)
    x = torch.randn(4, 5, dtype=torch.float64)
    np.testing.assert_allclose(graph(x).numpy(), chain(x).numpy(), rtol=1e-12)
    a, b = lipbound.certify(graph, method=method), lipbound.certify(chain, method=method)
    assert a.certified and b.certified
    assert a.upper_bound == pytest.approx(b.upper_bound, rel=1e-9)
    assert a.upper_bound >= _jacobian_lower(model, 5)


def test_chain_and_its_graph_give_the_same_program():
    from lipbound.formulations.graph import graph_signal_model
    from lipbound.formulations.sdp import lipschitz_problem
    from lipbound.formulations.signal import signal_model

    _, chain = _residual_pair(1)
    graph = GraphNetwork.from_network(chain)
    for form in ("neuron", "layer"):
        p1 = lipschitz_problem(signal_model(chain), slope_mode=form).program
        p2 = lipschitz_problem(graph_signal_model(graph), slope_mode=form).program
        y = np.abs(np.random.default_rng(0).standard_normal(p1.n_vars))
        assert p1.n_vars == p2.n_vars
        for l1, l2 in zip(p1.lmis, p2.lmis, strict=True):
            np.testing.assert_allclose(l1.assemble(y), l2.assemble(y), rtol=1e-14, atol=1e-14)
    assert graph.to_network() is None  # residual structure: not a plain chain
    plain = lipbound.from_weights([np.ones((3, 2)), np.ones((1, 3))])
    assert GraphNetwork.from_network(plain).to_network().dims == plain.dims


class SmallCNN(nn.Module):
    def __init__(self, c=2, pool=None, skip=False):
        super().__init__()
        self.c1 = nn.Conv2d(1, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.pool = pool
        self.skip = skip
        side = 6 if pool is None else 3
        self.fc = nn.Linear(c * side * side, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        g = F.leaky_relu(self.c2(h), 0.1)
        if self.skip:
            g = g + h
        if self.pool is not None:
            g = self.pool(g)
        return self.fc(torch.flatten(g, 1))


def _unrolled(graph: GraphNetwork) -> GraphNetwork:
    """The same network with every convolution replaced by its dense matrix."""
    nodes = tuple(Node(n.name, LinearMap(n.op.matrix().toarray(), n.op.as_linear_map().bias, n.op.matrix_err())
                       if isinstance(n.op, Conv) else n.op, n.inputs, n.shape) for n in graph.nodes)
    return GraphNetwork(nodes, graph.output, graph.name + "_unrolled")


def _cnn(seed, **kw):
    torch.manual_seed(seed)
    model = SmallCNN(**kw).double().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model


def test_cnn_lipsdp_equals_unrolled_dense_program_and_channel_multipliers():
    model = _cnn(0)
    graph = lipbound.from_torch(model, input_shape=(1, 6, 6))
    unrolled = _unrolled(graph)
    neuron = lipbound.certify(graph, method="lipsdp-neuron")
    dense = lipbound.certify(unrolled, method="lipsdp-neuron")
    channel = lipbound.certify(graph, method="lipsdp-channel")
    assert neuron.certified and dense.certified and channel.certified
    assert neuron.upper_bound == pytest.approx(dense.upper_bound, rel=1e-6)
    n_channel_vars = channel.sizes["n_vars"]
    assert n_channel_vars == 1 + 2 * 2 < neuron.sizes["n_vars"]  # rho + one per channel of each conv layer
    lower = _jacobian_lower(model, 36, shape=(1, 6, 6))
    assert lower <= neuron.upper_bound <= channel.upper_bound * (1 + 1e-9)
    assert neuron.upper_bound <= lipbound.certify(graph, method="mp").upper_bound


@pytest.mark.parametrize("kw", [{"pool": nn.MaxPool2d(2)}, {"pool": nn.AvgPool2d(2)}, {"skip": True},
                                {"pool": nn.MaxPool2d(3, stride=2, padding=1), "skip": True}],
                         ids=["maxpool", "avgpool", "skip", "overlapping-maxpool-skip"])
def test_cnn_bounds_are_sound(kw):
    model = _cnn(1, **kw)
    graph = lipbound.from_torch(model, input_shape=(1, 6, 6))
    method = "lipsdp-nsr" if isinstance(kw.get("pool"), nn.MaxPool2d) else "lipsdp-neuron"
    cert = lipbound.certify(graph, method=method)
    mp = lipbound.certify(graph, method="mp")
    lower = _jacobian_lower(model, 36, shape=(1, 6, 6))
    assert cert.certified and mp.certified
    assert lower <= cert.upper_bound <= mp.upper_bound * (1 + 1e-9)


def test_maxpool_alone_is_exactly_one_lipschitz():
    graph = lipbound.from_torch(nn.Sequential(nn.MaxPool2d(2), nn.Flatten()), input_shape=(2, 4, 4))
    cert = lipbound.certify(graph, method="lipsdp-nsr")
    assert cert.certified and 1.0 <= cert.upper_bound <= 1.0 + 1e-6


def test_graph_linf_bound_is_sound():
    model = _cnn(2, skip=True)
    graph = lipbound.from_torch(model, input_shape=(1, 6, 6))
    for i in (0, 2):
        cert = lipbound.certify(graph, method="lipsdp-neuron", norm="linf", output_index=i)
        mp = lipbound.certify(graph, method="mp", norm="linf", output_index=i)
        lower = _jacobian_lower(model, 36, "linf", i, shape=(1, 6, 6))
        assert cert.certified and lower <= cert.upper_bound <= mp.upper_bound * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_random_graphs_with_skips_concat_and_groupsort_are_sound(seed):
    rng = np.random.default_rng(seed)
    b = GraphBuilder((4,))
    h1 = b.linear(b.input, rng.standard_normal((6, 4)), rng.standard_normal(6), name="a")
    a1 = b.activation(h1, ["relu", "tanh", "elu"][seed % 3], name="act1")
    h2 = b.linear(a1, rng.standard_normal((4, 6)), name="b")
    s = b.add([b.input, h2], coefficients=[1.0, -0.5], name="skip")
    gs = b.node(lipbound.GroupSortLayer(4, 2), [s], name="maxmin")
    cat = b.concat([gs, a1], name="cat")
    out = b.linear(cat, rng.standard_normal((2, 10)), name="out")
    graph = b.build(out, name=f"random{seed}")
    cert = lipbound.certify(graph, method="lipsdp-nsr")
    mp = lipbound.certify(graph, method="mp")
    lower = _jacobian_lower(graph.forward, 4)
    assert cert.certified and lower <= cert.upper_bound <= mp.upper_bound * (1 + 1e-9)


def test_inexact_coefficients_are_enclosed():
    """BatchNorm and 1/3-type coefficients carry an error bound that the certificate absorbs."""
    graph = lipbound.from_torch(nn.Sequential(nn.Linear(3, 3), nn.AvgPool1d(3)), input_shape=(1, 3))
    pool = [n.op for n in graph.nodes if isinstance(n.op, LinearMap) and n.op.kind == "avgpool"]
    assert pool and pool[0].err is not None and sp.issparse(pool[0].err)
    exact_w = graph.nodes[1].op.dense()
    exact = np.linalg.norm(exact_w.sum(axis=0) / 3)
    cert = lipbound.certify(graph, method="lipsdp-neuron")
    assert exact <= cert.upper_bound <= exact * (1 + 1e-6)


def test_groupsort_and_householder_graphs_match_chains():
    torch.manual_seed(0)
    chain_model = nn.Sequential(nn.Linear(3, 4), lnn.Householder([[1.0, 1.0], [0.0, 1.0]]), nn.Linear(4, 2)).double()
    net = lipbound.from_torch(chain_model, input_shape=3)
    assert isinstance(net, Network)
    graph = GraphNetwork.from_network(net)
    a = lipbound.certify(net, method="lipsdp-nsr", coupled=True)
    b = lipbound.certify(graph, method="lipsdp-nsr", coupled=True)
    assert a.upper_bound == pytest.approx(b.upper_bound, rel=1e-9)
