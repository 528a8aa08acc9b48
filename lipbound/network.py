"""The network intermediate representation (IR).

A :class:`Network` is an immutable, typed description of a feedforward network made of
:class:`Affine` maps and activation layers. Importers (torch, weight files) only produce it;
formulations, bound analysis and lower bounds only read it.

Each activation layer declares the quadratic-constraint family that describes it (``qc``):
``"slope"`` for element-wise slope-restricted activations with per-neuron slope bounds
``[alpha_i, beta_i]``. New families (GroupSort, Householder), residual and implicit blocks are new
layer classes; formulations dispatch on the layer type and reject what they cannot handle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lipbound.activations import ActivationSpec
from lipbound.errors import NetworkError


def _frozen_float64(array, what: str, allow_inf: bool = False) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    out = np.array(array, dtype=np.float64, copy=True)
    if not np.all(~np.isnan(out) if allow_inf else np.isfinite(out)):
        bad = np.argwhere(~np.isfinite(out))[0]
        raise NetworkError(f"{what} contains NaN or inf (first at index {tuple(int(i) for i in bad)}).")
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class Affine:
    """An affine map ``x -> W x + b``.

    Parameters
    ----------
    weight : array, shape (out, in)
    bias : array, shape (out,), optional (zeros when omitted)
    name : str
        Name of the originating layer, used in error messages.
    """

    weight: np.ndarray
    bias: np.ndarray | None = None
    name: str = "affine"

    def __post_init__(self):
        weight = _frozen_float64(self.weight, f"weight of layer '{self.name}'")
        if weight.ndim != 2 or weight.size == 0:
            raise NetworkError(f"weight of layer '{self.name}' must be a non-empty 2-D matrix (out, in), "
                               f"got shape {weight.shape}.")
        bias = np.zeros(weight.shape[0]) if self.bias is None else self.bias
        bias = _frozen_float64(bias, f"bias of layer '{self.name}'").reshape(-1)
        if bias.shape != (weight.shape[0],):
            raise NetworkError(f"bias of layer '{self.name}' has shape {bias.shape}, expected "
                               f"({weight.shape[0]},) to match the weight's {weight.shape}.")
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    @property
    def in_dim(self) -> int:
        return self.weight.shape[1]

    def torch_parameters(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias as torch tensors (cached per dtype/device; the arrays are immutable)."""
        cache = self.__dict__.setdefault("_torch_cache", {})
        key = (dtype, str(device))
        if key not in cache:
            cache[key] = (torch.tensor(self.weight, dtype=dtype, device=device),
                          torch.tensor(self.bias, dtype=dtype, device=device))
        return cache[key]

    @property
    def out_dim(self) -> int:
        return self.weight.shape[0]


class _WidthPreserving:
    """Mixin for activation layers that map ``width`` inputs to ``width`` outputs."""

    @property
    def in_dim(self) -> int:
        return self.width

    @property
    def out_dim(self) -> int:
        return self.width


@dataclass(frozen=True, eq=False)
class SlopeRestricted(_WidthPreserving):
    """An element-wise activation whose difference quotients lie in ``[alpha_i, beta_i]`` per neuron.

    Parameters
    ----------
    activation : ActivationSpec
        Which function (for forward evaluation and lower bounds).
    width : int
        Number of neurons.
    alpha, beta : arrays of shape (width,), optional
        Per-neuron slope bounds; default to the activation's global slope range. Local analysis
        narrows them with :meth:`with_slopes`.
    name : str
    """

    activation: ActivationSpec
    width: int
    alpha: np.ndarray | None = None
    beta: np.ndarray | None = None
    name: str = "activation"
    qc: str = field(default="slope", init=False)

    def __post_init__(self):
        if int(self.width) <= 0:
            raise NetworkError(f"activation '{self.name}' must have a positive width, got {self.width}.")
        object.__setattr__(self, "width", int(self.width))
        if self.alpha is None or self.beta is None:
            try:
                lo, hi = self.activation.slope_range()
            except NetworkError:
                # Only locally slope-bounded (e.g. PolyReLU of degree >= 2): infinite until a domain narrows it.
                lo, hi = -np.inf, np.inf
        alpha = np.full(self.width, lo) if self.alpha is None else self.alpha
        beta = np.full(self.width, hi) if self.beta is None else self.beta
        alpha = _frozen_float64(alpha, f"alpha of activation '{self.name}'", allow_inf=True).reshape(-1)
        beta = _frozen_float64(beta, f"beta of activation '{self.name}'", allow_inf=True).reshape(-1)
        for arr, what in ((alpha, "alpha"), (beta, "beta")):
            if arr.shape != (self.width,):
                raise NetworkError(f"{what} of activation '{self.name}' has shape {arr.shape}, "
                                   f"expected ({self.width},).")
        if np.any(alpha > beta):
            i = int(np.argmax(alpha > beta))
            raise NetworkError(f"activation '{self.name}': alpha > beta at neuron {i} "
                               f"({alpha[i]} > {beta[i]}).")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "beta", beta)

    def with_slopes(self, alpha, beta) -> SlopeRestricted:
        """Return a copy with other per-neuron slope bounds (e.g. from activation-bound analysis)."""
        return SlopeRestricted(self.activation, self.width, alpha, beta, self.name)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.activation.torch(z)


