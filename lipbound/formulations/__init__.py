"""Formulations: turn a :class:`~lipbound.network.Network` into an LMI :class:`~lipbound.program.Program`."""

from lipbound.formulations.lipsdp import LipSDPProblem, lipsdp, product_bound

__all__ = ["LipSDPProblem", "lipsdp", "product_bound"]
