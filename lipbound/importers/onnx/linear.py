"""Linear operators of the ONNX translator: matrix products, convolutions, pooling by averages, batch
normalisation, reductions by sums and means, and sums and constant factors (a mixin of
:class:`~lipbound.importers.onnx.translator.OnnxTranslator`)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import scipy.sparse as sp
import torch

from lipbound.graph import Conv, Sum
from lipbound.importers.common import (
    NodeValue,
    U,
    Unrepresentable,
    basis_matrix,
    batchnorm_affine,
    linear_map_of,
    reciprocal_err,
    reciprocal_float,
    size_of,
)
from lipbound.importers.onnx.patterns import Expression


class LinearOps:
    """Exact linear operators; coefficients that are not floats (``1/d``, BatchNorm's scale) carry bounds."""

    def _matrix_map(self, x: NodeValue, w: np.ndarray, name: str, bias=None, bias_err=None) -> NodeValue:
        """``x @ w.T`` on the last dimension of ``x`` (``w`` is (out, in)), plus ``bias`` (flat, optional)."""
        if x.shape[-1] != w.shape[1]:
            raise Unrepresentable(f"matrix of shape {w.T.shape} applied to a tensor of shape {x.shape}")
        lead = size_of(x.shape[:-1])
        out_shape = x.shape[:-1] + (w.shape[0],)
        mat = w if lead == 1 else sp.kron(sp.identity(lead, format="csr"), sp.csr_matrix(w), format="csr")
        return self._linear(x, mat, bias, name, out_shape, bias_err=bias_err)

    def _op_Gemm(self, label, args, attrs, node):
        a, b = args[0], args[1]
        c = args[2] if len(args) > 2 else None
        if not isinstance(a, NodeValue) or isinstance(b, NodeValue):
            if isinstance(a, NodeValue) and isinstance(b, NodeValue):
                self.hints.add("attention")
                raise Unrepresentable("product of two input-dependent tensors")
            raise Unrepresentable("the input-dependent operand must be A (the left one)")
        if attrs.get("transA", 0):
            raise Unrepresentable("transA=1 would mix the samples of the batch")
        if len(a.shape) != 1:
            raise Unrepresentable(f"A of shape {self._full(a)} (Gemm takes matrices)")
        w = self._const(b, "B").astype(np.float64)
        w = w if attrs.get("transB", 0) else w.T  # (out, in)
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        bias = bias_err = None
        if c is not None:
            cc = self._const(c, "C").astype(np.float64)
            try:
                cc = np.broadcast_to(cc, (self.batch, w.shape[0]) if cc.ndim == 2 else (w.shape[0],))
            except ValueError:
                raise Unrepresentable(f"C of shape {cc.shape} for an output of {w.shape[0]} features") from None
            if cc.ndim == 2:
                if not np.all(cc == cc[:1]):
                    raise Unrepresentable(f"C of shape {c.shape} varies over the batch")
                cc = cc[0]
            bias = beta * cc
            if beta != 1 and not _power_of_two(beta):
                bias_err = 2 * U * np.abs(bias) + np.finfo(float).tiny
        if alpha == 1 or (_power_of_two(alpha) and np.all(np.isfinite(alpha * w))
                          and np.array_equal(alpha * w / alpha, w)):
            return self._matrix_map(a, alpha * w, label, bias, bias_err)
        h = self._matrix_map(a, w, label)
        h = self._scale(h, alpha, label + "_alpha")
        return h if bias is None else self._bias(h, bias, label + "_bias", bias_err)

    def _op_MatMul(self, label, args, attrs, node):
        x, w = args
        if isinstance(x, NodeValue) and isinstance(w, NodeValue):
            self.hints.add("attention")
            raise Unrepresentable("product of two input-dependent tensors")
        rank = len(x.shape if isinstance(x, NodeValue) else w.shape) + 1
        const = self._const(w if isinstance(x, NodeValue) else x, "the constant factor")
        # Dimensions before the last two broadcast; one aligned with the batch must be 1, none may precede it.
        if const.ndim > 2 and const.ndim >= rank and (const.ndim > rank or const.shape[0] != 1):
            raise Unrepresentable(f"constant factor of shape {const.shape} varies over the batch")
        if isinstance(x, NodeValue):
            w = const.astype(np.float64)
            if w.ndim == 2:
                return self._matrix_map(x, w.T, label)
            if w.ndim == 1:
                h = self._matrix_map(x, w.reshape(1, -1), label)
                return NodeValue(h.node, h.shape[:-1])

            def fn(t):
                return torch.from_numpy(np.matmul(t.numpy(), w))
        else:
            a = const.astype(np.float64)
            x = w
            if len(x.shape) < 2:
                raise Unrepresentable("a constant matrix times the input would mix the samples of the batch")

            def fn(t):
                return torch.from_numpy(np.matmul(a, t.numpy()))
        return self._evaluated_linear(x, fn, label, "linear")

    def _evaluated_linear(self, x: NodeValue, fn, label: str, kind: str) -> NodeValue:
        """A linear map whose matrix entries are single constants (products with one-hot vectors are exact)."""
        mat, out_shape = basis_matrix(fn, x.shape)
        return self._linear(x, mat, None, label, out_shape, kind=kind)

    def _op_Conv(self, label, args, attrs, node):
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else None
        if not isinstance(x, NodeValue) or isinstance(w, NodeValue) or isinstance(b, NodeValue):
            raise Unrepresentable("input-dependent convolution kernel")
        w = self._const(w, "the kernel").astype(np.float64)
        nd = w.ndim - 2
        if nd not in (1, 2):
            raise Unrepresentable(f"{nd}-D convolution (only 1-D and 2-D)")
        if len(x.shape) != nd + 1:
            raise Unrepresentable(f"{nd}-D convolution of a tensor of shape {self._full(x)}")
        kernel = tuple(w.shape[2:])
        stride = tuple(attrs.get("strides", [1] * nd))
        dil = tuple(attrs.get("dilations", [1] * nd))
        begin, end = _pads(attrs, x.shape[1:], kernel, stride, dil)
        x = self._pad_asymmetric(x, begin, end, label)
        padding = tuple(min(p, q) for p, q in zip(begin, end, strict=True))
        bias = None if b is None else self._const(b, "the bias").astype(np.float64)
        op = Conv(w, bias, x.shape, stride, padding, dil, int(attrs.get("group", 1)))
        return self._add(op, [x], label, op.out_shape)

    def _pad_asymmetric(self, x: NodeValue, begin, end, label: str) -> NodeValue:
        """Zero-pad the difference between ``end`` and ``begin`` explicitly, so the rest is symmetric."""
        if tuple(begin) == tuple(end):
            return x
        extra = []
        for p, q in reversed(list(zip(begin, end, strict=True))):  # F.pad lists the last dimension first
            extra += [max(p - q, 0), max(q - p, 0)]
        return self._gather([x], lambda t: torch.nn.functional.pad(t, extra), label + "_pad")

    def _op_BatchNormalization(self, label, args, attrs, node):
        if attrs.get("training_mode", 0):
            raise Unrepresentable("training mode (certify the model exported in eval mode)")
        if self._uses_extra_outputs(node):
            raise Unrepresentable("running statistics outputs are used (training mode)")
        x = args[0]
        if not isinstance(x, NodeValue) or any(isinstance(a, NodeValue) for a in args[1:]):
            raise Unrepresentable("input-dependent statistics")
        w, bb, mu, var = (self._const(a, what).astype(np.float64) for a, what in
                          zip(args[1:5], ("scale", "B", "mean", "var"), strict=True))
        scale, shift, scale_err, shift_err = batchnorm_affine(w, bb, mu, var, float(attrs.get("epsilon", 1e-5)))
        spatial = size_of(x.shape[1:])
        if scale.shape != (x.shape[0],):
            raise Unrepresentable(f"{scale.shape[0]} statistics for {x.shape[0]} channels")
        mat = sp.diags(np.repeat(scale, spatial), format="csr")
        err = sp.diags(np.repeat(scale_err, spatial), format="csr")
        return self._linear(x, mat, np.repeat(shift, spatial), label, x.shape, err=err, kind="batchnorm",
                            bias_err=np.repeat(shift_err, spatial))

    def _pool_geometry(self, x: NodeValue, attrs):
        nd = len(x.shape) - 1
        if nd not in (1, 2):
            raise Unrepresentable(f"pooling of a tensor of shape {self._full(x)} (only 1-D and 2-D)")
        kernel = tuple(attrs["kernel_shape"])
        stride = tuple(attrs.get("strides", [1] * nd))
        dil = tuple(attrs.get("dilations", [1] * nd))
        begin, end = _pads(attrs, x.shape[1:], kernel, stride, dil)
        out = []
        for i in range(nd):
            span = dil[i] * (kernel[i] - 1) + 1
            room = x.shape[1 + i] + begin[i] + end[i] - span
            if room < 0:
                raise Unrepresentable(f"kernel {kernel} larger than the padded input {x.shape}")
            if attrs.get("ceil_mode", 0):
                o = -(-room // stride[i]) + 1
                if (o - 1) * stride[i] >= x.shape[1 + i] + begin[i]:
                    o -= 1
            else:
                o = room // stride[i] + 1
            out.append(o)
        return kernel, stride, dil, begin, end, (x.shape[0],) + tuple(out)

    def _op_AveragePool(self, label, args, attrs, node):
        x = args[0]
        kernel, stride, dil, begin, end, out_shape = self._pool_geometry(x, attrs)
        include_pad = bool(attrs.get("count_include_pad", 0))
        patterns, divisors = [], []
        for i in range(len(kernel)):
            n_in, n_out = x.shape[1 + i], out_shape[1 + i]
            pos = np.arange(n_out)[:, None] * stride[i] - begin[i] + np.arange(kernel[i])[None, :] * dil[i]
            valid = (pos >= 0) & (pos < n_in)
            inside = (pos >= -begin[i]) & (pos < n_in + end[i])
            rows = np.repeat(np.arange(n_out), kernel[i])[valid.reshape(-1)]
            patterns.append(sp.csr_matrix((np.ones(rows.size), (rows, pos[valid])), shape=(n_out, n_in)))
            divisors.append((inside if include_pad else valid).sum(axis=1))
        pattern, divisor = sp.identity(x.shape[0], format="csr"), np.ones(x.shape[0], dtype=np.int64)
        for p, d in zip(patterns, divisors, strict=True):
            pattern = sp.kron(pattern, p, format="csr")
            divisor = np.kron(divisor, d)
        return self._average(x, pattern, divisor, label, out_shape, "avgpool")

    def _average(self, x: NodeValue, pattern: sp.csr_matrix, divisor: np.ndarray, label: str, out_shape, kind: str
                 ) -> NodeValue:
        """Rows of ``pattern`` (0/1) divided by ``divisor``: ``fl(1/d)`` coefficients with their rounding bound."""
        if np.any(divisor <= 0):
            raise Unrepresentable("a pooling window lies entirely in the padding")
        recip = 1.0 / divisor.astype(np.float64)
        pattern = pattern.tocsr()
        row_of = np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))
        vals = recip[row_of]
        err, _ = reciprocal_err(vals)
        mat = sp.csr_matrix((vals, pattern.indices, pattern.indptr), shape=pattern.shape)
        err_mat = sp.csr_matrix((err, pattern.indices, pattern.indptr), shape=pattern.shape) if np.any(err) else None
        return self._linear(x, mat, None, label, out_shape, err=err_mat, kind=kind)

    def _op_GlobalAveragePool(self, label, args, attrs, node):
        x = args[0]
        if len(x.shape) < 2:
            raise Unrepresentable(f"global pooling of a tensor of shape {self._full(x)}")
        c, spatial = x.shape[0], size_of(x.shape[1:])
        pattern = sp.kron(sp.identity(c, format="csr"), sp.csr_matrix(np.ones((1, spatial))), format="csr")
        return self._average(x, pattern, np.full(c, spatial), label, (c,) + (1,) * (len(x.shape) - 1), "avgpool")

    def _reduce_axes(self, x: NodeValue, args, attrs) -> tuple[int, ...] | None:
        """Reduced axes of one sample (0-based after the batch); ``None``: the operator is the identity."""
        axes = attrs.get("axes")
        if len(args) > 1 and args[1] is not None:
            axes = self._const(args[1], "the axes").reshape(-1).tolist()
        rank = len(x.shape) + 1
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return None
            raise Unrepresentable("reduction over every axis, the batch included")
        axes = sorted({int(a) % rank for a in axes})
        if 0 in axes:
            raise Unrepresentable("reduction over the batch dimension")
        return tuple(a - 1 for a in axes)

    def _op_ReduceSum(self, label, args, attrs, node, mean: bool = False):
        x = args[0]
        axes = self._reduce_axes(x, args, attrs)
        if axes is None:
            return x
        keep = bool(attrs.get("keepdims", 1))
        dims = [a + 1 for a in axes]

        def fn(t):
            return t.mean(dim=dims, keepdim=keep) if mean else t.sum(dim=dims, keepdim=keep)
        mat, err, out_shape = linear_map_of(fn, x.shape, "mean" if mean else "sum")
        return self._linear(x, mat, None, label, out_shape, err=err, kind="mean" if mean else "sum")

    def _op_ReduceMean(self, label, args, attrs, node):
        return self._op_ReduceSum(label, args, attrs, node, mean=True)

    def _op_Add(self, label, args, attrs, node, sign: float = 1.0):
        x, y = args
        if isinstance(x, Expression) or isinstance(y, Expression):
            return self._expr_binary("add", x, y if sign > 0 else self._expr_neg(y), label)
        if isinstance(x, NodeValue) and isinstance(y, NodeValue):
            x, y = self._pair(x, y, label)
            return self._add(Sum((1.0, sign)), [x, y], label, x.shape)
        if isinstance(x, NodeValue):
            x, c = self._against_constant(x, self._const(y, "the offset").astype(np.float64), label)
            return self._bias(x, sign * c, label)
        y, c = self._against_constant(y, self._const(x, "the offset").astype(np.float64), label)
        if sign < 0:
            y = self._scale(y, -1.0, label + "_neg", exact=Fraction(-1))
        return self._bias(y, c, label)

    def _op_Sub(self, label, args, attrs, node):
        return self._op_Add(label, args, attrs, node, sign=-1.0)

    def _op_Neg(self, label, args, attrs, node):
        x = args[0]
        if isinstance(x, Expression):
            return self._expr_neg(x)
        return self._scale(x, -1.0, label, exact=Fraction(-1))

    def _op_Sum(self, label, args, attrs, node, mean: bool = False):
        deps = [a for a in args if isinstance(a, NodeValue)]
        consts = [self._const(a, "an operand").astype(np.float64) for a in args if not isinstance(a, NodeValue)]
        n = len(args)
        coef, err = (1.0, 0.0) if not mean else reciprocal_float(float(n))
        target = tuple(int(s) for s in np.broadcast_shapes(*[self._full(d) for d in deps]))
        deps = [self._broadcast_to(d, target, f"{label}_{i}") for i, d in enumerate(deps)]
        out = self._add(Sum((coef,) * len(deps), (err,) * len(deps)), deps, label, deps[0].shape) \
            if len(deps) > 1 or coef != 1 else deps[0]
        if consts:
            parts = np.broadcast_arrays(*consts)
            total = np.sum(parts, axis=0) * coef
            out, c = self._against_constant(out, total, label)
            _, size = self._against_constant(out, np.sum(np.abs(parts), axis=0), label)
            out = self._bias(out, c, label + "_const", (n + 2) * U * size + np.finfo(float).tiny)
        return out

    def _op_Mean(self, label, args, attrs, node):
        return self._op_Sum(label, args, attrs, node, mean=True)

    def _op_Mul(self, label, args, attrs, node):
        x, y = args
        if isinstance(x, Expression) or isinstance(y, Expression):
            return self._expr_binary("mul", x, y, label)
        if isinstance(x, NodeValue) and isinstance(y, NodeValue):
            return self._product(x, y, label, node)
        if not isinstance(x, NodeValue):
            x, y = y, x
        return self._multiply(x, self._const(y, "the factor").astype(np.float64), label)

    def _op_Div(self, label, args, attrs, node):
        x, y = args
        if isinstance(y, (NodeValue, Expression)):
            raise Unrepresentable("division by an input-dependent tensor")
        c = self._const(y, "the divisor").astype(np.float64)
        if isinstance(x, Expression):
            if c.size != 1:
                raise Unrepresentable("division of an element-wise expression by a tensor")
            return self._expr_binary("mul", x, ("const", 1 / Fraction(float(c.reshape(-1)[0]))), label)
        return self._multiply(x, c, label, divide=True)

    def _multiply(self, x: NodeValue, c: np.ndarray, label: str, divide: bool = False) -> NodeValue:
        """``x * c`` (or ``x / c``) with a constant ``c``."""
        if c.size == 1 and c.ndim <= len(self._full(x)):
            v = float(c.reshape(-1)[0])
            if not math.isfinite(v):
                raise Unrepresentable(f"factor {v}")
            if divide:
                q, err = reciprocal_float(v)
                return self._scale(x, q, label, err, exact=1 / Fraction(v))
            return self._scale(x, v, label, exact=Fraction(v))
        x, vals = self._against_constant(x, c, label)
        err = None
        if divide:
            if np.any(vals == 0):
                raise Unrepresentable("division by zero")
            pairs = [reciprocal_float(float(v)) for v in vals]
            vals = np.array([p[0] for p in pairs])
            err = np.array([p[1] for p in pairs])
            err = sp.diags(err, format="csr") if np.any(err) else None
        return self._linear(x, sp.diags(vals, format="csr"), None, label, x.shape, err=err, kind="scale")


def _power_of_two(c: float) -> bool:
    if c == 0 or not math.isfinite(c):
        return False
    m, _ = math.frexp(abs(c))
    return m == 0.5


def _pads(attrs, spatial, kernel, stride, dil) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Padding before and after each spatial dimension (``pads`` or ``auto_pad``)."""
    nd = len(spatial)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0] * 2 * nd))
        return tuple(pads[:nd]), tuple(pads[nd:])
    if auto == "VALID":
        return (0,) * nd, (0,) * nd
    begin, end = [], []
    for i in range(nd):
        out = -(-spatial[i] // stride[i])
        total = max(0, (out - 1) * stride[i] + dil[i] * (kernel[i] - 1) + 1 - spatial[i])
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return tuple(begin), tuple(end)

