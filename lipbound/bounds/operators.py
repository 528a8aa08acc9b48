"""Rigorous products with linear operators in torch (float64): the rounding model of the bound analysis.

Every bound of :mod:`lipbound.bounds` holds for the *exact* real network on every input of the domain, although
all arithmetic is float64:

* Matrix and convolution products (torch, any summation order, FMA or not) are widened by Higham's bound
  ``|fl(sum a_i x_i) - sum a_i x_i| <= gamma_n sum |a_i x_i|``: we use ``3 (n + 4) u >= 2 gamma_{n+4}``
  (:func:`rel`) times a computed magnitude (``u = 2^-53``), plus ``(n + 8)`` times the smallest normal number
  for underflow, also under flush-to-zero (:func:`abs_term`). ``n`` is the most terms one entry sums: the
  row length of a dense matrix, the most non-zeros of a sparse row or column, ``C_in / groups`` times the
  kernel size of a convolution.
* Scalar operations are rounded outward (:func:`~lipbound.rigorous.outward_up` /
  :func:`~lipbound.rigorous.outward_down`: one ulp plus the smallest normal number).
* Convolutions run with cuDNN disabled (:func:`exact_products`): its Winograd and FFT algorithms are not sums
  of the products, the native im2col + GEMM paths are.

:class:`LinearOperator` wraps a graph operator (:class:`~lipbound.graph.LinearMap` dense or sparse,
:class:`~lipbound.graph.Conv`) with the products the analysis needs: ``A x``, ``|A| x``, ``E x`` (``E`` the
entrywise error bound of inexact coefficients), ``lam A`` (the backward pass) and exact rows. A convolution stays
a convolution: ``|A| x`` convolves with ``|W|``, ``lam A`` is the transposed convolution; no dense matrix is
formed.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from lipbound.errors import FormulationError
from lipbound.graph import Conv, LinearMap
from lipbound.rigorous import TINY
from lipbound.rigorous import outward_down as _dn
from lipbound.rigorous import outward_up as _up

U = 2.0**-53  # unit roundoff
F64 = torch.float64


def rel(n: int) -> float:
    """``3 (n + 4) u``: at least twice Higham's ``gamma_{n+4}`` (covers the rounding of the bound itself)."""
    k = (n + 4) * U
    if k > 1e-3:
        raise FormulationError(f"dimension {n} is too large for the rounding-error analysis of the bounds.")
    return 3.0 * k


def abs_term(n: int, magnitude: torch.Tensor | float = 0.0) -> torch.Tensor | float:
    """Underflow allowance of ``n``-term dot products whose factors are bounded by ``magnitude``."""
    return (n + 8) * TINY * (2.0 + magnitude)


def nan_to(x: torch.Tensor, value: float) -> torch.Tensor:
    """Replace NaN (from ``inf - inf`` or ``0 * inf``: an unknown quantity) by the sound default ``value``."""
    return torch.where(torch.isnan(x), torch.full_like(x, value), x)


