"""Families of random networks for the soundness campaign.

A :class:`Family` draws a :class:`Case` from a random generator: a network, the certification runs to make on it
(method, solver, options), the norm, an optional input domain, and what is known about its Lipschitz constant
(an exact value, or candidate input pairs). The campaign (:mod:`lipbound.soundness.campaign`) certifies every run
and compares it with an independent lower bound. Everything a family draws comes from the generator, so a case
is rebuilt exactly from its family and seed (:func:`lipbound.soundness.reproduce`).

Adding a family means writing one sampler that returns a :class:`Case` and registering it in :data:`FAMILIES`
(the graph families of :mod:`lipbound.soundness.graph_families` are registered by the package); the lower-bound
search only calls the network's ``forward`` and the judge (:class:`~lipbound.soundness.reference.Reference`)
needs a multiple-precision evaluator for each new stage type or graph operator (``reference.STAGES``,
``reference.GRAPH_OPS``), or the case brings its own ``reference``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lipbound.activations import ActivationSpec
from lipbound.api import plan_methods
from lipbound.bounds import Ball, Box
from lipbound.graph import GraphNetwork
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
from lipbound.soundness.reference import row_l1_norm, spectral_norm

#: The slope-restricted activations of the campaign's ``slope`` family.
SLOPE_ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "elu", "softplus", "gelu", "gelu_tanh", "silu", "mish")
#: Stage kinds that are not slope-restricted (quadratic constraints of LipSDP-NSR).
GROUP_KINDS = ("maxmin", "groupsort3", "fullsort", "householder2", "householder3")
#: Positively homogeneous stages: ``phi(2^k z) = 2^k phi(z)``, so a network scaled by powers of two is exactly a
#: scaled copy of a moderate one.
HOMOGENEOUS_KINDS = ("relu", "leaky_relu", "maxmin", "groupsort3", "householder2")


@dataclass(frozen=True)
class Run:
    """One certification of a case: ``lipbound.certify(network, method=..., solver=..., **options)``."""

    method: str
    solver: str = "native"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict:
        return dict(self.options)

    @property
    def label(self) -> str:
        """Short name, e.g. ``lipsdp-nsr/native coupled`` or ``lipsdp-neuron/scs eps_abs=0.001``."""
        opts = " ".join(k if v is True else f"{k}={v}" for k, v in self.options)
        return f"{self.method}/{self.solver}" + (f" {opts}" if opts else "")


@dataclass
class Case:
    """A network drawn by a family, with its certification runs and what is known about its Lipschitz constant.

    Attributes
    ----------
    network : Network or GraphNetwork
        What every run certifies.
    runs : tuple of Run
    variant : str
        Sub-kind within the family (an activation, a domain type, ...), for the report's breakdown.
    norm, output_index, domain
        Passed to every run (``norm="linf"`` bounds the scalar output ``output_index``; ``domain`` makes the
        certificates local).
    exact : mpmath number, optional
        A proved lower bound of the Lipschitz constant computed without the library (in the cases here, the
        constant itself: ``||W_L ... W_0||`` of a linear or nonnegative zero-bias ReLU chain, ...).
    exact_kind : str
        How ``exact`` is known.
    search_network : Network or GraphNetwork, optional
        A float64-friendly network with the same good input pairs, used to *search* for pairs (e.g. the network
        rescaled by powers of two when its weights are 1e-300); the pairs are then judged on ``network``.
        ``None``: search on ``network``.
    pairs : tuple
        Extra candidate pairs ``(x, x2)`` (floats or mpmath numbers), judged on ``network``.
    params : dict
        How the case was drawn (JSON).
    search : dict
        Options of :func:`~lipbound.soundness.search.candidate_pairs` (fewer points for costly networks).
    attack : bool
        Also propose the pair of :func:`lipbound.lower_bound` (l2 norm only).
    reference : object, optional
        The judge (an object with ``ratio(x, x2, norm, output_index)``); defaults to
        :class:`~lipbound.soundness.reference.Reference` of ``network``.
    """

    network: Network | GraphNetwork
    runs: tuple[Run, ...]
    variant: str
    norm: str = "l2"
    output_index: int | None = None
    domain: Box | Ball | None = None
    exact: Any = None
    exact_kind: str = ""
    search_network: Network | GraphNetwork | None = None
    pairs: tuple = ()
    params: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    attack: bool = True
    reference: Any = None


@dataclass(frozen=True)
class Family:
    """A named sampler of :class:`Case` objects."""

    name: str
    summary: str
    sample: Callable[[np.random.Generator], Case]


# ----------------------------------------------------------------------------------------------------------------
# Drawing pieces
# ----------------------------------------------------------------------------------------------------------------


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _activation(rng: np.random.Generator, name: str) -> ActivationSpec:
    """An activation with random parameters (leaky slopes below 0 and above 1 included)."""
    if name == "leaky_relu":
        kind = rng.random()
        slope = rng.uniform(0.01, 0.3) if kind < 0.7 else rng.uniform(-1.0, 0.0) if kind < 0.85 else rng.uniform(1, 3)
        return ActivationSpec(name, {"negative_slope": float(slope)})
    if name == "elu":
        return ActivationSpec(name, {"alpha": float(rng.uniform(0.1, 2.0))})
    if name == "softplus":
        return ActivationSpec(name, {"beta": _log_uniform(rng, 0.2, 5.0)})
    if name == "polyrelu":
        degree = int(rng.integers(2, 4))
        coefficients = [float(rng.uniform(-1, 1)), float(rng.uniform(0, 2))]
        coefficients += [float(rng.uniform(-1, 1)) for _ in range(degree - 1)]
        return ActivationSpec(name, {"coefficients": tuple(coefficients)})
    return ActivationSpec(name)


def _group_size(kind: str, width: int = 0) -> int:
    return {"maxmin": 2, "groupsort3": 3, "householder2": 2, "householder3": 3, "fullsort": max(width, 1)}.get(kind, 1)


def _width(rng: np.random.Generator, kind: str, lo: int = 2, hi: int = 8) -> int:
    """A hidden width for a stage kind (a multiple of its group size)."""
    if kind == "fullsort":
        return int(rng.integers(2, 6))
    g = _group_size(kind)
    return g * int(rng.integers(max(1, -(-lo // g)), hi // g + 1))


def _stage(rng: np.random.Generator, kind: str, width: int, name: str, spec: ActivationSpec | None = None):
    """An activation layer of the given kind (a slope activation name, or one of :data:`GROUP_KINDS`)."""
    if kind in ("maxmin", "groupsort3", "fullsort"):
        return GroupSortLayer(width, _group_size(kind, width), name=name)
    if kind.startswith("householder"):
        g = _group_size(kind)
        return HouseholderLayer(rng.standard_normal((width // g, g)), name=name)
    return SlopeRestricted(spec or _activation(rng, kind), width, name=name)


def _gaussian(rng: np.random.Generator, rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal((rows, cols)) * (scale / math.sqrt(cols))


def _chain(rng: np.random.Generator, kinds: list[str], n_in: int, n_out: int, bias: bool = True,
           nonneg: bool = False, scale: tuple[float, float] = (0.5, 2.0)) -> Network:
    """``A_L phi_L ... phi_1 A_0`` with one stage per kind (one parameter draw per activation name), Gaussian
    weights of random scale (log-uniform in ``scale`` per layer), random biases."""
    widths = [_width(rng, k) for k in kinds]
    dims = [n_in] + widths + [n_out]
    specs = {k: _activation(rng, k) for k in sorted(set(kinds)) if k not in GROUP_KINDS}
    layers: list = []
    for i in range(len(dims) - 1):
        w = _gaussian(rng, dims[i + 1], dims[i], _log_uniform(rng, *scale))
        b = rng.standard_normal(dims[i + 1]) * rng.uniform(0, 1) if bias else None
        layers.append(Affine(np.abs(w) if nonneg else w, b, name=f"linear_{i}"))
        if i < len(kinds):
            layers.append(_stage(rng, kinds[i], widths[i], f"{kinds[i]}_{i + 1}", specs.get(kinds[i])))
    return Network(tuple(layers), "campaign")


def _dims(rng: np.random.Generator) -> tuple[int, int, int]:
    """(inputs, outputs, hidden stages)."""
    return int(rng.integers(2, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 4))


def _kinds_of(network: Network) -> set[str]:
    """'slope', 'maxmin', 'group' (other GroupSort, Householder) for the leaves of a network's stages."""
    kinds = set()
    for stage in network.activations:
        leaf = stage.activation if isinstance(stage, (ResidualBlock, ImplicitLayer)) else stage
        if isinstance(leaf, SlopeRestricted):
            kinds.add("slope")
        elif isinstance(leaf, GroupSortLayer) and leaf.group_size == 2:
            kinds.add("maxmin")
        else:
            kinds.add("group")
    return kinds


