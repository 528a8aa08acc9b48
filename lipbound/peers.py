"""Peer tools run side by side in benchmarks (optional dependencies; never used to report lipbound bounds).

* ``eclipse-nn`` (ECLipsE and ECLipsE-Fast, Xu & Sivaranjani, NeurIPS 2024; ``pip install eclipse-nn``).
  Its functions are called directly with float64 torch weights, so its estimator's silent fallback from
  ECLipsE to ECLipsE-Fast (and its ``None`` for unknown method names) cannot change what is measured: a
  failed ECLipsE run is recorded as failed. Its values are the peer's own, unchecked.
"""

from __future__ import annotations

import time

import numpy as np

from lipbound.errors import FormulationError, SolverError
from lipbound.network import Network, SlopeRestricted

ECLIPSE_METHODS = ("eclipse", "eclipse-fast")


def eclipse_bound(network: Network, method: str) -> dict:
    """Run eclipse-nn's ECLipsE (``method="eclipse"``) or ECLipsE-Fast (``"eclipse-fast"``) on a network.

    Raises
    ------
    SolverError
        eclipse-nn is not installed.
    FormulationError
        The network is not a feedforward chain of slope-restricted activations (the only case it supports).
    """
    try:
        import torch
        from eclipse_nn.eclipsE import ECLipsE
        from eclipse_nn.eclipsE_fast import ECLipsE_Fast
    except ImportError as exc:
        raise SolverError("eclipse-nn is not installed (pip install eclipse-nn).") from exc
    if method not in ECLIPSE_METHODS:
        raise FormulationError(f"unknown peer method {method!r}; use one of {ECLIPSE_METHODS}.")
    acts = network.activations
    if not all(isinstance(a, SlopeRestricted) for a in acts):
        raise FormulationError("ECLipsE handles feedforward nets with slope-restricted activations only.")
    weights = [torch.tensor(np.array(w), dtype=torch.float64) for w in network.weights]
    alphas = [float(np.min(a.alpha)) for a in acts]
    betas = [float(np.max(a.beta)) for a in acts]
    start = time.perf_counter()
    if method == "eclipse":
        value, exit_code = ECLipsE(weights, alphas, betas)
        status = "ok" if exit_code == 0 else "failed (boundary solution; the estimator would fall back to Fast)"
    else:
        value, status = ECLipsE_Fast(weights, alphas, betas), "ok"
    return {"upper_bound": None if value is None else float(value), "certified": False, "solver_bound": None
            if value is None else float(value), "status": status, "solver": method,
            "peer_time_s": time.perf_counter() - start}
