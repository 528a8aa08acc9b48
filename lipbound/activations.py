"""Element-wise activations: forward functions and slope ranges.

An :class:`ActivationSpec` names an activation and its parameters. It evaluates the function in
torch (for lower bounds and bound propagation) and gives its global slope range
``[alpha, beta]`` (every difference quotient lies in it), which LipSDP uses as the default
per-neuron slope bounds. Slope ranges come from :mod:`lipbound.slopes`, which computes them
rigorously (outward rounded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lipbound.errors import NetworkError


def _polyrelu(x: torch.Tensor, coefficients) -> torch.Tensor:
    r = torch.relu(x)
    out = torch.full_like(x, float(coefficients[0]))
    power = torch.ones_like(x)
    for a in coefficients[1:]:
        power = power * r
        out = out + float(a) * power
    return out


def _softplus(x: torch.Tensor, beta: float) -> torch.Tensor:
    """``log(1 + exp(beta x)) / beta`` (any non-zero ``beta``) without overflow: ``x [beta x > 0] +
    log1p(exp(-|beta x|)) / beta`` (torch's own form overflows to inf for ``beta x > 709``; its ``threshold``
    switch to the identity is a different function)."""
    z = beta * x
    return torch.where(z > 0, x, torch.zeros_like(x)) + torch.log1p(torch.exp(-torch.abs(z))) / beta


# name -> (torch forward, default parameters)
_FORWARD = {
    "relu": (lambda x, p: torch.relu(x), {}),
    "leaky_relu": (lambda x, p: F.leaky_relu(x, p["negative_slope"]), {"negative_slope": 0.01}),
    "identity": (lambda x, p: x, {}),
    "tanh": (lambda x, p: torch.tanh(x), {}),
    "sigmoid": (lambda x, p: torch.sigmoid(x), {}),
    "elu": (lambda x, p: F.elu(x, p["alpha"]), {"alpha": 1.0}),
    "softplus": (lambda x, p: _softplus(x, p["beta"]), {"beta": 1.0}),
    "gelu": (lambda x, p: F.gelu(x), {}),
    "gelu_tanh": (lambda x, p: F.gelu(x, approximate="tanh"), {}),
    "silu": (lambda x, p: F.silu(x), {}),
    "mish": (lambda x, p: F.mish(x), {}),
    "polyrelu": (lambda x, p: _polyrelu(x, p["coefficients"]), {"coefficients": (0.0, 1.0)}),
}

SUPPORTED_ACTIVATIONS = tuple(_FORWARD)


@dataclass(frozen=True)
class ActivationSpec:
    """A named element-wise activation with its parameters.

    Parameters
    ----------
    name : str
        One of :data:`SUPPORTED_ACTIVATIONS`.
    params : dict, optional
        Activation parameters (``negative_slope`` for leaky_relu, ``alpha`` for elu, ``beta`` for
        softplus, ``coefficients`` a_0..a_r for polyrelu). Missing ones take torch's defaults.

    Examples
    --------
    >>> ActivationSpec("leaky_relu", {"negative_slope": 0.1}).slope_range()
    (0.1, 1.0)
    """

    name: str
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in _FORWARD:
            raise NetworkError(f"unknown activation '{self.name}'; supported: {', '.join(SUPPORTED_ACTIVATIONS)}.")
        merged = dict(_FORWARD[self.name][1])
        unknown = set(self.params) - set(merged)
        if unknown:
            raise NetworkError(f"activation '{self.name}' takes parameters {sorted(merged) or 'none'}, "
                               f"got {sorted(unknown)}.")
        merged.update(self.params)
        if "coefficients" in merged:
            merged["coefficients"] = tuple(float(a) for a in merged["coefficients"])
        object.__setattr__(self, "params", merged)

    def __hash__(self):
        return hash((self.name, tuple(sorted(self.params.items()))))

    def torch(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate the activation element-wise."""
        return _FORWARD[self.name][0](x, self.params)

    def slope_range(self) -> tuple[float, float]:
        """Global slope range ``(alpha, beta)``; raises for activations only bounded locally."""
        from lipbound.slopes import global_slope_bounds

        try:
            lo, hi = global_slope_bounds(self.name, **self.params)
        except ValueError as exc:
            raise NetworkError(str(exc)) from exc
        return float(lo), float(hi)

    def describe(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params.items())})"