def runs_for(network: Network, rng: np.random.Generator, solver: str = "native",
             methods: tuple[str, ...] | None = None, **options) -> tuple[Run, ...]:
    """Every method that applies to ``network`` (``mp`` always; LipSDP-Layer/Neuron for slope-restricted stages,
    and LipSDP-Channel when some of them are convolutional; NSR always, coupled too when a GroupSort/Householder
    stage is present; RR for slope and MaxMin stages).

    On a network with slope-restricted stages only, NSR and RR build the very program of LipSDP-Neuron; they are
    included in one trial of three (drawn from ``rng``), which keeps their dispatch covered at a third of the cost.
    """
    kinds = _kinds_of(network)
    opts = tuple(sorted(options.items()))
    runs = [Run("mp", "auto", tuple((k, v) for k, v in opts if k == "bounds_method"))]
    slope_only = kinds <= {"slope"}
    duplicates = rng.random() < 1 / 3
    if slope_only:
        runs += [Run("lipsdp-layer", solver, opts), Run("lipsdp-neuron", solver, opts)]
        if "lipsdp-channel" in plan_methods(network).run:
            runs.append(Run("lipsdp-channel", solver, opts))
    if duplicates or not slope_only:
        runs.append(Run("lipsdp-nsr", solver, opts))
    if not slope_only:
        runs.append(Run("lipsdp-nsr", solver, tuple(sorted(opts + (("coupled", True),)))))
    if kinds <= {"slope", "maxmin"} and (duplicates or not slope_only):
        runs.append(Run("lipsdp-rr", solver, opts))
    if methods is not None:
        runs = [r for r in runs if r.method in methods]
    return tuple(runs)


