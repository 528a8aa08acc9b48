"""Importers: torch modules (via torch.fx), weight lists and weight files -> :class:`Network`.

Nothing is skipped silently: a module lipbound cannot represent is reported by name and type, all
of them in one :class:`~lipbound.errors.UnsupportedLayerError`. Layers that are the identity at
inference (``Identity``, ``Dropout`` in eval mode, ``Flatten`` of a flat input) are dropped *by
design* and listed in the network's import log (``logging.getLogger("lipbound")``, INFO).
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.fx
from torch import nn

from lipbound.activations import ActivationSpec
from lipbound.errors import NetworkError, UnsupportedLayerError
from lipbound.network import (
    Affine,
    GroupSortLayer,
    HouseholderLayer,
    Network,
    ResidualBlock,
    SlopeRestricted,
)

GROUP_ACTIVATIONS = ("maxmin", "groupsort", "fullsort")

log = logging.getLogger("lipbound")


def _activation_of_module(module: nn.Module) -> ActivationSpec | None:
    if isinstance(module, nn.ReLU):
        return ActivationSpec("relu")
    if isinstance(module, nn.LeakyReLU):
        return ActivationSpec("leaky_relu", {"negative_slope": float(module.negative_slope)})
    if isinstance(module, nn.Tanh):
        return ActivationSpec("tanh")
    if isinstance(module, nn.Sigmoid):
        return ActivationSpec("sigmoid")
    if isinstance(module, nn.ELU):
        return ActivationSpec("elu", {"alpha": float(module.alpha)})
    if isinstance(module, nn.Softplus):
        if not math.isinf(module.threshold) and module.threshold < 50:
            # torch's softplus switches to the identity above threshold/beta; that switch is a jump of
            # at most log(1+e^-t)/beta, which breaks slope restriction for small thresholds.
            raise UnsupportedLayerError([(type(module).__name__, f"Softplus(threshold={module.threshold})")],
                                        "use threshold >= 50 (torch's default is 20; the linearisation error "
                                        "there is below 2e-9 but nonzero).")
        return ActivationSpec("softplus", {"beta": float(module.beta)})
    from lipbound.nn import PolyReLU

    if isinstance(module, PolyReLU):
        return ActivationSpec("polyrelu", {"coefficients": tuple(float(a) for a in module.coefficients())})
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return ActivationSpec("gelu")
    if isinstance(module, nn.SiLU):
        return ActivationSpec("silu")
    if isinstance(module, nn.Mish):
        return ActivationSpec("mish")
    return None


_FUNCTION_ACTIVATIONS = {
    torch.relu: "relu", torch.nn.functional.relu: "relu", torch.tanh: "tanh", torch.sigmoid: "sigmoid",
    torch.nn.functional.silu: "silu", torch.nn.functional.mish: "mish",
}

_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.AlphaDropout)


class _LipschitzTracer(torch.fx.Tracer):
    """Keeps lipbound's (and deel-torchlip's) activation modules as leaves: their forward branches on shapes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from lipbound.nn import GroupSort, Householder, PolyNorm, PolyReLU

        if isinstance(m, (GroupSort, Householder, PolyReLU, PolyNorm)):
            return True
        if type(m).__module__.startswith("deel.torchlip"):
            return True
        return super().is_leaf_module(m, qualname)


def _group_layer(module: nn.Module, width: int, name: str):
    """GroupSort / Householder modules (lipbound.nn; deel-torchlip's when installed) -> IR layers (or None)."""
    from lipbound.nn import GroupSort, Householder

    if isinstance(module, GroupSort):
        return [GroupSortLayer(width, module.group_size or width, name=name)]
    if isinstance(module, Householder):
        return [HouseholderLayer(module.group_vectors(width), name=name)]
    kind = type(module).__name__
    if type(module).__module__.startswith("deel.torchlip"):
        if kind == "MaxMin":  # deel-torchlip's MaxMin is CReLU: cat(relu(x), relu(-x)) = ReLU o [I; -I]
            eye = np.eye(width)
            return [Affine(np.vstack([eye, -eye]), name=f"{name}_crelu_split"),
                    SlopeRestricted(ActivationSpec("relu"), 2 * width, name=name)]
        if kind in ("GroupSort", "GroupSort2", "FullSort"):
            g = getattr(module, "group_size", None) or (2 if kind == "GroupSort2" else width)
            return [GroupSortLayer(width, g, name=name)]
        if kind == "HouseHolder":
            # Pairs channel i with i + C/2; reflects (x, y) when x sin(t/2) - y cos(t/2) > 0 by
            # [[cos t, sin t], [sin t, -cos t]] = I - 2 u u^T, u = (sin(t/2), -cos(t/2)). With v = -u this is our
            # Householder (identity iff v^T z > 0; both branches agree on v^T z = 0) on interleaved pairs.
            theta = module.theta.detach().cpu().double().numpy().reshape(-1)
            half = width // 2
            perm = np.zeros((width, width))
            perm[2 * np.arange(half), np.arange(half)] = 1.0
            perm[2 * np.arange(half) + 1, half + np.arange(half)] = 1.0
            vectors = np.stack([-np.sin(theta / 2), np.cos(theta / 2)], axis=1)
            return [Affine(perm, name=f"{name}_interleave"), HouseholderLayer(vectors, name=name),
                    Affine(perm.T, name=f"{name}_deinterleave")]
    return None


