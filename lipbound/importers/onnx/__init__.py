"""Import ONNX models into the network IR, exactly, and check the result against onnxruntime.

What is read
    An ONNX file (``.onnx``, external data files beside it) or an in-memory ``onnx.ModelProto``, standard
    operators of opsets 13 to the installed onnx's newest, as written by both torch exporters
    (``torch.onnx.export(..., dynamo=False)`` and ``dynamo=True``) and most other tools. The model has one input
    whose first dimension is the batch (static or symbolic) and one output. Model-local functions are inlined.

How
    1. **Constant folding.** Everything that does not depend on the input (given the shape of one sample) is
       evaluated once with onnx's reference evaluator, in the model's own precision: ``Constant``, weight
       normalisations written as ``Div``/``Mul``/``MatMul``/``ReduceL2`` of initializers, and the
       ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains that exporters emit for a flatten with a dynamic
       batch (``Shape`` of an input-dependent tensor is known once the sample shape is). Random operators are
       refused rather than folded.
    2. **Mapping.** The rest becomes exact IR operators: ``Gemm``/``MatMul`` with a constant, ``Conv`` (1-D/2-D,
       asymmetric padding as an explicit zero-padding selection), average pooling and means (coefficients
       ``fl(1/d)`` with their rounding bound), ``BatchNormalization`` folded into a diagonal map with a rigorous
       rounding bound, pure data movement (``Reshape``, ``Flatten``, ``Transpose``, ``Slice``, ``Gather``,
       ``Split``, ``Concat``, ``Pad``, ``Squeeze``, ``Unsqueeze``, ``Expand``, ``Tile``, ...) as selections found by
       running the operator on tensors of indices, sums and constant scalings, element-wise activations, and
       ``MaxPool``/``Max``/``Min``/``ReduceMax``/``TopK`` as GroupSort between selections. Activations that
       exporters decompose are recognised (:mod:`.patterns`): SiLU, Mish, torch's thresholded Softplus and the
       erf form of GELU.
    3. **Cross-check.** The imported network is evaluated against onnxruntime (graph optimisations off; onnx's
       reference evaluator where onnxruntime has no kernel, as for float64 convolutions) on random inputs; a
       relative difference above 1e-6 (float64 models) or the model's precision (float32: 1e-4 of the output
       scale) is a :class:`~lipbound.errors.NetworkError`, never a silent bound. With a symbolic batch the check
       uses another batch size than the translation, so nothing batch-dependent slips through.

Everything else is refused: all offending nodes are named at once in one
:class:`~lipbound.errors.UnsupportedLayerError`, with hints (normalisation layers, softmax, products of two
input-dependent tensors such as attention, control flow). Nothing from the file is executed beyond onnx's
reference evaluation of constant subgraphs and onnxruntime's evaluation for the cross-check.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lipbound.errors import NetworkError, UnsupportedLayerError
from lipbound.graph import GraphNetwork
from lipbound.importers.onnx.translator import OnnxTranslator, default_opset
from lipbound.importers.simplify import simplify
from lipbound.network import Network

log = logging.getLogger("lipbound")

MIN_OPSET = 13

_TOLERANCE = {np.float64: 1e-6, np.float32: 1e-4, np.float16: 5e-2}


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise NetworkError("reading ONNX models needs the 'onnx' and 'onnxruntime' packages "
                           "(pip install 'lipbound[onnx]').") from exc


def _read(path: Path):
    """The model of an ONNX file with its external data, or a NetworkError naming the file."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise NetworkError(f"{path} is a directory, not an ONNX file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise NetworkError(f"{path}: not a readable ONNX file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'cannot be parsed'}).") from exc
    if not model.HasField("graph") or model.ir_version <= 0 or not model.graph.node:
        raise NetworkError(f"{path}: not an ONNX model (no graph or no IR version; is it an ONNX file?).")
    base = path.resolve().parent
    for tensor in _tensors(model.graph):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        rel = Path(location)
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise NetworkError(f"{path}: tensor '{tensor.name}' points to external data '{location}' outside the "
                               "model's folder; external data must lie beside the model.")
        if not (base / rel).is_file():
            raise NetworkError(f"{path}: external data file '{location}' (tensor '{tensor.name}') not found in "
                               f"{base}; copy it beside the model.")
    try:
        load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise NetworkError(f"{path}: the external data could not be read ({type(exc).__name__}: {exc}).") from exc
    return model