def _unit_vectors(vectors, what: str) -> np.ndarray:
    v = _frozen_float64(vectors, what)
    if v.ndim != 2 or v.size == 0:
        raise NetworkError(f"{what} must be a non-empty (num_groups, group_size) array, got shape {v.shape}.")
    norms = np.linalg.norm(v, axis=1)
    if np.any(norms == 0):
        raise NetworkError(f"{what}: zero vector for group(s) {np.flatnonzero(norms == 0).tolist()}.")
    out = v / norms[:, None]
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class GroupSortLayer(_WidthPreserving):
    """GroupSort on consecutive groups of ``group_size`` neurons, ascending (MaxMin: ``group_size=2``).

    Not slope-restricted; described by the quadratic constraint of Pauli et al. (ICLR 2024), family
    ``qc = "groupsort"``: 1-Lipschitz and sum preserving per group.
    """

    width: int
    group_size: int
    name: str = "groupsort"
    qc: str = field(default="groupsort", init=False)

    def __post_init__(self):
        width, g = int(self.width), int(self.group_size)
        if width <= 0 or g <= 0 or width % g:
            raise NetworkError(f"GroupSort layer '{self.name}': width {width} is not a positive multiple of the "
                               f"group size {g}.")
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "group_size", g)

    @property
    def n_groups(self) -> int:
        return self.width // self.group_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shape = z.shape
        return torch.sort(z.reshape(*shape[:-1], self.n_groups, self.group_size), dim=-1).values.reshape(shape)


@dataclass(frozen=True, eq=False)
class HouseholderLayer(_WidthPreserving):
    """Householder activation per consecutive group: ``z`` if ``v^T z > 0`` else ``(I - 2 v v^T) z``.

    ``vectors`` (num_groups, group_size) are normalised here; the layer is the exact-arithmetic map with
    the unit vectors ``v / ||v||``. Family ``qc = "householder"``: 1-Lipschitz and preserves
    ``(I - v v^T) z``.
    """

    vectors: np.ndarray
    name: str = "householder"
    qc: str = field(default="householder", init=False)

    def __post_init__(self):
        object.__setattr__(self, "vectors", _unit_vectors(self.vectors, f"Householder layer '{self.name}' vectors"))

    @property
    def group_size(self) -> int:
        return self.vectors.shape[1]

    @property
    def n_groups(self) -> int:
        return self.vectors.shape[0]

    @property
    def width(self) -> int:
        return self.vectors.size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shape = z.shape
        g = z.reshape(*shape[:-1], self.n_groups, self.group_size)
        v = torch.as_tensor(np.array(self.vectors), dtype=z.dtype, device=z.device)
        proj = (g * v).sum(-1, keepdim=True)
        reflected = g - 2 * proj * v
        return torch.where(proj > 0, g, reflected).reshape(shape)


Activation = SlopeRestricted | GroupSortLayer | HouseholderLayer


@dataclass(frozen=True, eq=False)
class ResidualBlock:
    """A residual block ``x -> x + G phi(W x + b) (+ c)``.

    ``inner`` = Affine(W, b), ``activation``, ``outer`` = Affine(G, c) or ``None`` (G = I).

    Family ``qc = "residual"``; the formulations keep the whole block (and the affine maps around it)
    inside one LMI.
    """

    inner: Affine
    activation: Activation
    outer: Affine | None = None
    name: str = "residual"
    qc: str = field(default="residual", init=False)

    def __post_init__(self):
        n = self.inner.in_dim
        if self.activation.width != self.inner.out_dim:
            raise NetworkError(f"residual block '{self.name}': activation width {self.activation.width} != inner "
                               f"output {self.inner.out_dim}.")
        out = self.outer
        if out is None and self.inner.out_dim != n:
            raise NetworkError(f"residual block '{self.name}': without an outer map the inner map must be square, "
                               f"got {self.inner.weight.shape}.")
        if out is not None and (out.in_dim != self.inner.out_dim or out.out_dim != n):
            raise NetworkError(f"residual block '{self.name}': outer map shape {out.weight.shape} does not map "
                               f"{self.inner.out_dim} -> {n}.")

    @property
    def in_dim(self) -> int:
        return self.inner.in_dim

    @property
    def out_dim(self) -> int:
        return self.inner.in_dim

    @property
    def width(self) -> int:
        return self.inner.in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.inner.torch_parameters(x.dtype, x.device)
        h = self.activation.forward(x @ w.T + b)
        if self.outer is not None:
            g, c = self.outer.torch_parameters(x.dtype, x.device)
            h = h @ g.T + c
        return x + h


