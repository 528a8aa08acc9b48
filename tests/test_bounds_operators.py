"""Tests of :mod:`lipbound.bounds.operators` and of the domains' operator bounds: the products of the graph's
linear operators (dense, sparse, convolutions) agree with their dense matrices, exact rows are exact, and the
rigorous enclosures contain the exact ranges (rational arithmetic, no tolerance) at every magnitude."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lipbound.bounds import Ball, Box
from lipbound.bounds.operators import ConvOperator, DenseOperator, SparseOperator, linear_operator, operator_box
from lipbound.graph import Conv, LinearMap
from lipbound.rigorous import next_down, next_up, outward_down, outward_up

CPU = torch.device("cpu")
SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
CONVS = {
    "plain": dict(shape=(2, 5, 5), kernel=(3, 2, 3, 3)),
    "stride_pad": dict(shape=(2, 6, 5), kernel=(3, 2, 3, 3), stride=2, padding=1),
    "dilated": dict(shape=(1, 7, 7), kernel=(2, 1, 3, 3), dilation=2, padding=2),
    "groups": dict(shape=(4, 4, 4), kernel=(6, 2, 2, 2), groups=2, padding=1),
    "depthwise": dict(shape=(3, 5, 5), kernel=(3, 1, 3, 3), groups=3),
    "rect_kernel": dict(shape=(1, 5, 6), kernel=(2, 1, 2, 3), stride=(1, 2)),
    "1d": dict(shape=(2, 9), kernel=(3, 2, 3), stride=2, padding=1),
}


def make_conv(name: str, rng: np.random.Generator, scale: float = 1.0, inexact: bool = False) -> Conv:
    cfg = dict(CONVS[name])
    shape, kernel = cfg.pop("shape"), cfg.pop("kernel")
    w = rng.standard_normal(kernel) * scale
    return Conv(w, rng.standard_normal(kernel[0]) * scale, shape, stride=cfg.get("stride", 1),
                padding=cfg.get("padding", 0), dilation=cfg.get("dilation", 1), groups=cfg.get("groups", 1),
                weight_err=np.abs(w) * 1e-3 if inexact else None)


def _operators(rng: np.random.Generator, scale: float = 1.0):
    """(name, graph operator, dense matrix, dense error matrix or None, bias error or None)."""
    out = []
    for name in CONVS:
        conv = make_conv(name, rng, scale, inexact=name == "plain")
        err = conv.matrix_err()
        out.append((f"conv_{name}", conv, conv.matrix().toarray(), None if err is None else err.toarray(), None))
    dense = rng.standard_normal((4, 6)) * scale
    out.append(("dense", LinearMap(dense, rng.standard_normal(4) * scale), dense, None, None))
    derr = np.abs(dense) * 1e-4
    out.append(("dense_inexact", LinearMap(dense, rng.standard_normal(4) * scale, derr, np.full(4, 1e-3)), dense, derr,
                np.full(4, 1e-3)))
    m = sp.random(7, 9, density=0.35, random_state=int(rng.integers(1 << 30)), format="csr") * scale
    merr = abs(m) * 1e-3
    out.append(("sparse", LinearMap(m, rng.standard_normal(7) * scale, merr, np.full(7, 1e-6)), m.toarray(),
                merr.toarray(), np.full(7, 1e-6)))
    return out


# ------------------------------------------------------------------------------------------------
# Products agree with the dense matrices; rows are exact
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONVS))
def test_convolution_rows_are_the_exact_matrix_rows(name):
    conv = make_conv(name, np.random.default_rng(0), scale=np.pi)
    a = ConvOperator(conv, CPU)
    exact = conv.matrix().toarray()
    for start, stop in ((0, a.out_dim), (1, 4), (a.out_dim - 2, a.out_dim)):
        np.testing.assert_array_equal(a.rows(start, stop).numpy(), exact[start:stop])


@pytest.mark.parametrize("seed", range(3))
def test_products_agree_with_dense_matrices(seed):
    rng = np.random.default_rng(seed)
    for name, op, mat, err, _ in _operators(rng):
        a = linear_operator(op, CPU)
        assert (a.out_dim, a.in_dim) == mat.shape, name
        assert isinstance(a, ConvOperator if name.startswith("conv") else SparseOperator if name == "sparse"
                          else DenseOperator)
        x = torch.from_numpy(rng.standard_normal(a.in_dim))
        lam = torch.from_numpy(rng.standard_normal((3, a.out_dim)))
        checks = [(a.matvec(x), mat @ x.numpy()), (a.abs_matvec(x), np.abs(mat) @ x.numpy()),
                  (a.rmatmat(lam), lam.numpy() @ mat), (a.sq_row_sums(), (mat * mat).sum(1)),
                  (a.abs_row_sums(), np.abs(mat).sum(1)),
                  (a.err_matvec(x), (np.zeros_like(mat) if err is None else err) @ x.numpy())]
        for got, want in checks:
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12, err_msg=name)
        nnz = mat != 0
        assert a.fwd_terms >= nnz.sum(1).max() and a.bwd_terms >= nnz.sum(0).max(), name


# ------------------------------------------------------------------------------------------------
# Rigorous enclosures contain the exact ranges
# ------------------------------------------------------------------------------------------------


def _exact_range(mat: np.ndarray, err: np.ndarray | None, bias: np.ndarray, bias_err: np.ndarray | None,
                 lo: np.ndarray, hi: np.ndarray) -> list[tuple[Fraction, Fraction]]:
    """Exact min and max of ``M x + c`` over ``x`` in the box, ``|M - mat| <= err``, ``|c - bias| <= bias_err``."""
    out = []
    for i in range(mat.shape[0]):
        vmin = vmax = Fraction(float(bias[i]))
        if bias_err is not None:
            vmin, vmax = vmin - Fraction(float(bias_err[i])), vmax + Fraction(float(bias_err[i]))
        for j in range(mat.shape[1]):
            a, e = Fraction(float(mat[i, j])), Fraction(0 if err is None else float(err[i, j]))
            if a == 0 and e == 0:
                continue
            corners = [m * Fraction(float(x)) for m in (a - e, a + e) for x in (lo[j], hi[j])]
            vmin, vmax = vmin + min(corners), vmax + max(corners)
        out.append((vmin, vmax))
    return out


@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-300, 1e-150, 1e-5, 1.0, 1e5, 1e150]),
       width=st.sampled_from([0.0, 1e-9, 0.3, 3.0]))
@settings(max_examples=25, **SETTINGS)
def test_operator_boxes_contain_the_exact_range(seed, scale, width):
    rng = np.random.default_rng(seed)
    for name, op, mat, err, bias_err in _operators(rng, scale):
        a = linear_operator(op, CPU)
        center = rng.uniform(-1, 1, a.in_dim) * (scale if rng.random() < 0.5 else 1.0)
        lo, hi = center - width * rng.random(a.in_dim), center + width * rng.random(a.in_dim)
        blo, bhi = operator_box(a, torch.from_numpy(lo), torch.from_numpy(hi))
        bias = a.bias.numpy()
        for i, (vmin, vmax) in enumerate(_exact_range(mat, err, bias, bias_err, lo, hi)):
            assert Fraction(float(blo[i])) <= vmin and vmax <= Fraction(float(bhi[i])), (name, i)


@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["box", "l2", "linf"]),
       radius=st.sampled_from([0.0, 1e-8, 0.7, 30.0]))
@settings(max_examples=25, **SETTINGS)
def test_domain_operator_bounds_contain_the_exact_range(seed, kind, radius):
    """The first operator is concretised over the domain itself: the exact range is ``A c + b -+ r ||A_i||_*``
    (balls) widened by the error bounds over the enclosing box."""
    rng = np.random.default_rng(seed)
    for name, op, mat, err, bias_err in _operators(rng, float(10.0 ** rng.integers(-3, 4))):
        a = linear_operator(op, CPU)
        c = rng.uniform(-5, 5, a.in_dim)
        domain = Box(c - radius, c + radius) if kind == "box" else Ball(c, radius, norm=kind)
        lo, hi = domain.concretizer(CPU).operator_bounds(a)
        bias = a.bias.numpy()
        if kind == "box":
            exact = _exact_range(mat, err, bias, bias_err, domain.lower, domain.upper)
            for i, (vmin, vmax) in enumerate(exact):
                assert Fraction(float(lo[i])) <= vmin and vmax <= Fraction(float(hi[i])), (name, i)
            continue
        box_lo, box_hi = domain.enclosing_box()
        with mpmath.workdps(60):
            for i in range(mat.shape[0]):
                row = [mpmath.mpf(float(v)) for v in mat[i]]
                center = mpmath.fsum(r * mpmath.mpf(float(x)) for r, x in zip(row, c, strict=True))
                center += mpmath.mpf(float(bias[i]))
                if kind == "l2":
                    dual = mpmath.sqrt(mpmath.fsum(r * r for r in row))
                else:
                    dual = mpmath.fsum(abs(r) for r in row)
                extra = mpmath.mpf(0)
                if err is not None:
                    xmax = np.maximum(np.abs(box_lo), np.abs(box_hi))
                    extra = mpmath.fsum(mpmath.mpf(float(e)) * mpmath.mpf(float(x)) for e, x in zip(err[i], xmax,
                                                                                                 strict=True))
                if bias_err is not None:
                    extra += mpmath.mpf(float(bias_err[i]))
                spread = mpmath.mpf(radius) * dual + extra
                assert mpmath.mpf(float(lo[i])) <= center - spread and center + spread <= mpmath.mpf(float(hi[i]))
                magnitude = np.abs(mat[i]) @ (np.abs(c) + 2 * radius) + abs(bias[i])
                assert float(hi[i] - lo[i]) <= float(2 * spread) * (1 + 1e-12) + 1e-12 * magnitude + 1e-300


def test_directed_rounding_is_shared_by_numpy_and_torch():
    x = np.array([1.0, -2.5, 0.0, 5e-324])
    t = torch.from_numpy(x)
    for f in (next_up, next_down, outward_up, outward_down):
        np.testing.assert_array_equal(f(t).numpy(), f(x))
    assert np.all(next_up(x) > x) and np.all(next_down(x) < x)
    assert np.all(outward_up(x) >= next_up(x)) and np.all(outward_down(x) <= next_down(x))
    assert outward_up(np.float64(0.0)) >= 2.0**-1022  # covers an underflow flushed to zero
