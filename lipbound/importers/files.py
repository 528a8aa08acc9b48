"""``lipbound.load``: networks from files, treating every file as untrusted input.

| suffix | what | how |
|---|---|---|
| ``.mat`` | LipSDP / QCs_MaxMin weight cells | :func:`~lipbound.importers.weights.load_mat` |
| ``.npz`` | ``W0, W1, ...`` (+ ``b0, ...``) | :func:`~lipbound.importers.weights.load_npz` (no pickles) |
| ``.pt``, ``.pth``, ``.bin`` | state dict or tensors; a pickled module only with ``trust_code=True`` | ``torch.load`` |
| ``.safetensors`` | state dict | ``safetensors`` |
| ``.pt2`` | ``torch.export.save`` program | ``torch.export.load`` (tensors only) |
| ``.onnx`` | ONNX model (external data files beside it) | :mod:`lipbound.importers.onnx` |

Loading a pickled ``nn.Module`` runs code stored in the file, so it needs an explicit opt-in; TorchScript is
refused with the export path to use instead. A corrupt file gives a :class:`~lipbound.errors.NetworkError` naming
the file and the format it was read as.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import zipfile
from pathlib import Path

import torch

from lipbound.errors import NetworkError, UnsupportedLayerError
from lipbound.importers.weights import from_state_dict, from_weights, load_mat, load_npz

log = logging.getLogger("lipbound")

SUFFIXES = (".mat", ".npz", ".pt", ".pth", ".bin", ".safetensors", ".pt2", ".onnx")

_TRUST_HINT = ("Loading it would run code stored in the file (pickle). If you trust where the file comes from, pass "
               "trust_code=True (CLI: --trust-code); better, share a state dict (torch.save(model.state_dict())), a "
               "torch.export program (.pt2) or an ONNX file, which load without running code.")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _load_torch_file(path: Path, activation, architecture, input_shape, trust_code, activation_params):
    from lipbound.importers.torch_module import _TORCHSCRIPT_HINT, from_torch

    if _is_torchscript(path):
        raise UnsupportedLayerError([(path.name, "TorchScript archive")], _TORCHSCRIPT_HINT)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL " in text:
            if not trust_code:
                raise NetworkError(f"{path} holds pickled Python objects (such as a whole nn.Module), not just "
                                   f"tensors. {_TRUST_HINT}") from None
            obj = _trusted_load(path)
        else:
            raise NetworkError(f"{path}: not a readable torch file ({type(exc).__name__}: {text.splitlines()[0]}).") \
                from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError/zip errors for corrupt files
        raise NetworkError(f"{path}: not a readable torch file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}).") from exc
    if isinstance(obj, torch.nn.Module):
        return from_torch(obj, input_shape=input_shape, name=path.stem)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # common checkpoint layout {"state_dict": ..., "epoch": ...}
    if isinstance(obj, dict):
        return from_state_dict(obj, activation, name=path.stem, source=str(path), **activation_params)
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return from_weights(list(obj), activation, name=path.stem, architecture=architecture, **activation_params)
    raise NetworkError(f"{path} holds a {type(obj).__name__}; expected a state dict, a list of weight tensors or "
                       "(with trust_code=True) a whole nn.Module.")


def _trusted_load(path: Path):
    log.warning("loading %s with weights_only=False (trust_code=True): this runs code stored in the file", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise NetworkError(f"{path}: could not be loaded even with trust_code=True ({type(exc).__name__}: {exc}).") \
            from exc


@contextlib.contextmanager
def _tensors_only():
    """Make every ``torch.load`` inside refuse to unpickle anything but tensors (``torch.export.load`` would fall
    back to full unpickling otherwise)."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)
    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def _load_pt2(path: Path, trust_code: bool):
    from lipbound.importers.torch_module import from_exported

    try:
        if trust_code:
            program = torch.export.load(path)
        else:
            with _tensors_only():
                program = torch.export.load(path)
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        if isinstance(exc, pickle.UnpicklingError) and not trust_code:
            raise NetworkError(f"{path}: the program stores pickled objects beyond tensors. {_TRUST_HINT}") from exc
        raise NetworkError(f"{path}: not a readable torch.export program ({type(exc).__name__}: {text}).") from exc
    return from_exported(program, path.stem, _check_against=program)


def _load_safetensors(path: Path, activation, activation_params):
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise NetworkError(
            "reading .safetensors needs the 'safetensors' package (pip install 'lipbound[safetensors]')."
        ) from exc
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise NetworkError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}).") from exc
    return from_state_dict(state, activation, name=path.stem, source=str(path), **activation_params)


def load(path: str | Path, activation: str = "relu", architecture: str = "feedforward", input_shape=None,
         trust_code: bool = False, **activation_params):
    """Load a network from a file (see the table in this module's docstring).

    Parameters
    ----------
    path : str or Path
    activation : str
        Activation of weight-only files and state dicts (``"maxmin"`` for the QC paper's files).
    architecture : {"feedforward", "residual"}
        Layout of weight-only files (``"residual"``: the QC paper's ``resweights_*`` files).
    input_shape : tuple of int, optional
        Input shape for a whole pickled module (``trust_code=True``) whose input size cannot be inferred, or for an
        ONNX model whose input has symbolic dimensions besides the batch.
    trust_code : bool
        Allow unpickling whole modules from ``.pt`` files (runs code from the file).
    **activation_params
        Parameters of ``activation`` (e.g. ``negative_slope=0.1``).

    Returns
    -------
    Network or GraphNetwork

    Raises
    ------
    NetworkError
        For a missing, corrupt or unsupported file, with the reason.

    Examples
    --------
    >>> import os, tempfile, numpy as np, lipbound
    >>> path = os.path.join(tempfile.mkdtemp(), "net.npz")
    >>> np.savez(path, W0=np.ones((3, 2)), W1=np.ones((1, 3)))
    >>> lipbound.load(path, activation="tanh").dims
    (2, 3, 1)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise NetworkError(f"{path} is a directory, not a network file ({', '.join(SUFFIXES)}).")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        return load_mat(path, activation, architecture, **activation_params)
    if suffix == ".npz":
        return load_npz(path, activation, architecture, **activation_params)
    if suffix in (".pt", ".pth", ".bin"):
        return _load_torch_file(path, activation, architecture, input_shape, trust_code, activation_params)
    if suffix == ".safetensors":
        return _load_safetensors(path, activation, activation_params)
    if suffix == ".pt2":
        return _load_pt2(path, trust_code)
    if suffix == ".onnx":
        from lipbound.importers.onnx import from_onnx

        return from_onnx(path, input_shape=input_shape)
    if suffix in (".ts", ".torchscript", ".jit"):
        from lipbound.importers.torch_module import _TORCHSCRIPT_HINT

        raise UnsupportedLayerError([(path.name, "TorchScript file")], _TORCHSCRIPT_HINT)
    raise NetworkError(f"unsupported file type '{suffix}' ({path}); use one of {', '.join(SUFFIXES)}.")
