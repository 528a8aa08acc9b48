"""Shared fixtures: tiny networks built in code, and the peers' weight files when present."""

from __future__ import annotations

import itertools
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

import lipbound
from lipbound import Affine, Network
from lipbound.activations import ActivationSpec
from lipbound.network import GroupSortLayer, HouseholderLayer, ImplicitLayer, ResidualBlock, SlopeRestricted

# Property tests draw the same examples on every run (CI must not fail at random); HYPOTHESIS_PROFILE=explore
# draws new ones each run (and more of them) to hunt for counterexamples.
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """Path of a file under ../shared/data, skipping the test with a reason when absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared test data not available: {path}")
    return path


def exact_product(weights, slope: Fraction = Fraction(1)) -> list[list[Fraction]]:
    """``W_L diag(slope) ... diag(slope) W_1`` in exact rationals (the Jacobian at 0 of a smooth activation net
    with zero biases, ``slope = phi'(0)``)."""
    prod = [[Fraction(float(x)) for x in row] for row in np.asarray(weights[0])]
    for w in weights[1:]:
        w = [[Fraction(float(x)) for x in row] for row in np.asarray(w)]
        prod = [[slope * sum((w[i][k] * prod[k][j] for k in range(len(prod))), Fraction(0))
                 for j in range(len(prod[0]))] for i in range(len(w))]
    return prod


def _det(m: list[list[Fraction]]) -> Fraction:
    m = [row[:] for row in m]
    n, det = len(m), Fraction(1)
    for k in range(n):
        pivot = next((i for i in range(k, n) if m[i][k] != 0), None)
        if pivot is None:
            return Fraction(0)
        if pivot != k:
            m[k], m[pivot] = m[pivot], m[k]
            det = -det
        det *= m[k][k]
        for i in range(k + 1, n):
            f = m[i][k] / m[k][k]
            for j in range(k, n):
                m[i][j] -= f * m[k][j]
    return det


def exact_norm_at_most(p: list[list[Fraction]], bound: float) -> bool:
    """Whether ``||P||_2 <= bound``, decided exactly: every principal minor of ``bound^2 I - P^T P`` is >= 0."""
    n = len(p[0])
    c2 = Fraction(bound) ** 2
    g = [[c2 * (i == j) - sum((p[k][i] * p[k][j] for k in range(len(p))), Fraction(0)) for j in range(n)]
         for i in range(n)]
    for size in range(1, n + 1):
        for idx in itertools.combinations(range(n), size):
            if _det([[g[i][j] for j in idx] for i in idx]) < 0:
                return False
    return True


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
