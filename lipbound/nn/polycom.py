"""PolyCom activations (Zhuo et al., ICLR 2025, arXiv:2411.03884): PolyReLU and PolyNorm.

Definitions (paper order of coefficients ``a_0, a_1, ..., a_r``)
-----------------------------------------------------------------
* ``PolyReLU(x) = sum_{i=0}^{r} a_i * relu(x)**i``, element-wise, with ``relu(x)**0 == 1`` everywhere, so
  the output equals ``a_0`` (not 0) for ``x < 0``.
* ``PolyNorm(x) = a_0 + sum_{i=1}^{r} a_i * x**i / sqrt(mean(x**(2 i), dim=-1) + eps)``, where ``x**i`` is
  the element-wise power and the mean runs over the **last** dimension (one token's feature vector). This
  is the official implementation's RMS normalisation ``norm(x) = x * rsqrt(mean(x**2, -1) + eps)`` applied
  to ``x**i``; it equals ``sqrt(D) * x**i / sqrt(||x**i||**2 + D * eps)``, i.e. the paper's
  ``x**i / ||x**i||_2`` up to the factor ``sqrt(D)`` (absorbed into ``a_i``) and the ``eps`` regulariser.
  PolyNorm is a vector map, not an element-wise activation.

Parameter storage (official convention, so official state dicts load unchanged)
------------------------------------------------------------------------------
Both modules hold ``weight`` of shape ``(r,)`` and ``bias`` of shape ``(1,)``, in the official repository's
**reversed** order: ``weight[j]`` is ``a_{r-j}`` (``weight[0] = a_r``, ..., ``weight[r-1] = a_1``) and
``bias`` is ``a_0``. The initialisation is the official one, ``a_i = 1/r`` for ``i >= 1`` and ``a_0 = 0``.
Use :meth:`PolyReLU.coefficients` / :func:`paper_coefficients` to read the coefficients in paper order and
:meth:`PolyReLU.set_coefficients` to write them; never index ``weight`` directly unless you mean the
official order. The coefficients are scalars shared by every neuron of the layer, as in the paper.

Execution follows the input: parameters are cast to the input's device and dtype inside ``forward`` (the
cast is differentiable, so gradients reach the stored parameters). Unlike the official code, the forward
pass is not wrapped in ``torch.utils.checkpoint``; recomputation only saves memory and does not change
values.

Examples
--------
>>> import torch
>>> act = PolyReLU(order=3)
>>> act.coefficients().tolist()  # paper order a_0..a_3
[0.0, 0.3333333432674408, 0.3333333432674408, 0.3333333432674408]
>>> act.set_coefficients([0.0, 1.0, 0.0, 0.0])  # plain ReLU
>>> act(torch.tensor([-1.0, 2.0]))
tensor([0., 2.], grad_fn=<AddBackward0>)
>>> norm = PolyNorm(order=1, eps=0.0)
Traceback (most recent call last):
    ...
ValueError: PolyNorm: eps must be a finite number > 0 (eps = 0 divides by zero at x = 0), got 0.0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "PolyReLU",
    "PolyNorm",
    "poly_relu",
    "poly_norm",
    "paper_coefficients",
    "official_to_paper",
    "paper_to_official",
]


def _check_order(module_name: str, order: object) -> int:
    """Return ``order`` as an int, or raise ``ValueError`` if it is not an integer >= 1."""
    # bool is an Integral, but PolyReLU(order=True) is certainly a mistake, so it is rejected explicitly.
    if isinstance(order, bool) or not isinstance(order, numbers.Integral):
        raise ValueError(f"{module_name}: order must be an integer >= 1, got {order!r}.")
    if order < 1:
        raise ValueError(f"{module_name}: order must be an integer >= 1, got {order}.")
    return int(order)


def _check_eps(module_name: str, eps: object) -> float:
    """Return ``eps`` as a float, or raise ``ValueError`` unless it is a finite real number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"{module_name}: eps must be a finite real number > 0, got {eps!r}.")
    value = float(eps)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(
            f"{module_name}: eps must be a finite number > 0 (eps = 0 divides by zero at x = 0), got {value}."
        )
    return value


