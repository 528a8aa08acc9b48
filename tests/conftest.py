"""Shared fixtures: tiny networks built in code, and the peers' weight files when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lipbound

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


@pytest.fixture
def small_relu_net() -> lipbound.Network:
    return random_net([5, 8, 8, 3], seed=1)
