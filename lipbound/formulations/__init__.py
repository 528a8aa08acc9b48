"""Formulations: turn a :class:`~lipbound.network.Network` into LMI :class:`~lipbound.program.Program` objects."""

from lipbound.formulations.lipsdp import lipsdp, lipsdp_nsr, lipsdp_rr, product_bound
from lipbound.formulations.sdp import LipschitzProblem, lipschitz_problem
from lipbound.formulations.signal import SignalModel, signal_model

__all__ = ["LipschitzProblem", "SignalModel", "lipschitz_problem", "lipsdp", "lipsdp_nsr", "lipsdp_rr",
           "product_bound", "signal_model"]