def _check_floating(module_name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module_name}: expected a torch.Tensor, got {type(x).__name__}.")
    if not torch.is_floating_point(x):
        raise TypeError(f"{module_name}: expected a floating-point tensor, got dtype {x.dtype}.")


def _as_float64(values: object) -> np.ndarray:
    """Return ``values`` (tensor, array, sequence or scalar) as a flat float64 numpy array (a copy)."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().to(torch.float64).numpy().reshape(-1).copy()
    return np.array(values, dtype=np.float64).reshape(-1)


def official_to_paper(weight: Sequence[float] | np.ndarray | torch.Tensor,
                      bias: float | Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Convert official-order parameters to paper-order coefficients.

    Parameters
    ----------
    weight : array_like, shape (r,)
        Official ``weight``: ``weight[j]`` multiplies the power ``r - j``.
    bias : float or array_like of one element
        Official ``bias`` (the constant term ``a_0``).

    Returns
    -------
    numpy.ndarray, shape (r + 1,)
        ``[a_0, a_1, ..., a_r]`` in float64.

    Examples
    --------
    >>> official_to_paper([3.0, 2.0, 1.0], 0.5).tolist()
    [0.5, 1.0, 2.0, 3.0]
    """
    w = _as_float64(weight)
    b = _as_float64(bias)
    if w.size < 1 or b.size != 1:
        raise ValueError(f"official_to_paper: need weight of shape (r,) with r >= 1 and a scalar bias, "
                         f"got shapes {w.shape} and {b.shape}.")
    return np.concatenate([b, w[::-1]])