def _tensors(graph):
    """Every tensor stored in a graph: initializers and constant attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _prepare(model, where: str):
    """Validate, check the opset and inline model-local functions."""
    import onnx

    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise NetworkError(f"{where}: not a valid ONNX model ({type(exc).__name__}: {text[0] if text else ''}).") \
            from exc
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise UnsupportedLayerError([(where, f"opset {opset}")],
                                    f"opsets {MIN_OPSET} to {newest} are supported: re-export with a newer "
                                    "opset_version, or convert with onnx.version_converter.convert_version(model, "
                                    f"{MIN_OPSET}).")
    if opset > newest:
        raise UnsupportedLayerError([(where, f"opset {opset}")],
                                    f"the installed onnx knows opsets up to {newest}; upgrade onnx.")
    if model.functions:
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    return model


def _reference(model, source, translator: OnnxTranslator):
    """The evaluator to check against: onnxruntime (graph optimisations off), or, for a model onnxruntime cannot
    run (it has no float64 kernels for Conv, pooling, BatchNormalization, LeakyRelu, Elu, Softplus, Erf, ...),
    onnx's reference evaluator. Returns ``(run, what)``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(source if isinstance(source, str) else model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # no kernel for a type (float64 Conv), or an opset newer than onnxruntime's
        from onnx.reference import ReferenceEvaluator

        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.info("import %s: onnxruntime cannot run the model (%s); checking against onnx's reference evaluator",
                 translator.name, text)
        evaluator = ReferenceEvaluator(model)
        return (lambda x: evaluator.run(None, {translator.input_name: x})[0]), "onnx's reference evaluator"
    return (lambda x: session.run(None, {translator.input_name: x})[0]), "onnxruntime"


def _cross_check(graph: GraphNetwork, model, source, translator: OnnxTranslator) -> None:
    """Evaluate the network and the reference on random inputs; a mismatch is an error."""
    run, what = _reference(model, source, translator)
    dtype = translator.dtype
    batch = 3 if translator.symbolic_batch else translator.batch
    runs = max(1, -(-4 // batch))
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(runs):
        x = rng.standard_normal((batch, *translator.sample_shape)).astype(dtype)
        try:
            ref = run(x)
        except Exception as exc:
            raise NetworkError(f"{translator.name}: {what} cannot evaluate the model ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); pass check=False to import it "
                               "unchecked.") from exc
        ref = np.asarray(ref, dtype=np.float64).reshape(batch, -1)
        with torch.no_grad():
            out = graph.forward(torch.from_numpy(x.astype(np.float64))).numpy()
        if out.shape != ref.shape or not np.all(np.isfinite(ref)):
            raise NetworkError(f"{translator.name}: the imported network outputs {out.shape[1:]} values per sample, "
                               f"{what} {ref.shape[1:]} (or non-finite values); nothing was certified.")
        scale = float(np.abs(ref).max())
        err = float(np.abs(out - ref).max())
        worst = max(worst, err / scale if scale > 0 else err)
    tol = _TOLERANCE[dtype]
    if worst > tol:
        raise NetworkError(f"{translator.name}: the imported network does not reproduce {what}'s output (relative "
                           f"error {worst:.3g} > {tol:g} for a {np.dtype(dtype).name} model). This is a bug in "
                           "lipbound's ONNX importer; nothing was certified.")
    log.info("import %s: output matches %s to %.2g relative (%s)", translator.name, what, worst, np.dtype(dtype).name)


def from_onnx(source, input_shape: Sequence[int] | int | None = None, check: bool = True,
              name: str | None = None) -> Network | GraphNetwork:
    """Import an ONNX model (a ``.onnx`` file or an ``onnx.ModelProto``) as a network.

    See the module docstring for what is read, how, and what is refused.

    Parameters
    ----------
    source : str, Path or onnx.ModelProto
        The file (its external data files beside it) or the model.
    input_shape : int or tuple of int, optional
        Shape of one sample, without the batch dimension; needed only when the model's input has symbolic
        dimensions other than the batch.
    check : bool
        Evaluate the network against onnxruntime on random inputs and raise on a mismatch (default).
    name : str, optional
        Defaults to the file's stem (or the graph's name).

    Returns
    -------
    Network or GraphNetwork
        A chain :class:`~lipbound.network.Network` when the model is one, else a
        :class:`~lipbound.graph.GraphNetwork`.

    Raises
    ------
    UnsupportedLayerError
        Listing every node that cannot be represented, with hints.
    NetworkError
        For a corrupt or invalid file, a missing external data file, or a network that does not reproduce
        onnxruntime's output.

    Examples
    --------
    >>> import io, torch, lipbound
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> buffer = io.BytesIO()
    >>> torch.onnx.export(model, (torch.randn(1, 3),), buffer, dynamo=False)
    >>> import onnx
    >>> lipbound.from_onnx(onnx.load_from_string(buffer.getvalue())).dims
    (3, 4, 2)
    """
    _require_onnx()
    import onnx
    from onnx.external_data_helper import uses_external_data

    if isinstance(source, onnx.ModelProto):
        model, where, path = source, name or source.graph.name or "onnx_model", None
        if any(uses_external_data(t) for t in _tensors(model.graph)):
            raise NetworkError(f"{where}: the model's external data is not loaded; pass the file's path (or load it "
                               "with onnx.load(path), which reads the external data).")
    else:
        path = Path(source)
        model, where = _read(path), str(path)
    model = _prepare(model, where)
    name = name or (path.stem if path is not None else model.graph.name or "onnx_model")
    translator = OnnxTranslator(model, name, input_shape)
    graph = simplify(translator.translate())
    if check:
        # Serialised models are limited to 2 GB; larger ones (external data) are given to onnxruntime by path.
        by_path = path is not None and model.ByteSize() >= 2**31 - 1
        _cross_check(graph, model, str(path) if by_path else None, translator)
    return graph.to_network() or graph

