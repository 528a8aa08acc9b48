"""Activation-bound analysis: pre-activation bounds per nonlinear layer, stable neurons, local slopes.

:func:`activation_bounds` runs the propagation of :mod:`lipbound.bounds.propagation` on the graph of any network
(chains are converted) and reports, for every nonlinear node, the bounds of its input; :func:`local_slopes` turns
them into per-neuron slope ranges (a network with narrowed ``alpha``/``beta``) for local Lipschitz certificates;
:func:`stable_neurons` counts neurons whose ReLU phase is fixed on the domain.

Implicit (equilibrium) layers are refused with a :class:`~lipbound.errors.FormulationError` naming the layer.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lipbound.bounds.domains import Ball, Box, Domain, DomainError
from lipbound.bounds.operators import exact_products
from lipbound.bounds.propagation import Propagation, build_operators, no_relaxation
from lipbound.errors import FormulationError
from lipbound.graph import GraphNetwork, Node
from lipbound.network import ImplicitLayer, Network, ResidualBlock, SlopeRestricted
from lipbound.slopes import slope_bounds

log = logging.getLogger("lipbound")

Bounds = dict[str, tuple[np.ndarray, np.ndarray]]


def _as_network(model: Any, dim: int) -> Network | GraphNetwork:
    if isinstance(model, (Network, GraphNetwork)):
        return model
    if isinstance(model, torch.nn.Module):
        from lipbound.importers import from_torch

        return from_torch(model, input_shape=dim)
    raise TypeError(f"activation_bounds needs a lipbound.Network, a lipbound.GraphNetwork or a torch.nn.Module, got "
                    f"{type(model).__name__}.")


def _check_domain(domain: Any, network: Network | GraphNetwork) -> None:
    if not isinstance(domain, (Box, Ball)):
        raise DomainError(f"the domain must be a lipbound.bounds.Box or Ball, got {type(domain).__name__}.")
    if domain.dim != network.input_dim:
        shape = getattr(network, "input_shape", (network.input_dim,))
        flat = f" (input shape {'x'.join(map(str, shape))}, flattened in C order)" if len(shape) > 1 else ""
        raise DomainError(f"the domain has dimension {domain.dim} (shape ({domain.dim},)) but network "
                          f"'{network.name}' takes {network.input_dim} inputs{flat}.")


def _stage_name(stage: Any) -> str:
    return stage.activation.name if isinstance(stage, ResidualBlock) else stage.name


def _chain_keys(network: Network) -> list[str]:
    """Keys of a chain's stages: the layer names (a residual block's activation name), ``name[i]`` if repeated."""
    names = [_stage_name(s) for s in network.activations]
    keys = [f"{name}[{i}]" if names.count(name) > 1 else name for i, name in enumerate(names)]
    if len(set(keys)) < len(keys):
        raise FormulationError(f"activation_bounds: layer names of network '{network.name}' cannot be made unique "
                               f"({keys}); rename the layers.")
    if keys != names:
        log.warning("activation_bounds: network '%s' has repeated layer names; keys are 'name[i]' with i the "
                    "stage index: %s", network.name, keys)
    return keys


def _analyse(graph: GraphNetwork, domain: Domain, method: str,
             device: str | torch.device | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pre-activation bounds of every nonlinear node of ``graph``, in node order."""
    if method not in ("crown", "ibp"):
        raise FormulationError(f"activation_bounds: unknown method {method!r}; use 'crown' or 'ibp'.")
    _check_domain(domain, graph)
    for node in graph.nodes:
        if isinstance(node.op, ImplicitLayer):
            raise FormulationError(
                f"activation_bounds: implicit layer '{node.op.name}' is not supported: bounding its fixed point "
                "z = phi(W z + U x + b) needs a fixed-point (interval contraction) enclosure, which is not "
                "implemented. Remove the implicit layer or bound it separately.")
    dev = torch.device("cpu" if device is None else device)
    dom = domain.concretizer(dev)
    with torch.no_grad(), exact_products():
        operators = build_operators(graph, dev)
        boxes = Propagation(graph, dom, crown=False, operators=operators).run()
        if method == "crown":
            crossed = no_relaxation(graph)
            if crossed:
                log.warning("activation_bounds(method='crown'): no linear relaxation for stage(s) %s; they are "
                            "passed by interval propagation (IBP) and the backward pass concretises over their "
                            "output boxes.", ", ".join(crossed))
            boxes = Propagation(graph, dom, crown=True, reference=boxes, operators=operators).run()
    return [(boxes[graph.nodes[i].inputs[0]][0].cpu().numpy().copy(),
             boxes[graph.nodes[i].inputs[0]][1].cpu().numpy().copy()) for i in graph.activation_nodes]