def mv(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product ``a (..., m, n) @ x (..., n) -> (..., m)``."""
    return (a @ x.unsqueeze(-1)).squeeze(-1)


@contextlib.contextmanager
def exact_products() -> Iterator[None]:
    """Run convolutions through the native sum-of-products kernels: cuDNN off (see the module docstring; oneDNN
    has no float64 convolutions, so the CPU always takes the native path)."""
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=False, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=cudnn.allow_tf32):
        yield


# ----------------------------------------------------------------------------------------------
# Dense building blocks: centre/radius form, enclosures of affine maps over boxes
# ----------------------------------------------------------------------------------------------


def center_radius(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Floats ``c``, ``r`` with ``[lo, hi]`` contained in ``[c - r, c + r]`` (exactly)."""
    fin = torch.isfinite(lo) & torch.isfinite(hi)
    c = torch.where(fin, 0.5 * lo + 0.5 * hi, torch.zeros_like(lo))  # any float works as a centre
    r = _up(torch.maximum(hi - c, c - lo))  # fl(hi - c) is rounded to nearest: one step up encloses it
    return c, torch.where(fin, r, torch.full_like(r, math.inf))


def center_terms(a: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t = fl(a c + d)`` and ``err >= |t - (a c + d)|`` (exact), ``a`` dense (..., m, n)."""
    n = a.shape[-1]
    t = mv(a, c) + d
    mag = mv(a.abs(), c.abs()) + d.abs()
    err = _up(_up(rel(n + 1) * mag) + abs_term(n))
    return t, nan_to(err, math.inf)


def bound_sum(t: torch.Tensor, spread: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outward-rounded ``t -+ spread -+ err`` (lower, upper), NaN mapped to -inf/+inf."""
    lo = _dn(_dn(t - spread) - err)
    hi = _up(_up(t + spread) + err)
    return nan_to(lo, -math.inf), nan_to(hi, math.inf)


def box_spread(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A float >= ``|a| r`` (exact), i.e. >= max of ``a (x - c)`` over ``|x - c| <= r``; ``a`` dense."""
    n = a.shape[-1]
    q = mv(a.abs(), r)
    return nan_to(_up(_up(q * (1.0 + rel(n))) + abs_term(n)), math.inf)


def inflate(q: torch.Tensor, n: int, magnitude: torch.Tensor | float = 0.0) -> torch.Tensor:
    """A float >= the exact value of a non-negative ``n``-term sum of products computed as ``q``."""
    return nan_to(_up(_up(q * (1.0 + rel(n))) + abs_term(n, magnitude)), math.inf)


def affine_box(w: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               w_err: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigorous bounds of ``M x + b`` over ``x`` in ``[lo, hi]`` for every real ``M`` with ``|M - w| <= w_err``."""
    c, r = center_radius(lo, hi)
    t, err = center_terms(w, b, c)
    spread = box_spread(w, r)
    if w_err is not None:
        xmax = torch.maximum(lo.abs(), hi.abs())
        spread = _up(spread + box_spread(w_err, xmax))
    return bound_sum(t, spread, err)


# ----------------------------------------------------------------------------------------------
# Graph linear operators
# ----------------------------------------------------------------------------------------------


def _torch_matrix(m, device: torch.device) -> torch.Tensor:
    """A dense or sparse (COO, coalesced) float64 tensor of a numpy or scipy matrix."""
    if sp.issparse(m):
        coo = sp.coo_matrix(m)
        idx = torch.tensor(np.vstack([coo.row, coo.col]), dtype=torch.long, device=device)
        vals = torch.tensor(coo.data, dtype=F64, device=device)
        return torch.sparse_coo_tensor(idx, vals, coo.shape, check_invariants=False).coalesce()
    return torch.tensor(np.asarray(m), dtype=F64, device=device)


def _apply(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m x`` for a dense or sparse matrix ``m`` and a vector ``x``."""
    if m.is_sparse:
        return torch.sparse.mm(m, x.unsqueeze(-1)).squeeze(-1)
    return mv(m, x)


class LinearOperator(ABC):
    """A linear graph operator ``x -> A x + b`` with ``|A_exact - A| <= E`` and ``|b_exact - b| <= e_b``.

    Attributes: ``in_dim``, ``out_dim``, ``fwd_terms`` (most terms of an entry of ``A x``), ``bwd_terms`` (of
    ``lam A``), ``bias``, ``bias_err`` (tensor or ``None``), ``inexact`` (``E`` or ``e_b`` present).
    """

    in_dim: int
    out_dim: int
    fwd_terms: int
    bwd_terms: int
    bias: torch.Tensor
    bias_err: torch.Tensor | None
    inexact: bool

    @abstractmethod
    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``fl(A x)`` for a vector ``x``."""

    @abstractmethod
    def abs_matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``fl(|A| x)`` for a vector ``x``."""

    @abstractmethod
    def err_matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``fl(E x)`` for a vector ``x`` (zeros when ``A`` is exact)."""

    @abstractmethod
    def sq_row_sums(self) -> torch.Tensor:
        """``fl(sum_j A_ij^2)`` per row."""

    @abstractmethod
    def abs_row_sums(self) -> torch.Tensor:
        """``fl(sum_j |A_ij|)`` per row."""

    @abstractmethod
    def rmatmat(self, lam: torch.Tensor) -> torch.Tensor:
        """``fl(lam A)`` for a dense ``lam`` of shape (k, out_dim)."""

    @abstractmethod
    def rows(self, start: int, stop: int) -> torch.Tensor:
        """The rows ``A[start:stop]`` as a dense tensor, exactly."""


class DenseOperator(LinearOperator):
    def __init__(self, op: LinearMap, device: torch.device):
        self.w = torch.tensor(op.dense(), dtype=F64, device=device)
        self.w_abs = self.w.abs()
        self.err = None if op.err is None else _torch_matrix(op.err, device)
        self.out_dim, self.in_dim = self.w.shape
        self.fwd_terms, self.bwd_terms = self.in_dim, self.out_dim
        self.bias = torch.tensor(op.bias, dtype=F64, device=device)
        self.bias_err = None if op.bias_err is None else torch.tensor(op.bias_err, dtype=F64, device=device)
        self.inexact = self.err is not None or self.bias_err is not None

    def matvec(self, x):
        return mv(self.w, x)

    def abs_matvec(self, x):
        return mv(self.w_abs, x)

    def err_matvec(self, x):
        return torch.zeros(self.out_dim, dtype=F64, device=x.device) if self.err is None else _apply(self.err, x)

    def sq_row_sums(self):
        return (self.w * self.w).sum(-1)

    def abs_row_sums(self):
        return self.w_abs.sum(-1)

    def rmatmat(self, lam):
        return lam @ self.w

    def rows(self, start, stop):
        return self.w[start:stop]


class SparseOperator(LinearOperator):
    def __init__(self, op: LinearMap, device: torch.device):
        a = op.sparse()
        self.csr = a
        self.a = _torch_matrix(a, device)
        self.at = _torch_matrix(a.T.tocsr(), device)
        self.a_abs = _torch_matrix(abs(a), device)
        self.a_sq = _torch_matrix(a.multiply(a), device)
        self.err = None if op.err is None else _torch_matrix(op.err, device)
        self.out_dim, self.in_dim = a.shape
        self.fwd_terms = int(np.max(np.diff(a.indptr), initial=0))
        self.bwd_terms = int(np.max(np.bincount(a.indices, minlength=a.shape[1]), initial=0))
        self.bias = torch.tensor(op.bias, dtype=F64, device=device)
        self.bias_err = None if op.bias_err is None else torch.tensor(op.bias_err, dtype=F64, device=device)
        self.inexact = self.err is not None or self.bias_err is not None

    def matvec(self, x):
        return _apply(self.a, x)

    def abs_matvec(self, x):
        return _apply(self.a_abs, x)

    def err_matvec(self, x):
        return torch.zeros(self.out_dim, dtype=F64, device=x.device) if self.err is None else _apply(self.err, x)

    def sq_row_sums(self):
        return _apply(self.a_sq, torch.ones(self.in_dim, dtype=F64, device=self.bias.device))

    def abs_row_sums(self):
        return _apply(self.a_abs, torch.ones(self.in_dim, dtype=F64, device=self.bias.device))

    def rmatmat(self, lam):
        return torch.sparse.mm(self.at, lam.T).T

    def rows(self, start, stop):
        return torch.tensor(self.csr[start:stop].toarray(), dtype=F64, device=self.bias.device)


class ConvOperator(LinearOperator):
    """A convolution as an operator on flat vectors; products are (transposed) convolutions."""

    def __init__(self, op: Conv, device: torch.device):
        self.op = op
        self.w = torch.tensor(op.weight, dtype=F64, device=device)
        self.w_abs = self.w.abs()
        self.w_sq = self.w * self.w
        self.err = None if op.weight_err is None else torch.tensor(op.weight_err, dtype=F64, device=device)
        self.in_dim, self.out_dim = op.in_dim, op.out_dim
        kernel = int(np.prod(op.weight.shape[2:]))
        self.fwd_terms = op.weight.shape[1] * kernel
        self.bwd_terms = op.weight.shape[0] // op.groups * kernel
        positions = int(np.prod(op.out_shape[1:]))
        self.bias = torch.tensor(np.repeat(op.bias, positions), dtype=F64, device=device)
        self.bias_err = None
        self.inexact = self.err is not None

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        op = self.op
        fn = F.conv1d if op.spatial_dims == 1 else F.conv2d
        batch = x.reshape(-1, *op.in_shape)
        return fn(batch, weight, None, op.stride, op.padding, op.dilation, op.groups).reshape(x.shape[:-1] + (-1,))

    def matvec(self, x):
        return self._conv(x, self.w)

    def abs_matvec(self, x):
        return self._conv(x, self.w_abs)

    def err_matvec(self, x):
        return torch.zeros(self.out_dim, dtype=F64, device=x.device) if self.err is None else self._conv(x, self.err)

    def sq_row_sums(self):
        return self._conv(torch.ones(self.in_dim, dtype=F64, device=self.w.device), self.w_sq)

    def abs_row_sums(self):
        return self._conv(torch.ones(self.in_dim, dtype=F64, device=self.w.device), self.w_abs)

    def rmatmat(self, lam):
        op = self.op
        k = lam.shape[0]
        grad = torch.nn.grad.conv1d_input if op.spatial_dims == 1 else torch.nn.grad.conv2d_input
        out = grad((k, *op.in_shape), self.w, lam.reshape(k, *op.out_shape), op.stride, op.padding, op.dilation,
                   op.groups)
        return out.reshape(k, -1)

    def rows(self, start, stop):
        # Each entry of (one-hot rows) A is one product with 1.0 plus exact zeros: the transposed convolution of
        # unit vectors is exact.
        dev = self.w.device
        eye = torch.zeros(stop - start, self.out_dim, dtype=F64, device=dev)
        eye[torch.arange(stop - start, device=dev), torch.arange(start, stop, device=dev)] = 1.0
        return self.rmatmat(eye)


def linear_operator(op: LinearMap | Conv, device: torch.device) -> LinearOperator:
    """The :class:`LinearOperator` of a graph operator on ``device``."""
    if isinstance(op, Conv):
        return ConvOperator(op, device)
    if sp.issparse(op.matrix):
        return SparseOperator(op, device)
    return DenseOperator(op, device)


def operator_box(a: LinearOperator, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigorous bounds of ``A x + b`` over ``x`` in ``[lo, hi]`` for every ``A``, ``b`` within the error bounds."""
    n = a.fwd_terms
    c, r = center_radius(lo, hi)
    t = a.matvec(c) + a.bias
    err = _up(_up(rel(n + 1) * (a.abs_matvec(c.abs()) + a.bias.abs())) + abs_term(n))
    spread = inflate(a.abs_matvec(r), n)
    return bound_sum(t, inexact_spread(a, spread, torch.maximum(lo.abs(), hi.abs())), nan_to(err, math.inf))


def inexact_spread(a: LinearOperator, spread: torch.Tensor, xmax: torch.Tensor) -> torch.Tensor:
    """``spread`` plus a bound of ``|(A_exact - A) x| + |b_exact - b|`` for ``|x| <= xmax``."""
    if not a.inexact:
        return spread
    extra = inflate(a.err_matvec(xmax), a.in_dim)  # E need not share A's sparsity pattern
    if a.bias_err is not None:
        extra = _up(extra + a.bias_err)
    return _up(spread + extra)
