"""Exceptions raised by lipbound.

Every error names what went wrong (layer, shape, solver status) and what to do about it.
"""

from __future__ import annotations


class LipboundError(Exception):
    """Base class of all lipbound errors."""


class NetworkError(LipboundError, ValueError):
    """A network description is invalid (shapes, NaN/inf weights, empty network)."""


class UnsupportedLayerError(LipboundError):
    """An imported model contains layers lipbound cannot represent.

    Attributes
    ----------
    nodes : list of (name, type) pairs
        Every unsupported node found, not only the first.
    """

    def __init__(self, nodes: list[tuple[str, str]], hint: str = ""):
        self.nodes = list(nodes)
        listing = "; ".join(f"{name} ({kind})" for name, kind in self.nodes)
        message = f"{len(self.nodes)} unsupported node(s): {listing}."
        if hint:
            message += " " + hint
        super().__init__(message)


class FormulationError(LipboundError, ValueError):
    """The requested method/norm cannot be applied to this network."""


class SolverError(LipboundError, RuntimeError):
    """A solver is unavailable, failed, or returned an unusable status."""


class CertificationError(LipboundError):
    """A certificate could not be verified rigorously."""


class OptionError(LipboundError, ValueError):
    """An option (keyword argument, solver setting, device, command-line flag) has an unknown name, a wrong type
    or an out-of-range value, or does not apply to the chosen method or norm. Raised before any work starts."""


class ManifestError(LipboundError, ValueError):
    """A batch manifest is invalid (unknown key, wrong type, missing points file, bad expectation)."""


class BatchError(LipboundError, RuntimeError):
    """A batch cannot run (results file in the way, engine unavailable, cluster unreachable)."""
