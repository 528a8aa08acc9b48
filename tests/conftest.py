"""Shared fixtures: tiny networks built in code, and the peers' weight files when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lipbound
from lipbound import Affine, Network
from lipbound.activations import ActivationSpec
from lipbound.network import GroupSortLayer, HouseholderLayer, ImplicitLayer, ResidualBlock, SlopeRestricted

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """Path of a file under ../shared/data, skipping the test with a reason when absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared test data not available: {path}")
    return path


def random_net(dims, activation="relu", seed=0, nonneg=False, scale=1.0, **params) -> lipbound.Network:
    rng = np.random.default_rng(seed)
    weights = []
    for i in range(len(dims) - 1):
        w = rng.standard_normal((dims[i + 1], dims[i])) * scale / np.sqrt(dims[i])
        weights.append(np.abs(w) if nonneg else w)
    biases = [rng.standard_normal(dims[i + 1]) * 0.1 for i in range(len(dims) - 1)]
    return lipbound.from_weights(weights, activation, biases, **params)


def implicit_net(seed, contraction=0.6, act="tanh") -> lipbound.Network:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 4))
    w *= contraction / np.linalg.norm(w, 2)
    activation = SlopeRestricted(ActivationSpec(act), 4) if act != "maxmin" else GroupSortLayer(4, 2)
    layer = ImplicitLayer(w, rng.standard_normal((4, 3)), activation, rng.standard_normal(4) * 0.1)
    return Network.from_layers([Affine(np.eye(3)), layer, Affine(rng.standard_normal((2, 4)))])


#: One small problem per formulation (method, norm, activation family, architecture).
FORMULATION_CASES = ["neuron", "layer", "neuron-linf", "nsr", "nsr-coupled", "nsr-linf", "rr", "residual",
                     "residual-linf", "implicit", "householder"]


def formulation_problem(case: str, seed: int):
    """The :class:`~lipbound.formulations.LipschitzProblem` of one of :data:`FORMULATION_CASES`."""
    from lipbound.api import build_problem

    rng = np.random.default_rng(seed)
    linf = case.endswith("linf")
    norm = {"norm": "linf", "output_index": 0 if case.startswith("residual") else 1} if linf else {}
    if case == "implicit":
        return build_problem(implicit_net(seed), "lipsdp-nsr")
    if case.startswith("residual"):
        net = Network.from_layers([Affine(rng.standard_normal((4, 3))),
                                   ResidualBlock(Affine(rng.standard_normal((4, 4)) / 2), GroupSortLayer(4, 2)),
                                   Affine(rng.standard_normal((2, 4)))])
        return build_problem(net, "lipsdp-nsr", coupled=True, **norm)
    if case == "householder":
        net = Network.from_layers([Affine(rng.standard_normal((4, 3))), HouseholderLayer(rng.standard_normal((2, 2))),
                                   Affine(rng.standard_normal((2, 4)))])
        return build_problem(net, "lipsdp-nsr", coupled=True)
    act = "relu" if case in ("neuron", "layer", "neuron-linf") else "maxmin"
    net = lipbound.from_weights([rng.standard_normal((6, 5)), rng.standard_normal((6, 6)),
                                 rng.standard_normal((3, 6))], act)
    method = {"neuron": "lipsdp-neuron", "layer": "lipsdp-layer", "neuron-linf": "lipsdp-neuron",
              "nsr": "lipsdp-nsr", "nsr-coupled": "lipsdp-nsr", "nsr-linf": "lipsdp-nsr", "rr": "lipsdp-rr"}[case]
    return build_problem(net, method, coupled=case == "nsr-coupled", **norm)


@pytest.fixture
def small_relu_net() -> lipbound.Network:
    return random_net([5, 8, 8, 3], seed=1)
