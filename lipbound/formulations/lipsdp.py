"""Method-level entry points: LipSDP-Neuron/Layer, LipSDP-NSR, LipSDP-RR and the matrix-product bound.

* ``lipsdp-neuron`` / ``lipsdp-layer`` (Fazlyab et al., NeurIPS 2019): slope-restricted activations only,
  one multiplier per neuron / per layer.
* ``lipsdp-nsr`` (Pauli et al., ICLR 2024): GroupSort/MaxMin/Householder QCs next to slope-restricted
  layers (neuron multipliers); ``coupled=True`` adds the S and P multipliers.
* ``lipsdp-rr``: the QC paper's baseline, MaxMin rewritten as a residual ReLU layer, then LipSDP-Neuron.

All work for feedforward chains, residual blocks (first and last affine maps inside the SDP) and implicit
layers, in l2 and (scalar output) l-infinity; see :mod:`lipbound.formulations.sdp`.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from lipbound.errors import FormulationError
from lipbound.formulations.sdp import LipschitzProblem, lipschitz_problem, signal_product_bound
from lipbound.formulations.signal import signal_model
from lipbound.network import (
    Affine,
    GroupSortLayer,
    HouseholderLayer,
    ImplicitLayer,
    Network,
    ResidualBlock,
    SlopeRestricted,
    max_slope,
)
from lipbound.rigorous import round_up, spectral_norm_bound, spectral_norm_estimate, sqrt_up

FORMS = ("neuron", "channel", "layer")


def _leaf_activations(network):
    for stage in network.activations:
        if isinstance(stage, (ResidualBlock, ImplicitLayer)):
            yield stage.activation
        else:
            yield stage


def _signal(network, maxmin_as_relu: bool = False, channels: bool = False):
    """The signal model of a chain or graph network."""
    from lipbound.graph import GraphNetwork

    if isinstance(network, GraphNetwork):
        from lipbound.formulations.graph import graph_signal_model

        return graph_signal_model(network, maxmin_as_relu, channel_groups=channels)
    return signal_model(network, maxmin_as_relu)


def _require_slope(network: Network, method: str) -> None:
    bad = [(a.name, type(a).__name__) for a in _leaf_activations(network) if not isinstance(a, SlopeRestricted)]
    if bad:
        listing = ", ".join(f"{n} ({t})" for n, t in bad)
        raise FormulationError(f"{method} needs slope-restricted activations; not applicable to: {listing}. "
                               "GroupSort/MaxMin/Householder are not slope-restricted: use method='lipsdp-nsr' "
                               "(or 'lipsdp-rr' for MaxMin).")


def lipsdp(network: Network, form: str = "neuron", exponents: tuple[int, ...] | None = None,
           reduce_input: bool = True, norm: str = "l2", output_index: int | None = None) -> LipschitzProblem:
    """LipSDP-Neuron (``form="neuron"``), per-channel (``form="channel"``: one multiplier per output channel of
    each convolutional layer, per neuron elsewhere) or LipSDP-Layer (``form="layer"``) program of a network.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.eye(2), np.eye(2)], activation="relu")
    >>> lipsdp(net).program.sizes
    {'n_vars': 3, 'lmi_sizes': [4]}
    """
    if form not in FORMS:
        raise FormulationError(f"unknown LipSDP form {form!r}; use one of {FORMS}.")
    _require_slope(network, f"lipsdp-{form}")
    return lipschitz_problem(_signal(network, channels=form == "channel"), norm, form, False, output_index, exponents,
                             reduce_input, name=f"lipsdp-{form}")


def lipsdp_nsr(network: Network, coupled: bool = False, norm: str = "l2", output_index: int | None = None,
               exponents: tuple[int, ...] | None = None, reduce_input: bool = True) -> LipschitzProblem:
    """LipSDP-NSR: GroupSort/MaxMin/Householder QCs (``coupled`` adds S, P) plus neuron multipliers elsewhere.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.eye(2), np.eye(2)], activation="maxmin")
    >>> round(lipbound.certify(net, method="lipsdp-nsr").upper_bound, 6)
    1.0
    """
    return lipschitz_problem(_signal(network), norm, "neuron", coupled, output_index, exponents, reduce_input,
                             name="lipsdp-nsr" + ("-coupled" if coupled else ""))


def lipsdp_rr(network: Network, norm: str = "l2", output_index: int | None = None,
              exponents: tuple[int, ...] | None = None, reduce_input: bool = True) -> LipschitzProblem:
    """LipSDP-RR baseline: every MaxMin layer rewritten as ``H z + G ReLU(Wt z)``, then LipSDP-Neuron."""
    model = _signal(network, maxmin_as_relu=True)
    bad = [f"{s.layer.name} (a {type(s.layer).__name__} inside an implicit layer: the rewrite is not applied there)"
           if k in s.pre else f"{s.layer.name} ({type(s.layer).__name__})"  # a self-loop: an implicit layer
           for k, s in enumerate(model.stages, start=1) if not isinstance(s.layer, SlopeRestricted)]
    if bad:
        raise FormulationError("lipsdp-rr rewrites MaxMin (group size 2) layers of feed-forward and residual "
                               "networks only; not applicable to: " + ", ".join(bad))
    return lipschitz_problem(model, norm, "neuron", False, output_index, exponents, reduce_input, name="lipsdp-rr")


def product_estimate(network: Network, output_index: int | None = None) -> float | None:
    """Floating-point estimate of the l2 :func:`product_bound` (not a bound: every spectral norm is a Lanczos or SVD
    estimate, the rebalanced product's included), for chains and graphs alike (``None`` is kept in the signature
    for callers that treat a missing estimate).

    The estimates are Ritz values, which never exceed the norms they estimate (up to rounding), so this is at most
    the certified product bound up to rounding: :func:`lipbound.certify` skips the rigorous product bound (13.5 s of
    a 784-4096x4-10 certificate on an H200 host) when the estimate already exceeds its SDP certificate.

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.diag([1e8, 1e-8]), np.diag([1e-8, 1e8])], "relu")
    >>> abs(product_estimate(net) - 1) < 1e-12
    True
    """
    return product_bound(network, "l2", output_index, rigorous=False)[0]


def product_bound(network: Network, norm: str = "l2", output_index: int | None = None,
                  exponents=None, rigorous: bool = True) -> tuple[float, float, tuple]:
    """Matrix-product bound: the product of per-layer Lipschitz bounds, and (l2) the same over the rebalanced
    network.

    l2: ``||W||_2`` per affine map, the largest |slope| per activation (1 for GroupSort/Householder),
    ``1 + ||G|| s ||W||`` per residual block, ``s ||U|| / (1 - s ||W||)`` per contractive implicit layer; and
    :func:`~lipbound.formulations.sdp.signal_product_bound`, the product over the signal model's paths after
    per-neuron rebalancing ``D^-1 W_k``, ``W_k+1 D`` (exact for the Jacobians of element-wise activations, which
    commute with ``D``; its factors ``exponents`` are chosen from the data when None). The smaller is certified.
    ``Linear(diag(1e8, 1e-8)) -> ReLU -> Linear(diag(1e-8, 1e8))``: 1e16 plain, 1 rebalanced.
    l-infinity (scalar output ``output_index``): induced inf-norms (max row sums), the output row's 1-norm.

    Returns ``(certified, estimate, exponents)``: a rigorous bound (spectral norms proved, sums rounded up), the
    plain floating-point product, and the rebalancing used (empty when the plain product is smaller or for
    l-infinity). ``rigorous=False`` (l2): the same computation with every spectral norm estimated instead of proved
    (see :func:`product_estimate`).

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.diag([1e8, 1e-8]), np.diag([1e-8, 1e8])], "relu")
    >>> certified, estimate, _ = product_bound(net)
    >>> abs(certified - 1) < 1e-6, estimate
    (True, 1e+16)
    """
    from lipbound.graph import GraphNetwork

    if isinstance(network, GraphNetwork):
        from lipbound.formulations.graph import graph_product_bound

        plain, est, _ = graph_product_bound(network, norm, output_index, rigorous)
        return _smaller_rebalanced(network, norm, exponents, plain, est, rigorous)

    def op_norm(w: np.ndarray) -> tuple[Fraction, float]:
        if norm == "l2":
            # The estimate by Lanczos on the Gram matrix (a full SVD took 2 s per 4096 x 4096 weight, 14 s of a
            # 784-4096x4-10 certificate's product fallback).
            estimate = spectral_norm_estimate(w)
            return (spectral_norm_bound(w) if rigorous else Fraction(estimate)), estimate
        rows = np.abs(w).sum(axis=1)
        exact = max(sum((Fraction(float(x)) for x in np.abs(r)), Fraction(0)) for r in w)
        return exact, float(rows.max())

    cert, est = Fraction(1), 1.0
    layers = network.layers
    if norm == "linf":
        if output_index is None:
            if network.output_dim != 1:
                raise FormulationError("norm='linf' needs output_index for a network with several outputs.")
            output_index = 0
        last = layers[-1].weight[output_index:output_index + 1]
        layers = layers[:-1] + (Affine(last, name=layers[-1].name),)
    for layer in layers:
        if isinstance(layer, Affine):
            c, e = op_norm(layer.weight)
        elif isinstance(layer, (SlopeRestricted, GroupSortLayer, HouseholderLayer)):
            if norm == "linf" and isinstance(layer, HouseholderLayer):
                # 1-Lipschitz in l2 per group, so sqrt(g)-Lipschitz in l-inf (sorting stays 1-Lipschitz in l-inf).
                c, e = Fraction(sqrt_up(layer.group_size)), float(np.sqrt(layer.group_size))
            else:
                c, e = Fraction(max_slope(layer)), max_slope(layer)
        elif isinstance(layer, ResidualBlock):
            s = Fraction(max_slope(layer.activation))
            cw, ew = op_norm(layer.inner.weight)
            cg, eg = (Fraction(1), 1.0) if layer.outer is None else op_norm(layer.outer.weight)
            c, e = 1 + cg * s * cw, 1 + eg * float(s) * ew
        elif isinstance(layer, ImplicitLayer):
            s = Fraction(max_slope(layer.activation))
            cw, ew = op_norm(layer.weight)
            cu, eu = op_norm(layer.input_weight)
            if s * cw >= 1:
                raise FormulationError(f"mp: implicit layer '{layer.name}' is not a contraction (s||W|| >= 1); no "
                                       "product bound.")
            c, e = s * cu / (1 - s * cw), float(s) * eu / (1 - float(s) * ew)
        else:
            raise FormulationError(f"mp: unsupported layer '{layer.name}' ({type(layer).__name__}).")
        cert *= c
        est *= float(e)
    return _smaller_rebalanced(network, norm, exponents, round_up(cert), est, rigorous)


def _smaller_rebalanced(network, norm: str, exponents, plain: float, est: float,
                        rigorous: bool = True) -> tuple[float, float, tuple]:
    """The plain product ``plain`` or, in l2, the signal model's rebalanced product if that is smaller (or if
    ``exponents`` asks for it: a certificate re-check)."""
    if norm != "l2":
        return plain, est, ()
    balanced, _, used = signal_product_bound(_signal(network), exponents, rigorous)
    if balanced < plain or exponents:
        return balanced, est, used
    return plain, est, ()