def from_torch(module: nn.Module, input_shape: Sequence[int] | int | None = None, name: str | None = None) -> Network:
    """Import an ``nn.Module`` (evaluated in eval mode) as a :class:`Network`.

    Supported: ``Linear``, ``ReLU``, ``LeakyReLU``, ``Tanh``, ``Sigmoid``, ``ELU``, ``Softplus``,
    ``GELU``, ``SiLU``, ``Mish``, ``Flatten``, ``Identity``, ``Dropout`` (eval), ``lipbound.nn``'s
    ``GroupSort``/``MaxMin``/``Householder``/``PolyReLU`` (and deel-torchlip's GroupSort/MaxMin when installed),
    in any chain traced by
    ``torch.fx`` (``nn.Sequential`` or a ``forward`` that calls them in sequence; ``torch.relu``
    style functional calls work too).

    Parameters
    ----------
    module : nn.Module
    input_shape : int or tuple of int, optional
        Shape of one input (without batch). Checked against the first layer; inputs with several
        dimensions are flattened (a leading ``Flatten`` is then required in the model).
    name : str, optional

    Raises
    ------
    UnsupportedLayerError
        Listing every node that cannot be represented.

    Examples
    --------
    >>> import torch.nn as nn, lipbound
    >>> net = lipbound.from_torch(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), input_shape=3)
    >>> net.dims
    (3, 4, 2)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch expects an nn.Module, got {type(module).__name__}.")
    was_training = module.training
    module.eval()
    try:
        graph = _LipschitzTracer().trace(module)
    except Exception as exc:
        raise UnsupportedLayerError([(type(module).__name__, "untraceable forward")],
                                    f"torch.fx could not trace the model: {exc}") from exc
    finally:
        module.train(was_training)
    modules = dict(module.named_modules())
    layers: list = []
    unsupported: list[tuple[str, str]] = []
    dropped: list[str] = []
    current = None
    width: int | None = None if input_shape is None else int(np.prod(input_shape))

    def activation(spec: ActivationSpec, node_name: str):
        nonlocal width
        if width is None:
            unsupported.append((node_name, f"{spec.name} before any Linear layer (input width unknown)"))
            return
        layers.append(SlopeRestricted(spec, width, name=node_name))

    for node in graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                unsupported.append((node.name, "second input"))
            current = node
            continue
        if node.op == "output":
            continue
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if len(args) != 1 or args[0] is not current:
            unsupported.append((node.name, f"{node.op} {node.target} (not a single chain)"))
            current = node
            continue
        current = node
        if node.op == "call_module":
            sub = modules[node.target]
            if isinstance(sub, nn.Linear):
                bias = sub.bias.detach() if sub.bias is not None else None
                layers.append(Affine(sub.weight.detach(), bias, name=node.target))
                width = sub.out_features
            elif isinstance(sub, _PASSTHROUGH):
                dropped.append(f"{node.target} ({type(sub).__name__})")
            elif (group := _group_layer(sub, width or 0, node.target)) is not None or _is_group_module(sub):
                if width is None or group is None:
                    unsupported.append((node.target, f"{type(sub).__name__} before any Linear layer"))
                else:
                    layers.extend(group)
                    width = group[-1].out_dim
            elif isinstance(sub, nn.Flatten):
                if layers:
                    unsupported.append((node.target, "Flatten after the first layer"))
                else:
                    dropped.append(f"{node.target} (Flatten of the input)")
            else:
                spec = _activation_of_module(sub)
                if spec is None:
                    unsupported.append((node.target, type(sub).__name__))
                else:
                    activation(spec, node.target)
        elif node.op == "call_function" and node.target in _FUNCTION_ACTIVATIONS and not node.kwargs:
            activation(ActivationSpec(_FUNCTION_ACTIVATIONS[node.target]), node.name)
        elif node.op == "call_function" and node.target is torch.flatten and not layers:
            dropped.append(f"{node.name} (torch.flatten of the input)")
        elif node.op == "call_method" and node.target in ("relu", "tanh", "sigmoid") and not node.kwargs:
            activation(ActivationSpec(node.target), node.name)
        else:
            target = getattr(node.target, "__name__", str(node.target))
            if node.target in (operator.getitem,):
                target = "getitem"
            unsupported.append((node.name, f"{node.op} {target}"))
    if unsupported:
        raise UnsupportedLayerError(unsupported, "Supported: Linear, ReLU, LeakyReLU, Tanh, Sigmoid, ELU, Softplus, "
                                    "GELU, SiLU, Mish, Flatten (input only), Identity, Dropout.")
    if not any(isinstance(layer, Affine) for layer in layers):
        raise NetworkError(f"{type(module).__name__} has no Linear layer: nothing to bound.")
    if dropped:
        log.info("import: identity layers dropped: %s", ", ".join(dropped))
    network = Network.from_layers(layers, name or type(module).__name__)
    if input_shape is not None:
        shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
        if int(np.prod(shape)) != network.input_dim:
            raise NetworkError(f"input_shape {shape} has {int(np.prod(shape))} entries but the first Linear layer "
                               f"('{network.affines[0].name}') expects {network.input_dim}.")
        if len(shape) > 1 and not any("Flatten" in d or "flatten" in d for d in dropped):
            raise NetworkError(f"input_shape {shape} is not flat and the model has no leading Flatten.")
    return network


def _is_group_module(module: nn.Module) -> bool:
    from lipbound.nn import GroupSort, Householder

    return isinstance(module, (GroupSort, Householder))


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


def load(path: str | Path, activation: str = "relu", architecture: str = "feedforward", **activation_params) -> Network:
    """Load a network from a file.

    * ``.mat``: a cell array named ``weights`` or ``W`` of (out, in) matrices (LipSDP and QCs layout), optional
      ``biases``/``b`` cell;
    * ``.npz``: arrays ``W0, W1, ...`` (or ``weights_0, ...``) and optional ``b0, b1, ...``;
    * ``.pt``/``.pth``: a whole saved ``nn.Module`` (``torch.save(model)``), imported with :func:`from_torch`.

    ``activation`` names the activation of weight-only files (``"maxmin"`` for the QC paper's files) and
    ``architecture`` their layout (``"residual"`` for its ``resweights_*`` files).

    Examples
    --------
    >>> net = lipbound.load("weights.mat", activation="tanh")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        import scipy.io

        data = scipy.io.loadmat(path)
        key = next((k for k in ("weights", "W") if k in data), None)
        if key is None:
            found = [k for k in data if not k.startswith("__")]
            raise NetworkError(f"{path}: no 'weights' or 'W' cell array (found {found}).")
        weights = [np.asarray(w, dtype=np.float64) for w in np.asarray(data[key], dtype=object).ravel()]
        bkey = next((k for k in ("biases", "b") if k in data), None)
        biases = None
        if bkey is not None:
            biases = [np.asarray(b, dtype=np.float64).ravel() for b in np.asarray(data[bkey], dtype=object).ravel()]
        return from_weights(weights, activation, biases, name=path.stem, architecture=architecture,
                            **activation_params)
    if suffix == ".npz":
        data = np.load(path)
        def keyed(prefixes):
            for prefix in prefixes:
                found = sorted((int(k[len(prefix):]), k) for k in data.files
                               if k.startswith(prefix) and k[len(prefix):].isdigit())
                if found:
                    return [data[k] for _, k in found]
            return None
        weights = keyed(("W", "weights_", "w"))
        if weights is None:
            raise NetworkError(f"{path}: expected arrays W0, W1, ... (found {data.files}).")
        biases = keyed(("b", "biases_"))
        return from_weights(weights, activation, biases, name=path.stem, architecture=architecture,
                            **activation_params)
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(obj, nn.Module):
            return from_torch(obj, name=path.stem)
        raise NetworkError(f"{path} holds a {type(obj).__name__}, not a whole nn.Module; save it with "
                           "torch.save(model), or build the module and use lipbound.from_torch.")
    raise NetworkError(f"unsupported file type '{suffix}' ({path}); use .mat, .npz, .pt or .pth.")