# ----------------------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------------------


def _slope(rng: np.random.Generator) -> Case:
    act = str(rng.choice(SLOPE_ACTIVATIONS))
    n_in, n_out, depth = _dims(rng)
    net = _chain(rng, [act] * depth, n_in, n_out)
    return Case(net, runs_for(net, rng), act, params={"activation": act, "dims": list(net.dims)})


def _group_network(rng: np.random.Generator, kind: str) -> Network:
    n_in, n_out, depth = _dims(rng)
    kinds = [kind] * depth
    if kind == "mixed":
        kinds = [str(rng.choice(["maxmin", "householder2", "tanh", "relu"])) for _ in range(depth)]
    return _chain(rng, kinds, n_in, n_out)


def _groupsort(rng: np.random.Generator) -> Case:
    kind = str(rng.choice(["maxmin", "maxmin", "groupsort3", "fullsort"]))
    net = _group_network(rng, kind)
    return Case(net, runs_for(net, rng), kind, params={"kind": kind, "dims": list(net.dims)})


def _householder(rng: np.random.Generator) -> Case:
    kind = str(rng.choice(["householder2", "householder2", "householder3", "mixed"]))
    net = _group_network(rng, kind)
    return Case(net, runs_for(net, rng), kind, params={"kind": kind, "dims": list(net.dims)})


