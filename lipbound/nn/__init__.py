"""Torch modules for Lipschitz-aware architectures: GroupSort/MaxMin/Householder and PolyCom activations."""

from lipbound.nn.groupsort import GroupSort, Householder, MaxMin
from lipbound.nn.polycom import PolyNorm, PolyReLU

__all__ = ["GroupSort", "Householder", "MaxMin", "PolyNorm", "PolyReLU"]
