"""The graph IR: a network as a DAG of exact linear operators and nonlinear nodes.

A :class:`GraphNetwork` is what importers produce for any model that is not a plain chain (skip connections,
concatenations, convolutions, pooling, normalisation). Every node holds one operator and the indices of its
inputs (earlier nodes); values are *flat* vectors (C-order flattening of the node's logical ``shape``), so every
linear operator is a matrix on flat vectors, whatever its structure:

* :class:`Input` -- node 0, the network input;
* :class:`LinearMap` -- ``y = A x + b`` with ``A`` dense or sparse (linear layers, pooling, selections,
  permutations, padding, folded normalisation), optionally with an entrywise error bound on ``A`` when its exact
  entries are not floating-point numbers (BatchNorm's ``gamma / sqrt(var + eps)``, average pooling's ``1/9``);
* :class:`Conv` -- a 1-D or 2-D convolution kept in its compact form (weights, stride, padding, dilation,
  groups); :meth:`Conv.matrix` gives the exact sparse matrix when a consumer needs one;
* :class:`Sum` -- ``y = sum_i c_i x_i`` (skip connections, subtraction, multiplication by a constant);
* :class:`Concat` -- flat concatenation of its inputs;
* activation layers from :mod:`lipbound.network` (:class:`~lipbound.network.SlopeRestricted`,
  :class:`~lipbound.network.GroupSortLayer`, :class:`~lipbound.network.HouseholderLayer`) and
  :class:`~lipbound.network.ImplicitLayer`, acting on the flat vector.

One interpreter (:meth:`GraphNetwork.forward`) evaluates every graph; formulations, bound propagation and lower
bounds read the same nodes. A chain :class:`~lipbound.network.Network` converts losslessly with
:meth:`GraphNetwork.from_network`, and a graph that is a chain of exact dense layers converts back with
:meth:`GraphNetwork.to_network`.

Examples
--------
>>> import numpy as np, torch, lipbound
>>> from lipbound.graph import GraphBuilder
>>> b = GraphBuilder((2,))
>>> h = b.linear(b.input, np.eye(2), name="fc")
>>> r = b.activation(h, lipbound.ActivationSpec("relu"), name="relu")
>>> out = b.add([b.input, r], name="skip")
>>> net = b.build(out, name="resnet")
>>> net(torch.tensor([[1.0, -1.0]], dtype=torch.float64))
tensor([[ 2., -1.]], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from lipbound.activations import ActivationSpec
from lipbound.errors import NetworkError
from lipbound.network import (
    Affine,
    GroupSortLayer,
    HouseholderLayer,
    ImplicitLayer,
    Network,
    ResidualBlock,
    SlopeRestricted,
    _frozen_float64,
    _stage_label,
)

ActivationOp = SlopeRestricted | GroupSortLayer | HouseholderLayer


def _shape(shape) -> tuple[int, ...]:
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise NetworkError(f"invalid shape {shape}: every dimension must be positive.")
    return shape


def _size(shape: Sequence[int]) -> int:
    return int(np.prod(shape))


@dataclass(frozen=True, eq=False)
class Input:
    """The network input, of logical ``shape`` (without the batch dimension)."""

    shape: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", _shape(self.shape))

    @property
    def out_dim(self) -> int:
        return _size(self.shape)


def _frozen_matrix(matrix, what: str):
    if sp.issparse(matrix):
        m = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
        m.sum_duplicates()
        if not np.all(np.isfinite(m.data)):
            raise NetworkError(f"{what} contains NaN or inf.")
        m.data.setflags(write=False)
        return m
    m = _frozen_float64(matrix, what)
    if m.ndim != 2 or m.size == 0:
        raise NetworkError(f"{what} must be a non-empty 2-D matrix (out, in), got shape {m.shape}.")
    return m


@dataclass(frozen=True, eq=False)
class LinearMap:
    """``y = A x + b`` on flat vectors; ``A`` dense or sparse (exact data), ``err`` bounds ``|A_exact - A|``.

    ``kind`` says what the map came from (``"linear"``, ``"avgpool"``, ``"batchnorm"``, ``"gather"``, ...) for
    summaries and messages. ``bias_err`` bounds the bias's distance to the exact bias (biases never enter a
    Lipschitz bound; activation-bound analysis uses it).
    """

    matrix: np.ndarray | sp.csr_matrix
    bias: np.ndarray | None = None
    err: np.ndarray | sp.csr_matrix | None = None
    bias_err: np.ndarray | None = None
    kind: str = "linear"

    def __post_init__(self):
        m = _frozen_matrix(self.matrix, f"{self.kind} matrix")
        object.__setattr__(self, "matrix", m)
        bias = np.zeros(m.shape[0]) if self.bias is None else self.bias
        bias = _frozen_float64(bias, f"{self.kind} bias").reshape(-1)
        if bias.shape != (m.shape[0],):
            raise NetworkError(f"{self.kind} bias has shape {bias.shape}, expected ({m.shape[0]},).")
        object.__setattr__(self, "bias", bias)
        if self.err is not None:
            err = _frozen_matrix(self.err, f"{self.kind} error bound")
            if err.shape != m.shape:
                raise NetworkError(f"{self.kind} error bound has shape {err.shape}, expected {m.shape}.")
            if (err.data if sp.issparse(err) else err).min(initial=0.0) < 0:
                raise NetworkError(f"{self.kind} error bound must be non-negative.")
            if not (err.nnz if sp.issparse(err) else np.count_nonzero(err)):
                err = None
            object.__setattr__(self, "err", err)
        if self.bias_err is not None:
            object.__setattr__(self, "bias_err", _frozen_float64(self.bias_err, f"{self.kind} bias error").reshape(-1))

    @property
    def in_dim(self) -> int:
        return self.matrix.shape[1]

    @property
    def out_dim(self) -> int:
        return self.matrix.shape[0]

    @property
    def exact(self) -> bool:
        return self.err is None

    def dense(self) -> np.ndarray:
        return self.matrix.toarray() if sp.issparse(self.matrix) else self.matrix

    def sparse(self) -> sp.csr_matrix:
        return self.matrix if sp.issparse(self.matrix) else sp.csr_matrix(self.matrix)

    def dense_err(self) -> np.ndarray | None:
        if self.err is None:
            return None
        return self.err.toarray() if sp.issparse(self.err) else self.err

    def _torch(self, dtype, device):
        cache = self.__dict__.setdefault("_torch_cache", {})
        key = (dtype, str(device))
        if key not in cache:
            if sp.issparse(self.matrix):
                # (rows, cols, values): applied by gather and index_add, which (unlike torch.sparse.mm) also
                # support forward-mode differentiation (the Jacobian-vector products of lipbound.lower_bound).
                coo = self.matrix.tocoo()
                mat = (torch.tensor(coo.row, dtype=torch.long, device=device),
                       torch.tensor(coo.col, dtype=torch.long, device=device),
                       torch.tensor(coo.data, dtype=dtype, device=device))
            else:
                mat = torch.tensor(self.matrix, dtype=dtype, device=device)
            cache[key] = (mat, torch.tensor(self.bias, dtype=dtype, device=device))
        return cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mat, bias = self._torch(x.dtype, x.device)
        if isinstance(mat, tuple):
            rows, cols, values = mat
            return x.new_zeros(x.shape[0], self.out_dim).index_add(1, rows, x[:, cols] * values) + bias
        return x @ mat.T + bias


def _tuple(value, n: int, what: str) -> tuple[int, ...]:
    out = (int(value),) * n if np.isscalar(value) else tuple(int(v) for v in value)
    if len(out) != n:
        raise NetworkError(f"convolution {what} {value!r} does not have {n} entries.")
    return out


@dataclass(frozen=True, eq=False)
class Conv:
    """A 1-D or 2-D cross-correlation with zero padding (``torch.nn.Conv1d``/``Conv2d`` semantics).

    ``weight`` (C_out, C_in / groups, *kernel), ``bias`` (C_out,), ``in_shape`` (C_in, *spatial). ``weight_err``
    (optional, same shape as ``weight``) bounds the distance of ``weight`` to the exact weights (e.g. average
    pooling written as a convolution). The flat input is the C-order flattening of ``in_shape``.
    """

    weight: np.ndarray
    bias: np.ndarray | None
    in_shape: tuple[int, ...]
    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] = (0,)
    dilation: tuple[int, ...] = (1,)
    groups: int = 1
    weight_err: np.ndarray | None = None
    kind: str = "conv"

    def __post_init__(self):
        w = _frozen_float64(self.weight, f"{self.kind} weight")
        nd = w.ndim - 2
        if nd not in (1, 2):
            raise NetworkError(f"{self.kind}: only 1-D and 2-D convolutions are supported, weight shape {w.shape}.")
        in_shape = _shape(self.in_shape)
        groups = int(self.groups)
        if len(in_shape) != nd + 1:
            raise NetworkError(f"{self.kind}: input shape {in_shape} does not match a {nd}-D kernel {w.shape}.")
        if groups <= 0 or in_shape[0] % groups or w.shape[0] % groups or w.shape[1] * groups != in_shape[0]:
            raise NetworkError(f"{self.kind}: weight {w.shape} with groups={groups} does not fit {in_shape[0]} "
                               "input channels.")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "in_shape", in_shape)
        object.__setattr__(self, "groups", groups)
        for name in ("stride", "padding", "dilation"):
            object.__setattr__(self, name, _tuple(getattr(self, name), nd, name))
        if min(self.stride) <= 0 or min(self.dilation) <= 0 or min(self.padding) < 0:
            raise NetworkError(f"{self.kind}: stride and dilation must be positive, padding non-negative.")
        bias = np.zeros(w.shape[0]) if self.bias is None else self.bias
        bias = _frozen_float64(bias, f"{self.kind} bias").reshape(-1)
        if bias.shape != (w.shape[0],):
            raise NetworkError(f"{self.kind} bias has shape {bias.shape}, expected ({w.shape[0]},).")
        object.__setattr__(self, "bias", bias)
        if self.weight_err is not None:
            err = _frozen_float64(self.weight_err, f"{self.kind} weight error")
            if err.shape != w.shape or np.any(err < 0):
                raise NetworkError(f"{self.kind} weight error must be non-negative with shape {w.shape}.")
            object.__setattr__(self, "weight_err", err if np.any(err) else None)
        if any(s <= 0 for s in self.out_shape[1:]):
            raise NetworkError(f"{self.kind}: kernel {w.shape[2:]} does not fit the input {in_shape} "
                               f"(padding {self.padding}, dilation {self.dilation}).")

    @property
    def spatial_dims(self) -> int:
        return self.weight.ndim - 2

    @property
    def out_shape(self) -> tuple[int, ...]:
        sizes = []
        for i in range(self.spatial_dims):
            span = self.dilation[i] * (self.weight.shape[2 + i] - 1) + 1
            sizes.append((self.in_shape[1 + i] + 2 * self.padding[i] - span) // self.stride[i] + 1)
        return (self.weight.shape[0],) + tuple(sizes)

    @property
    def in_dim(self) -> int:
        return _size(self.in_shape)

    @property
    def out_dim(self) -> int:
        return _size(self.out_shape)

    @property
    def exact(self) -> bool:
        return self.weight_err is None

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        fn = F.conv1d if self.spatial_dims == 1 else F.conv2d
        out = fn(x.reshape(x.shape[0], *self.in_shape), weight, bias, self.stride, self.padding, self.dilation,
                 self.groups)
        return out.reshape(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.__dict__.setdefault("_torch_cache", {})
        key = (x.dtype, str(x.device))
        if key not in cache:
            cache[key] = (torch.tensor(self.weight, dtype=x.dtype, device=x.device),
                          torch.tensor(self.bias, dtype=x.dtype, device=x.device))
        return self._conv(x, *cache[key])

    def _pattern(self, values: np.ndarray) -> sp.csr_matrix:
        """The sparse matrix of the convolution whose kernel entries are ``values`` (same shape as the weight)."""
        cache = self.__dict__.setdefault("_index_cache", {})
        if "index" not in cache:
            # Convolve a one-hot numbering of the kernel entries with the identity basis: each output entry's
            # dependence on each input entry identifies which kernel entry (if any) multiplies it.
            n_in = self.in_dim
            kernel_ids = torch.arange(1, self.weight.size + 1, dtype=torch.float64).reshape(self.weight.shape)
            rows, cols, ids = [], [], []
            step = max(1, (1 << 22) // max(self.out_dim, 1))
            for start in range(0, n_in, step):
                cols_here = torch.arange(start, min(start + step, n_in))
                basis = torch.zeros(cols_here.numel(), n_in, dtype=torch.float64)
                basis[torch.arange(cols_here.numel()), cols_here] = 1.0
                resp = self._conv(basis, kernel_ids, None)  # (basis, out): kernel id hit, or 0
                j, i = torch.nonzero(resp, as_tuple=True)
                rows.append(i.numpy())
                cols.append(cols_here[j].numpy())
                ids.append(resp[j, i].numpy().astype(np.int64) - 1)
            cache["index"] = (np.concatenate(rows), np.concatenate(cols), np.concatenate(ids))
        rows, cols, ids = cache["index"]
        return sp.csr_matrix((values.reshape(-1)[ids], (rows, cols)), shape=(self.out_dim, self.in_dim))

    def matrix(self) -> sp.csr_matrix:
        """The exact sparse matrix (out_dim x in_dim) of the convolution (entries are the kernel's floats)."""
        return self._pattern(self.weight)

    def matrix_err(self) -> sp.csr_matrix | None:
        return None if self.weight_err is None else self._pattern(self.weight_err)

    def as_linear_map(self) -> LinearMap:
        bias = np.repeat(self.bias, _size(self.out_shape[1:]))
        return LinearMap(self.matrix(), bias, self.matrix_err(), kind=self.kind)


@dataclass(frozen=True, eq=False)
class Sum:
    """``y = sum_i c_i x_i`` over the node's inputs (same size); ``errors[i]`` bounds ``|c_i,exact - c_i|``."""

    coefficients: tuple[float, ...]
    errors: tuple[float, ...] = ()

    def __post_init__(self):
        c = tuple(float(v) for v in self.coefficients)
        e = tuple(float(v) for v in self.errors) or (0.0,) * len(c)
        if not c or len(e) != len(c) or not all(math.isfinite(v) for v in c + e) or min(e) < 0:
            raise NetworkError(f"invalid sum coefficients {c} (errors {e}).")
        object.__setattr__(self, "coefficients", c)
        object.__setattr__(self, "errors", e)


@dataclass(frozen=True)
class Concat:
    """Flat concatenation of the node's inputs, in order."""


Op = Input | LinearMap | Conv | Sum | Concat | SlopeRestricted | GroupSortLayer | HouseholderLayer | ImplicitLayer
LINEAR_OPS = (LinearMap, Conv, Sum, Concat)
ACTIVATION_OPS = (SlopeRestricted, GroupSortLayer, HouseholderLayer)


@dataclass(frozen=True, eq=False)
class Node:
    """One node: ``op`` applied to the values of the nodes ``inputs``; its value has logical ``shape``."""

    name: str
    op: Op
    inputs: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return _size(self.shape)

    @property
    def is_linear(self) -> bool:
        return isinstance(self.op, LINEAR_OPS)

    @property
    def is_activation(self) -> bool:
        return isinstance(self.op, ACTIVATION_OPS + (ImplicitLayer,))


def _op_io(op, in_sizes: list[int]) -> tuple[list[int] | None, int | None]:
    """Expected input sizes (None: any) and the output size (None: from the inputs) of an operator."""
    if isinstance(op, (LinearMap, Conv)):
        return [op.in_dim], op.out_dim
    if isinstance(op, ImplicitLayer):
        return [op.in_dim], op.out_dim
    if isinstance(op, ACTIVATION_OPS):
        return [op.width], op.width
    if isinstance(op, Sum):
        return [in_sizes[0]] * len(op.coefficients), in_sizes[0] if in_sizes else None
    if isinstance(op, Concat):
        return None, int(sum(in_sizes))
    raise NetworkError(f"unknown graph operator {type(op).__name__}.")


@dataclass(frozen=True, eq=False)
class GraphNetwork:
    """A network as a DAG of nodes (see the module docstring); ``nodes[0]`` is the input, ``nodes[output]`` the
    output. Immutable and validated on construction: inputs precede their consumers, sizes match, every node
    contributes to the output.
    """

    nodes: tuple[Node, ...]
    output: int = -1
    name: str = "network"

    def __post_init__(self):
        nodes = tuple(self.nodes)
        if not nodes or not isinstance(nodes[0].op, Input):
            raise NetworkError("a graph network starts with its Input node.")
        output = self.output % len(nodes)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "output", output)
        names = set()
        for i, node in enumerate(nodes):
            if node.name in names:
                raise NetworkError(f"duplicate node name '{node.name}'.")
            names.add(node.name)
            if i and isinstance(node.op, Input):
                raise NetworkError(f"node '{node.name}': a second input; only single-input networks are supported.")
            if any(j < 0 or j >= i for j in node.inputs):
                raise NetworkError(f"node '{node.name}' uses inputs {node.inputs} that do not precede it.")
            in_sizes = [nodes[j].size for j in node.inputs]
            if isinstance(node.op, Input):
                if node.inputs or node.size != node.op.out_dim:
                    raise NetworkError("the input node takes no inputs and has the input's shape.")
                continue
            if not node.inputs:
                raise NetworkError(f"node '{node.name}' ({type(node.op).__name__}) has no inputs.")
            expected, out = _op_io(node.op, in_sizes)
            if expected is not None and in_sizes != expected:
                raise NetworkError(f"shape mismatch at node '{node.name}' ({_describe(node.op)}): it takes inputs of "
                                   f"size {expected} but receives {in_sizes}.")
            if out != node.size:
                raise NetworkError(f"node '{node.name}' ({_describe(node.op)}) outputs {out} values, but its shape "
                                   f"{node.shape} has {node.size}.")
        used = {output}
        for i in range(len(nodes) - 1, -1, -1):
            if i in used:
                used.update(nodes[i].inputs)
        dead = [nodes[i].name for i in range(len(nodes)) if i not in used]
        if dead:
            raise NetworkError(f"node(s) {', '.join(dead)} do not contribute to the output.")
        if output == 0:
            raise NetworkError("the network's output is its input: nothing to bound.")

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_network(cls, network: Network) -> GraphNetwork:
        """The graph of a chain :class:`~lipbound.network.Network` (residual blocks expanded into nodes)."""
        if isinstance(network, GraphNetwork):
            return network
        b = GraphBuilder((network.input_dim,))
        cur = b.input
        for layer in network.layers:
            if isinstance(layer, Affine):
                cur = b.linear(cur, layer.weight, layer.bias, name=layer.name)
            elif isinstance(layer, ResidualBlock):
                h = b.linear(cur, layer.inner.weight, layer.inner.bias, name=f"{layer.name}.inner")
                h = b.node(layer.activation, [h], name=f"{layer.name}.{layer.activation.name}")
                if layer.outer is not None:
                    h = b.linear(h, layer.outer.weight, layer.outer.bias, name=f"{layer.name}.outer")
                cur = b.add([cur, h], name=layer.name)
            else:
                cur = b.node(layer, [cur], name=layer.name)
        return b.build(cur, name=network.name)

    def to_network(self) -> Network | None:
        """The equivalent chain :class:`~lipbound.network.Network` when the graph is a chain of exact dense
        linear maps and activations (no skip, no structured or inexact operator); otherwise ``None``."""
        layers = []
        cur = 0
        consumers = self.consumers()
        order = []
        while cur != self.output:
            nxt = consumers[cur]
            if len(nxt) != 1 or len(self.nodes[nxt[0]].inputs) != 1:
                return None
            cur = nxt[0]
            order.append(cur)
        for i in order:
            node = self.nodes[i]
            op = node.op
            if isinstance(op, LinearMap):
                if not op.exact:
                    return None
                layers.append(Affine(op.dense(), op.bias, name=node.name))
            elif isinstance(op, (SlopeRestricted, GroupSortLayer, HouseholderLayer, ImplicitLayer)):
                layers.append(op)
            else:
                return None
        if not layers:
            return None
        return Network.from_layers(layers, self.name)

    # -- structure ------------------------------------------------------------------------------------
    def consumers(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                out[j].append(i)
        return out

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def input_dim(self) -> int:
        return self.nodes[0].size

    @property
    def output_dim(self) -> int:
        return self.nodes[self.output].size

    @property
    def activation_nodes(self) -> list[int]:
        """Indices of the nonlinear nodes, in topological order."""
        return [i for i, n in enumerate(self.nodes) if n.is_activation]

    @property
    def activations(self) -> tuple:
        """The nonlinear operators (activation layers, implicit layers), in topological order."""
        return tuple(self.nodes[i].op for i in self.activation_nodes)

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        return tuple(self.nodes[i].size for i in self.activation_nodes)

    @property
    def n_hidden(self) -> int:
        return int(sum(self.hidden_widths))

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.input_dim,) + self.hidden_widths + (self.output_dim,)

    def summary(self) -> str:
        acts = sorted({_stage_label(a) for a in self.activations})
        kinds = sorted({_describe(n.op) for n in self.nodes[1:] if n.is_linear})
        return (f"{self.name}: graph of {len(self.nodes)} nodes, input {'x'.join(map(str, self.input_shape))}, "
                f"{self.n_hidden} hidden neurons, output {self.output_dim}; activations {', '.join(acts) or 'none'}; "
                f"linear operators {', '.join(kinds)}")

    # -- the interpreter ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate on a batch ``x`` of shape (batch, input_dim) or (batch, *input_shape), in ``x``'s dtype/device.

        Returns (batch, output_dim).
        """
        if x.dim() == 1:
            x = x.unsqueeze(0)
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.input_dim:
            raise NetworkError(f"{self.name}: input has {x.shape[1]} entries per sample, expected {self.input_dim} "
                               f"(shape {self.input_shape}).")
        last_use = {}
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                last_use[j] = i
        values: dict[int, torch.Tensor] = {0: x}
        for i, node in enumerate(self.nodes[1:], start=1):
            args = [values[j] for j in node.inputs]
            values[i] = evaluate(node.op, args)
            for j in node.inputs:
                if last_use[j] == i and j != self.output:
                    values.pop(j, None)
        return values[self.output]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


def evaluate(op, args: list[torch.Tensor]) -> torch.Tensor:
    """Apply one operator to its (flat, batched) arguments."""
    if isinstance(op, (LinearMap, Conv)):
        return op.forward(args[0])
    if isinstance(op, Sum):
        out = args[0] * op.coefficients[0]
        for c, a in zip(op.coefficients[1:], args[1:], strict=True):
            out = out + c * a
        return out
    if isinstance(op, Concat):
        return torch.cat(args, dim=1)
    return op.forward(args[0])


def _describe(op) -> str:
    if isinstance(op, LinearMap):
        return op.kind
    if isinstance(op, Conv):
        return f"{op.kind}{op.spatial_dims}d"
    if isinstance(op, Sum):
        return "sum" if len(op.coefficients) > 1 else "scale"
    if isinstance(op, Concat):
        return "concat"
    if isinstance(op, Input):
        return "input"
    return _stage_label(op)


@dataclass
class GraphBuilder:
    """Builds a :class:`GraphNetwork` node by node; each method returns the new node's index.

    Node names are made unique by suffixing ``_1``, ``_2``, ...
    """

    input_shape: tuple[int, ...]
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self):
        shape = _shape(self.input_shape)
        self.nodes = [Node("input", Input(shape), (), shape)]

    @property
    def input(self) -> int:
        return 0

    def shape(self, i: int) -> tuple[int, ...]:
        return self.nodes[i].shape

    def _name(self, name: str) -> str:
        taken = {n.name for n in self.nodes}
        if name not in taken:
            return name
        k = 1
        while f"{name}_{k}" in taken:
            k += 1
        return f"{name}_{k}"

    def node(self, op, inputs: Sequence[int], name: str, shape: Sequence[int] | None = None) -> int:
        """Append ``op`` applied to ``inputs``; ``shape`` defaults to the flat output size (or the input's shape
        for size-preserving operators)."""
        inputs = tuple(int(i) for i in inputs)
        if shape is None:
            _, out = _op_io(op, [self.nodes[i].size for i in inputs])
            first = self.nodes[inputs[0]].shape if inputs else ()
            shape = first if out == _size(first) else (out,)
        self.nodes.append(Node(self._name(name), op, inputs, _shape(shape)))
        return len(self.nodes) - 1

    def linear(self, x: int, matrix, bias=None, name: str = "linear", err=None, kind: str = "linear",
               shape: Sequence[int] | None = None) -> int:
        op = LinearMap(matrix, bias, err, kind=kind)
        return self.node(op, [x], name, shape if shape is not None else (op.out_dim,))

    def conv(self, x: int, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, name: str = "conv",
             weight_err=None, kind: str = "conv") -> int:
        nd = np.ndim(weight) - 2
        op = Conv(weight, bias, self.shape(x), _tuple(stride, nd, "stride"), _tuple(padding, nd, "padding"),
                  _tuple(dilation, nd, "dilation"), groups, weight_err, kind)
        return self.node(op, [x], name, op.out_shape)

    def activation(self, x: int, spec: ActivationSpec | str, name: str = "activation") -> int:
        spec = spec if isinstance(spec, ActivationSpec) else ActivationSpec(spec)
        return self.node(SlopeRestricted(spec, self.nodes[x].size, name=name), [x], name, self.shape(x))

    def add(self, inputs: Sequence[int], coefficients: Sequence[float] | None = None, name: str = "add",
            errors: Sequence[float] = ()) -> int:
        coefficients = (1.0,) * len(inputs) if coefficients is None else tuple(coefficients)
        return self.node(Sum(coefficients, tuple(errors)), inputs, name, self.shape(inputs[0]))

    def concat(self, inputs: Sequence[int], name: str = "concat", shape: Sequence[int] | None = None) -> int:
        size = sum(self.nodes[i].size for i in inputs)
        return self.node(Concat(), inputs, name, shape if shape is not None else (size,))

    def build(self, output: int, name: str = "network") -> GraphNetwork:
        """The network computing node ``output``; nodes that do not contribute to it are dropped."""
        return GraphNetwork(*prune(self.nodes, output), name)


def prune(nodes: Sequence[Node], output: int) -> tuple[tuple[Node, ...], int]:
    """Keep the input and the nodes ``output`` depends on; returns the renumbered nodes and output index."""
    output = output % len(nodes)
    keep = {0, output}
    for i in range(output, -1, -1):
        if i in keep:
            keep.update(nodes[i].inputs)
    order = sorted(keep)
    new_index = {old: new for new, old in enumerate(order)}
    out = tuple(Node(nodes[i].name, nodes[i].op, tuple(new_index[j] for j in nodes[i].inputs), nodes[i].shape)
                for i in order)
    return out, new_index[output]


AnyNetwork = Network | GraphNetwork


def as_graph(network: AnyNetwork) -> GraphNetwork:
    """The graph of any network (chains are converted)."""
    return network if isinstance(network, GraphNetwork) else GraphNetwork.from_network(network)