def _residual_network(rng: np.random.Generator, kind: str) -> Network:
    n_in, n_out, blocks = _dims(rng)
    n = int(rng.integers(2, 7))
    layers: list = [Affine(_gaussian(rng, n, n_in), rng.standard_normal(n) * 0.3, name="linear_in")]
    spec = None if kind in GROUP_KINDS else _activation(rng, kind)
    for j in range(blocks):
        square = n % _group_size(kind) == 0 and rng.random() < 0.3
        h = n if square else _width(rng, kind)
        inner = Affine(_gaussian(rng, h, n, rng.uniform(0.2, 1.0)), rng.standard_normal(h) * 0.3, name=f"inner_{j}")
        outer = None if square else Affine(_gaussian(rng, n, h, rng.uniform(0.2, 1.0)),
                                           rng.standard_normal(n) * 0.1, name=f"outer_{j}")
        layers.append(ResidualBlock(inner, _stage(rng, kind, h, f"{kind}_{j}", spec), outer, name=f"residual_{j}"))
    layers.append(Affine(_gaussian(rng, n_out, n), rng.standard_normal(n_out) * 0.3, name="linear_out"))
    return Network.from_layers(layers, "campaign")


def _residual(rng: np.random.Generator) -> Case:
    kind = str(rng.choice(SLOPE_ACTIVATIONS + ("maxmin", "maxmin", "householder2")))
    net = _residual_network(rng, kind)
    return Case(net, runs_for(net, rng), kind, params={"kind": kind, "dims": list(net.dims)})


_IMPLICIT_KINDS = ("relu", "leaky_relu", "tanh", "sigmoid", "elu", "softplus", "gelu", "gelu_tanh", "silu", "mish",
                   "maxmin")


def _implicit(rng: np.random.Generator) -> Case:
    kind = str(rng.choice(_IMPLICIT_KINDS))
    n_in, n_out, _ = _dims(rng)
    n = _width(rng, kind, 2, 5)
    spec = None
    if kind == "leaky_relu":
        spec = ActivationSpec(kind, {"negative_slope": float(rng.uniform(-0.9, 0.9))})
    elif kind == "elu":
        spec = ActivationSpec(kind, {"alpha": float(rng.uniform(0.1, 1.0))})
    act = _stage(rng, kind, n, f"{kind}_implicit", spec)
    contraction = float(rng.uniform(0.05, 0.85))
    w = rng.standard_normal((n, n))
    w *= contraction / (max_slope(act) * np.linalg.norm(w, 2))
    m = int(rng.integers(2, 6))
    layers: list = [Affine(_gaussian(rng, m, n_in), rng.standard_normal(m) * 0.3, name="linear_in")]
    if rng.random() < 0.3:
        layers += [SlopeRestricted(_activation(rng, "tanh"), m, name="tanh_before"), Affine(_gaussian(rng, m, m))]
    layers.append(ImplicitLayer(w, _gaussian(rng, n, m), act, rng.standard_normal(n) * 0.3, name="implicit"))
    layers.append(Affine(_gaussian(rng, n_out, n), rng.standard_normal(n_out) * 0.3, name="linear_out"))
    net = Network.from_layers(layers, "campaign")
    # lipbound.lower_bound's forward-mode passes through every fixed-point step cost seconds here; the Jacobian
    # search alone finds as good pairs.
    return Case(net, runs_for(net, rng), kind, attack=False,
                params={"kind": kind, "contraction": contraction, "dims": list(net.dims)})


def _linf(rng: np.random.Generator) -> Case:
    kind = str(rng.choice(["slope", "slope", "maxmin", "householder2", "residual"]))
    if kind == "slope":
        act = str(rng.choice(SLOPE_ACTIVATIONS))
        n_in, n_out, depth = _dims(rng)
        net, variant = _chain(rng, [act] * depth, n_in, n_out), act
    elif kind == "residual":
        variant = str(rng.choice(["tanh", "relu", "maxmin"]))
        net = _residual_network(rng, variant)
        variant = f"residual-{variant}"
    else:
        net, variant = _group_network(rng, kind), kind
    index = int(rng.integers(0, net.output_dim))
    return Case(net, runs_for(net, rng), variant, norm="linf", output_index=index,
                params={"kind": variant, "output_index": index, "dims": list(net.dims)})