def paper_to_official(coefficients: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Convert paper-order coefficients ``[a_0, ..., a_r]`` to official ``(weight, bias)``.

    Parameters
    ----------
    coefficients : array_like, shape (r + 1,)
        ``[a_0, a_1, ..., a_r]`` with ``r >= 1``.

    Returns
    -------
    weight : numpy.ndarray, shape (r,)
        ``[a_r, ..., a_1]``.
    bias : numpy.ndarray, shape (1,)
        ``[a_0]``.

    Examples
    --------
    >>> w, b = paper_to_official([0.5, 1.0, 2.0, 3.0])
    >>> w.tolist(), b.tolist()
    ([3.0, 2.0, 1.0], [0.5])
    """
    a = np.asarray(coefficients, dtype=np.float64).reshape(-1)
    if a.size < 2:
        raise ValueError(f"paper_to_official: need at least two coefficients a_0, a_1, got {a.size}.")
    return a[:0:-1].copy(), a[:1].copy()


def paper_coefficients(module: PolyReLU | PolyNorm) -> np.ndarray:
    """Return a PolyCom module's coefficients in paper order ``[a_0, ..., a_r]`` (float64 copy).

    Parameters
    ----------
    module : PolyReLU or PolyNorm

    Returns
    -------
    numpy.ndarray, shape (order + 1,)

    Examples
    --------
    >>> paper_coefficients(PolyNorm(order=2)).tolist()
    [0.0, 0.5, 0.5]
    """
    if not isinstance(module, (PolyReLU, PolyNorm)):
        raise TypeError(f"paper_coefficients: expected PolyReLU or PolyNorm, got {type(module).__name__}.")
    return official_to_paper(module.weight, module.bias)


def _coefficient_tensor(coefficients: Sequence[float] | np.ndarray | torch.Tensor,
                        like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(coefficients)
    a = a.to(device=like.device, dtype=like.dtype).reshape(-1)
    if a.numel() < 2:
        raise ValueError(f"need coefficients a_0..a_r with r >= 1, got {a.numel()} value(s).")
    return a


def poly_relu(x: torch.Tensor, coefficients: Sequence[float] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Evaluate ``sum_i a_i relu(x)**i`` element-wise (paper-order coefficients).

    Parameters
    ----------
    x : torch.Tensor
        Floating-point input of any shape.
    coefficients : array_like or torch.Tensor, shape (r + 1,)
        ``[a_0, ..., a_r]``; a tensor keeps its autograd graph (it is cast to ``x``'s device and dtype).

    Returns
    -------
    torch.Tensor
        Same shape, device and dtype as ``x``.

    Examples
    --------
    >>> poly_relu(torch.tensor([-2.0, 0.0, 2.0]), [1.0, 0.0, 1.0])
    tensor([1., 1., 5.])
    """
    _check_floating("poly_relu", x)
    a = _coefficient_tensor(coefficients, x)
    r = torch.relu(x)
    # Horner's rule: a_0 + r (a_1 + r (a_2 + ...)); fewer multiplications and no explicit powers.
    out = a[-1] * r
    for k in range(a.numel() - 2, 0, -1):
        out = (out + a[k]) * r
    return out + a[0]


def poly_norm(x: torch.Tensor, coefficients: Sequence[float] | np.ndarray | torch.Tensor,
              eps: float = 1e-6) -> torch.Tensor:
    """Evaluate ``a_0 + sum_{i>=1} a_i x**i / sqrt(mean(x**(2i), -1) + eps)`` (paper-order coefficients).

    Parameters
    ----------
    x : torch.Tensor
        Floating-point input, shape ``(..., D)``; the RMS is taken over the last dimension.
    coefficients : array_like or torch.Tensor, shape (r + 1,)
        ``[a_0, ..., a_r]``.
    eps : float
        Regulariser inside the square root, finite and > 0.

    Returns
    -------
    torch.Tensor
        Same shape, device and dtype as ``x``.

    Examples
    --------
    >>> poly_norm(torch.tensor([[3.0, -4.0]]), [0.0, 1.0], eps=1e-12)  # x / rms(x), rms = sqrt(12.5)
    tensor([[ 0.8485, -1.1314]])
    """
    _check_floating("poly_norm", x)
    eps = _check_eps("poly_norm", eps)
    if x.dim() == 0:
        raise ValueError("poly_norm: expected an input with a feature (last) dimension, got a 0-d tensor.")
    a = _coefficient_tensor(coefficients, x)
    out = a[0] + torch.zeros_like(x)
    power = x
    for i in range(1, a.numel()):
        if i > 1:
            power = power * x
        rms_inv = torch.rsqrt(power.pow(2).mean(dim=-1, keepdim=True) + eps)
        out = out + a[i] * (power * rms_inv)
    return out


class _PolyComBase(nn.Module):
    """Shared parameter handling (official storage order, paper-order accessors)."""

    _name = "PolyCom"

    def __init__(self, order: int = 3) -> None:
        super().__init__()
        self.order = _check_order(self._name, order)
        # Official initialisation: weight = ones(r) / r (so a_1..a_r = 1/r) and bias = 0 (a_0 = 0).
        self.weight = nn.Parameter(torch.full((self.order,), 1.0 / self.order))
        self.bias = nn.Parameter(torch.zeros(1))

    def paper_coefficient_tensor(self) -> torch.Tensor:
        """Return ``[a_0, ..., a_r]`` as a differentiable tensor (a view of the parameters, reordered).

        Returns
        -------
        torch.Tensor, shape (order + 1,)
        """
        return torch.cat([self.bias, torch.flip(self.weight, dims=(0,))])

    def coefficients(self) -> np.ndarray:
        """Return the coefficients in paper order ``[a_0, a_1, ..., a_r]`` as a float64 numpy array.

        Returns
        -------
        numpy.ndarray, shape (order + 1,)
        """
        return paper_coefficients(self)  # type: ignore[arg-type]

    @torch.no_grad()
    def set_coefficients(self, coefficients: Sequence[float] | np.ndarray | torch.Tensor) -> None:
        """Overwrite the parameters from paper-order coefficients ``[a_0, ..., a_r]``.

        Parameters
        ----------
        coefficients : array_like, shape (order + 1,)
        """
        a = torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1)
        if a.numel() != self.order + 1:
            raise ValueError(
                f"{self._name}: expected {self.order + 1} coefficients a_0..a_{self.order}, got {a.numel()}."
            )
        self.weight.copy_(torch.flip(a[1:], dims=(0,)).to(self.weight.dtype))
        self.bias.copy_(a[:1].to(self.bias.dtype))