@dataclass(frozen=True, eq=False)
class ImplicitLayer:
    """An equilibrium (implicit) layer: ``z = phi(W z + U x + b)``; the layer outputs ``z``.

    Well-posedness (a unique fixed point for every ``x``) is an assumption of the Lipschitz certificate; it
    is *guaranteed* when ``s ||W||_2 < 1`` (``s`` the largest |slope|; then the map is a contraction), which
    :meth:`contraction_factor` reports. ``forward`` iterates the fixed point and raises if it does not
    converge. Family ``qc = "implicit"``.
    """

    weight: np.ndarray
    input_weight: np.ndarray
    activation: Activation
    bias: np.ndarray | None = None
    name: str = "implicit"
    qc: str = field(default="implicit", init=False)

    def __post_init__(self):
        w = _frozen_float64(self.weight, f"W of implicit layer '{self.name}'")
        u = _frozen_float64(self.input_weight, f"U of implicit layer '{self.name}'")
        if w.ndim != 2 or w.shape[0] != w.shape[1] or u.ndim != 2 or u.shape[0] != w.shape[0]:
            raise NetworkError(f"implicit layer '{self.name}': W must be square (n, n) and U (n, n_in); got "
                               f"{w.shape} and {u.shape}.")
        if self.activation.width != w.shape[0]:
            raise NetworkError(f"implicit layer '{self.name}': activation width {self.activation.width} != "
                               f"{w.shape[0]}.")
        b = np.zeros(w.shape[0]) if self.bias is None else self.bias
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "input_weight", u)
        object.__setattr__(self, "bias", _frozen_float64(b, f"bias of implicit layer '{self.name}'").reshape(-1))

    @property
    def in_dim(self) -> int:
        return self.input_weight.shape[1]

    @property
    def out_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    def contraction_factor(self) -> float:
        """``s ||W||_2`` (floating point); < 1 guarantees well-posedness."""
        return max_slope(self.activation) * float(np.linalg.norm(self.weight, 2))

    def forward(self, x: torch.Tensor, tol: float = 1e-12, max_iter: int = 10_000) -> torch.Tensor:
        w = torch.as_tensor(np.array(self.weight), dtype=x.dtype, device=x.device)
        u = torch.as_tensor(np.array(self.input_weight), dtype=x.dtype, device=x.device)
        b = torch.as_tensor(np.array(self.bias), dtype=x.dtype, device=x.device)
        drive = x @ u.T + b
        z = torch.zeros(*x.shape[:-1], self.width, dtype=x.dtype, device=x.device)
        for _ in range(max_iter):
            z_new = self.activation.forward(z @ w.T + drive)
            if torch.max(torch.abs(z_new - z)) <= tol * (1 + torch.max(torch.abs(z_new))):
                return z_new
            z = z_new
        raise NetworkError(f"implicit layer '{self.name}': fixed-point iteration did not converge in {max_iter} "
                           f"steps (contraction factor s||W|| = {self.contraction_factor():.3g}).")


def max_slope(layer) -> float:
    """Largest |difference quotient| of an activation layer (1 for GroupSort/Householder).

    Raises
    ------
    NetworkError
        For an activation that is only locally slope-bounded and has no finite slope range yet.
    """
    if isinstance(layer, SlopeRestricted):
        s = float(np.max(np.maximum(np.abs(layer.alpha), np.abs(layer.beta))))
        if not np.isfinite(s):
            raise NetworkError(f"activation '{layer.name}' ({layer.activation.describe()}) has no global slope bound; "
                               "certify it on a region (domain=Box(...) or Ball(...)).")
        return s
    return 1.0


Stage = Activation | ResidualBlock | ImplicitLayer
Layer = Affine | Stage