def _local(rng: np.random.Generator) -> Case:
    act = str(rng.choice(SLOPE_ACTIVATIONS + ("polyrelu",)))
    n_in, n_out, depth = _dims(rng)
    saturated = act != "polyrelu" and rng.random() < 0.25  # large weights: tanh/sigmoid saturate on the domain
    net = _chain(rng, [act] * depth, n_in, n_out, scale=(10.0, 1e4) if saturated else (0.5, 2.0))
    center = rng.standard_normal(n_in) * _log_uniform(rng, 0.1, 3.0)
    domain_kind = str(rng.choice(["ball-l2", "ball-linf", "box"]))
    if domain_kind == "box":
        half = np.array([_log_uniform(rng, 1e-3, 3.0) for _ in range(n_in)])
        half[rng.random(n_in) < 0.1] = 0.0
        domain = Box(center - half, center + half)
    else:
        domain = Ball(center, _log_uniform(rng, 1e-3, 3.0), norm=domain_kind.split("-")[1])
    norm = "linf" if rng.random() < 0.25 else "l2"
    index = int(rng.integers(0, n_out)) if norm == "linf" else None
    bounds_method = "ibp" if rng.random() < 0.3 else "crown"
    runs = runs_for(net, rng, methods=("mp", "lipsdp-layer", "lipsdp-neuron", "lipsdp-nsr"),
                    bounds_method=bounds_method)
    return Case(net, runs, f"{domain_kind}/{norm}" + ("/saturated" if saturated else ""), norm=norm,
                output_index=index, domain=domain,
                params={"activation": act, "domain": domain_kind, "norm": norm, "bounds_method": bounds_method,
                        "saturated": saturated, "dims": list(net.dims)})


def _loose(rng: np.random.Generator) -> Case:
    kind = str(rng.choice(["slope", "maxmin"]))
    n_in, n_out, depth = _dims(rng)
    act = str(rng.choice(SLOPE_ACTIVATIONS)) if kind == "slope" else "maxmin"
    net = _chain(rng, [act] * depth, n_in, n_out)
    main = "lipsdp-neuron" if kind == "slope" else "lipsdp-nsr"
    scs = (("eps_abs", 1e-3), ("eps_rel", 1e-3))
    runs = [Run(main, "native", (("tol", 1e-3),)), Run(main, "native", (("max_iter", 4),)), Run(main, "scs", scs)]
    if kind == "slope":
        runs += [Run("lipsdp-layer", "native", (("tol", 1e-3),)), Run("lipsdp-layer", "scs", scs)]
    else:
        runs += [Run("lipsdp-nsr", "native", (("coupled", True), ("tol", 1e-3))),
                 Run("lipsdp-nsr", "scs", (("coupled", True),) + scs), Run("lipsdp-rr", "scs", scs)]
    return Case(net, tuple(runs), act, params={"activation": act, "dims": list(net.dims)})


def _scale_exponents(rng: np.random.Generator, n_layers: int) -> tuple[str, list[float]]:
    """log10 of the per-layer weight scales, each within [-300, 300]: one common scale, independent scales, or
    scales whose product lands near float64's underflow (1e-300 .. 1e-330) or overflow (1e300 .. 1e310) range."""
    pattern = str(rng.choice(["common", "per-layer", "near-underflow", "near-overflow"]))
    if pattern == "common":
        return pattern, [float(rng.uniform(-300, 300))] * n_layers
    if pattern == "per-layer":
        return pattern, [float(rng.uniform(-300, 300)) for _ in range(n_layers)]
    total = rng.uniform(-330, -300) if pattern == "near-underflow" else rng.uniform(300, 310)
    spread = 300 - abs(total) / n_layers  # keeps every part within [-300, 300]
    noise = rng.uniform(-spread / 2, spread / 2, n_layers)
    return pattern, [float(total / n_layers + e) for e in noise - noise.mean()]


