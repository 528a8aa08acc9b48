"""JSON descriptions of networks, so that a campaign's violation can be rebuilt from its report alone.

Every float is written with ``repr`` (``json`` does this), which round-trips exactly, so weights, biases and
slope bounds come back bit for bit. One exception: :class:`~lipbound.network.HouseholderLayer` normalises its
vectors when it is built, and normalising an already normalised float vector may move its last bit; the
reflection it describes is the same up to that rounding. The exact reproduction of a campaign trial is
:func:`lipbound.soundness.reproduce` (family and seed), which rebuilds the very same objects.

Each IR stage type has one writer and one reader below, and each graph operator one of each
(:class:`~lipbound.graph.GraphNetwork`: nodes with their inputs and shapes; sparse matrices as coordinate lists);
a new stage type or graph operator adds one of each.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from lipbound.activations import ActivationSpec
from lipbound.errors import NetworkError
from lipbound.graph import Concat, Conv, GraphNetwork, Input, LinearMap, Node, Sum
from lipbound.network import (
    Affine,
    GroupSortLayer,
    HouseholderLayer,
    ImplicitLayer,
    Network,
    ResidualBlock,
    SlopeRestricted,
)


def _numbers(array: np.ndarray) -> list:
    """Nested lists of floats; non-finite values (infinite slope bounds) as the strings 'inf' / '-inf'."""
    if array.ndim == 0:
        value = float(array)
        return value if math.isfinite(value) else str(value)  # type: ignore[return-value]
    return [_numbers(a) for a in array]


def _array(data) -> np.ndarray:
    return np.array(data, dtype=np.float64)


def _affine(layer: Affine) -> dict:
    return {"type": "affine", "name": layer.name, "weight": _numbers(layer.weight), "bias": _numbers(layer.bias)}


def _slope(layer: SlopeRestricted) -> dict:
    out = {"type": "slope", "name": layer.name, "activation": layer.activation.name,
           "params": {k: list(v) if isinstance(v, tuple) else v for k, v in layer.activation.params.items()},
           "width": layer.width}
    default = SlopeRestricted(layer.activation, layer.width)
    if not (np.array_equal(default.alpha, layer.alpha) and np.array_equal(default.beta, layer.beta)):
        out["alpha"], out["beta"] = _numbers(layer.alpha), _numbers(layer.beta)
    return out


def _groupsort(layer: GroupSortLayer) -> dict:
    return {"type": "groupsort", "name": layer.name, "width": layer.width, "group_size": layer.group_size}


def _householder(layer: HouseholderLayer) -> dict:
    return {"type": "householder", "name": layer.name, "vectors": _numbers(layer.vectors)}


def _residual(layer: ResidualBlock) -> dict:
    return {"type": "residual", "name": layer.name, "inner": _affine(layer.inner),
            "activation": stage_to_dict(layer.activation),
            "outer": None if layer.outer is None else _affine(layer.outer)}


def _implicit(layer: ImplicitLayer) -> dict:
    return {"type": "implicit", "name": layer.name, "weight": _numbers(layer.weight),
            "input_weight": _numbers(layer.input_weight), "bias": _numbers(layer.bias),
            "activation": stage_to_dict(layer.activation)}


_WRITERS: dict[type, Callable] = {
    Affine: _affine, SlopeRestricted: _slope, GroupSortLayer: _groupsort, HouseholderLayer: _householder,
    ResidualBlock: _residual, ImplicitLayer: _implicit,
}

_READERS: dict[str, Callable] = {
    "affine": lambda d: Affine(_array(d["weight"]), _array(d["bias"]), name=d["name"]),
    "slope": lambda d: SlopeRestricted(
        ActivationSpec(d["activation"], d["params"]), d["width"],
        _array(d["alpha"]) if "alpha" in d else None, _array(d["beta"]) if "beta" in d else None, name=d["name"]),
    "groupsort": lambda d: GroupSortLayer(d["width"], d["group_size"], name=d["name"]),
    "householder": lambda d: HouseholderLayer(_array(d["vectors"]), name=d["name"]),
    "residual": lambda d: ResidualBlock(stage_from_dict(d["inner"]), stage_from_dict(d["activation"]),
                                        None if d["outer"] is None else stage_from_dict(d["outer"]), name=d["name"]),
    "implicit": lambda d: ImplicitLayer(_array(d["weight"]), _array(d["input_weight"]),
                                        stage_from_dict(d["activation"]), _array(d["bias"]), name=d["name"]),
}


def stage_to_dict(layer) -> dict:
    """JSON-ready description of one IR layer."""
    writer = _WRITERS.get(type(layer))
    if writer is None:
        raise NetworkError(f"no JSON description for layer '{getattr(layer, 'name', layer)}' "
                           f"({type(layer).__name__}); add a writer to lipbound.soundness.description.")
    return writer(layer)


def stage_from_dict(data: dict):
    """The IR layer described by :func:`stage_to_dict`."""
    reader = _READERS.get(data.get("type"))
    if reader is None:
        raise NetworkError(f"unknown layer type {data.get('type')!r} in a network description; known: "
                           f"{', '.join(_READERS)}.")
    return reader(data)


def _matrix_to_dict(m) -> dict | list | None:
    """A dense matrix as nested lists, a sparse one as its shape and coordinate lists."""
    if m is None:
        return None
    if sp.issparse(m):
        coo = m.tocoo()
        return {"shape": list(coo.shape), "rows": coo.row.tolist(), "cols": coo.col.tolist(),
                "values": _numbers(coo.data)}
    return _numbers(m)


def _matrix_from_dict(data):
    if data is None:
        return None
    if isinstance(data, dict):
        return sp.csr_matrix((_array(data["values"]), (data["rows"], data["cols"])), shape=tuple(data["shape"]))
    return _array(data)


def _optional(array) -> list | None:
    return None if array is None else _numbers(np.asarray(array))


_OP_WRITERS: dict[type, Callable] = {
    Input: lambda op: {"type": "input", "shape": list(op.shape)},
    LinearMap: lambda op: {"type": "linear_map", "kind": op.kind, "matrix": _matrix_to_dict(op.matrix),
                           "bias": _numbers(op.bias), "err": _matrix_to_dict(op.err),
                           "bias_err": _optional(op.bias_err)},
    Conv: lambda op: {"type": "conv", "kind": op.kind, "weight": _numbers(op.weight), "bias": _numbers(op.bias),
                      "in_shape": list(op.in_shape), "stride": list(op.stride), "padding": list(op.padding),
                      "dilation": list(op.dilation), "groups": op.groups, "weight_err": _optional(op.weight_err)},
    Sum: lambda op: {"type": "sum", "coefficients": list(op.coefficients), "errors": list(op.errors)},
    Concat: lambda op: {"type": "concat"},
}

_OP_READERS: dict[str, Callable] = {
    "input": lambda d: Input(tuple(d["shape"])),
    "linear_map": lambda d: LinearMap(_matrix_from_dict(d["matrix"]), _array(d["bias"]),
                                      _matrix_from_dict(d["err"]),
                                      None if d["bias_err"] is None else _array(d["bias_err"]), kind=d["kind"]),
    "conv": lambda d: Conv(_array(d["weight"]), _array(d["bias"]), tuple(d["in_shape"]), tuple(d["stride"]),
                           tuple(d["padding"]), tuple(d["dilation"]), d["groups"],
                           None if d["weight_err"] is None else _array(d["weight_err"]), kind=d["kind"]),
    "sum": lambda d: Sum(tuple(d["coefficients"]), tuple(d["errors"])),
    "concat": lambda d: Concat(),
}


def _node_to_dict(node: Node) -> dict:
    writer = _OP_WRITERS.get(type(node.op))
    op = writer(node.op) if writer is not None else stage_to_dict(node.op)
    return {"name": node.name, "inputs": list(node.inputs), "shape": list(node.shape), "op": op}


def _node_from_dict(data: dict) -> Node:
    reader = _OP_READERS.get(data["op"].get("type"))
    op = reader(data["op"]) if reader is not None else stage_from_dict(data["op"])
    return Node(data["name"], op, tuple(data["inputs"]), tuple(data["shape"]))


def network_to_dict(network: Network | GraphNetwork) -> dict:
    """A JSON-ready description of ``network`` (every layer's or node's weights and parameters).

    Examples
    --------
    >>> import json, numpy as np, lipbound
    >>> from lipbound.soundness.description import network_from_dict, network_to_dict
    >>> net = lipbound.from_weights([np.eye(2), np.ones((1, 2))], "tanh")
    >>> again = network_from_dict(json.loads(json.dumps(network_to_dict(net))))
    >>> again.summary() == net.summary(), bool(np.array_equal(again.weights[1], net.weights[1]))
    (True, True)
    >>> from lipbound.graph import GraphBuilder
    >>> b = GraphBuilder((2,))
    >>> graph = b.build(b.add([b.input, b.activation(b.input, "relu")], [1.0, -0.5]), name="skip")
    >>> network_from_dict(json.loads(json.dumps(network_to_dict(graph)))).summary() == graph.summary()
    True
    """
    if isinstance(network, GraphNetwork):
        return {"name": network.name, "graph": True, "output": network.output,
                "nodes": [_node_to_dict(node) for node in network.nodes]}
    return {"name": network.name, "layers": [stage_to_dict(layer) for layer in network.layers]}


def network_from_dict(data: dict) -> Network | GraphNetwork:
    """The :class:`~lipbound.network.Network` or :class:`~lipbound.graph.GraphNetwork` described by
    :func:`network_to_dict`."""
    if data.get("graph"):
        return GraphNetwork(tuple(_node_from_dict(d) for d in data["nodes"]), data["output"],
                            data.get("name", "network"))
    return Network(tuple(stage_from_dict(d) for d in data["layers"]), data.get("name", "network"))