@dataclass(frozen=True, eq=False)
class Network:
    """A feedforward network ``f = A_L o phi_L o ... o phi_1 o A_0``.

    ``layers`` alternates :class:`Affine` and activation layers, starting and ending with an
    :class:`Affine`. Use :meth:`from_layers` to build one from any sequence (it inserts exact
    identity maps where two affine maps or two activations are adjacent).

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> net = lipbound.from_weights([np.eye(2), np.ones((1, 2))], activation="relu")
    >>> net.dims
    (2, 2, 1)
    """

    layers: tuple[Layer, ...]
    name: str = "network"

    def __post_init__(self):
        layers = tuple(self.layers)
        if not layers:
            raise NetworkError("the network is empty: it needs at least one affine layer.")
        for i, layer in enumerate(layers):
            expected = Affine if i % 2 == 0 else _STAGES
            if not isinstance(layer, expected):
                raise NetworkError(
                    f"layer {i} ('{getattr(layer, 'name', layer)}') is a {type(layer).__name__}; "
                    f"expected {'Affine' if i % 2 == 0 else 'an activation or block'} (layers alternate "
                    "Affine/stage; use "
                    "Network.from_layers to insert identity maps).")
        if not isinstance(layers[-1], Affine):
            raise NetworkError("the last layer must be affine (append an identity Affine).")
        width = layers[0].in_dim
        for i, layer in enumerate(layers):
            if isinstance(layer, Affine):
                if layer.in_dim != width:
                    raise NetworkError(f"shape mismatch at layer {i} ('{layer.name}'): it takes {layer.in_dim} "
                                       f"inputs but receives {width}.")
                width = layer.out_dim
            else:
                if layer.in_dim != width:
                    raise NetworkError(f"shape mismatch at layer {i} ('{layer.name}'): it takes {layer.in_dim} "
                                       f"inputs, but the previous layer outputs {width}.")
                width = layer.out_dim
        object.__setattr__(self, "layers", layers)

    @classmethod
    def from_layers(cls, layers: Sequence[Layer], name: str = "network") -> Network:
        """Build a network, inserting exact identity maps between adjacent layers of the same kind."""
        from lipbound.activations import ActivationSpec

        layers = list(layers)
        if not layers:
            raise NetworkError("the network is empty: it needs at least one affine layer.")
        out: list[Layer] = []
        for layer in layers:
            if isinstance(layer, Affine):
                if out and isinstance(out[-1], Affine):
                    out.append(SlopeRestricted(ActivationSpec("identity"), out[-1].out_dim,
                                               name=f"identity_before_{layer.name}"))
            elif not out or not isinstance(out[-1], Affine):
                width = layer.in_dim if not out else out[-1].out_dim
                out.append(Affine(np.eye(width), name=f"identity_before_{layer.name}"))
            out.append(layer)
        if not isinstance(out[-1], Affine):
            out.append(Affine(np.eye(out[-1].out_dim), name="identity_output"))
        return cls(tuple(out), name)

    @property
    def affines(self) -> tuple[Affine, ...]:
        return self.layers[0::2]

    @property
    def activations(self) -> tuple[Stage, ...]:
        """The nonlinear stages (activation layers, residual blocks, implicit layers), in order."""
        return self.layers[1::2]

    @property
    def weights(self) -> list[np.ndarray]:
        return [a.weight for a in self.affines]

    @property
    def input_dim(self) -> int:
        return self.layers[0].in_dim

    @property
    def output_dim(self) -> int:
        return self.layers[-1].out_dim

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.input_dim,) + tuple(a.out_dim for a in self.affines)

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        """Number of activation neurons of each stage."""
        return tuple(a.activation.width if isinstance(a, (ResidualBlock, ImplicitLayer)) else a.width
                     for a in self.activations)

    @property
    def n_hidden(self) -> int:
        return int(sum(self.hidden_widths))

    def with_slopes(self, slopes: Sequence[tuple[np.ndarray, np.ndarray]]) -> Network:
        """Return a copy whose (slope-restricted) activation layers use the given per-neuron ``(alpha, beta)``."""
        acts = self.activations
        if not all(isinstance(a, SlopeRestricted) for a in acts):
            raise NetworkError("with_slopes needs a network whose stages are all slope-restricted activations.")
        if len(slopes) != len(acts):
            raise NetworkError(f"got {len(slopes)} slope pairs for {len(acts)} activation layers.")
        layers = list(self.layers)
        for j, (alpha, beta) in enumerate(slopes):
            layers[2 * j + 1] = acts[j].with_slopes(alpha, beta)
        return Network(tuple(layers), self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate the network on a batch ``x`` of shape (batch, input_dim) in the dtype/device of ``x``."""
        for layer in self.layers:
            if isinstance(layer, Affine):
                w, b = layer.torch_parameters(x.dtype, x.device)
                x = x @ w.T + b
            else:
                x = layer.forward(x)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def summary(self) -> str:
        acts = sorted({_stage_label(a) for a in self.activations})
        return f"{self.name}: dims {'-'.join(map(str, self.dims))}, activations {', '.join(acts) or 'none'}"


_STAGES = (SlopeRestricted, GroupSortLayer, HouseholderLayer, ResidualBlock, ImplicitLayer)


def _stage_label(stage) -> str:
    if isinstance(stage, SlopeRestricted):
        return stage.activation.name
    if isinstance(stage, GroupSortLayer):
        return "maxmin" if stage.group_size == 2 else f"groupsort{stage.group_size}"
    if isinstance(stage, HouseholderLayer):
        return "householder"
    return f"{stage.qc}({_stage_label(stage.activation)})"