def _extreme(rng: np.random.Generator) -> Case:
    """Weights scaled by 1e-300 .. 1e300 (log-uniform).

    Positively homogeneous stages (ReLU, leaky ReLU, MaxMin, GroupSort, Householder, identity) with biases scaled
    along: the network is ``2^E g`` for a moderate network ``g`` (the scales' powers of two divided out exactly),
    searched in float64 and judged at full magnitude. Nonnegative zero-bias ReLU and linear chains: the exact
    constant ``||W_L ... W_0||``. Smooth activations with zero biases: pairs ``(0, t v)`` along the top singular
    vector of the Jacobian at 0, with ``t`` small enough that every pre-activation stays below ``2^-48``.
    """
    mode = str(rng.choice(["homogeneous", "homogeneous", "smooth", "nonneg-relu", "linear"]))
    n_in, n_out, depth = _dims(rng)
    if mode == "homogeneous":
        kind = str(rng.choice(HOMOGENEOUS_KINDS))
    elif mode == "smooth":
        kind = str(rng.choice(("tanh", "sigmoid", "elu", "softplus", "gelu", "gelu_tanh", "silu", "mish")))
    else:
        kind = "relu" if mode == "nonneg-relu" else "identity"
    base = _chain(rng, [kind] * depth, n_in, n_out, bias=mode in ("homogeneous", "linear"),
                  nonneg=mode == "nonneg-relu")
    pattern, logs = _scale_exponents(rng, len(base.affines))
    powers = [int(round(u * math.log2(10))) for u in logs]
    layers, moderate = list(base.layers), list(base.layers)
    cumulative = 0
    for i, (layer, u, k) in enumerate(zip(base.affines, logs, powers, strict=True)):
        cumulative += k
        with np.errstate(over="ignore", under="ignore"):
            w = layer.weight * 10.0 ** u
            g = np.ldexp(w, -k)  # exact unless w is subnormal; then g is only close to the moderate weight
            b = np.ldexp(layer.bias, cumulative)
            if not (np.all(np.isfinite(b)) and np.array_equal(np.ldexp(b, -cumulative), layer.bias)):
                b = np.zeros_like(b)  # a bias that over- or underflows would break the exact rescaling: drop it
            moderate[2 * i] = Affine(g, np.ldexp(b, -cumulative), name=layer.name)
        layers[2 * i] = Affine(w, b, name=layer.name)
    net, surrogate = Network(tuple(layers), "campaign"), Network(tuple(moderate), "campaign")
    case = Case(net, runs_for(net, rng), f"{mode}/{pattern}",
                params={"mode": mode, "kind": kind, "pattern": pattern, "log10_scales": logs, "dims": list(net.dims)})
    if mode in ("nonneg-relu", "linear"):
        case.exact, case.exact_kind = spectral_norm(net.weights), "||W_L ... W_0||_2"
    if mode == "smooth":
        case.pairs = _pairs_at_zero(rng, net, surrogate, powers)
    else:
        case.search_network = surrogate
    return case


def _pairs_at_zero(rng: np.random.Generator, net: Network, surrogate: Network, powers: list[int]):
    """Pairs ``(0, t v)`` for a zero-bias network: ``v`` the top right singular vector of the rescaled Jacobian at 0
    (and two random unit vectors), ``t = 2^(-56 - max_j E_j)`` with ``E_j`` the power-of-two exponent of the j-th
    pre-activation's scale, so that every pre-activation stays near ``2^-56`` (the pair's ratio is then the
    Jacobian's up to about ``2^-56`` relative; it is a lower bound whatever ``t`` is)."""
    import mpmath

    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    net.activations[0].activation.torch(z).sum().backward()
    slope0 = float(z.grad[0])
    product = surrogate.weights[0]
    for w in surrogate.weights[1:]:
        product = w @ (slope0 * product)
    directions = [np.linalg.svd(product)[2][0]]
    directions += [v / np.linalg.norm(v) for v in rng.standard_normal((2, net.input_dim))]
    exponent = -56 - int(np.cumsum(powers[:-1]).max())
    zero = [0.0] * net.input_dim
    return tuple((zero, [mpmath.ldexp(mpmath.mpf(float(x)), exponent) for x in v]) for v in directions)


