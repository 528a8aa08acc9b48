"""Per-channel LipSDP of convolutional chains through their circulant embedding (``solver="circulant"``).

A chain ``x -> conv_1 -> act_1 -> ... -> conv_d -> act_d -> head`` with stride-1 convolutions that keep the image
size (zero padding), activations whose slopes ``[alpha, beta]`` satisfy ``alpha beta <= 0`` and are the same at
every position of a channel, and a linear head, has a per-channel LipSDP program (``method="lipsdp-channel"``)
whose LMI has one row per neuron: ``(c_0 + ... + c_d) H W`` rows, dense for any general-purpose method.

**The embedding.** Put the ``H x W`` image in the corner of a torus ``T_1 x T_2`` with ``T_i >= H_i + max(pad)``
and zeros elsewhere. A circular convolution on the torus, read at the image's positions, is then exactly the
zero-padded convolution (the wrap-around reads only the zeros), so for signals supported on the image the
quadratic form of the torus LMI ``M_T(y)`` (same multipliers, every channel multiplier repeated at every torus
position, the head reading the image's positions) equals the network's: every term of LipSDP's quadratic form is
``phi_k^T diag(lambda) z_k``, ``phi_k^T diag(lambda) phi_k``, ``rho |x|^2`` or ``|head phi_d|^2``, and the only
term that sees torus positions outside the image, ``-2 alpha beta z_k^T diag(lambda) z_k``, is nonnegative there
when ``alpha beta <= 0``. Hence ``E^T M_T(y) E >= M(y)`` for the embedding ``E``, and ``M_T(y) <= 0`` implies
``M(y) <= 0``: every feasible point of the torus program is feasible for the network's program, with the same
objective ``rho``. The torus program is a *restriction*: its optimum is at least the per-channel LipSDP optimum
(measured gaps are in the README), and it never replaces the certificate: the multipliers it returns are
checked rigorously on the network's own program like any solver's answer.

**Why it is fast.** On the torus every convolution is diagonalised by the discrete Fourier transform, and
per-channel multipliers commute with it, so ``M_T(y)`` is unitarily similar to a block-diagonal matrix with one
``(c_0 + ... + c_d)``-square block per frequency, plus the head's rank-``h`` term (``h`` outputs), which couples
the frequencies; :mod:`lipbound.solvers.circulant` splits that coupling exactly and solves the result. This module
builds the data: the Fourier symbols of the (scaled) convolutions, the slopes, and the head's transform, in the
units of the ``lipsdp-channel`` program the certificate checks (built with one power of two per block).

Examples
--------
>>> import torch, lipbound
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
...                             torch.nn.Linear(2 * 5 * 5, 3))
>>> cert = lipbound.certify(model, method="lipsdp-channel", solver="circulant", input_shape=(1, 5, 5))
>>> cert.certified, cert.solver
(True, 'circulant')
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lipbound.errors import FormulationError
from lipbound.formulations.sdp import LipschitzProblem, scaled_signal_model
from lipbound.graph import Conv, GraphNetwork, LinearMap
from lipbound.network import SlopeRestricted


@dataclass(frozen=True, eq=False)
class CirculantChain:
    """A convolutional chain on its torus, in the units of one per-channel LipSDP program.

    ``symbols[k]`` (frequencies x ``c_{k+1}`` x ``c_k``, complex): the Fourier symbol of convolution ``k + 1`` (its
    program scaling included); ``alpha[k]``, ``beta[k]`` (``c_{k+1}``,): the slopes of activation ``k + 1``;
    ``head`` (frequencies x ``c_d`` x outputs): the unitary Fourier transform of the (scaled) head's rows
    embedded in the torus; ``channels`` ``(c_0, ..., c_d)``.
    """

    torus: tuple[int, ...]
    image: tuple[int, ...]
    channels: tuple[int, ...]
    symbols: tuple[np.ndarray, ...]
    alpha: tuple[np.ndarray, ...]
    beta: tuple[np.ndarray, ...]
    head: np.ndarray

    @property
    def n_vars(self) -> int:
        return 1 + sum(self.channels[1:])


def block_exponents(exponents) -> tuple:
    """One integer per block from scaling exponents that may be per neuron (the rounded mean of each block's):
    the circulant embedding needs every block scaled uniformly (any integers give an exactly scaled program)."""
    out = []
    for e in exponents:
        if isinstance(e, dict):
            e = e["exponents"]
        out.append(int(np.rint(np.mean(np.asarray(e, dtype=np.float64)))))
    return tuple(out)


def channel_signal(network):
    """The per-channel signal model of a convolutional chain (checked to be one: a :class:`FormulationError` names
    what does not fit), shared by :func:`circulant_exponents` and :func:`circulant_chain`."""
    from lipbound.formulations.lipsdp import _signal

    _chain_nodes(network)
    return _signal(network, channels=True)


def circulant_exponents(model) -> tuple:
    """Scaling exponents for the circulant program of the signal model ``model`` (:func:`channel_signal`): the
    data-chosen levels of :func:`~lipbound.formulations.scaling.choose_exponents` (norm products corrected by the
    worst direction found, so that a deep net's tiny optimum is brought to O(1)), one integer per block
    (:func:`block_exponents`)."""
    from lipbound.formulations.scaling import choose_exponents, slope_exponents

    slope_exp = [slope_exponents(stage.layer, "channel") for stage in model.stages]
    return block_exponents(choose_exponents(model, "channel", slope_exp))


def _chain_nodes(network) -> tuple[list[Conv], list[SlopeRestricted], LinearMap]:
    """The convolutions, activations and head of a chain ``Input, (Conv, activation)^d, LinearMap``, or why not."""
    if not isinstance(network, GraphNetwork):
        raise FormulationError("solver='circulant' needs a convolutional network (a graph with Conv nodes, e.g. "
                               "from_torch of a CNN); this network has only dense layers.")
    nodes = network.nodes
    convs, acts = [], []
    for i, node in enumerate(nodes[1:], start=1):
        if node.inputs != (i - 1,):
            raise FormulationError(f"solver='circulant' needs a chain; node '{node.name}' reads {node.inputs}.")
    body, last = nodes[1:-1], nodes[-1]
    if network.output != len(nodes) - 1 or not isinstance(last.op, LinearMap):
        raise FormulationError("solver='circulant' needs a linear head (a LinearMap node) as the network's output; "
                               f"the output node is '{last.name}' ({type(last.op).__name__}).")
    if len(body) % 2 or not body:
        raise FormulationError("solver='circulant' needs alternating convolution and activation nodes before the "
                               "head.")
    for conv_node, act_node in zip(body[::2], body[1::2], strict=True):
        conv, act = conv_node.op, act_node.op
        if not isinstance(conv, Conv):
            raise FormulationError(f"solver='circulant': node '{conv_node.name}' is {type(conv).__name__}, not a "
                                   "convolution (pooling, BatchNorm and dense layers between activations are not "
                                   "supported).")
        if not isinstance(act, SlopeRestricted):
            raise FormulationError(f"solver='circulant': node '{act_node.name}' ({type(act).__name__}) is not a "
                                   "slope-restricted activation.")
        if any(s != 1 for s in conv.stride) or tuple(conv.out_shape[1:]) != tuple(conv.in_shape[1:]):
            raise FormulationError(f"solver='circulant': convolution '{conv_node.name}' must have stride 1 and keep "
                                   f"the image size (input {conv.in_shape}, output {conv.out_shape}).")
        if conv.weight_err is not None:
            raise FormulationError(f"solver='circulant': convolution '{conv_node.name}' is inexact (an average "
                                   "pooling or folded normalisation written as a convolution).")
        convs.append(conv)
        acts.append(act)
    shapes = {tuple(c.in_shape[1:]) for c in convs}
    if len(shapes) != 1:
        raise FormulationError(f"solver='circulant': the convolutions act on images of different sizes {shapes}.")
    return convs, acts, last.op


def _full_kernel(conv: Conv) -> np.ndarray:
    """The weight as ``(c_out, c_in, *kernel)`` with zeros outside the groups."""
    w = conv.weight
    c_out, c_in_g = w.shape[:2]
    g = conv.groups
    full = np.zeros((c_out, c_in_g * g) + w.shape[2:])
    per = c_out // g
    for j in range(g):
        full[j * per:(j + 1) * per, j * c_in_g:(j + 1) * c_in_g] = w[j * per:(j + 1) * per]
    return full


def _symbol(kernel: np.ndarray, conv: Conv, torus: tuple[int, ...]) -> np.ndarray:
    """``K(w) = sum_j K_j exp(+2 pi i w . s_j / T)`` (``s_j = j dilation - padding``) at every torus frequency, as
    (frequencies, c_out, c_in): the circular cross-correlation is ``z^(w) = K(w) x^(w)`` for the DFT
    ``x^(w) = sum_n x_n exp(-2 pi i w . n / T)``."""
    nd = len(torus)
    placed = np.zeros(kernel.shape[:2] + torus)
    offsets = [(np.arange(kernel.shape[2 + i]) * conv.dilation[i] - conv.padding[i]) % torus[i] for i in range(nd)]
    for idx in np.ndindex(*kernel.shape[2:]):
        pos = tuple(int(o[i]) for o, i in zip(offsets, idx, strict=True))
        placed[(slice(None), slice(None)) + pos] += kernel[(slice(None), slice(None)) + idx]
    sym = np.fft.ifftn(placed, axes=tuple(range(2, 2 + nd))) * math.prod(torus)
    return np.moveaxis(sym.reshape(kernel.shape[:2] + (-1,)), -1, 0)


def _power_of_two(scaled: np.ndarray, exact: np.ndarray, what: str) -> int:
    """The ``p`` with ``scaled == 2^p exact`` entry for entry (the program's block scaling), or an error."""
    nz = np.flatnonzero(exact)
    if nz.size == 0:
        if np.any(scaled):
            raise FormulationError(f"solver='circulant': the program's {what} is not the network's.")
        return 0
    p = int(np.frexp(scaled.flat[nz[0]])[1] - np.frexp(exact.flat[nz[0]])[1])
    if not np.array_equal(scaled, np.ldexp(exact, p)):
        raise FormulationError(f"solver='circulant': the program's {what} is not a power-of-two multiple of the "
                               "network's (the program must be scaled uniformly per block).")
    return p


def circulant_chain(network, problem: LipschitzProblem, model=None) -> CirculantChain:
    """The torus data of ``network`` in the units of ``problem`` (a ``lipsdp-channel`` l2 program built with one
    integer scaling exponent per block, see :func:`block_exponents`); ``model``: its :func:`channel_signal`, when
    already built. Raises :class:`FormulationError` naming what does not fit."""
    convs, acts, head = _chain_nodes(network)
    if problem.norm != "l2" or problem.program.name != "lipsdp-channel":
        raise FormulationError("solver='circulant' solves the l2 per-channel program (method='lipsdp-channel').")
    model, _, _ = scaled_signal_model(channel_signal(network) if model is None else model, "channel",
                                      problem.exponents)
    if len(model.stages) != len(convs):
        raise FormulationError(f"solver='circulant': {len(convs)} convolutions but {len(model.stages)} nonlinear "
                               "stages (an exactly linear activation was folded away).")
    image = tuple(int(s) for s in convs[0].in_shape[1:])
    reach = [max(max(c.padding[i], c.dilation[i] * (c.weight.shape[2 + i] - 1) - c.padding[i]) for c in convs)
             for i in range(len(image))]
    torus = tuple(n + r for n, r in zip(image, reach, strict=True))
    channels = [int(convs[0].in_shape[0])] + [int(c.out_shape[0]) for c in convs]
    names = [name for name, _ in problem.program.variables]
    if names != ["rho"] + [f"lambda_{k}" for k in range(1, len(convs) + 1)] or problem.program.n_vars != \
            1 + sum(channels[1:]):
        raise FormulationError(f"solver='circulant': unexpected program variables {names}.")
    hw = math.prod(image)
    symbols, alpha, beta = [], [], []
    for k, (conv, act, stage) in enumerate(zip(convs, acts, model.stages, strict=True), start=1):
        if k == 1:
            if set(stage.pre) != {0} or stage.pre[0].mat is not None or stage.pre[0].err is not None:
                raise FormulationError("solver='circulant': unexpected map of the first stage.")
            scaled = np.ldexp(np.asarray(model.input_map, dtype=np.float64), stage.pre[0].power)
        else:
            lin = stage.pre.get(k - 1)
            if set(stage.pre) != {k - 1} or lin is None or lin.mat is None or lin.err is not None:
                raise FormulationError(f"solver='circulant': stage {k} does not read only the stage before it.")
            scaled = np.ldexp(np.asarray(lin.mat, dtype=np.float64), lin.power)
        p = _power_of_two(scaled, conv.matrix().toarray(), f"convolution {k}")
        symbols.append(np.ldexp(1.0, p) * _symbol(_full_kernel(conv), conv, torus))
        layer = stage.layer
        a = np.broadcast_to(np.asarray(layer.alpha, dtype=np.float64), (layer.width,)).reshape(channels[k], hw)
        b = np.broadcast_to(np.asarray(layer.beta, dtype=np.float64), (layer.width,)).reshape(channels[k], hw)
        if np.any(a != a[:, :1]) or np.any(b != b[:, :1]):
            raise FormulationError(f"solver='circulant': activation {k} ('{act.name}') has slopes that vary within a "
                                   "channel (local slopes from a domain, or a per-neuron activation).")
        if np.any(a[:, 0] * b[:, 0] > 0):
            raise FormulationError(f"solver='circulant': activation {k} ('{act.name}') has slopes [alpha, beta] with "
                                   "alpha beta > 0; the torus restriction is sound only for alpha beta <= 0.")
        alpha.append(a[:, 0].copy())
        beta.append(b[:, 0].copy())
    out = model.output.get(len(convs))
    if set(model.output) != {len(convs)} or out is None or out.err is not None:
        raise FormulationError("solver='circulant': the output must read only the last activation, exactly.")
    h = np.ldexp(np.eye(channels[-1] * hw) if out.mat is None else np.asarray(out.mat, dtype=np.float64), out.power)
    _power_of_two(h, head.dense(), "head")
    rows = np.zeros((h.shape[0], channels[-1]) + torus)
    rows[(slice(None), slice(None)) + tuple(slice(0, n) for n in image)] = h.reshape((h.shape[0], channels[-1])
                                                                                      + image)
    spectrum = np.fft.fftn(rows, axes=tuple(range(2, 2 + len(image)))) / math.sqrt(math.prod(torus))
    head_f = np.moveaxis(spectrum.reshape(h.shape[0], channels[-1], -1), -1, 0).transpose(0, 2, 1)
    return CirculantChain(torus, image, tuple(channels), tuple(symbols), tuple(alpha), tuple(beta),
                          np.ascontiguousarray(head_f))

