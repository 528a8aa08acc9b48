"""Networks from weight matrices and weight files (``.mat``, ``.npz``, state dicts).

Weight files hold matrices only; ``activation=`` names the activation and ``architecture=`` the layout
(``"feedforward"`` or the QC paper's ``"residual"``). Layer order comes from the keys (``W0, W1, ...``); a gap in
the numbering or inconsistent shapes is an error, never a silently shorter network.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lipbound.activations import ActivationSpec
from lipbound.errors import NetworkError
from lipbound.network import Affine, GroupSortLayer, Network, ResidualBlock, SlopeRestricted

GROUP_ACTIVATIONS = ("maxmin", "groupsort", "fullsort")


def _activation_layer(activation, width: int, name: str, activation_params: dict):
    if isinstance(activation, str) and activation in GROUP_ACTIVATIONS:
        g = {"maxmin": 2, "fullsort": width}.get(activation, activation_params.get("group_size"))
        if g is None:
            raise NetworkError("activation='groupsort' needs group_size=...")
        return GroupSortLayer(width, g, name=name)
    spec = activation if isinstance(activation, ActivationSpec) else ActivationSpec(activation, activation_params)
    return SlopeRestricted(spec, width, name=name)


def from_weights(weights: Sequence, activation: str | ActivationSpec = "relu", biases: Sequence | None = None,
                 name: str = "network", architecture: str = "feedforward", **activation_params) -> Network:
    """Build a network from weight matrices (numpy or torch).

    ``architecture="feedforward"``: ``W_L phi(... phi(W_0 x + b_0) ...) + b_L``.
    ``architecture="residual"`` (the QC paper's ``resweights`` layout): ``x_1 = W_0 x``, then
    ``x <- x + phi(W_i x)`` for the middle (square) matrices, then ``W_L x``.

    Parameters
    ----------
    weights : sequence of arrays, each (out, in)
    activation : str or ActivationSpec
        The activation (default ``"relu"``): any of :data:`lipbound.SUPPORTED_ACTIVATIONS`, or ``"maxmin"``,
        ``"groupsort"`` (with ``group_size=``), ``"fullsort"``.
    biases : sequence of arrays, optional
    architecture : {"feedforward", "residual"}
    **activation_params
        Parameters of the activation (e.g. ``negative_slope=0.1``).

    Examples
    --------
    >>> import numpy as np, lipbound
    >>> lipbound.from_weights([np.ones((3, 2)), np.ones((1, 3))]).dims
    (2, 3, 1)
    """
    weights = [w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w) for w in weights]
    if not weights:
        raise NetworkError("no weight matrices given: the network is empty.")
    for i, w in enumerate(weights):
        if w.ndim != 2:
            raise NetworkError(f"weight {i} must be 2-D (out, in), got shape {w.shape}.")
    if biases is not None and len(biases) != len(weights):
        raise NetworkError(f"got {len(biases)} biases for {len(weights)} weight matrices.")
    act_name = activation.name if isinstance(activation, ActivationSpec) else activation

    def bias(i):
        return None if biases is None else biases[i]

    if architecture == "residual":
        if len(weights) < 2:
            raise NetworkError("a residual network needs at least an input and an output matrix.")
        layers: list = [Affine(weights[0], bias(0), name="linear_0")]
        for i in range(1, len(weights) - 1):
            inner = Affine(weights[i], bias(i), name=f"residual_{i}")
            act = _activation_layer(activation, inner.out_dim, f"{act_name}_{i}", activation_params)
            layers.append(ResidualBlock(inner, act, None, name=f"residual_{i}"))
        layers.append(Affine(weights[-1], bias(len(weights) - 1), name=f"linear_{len(weights) - 1}"))
        return Network.from_layers(layers, name)
    if architecture != "feedforward":
        raise NetworkError(f"unknown architecture {architecture!r}; use 'feedforward' or 'residual'.")
    layers = []
    for i, w in enumerate(weights):
        if i > 0:
            layers.append(_activation_layer(activation, layers[-1].out_dim, f"{act_name}_{i}", activation_params))
        layers.append(Affine(w, bias(i), name=f"linear_{i}"))
    return Network(tuple(layers), name)


def _numbered(keys, prefixes: Sequence[str], what: str, path) -> list[str] | None:
    """Keys ``<prefix><i>`` for the first prefix that has any, in index order; a gap is an error."""
    for prefix in prefixes:
        found = sorted((int(k[len(prefix):]), k) for k in keys if k.startswith(prefix) and k[len(prefix):].isdigit())
        if not found:
            continue
        indices = [i for i, _ in found]
        start = indices[0]
        if start not in (0, 1) or indices != list(range(start, start + len(indices))):
            missing = sorted(set(range(start, indices[-1] + 1)) - set(indices))
            raise NetworkError(f"{path}: {what} {', '.join(k for _, k in found)} are not numbered consecutively from "
                               f"0 or 1 (missing {', '.join(prefix + str(i) for i in missing) or prefix + '0'}); "
                               "refusing to guess the layer order.")
        return [k for _, k in found]
    return None


def load_mat(path: Path, activation="relu", architecture: str = "feedforward", **activation_params) -> Network:
    """A ``.mat`` file with a cell array ``weights`` or ``W`` of (out, in) matrices and optional ``biases``/``b``."""
    import scipy.io

    try:
        data = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several unrelated types (MatReadError, ValueError, TypeError)
        raise NetworkError(f"{path}: not a readable MATLAB .mat file ({type(exc).__name__}: {exc}).") from exc
    key = next((k for k in ("weights", "W") if k in data), None)
    if key is None:
        found = [k for k in data if not k.startswith("__")]
        raise NetworkError(f"{path}: no 'weights' or 'W' cell array (found {found or 'no variables'}).")
    try:
        weights = [np.asarray(w, dtype=np.float64) for w in np.asarray(data[key], dtype=object).ravel()]
        bkey = next((k for k in ("biases", "b") if k in data), None)
        biases = None
        if bkey is not None:
            biases = [np.asarray(b, dtype=np.float64).ravel() for b in np.asarray(data[bkey], dtype=object).ravel()]
    except (TypeError, ValueError) as exc:
        raise NetworkError(f"{path}: '{key}' is not a cell array of numeric matrices ({exc}).") from exc
    return from_weights(weights, activation, biases, name=path.stem, architecture=architecture, **activation_params)


def load_npz(path: Path, activation="relu", architecture: str = "feedforward", **activation_params) -> Network:
    """A ``.npz`` file with arrays ``W0, W1, ...`` (or ``weights_0, ...``, ``w0, ...``) and optional ``b0, b1, ...``."""
    try:
        data = np.load(path, allow_pickle=False)
        files = list(data.files)
    except Exception as exc:  # numpy raises ValueError/BadZipFile/OSError for corrupt files
        raise NetworkError(f"{path}: not a readable numpy .npz archive ({type(exc).__name__}: {exc}).") from exc
    wkeys = _numbered(files, ("W", "weights_", "w"), "weight arrays", path)
    if wkeys is None:
        raise NetworkError(f"{path}: expected arrays W0, W1, ... (found {files}).")
    bkeys = _numbered(files, ("b", "biases_"), "bias arrays", path)
    if bkeys is not None and len(bkeys) != len(wkeys):
        raise NetworkError(f"{path}: {len(bkeys)} bias arrays for {len(wkeys)} weight arrays.")
    try:
        weights = [data[k] for k in wkeys]
        biases = None if bkeys is None else [data[k] for k in bkeys]
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise NetworkError(f"{path}: {exc} (object arrays are refused: they would need unpickling).") from exc
    return from_weights(weights, activation, biases, name=path.stem, architecture=architecture, **activation_params)


_LINEAR_KEY = re.compile(r"^(?P<layer>.+)\.weight$")


def from_state_dict(state: dict, activation="relu", name: str = "network", source: str = "state dict",
                    **activation_params) -> Network:
    """A network from a state dict of consecutive ``Linear`` layers (``<layer>.weight`` (out, in) and optional
    ``<layer>.bias``), in the dict's order; shapes must chain.

    Anything else (convolution kernels, BatchNorm statistics, other parameters) is an error naming the keys and
    saying which path to take instead: build the module, ``load_state_dict``, then :func:`lipbound.from_torch`.

    Examples
    --------
    >>> import torch, lipbound
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> from_state_dict(model.state_dict(), activation="relu").dims
    (3, 4, 2)
    """
    tensors = {k: v for k, v in state.items()}
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise NetworkError(f"{source}: entries {bad[:5]} are not tensors; expected a state dict of Linear layers.")
    layers, used = [], set()
    for key, value in tensors.items():
        match = _LINEAR_KEY.match(key)
        if match is None or value.dim() != 2:
            continue
        layer = match.group("layer")
        bias = tensors.get(f"{layer}.bias")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != value.shape[0]):
            raise NetworkError(f"{source}: '{layer}.bias' has shape {tuple(bias.shape)} for a weight of shape "
                               f"{tuple(value.shape)}.")
        layers.append((layer, value, bias))
        used.update({key, f"{layer}.bias"})
    other = [k for k in tensors if k not in used]
    if other or not layers:
        shown = ", ".join(f"{k} {tuple(tensors[k].shape)}" for k in (other or list(tensors))[:6])
        raise NetworkError(f"{source}: not a state dict of consecutive Linear layers (unexpected entries: {shown}"
                           f"{', ...' if len(other) > 6 else ''}). A state dict holds no architecture: build the "
                           "module class it belongs to, call model.load_state_dict(...), and certify the module with "
                           "lipbound.from_torch(model, input_shape=...) (or lipbound.certify(model, input_shape=...)).")
    for (prev, w0, _), (layer, w1, _) in zip(layers, layers[1:], strict=False):
        if w1.shape[1] != w0.shape[0]:
            raise NetworkError(f"{source}: '{layer}.weight' takes {w1.shape[1]} inputs but '{prev}.weight' outputs "
                               f"{w0.shape[0]}: the Linear layers do not chain in the state dict's order.")
    weights = [w.detach().to(torch.float64) for _, w, _ in layers]
    biases = [None if b is None else b.detach().to(torch.float64) for _, _, b in layers]
    if all(b is None for b in biases):
        biases = None
    else:
        biases = [np.zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases, strict=True)]
    return from_weights(weights, activation, biases, name=name, **activation_params)