def _rank_deficient(rng: np.random.Generator, w: np.ndarray) -> np.ndarray:
    rank = int(rng.integers(0, min(w.shape)))
    return _gaussian(rng, w.shape[0], rank, 1.0) @ _gaussian(rng, rank, w.shape[1], 1.0) if rank else np.zeros_like(w)


def _duplicated(rng: np.random.Generator, w: np.ndarray) -> np.ndarray:
    w = w.copy()
    for _ in range(int(rng.integers(1, 4))):
        i, j = rng.integers(0, w.shape[0], 2)
        w[j] = w[i] * float(rng.choice([1.0, -1.0, 2.0 ** int(rng.integers(-3, 4))]))
        if rng.random() < 0.3:
            a, b = rng.integers(0, w.shape[1], 2)
            w[:, b] = w[:, a]
        if rng.random() < 0.2:
            w[int(rng.integers(0, w.shape[0]))] = 0.0
    return w


def _degenerate(rng: np.random.Generator) -> Case:
    """Rank-deficient (including zero) weights, duplicated/negated/zero rows and columns, and diagonal chains
    ``diag(d_L) phi ... phi diag(d_0)`` with entries from 1e-8 to 1e8 whose exact constant is known."""
    variant = str(rng.choice(["rank-deficient", "duplicated-rows", "diagonal"]))
    if variant == "diagonal":
        return _diagonal(rng)
    kind = str(rng.choice(SLOPE_ACTIVATIONS + ("maxmin", "maxmin")))
    n_in, n_out, depth = _dims(rng)
    base = _chain(rng, [kind] * depth, n_in, n_out)
    change = _rank_deficient if variant == "rank-deficient" else _duplicated
    layers = list(base.layers)
    for i, layer in enumerate(base.affines):
        if rng.random() < 0.7:
            b = layer.bias if rng.random() < 0.7 else None
            layers[2 * i] = Affine(change(rng, layer.weight), b, name=layer.name)
    net = Network(tuple(layers), "campaign")
    return Case(net, runs_for(net, rng), f"{variant}/{kind}", params={"kind": kind, "dims": list(net.dims)})


def _diagonal(rng: np.random.Generator) -> Case:
    """``diag(d_L) relu(... relu(diag(d_0) x + b_0) ...)`` (or leaky ReLU with ``|slope| <= 1``): coordinate ``i``
    is a scalar chain with Lipschitz constant ``|prod_j d_ij|`` when the inner factors ``d_1 .. d_{L-1}`` are positive
    (they are drawn so), whatever the biases: the issue's badly conditioned ``diag(1e8, 1e-8)`` case and its kin."""
    import mpmath

    n, depth = int(rng.integers(1, 6)), int(rng.integers(1, 3))
    kind = str(rng.choice(["relu", "leaky_relu"]))
    params = {"negative_slope": float(rng.uniform(-1, 1))} if kind == "leaky_relu" else {}
    spec = ActivationSpec(kind, params)
    factors = []
    for j in range(depth + 1):
        d = 10.0 ** rng.uniform(-8, 8, n)
        if j in (0, depth):
            d *= rng.choice([-1.0, 1.0], n)
        factors.append(d)
    if rng.random() < 0.5:  # make the product close to 1, as in the example
        factors[-1] = 1.0 / np.prod(factors[:-1], axis=0)
    layers: list = []
    for j, d in enumerate(factors):
        bias = rng.standard_normal(n) * rng.uniform(0, 1) if rng.random() < 0.5 else None
        layers.append(Affine(np.diag(d), bias, name=f"diag_{j}"))
        if j < depth:
            layers.append(SlopeRestricted(spec, n, name=f"{kind}_{j + 1}"))
    net = Network(tuple(layers), "campaign")
    c = mpmath.MPContext()
    c.prec = 256
    products = [c.fprod(c.mpf(float(d[i])) for d in factors) for i in range(n)]
    exact = max(abs(p) for p in products) * (1 - c.ldexp(1, -128))
    return Case(net, runs_for(net, rng), f"diagonal/{kind}", exact=exact, exact_kind="max_i |prod_j d_ij|",
                params={"kind": kind, "log10_factors": [np.log10(np.abs(d)).tolist() for d in factors]})


