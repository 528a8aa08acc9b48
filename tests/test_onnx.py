"""ONNX import: every mapped operator against onnxruntime (or onnx's reference evaluator where onnxruntime has no
float64 kernel) and torch, both torch exporters, hand-built graphs for attributes torch does not emit, refusals,
files (external data, corrupt files) and certification through ``lipbound.load`` and the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipbound
from lipbound import NetworkError, UnsupportedLayerError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lipbound.importers.onnx import from_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Fn(nn.Module):
    """A module computing ``fn(self, x)`` with the given submodules (functional code in ``forward``)."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for key, module in modules.items():
            setattr(self, key, module)

    def forward(self, x):
        return self.fn(self, x)


def _bn(c, dims=2):
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def _lin(i, o):
    return nn.Linear(i, o)


# name -> (module factory, sample shape)
CASES = {
    "gemm_relu": (lambda: nn.Sequential(_lin(5, 4), nn.ReLU(), _lin(4, 3)), (5,)),
    "matmul_3d": (lambda: Fn(lambda s, x: s.l(x).flatten(1), l=_lin(3, 2)), (4, 3)),
    "leaky_relu": (lambda: nn.Sequential(_lin(4, 4), nn.LeakyReLU(0.25), _lin(4, 2)), (4,)),
    "sigmoid_tanh": (lambda: nn.Sequential(_lin(4, 4), nn.Sigmoid(), _lin(4, 4), nn.Tanh(), _lin(4, 2)), (4,)),
    "elu": (lambda: nn.Sequential(_lin(4, 4), nn.ELU(0.5), _lin(4, 2)), (4,)),
    "softplus": (lambda: nn.Sequential(_lin(4, 4), nn.Softplus(beta=2.0, threshold=60), _lin(4, 2)), (4,)),
    "gelu": (lambda: nn.Sequential(_lin(4, 4), nn.GELU(), _lin(4, 2)), (4,)),
    "silu_mish": (lambda: nn.Sequential(_lin(4, 4), nn.SiLU(), _lin(4, 4), nn.Mish(), _lin(4, 2)), (4,)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                     _lin(12, 2)), (2, 8)),
    "conv2d_groups_dilation": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
                                                     nn.Tanh(), nn.Conv2d(4, 2, 1, stride=2), nn.Flatten()),
                               (4, 5, 5)),
    "conv2d_same_even": (lambda: nn.Sequential(nn.Conv2d(1, 2, 4, padding="same"), nn.Flatten()), (1, 5, 5)),
    "avgpool": (lambda: nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
                                      nn.AvgPool2d(2, ceil_mode=True), nn.Flatten()), (2, 7, 7)),
    "avgpool_include_pad_1d": (lambda: nn.Sequential(nn.AvgPool1d(3, stride=2, padding=1), nn.Flatten()), (2, 9)),
    "adaptive_avgpool": (lambda: Fn(lambda s, x: torch.cat([F.adaptive_avg_pool2d(x, 1).flatten(1),
                                                          F.adaptive_avg_pool2d(x, 2).flatten(1)], 1)), (3, 4, 4)),
    "maxpool": (lambda: nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), nn.Flatten()), (2, 6, 6)),
    "maxpool1d_global": (lambda: Fn(lambda s, x: torch.cat([F.max_pool1d(x, 2).flatten(1),
                                                          F.adaptive_max_pool1d(x, 1).flatten(1)], 1)), (2, 6)),
    "batchnorm": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), _bn(3), nn.ReLU(), nn.Flatten(), _lin(12, 6),
                                        _bn(6, 1)), (2, 4, 4)),
    "movement": (lambda: Fn(lambda s, x: torch.cat([x.permute(0, 2, 1)[:, 1:3].reshape(x.shape[0], -1),
                                                    F.pad(x, (1, 2), mode="reflect").flatten(1),
                                                    x.chunk(2, dim=1)[1].unsqueeze(1).squeeze(1).flatten(1),
                                                    x.index_select(2, torch.tensor([3, 0])).flatten(1),
                                                    F.pad(x, (2, 0), value=0.5).flatten(1)], 1)), (2, 4)),
    "reductions": (lambda: Fn(lambda s, x: torch.cat([x.mean(dim=(2, 3)), x.sum(dim=1).flatten(1),
                                                      x.amax(dim=2).flatten(1),
                                                      torch.maximum(x[:, 0], x[:, 1]).flatten(1),
                                                      torch.minimum(x[:, 0], -x[:, 1]).flatten(1)], 1)), (2, 3, 3)),
    "clamp": (lambda: Fn(lambda s, x: torch.cat([x.clamp(min=0), x.clamp(-0.5, 0.25), x.clamp(max=0.125)], 1)), (5,)),
    "skip_arith": (lambda: Fn(lambda s, x: (x + torch.relu(s.a(x))) - 0.5 * s.b(x) / 3.0
                              - x * torch.tensor([1.0, -2.0, 0.5], dtype=x.dtype) + 1.0, a=_lin(3, 3),
                              b=_lin(3, 3)), (3,)),
    "topk_dropout": (lambda: Fn(lambda s, x: torch.topk(s.d(x), 2, dim=1).values, d=nn.Dropout(0.5)), (5,)),
}
# onnx's reference evaluator (used where onnxruntime has no float64 kernel) computes Erf in float32.
REFERENCE_RTOL = {"gelu": 1e-6}
# Covering many operators at once: these also run with the dynamo exporter in the fast suite.
FAST_DYNAMO = {"gemm_relu", "gelu", "batchnorm", "movement"}


