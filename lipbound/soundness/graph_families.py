"""Graph families of the soundness campaign: random DAGs with skip connections, small CNNs imported from torch, and
the same models read back from ONNX.

* ``graph-skip``: :class:`~lipbound.graph.GraphNetwork` DAGs built with :class:`~lipbound.graph.GraphBuilder`:
  sums with random coefficients (skip connections, subtractions), concatenations, slices and gathers, dense and
  sparse maps, every activation family (slope-restricted, MaxMin/GroupSort/FullSort, Householder), and in one
  trial of three *inexact* operators (maps, biases and sum coefficients with entrywise error bounds), judged at a
  corner of their error boxes (see :func:`within_errors`).
* ``cnn``: small torch modules (1-D and 2-D convolutions with stride, padding, dilation and groups; BatchNorm in
  eval mode with random statistics; average, adaptive average and max pooling, overlapping windows included;
  skip connections, channel concatenations and slices written in ``forward``; constant gains; flatten) imported
  with :func:`lipbound.from_torch`.
* ``onnx``: the same kind of modules exported to ONNX (legacy exporter, opset 17, float64) and imported with
  :func:`lipbound.from_onnx`; judged on the ONNX model's own function, evaluated by onnxruntime
  (:class:`~lipbound.soundness.reference.OnnxReference`), where onnxruntime has float64 kernels for every
  operator, else on the imported network (:class:`~lipbound.soundness.reference.Reference`); the case's
  ``params["judge"]`` says which.

Every case draws its norm (l2, or l-infinity of one output), and global or local (a box, an l2 or l-infinity
ball; CROWN or IBP activation bounds) certification, and runs every method that applies (``lipsdp-channel`` on
networks with convolutional activations).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from fractions import Fraction

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from lipbound.bounds import Ball, Box
from lipbound.graph import Conv, GraphBuilder, GraphNetwork, LinearMap, Node, Sum
from lipbound.soundness.families import (
    GROUP_KINDS,
    SLOPE_ACTIVATIONS,
    Case,
    Family,
    Run,
    _activation,
    _gaussian,
    _log_uniform,
    _stage,
    _width,
    runs_for,
)
from lipbound.soundness.reference import OnnxReference, Reference

#: Most hidden neurons of a drawn CNN (larger draws are redrawn), so that a trial takes about a second.
MAX_CNN_NEURONS = 150


# ----------------------------------------------------------------------------------------------------------------
# What every graph case draws: norm, domain, activation-bound method
# ----------------------------------------------------------------------------------------------------------------


def _setting(rng: np.random.Generator, network) -> tuple[dict, str]:
    """Keyword arguments of :class:`Case` (norm, output index, domain) and the runs' options, with a label."""
    norm = "linf" if rng.random() < 0.25 else "l2"
    out = {"norm": norm, "output_index": int(rng.integers(0, network.output_dim)) if norm == "linf" else None,
           "domain": None, "options": {}}
    label = norm
    if rng.random() < 0.3:
        n = network.input_dim
        center = rng.standard_normal(n) * _log_uniform(rng, 0.1, 2.0)
        kind = str(rng.choice(["ball-l2", "ball-linf", "box"]))
        if kind == "box":
            half = np.array([_log_uniform(rng, 1e-3, 2.0) for _ in range(n)])
            half[rng.random(n) < 0.1] = 0.0
            out["domain"] = Box(center - half, center + half)
        else:
            out["domain"] = Ball(center, _log_uniform(rng, 1e-3, 2.0), norm=kind.split("-")[1])
        out["options"]["bounds_method"] = "ibp" if rng.random() < 0.3 else "crown"
        label = f"{kind}/{norm}"
    return out, label


def _case(rng: np.random.Generator, network, variant: str, params: dict, **extra) -> Case:
    setting, label = _setting(rng, network)
    options = setting.pop("options")
    params = {**params, "norm": setting["norm"], "output_index": setting["output_index"],
              "local": setting["domain"] is not None, **options, "dims": list(network.dims)}
    return Case(network, runs_for(network, rng, **options), f"{variant}/{label}", params=params, **setting, **extra)


# ----------------------------------------------------------------------------------------------------------------
# graph-skip
# ----------------------------------------------------------------------------------------------------------------

_GRAPH_KINDS = SLOPE_ACTIVATIONS + GROUP_KINDS + ("mixed", "mixed")
_MIXED = ("relu", "tanh", "leaky_relu", "gelu", "maxmin", "groupsort3", "householder2")