def _exact(rng: np.random.Generator) -> Case:
    """Networks whose Lipschitz constant is a closed form: nonnegative zero-bias ReLU chains (``||W_L ... W_0||``,
    attained for x >= 0), linear chains (identity activation, any biases) and single affine layers; in l2 or, for a
    scalar output, in l-infinity (the row's 1-norm of the product)."""
    variant = str(rng.choice(["nonneg-relu", "linear", "single-layer"]))
    n_in, n_out, depth = _dims(rng)
    if variant == "single-layer":
        net = Network((Affine(_gaussian(rng, n_out, n_in), rng.standard_normal(n_out), name="linear_0"),), "campaign")
    else:
        kind = "relu" if variant == "nonneg-relu" else "identity"
        net = _chain(rng, [kind] * int(rng.integers(1, 5)), n_in, n_out, bias=variant == "linear",
                     nonneg=variant == "nonneg-relu")
    norm = "linf" if rng.random() < 0.3 else "l2"
    index = int(rng.integers(0, n_out)) if norm == "linf" else None
    if norm == "l2":
        exact, how = spectral_norm(net.weights), "||W_L ... W_0||_2"
    else:
        exact, how = row_l1_norm(net.weights, index), "||e_i^T W_L ... W_0||_1"
    runs = runs_for(net, rng) + (Run("lipsdp-neuron", "clarabel"),)
    return Case(net, runs, f"{variant}/{norm}", norm=norm, output_index=index, exact=exact, exact_kind=how,
                params={"variant": variant, "norm": norm, "dims": list(net.dims)})


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("slope", "chains of one slope-restricted activation (relu, leaky_relu, tanh, sigmoid, elu, softplus, "
                    "gelu, silu, mish), random parameters and biases; every method", _slope),
    Family("groupsort", "MaxMin, GroupSort (groups of 3) and FullSort chains; mp, NSR plain and coupled, RR",
           _groupsort),
    Family("householder", "Householder (groups of 2 and 3) chains, some mixed with MaxMin/tanh/ReLU; mp, NSR plain "
                          "and coupled", _householder),
    Family("residual", "x + G phi(W x + b) blocks (G = I or not) with slope, MaxMin or Householder activations",
           _residual),
    Family("implicit", "contractive equilibrium layers z = phi(W z + U x + b), s||W|| in [0.05, 0.85]", _implicit),
    Family("linf", "l-infinity bounds of one output (slope, MaxMin, Householder and residual networks)", _linf),
    Family("local", "local bounds on l2 balls, l-inf balls and boxes (CROWN or IBP slopes; PolyReLU too), l2 and "
                    "l-infinity", _local),
    Family("loose-tol", "inaccurate solver answers: native at tol=1e-3 and max_iter=4, SCS at eps 1e-3",
           _loose),
    Family("extreme-scale", "weights scaled by 1e-300 .. 1e300 (log-uniform; products near under- and overflow)",
           _extreme),
    Family("degenerate", "rank-deficient and zero weights, duplicated/negated rows and columns, diagonal chains "
                         "from 1e-8 to 1e8", _degenerate),
    Family("exact", "closed-form constants: nonnegative zero-bias ReLU chains, linear chains, single layers "
                    "(l2 and l-infinity)", _exact),
)}