def export(module: nn.Module, shape, dynamo: bool, opset: int | None = None, batch: int | None = None,
           dtype=torch.float64):
    """The ONNX model of ``module`` (dynamic batch unless ``batch``), or a skip naming what the exporter refused."""
    x = torch.randn(2 if batch is None else batch, *shape, dtype=dtype)
    kw = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            if dynamo:
                pytest.importorskip("onnxscript")
                dyn = None if batch else ({0: torch.export.Dim("batch")},)
                return torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=dyn, verbose=False,
                                         **kw).model_proto
            buffer = io.BytesIO()
            torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes=None if batch else {"x": {0: "batch"}}, **kw)
            return onnx.load_from_string(buffer.getvalue())
        except Exception as exc:  # the exporter, not lipbound, cannot handle the case
            pytest.skip(f"{'dynamo' if dynamo else 'legacy'} exporter cannot export this: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}")


def reference(model, x: np.ndarray) -> np.ndarray:
    """onnxruntime's output, or onnx's reference evaluator's where onnxruntime has no kernel (float64 Conv); one
    sample at a time for a model with a static batch of 1."""
    tensor_type = model.graph.input[0].type.tensor_type
    x = x.astype(np.float32 if tensor_type.elem_type == TensorProto.FLOAT else np.float64)
    if tensor_type.shape.dim[0].dim_value == 1 and x.shape[0] > 1:
        return np.concatenate([reference(model, x[i:i + 1]) for i in range(x.shape[0])])
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    except Exception as exc:
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(model)
    return ev.run(None, {model.graph.input[0].name: x})[0]


def assert_close(a, b, rtol: float) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64).reshape(a.shape)
    scale = max(float(np.abs(b).max()), 1e-300)
    assert float(np.abs(a - b).max()) <= rtol * scale, (float(np.abs(a - b).max()) / scale)


def _params(fast_dynamo=FAST_DYNAMO):
    out = []
    for name in CASES:
        out.append(pytest.param(name, False, id=f"{name}-legacy"))
        marks = () if name in fast_dynamo else (pytest.mark.slow,)
        out.append(pytest.param(name, True, id=f"{name}-dynamo", marks=marks))
    return out