def activation_bounds(model: Network | GraphNetwork | torch.nn.Module, domain: Domain, method: str = "crown",
                      device: str | torch.device | None = None) -> Bounds:
    """Rigorous bounds on the pre-activations of every nonlinear layer over an input domain.

    Parameters
    ----------
    model : Network, GraphNetwork or torch.nn.Module
        A module is imported with :func:`lipbound.from_torch` (input shape ``(domain.dim,)``; import modules
        with image inputs first, giving their ``input_shape``).
    domain : Box or Ball
        Over the flat input (C-order flattening of the input shape).
    method : {"crown", "ibp"}
        ``"crown"``: backward linear relaxation, intersected with IBP (never looser than IBP);
        ``"ibp"``: interval bound propagation. See :mod:`lipbound.bounds.propagation`.
    device : str or torch.device, optional
        Where the products run (float64); default ``"cpu"``.

    Returns
    -------
    dict
        ``{name: (lower, upper)}`` for every nonlinear layer in order, the bounds of its input (float64 arrays
        of its flat width); for every input ``x`` in the domain the exact pre-activations lie in ``[lower,
        upper]``. Graph networks are keyed by node name. Chains are keyed by layer name (a residual block by
        its activation's name, the bounds of ``W x + b`` inside the block); repeated names become ``"name[i]"``
        (``i`` the stage index; a warning is logged).

    Raises
    ------
    DomainError
        If the domain does not match the network's input dimension.
    FormulationError
        For an unknown method or an implicit layer (not supported).

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.array([[1.0, -1.0], [2.0, 0.5]]), np.ones((1, 2))], "relu")
    >>> b = activation_bounds(net, Box([-1.0, -1.0], [1.0, 1.0]))
    >>> lo, hi = b["relu_1"]
    >>> bool(np.all(lo <= [-2.0, -2.5]) and np.all(hi >= [2.0, 2.5]))
    True
    """
    network = _as_network(model, domain.dim if isinstance(domain, (Box, Ball)) else 0)
    _check_domain(domain, network)
    graph = GraphNetwork.from_network(network)
    results = _analyse(graph, domain, method, device)
    if isinstance(network, Network):
        keys = _chain_keys(network)
    else:
        keys = [graph.nodes[i].name for i in graph.activation_nodes]
    return dict(zip(keys, results, strict=True))


def stable_neurons(bounds: Bounds) -> dict[str, tuple[int, int, int]]:
    """Count the neurons whose ReLU phase is fixed: ``(n_inactive, n_active, n_total)`` per layer.

    A neuron is inactive if ``upper <= 0`` and active if ``lower >= 0`` (a neuron with ``lower = upper = 0``
    counts as inactive only). Meaningful for ReLU-like layers (a kink at 0).

    Parameters
    ----------
    bounds : dict
        As returned by :func:`activation_bounds`.

    Returns
    -------
    dict
        ``{name: (n_inactive, n_active, n_total)}``.

    Examples
    --------
    >>> stable_neurons({"relu_1": (np.array([-2.0, 0.5, -1.0]), np.array([-1.0, 3.0, 1.0]))})
    {'relu_1': (1, 1, 3)}
    """
    out = {}
    for name, (lo, hi) in bounds.items():
        lo, hi = np.asarray(lo), np.asarray(hi)
        inactive = hi <= 0
        active = (lo >= 0) & ~inactive
        out[name] = (int(inactive.sum()), int(active.sum()), int(lo.size))
    return out


