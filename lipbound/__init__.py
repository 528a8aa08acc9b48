"""lipbound: certified Lipschitz bounds of neural networks.

Examples
--------
>>> import torch.nn as nn, lipbound
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> cert = lipbound.certify(model, input_shape=4, method="lipsdp-neuron")
>>> cert.certified
True
"""

from lipbound.activations import SUPPORTED_ACTIVATIONS, ActivationSpec
from lipbound.api import METHODS, Verification, certify, certify_all, verify_certificate
from lipbound.bounds import Ball, Box, DomainError, activation_bounds, local_slopes, stable_neurons
from lipbound.certificate import Certificate
from lipbound.errors import (
    CertificationError,
    FormulationError,
    LipboundError,
    NetworkError,
    OptionError,
    SolverError,
    UnsupportedLayerError,
)
from lipbound.graph import GraphNetwork
from lipbound.importers import from_onnx, from_state_dict, from_torch, from_weights, load
from lipbound.lower import LowerBound, lower_bound
from lipbound.network import (
    Affine,
    GroupSortLayer,
    HouseholderLayer,
    ImplicitLayer,
    Network,
    ResidualBlock,
    SlopeRestricted,
)

__version__ = "0.1.0"

from lipbound import batch, testing  # noqa: E402 - subpackages that use the names above

__all__ = [
    "GroupSortLayer", "HouseholderLayer", "ImplicitLayer", "ResidualBlock",
    "Ball", "Box", "DomainError", "activation_bounds", "local_slopes", "stable_neurons",
    "METHODS", "SUPPORTED_ACTIVATIONS", "ActivationSpec", "Affine", "Certificate", "CertificationError",
    "FormulationError", "GraphNetwork", "LipboundError", "LowerBound", "Network", "NetworkError", "OptionError",
    "SlopeRestricted", "SolverError", "UnsupportedLayerError", "Verification", "certify", "certify_all",
    "from_onnx", "from_state_dict", "from_torch", "from_weights", "load",
    "lower_bound", "verify_certificate", "batch", "testing",
]