def _map(rng: np.random.Generator, b: GraphBuilder, x: int, rows: int, inexact: bool, name: str) -> int:
    """A random affine map of node ``x`` to ``rows`` outputs: dense or sparse, in an inexact graph with an entrywise
    error bound on some of its entries and on its bias (relative 1e-6 .. 1e-1)."""
    cols = b.nodes[x].size
    w = _gaussian(rng, rows, cols, _log_uniform(rng, 0.5, 2.0))
    bias = rng.standard_normal(rows) * rng.uniform(0, 1)
    if rng.random() < 0.25:
        w[rng.random(w.shape) < 0.5] = 0.0
        if not np.any(w):
            w[0, 0] = 1.0
    matrix = sp.csr_matrix(w) if rng.random() < 0.3 else w
    err = bias_err = None
    if inexact and rng.random() < 0.6:
        err = np.abs(w) * _log_uniform(rng, 1e-6, 1e-1) * (rng.random(w.shape) < 0.7)
        bias_err = np.abs(bias) * _log_uniform(rng, 1e-6, 1e-1)
    op = LinearMap(matrix, bias, err, bias_err, kind="inexact" if err is not None else "linear")
    return b.node(op, [x], name, (rows,))


def _slice(rng: np.random.Generator, b: GraphBuilder, x: int) -> int:
    """A contiguous slice ``x[a:c]`` or a gather (a permutation with repeats) of node ``x``."""
    n = b.nodes[x].size
    if rng.random() < 0.6:
        a = int(rng.integers(0, n))
        index = np.arange(a, int(rng.integers(a + 1, n + 1)))
        kind = "slice"
    else:
        index = rng.integers(0, n, int(rng.integers(1, n + 2)))
        kind = "gather"
    select = sp.csr_matrix((np.ones(index.size), (np.arange(index.size), index)), shape=(index.size, n))
    return b.linear(x, select, name=kind, kind=kind)


def _source(rng: np.random.Generator, b: GraphBuilder, pool: list[int]) -> int:
    """What the next stage reads: a node of the pool, a concatenation of two, or a slice of one."""
    u = rng.random()
    x = pool[int(rng.integers(len(pool)))]
    if u < 0.3 and len(pool) > 1:
        y = pool[int(rng.integers(len(pool)))]
        return b.concat([x, y] if rng.random() < 0.5 else [y, x], name="concat")
    if u < 0.5:
        return _slice(rng, b, x)
    return x


def _coefficients(rng: np.random.Generator, n: int, inexact: bool) -> tuple[list[float], list[float]]:
    c = [float(v) for v in rng.uniform(-2, 2, n)]
    errors = [abs(v) * _log_uniform(rng, 1e-6, 1e-1) for v in c] if inexact and rng.random() < 0.5 else []
    return c, errors


def graph_skip_network(rng: np.random.Generator, kind: str, inexact: bool = False) -> GraphNetwork:
    """A random DAG: 1 to 3 stages ``source -> map -> activation [-> map -> sum with earlier nodes]``, where a
    stage's source is an earlier node, a concatenation of two or a slice, and its sum has random coefficients;
    the output is a map of the last node (or of its concatenation with an earlier one, or a sum of two heads).

    ``kind`` is an activation name, a GroupSort/Householder kind, or ``"mixed"`` (one drawn per stage).
    """
    n_in, n_out = int(rng.integers(2, 6)), int(rng.integers(1, 5))
    b = GraphBuilder((n_in,))
    pool = [b.input]
    specs: dict = {}
    for s in range(int(rng.integers(1, 4))):
        k = str(rng.choice(_MIXED)) if kind == "mixed" else kind
        if k not in GROUP_KINDS and k not in specs:
            specs[k] = _activation(rng, k)
        width = _width(rng, k)
        pre = _map(rng, b, _source(rng, b, pool), width, inexact, f"map_{s}")
        node = b.node(_stage(rng, k, width, f"{k}_{s}", specs.get(k)), [pre], f"{k}_{s}", (width,))
        if rng.random() < 0.6:
            target = pool[int(rng.integers(len(pool)))]
            size = b.nodes[target].size
            terms = [target, _map(rng, b, node, size, inexact, f"back_{s}")]
            same = [i for i in pool if b.nodes[i].size == size and i != target]
            if same and rng.random() < 0.3:
                terms.append(same[int(rng.integers(len(same)))])
            c, errors = _coefficients(rng, len(terms), inexact)
            node = b.add(terms, c, name=f"skip_{s}", errors=errors)
        pool.append(node)
    last = pool[-1]
    if len(pool) > 2 and rng.random() < 0.4:
        last = b.concat([last, pool[int(rng.integers(1, len(pool) - 1))]], name="concat_out")
    out = _map(rng, b, last, n_out, inexact, "head")
    if rng.random() < 0.2:
        other = _map(rng, b, pool[int(rng.integers(len(pool)))], n_out, inexact, "head_skip")
        c, errors = _coefficients(rng, 2, inexact)
        out = b.add([out, other], c, name="heads", errors=errors)
    return b.build(out, name="campaign")