def _narrowed(layer: SlopeRestricted, lo: np.ndarray, hi: np.ndarray, where: str) -> SlopeRestricted:
    """``layer`` with its slopes intersected with ``slope_bounds`` on the pre-activations ``[lo, hi]``."""
    a, b = slope_bounds(layer.activation.name, lo, hi, **layer.activation.params)
    alpha, beta = np.maximum(a, layer.alpha), np.minimum(b, layer.beta)
    if np.any(alpha > beta):
        i = int(np.flatnonzero(alpha > beta)[0])
        raise FormulationError(f"local_slopes: {where} neuron {i}: its slope bounds [{layer.alpha[i]}, "
                               f"{layer.beta[i]}] do not meet the local range [{a[i]}, {b[i]}] on pre-activations "
                               f"[{lo[i]}, {hi[i]}].")
    return layer.with_slopes(alpha, beta)


def local_slopes(network: Network | GraphNetwork, domain: Domain, method: str = "crown",
                 device: str | torch.device | None = None) -> Network | GraphNetwork:
    """The network with per-neuron slope bounds narrowed to the domain.

    For every slope-restricted layer, ``(alpha, beta) = slope_bounds(activation, lower, upper)`` on the
    pre-activation bounds of :func:`activation_bounds`, intersected with the layer's current (e.g. global)
    ``alpha``/``beta``. Every difference quotient of a neuron between two inputs of the domain lies in the
    new range, so a Lipschitz certificate of the returned network is a *local* certificate on the domain.

    Parameters
    ----------
    network : Network or GraphNetwork
        The slope-restricted layers (nodes) are narrowed; the other nonlinear ones (GroupSort, Householder,
        whose quadratic constraints hold globally; max pooling) are kept.
    domain : Box or Ball
    method : {"crown", "ibp"}
    device : str or torch.device, optional

    Returns
    -------
    Network or GraphNetwork
        Of the same kind as ``network`` (a chain with residual or implicit blocks and GroupSort/Householder stages
        comes back as its graph), with the narrowed layers.

    Raises
    ------
    FormulationError
        If a layer's own ``alpha``/``beta`` do not meet the local range.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.eye(2), np.ones((1, 2))], "relu", [np.array([2.0, -2.0]), None])
    >>> local = local_slopes(net, Box([-1.0, -1.0], [1.0, 1.0]))
    >>> local.activations[0].alpha, local.activations[0].beta
    (array([1., 0.]), array([1., 0.]))
    """
    if isinstance(network, Network):
        if any(not isinstance(s, SlopeRestricted) for s in network.activations):
            # GroupSort/Householder stages (max pooling imports as GroupSort) keep their global constraints: narrow
            # the rest on the graph, and return a chain again where the graph is one.
            local = local_slopes(GraphNetwork.from_network(network), domain, method, device)
            return local.to_network() or local
        graph = GraphNetwork.from_network(network)
        results = _analyse(graph, domain, method, device)
        narrowed = [_narrowed(act, lo, hi, f"layer '{act.name}'")
                    for act, (lo, hi) in zip(network.activations, results, strict=True)]
        return network.with_slopes([(act.alpha, act.beta) for act in narrowed])
    if not isinstance(network, GraphNetwork):
        raise TypeError(f"local_slopes needs a lipbound.Network or a lipbound.GraphNetwork, got "
                        f"{type(network).__name__}.")
    results = _analyse(network, domain, method, device)
    nodes = list(network.nodes)
    for i, (lo, hi) in zip(network.activation_nodes, results, strict=True):
        node = nodes[i]
        if isinstance(node.op, SlopeRestricted):
            nodes[i] = Node(node.name, _narrowed(node.op, lo, hi, f"node '{node.name}'"), node.inputs, node.shape)
    return GraphNetwork(tuple(nodes), network.output, network.name)
