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


def _frozen_float64(array, what: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    out = np.array(array, dtype=np.float64, copy=True)
    if not np.all(np.isfinite(out)):
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


@dataclass(frozen=True, eq=False)
class SlopeRestricted:
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
            lo, hi = self.activation.slope_range()
        alpha = np.full(self.width, lo) if self.alpha is None else self.alpha
        beta = np.full(self.width, hi) if self.beta is None else self.beta
        alpha = _frozen_float64(alpha, f"alpha of activation '{self.name}'").reshape(-1)
        beta = _frozen_float64(beta, f"beta of activation '{self.name}'").reshape(-1)
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


Layer = Affine | SlopeRestricted


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
            expected = Affine if i % 2 == 0 else SlopeRestricted
            if not isinstance(layer, expected):
                raise NetworkError(
                    f"layer {i} ('{getattr(layer, 'name', layer)}') is a {type(layer).__name__}; "
                    f"expected {expected.__name__} (layers alternate Affine/activation; use "
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
            elif layer.width != width:
                raise NetworkError(f"shape mismatch at layer {i} ('{layer.name}'): width {layer.width}, "
                                   f"but the previous layer outputs {width}.")
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
                out.append(Affine(np.eye(layer.width), name=f"identity_before_{layer.name}"))
            out.append(layer)
        if not isinstance(out[-1], Affine):
            out.append(Affine(np.eye(out[-1].width), name="identity_output"))
        return cls(tuple(out), name)

    @property
    def affines(self) -> tuple[Affine, ...]:
        return self.layers[0::2]

    @property
    def activations(self) -> tuple[SlopeRestricted, ...]:
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
        return tuple(a.width for a in self.activations)

    @property
    def n_hidden(self) -> int:
        return int(sum(self.hidden_widths))

    def with_slopes(self, slopes: Sequence[tuple[np.ndarray, np.ndarray]]) -> Network:
        """Return a copy whose activation layers use the given per-neuron ``(alpha, beta)`` bounds."""
        acts = self.activations
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
        acts = sorted({a.activation.name for a in self.activations})
        return f"{self.name}: dims {'-'.join(map(str, self.dims))}, activations {', '.join(acts) or 'none'}"
