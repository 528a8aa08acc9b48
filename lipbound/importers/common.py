"""Pieces shared by the graph translators (:mod:`.aten` for torch.export programs, :mod:`.onnx` for ONNX models).

Each piece is exact, or comes with a rigorous bound where an exact coefficient is not a floating-point number:

* :func:`selection` -- the matrix of a pure data-movement function (reshape, transpose, slice, pad, concat, ...),
  found by running the function on tensors of indices;
* :func:`linear_map_of` -- the matrix of a linear function whose coefficients are integers or reciprocals of
  integers (average pooling, means), found by evaluating it on basis vectors, with the rounding bound of each
  ``fl(1/d)``;
* :func:`pool_windows` -- the input indices of every max-pooling window (max pooling is then "copy the windows,
  GroupSort each, keep the last entry");
* :func:`batchnorm_affine` -- batch normalisation (eval) as a per-channel scale and shift with rounding bounds;
* :func:`reciprocal_err`, :func:`reciprocal_float`, :func:`exact_float` -- rounding bounds of ``1/d`` and of exact
  rationals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import scipy.sparse as sp
import torch

U = 2.0**-53  # unit roundoff of float64


@dataclass(frozen=True)
class NodeValue:
    """An input-dependent tensor: the flat value of graph node ``node``, viewed with logical ``shape`` (the shape
    of one sample, without the batch dimension)."""

    node: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


class Unrepresentable(Exception):
    """An operation the IR cannot represent exactly; translators collect these and report them all at once."""


def size_of(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def expand(v, n: int) -> tuple[int, ...]:
    """An int or a sequence of ints as an ``n``-tuple (a single value repeated)."""
    v = [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
    return tuple(v * n) if len(v) == 1 else tuple(v)


def reciprocal_err(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """For entries that are ``fl(1/d)`` (``d`` a positive integer) or exact, an entrywise bound on the distance to
    ``1/d``; the flag says whether every entry was recognised."""
    err = np.zeros_like(values)
    ok = True
    for v in np.unique(values):
        if v == 0 or float(v).is_integer():
            continue
        d = round(1.0 / float(v))
        if d <= 0 or 1.0 / d != float(v):
            ok = False
            continue
        e = abs(Fraction(float(v)) - Fraction(1, d))
        if e:
            err[values == v] = math.nextafter(float(e), math.inf)
    return err, ok


def exact_float(value: Fraction) -> tuple[float, float]:
    """The float nearest to the rational ``value`` and a bound on its distance to ``value`` (0 when exact)."""
    f = float(value)
    if not math.isfinite(f):
        raise Unrepresentable(f"constant {value} overflows")
    e = abs(Fraction(f) - value)
    return f, (math.nextafter(float(e), math.inf) if e else 0.0)


def reciprocal_float(c: float) -> tuple[float, float]:
    """``fl(1/c)`` and a bound on its distance to ``1/c`` (division by a constant as a multiplication)."""
    if c == 0 or not math.isfinite(c):
        raise Unrepresentable(f"division by {c}")
    return exact_float(1 / Fraction(c))


def selection(operands: Sequence, fn: Callable, batch: int = 2) -> tuple[tuple[int, ...], sp.csr_matrix, np.ndarray]:
    """The pure data-movement function ``fn`` as a selection.

    ``operands`` are :class:`NodeValue` (input-dependent) or constant tensors; ``fn`` takes them as torch tensors
    with a leading batch dimension of size ``batch`` (constants as given). The result is ``(out_shape, S, c)``:
    one sample of ``fn``'s output is ``S @ v + c``, where ``v`` concatenates the flat input-dependent operands and
    ``S`` has one 1 in each row that comes from an input (rows of constants are empty).

    ``fn`` runs twice on float64 tensors of distinct indices (shifted between the runs): entries that shift are
    selected inputs, entries that do not are constants. Anything else (arithmetic, mixing samples of the batch,
    depending on the sample) raises :class:`Unrepresentable`.
    """
    offsets, total = [], 0
    for t in operands:
        if isinstance(t, NodeValue):
            offsets.append(total)
            total += t.size
    if not total:
        raise Unrepresentable("no input-dependent operand")
    base = float(2 * total + 8)

    def ids(shift: float):
        out, k = [], 0
        for t in operands:
            if isinstance(t, NodeValue):
                vals = torch.arange(t.size, dtype=torch.float64) + 1 + offsets[k] + shift
                vals = torch.stack([vals + j * base for j in range(batch)])
                out.append(vals.reshape(batch, *t.shape))
                k += 1
            else:
                out.append(torch.as_tensor(t, dtype=torch.float64))
        return out

    with torch.no_grad():
        first = fn(*ids(0.0))
        second = fn(*ids(4 * base))
    if not isinstance(first, torch.Tensor) or first.dim() == 0 or first.shape[0] != batch:
        raise Unrepresentable("data movement across the batch dimension")
    out_shape = tuple(int(s) for s in first.shape[1:])
    f = first.reshape(batch, -1).numpy()
    s = second.reshape(batch, -1).numpy()
    moved = s != f  # entries that come from an input (they shift with the ids); the rest are constants
    if not all(np.array_equal(moved[0], moved[j]) for j in range(1, batch)):
        raise Unrepresentable("data movement that depends on the sample")
    m = moved[0]
    if np.any(m & ((s[0] - f[0]) != 4 * base)):
        raise Unrepresentable("data movement that is not a selection")
    if any(np.any(m & ((f[j] - f[0]) != j * base)) for j in range(1, batch)):
        raise Unrepresentable("data movement across the batch dimension")
    if any(not np.array_equal(f[j][~m], f[0][~m]) for j in range(1, batch)):
        raise Unrepresentable("a constant that varies over the batch")
    src = np.where(m, f[0] - 1, -1)
    if np.any(m & ((src < 0) | (src >= total) | (src != np.round(src)))):
        raise Unrepresentable("data movement that is not a selection")
    const = np.where(m, 0.0, f[0])
    src = src.astype(np.int64)
    rows = np.flatnonzero(m)
    matrix = sp.csr_matrix((np.ones(rows.size), (rows, src[rows])), shape=(src.size, total))
    return out_shape, matrix, const


def is_identity_selection(matrix: sp.csr_matrix, const: np.ndarray) -> bool:
    """Whether a selection from :func:`selection` keeps every input in place (a pure view)."""
    n_out, total = matrix.shape
    return (n_out == total and matrix.nnz == total and not np.any(const)
            and np.array_equal(matrix.indices, np.arange(total)) and np.array_equal(matrix.indptr,
                                                                                    np.arange(total + 1)))


def basis_matrix(fn: Callable, in_shape: tuple[int, ...]) -> tuple[sp.csr_matrix, tuple[int, ...]]:
    """The matrix of the linear function ``fn`` (torch, batched, float64), found by evaluating it on the basis
    vectors in chunks; returns ``(matrix, out_shape)``. Entries are what ``fn`` computes for one-hot inputs: exact
    where each output is a single coefficient times one input."""
    n = size_of(in_shape)
    cols, rows, vals = [], [], []
    out_shape = None
    step = max(1, (1 << 22) // max(n, 1))
    with torch.no_grad():
        for start in range(0, n, step):
            k = min(step, n - start)
            basis = torch.zeros(k, n, dtype=torch.float64)
            basis[torch.arange(k), torch.arange(start, start + k)] = 1.0
            out = fn(basis.reshape(k, *in_shape))
            if out.dim() == 0 or out.shape[0] != k:
                raise Unrepresentable("the operation mixes the samples of the batch")
            out_shape = tuple(int(s) for s in out.shape[1:])
            out = out.reshape(k, -1)
            j, i = torch.nonzero(out, as_tuple=True)
            rows.append(i.numpy())
            cols.append((j + start).numpy())
            vals.append(out[j, i].numpy())
    matrix = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(size_of(out_shape), n))
    return matrix, out_shape


def linear_map_of(fn: Callable, in_shape: tuple[int, ...], kind: str
                  ) -> tuple[sp.csr_matrix, sp.csr_matrix | None, tuple[int, ...]]:
    """The matrix of a linear function with integer or reciprocal-integer coefficients (average pooling, means)
    (:func:`basis_matrix`); ``1/d`` entries get their rounding bound. Returns ``(matrix, err or None, out_shape)``."""
    mat, out_shape = basis_matrix(fn, in_shape)
    err, ok = reciprocal_err(mat.data)
    if not ok:
        raise Unrepresentable(f"{kind} with coefficients that are not reciprocals of integers")
    err_mat = sp.csr_matrix((err, mat.indices.copy(), mat.indptr.copy()), shape=mat.shape) if np.any(err) else None
    return mat, err_mat, out_shape


def pool_windows(in_shape, out_shape, k, stride, pad, dil) -> np.ndarray:
    """Flat input indices of each max-pooling window (rows: flat outputs); ``pad`` is the padding before each
    spatial dimension. Windows clipped at the border are filled up by repeating one of their entries (a repeated
    entry does not change a maximum)."""
    channels = in_shape[0]
    spatial_in, spatial_out = in_shape[1:], out_shape[1:]
    nd = len(spatial_in)
    grids = np.meshgrid(*[np.arange(s) for s in spatial_out], indexing="ij")
    offs = np.meshgrid(*[np.arange(kk) for kk in k], indexing="ij")
    pos = []
    valid = np.ones((int(np.prod(spatial_out)), int(np.prod(k))), dtype=bool)
    for i in range(nd):
        p = grids[i].reshape(-1, 1) * stride[i] - pad[i] + offs[i].reshape(1, -1) * dil[i]
        valid &= (p >= 0) & (p < spatial_in[i])
        pos.append(np.clip(p, 0, spatial_in[i] - 1))
    if not np.all(valid.any(axis=1)):
        raise Unrepresentable("a max-pooling window lies entirely in the padding")
    flat = np.zeros_like(pos[0])
    for i in range(nd):
        flat = flat * spatial_in[i] + pos[i]
    first_valid = np.argmax(valid, axis=1)
    fill = flat[np.arange(flat.shape[0]), first_valid]
    flat = np.where(valid, flat, fill[:, None])
    per_channel = int(np.prod(spatial_in))
    rows = [flat + c * per_channel for c in range(channels)]
    return np.concatenate(rows, axis=0)


def batchnorm_affine(weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batch normalisation (eval) ``weight * (x - mean) / sqrt(var + eps) + bias`` as ``scale * x + shift`` per
    channel, with bounds on the distance of the computed ``scale`` and ``shift`` to the exact ones.

    Returns ``(scale, shift, scale_err, shift_err)``.
    """
    denom = np.sqrt(var + float(eps))
    scale = weight / denom
    shift = bias - mean * scale
    # Three correctly rounded operations (add, sqrt, divide): relative error below 3u (1+u)^3; 4u is safe.
    scale_err = 4 * U * np.abs(scale) + np.finfo(float).tiny
    shift_err = np.abs(mean) * scale_err + 2 * U * (np.abs(bias) + np.abs(mean * scale)) + np.finfo(float).tiny
    return scale, shift, scale_err, shift_err
