"""Importers: every source a network comes from, producing the same IR.

* :func:`from_torch` -- an ``nn.Module``, traced with ``torch.export`` (:mod:`.torch_module`, :mod:`.aten`);
* :func:`from_weights`, :func:`from_state_dict` -- weight matrices and state dicts (:mod:`.weights`);
* :func:`from_onnx` -- ONNX models, checked against onnxruntime (:mod:`.onnx`);
* :func:`load` -- files: ``.mat``, ``.npz``, ``.pt``/``.pth`` (state dicts; modules only with ``trust_code``),
  ``.safetensors``, ``.pt2`` (torch.export), ``.onnx`` (:mod:`.files`).

Nothing is skipped silently: what cannot be represented is reported by name in one
:class:`~lipbound.errors.UnsupportedLayerError`.
"""

from lipbound.importers.files import load
from lipbound.importers.onnx import from_onnx
from lipbound.importers.torch_module import from_exported, from_torch
from lipbound.importers.weights import GROUP_ACTIVATIONS, from_state_dict, from_weights

__all__ = ["GROUP_ACTIVATIONS", "from_exported", "from_onnx", "from_state_dict", "from_torch", "from_weights", "load"]