class PolyReLU(_PolyComBase):
    """PolyReLU activation ``x -> sum_{i=0}^{r} a_i relu(x)**i`` (element-wise).

    Parameters
    ----------
    order : int, default 3
        The order ``r >= 1`` (the paper uses 3).

    Attributes
    ----------
    weight : torch.nn.Parameter, shape (order,)
        Official order: ``weight[j] = a_{order-j}``; initialised to ``1/order``.
    bias : torch.nn.Parameter, shape (1,)
        ``a_0``; initialised to 0.

    Notes
    -----
    ``relu(x)**0 = 1`` everywhere, so the output is ``a_0`` for every ``x <= 0``. With ``a = (0, 1, 0, ...)``
    this is ReLU, with ``a = (0, 0, 1, 0, ...)`` squared ReLU. The map is continuous, piecewise polynomial
    with a kink at 0 (left slope 0, right slope ``a_1``), and not globally Lipschitz when any ``a_i``
    with ``i >= 2`` is nonzero (see ``theory/polycom.py``).

    Examples
    --------
    >>> import torch
    >>> act = PolyReLU(order=2)
    >>> act.set_coefficients([0.5, 1.0, 2.0])
    >>> act(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    tensor([0.5000, 3.5000], dtype=torch.float64, grad_fn=<AddBackward0>)
    """

    _name = "PolyReLU"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply PolyReLU element-wise; the output has ``x``'s shape, device and dtype."""
        _check_floating(self._name, x)
        return poly_relu(x, self.paper_coefficient_tensor())

    def extra_repr(self) -> str:
        return f"order={self.order}"


class PolyNorm(_PolyComBase):
    """PolyNorm activation ``x -> a_0 + sum_{i=1}^{r} a_i x**i / sqrt(mean(x**(2i), -1) + eps)``.

    Parameters
    ----------
    order : int, default 3
        The order ``r >= 1`` (the paper uses 3).
    eps : float, default 1e-6
        Regulariser of the RMS normalisation, finite and > 0 (the official default is 1e-6).

    Attributes
    ----------
    weight : torch.nn.Parameter, shape (order,)
        Official order: ``weight[j] = a_{order-j}``; initialised to ``1/order``.
    bias : torch.nn.Parameter, shape (1,)
        ``a_0``; initialised to 0.
    eps : float

    Notes
    -----
    The normalisation runs over the last dimension, which must be the full feature vector of one token (the
    official dense model normalises the ``[s, b, ffn]`` output of ``dense_h_to_4h`` over ``ffn``). With
    ``eps > 0`` the map is globally Lipschitz in the Euclidean norm, but its constant grows like
    ``|a_1| / sqrt(eps)`` and, for ``i >= 2``, like ``D**((i-1)/(2i)) * eps**(-1/(2i))``; see
    ``theory/polycom.py`` for the derivation.

    Examples
    --------
    >>> import torch
    >>> act = PolyNorm(order=3, eps=1e-6)
    >>> y = act(torch.randn(2, 5, 16))
    >>> tuple(y.shape)
    (2, 5, 16)
    >>> act.coefficients().round(4).tolist()
    [0.0, 0.3333, 0.3333, 0.3333]
    """

    _name = "PolyNorm"

    def __init__(self, order: int = 3, eps: float = 1e-6) -> None:
        super().__init__(order)
        self.eps = _check_eps(self._name, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply PolyNorm over the last dimension; the output has ``x``'s shape, device and dtype."""
        _check_floating(self._name, x)
        return poly_norm(x, self.paper_coefficient_tensor(), self.eps)

    def extra_repr(self) -> str:
        return f"order={self.order}, eps={self.eps}"
