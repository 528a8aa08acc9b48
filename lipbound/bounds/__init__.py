"""Activation-bound analysis: rigorous pre-activation bounds over input domains, local slope bounds.

Given a network (a chain :class:`~lipbound.network.Network` or any :class:`~lipbound.graph.GraphNetwork`: skip
connections, convolutions, pooling, normalisation) and an input domain (a :class:`Box` or a :class:`Ball`),
:func:`activation_bounds` returns, for every nonlinear layer, elementwise lower/upper bounds on its
*pre-activations* that hold for every input in the domain, by interval bound propagation (IBP) or CROWN.
:func:`local_slopes` turns them into per-neuron slope bounds (a network with narrowed ``alpha``/``beta``) for
local Lipschitz certificates; :func:`stable_neurons` counts neurons whose ReLU phase is fixed on the domain.

The package is split by concern:

* :mod:`~lipbound.bounds.domains` -- the input domains and bounds of linear functions over them;
* :mod:`~lipbound.bounds.operators` -- the rounding model and rigorous products with the graph's linear
  operators (dense, sparse, convolutions; directed rounding from :mod:`lipbound.rigorous`);
* :mod:`~lipbound.bounds.relaxations` -- activation point enclosures, interval images and linear relaxations;
* :mod:`~lipbound.bounds.propagation` -- IBP and CROWN on graphs;
* :mod:`~lipbound.bounds.analysis` -- the public analysis functions.

Every bound holds for the *exact* real network on every input of the domain, despite floating point (see
:mod:`lipbound.bounds.operators`).

Examples
--------
>>> import numpy as np, lipbound
>>> net = lipbound.from_weights([np.eye(2), np.ones((1, 2))], "relu", [np.array([2.0, -2.0]), None])
>>> stable_neurons(activation_bounds(net, Box([-1.0, -1.0], [1.0, 1.0])))
{'relu_1': (1, 1, 2)}
"""

from lipbound.bounds.analysis import Bounds, activation_bounds, local_slopes, stable_neurons
from lipbound.bounds.domains import Ball, Box, Domain, DomainError

__all__ = ["Ball", "Bounds", "Box", "Domain", "DomainError", "activation_bounds", "local_slopes", "stable_neurons"]
