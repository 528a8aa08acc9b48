"""Import an ``nn.Module`` by tracing what it computes (``torch.export``) into the network IR.

The module's real code is traced to ATen operations (:mod:`lipbound.importers.aten`): functional calls,
overridden ``forward`` methods, parametrised weights and skip connections all appear as they run. Module types are
never trusted: a subclass of a known activation whose ``forward`` differs is traced like any other code. Three
things are refused by name before tracing, because tracing alone cannot vouch for them: forward hooks and pre-hooks
(module or global; ``allow_hooks=True`` traces them instead), and modules that are not in eval mode are put in eval
mode with a warning (Dropout off, BatchNorm running statistics). After import, the network is evaluated against
the module on random inputs; a mismatch is an error, never a silent bound.

lipbound's own activation modules (and deel-torchlip's Householder) are traced as single custom operators when
their ``forward`` is the library's own, so their exact semantics (reflection vectors, polynomial coefficients)
reach the IR.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import types
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lipbound.activations import ActivationSpec
from lipbound.errors import NetworkError, UnsupportedLayerError
from lipbound.graph import GraphNetwork
from lipbound.importers.aten import AtenTranslator
from lipbound.importers.simplify import simplify
from lipbound.network import Network

log = logging.getLogger("lipbound")

# -- custom operators: lipbound's activations as single traced nodes ----------------------------------------


@torch.library.custom_op("lipbound::householder", mutates_args=())
def _householder_op(x: torch.Tensor, vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """Householder activation along ``dim`` with unit ``vectors`` (num_groups, g)."""
    from lipbound.nn import Householder

    module = Householder(vectors.detach().double()[0] if vectors.shape[0] == 1 else vectors.detach().double())
    moved = torch.movedim(x, dim, 1)
    return torch.movedim(module(moved), 1, dim).clone()


@_householder_op.register_fake
def _(x, vectors, dim):
    return torch.empty_like(x)


@torch.library.custom_op("lipbound::householder_halves", mutates_args=())
def _householder_halves_op(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """deel-torchlip's HouseHolder (channel ``i`` paired with ``i + C/2``, angle ``theta``)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    t = theta.view(shape)
    a, b = x.split(x.shape[1] // 2, 1)
    sel = a * torch.sin(0.5 * t) - b * torch.cos(0.5 * t)
    a2 = a * torch.cos(t) + b * torch.sin(t)
    b2 = a * torch.sin(t) - b * torch.cos(t)
    return torch.cat([torch.where(sel > 0, a2, a), torch.where(sel > 0, b2, b)], dim=1)


@_householder_halves_op.register_fake
def _(x, theta):
    return torch.empty_like(x)


@torch.library.custom_op("lipbound::polyrelu", mutates_args=())
def _polyrelu_op(x: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    return ActivationSpec("polyrelu", {"coefficients": tuple(coefficients)}).torch(x)


@_polyrelu_op.register_fake
def _(x, coefficients):
    return torch.empty_like(x)


def _custom_handlers() -> dict:
    def householder(tr: AtenTranslator, node, args):
        x, vectors, dim = args
        v = vectors.detach().double().numpy()
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        width = x.shape[int(dim) - 1] if int(dim) > 0 else x.size
        if v.shape[0] == 1:  # one vector shared by every group
            v = np.repeat(v, width // v.shape[1], axis=0)
        return tr.householder(x, v, int(dim), node)

    def householder_halves(tr: AtenTranslator, node, args):
        x, theta = args
        th = theta.detach().double().numpy().reshape(-1)
        # Reflects (a, b) when a sin(t/2) - b cos(t/2) > 0 by [[cos t, sin t], [sin t, -cos t]] = I - 2 u u^T with
        # u = (sin(t/2), -cos(t/2)); with v = -u that is lipbound's Householder (identity iff v^T z > 0; both
        # branches agree on v^T z = 0).
        vectors = np.stack([-np.sin(th / 2), np.cos(th / 2)], axis=1)
        return tr.householder(x, vectors, 1, node, pairs="halves")

    def polyrelu(tr: AtenTranslator, node, args):
        x, coefs = args
        spec = ActivationSpec("polyrelu", {"coefficients": tuple(float(c) for c in coefs)})
        return tr._activation(x, spec, node)

    return {"householder": householder, "householder_halves": householder_halves, "polyrelu": polyrelu}


def _exact_forward(module: nn.Module, cls: type) -> bool:
    """Whether ``module``'s forward is exactly ``cls.forward`` (its type is ``cls`` or a subclass that does not
    override it, and no instance attribute shadows it)."""
    return type(module).forward is cls.forward and "forward" not in vars(module)


def _known_replacements(module: nn.Module) -> dict[str, types.MethodType]:
    """Forwards to swap in while tracing: lipbound's Householder/PolyReLU and deel-torchlip's HouseHolder as
    custom operators (only where the module's forward is the library's own)."""
    from lipbound.nn import Householder, PolyReLU

    swaps = {}
    for name, sub in module.named_modules():
        if isinstance(sub, Householder) and _exact_forward(sub, Householder):
            def fwd(self, x):
                dim = 0 if x.dim() == 1 else 1
                self._check_width(x.shape[dim], x.shape)
                return torch.ops.lipbound.householder(x, self.v, dim)
            swaps[name] = types.MethodType(fwd, sub)
        elif isinstance(sub, PolyReLU) and _exact_forward(sub, PolyReLU):
            coefficients = [float(a) for a in sub.coefficients()]  # read now: tracing sees fake tensors

            def fwd(self, x, _coefficients=coefficients):
                return torch.ops.lipbound.polyrelu(x, _coefficients)
            swaps[name] = types.MethodType(fwd, sub)
        elif type(sub).__module__.startswith("deel.torchlip") and type(sub).__name__ == "HouseHolder":
            if "forward" in vars(sub):
                continue
            def fwd(self, z, axis=1, _name=name):
                if axis != 1:
                    raise UnsupportedLayerError([(_name, f"HouseHolder(axis={axis})")], "only axis=1 is supported.")
                return torch.ops.lipbound.householder_halves(z, self.theta)
            swaps[name] = types.MethodType(fwd, sub)
    return swaps


@contextlib.contextmanager
def _swapped(module: nn.Module, swaps: dict):
    subs = dict(module.named_modules())
    try:
        for name, fwd in swaps.items():
            subs[name].forward = fwd
        yield
    finally:
        for name in swaps:
            subs[name].__dict__.pop("forward", None)


def _hooks(module: nn.Module) -> list[tuple[str, str]]:
    """Forward hooks and pre-hooks that tracing would have to trust (weight-normalisation pre-hooks excepted)."""
    from torch.nn.modules import module as module_mod

    allowed = []
    with contextlib.suppress(ImportError):
        from torch.nn.utils.spectral_norm import SpectralNorm

        allowed.append(SpectralNorm)
    with contextlib.suppress(ImportError):
        from torch.nn.utils.weight_norm import WeightNorm

        allowed.append(WeightNorm)
    found = []
    for kind, registry in (("global forward hook", getattr(module_mod, "_global_forward_hooks", {})),
                           ("global forward pre-hook", getattr(module_mod, "_global_forward_pre_hooks", {}))):
        for hook in registry.values():
            found.append(("(global)", f"{kind} {getattr(hook, '__name__', type(hook).__name__)}"))
    for name, sub in module.named_modules():
        label = name or type(module).__name__
        for hook in sub._forward_hooks.values():
            found.append((label, f"forward hook {getattr(hook, '__name__', type(hook).__name__)}"))
        for hook in sub._forward_pre_hooks.values():
            if allowed and isinstance(hook, tuple(allowed)):
                continue
            found.append((label, f"forward pre-hook {getattr(hook, '__name__', type(hook).__name__)}"))
    return found


def _training_differences(module: nn.Module) -> list[str]:
    return [f"{name or type(module).__name__} ({type(sub).__name__})" for name, sub in module.named_modules()
            if sub.training and isinstance(sub, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm))]


def _infer_input_shape(module: nn.Module) -> tuple[int, ...]:
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return (sub.in_features,)
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            break
    raise NetworkError(f"{type(module).__name__}: pass input_shape=... (the shape of one input without the batch "
                       "dimension, e.g. (1, 28, 28)); it cannot be inferred from the module.")


def _check_first_linear(module: nn.Module, shape: tuple[int, ...]) -> None:
    """A clear message for the common mistake of an input shape that does not fit a leading Linear layer."""
    if not isinstance(module, nn.Sequential):
        return
    for name, sub in module.named_children():
        if isinstance(sub, (nn.Flatten, nn.Identity, nn.Dropout)):
            continue
        if isinstance(sub, nn.Linear):
            size = int(np.prod(shape)) if any(isinstance(m, nn.Flatten) for m in module.children()) else shape[-1]
            if size != sub.in_features:
                raise NetworkError(f"input_shape {shape} has {size} features but the first Linear layer ('{name}') "
                                   f"expects {sub.in_features}.")
        return


def from_torch(module: nn.Module, input_shape: Sequence[int] | int | None = None, name: str | None = None,
               allow_hooks: bool = False, check: bool = True) -> Network | GraphNetwork:
    """Import an ``nn.Module`` (its eval-mode function) as a network.

    The module's code is traced with ``torch.export`` and every ATen operation is mapped exactly (see
    :mod:`lipbound.importers.aten` for the operator set: linear layers, 1-D/2-D convolutions, average/adaptive
    average/max pooling, BatchNorm (eval), flatten/reshape/permute/slice/pad/concat, sums and constant scalings,
    ReLU, LeakyReLU, Tanh, Sigmoid, ELU, Softplus, GELU, SiLU, Mish, sort/max/min (GroupSort, MaxMin), lipbound's
    and deel-torchlip's activations). Weights under ``torch.nn.utils.parametrize`` or ``spectral_norm`` are read
    as the module computes them at inference.

    Parameters
    ----------
    module : nn.Module
    input_shape : int or tuple of int, optional
        Shape of one input without the batch dimension (``(1, 28, 28)``). Inferred from a leading ``Linear`` when
        omitted.
    name : str, optional
    allow_hooks : bool
        Trace forward hooks and pre-hooks instead of refusing the module (the network is then checked against the
        module's output like always).
    check : bool
        Evaluate the imported network against the module on random inputs and raise on a mismatch (default).

    Returns
    -------
    Network or GraphNetwork
        A chain :class:`~lipbound.network.Network` when the model is one (a sequence of linear layers and
        activations), else a :class:`~lipbound.graph.GraphNetwork`.

    Raises
    ------
    UnsupportedLayerError
        Listing every operation that cannot be represented, hooks, or a model ``torch.export`` cannot trace.
    NetworkError
        On invalid weights, or when the imported network does not reproduce the module's output.

    Examples
    --------
    >>> import torch.nn as nn, lipbound
    >>> net = lipbound.from_torch(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), input_shape=3)
    >>> net.dims
    (3, 4, 2)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch expects an nn.Module, got {type(module).__name__}.")
    if isinstance(module, torch.jit.ScriptModule):
        raise UnsupportedLayerError([(type(module).__name__, "TorchScript module")], _TORCHSCRIPT_HINT)
    name = name or type(module).__name__
    shape = _infer_input_shape(module) if input_shape is None else (
        (int(input_shape),) if np.isscalar(input_shape) else tuple(int(s) for s in input_shape))
    _check_first_linear(module, shape)
    hooks = _hooks(module)
    if hooks and not allow_hooks:
        raise UnsupportedLayerError(hooks, "Hooks can change what a module computes and tracing cannot vouch for "
                                    "them: remove them (handle.remove()) before certifying, or pass "
                                    "allow_hooks=True to trace them (the result is checked against the module).")
    params = list(module.parameters()) + list(module.buffers())
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    if any(p.device.type != "cpu" for p in params):
        module = copy.deepcopy(module).cpu()
    training = _training_differences(module)
    if training:
        warnings.warn(f"{name} is in training mode ({', '.join(training)}): certifying its eval-mode function "
                      "(Dropout off, BatchNorm with running statistics).", stacklevel=2)
        log.warning("import %s: training-mode modules %s; certifying the eval-mode function", name,
                    ", ".join(training))
    was_training = module.training
    module.eval()
    example = torch.randn(2, *shape, dtype=dtype)
    try:
        with _swapped(module, _known_replacements(module)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (example,), strict=False)
    except UnsupportedLayerError:
        raise
    except Exception as exc:
        text = str(exc)
        if any(k in text for k in ("shapes cannot be multiplied", "size mismatch", "Expected", "expected input")):
            raise NetworkError(f"{name}: input_shape {shape} does not fit the model ({type(exc).__name__}: "
                               f"{text.splitlines()[0]}).") from exc
        raise UnsupportedLayerError([(name, "untraceable forward")],
                                    f"torch.export could not trace the model ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}). Data-dependent control flow "
                                    "(Python branches on tensor values) cannot be certified; an input shape that "
                                    "does not fit the model fails here too (input_shape="
                                    f"{shape}).") from exc
    finally:
        module.train(was_training)
    graph = from_exported(program, name, _check_against=None)
    if check:
        _cross_check(graph, module, shape, dtype, name)
    return graph.to_network() or graph


def from_exported(program, name: str = "network", _check_against=None) -> GraphNetwork:
    """Translate a ``torch.export.ExportedProgram`` (e.g. loaded from a ``.pt2`` file) into a network graph."""
    translator = AtenTranslator(program, name, custom=_custom_handlers())
    graph = simplify(translator.translate())
    if _check_against is not None:
        _cross_check_program(graph, program, name)
    return graph


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 5e-2)


def _compare(net_out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    ref = ref.detach().to(torch.float64).reshape(net_out.shape)
    scale = float(ref.abs().max()) + 1e-300
    return float((net_out - ref).abs().max()) / scale if scale > 0 else float((net_out - ref).abs().max())


def _cross_check(graph: GraphNetwork, module: nn.Module, shape, dtype, name: str) -> None:
    """Evaluate the network and the module on random inputs: relative error 1e-9 against the module in float64,
    or, where the module's weights are computed in its own lower precision, against the module in that precision
    with that precision's tolerance."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, *shape, generator=gen, dtype=torch.float64)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            net_out = graph.forward(x)
            err64 = math.inf
            with contextlib.suppress(Exception):
                ref64 = copy.deepcopy(module).double()(x)
                err64 = _compare(net_out, ref64, 1e-9)
            if err64 <= 1e-9:
                return
            ref = module(x.to(dtype))
            err = _compare(net_out, ref, _tolerance(dtype))
    finally:
        module.train(was_training)
    if err > _tolerance(dtype):
        raise NetworkError(f"{name}: the imported network does not reproduce the module's output (relative error "
                           f"{err:.3g} in {dtype}, {err64:.3g} in float64). This is a bug in lipbound's importer or "
                           "a module whose output depends on more than its input (state, randomness); nothing was "
                           "certified.")
    log.info("import %s: output matches the module to %.2g relative in %s (float64 copy: %.2g)", name, err, dtype,
             err64)


def _cross_check_program(graph: GraphNetwork, program, name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    val = next(n.meta["val"] for n in program.graph.nodes
               if n.op == "placeholder" and n.name in [s.arg.name for s in program.graph_signature.input_specs
                                                       if s.kind.name == "USER_INPUT"])
    dtype = val.dtype
    x = torch.randn(val.shape[0] if isinstance(val.shape[0], int) else 2, *graph.input_shape, generator=gen,
                    dtype=torch.float64)
    with torch.no_grad():
        ref = program.module()(x.to(dtype))
        err = _compare(graph.forward(x), ref, _tolerance(dtype))
    if err > _tolerance(dtype):
        raise NetworkError(f"{name}: the imported network does not reproduce the exported program's output (relative "
                           f"error {err:.3g} in {dtype}); nothing was certified.")


_TORCHSCRIPT_HINT = ("TorchScript is deprecated in torch; export the model with torch.export.export(model, "
                     "(example_input,)) and torch.export.save(program, 'model.pt2'), then certify the .pt2 file (or "
                     "pass the nn.Module itself).")