def _toward_edge(a: np.ndarray, err: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``a + signs * err``, each entry rounded toward ``a`` where that sum is not a float, so that
    ``|out - a| <= err`` holds exactly."""
    out = np.array(a + signs * err, dtype=np.float64)
    for idx in zip(*np.nonzero(err), strict=True):
        while abs(Fraction(float(out[idx])) - Fraction(float(a[idx]))) > Fraction(float(err[idx])):
            out[idx] = np.nextafter(out[idx], a[idx])
    return out


def within_errors(network: GraphNetwork, rng: np.random.Generator) -> GraphNetwork:
    """The network with every inexact operator replaced by an exact one at a random corner of its error box:
    matrices ``A + s * err``, biases ``b + t * bias_err``, convolution kernels ``W + s * weight_err`` and sum
    coefficients ``c + s * e`` (random signs ``s``, ``t``; entries rounded toward the stored ones where needed).

    A certificate of ``network`` must hold for every operator within its error bounds (the exact operator is only
    known to lie there), so each such network is a fair judge of it, and a corner is where a formulation that
    ignored an error bound would be caught first.

    Examples
    --------
    >>> import numpy as np
    >>> from lipbound.graph import GraphBuilder
    >>> b = GraphBuilder((2,))
    >>> net = b.build(b.linear(b.input, np.eye(2), err=np.full((2, 2), 0.25)))
    >>> corner = within_errors(net, np.random.default_rng(0)).nodes[1].op
    >>> corner.exact, bool(np.all(np.abs(corner.dense() - np.eye(2)) == 0.25))
    (True, True)
    """
    nodes = []
    for node in network.nodes:
        op = node.op
        if isinstance(op, LinearMap) and (op.err is not None or op.bias_err is not None):
            a = op.dense()
            err = np.zeros_like(a) if op.err is None else op.dense_err()
            matrix = _toward_edge(a, err, rng.choice([-1.0, 1.0], a.shape))
            bias = op.bias if op.bias_err is None else _toward_edge(op.bias, op.bias_err,
                                                                   rng.choice([-1.0, 1.0], op.bias.shape))
            op = LinearMap(sp.csr_matrix(matrix) if sp.issparse(op.matrix) else matrix, bias, kind=op.kind)
        elif isinstance(op, Conv) and op.weight_err is not None:
            weight = _toward_edge(op.weight, op.weight_err, rng.choice([-1.0, 1.0], op.weight.shape))
            op = Conv(weight, op.bias, op.in_shape, op.stride, op.padding, op.dilation, op.groups, kind=op.kind)
        elif isinstance(op, Sum) and any(op.errors):
            c = np.array(op.coefficients)
            op = Sum(tuple(_toward_edge(c, np.array(op.errors), rng.choice([-1.0, 1.0], c.shape)).tolist()))
        nodes.append(Node(node.name, op, node.inputs, node.shape))
    return GraphNetwork(tuple(nodes), network.output, network.name)


def _inexact(network: GraphNetwork) -> bool:
    return any((isinstance(n.op, LinearMap) and (n.op.err is not None or n.op.bias_err is not None))
               or (isinstance(n.op, Conv) and n.op.weight_err is not None)
               or (isinstance(n.op, Sum) and any(n.op.errors)) for n in network.nodes)


def _graph_skip(rng: np.random.Generator) -> Case:
    kind = str(rng.choice(_GRAPH_KINDS))
    inexact = rng.random() < 1 / 3
    net = graph_skip_network(rng, kind, inexact)
    params = {"kind": kind, "inexact": inexact, "nodes": len(net.nodes)}
    if not _inexact(net):
        return _case(rng, net, kind, {**params, "judge": "reference"})
    corner = within_errors(net, rng)
    return _case(rng, net, f"{kind}/inexact", {**params, "judge": "reference at a corner of the error bounds"},
                 search_network=corner, reference=Reference(corner))


# ----------------------------------------------------------------------------------------------------------------
# Small CNNs as torch modules (the cnn and onnx families)
# ----------------------------------------------------------------------------------------------------------------

def _torch_activation(rng: np.random.Generator, name: str, channels: int) -> tuple[nn.Module, str]:
    """An activation module over ``channels`` features (for half the element-wise ones, a functional call in
    ``forward``) and its label."""
    if name == "maxmin":
        from lipbound.nn import MaxMin

        return MaxMin(), name
    if name == "householder2":
        from lipbound.nn import Householder

        return Householder(rng.standard_normal((channels // 2, 2))), name
    p = _activation(rng, name).params
    functional = rng.random() < 0.5
    if name == "softplus":  # torch's Softplus is the identity above threshold/beta: lipbound needs threshold >= 50
        module = nn.Softplus(p["beta"], threshold=60.0)
    elif name == "gelu_tanh":
        module = nn.GELU(approximate="tanh")
    elif functional:
        fn = {"relu": F.relu, "leaky_relu": F.leaky_relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
              "elu": F.elu, "gelu": F.gelu, "silu": F.silu, "mish": F.mish}[name]
        module = _Functional(fn, **p)
    else:
        module = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
                  "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish}[name](*p.values())
    return module, name + (" (functional)" if isinstance(module, _Functional) else "")


class _Functional(nn.Module):
    """A functional activation call (``F.leaky_relu(x, 0.1)``) inside ``forward``, as the traced code sees it."""

    def __init__(self, fn, **kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, x):
        return self.fn(x, **self.kwargs)


class _Gain(nn.Module):
    """``x * c`` or ``x / d`` (a constant gain written in ``forward``; ``1/d`` is inexact for d = 3, 10, ...)."""

    def __init__(self, value: float, divide: bool):
        super().__init__()
        self.value, self.divide = value, divide

    def forward(self, x):
        return x / self.value if self.divide else self.value * x


class _Block(nn.Module):
    """``h = act(bn(gain * conv(x)))``, then optionally a skip ``h + c * conv2(act2(h))`` (``c`` of either sign;
    two activations in a row, as written) or a channel concatenation ``cat([h, conv2(h)[:, :k]])``, then
    optionally a pooling layer."""

    def __init__(self, conv, gain, bn, act, skip=None, skip_act=None, skip_gain=1.0, concat=None, keep=0,
                 pool=None):
        super().__init__()
        self.conv, self.gain, self.bn, self.act = conv, gain, bn, act
        self.skip, self.skip_act, self.skip_gain = skip, skip_act, skip_gain
        self.concat, self.keep, self.pool = concat, keep, pool

    def forward(self, x):
        h = self.conv(x)
        if self.gain is not None:
            h = self.gain(h)
        if self.bn is not None:
            h = self.bn(h)
        h = self.act(h)
        if self.skip is not None:
            h = h + self.skip_gain * self.skip(self.skip_act(h))
        if self.concat is not None:
            h = torch.cat([h, self.concat(h)[:, :self.keep]], dim=1)
        if self.pool is not None:
            h = self.pool(h)
        return h


class _SmallNet(nn.Module):
    """``head(flatten(blocks(x)))`` where the head is ``[gain *] fc(x)`` or ``fc2(act(fc1(x)) [+ c * skip])``."""

    def __init__(self, stem, blocks, flatten: str, fc1, act=None, fc_skip=None, skip_gain=1.0, fc2=None,
                 gain=None):
        super().__init__()
        self.stem, self.blocks = stem, nn.ModuleList(blocks)
        self.flatten_mode, self.fc1, self.act, self.fc_skip, self.skip_gain, self.fc2 = \
            flatten, fc1, act, fc_skip, skip_gain, fc2
        self.gain = gain
        self.flatten = nn.Flatten()

    def forward(self, x):
        h = self.stem(x) if self.stem is not None else x
        for block in self.blocks:
            h = block(h)
        if self.flatten_mode == "module":
            h = self.flatten(h)
        elif self.flatten_mode == "reshape":
            h = h.reshape(h.shape[0], -1)
        else:
            h = torch.flatten(h, 1)
        h = self.fc1(h)
        if self.fc2 is not None:
            h = self.act(h)
            if self.fc_skip is not None:
                h = h - self.skip_gain * self.fc_skip(h)
            h = self.fc2(h)
        return self.gain(h) if self.gain is not None else h


_CNN_ARCHITECTURES = ("conv2d", "conv2d", "conv1d", "pool-mlp")
_CNN_KINDS = SLOPE_ACTIVATIONS + ("maxmin", "householder2")


def _gain(rng: np.random.Generator) -> _Gain | None:
    u = rng.random()
    if u < 0.5:
        return None
    if u < 0.75:
        return _Gain(float(rng.choice([2.0, 0.5, 3.0, float(rng.uniform(0.2, 3.0))])), False)
    return _Gain(float(rng.choice([3.0, 10.0, 7.0])), True)


def _pool(rng: np.random.Generator, nd: int, spatial: tuple[int, ...], divisible: bool) -> nn.Module | None:
    """Max, average or adaptive average pooling that fits ``spatial`` (overlapping windows when stride < kernel;
    ``divisible``: adaptive output sizes that divide the input's)."""
    kind = str(rng.choice(["max", "avg", "adaptive"]))
    k = int(rng.integers(2, min(3, min(spatial)) + 1)) if min(spatial) >= 2 else 1
    if k < 2:
        return None
    stride = int(rng.integers(1, k + 1))
    pad = int(rng.integers(0, k // 2 + 1)) if rng.random() < 0.3 else 0
    if kind == "adaptive":
        # Output sizes that do not divide the input give overlapping windows of unequal sizes; torch's ONNX
        # exporter refuses them.
        sizes = [s for s in range(1, min(3, min(spatial)) + 1) if not divisible or all(d % s == 0 for d in spatial)]
        size = int(rng.choice(sizes))
        return (nn.AdaptiveAvgPool1d if nd == 1 else nn.AdaptiveAvgPool2d)(size)
    if kind == "max":
        return (nn.MaxPool1d if nd == 1 else nn.MaxPool2d)(k, stride, pad)
    return (nn.AvgPool1d if nd == 1 else nn.AvgPool2d)(k, stride, pad, count_include_pad=bool(rng.random() < 0.5))


def _conv(rng: np.random.Generator, nd: int, c_in: int, c_out: int, spatial: tuple[int, ...],
          same: bool = False) -> nn.Module:
    """A convolution with random kernel, stride, padding, dilation and groups that fits ``spatial`` (``same``:
    stride 1 and a padding that keeps the spatial size)."""
    cls = nn.Conv1d if nd == 1 else nn.Conv2d
    groups = int(rng.choice([g for g in (1, 2, 3) if c_in % g == 0 and c_out % g == 0]))
    while True:
        k = int(rng.choice([1, 2, 3])) if not same else int(rng.choice([1, 3]))
        dilation = 1 if k == 1 or rng.random() < 0.7 else 2
        span = dilation * (k - 1)
        if same:
            stride, pad = 1, span // 2
        else:
            stride = 1 if rng.random() < 0.6 else 2
            pad = int(rng.integers(0, span // 2 + 2)) if span else int(rng.integers(0, 2))
        if all(s + 2 * pad - span >= 1 for s in spatial):
            return cls(c_in, c_out, k, stride=stride, padding=pad, dilation=dilation, groups=groups,
                       bias=bool(rng.random() < 0.8))


def _fill(rng: np.random.Generator, module: nn.Module) -> None:
    """Every parameter and BatchNorm statistic drawn from ``rng`` (so a case is rebuilt from its seed)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                values = rng.standard_normal(tuple(p.shape)) * (_log_uniform(rng, 0.5, 2.0) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                values = rng.standard_normal(tuple(p.shape)) * rng.uniform(0, 0.5)
            else:  # BatchNorm's weight (gamma), signs included
                values = rng.standard_normal(tuple(p.shape))
            p.copy_(torch.from_numpy(values))
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.running_mean.copy_(torch.from_numpy(rng.standard_normal(sub.num_features) * 0.5))
                sub.running_var.copy_(torch.from_numpy(np.exp(rng.uniform(math.log(0.05), math.log(5.0),
                                                                          sub.num_features))))
                sub.eps = _log_uniform(rng, 1e-5, 1e-1)


def _conv_blocks(rng: np.random.Generator, nd: int, shape: tuple[int, ...], kind: str, traits: set,
                 divisible: bool):
    """1 or 2 convolutional blocks; returns (blocks, output shape)."""
    blocks = []
    c, spatial = shape[0], shape[1:]
    for _ in range(int(rng.integers(1, 3))):
        c_out = 2 * int(rng.integers(1, 3)) if kind in ("maxmin", "householder2") else int(rng.integers(1, 4))
        conv = _conv(rng, nd, c, c_out, spatial)
        spatial = tuple((s + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1)
                        // conv.stride[i] + 1 for i, s in enumerate(spatial))
        bn = (nn.BatchNorm1d if nd == 1 else nn.BatchNorm2d)(c_out, affine=bool(rng.random() < 0.8)) \
            if rng.random() < 0.5 else None
        act, label = _torch_activation(rng, kind, c_out)
        traits.add(label)
        gain = _gain(rng)
        extra: dict = {}
        u = rng.random()
        if u < 0.4:
            extra = {"skip": _conv(rng, nd, c_out, c_out, spatial, same=True),
                     "skip_act": _torch_activation(rng, kind, c_out)[0], "skip_gain": float(rng.uniform(-1.5, 1.5))}
            traits.add("skip")
        elif u < 0.55:
            extra = {"concat": _conv(rng, nd, c_out, 2, spatial, same=True), "keep": int(rng.integers(1, 3))}
            traits.add("concat+slice")
        c_after = c_out + extra.get("keep", 0)
        pool = _pool(rng, nd, spatial, divisible) if rng.random() < 0.5 else None
        if pool is not None:
            traits.add(type(pool).__name__)
            probe = pool(torch.zeros(1, c_after, *spatial))
            spatial = tuple(probe.shape[2:])
        if bn is not None:
            traits.add("batchnorm")
        if gain is not None:
            traits.add("gain")
        blocks.append(_Block(conv, gain, bn, act, pool=pool, **extra))
        c = c_after
    return blocks, (c,) + spatial


def small_cnn(rng: np.random.Generator, architecture: str, kind: str,
              divisible: bool = False) -> tuple[nn.Module, tuple[int, ...], list]:
    """A small torch model with random weights: ``(module, input shape, traits)``.

    ``architecture``: ``conv2d`` (input 1x5x5 .. 2x6x6), ``conv1d`` (1x6 .. 2x10), or ``pool-mlp`` (no
    convolution: BatchNorm, pooling, flatten, a two-layer head with a skip); ``kind`` the activation (a name of
    :data:`~lipbound.soundness.families.SLOPE_ACTIVATIONS`, ``maxmin`` or ``householder2``, over channels);
    ``divisible``: adaptive pooling only to output sizes that divide the input's (what torch's ONNX exporter
    takes).

    Examples
    --------
    >>> import numpy as np, torch
    >>> module, shape, traits = small_cnn(np.random.default_rng(0), "conv2d", "relu")
    >>> module(torch.zeros(1, *shape, dtype=torch.float64)).shape[0], len(shape)
    (1, 3)
    """
    traits: set = set()
    c_in = int(rng.integers(1, 3))
    if architecture == "conv1d":
        shape: tuple[int, ...] = (c_in, int(rng.integers(6, 11)))
    else:
        shape = (c_in, int(rng.integers(5, 7)), int(rng.integers(5, 7)))
    nd = len(shape) - 1
    stem = None
    if architecture == "pool-mlp":
        blocks, out_shape = [], shape
        stem_parts: list[nn.Module] = []
        if rng.random() < 0.6:
            stem_parts.append(nn.BatchNorm2d(c_in))
            traits.add("batchnorm")
        pool = _pool(rng, nd, shape[1:], divisible)
        if pool is not None:
            stem_parts.append(pool)
            traits.add(type(pool).__name__)
            out_shape = tuple(pool(torch.zeros(1, *shape)).shape[1:])
        stem = nn.Sequential(*stem_parts) if stem_parts else None
    else:
        blocks, out_shape = _conv_blocks(rng, nd, shape, kind, traits, divisible)
    features = int(np.prod(out_shape))
    n_out = int(rng.integers(1, 4))
    flatten = str(rng.choice(["torch", "module", "reshape"]))
    if architecture == "pool-mlp" or rng.random() < 0.4:
        hidden = 2 * int(rng.integers(1, 5)) if kind in ("maxmin", "householder2") else int(rng.integers(2, 9))
        act, label = _torch_activation(rng, kind, hidden)
        traits.add(label)
        fc_skip = nn.Linear(hidden, hidden, bias=False) if rng.random() < 0.5 else None
        if fc_skip is not None:
            traits.add("fc-skip")
        net = _SmallNet(stem, blocks, flatten, nn.Linear(features, hidden), act, fc_skip,
                        float(rng.uniform(-1, 1)), nn.Linear(hidden, n_out), _gain(rng))
    else:
        net = _SmallNet(stem, blocks, flatten, nn.Linear(features, n_out), gain=_gain(rng))
    net = net.double().eval()
    _fill(rng, net)
    return net, shape, sorted(traits)


def _import_torch(module: nn.Module, shape: tuple[int, ...]):
    import lipbound

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lipbound.from_torch(module, shape, name="campaign")


class _NotExported(Exception):
    """torch's ONNX exporter cannot export a drawn model (not lipbound's concern: the model is redrawn)."""


def _draw_cnn(rng: np.random.Generator, architectures: tuple[str, ...], kinds: tuple[str, ...], to_network,
              divisible: bool = False):
    """``(shape, traits, network, architecture, kind, extra, redrawn)``: models are redrawn until the imported
    network has at most :data:`MAX_CNN_NEURONS` hidden neurons and, for ONNX, until torch exports it (the draws
    stay a function of ``rng``). ``to_network(module, shape)`` returns ``(network, extra)``; an import error
    is not caught: it is the campaign's finding."""
    redrawn = 0
    while True:
        architecture = str(rng.choice(architectures))
        kind = str(rng.choice(kinds))
        module, shape, traits = small_cnn(rng, architecture, kind, divisible)
        try:
            net, extra = to_network(module, shape)
        except _NotExported:
            redrawn += 1
            continue
        if net.n_hidden <= MAX_CNN_NEURONS:
            return shape, traits, net, architecture, kind, extra, redrawn
        redrawn += 1


def _cnn(rng: np.random.Generator) -> Case:
    shape, traits, net, architecture, kind, _, redrawn = _draw_cnn(
        rng, _CNN_ARCHITECTURES, _CNN_KINDS, lambda m, s: (_import_torch(m, s), None))
    params = {"architecture": architecture, "kind": kind, "input_shape": list(shape), "traits": traits,
              "redrawn": redrawn, "judge": "reference"}
    return _case(rng, net, f"{architecture}/{kind}", params)


# ----------------------------------------------------------------------------------------------------------------
# onnx
# ----------------------------------------------------------------------------------------------------------------

_ONNX_ARCHITECTURES = ("conv2d", "conv1d", "pool-mlp", "pool-mlp")
#: The ONNX importer does not read Householder activations (exported as a data-dependent Where) nor GELU's tanh
#: form (opset 17 has no Gelu operator; it is exported as a polynomial inside a Tanh): both are refused by name.
_ONNX_KINDS = tuple(k for k in _CNN_KINDS if k not in ("householder2", "gelu_tanh"))


def export_onnx(module: nn.Module, shape: tuple[int, ...], dynamic_batch: bool = True) -> bytes:
    """The float64 ONNX model of ``module`` (legacy exporter, opset 17), serialised."""
    buffer = io.BytesIO()
    x = torch.zeros(2 if dynamic_batch else 1, *shape, dtype=torch.float64)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch
                          else None)
    return buffer.getvalue()


def _onnx(rng: np.random.Generator) -> Case:
    import onnx

    import lipbound

    def to_network(module, shape):
        dynamic = bool(rng.random() < 0.75)
        try:
            data = export_onnx(module, shape, dynamic)
        except Exception as exc:  # e.g. adaptive pooling to a size that does not divide the input's
            raise _NotExported(str(exc)) from exc
        return lipbound.from_onnx(onnx.load_from_string(data), name="campaign"), (data, dynamic)

    shape, traits, net, architecture, kind, (data, dynamic), redrawn = _draw_cnn(
        rng, _ONNX_ARCHITECTURES, _ONNX_KINDS, to_network, divisible=True)
    params = {"architecture": architecture, "kind": kind, "input_shape": list(shape), "traits": traits,
              "dynamic_batch": dynamic, "opset": 17, "redrawn": redrawn}
    try:
        judge = OnnxReference(data, shape)
        params["judge"] = "onnxruntime"
    except OnnxReference.Unavailable as exc:
        judge = Reference(net)
        params["judge"], params["judge_why"] = "reference", str(exc)
    return _case(rng, net, f"{architecture}/{kind}/{'ort' if params['judge'] == 'onnxruntime' else 'ref'}",
                 params, reference=judge)


# ----------------------------------------------------------------------------------------------------------------
# circulant: convolutional chains certified through their torus embedding (solver="circulant")
# ----------------------------------------------------------------------------------------------------------------

#: Geometries that keep the image size: (kernel, padding, dilation).
_SAME_GEOMETRIES = ((3, 1, 1), (5, 2, 1), (3, 2, 2), (1, 0, 1))
#: Activations of the circulant family: slopes with alpha beta <= 0 (GELU and SiLU dip below 0), and LeakyReLU,
#: which the solver must refuse by name (alpha beta > 0).
_CIRCULANT_KINDS = ("relu", "relu", "tanh", "sigmoid", "elu", "softplus", "gelu", "silu", "leaky_relu")


def _circulant(rng: np.random.Generator) -> Case:
    """A chain of 1-3 stride-1 convolutions that keep the image size (1-D or 2-D, groups sometimes), one activation
    kind, a linear head; weights scaled by powers of two per layer (up to 2^+-30) in a third of the draws. Runs:
    mp and lipsdp-channel with solver="circulant" (global, l2)."""
    dims = 2 if rng.random() < 0.7 else 1
    image = tuple(int(v) for v in rng.integers(3, 7 if dims == 2 else 10, size=dims))
    kind = str(rng.choice(_CIRCULANT_KINDS))
    depth = int(rng.integers(1, 4))
    channels = [int(rng.integers(1, 3))] + [int(rng.integers(1, 4)) for _ in range(depth)]
    extreme = rng.random() < 1 / 3
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    layers, geometry = [], []
    for k in range(depth):
        kernel, pad, dil = _SAME_GEOMETRIES[int(rng.integers(0, len(_SAME_GEOMETRIES)))]
        groups = 2 if channels[k] % 2 == 0 and channels[k + 1] % 2 == 0 and rng.random() < 0.3 else 1
        layer = conv(channels[k], channels[k + 1], kernel, padding=pad, dilation=dil, groups=groups).double()
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(rng.standard_normal(tuple(layer.weight.shape))) / math.sqrt(
                kernel ** dims * channels[k] / groups))
            layer.bias.copy_(torch.tensor(rng.standard_normal(channels[k + 1])))
            if extreme:
                layer.weight.mul_(2.0 ** int(rng.integers(-30, 31)))
        act, _ = _torch_activation(rng, kind, channels[k + 1])
        layers += [layer, act]
        geometry.append([kernel, pad, dil, groups])
    size = channels[-1] * math.prod(image)
    head = nn.Linear(size, int(rng.integers(1, 4))).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor(rng.standard_normal(tuple(head.weight.shape))) / math.sqrt(size))
    net = _import_torch(nn.Sequential(*layers, nn.Flatten(), head), (channels[0],) + image)
    params = {"image": list(image), "channels": channels, "geometry": geometry, "kind": kind, "extreme": extreme,
              "judge": "reference", "dims": list(net.dims)}
    runs = (Run("mp", "auto"), Run("lipsdp-channel", "circulant"))
    return Case(net, runs, f"{dims}d/{kind}{'/extreme' if extreme else ''}", params=params)


GRAPH_FAMILIES: tuple[Family, ...] = (
    Family("graph-skip", "random DAGs: skip sums with random coefficients, concatenations, slices, dense/sparse and "
                         "inexact maps; every activation family; l2/l-inf, global/local", _graph_skip),
    Family("cnn", "small CNNs imported from torch: Conv1d/2d (stride, padding, dilation, groups), BatchNorm, "
                  "avg/adaptive/max pooling, skips, gains; l2/l-inf, global/local", _cnn),
    Family("onnx", "small CNNs and pooling MLPs exported to ONNX (opset 17, float64), judged by onnxruntime where it "
                   "has float64 kernels", _onnx),
    Family("circulant", "stride-1 convolutional chains that keep the image size (1-D/2-D, dilation, groups, powers of "
                        "two up to 2^+-30), certified by solver='circulant' (LeakyReLU must be refused)", _circulant),
)