@pytest.mark.parametrize("case, dynamo", _params())
def test_operator_matches_onnxruntime_and_torch(case, dynamo):
    factory, shape = CASES[case]
    torch.manual_seed(0)
    module = factory().double().eval()
    model = export(module, shape, dynamo)
    net = from_onnx(model)
    x = np.random.default_rng(1).standard_normal((6, *shape))
    with torch.no_grad():
        ours = net(torch.from_numpy(x).reshape(6, -1)).numpy()
        theirs = module(torch.from_numpy(x)).reshape(6, -1).numpy()
    assert_close(ours, reference(model, x).reshape(6, -1), REFERENCE_RTOL.get(case, 1e-12))
    assert_close(ours, theirs, 1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_operator_matches_onnxruntime_float32(case):
    """onnxruntime has float32 kernels for every operator (not all float64 ones): the same cases in float32, against
    onnxruntime itself, to the model's precision."""
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model = export(factory().eval(), shape, False, dtype=torch.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((6, *shape)).astype(np.float32)
    with torch.no_grad():
        ours = from_onnx(model)(torch.from_numpy(x.astype(np.float64)).reshape(6, -1)).numpy()
    assert_close(ours, session.run(None, {"x": x})[0].reshape(6, -1), 1e-5)


# -- hand-built graphs: attributes and operators torch does not emit ----------------------------------------

def graph_model(nodes, shape, inits=None, opset=17, dtype=TensorProto.DOUBLE, batch="N", name="g"):
    """A one-input, one-output model ``x -> y`` of ``nodes`` (initializers from ``inits``)."""
    np_type = np.float64 if dtype == TensorProto.DOUBLE else np.float32
    initializers = [numpy_helper.from_array(np.asarray(v, dtype=np_type) if np.asarray(v).dtype.kind == "f"
                                            else np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", dtype, [batch, *shape])],
                              [helper.make_tensor_value_info("y", dtype, None)], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = max(8, helper.find_min_ir_version_for(list(model.opset_import)))
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph.output[0]
    except Exception:  # unknown operators (the refusal tests): any output shape does
        inferred = model.graph.output[0]
    shape = inferred.type.tensor_type.shape if inferred.type.tensor_type.HasField("shape") else None
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info(
        "y", dtype, [d.dim_value or d.dim_param or None for d in shape.dim] if shape else ["N", "M"]))
    return model


def check_graph(model, shape, rtol=1e-12, **kw):
    net = from_onnx(model, **kw)
    x = np.random.default_rng(2).standard_normal((5, *shape))
    with torch.no_grad():
        ours = net(torch.from_numpy(x).reshape(5, -1)).numpy()
    assert_close(ours, reference(model, x).reshape(5, -1), rtol)
    return net


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_gemm_attributes_and_matmul_variants():
    n = helper.make_node
    nodes = [n("Gemm", ["x", "B", "C"], ["g1"], alpha=0.7, beta=2.0, transB=0),
             n("Relu", ["g1"], ["r1"]),
             n("Gemm", ["r1", "B2", "c2"], ["g2"], alpha=0.5, transB=1),
             n("Reshape", ["g2", "shape"], ["h"]),
             n("MatMul", ["h", "W"], ["m1"]),          # (N, 2, 3) @ (3, 4)
             n("MatMul", ["A", "h"], ["m2"]),          # (5, 2) @ (N, 2, 3)
             n("MatMul", ["h", "v"], ["m3"]),          # (N, 2, 3) @ (3,)
             n("Unsqueeze", ["h", "one"], ["h4"]),    # (N, 1, 2, 3)
             n("MatMul", ["h4", "Wb"], ["m4"]),        # (N, 1, 2, 3) @ (1, 3, 3, 2): per-block matrices
             n("Flatten", ["m1"], ["f1"]), n("Flatten", ["m2"], ["f2"]), n("Flatten", ["m4"], ["f4"]),
             n("Concat", ["f1", "f2", "m3", "f4"], ["y"], axis=1)]
    inits = {"B": _rand(4, 5), "C": _rand(1, 5), "B2": _rand(6, 5, seed=1), "c2": np.array(0.25),
             "shape": np.array([0, 2, 3], dtype=np.int64), "W": _rand(3, 4, seed=2), "A": _rand(5, 2, seed=3),
             "v": _rand(3, seed=4), "one": np.array([1], dtype=np.int64), "Wb": _rand(1, 3, 3, 2, seed=5)}
    check_graph(graph_model(nodes, (4,), inits), (4,))


@pytest.mark.parametrize("attrs", [dict(pads=[0, 1, 2, 1], strides=[2, 1]), dict(auto_pad="SAME_UPPER"),
                                   dict(auto_pad="SAME_LOWER", strides=[2, 2]), dict(auto_pad="VALID", group=2),
                                   dict(pads=[1, 1, 1, 1], dilations=[2, 1], group=2)],
                         ids=["asymmetric", "same_upper", "same_lower", "valid_groups", "dilated"])
def test_conv_padding_attributes(attrs):
    group = attrs.get("group", 1)
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], **attrs), helper.make_node("Flatten", ["c"], ["y"])]
    model = graph_model(nodes, (2, 5, 6), {"W": _rand(4, 2 // group, 4, 3), "b": _rand(4, seed=1)},
                        dtype=TensorProto.FLOAT)
    check_graph(model, (2, 5, 6), rtol=1e-5)


@pytest.mark.parametrize("op, attrs", [
    ("AveragePool", dict(kernel_shape=[3, 2], pads=[0, 1, 2, 0], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[2, 2], auto_pad="SAME_UPPER", strides=[2, 2])),
    ("MaxPool", dict(kernel_shape=[3, 2], pads=[0, 1, 2, 0], strides=[2, 1])),
    ("MaxPool", dict(kernel_shape=[2, 2], dilations=[2, 1], ceil_mode=1, strides=[2, 2])),
    ("MaxPool", dict(kernel_shape=[3, 3], auto_pad="SAME_LOWER", strides=[2, 2])),
], ids=["avg_asym_include", "avg_ceil", "avg_same", "max_asym", "max_dilated_ceil", "max_same"])
def test_pooling_attributes(op, attrs):
    nodes = [helper.make_node(op, ["x"], ["p"], **attrs), helper.make_node("Flatten", ["p"], ["y"])]
    check_graph(graph_model(nodes, (2, 7, 6), dtype=TensorProto.FLOAT, opset=19), (2, 7, 6), rtol=1e-6)


def test_reductions_and_global_pooling():
    n = helper.make_node
    nodes = [n("GlobalMaxPool", ["x"], ["gm"]), n("GlobalAveragePool", ["x"], ["ga"]),
             n("ReduceMax", ["x"], ["rmax"], axes=[1, 3], keepdims=0),
             n("ReduceMin", ["x"], ["rmin"], axes=[-1], keepdims=1),
             n("ReduceSum", ["x", "ax2"], ["rsum"], keepdims=0),
             n("ReduceMean", ["x"], ["rmean"], axes=[2, 3]),
             n("ReduceSum", ["x", "none"], ["same"], noop_with_empty_axes=1)]
    nodes += [n("Flatten", [o], [f"{o}_f"]) for o in ("gm", "ga", "rmax", "rmin", "rsum", "rmean", "same")]
    nodes.append(n("Concat", [f"{o}_f" for o in ("gm", "ga", "rmax", "rmin", "rsum", "rmean", "same")], ["y"],
                   axis=1))
    inits = {"ax2": np.array([2], dtype=np.int64), "none": np.array([], dtype=np.int64)}
    check_graph(graph_model(nodes, (2, 3, 4), inits), (2, 3, 4))


def test_shape_arithmetic_and_weight_normalisation_are_folded():
    """A flatten with a dynamic batch (Shape -> Gather -> Unsqueeze -> Concat -> Reshape) and a weight
    normalisation of initializers (V / ||V|| * g) fold to constants before mapping."""
    n = helper.make_node
    nodes = [n("Shape", ["x"], ["s"]), n("Gather", ["s", "zero"], ["b"], axis=0),
             n("Unsqueeze", ["b", "axes0"], ["b1"]), n("Concat", ["b1", "minus1"], ["target"], axis=0),
             n("Reshape", ["x", "target"], ["flat"]),
             n("ReduceL2", ["V"], ["norm"], axes=[1], keepdims=1), n("Div", ["V", "norm"], ["Vn"]),
             n("Mul", ["Vn", "g"], ["Wt"]), n("Identity", ["Wt"], ["W"]),
             n("Constant", [], ["bias"], value=numpy_helper.from_array(_rand(3, seed=5), "bias")),
             n("ConstantOfShape", ["three"], ["ones"], value=numpy_helper.from_array(np.array([1.0]), "one")),
             n("Gemm", ["flat", "W", "bias"], ["g1"], transB=1), n("Mul", ["g1", "ones"], ["y"])]
    inits = {"zero": np.array(0, dtype=np.int64), "axes0": np.array([0], dtype=np.int64),
             "minus1": np.array([-1], dtype=np.int64), "V": _rand(3, 6, seed=6), "g": _rand(3, 1, seed=7),
             "three": np.array([3], dtype=np.int64)}
    with_log = check_graph(graph_model(nodes, (2, 3), inits, opset=17), (2, 3))
    assert isinstance(with_log, lipbound.Network) and with_log.dims == (6, 3)


def test_elementwise_operators_with_constants():
    n = helper.make_node
    nodes = [n("Max", ["x", "c"], ["a"]), n("Min", ["x", "half"], ["b"]), n("Max", ["a", "b", "x"], ["c3"]),
             n("Min", ["a", "b"], ["d"]), n("Clip", ["x", "m1"], ["e"]), n("Sum", ["a", "b", "c"], ["f"]),
             n("Mean", ["a", "d"], ["g"]), n("PRelu", ["x", "slope"], ["h"]), n("Neg", ["x"], ["i"]),
             n("Sub", ["c", "x"], ["j"]), n("Div", ["x", "c"], ["k"]), n("Elu", ["x"], ["l"], alpha=0.5),
             n("LeakyRelu", ["x"], ["m"], alpha=0.25), n("Dropout", ["x"], ["o"]), n("Cast", ["x"], ["p"], to=11),
             n("Relu", ["x"], ["q"]), n("Sigmoid", ["q"], ["r"]), n("Mul", ["q", "r"], ["silu"]),
             n("Concat", ["a", "b", "c3", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "o", "p", "silu"], ["y"],
               axis=1)]
    inits = {"c": np.array([0.5, -1.0, 2.0, 3.0]), "half": np.array(0.5), "m1": np.array(-1.0),
             "slope": np.array([0.25])}
    check_graph(graph_model(nodes, (4,), inits), (4,))


def test_data_movement_operators():
    n = helper.make_node
    nodes = [n("Split", ["x", "sizes"], ["s1", "s2"], axis=1), n("Tile", ["s1", "reps"], ["t"]),
             n("Expand", ["s2", "eshape"], ["e"]), n("DepthToSpace", ["x"], ["ds"], blocksize=2),
             n("GatherElements", ["x", "gidx"], ["ge"], axis=1), n("Slice", ["x", "st", "en", "ax", "stp"], ["sl"]),
             n("Pad", ["x", "pads", "pv"], ["pd"], mode="edge"), n("Transpose", ["x"], ["tr"], perm=[0, 2, 3, 1]),
             n("TopK", ["x", "k"], ["tk", "tki"], axis=2, largest=0),
             n("Where", ["mask", "x", "pv"], ["wh"])]
    outs = ["t", "e", "ds", "ge", "sl", "pd", "tr", "tk", "wh"]
    nodes += [n("Flatten", [o], [f"{o}_f"]) for o in outs]
    nodes.append(n("Concat", [f"{o}_f" for o in outs], ["y"], axis=1))
    inits = {"sizes": np.array([1, 3], dtype=np.int64), "reps": np.array([1, 1, 2, 1], dtype=np.int64),
             "eshape": np.array([1, 3, 2, 3], dtype=np.int64),
             "gidx": np.random.default_rng(0).integers(0, 4, (1, 4, 2, 3)).astype(np.int64),
             "st": np.array([3, 0], dtype=np.int64), "en": np.array([0, 2], dtype=np.int64),
             "ax": np.array([1, 2], dtype=np.int64), "stp": np.array([-2, 1], dtype=np.int64),
             "pads": np.array([0, 0, 1, 0, 0, 0, 0, 2], dtype=np.int64), "pv": np.array(0.0),
             "k": np.array([2], dtype=np.int64),
             "mask": np.random.default_rng(1).integers(0, 2, (4, 1, 3)).astype(bool)}
    check_graph(graph_model(nodes, (4, 2, 3), inits, batch=1), (4, 2, 3))


@pytest.mark.parametrize("opset", [13, 15, 18, 21, onnx.defs.onnx_opset_version()])
def test_opsets(opset):
    n = helper.make_node
    split = (n("Split", ["h", "two"], ["a", "b"], axis=1) if opset < 18 else
             n("Split", ["h"], ["a", "b"], axis=1, num_outputs=2))
    nodes = [n("Gemm", ["x", "W"], ["h"], transB=1), split, n("Max", ["a", "b"], ["m"]),
             n("ReduceSum", ["h", "ax"], ["s"], keepdims=1), n("Add", ["m", "s"], ["y"])]
    inits = {"W": _rand(4, 3), "two": np.array([2, 2], dtype=np.int64), "ax": np.array([1], dtype=np.int64)}
    model = graph_model(nodes, (3,), inits, opset=opset)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        pytest.skip(f"onnxruntime {ort.__version__} cannot run opset {opset}: {str(exc).splitlines()[0]}")
    check_graph(model, (3,))


def test_local_functions_are_inlined():
    n = helper.make_node
    fn = helper.make_function("local", "Dense", ["a", "w"], ["r"],
                              [n("MatMul", ["a", "w"], ["m"]), n("Relu", ["m"], ["r"])],
                              opset_imports=[helper.make_opsetid("", 17)])
    model = graph_model([n("Dense", ["x", "W"], ["h"], domain="local"), n("Neg", ["h"], ["y"])], (3,),
                        {"W": _rand(3, 4)})
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.functions.append(fn)
    net = check_graph(model, (3,))
    assert [n.op.activation.name for n in net.nodes if hasattr(n.op, "activation")] == ["relu"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_decomposed_gelu_certifies_like_the_torch_module(dtype):
    """Opset 17 has no Gelu: the legacy exporter writes 0.5 x (1 + erf(x / sqrt(2))) with sqrt(2) rounded to the
    model's precision. Imported as GELU(k x) / k with rigorous scalings, it certifies to torch's GELU bound."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)).to(dtype)
    model = export(module, (4,), False, opset=17, dtype=dtype)
    assert "Erf" in {n.op_type for n in model.graph.node}
    net = from_onnx(model)
    gelu = [n for n in net.nodes if getattr(getattr(n.op, "activation", None), "name", "") == "gelu"]
    assert len(gelu) == 2
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        assert_close(net(x).numpy(), module.double()(x).numpy(), 1e-12 if dtype == torch.float64 else 1e-7)
    expected = lipbound.certify(lipbound.from_torch(module, input_shape=4), method="lipsdp-neuron")
    cert = lipbound.certify(model, method="lipsdp-neuron")
    assert cert.certified and abs(cert.upper_bound - expected.upper_bound) <= 1e-9 * expected.upper_bound


def test_erf_gelu_of_a_gelu_and_under_a_skip_connection():
    # The campaign's onnx family: GELU(GELU(h)) and GELU(h) - h were refused as "not a known activation" (the
    # second Erf read the first GELU's pending expression; the Sub mixed it with another tensor).
    torch.manual_seed(1)
    module = Fn(lambda s, x: s.b(F.gelu(F.gelu(s.a(x))) - 0.5 * s.a(x)), a=_lin(4, 6), b=_lin(6, 2)).double()
    model = export(module, (4,), False, opset=17)
    assert sum(n.op_type == "Erf" for n in model.graph.node) == 2
    net = from_onnx(model)
    assert sum(getattr(getattr(n.op, "activation", None), "name", "") == "gelu" for n in net.nodes) == 2
    x = torch.randn(7, 4, dtype=torch.float64)
    with torch.no_grad():
        assert_close(net(x).numpy(), module(x).numpy(), 1e-12)
    cert = lipbound.certify(model, method="lipsdp-neuron")
    assert cert.certified and cert.upper_bound >= lipbound.lower_bound(net, n_starts=4, steps=20).value


SOUNDNESS_CASES = {
    "conv_skip_avgpool": (lambda: Fn(lambda s, x: s.l(torch.flatten(F.avg_pool2d(torch.relu(s.c2(torch.relu(s.c1(x))))
                                                                                  + s.c1(x), 2), 1)),
                                     c1=nn.Conv2d(1, 2, 3, padding=1), c2=nn.Conv2d(2, 2, 3, padding=1),
                                     l=_lin(8, 2)), "lipsdp-neuron"),
    "conv_maxpool": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Flatten(),
                                           _lin(2, 2)), "lipsdp-nsr"),
}


@pytest.mark.parametrize("case", list(SOUNDNESS_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_certified_bound_holds_on_onnxruntime_pairs(case, seed):
    """End to end: the bound certified for the imported file is at least every difference quotient of the file's
    own function (evaluated by onnxruntime) on random and nearby pairs."""
    factory, method = SOUNDNESS_CASES[case]
    torch.manual_seed(seed)
    model = export(factory().eval(), (1, 4, 4), False, dtype=torch.float32)
    cert = lipbound.certify(model, method=method)
    assert cert.certified
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 1, 4, 4)).astype(np.float32)
    y = np.concatenate([rng.standard_normal((100, 1, 4, 4)),
                        x[100:] + 0.1 * rng.standard_normal((100, 1, 4, 4))]).astype(np.float32)
    fx, fy = reference(model, x).reshape(200, -1), reference(model, y).reshape(200, -1)
    quotients = np.linalg.norm(fx - fy, axis=1) / np.linalg.norm((x - y).reshape(200, -1).astype(np.float64), axis=1)
    assert quotients.max() <= cert.upper_bound * (1 + 1e-4)  # float32 evaluation of the pairs


def _groupsort_models():
    import lipbound.nn as lnn

    yield "lipbound_groupsort4", lambda: nn.Sequential(_lin(4, 8), lnn.GroupSort(4), _lin(8, 2))
    yield "lipbound_maxmin", lambda: nn.Sequential(_lin(4, 6), lnn.GroupSort(2), _lin(6, 6), lnn.GroupSort(2),
                                                   _lin(6, 2))
    try:
        from deel import torchlip
    except ImportError:
        return
    yield "deel_groupsort2", lambda: torchlip.Sequential(torchlip.SpectralLinear(4, 6), torchlip.GroupSort2(),
                                                         torchlip.SpectralLinear(6, 2)).vanilla_export()


@pytest.mark.parametrize("case", [pytest.param(f, id=name) for name, f in _groupsort_models()])
def test_groupsort_models_certify_like_from_torch(case):
    """GroupSort exports as TopK (lipbound.nn) or ReduceMin/ReduceMax of pairs (deel-torchlip): one GroupSort node
    per tensor, and the same LipSDP-NSR bound as the module imported with from_torch."""
    torch.manual_seed(0)
    module = case().double().eval()
    net = from_onnx(export(module, (4,), False))
    expected = lipbound.from_torch(module, input_shape=4)
    assert net.n_hidden == expected.n_hidden
    a = lipbound.certify(net, method="lipsdp-nsr")
    b = lipbound.certify(expected, method="lipsdp-nsr")
    assert a.certified and abs(a.upper_bound - b.upper_bound) <= 1e-9 * b.upper_bound


# -- refusals -----------------------------------------------------------------------------------------------

def test_unsupported_nodes_are_all_named_with_hints():
    n = helper.make_node
    nodes = [n("Gemm", ["x", "W"], ["h"], transB=1, name="fc"),
             n("LayerNormalization", ["h", "gamma"], ["ln"], axis=-1, name="norm"),
             n("Softmax", ["h"], ["sm"], axis=1, name="probs"),
             n("MyOp", ["h"], ["custom"], domain="my.domain", name="custom"),
             n("Relu", ["ln"], ["after"], name="relu"),  # downstream of a refusal, supported: not reported
             n("Hardmax", ["after"], ["hard"], axis=1, name="hard"),  # downstream, never supported: reported
             n("Transpose", ["h"], ["hT"], perm=[1, 0], name="dead_t"),  # dead code: not translated
             n("MatMul", ["h", "hT"], ["att"], name="dead_att"),
             n("Concat", ["hard", "sm", "custom"], ["y"], axis=1, name="cat")]
    model = graph_model(nodes, (3,), {"W": _rand(3, 3), "gamma": np.ones(3)})
    model.opset_import.append(helper.make_opsetid("my.domain", 1))
    with pytest.raises(UnsupportedLayerError) as info:
        from_onnx(model, check=False)
    assert [name for name, _ in info.value.nodes] == ["norm", "probs", "custom", "hard"]
    text = str(info.value)
    assert "LayerNormalization" in text and "Softmax" in text and "my.domain" in text and "Hardmax" in text
    assert "data-dependent norm" in text and "logits" in text and "standard ONNX domain" in text


def test_products_control_flow_and_attention_are_refused():
    n = helper.make_node
    then = helper.make_graph([n("Identity", ["h"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.DOUBLE, None)])
    nodes = [n("MatMul", ["x", "W"], ["h"]), n("Transpose", ["h"], ["hT"], perm=[0, 2, 1]),
             n("MatMul", ["h", "hT"], ["att"]),
             n("ReduceMean", ["x"], ["tot"], keepdims=0, axes=[1, 2]), n("Greater", ["tot", "zero"], ["cond"]),
             n("If", ["cond"], ["br"], then_branch=then, else_branch=then),
             n("Mul", ["h", "h"], ["sq"]), n("Greater", ["h", "zero"], ["cond2"]),
             n("Where", ["cond2", "h", "sq"], ["w"]),
             n("Concat", ["att", "br", "w"], ["y"], axis=2)]
    inits = {"W": _rand(3, 3), "zero": np.array(0.0)}
    with pytest.raises(UnsupportedLayerError) as info:
        from_onnx(graph_model(nodes, (2, 3), inits), check=False)
    found = dict(info.value.nodes)
    assert "product of two input-dependent tensors" in found["MatMul_2"]
    assert "control flow" in found["If_5"] and "x*x is not a known activation" in found["Mul_6"]
    assert "attention" in str(info.value) and "control flow" in str(info.value)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_torch_layernorm_and_softmax_refused(dynamo):
    module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 3), nn.Softmax(dim=1)).double()
    with pytest.raises(UnsupportedLayerError) as info:
        from_onnx(export(module, (4,), dynamo))
    text = str(info.value)
    assert ("LayerNormalization" in text or "ReduceMean" in text) and "Softmax" in text


@pytest.mark.slow
def test_dynamo_softplus_threshold_20_refused():
    module = nn.Sequential(nn.Linear(3, 3), nn.Softplus(), nn.Linear(3, 2)).double()
    with pytest.raises(UnsupportedLayerError, match="threshold"):
        from_onnx(export(module, (3,), True))


def test_model_level_refusals():
    n = helper.make_node
    model = graph_model([n("Relu", ["x"], ["y"])], (3,), opset=12)
    with pytest.raises(UnsupportedLayerError, match="version_converter"):
        from_onnx(model)
    graph = helper.make_graph([n("Add", ["x", "z"], ["y"])], "two",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    with pytest.raises(UnsupportedLayerError, match="exactly one input"):
        from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(UnsupportedLayerError, match="batch dimension"):
        from_onnx(graph_model([n("Relu", ["x"], ["y"])], ()))
    with pytest.raises(NetworkError, match="input_shape"):
        from_onnx(graph_model([n("Relu", ["x"], ["y"])], ("C",)))
    net = from_onnx(graph_model([n("Relu", ["x"], ["y"])], ("C",)), input_shape=4)
    assert net.dims == (4, 4, 4)
    with pytest.raises(UnsupportedLayerError, match="Indices"):
        from_onnx(graph_model([n("MaxPool", ["x"], ["p", "idx"], kernel_shape=[2]), n("Cast", ["idx"], ["c"], to=11),
                               n("Add", ["p", "c"], ["y"])], (2, 4), dtype=TensorProto.FLOAT), check=False)


# -- the cross-check ----------------------------------------------------------------------------------------

def test_mismatch_with_onnxruntime_is_an_error(monkeypatch):
    from lipbound.importers.onnx import translator as onnx_import

    model = graph_model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])],
                        (3,), {"W": _rand(3, 3)})
    monkeypatch.setattr(onnx_import.OnnxTranslator, "_op_Relu",
                        lambda self, label, args, attrs, node: self._activation(args[0], lipbound.ActivationSpec(
                            "tanh"), label))
    with pytest.raises(NetworkError, match="does not reproduce onnxruntime"):
        from_onnx(model)
    assert from_onnx(model, check=False) is not None


def test_static_batch_and_float32_tolerance():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    model = export(module, (1, 4, 3), False, batch=1, dtype=torch.float32)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    net = check_graph(model, (1, 4, 3), rtol=1e-5)
    x = torch.randn(3, 1, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        assert_close(net(x.reshape(3, -1)).numpy(), module.double()(x).numpy(), 1e-12)


# -- files --------------------------------------------------------------------------------------------------

def _mlp_model(dtype=torch.float32):
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).to(dtype)
    return module, export(module, (4,), False, dtype=dtype)


def test_external_data(tmp_path):
    module, model = _mlp_model()
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.data", size_threshold=0)
    assert (tmp_path / "model.data").exists()
    net = lipbound.load(path)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert_close(net(x.double()).numpy(), module(x).double().numpy(), 1e-6)
    (tmp_path / "model.data").rename(tmp_path / "moved.data")
    with pytest.raises(NetworkError, match=r"external data file 'model\.data'.*not found"):
        lipbound.load(path)
    escaping = onnx.load(str(path), load_external_data=False)
    for t in escaping.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../moved.data"
    onnx.save_model(escaping, str(tmp_path / "escape.onnx"))
    with pytest.raises(NetworkError, match="outside the model's folder"):
        lipbound.load(tmp_path / "escape.onnx")


def test_model_proto_without_its_external_data(tmp_path):
    _, model = _mlp_model()
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    with pytest.raises(NetworkError, match="external data is not loaded"):
        from_onnx(onnx.load(str(path), load_external_data=False))
    assert from_onnx(onnx.load(str(path))).dims == (4, 6, 5, 2)


def test_corrupt_files_name_the_file(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model, just some text\n" * 10)
    with pytest.raises(NetworkError, match="notes.onnx"):
        lipbound.load(text)
    _, model = _mlp_model()
    data = model.SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(NetworkError, match="truncated.onnx"):
        lipbound.load(truncated)
    with pytest.raises(FileNotFoundError):
        lipbound.load(tmp_path / "missing.onnx")


def test_load_and_cli_certify_like_from_torch(tmp_path):
    from lipbound.cli import main

    module, model = _mlp_model()
    path = tmp_path / "mlp.onnx"
    onnx.save_model(model, str(path))
    expected = lipbound.certify(lipbound.from_torch(module, input_shape=4), method="lipsdp-neuron")
    cert = lipbound.certify(lipbound.load(path), method="lipsdp-neuron")
    assert cert.certified and abs(cert.upper_bound - expected.upper_bound) <= 1e-9 * expected.upper_bound
    out = tmp_path / "out.json"
    assert main(["certify", str(path), "--method", "lipsdp-neuron", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["certified"] and abs(record["upper_bound"] - expected.upper_bound) <= 1e-9 * expected.upper_bound


def test_cli_subprocess_certifies_a_conv_net(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 2))
    path = tmp_path / "cnn.onnx"
    onnx.save_model(export(module, (1, 4, 4), False, dtype=torch.float32), str(path))
    expected = lipbound.certify(lipbound.from_torch(module, input_shape=(1, 4, 4)), method="lipsdp-neuron")
    out = tmp_path / "cnn.json"
    done = subprocess.run([sys.executable, "-m", "lipbound.cli", "certify", str(path), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["certified"] and abs(record["upper_bound"] - expected.upper_bound) <= 1e-9 * expected.upper_bound
