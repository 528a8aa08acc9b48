"""Nonlinear operators of the ONNX translator: element-wise activations, maxima and minima (GroupSort between
selections: ``Max``, ``Min``, ``MaxPool``, ``ReduceMax``, ``TopK``) and ``Clip`` (a mixin of
:class:`~lipbound.importers.onnx.translator.OnnxTranslator`)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import scipy.sparse as sp
import torch

from lipbound.activations import ActivationSpec
from lipbound.importers.common import NodeValue, Unrepresentable, pool_windows, size_of
from lipbound.network import GroupSortLayer

_SIMPLE_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softplus": "softplus", "Mish": "mish"}


class NonlinearOps:
    """Activations and GroupSort-based maxima."""

    def _simple(self, label, args, attrs, node):
        return self._activation(args[0], ActivationSpec(_SIMPLE_ACTIVATIONS[node.op_type]), label)

    _op_Relu = _op_Sigmoid = _op_Tanh = _op_Softplus = _op_Mish = _simple

    def _op_LeakyRelu(self, label, args, attrs, node):
        return self._activation(args[0], ActivationSpec("leaky_relu", {"negative_slope": float(attrs.get("alpha",
                                                                                                       0.01))}), label)

    def _op_Elu(self, label, args, attrs, node):
        return self._activation(args[0], ActivationSpec("elu", {"alpha": float(attrs.get("alpha", 1.0))}), label)

    def _op_Gelu(self, label, args, attrs, node):
        approximate = attrs.get("approximate", "none")
        if approximate == "none":
            return self._activation(args[0], ActivationSpec("gelu"), label)
        if approximate == "tanh":
            return self._activation(args[0], ActivationSpec("gelu_tanh"), label)
        raise Unrepresentable(f"GELU approximate={approximate!r}")

    def _op_PRelu(self, label, args, attrs, node):
        slope = self._const(args[1], "the slope")
        if slope.size == 0 or not np.all(slope == slope.reshape(-1)[0]):
            raise Unrepresentable("per-channel slopes (only a single slope, i.e. LeakyReLU)")
        x, _ = self._against_constant(args[0], slope.astype(np.float64), label)
        return self._activation(x, ActivationSpec("leaky_relu", {"negative_slope": float(slope.reshape(-1)[0])}),
                                label)

    def _op_Clip(self, label, args, attrs, node):
        x = args[0]
        lo = None if len(args) < 2 or args[1] is None else self._const(args[1], "min").astype(np.float64)
        hi = None if len(args) < 3 or args[2] is None else self._const(args[2], "max").astype(np.float64)
        if lo is not None and not (lo.size == 1 and float(lo.reshape(-1)[0]) == -math.inf):
            x = self._max_constant(x, lo, label + "_min")
        if hi is not None and not (hi.size == 1 and float(hi.reshape(-1)[0]) == math.inf):
            x = self._min_constant(x, hi, label + "_max")
        return x

    def _max_constant(self, x: NodeValue, c: np.ndarray, label: str) -> NodeValue:
        """``max(x, c) = relu(x - c) + c`` (exact)."""
        x, cv = self._against_constant(x, c, label)
        if not np.all(np.isfinite(cv)):
            raise Unrepresentable("an infinite bound in only some entries")
        if not np.any(cv):
            return self._activation(x, ActivationSpec("relu"), label)
        h = self._bias(x, -cv, label + "_shift")
        h = self._activation(h, ActivationSpec("relu"), label)
        return self._bias(h, cv, label + "_unshift")

    def _min_constant(self, x: NodeValue, c: np.ndarray, label: str) -> NodeValue:
        """``min(x, c) = c - relu(c - x)`` (exact)."""
        x, cv = self._against_constant(x, c, label)
        if not np.all(np.isfinite(cv)):
            raise Unrepresentable("an infinite bound in only some entries")
        h = self._scale(x, -1.0, label + "_neg", exact=Fraction(-1))
        h = self._bias(h, cv, label + "_shift") if np.any(cv) else h
        h = self._activation(h, ActivationSpec("relu"), label)
        h = self._scale(h, -1.0, label + "_neg2", exact=Fraction(-1))
        return self._bias(h, cv, label + "_unshift") if np.any(cv) else h

    def _sort_last(self, x: NodeValue, label: str) -> NodeValue:
        """GroupSort (ascending) along the last logical dimension; one node per tensor, however many maxima,
        minima and TopKs read it (deel-torchlip's GroupSort2 is a ReduceMin and a ReduceMax of the same pairs)."""
        key = ("sort", x.node, x.shape)
        if key not in self.shared:
            self.shared[key] = self._add(GroupSortLayer(x.size, x.shape[-1], name=label), [x], label, x.shape)
        return self.shared[key]

    def _extreme_last(self, x: NodeValue, label: str, largest: bool, keep_shape) -> NodeValue:
        """Max (or min) over the last logical dimension, with output shape ``keep_shape``."""
        g = x.shape[-1]
        if g == 1:
            return NodeValue(x.node, keep_shape)
        s = self._sort_last(x, label)
        n = x.size // g
        pick = sp.csr_matrix((np.ones(n), (np.arange(n), np.arange(n) * g + (g - 1 if largest else 0))),
                             shape=(n, x.size))
        return self._linear(s, pick, None, label + "_select", keep_shape, kind="maxpool_select" if largest else
                            "minpool_select")

    def _op_Max(self, label, args, attrs, node, largest: bool = True):
        deps = [a for a in args if isinstance(a, NodeValue)]
        consts = [self._const(a, "an operand").astype(np.float64) for a in args if not isinstance(a, NodeValue)]
        out = deps[0]
        if len(deps) > 1:
            target = tuple(int(s) for s in np.broadcast_shapes(*[self._full(d) for d in deps]))
            deps = [self._broadcast_to(d, target, f"{label}_{i}") for i, d in enumerate(deps)]
            stacked = self._gather(deps, lambda *ts: torch.stack(ts, dim=-1), label + "_stack")
            out = self._extreme_last(stacked, label, largest, target[1:])
        if consts:
            c = consts[0]
            for d in consts[1:]:
                c = np.maximum(c, d) if largest else np.minimum(c, d)
            out = self._max_constant(out, c, label) if largest else self._min_constant(out, c, label)
        return out

    def _op_Min(self, label, args, attrs, node):
        return self._op_Max(label, args, attrs, node, largest=False)

    def _op_MaxPool(self, label, args, attrs, node):
        if self._uses_extra_outputs(node):
            raise Unrepresentable("the Indices output is used (argmax positions are not Lipschitz)")
        x = args[0]
        kernel, stride, dil, begin, end, out_shape = self._pool_geometry(x, attrs)
        windows = pool_windows(x.shape, out_shape, kernel, stride, begin, dil)
        return [self._window_max(x, windows, label, out_shape), None]

    def _window_max(self, x: NodeValue, windows: np.ndarray, label: str, out_shape) -> NodeValue:
        """Max over each row of ``windows`` (flat input indices): copy the windows, GroupSort, keep the last."""
        n_out, w = windows.shape
        if w == 1:
            mat = sp.csr_matrix((np.ones(n_out), (np.arange(n_out), windows[:, 0])), shape=(n_out, x.size))
            return self._linear(x, mat, None, label, out_shape, kind="gather")
        rows = np.arange(n_out * w)
        copy = sp.csr_matrix((np.ones(rows.size), (rows, windows.reshape(-1))), shape=(rows.size, x.size))
        copied = self._linear(x, copy, None, label + "_windows", (n_out, w), kind="maxpool_windows")
        return self._extreme_last(copied, label, True, out_shape)

    def _op_GlobalMaxPool(self, label, args, attrs, node):
        x = args[0]
        if len(x.shape) < 2:
            raise Unrepresentable(f"global pooling of a tensor of shape {self._full(x)}")
        c, spatial = x.shape[0], size_of(x.shape[1:])
        windows = np.arange(c * spatial).reshape(c, spatial)
        return self._window_max(x, windows, label, (c,) + (1,) * (len(x.shape) - 1))

    def _op_ReduceMax(self, label, args, attrs, node, largest: bool = True):
        x = args[0]
        axes = self._reduce_axes(x, args, attrs)
        if axes is None:
            return x
        keep = [i for i in range(len(x.shape)) if i not in axes]
        key = ("reduce", x.node, x.shape, axes)
        if key not in self.shared:
            self.shared[key] = self._gather([x], lambda t: t.permute(0, *[i + 1 for i in keep],
                                                                     *[a + 1 for a in axes]).reshape(
                t.shape[0], *[x.shape[i] for i in keep], -1), label + "_move")
        moved = self.shared[key]
        if attrs.get("keepdims", 1):
            shape = tuple(1 if i in axes else x.shape[i] for i in range(len(x.shape)))
        else:
            shape = tuple(x.shape[i] for i in keep)
        return self._extreme_last(moved, label, largest, shape)

    def _op_ReduceMin(self, label, args, attrs, node):
        return self._op_ReduceMax(label, args, attrs, node, largest=False)

    def _op_TopK(self, label, args, attrs, node):
        if self._uses_extra_outputs(node):
            raise Unrepresentable("the Indices output is used (argmax positions are not Lipschitz)")
        x = args[0]
        k = int(self._const(args[1], "K").reshape(-1)[0])
        axis = int(attrs.get("axis", -1)) % (len(x.shape) + 1)
        if axis == 0:
            raise Unrepresentable("TopK over the batch dimension")
        largest = bool(attrs.get("largest", 1))
        if not attrs.get("sorted", 1) and k > 1:
            raise Unrepresentable("TopK with sorted=0 (the order of the values is unspecified)")
        moved = self._gather([x], lambda t: torch.movedim(t, axis, -1).contiguous(), label + "_move")
        s = self._sort_last(moved, label)
        g = moved.shape[-1]

        def pick(t):
            top = t[..., g - k:].flip(-1) if largest else t[..., :k]
            return torch.movedim(top, -1, axis).contiguous()
        return [self._gather([s], pick, label + "_select"), None]

