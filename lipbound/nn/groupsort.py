"""GroupSort, MaxMin and Householder activations as torch modules.

These are the non-slope-restricted activations of Anil, Lucas & Grosse (ICML 2019, GroupSort/MaxMin) and
Singla, Singla & Feizi (ICLR 2022, Householder) for which Pauli et al. (ICLR 2024, arXiv:2401.14033) give the
quadratic constraints that lipbound uses. Each module exposes the attributes the formulations read
(``group_size`` and, for Householder, ``vectors``), so a network importer never needs to re-derive them.

Layout convention (shared by all three modules)
------------------------------------------------
* The **feature dimension is dim 1** for inputs with two or more dimensions, as for ``torch.nn.Linear``
  outputs ``(batch, features)`` and convolution outputs ``(batch, channels, *spatial)``; every other
  dimension is a batch dimension. A one-dimensional input ``(features,)`` is a single unbatched sample.
* Features are split into **consecutive** groups ``[0, g), [g, 2g), ...`` of size ``g`` (as in the ICLR 2024
  code, ``kron(eye(N), .)``, and in deel-torchlip's ``GroupSort``; note that deel-torchlip's ``HouseHolder``
  pairs the first and second *halves* of the channels instead, so its weights must be permuted before use).
* GroupSort sorts each group in **ascending** order; MaxMin therefore returns ``(min, max)`` per adjacent
  pair, matching the ICLR 2024 code and deel-torchlip's ``GroupSort2``. The order inside a group does not
  change the quadratic constraints (they are invariant under permutations within a group) but it does fix
  which output feature is which, so it matters to the next layer's weights.

Examples
--------
>>> import torch
>>> MaxMin()(torch.tensor([[3.0, 1.0, -2.0, 5.0]]))
tensor([[ 1.,  3., -2.,  5.]])
>>> GroupSort(None)(torch.tensor([[3.0, 1.0, -2.0, 5.0]]))
tensor([[-2.,  1.,  3.,  5.]])
>>> Householder([0.0, 1.0])(torch.tensor([[1.0, 2.0, 1.0, -2.0]]))
tensor([[1., 2., 1., 2.]])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lipbound.errors import NetworkError

__all__ = ["GroupSort", "MaxMin", "Householder"]

#: Index of the feature dimension for inputs of two or more dimensions.
FEATURE_DIM = 1


def _feature_dim(module_name: str, x: torch.Tensor) -> int:
    """Return the feature dimension of ``x`` (1, or 0 for an unbatched 1-D input)."""
    if x.dim() == 0:
        raise NetworkError(f"{module_name}: expected an input with a feature dimension, got a 0-d tensor.")
    return 0 if x.dim() == 1 else FEATURE_DIM


def _check_divisible(module_name: str, num_features: int, group_size: int, shape: Sequence[int]) -> None:
    if num_features % group_size != 0:
        raise NetworkError(
            f"{module_name}: feature count {num_features} (input shape {tuple(shape)}) is not divisible by "
            f"group size {group_size}; use a layer width that is a multiple of {group_size}."
        )


class GroupSort(nn.Module):
    """Sort consecutive groups of features in ascending order.

    Parameters
    ----------
    group_size : int or None
        Number of consecutive features per group (at least 1). ``None`` means FullSort: the whole feature
        dimension is one group, whatever its size.

    Attributes
    ----------
    group_size : int or None
        As given. Use :meth:`effective_group_size` to resolve ``None`` for a given width.

    Notes
    -----
    The map is 1-Lipschitz in the Euclidean norm, preserves the sum of each group and the norm of the input,
    and is not slope-restricted (see ``theory/qc.py``). Inputs follow the module-level layout convention:
    features on dim 1 (dim 0 for a 1-D input), all other dimensions batched. Gradients flow through the sort
    (the output is a permutation of the input, chosen per sample).

    Examples
    --------
    >>> import torch
    >>> GroupSort(3)(torch.tensor([[2.0, 0.0, 1.0, 5.0, 4.0, 3.0]]))
    tensor([[0., 1., 2., 3., 4., 5.]])
    """

    group_size: int | None

    def __init__(self, group_size: int | None) -> None:
        super().__init__()
        if group_size is not None:
            # bool is an int subclass; GroupSort(True) is almost certainly a mistake, not group size 1.
            if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
                raise NetworkError(
                    f"{type(self).__name__}: group_size must be a positive int or None (FullSort), "
                    f"got {group_size!r}."
                )
            if group_size < 1:
                raise NetworkError(f"{type(self).__name__}: group_size must be at least 1, got {group_size}.")
            group_size = int(group_size)
        self.group_size = group_size

    def effective_group_size(self, num_features: int) -> int:
        """Group size for a layer of ``num_features`` features (resolves FullSort to ``num_features``).

        Raises
        ------
        lipbound.errors.NetworkError
            If ``num_features`` is not a multiple of the group size.
        """
        if self.group_size is None:
            return int(num_features)
        _check_divisible(self._name(), num_features, self.group_size, (num_features,))
        return self.group_size

    def num_groups_for(self, num_features: int) -> int:
        """Number of groups in a layer of ``num_features`` features."""
        return int(num_features) // self.effective_group_size(num_features)

    def _name(self) -> str:
        return f"{type(self).__name__}(group_size={self.group_size})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sort each group of ``x`` along the feature dimension (ascending)."""
        dim = _feature_dim(self._name(), x)
        num_features = x.shape[dim]
        if self.group_size is None:
            return torch.sort(x, dim=dim).values
        _check_divisible(self._name(), num_features, self.group_size, x.shape)
        grouped = x.unflatten(dim, (num_features // self.group_size, self.group_size))
        return torch.sort(grouped, dim=dim + 1).values.flatten(dim, dim + 1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class MaxMin(GroupSort):
    """GroupSort with groups of two: each adjacent pair ``(a, b)`` becomes ``(min(a, b), max(a, b))``.

    This is Anil et al.'s MaxMin, not deel-torchlip's ``MaxMin`` (which is CReLU and doubles the channels).

    Examples
    --------
    >>> import torch
    >>> MaxMin()(torch.tensor([5.0, -1.0]))
    tensor([-1.,  5.])
    """

    def __init__(self) -> None:
        super().__init__(2)

    def _name(self) -> str:
        return "MaxMin()"

    def extra_repr(self) -> str:
        return ""


class Householder(nn.Module):
    """Householder activation: per group, ``z`` if ``v^T z > 0`` else the reflection ``(I - 2 v v^T) z``.

    Parameters
    ----------
    v : array_like
        Either one vector of length ``g`` shared by all groups, or a ``(num_groups, g)`` array with one vector
        per group. Each vector is normalised to unit Euclidean length (in float64).
    num_features : int, optional
        Width of the layer. Only needed to give :attr:`vectors` its full ``(num_groups, g)`` shape when a
        single shared vector is passed; when given, inputs of another width are rejected.

    Attributes
    ----------
    group_size : int
        ``g``, the length of each vector.
    vectors : numpy.ndarray
        Unit vectors, float64, shape ``(num_groups, g)``; shape ``(1, g)`` if one shared vector was given
        without ``num_features`` (then :meth:`group_vectors` gives the full array for a given width).
    shared : bool
        True if one vector serves every group of any (divisible) width.
    num_groups : int or None
        Number of groups if fixed by ``v`` or ``num_features``, else None.

    Raises
    ------
    lipbound.errors.NetworkError
        (a ValueError) if a vector is zero or not finite, the array has the wrong rank, or ``num_features``
        is not a multiple of ``g`` or disagrees with the number of vectors.

    Notes
    -----
    The map is continuous (on ``v^T z = 0`` both branches agree), 1-Lipschitz, norm preserving, and preserves
    the component orthogonal to ``v``: ``(I - v v^T) sigma(z) = (I - v v^T) z``; ``theory/qc.py`` proves these
    symbolically. Layout: features on dim 1 (dim 0 for a 1-D input), consecutive groups, other dims batched.
    The vectors are stored as a float64 buffer and cast to the input's dtype at each call.

    Examples
    --------
    >>> import torch
    >>> act = Householder([[1.0, 0.0], [0.0, 2.0]])
    >>> act.vectors
    array([[1., 0.],
           [0., 1.]])
    >>> act(torch.tensor([[-3.0, 4.0, 1.0, -1.0]]))
    tensor([[3., 4., 1., 1.]])
    """

    v: torch.Tensor

    def __init__(self, v: np.ndarray | torch.Tensor | Sequence, num_features: int | None = None) -> None:
        super().__init__()
        if isinstance(v, torch.Tensor):
            array = v.detach().to("cpu", torch.float64).numpy()
        else:
            array = np.asarray(v, dtype=np.float64)
        if array.ndim == 1:
            array = array[None, :]
            self.shared = True
        elif array.ndim == 2:
            self.shared = False
        else:
            raise NetworkError(
                "Householder: v must have shape (group_size,) or (num_groups, group_size), "
                f"got {array.shape}."
            )
        if array.shape[1] == 0 or array.shape[0] == 0:
            raise NetworkError(f"Householder: v must be non-empty, got shape {array.shape}.")
        if not np.all(np.isfinite(array)):
            raise NetworkError("Householder: v contains NaN or inf.")
        norms = np.linalg.norm(array, axis=1)
        zero_rows = np.flatnonzero(norms == 0.0)
        if zero_rows.size:
            raise NetworkError(
                f"Householder: v must be nonzero (it defines the reflection I - 2vv^T / |v|^2); "
                f"zero vector for group(s) {zero_rows.tolist()}."
            )
        array = array / norms[:, None]
        self.group_size = int(array.shape[1])
        self.num_features = None if num_features is None else int(num_features)
        if self.num_features is not None:
            self._check_width(self.num_features, (self.num_features,))
            if self.shared:
                array = np.repeat(array, self.num_features // self.group_size, axis=0)
                self.shared = False
        self.register_buffer("v", torch.from_numpy(array.copy()))

    @property
    def vectors(self) -> np.ndarray:
        """Unit vectors, float64 numpy array of shape ``(num_groups, group_size)`` (see class docstring)."""
        array = self.v.detach().to("cpu", torch.float64).numpy().copy()
        # Renormalise so the reported vectors are unit to float64 rounding even if the module was cast to
        # a lower precision (``module.half()``); forward then uses the cast vectors, a rounding-level
        # difference.
        return array / np.linalg.norm(array, axis=1, keepdims=True)

    @property
    def num_groups(self) -> int | None:
        """Number of groups if known from the constructor, else None (one vector shared by any width)."""
        return None if self.shared else int(self.v.shape[0])

    def num_groups_for(self, num_features: int) -> int:
        """Number of groups in a layer of ``num_features`` features (checks the width)."""
        self._check_width(num_features, (num_features,))
        return int(num_features) // self.group_size

    def group_vectors(self, num_features: int) -> np.ndarray:
        """Unit vectors for a layer of ``num_features`` features, shape ``(num_features // g, g)``."""
        self._check_width(num_features, (num_features,))
        vectors = self.vectors
        if self.shared:
            return np.repeat(vectors, num_features // self.group_size, axis=0)
        return vectors

    def _name(self) -> str:
        groups = "shared" if self.shared else f"num_groups={self.v.shape[0]}"
        return f"Householder(group_size={self.group_size}, {groups})"

    def _check_width(self, num_features: int, shape: Sequence[int]) -> None:
        _check_divisible(self._name(), num_features, self.group_size, shape)
        if not self.shared and num_features != self.v.shape[0] * self.group_size:
            raise NetworkError(
                f"{self._name()}: feature count {num_features} (input shape {tuple(shape)}) does not match "
                f"{self.v.shape[0]} groups of group size {self.group_size} "
                f"(= {self.v.shape[0] * self.group_size} features)."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the per-group conditional reflection along the feature dimension."""
        dim = _feature_dim(self._name(), x)
        num_features = x.shape[dim]
        self._check_width(num_features, x.shape)
        num_groups = num_features // self.group_size
        grouped = x.unflatten(dim, (num_groups, self.group_size))
        # Shape the (groups, g) vectors to broadcast against (*batch, groups, g, *trailing).
        trailing = grouped.dim() - dim - 2
        v = self.v.to(device=x.device, dtype=x.dtype).reshape(self.v.shape + (1,) * trailing)
        projection = (grouped * v).sum(dim=dim + 1, keepdim=True)
        reflected = grouped - 2.0 * projection * v
        return torch.where(projection > 0, grouped, reflected).flatten(dim, dim + 1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_groups={self.num_groups}"
