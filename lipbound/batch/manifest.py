"""Batch descriptions: a manifest (YAML or JSON file, or the same dict in Python) that expands to jobs.

A manifest is the product of its lists: models x methods x norms x outputs x regions (points x ball norms x
radii, or the whole input space). Each resulting :class:`Job` is one independent certificate with a stable id,
the hash of everything that determines its result: the model file's *contents* and load options, the method,
norm, output, region (the centre's values, not its file), solver and options. Moving a file keeps the ids;
retraining a model changes them. Expansion is lazy (a generator), so a batch of any length costs the driver
only the points it reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lipbound.api import METHODS, NORMS
from lipbound.errors import ManifestError

log = logging.getLogger("lipbound")

MANIFEST_KEYS = ("models", "methods", "norms", "outputs", "domains", "solver", "options", "device", "lower_bound",
                 "expect", "description")
MODEL_KEYS = ("path", "name", "activation", "architecture", "trust_code", "load_options", "expect")
DOMAIN_KEYS = ("points", "radii", "ball_norm", "bounds_method")
POINTS_KEYS = ("file", "key", "rows", "indices", "scale")
EXPECT_KEYS = ("max_upper_bound", "value", "rtol", "atol", "known_lower_bound", "max_gap")
LOWER_BOUND_KEYS = ("n_starts", "steps", "power_iters", "seed")
#: certify() keywords set by the manifest's own keys, so ``options`` may not set them.
RESERVED_OPTIONS = ("method", "norm", "solver", "domain", "output_index", "input_shape", "activation", "device",
                    "bounds_method")


def _fail(where: str, message: str) -> ManifestError:
    return ManifestError(f"manifest {where}: {message}")


def _as_list(value, where: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, int, float, Mapping)) or value is None:
        return [value]
    raise _fail(where, f"expected a list, got {type(value).__name__}.")


def _check_keys(data: Mapping, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed: {', '.join(allowed)}.")


def _canonical(value) -> str:
    """JSON text that is the same for equal inputs (sorted keys, no spaces); the basis of job ids."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest value {value!r} is not plain JSON data (numbers, strings, lists, "
                            f"dicts): {exc}.") from exc


def file_sha256(path: Path) -> str | None:
    """SHA-256 of a file's bytes (``None`` when it does not exist: the job then records the missing file)."""
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    except FileNotFoundError:
        return None


def _expectation(data, where: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise _fail(where, f"expected a mapping like {{max_upper_bound: 5.0}}, got {data!r}.")
    _check_keys(data, EXPECT_KEYS, where)
    out = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(f"{where}.{key}", f"expected a finite number, got {value!r}.")
        out[key] = float(value)
    if ("rtol" in out or "atol" in out) and "value" not in out:
        raise _fail(where, "rtol/atol are tolerances of a published 'value'; add value: <bound>.")
    if out.get("rtol", 0) < 0 or out.get("atol", 0) < 0:
        raise _fail(where, "rtol and atol must be >= 0.")
    return out


def _expectations(data, where: str) -> dict:
    """``{"*": expectation}`` for a flat expectation, ``{method: expectation}`` for one keyed by method."""
    if isinstance(data, Mapping) and data and all(k in METHODS for k in data):
        return {method: _expectation(value, f"{where}.{method}") for method, value in data.items()}
    flat = _expectation(data, where)
    return {"*": flat} if flat else {}


@dataclass(frozen=True)
class ModelSpec:
    """One model of a batch: a file and how to load it (``lipbound.load`` keywords).

    ``trust_code`` lets the importer unpickle whole saved modules (code execution: only for files you trust);
    it is passed to ``lipbound.load`` only when true. ``expect`` maps a method (or ``"*"``) to an expectation.
    """

    path: Path
    name: str
    activation: str = "relu"
    architecture: str = "feedforward"
    trust_code: bool = False
    load_options: dict = field(default_factory=dict)
    expect: dict = field(default_factory=dict)

    def load_kwargs(self) -> dict:
        """Keywords for :func:`lipbound.load`."""
        kwargs = {"activation": self.activation, "architecture": self.architecture, **self.load_options}
        if self.trust_code:
            kwargs["trust_code"] = True
        return kwargs

    def identity(self) -> dict:
        """What besides the file's bytes decides the loaded network (part of the job id)."""
        return {"activation": self.activation, "architecture": self.architecture, "options": self.load_options}


@dataclass(frozen=True)
class PointsSpec:
    """Centres of local regions: rows of an array in a ``.npy`` file or a member of a ``.npz`` file.

    ``rows=(start, stop)`` takes a slice, ``indices`` a list of rows; each row is flattened and multiplied by
    ``scale`` (e.g. ``1/255`` for 8-bit images).
    """

    file: Path
    key: str | None = None
    rows: tuple[int, int] | None = None
    indices: tuple[int, ...] | None = None
    scale: float = 1.0

    @property
    def label(self) -> str:
        return self.file.name if self.key is None else f"{self.file.name}:{self.key}"

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(row numbers, points as float64 of shape (n, d))``."""
        if not self.file.exists():
            raise ManifestError(f"points file not found: {self.file}.")
        suffix = self.file.suffix.lower()
        if suffix == ".npy":
            if self.key is not None:
                raise ManifestError(f"points file {self.file} is a .npy array; 'key' applies to .npz files only.")
            array = np.load(self.file, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            with np.load(self.file, allow_pickle=False) as data:
                key = self.key
                if key is None:
                    if len(data.files) != 1:
                        raise ManifestError(f"points file {self.file} holds arrays {data.files}; choose one with "
                                            "'key'.")
                    key = data.files[0]
                if key not in data.files:
                    raise ManifestError(f"points file {self.file} has no array {key!r} (found {data.files}).")
                array = data[key]
        else:
            raise ManifestError(f"points file {self.file}: expected .npy or .npz, got '{suffix}'.")
        if array.ndim < 1 or array.shape[0] == 0:
            raise ManifestError(f"points file {self.label} holds an array of shape {array.shape}; expected one "
                                "point per row.")
        n = array.shape[0]
        if self.indices is not None:
            rows = np.asarray(self.indices, dtype=np.int64)
        elif self.rows is not None:
            rows = np.arange(n)[self.rows[0]:self.rows[1]]
        else:
            rows = np.arange(n)
        if rows.size == 0 or rows.min() < -n or rows.max() >= n:
            raise ManifestError(f"points {self.label}: rows {self.rows or list(self.indices or [])} select nothing "
                                f"valid from {n} rows.")
        rows = np.where(rows < 0, rows + n, rows)
        points = np.asarray(array[rows], dtype=np.float64).reshape(rows.size, -1) * self.scale
        if not np.all(np.isfinite(points)):
            raise ManifestError(f"points {self.label} contain NaN or inf.")
        return rows, points


@dataclass(frozen=True)
class DomainSpec:
    """Local regions: a ball of each norm in ``ball_norms`` and radius in ``radii`` around every point."""

    points: PointsSpec
    radii: tuple[float, ...]
    ball_norms: tuple[str, ...] = ("l2",)
    bounds_method: str = "crown"


@dataclass(frozen=True)
class JobDomain:
    """The region of one job: a ball around point ``point`` of the points file ``source``."""

    center: np.ndarray
    radius: float
    norm: str
    bounds_method: str
    point: int
    source: str

    def identity(self) -> dict:
        center = np.ascontiguousarray(self.center, dtype="<f8")
        return {"center_sha256": hashlib.sha256(center.tobytes()).hexdigest(), "dim": int(center.size),
                "radius": self.radius, "norm": self.norm, "bounds_method": self.bounds_method}


@dataclass(frozen=True)
class Job:
    """One certificate of a batch. ``id`` hashes every input that decides the result (see the module notes)."""

    id: str
    model: ModelSpec
    model_sha256: str | None
    method: str
    norm: str
    output_index: int | None
    domain: JobDomain | None
    solver: str
    options: dict
    device: str | None
    lower_bound: dict | None
    expect: dict

    def describe(self) -> dict:
        """Small JSON description stored with the result (the centre's values are in the certificate)."""
        domain = None
        if self.domain is not None:
            d = self.domain
            domain = {"source": d.source, "point": d.point, "radius": d.radius, "norm": d.norm,
                      "bounds_method": d.bounds_method}
        return {"model": self.model.name, "path": str(self.model.path), "model_sha256": self.model_sha256,
                "method": self.method, "norm": self.norm, "output_index": self.output_index, "domain": domain,
                "solver": self.solver, "options": self.options, "device": self.device,
                "lower_bound": self.lower_bound}

    def payload(self, threads: int | None = None) -> dict:
        """Everything a worker needs, as plain data (sent to local or Ray workers; never stored)."""
        center = None if self.domain is None else self.domain.center.tolist()
        return {"id": self.id, "job": self.describe(), "load": self.model.load_kwargs(), "center": center,
                "threads": threads}


def job_id(inputs: dict) -> str:
    """Stable id of a job: the first 20 hex digits of the SHA-256 of its canonical JSON inputs."""
    return hashlib.sha256(_canonical(inputs).encode()).hexdigest()[:20]


def _points(value, base: Path, where: str) -> PointsSpec:
    if isinstance(value, str):
        return PointsSpec(base / value)
    if not isinstance(value, Mapping) or "file" not in value:
        raise _fail(where, "expected a file name or {file: ..., key: ..., rows: [start, stop] | indices: [...], "
                           "scale: ...}.")
    _check_keys(value, POINTS_KEYS, where)
    rows = value.get("rows")
    if rows is not None:
        if not (isinstance(rows, (list, tuple)) and len(rows) == 2
                and all(r is None or (isinstance(r, int) and not isinstance(r, bool)) for r in rows)):
            raise _fail(f"{where}.rows", f"expected [start, stop] (integers or null), got {rows!r}.")
        rows = (rows[0], rows[1])
    indices = value.get("indices")
    if indices is not None:
        if rows is not None:
            raise _fail(where, "give 'rows' or 'indices', not both.")
        if not (isinstance(indices, (list, tuple)) and indices
                and all(isinstance(i, int) and not isinstance(i, bool) for i in indices)):
            raise _fail(f"{where}.indices", f"expected a non-empty list of integers, got {indices!r}.")
        indices = tuple(indices)
    scale = value.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise _fail(f"{where}.scale", f"expected a finite number, got {scale!r}.")
    key = value.get("key")
    if key is not None and not isinstance(key, str):
        raise _fail(f"{where}.key", f"expected an array name, got {key!r}.")
    return PointsSpec(base / str(value["file"]), key, rows, indices, float(scale))


def _domain(value, base: Path, where: str) -> DomainSpec | None:
    if value is None or value == "global":
        return None
    if not isinstance(value, Mapping):
        raise _fail(where, f"expected 'global' or {{points: ..., radii: [...], ball_norm: l2}}, got {value!r}.")
    _check_keys(value, DOMAIN_KEYS, where)
    for key in ("points", "radii"):
        if key not in value:
            raise _fail(where, f"missing '{key}'.")
    radii = _as_list(value["radii"], f"{where}.radii")
    for r in radii:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            raise _fail(f"{where}.radii", f"radii must be finite numbers >= 0, got {r!r}.")
    norms = _as_list(value.get("ball_norm", "l2"), f"{where}.ball_norm")
    for n in norms:
        if n not in NORMS:
            raise _fail(f"{where}.ball_norm", f"unknown norm {n!r}; choose from {', '.join(NORMS)}.")
    bounds_method = value.get("bounds_method", "crown")
    if bounds_method not in ("crown", "ibp"):
        raise _fail(f"{where}.bounds_method", f"expected crown or ibp, got {bounds_method!r}.")
    if not radii:
        raise _fail(f"{where}.radii", "empty list.")
    return DomainSpec(_points(value["points"], base, f"{where}.points"), tuple(float(r) for r in radii),
                      tuple(norms), bounds_method)


def _model(value, base: Path, where: str) -> ModelSpec:
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, Mapping) or "path" not in value:
        raise _fail(where, f"expected a path or {{path: ..., activation: ...}}, got {value!r}.")
    _check_keys(value, MODEL_KEYS, where)
    path = base / str(value["path"])
    trust = value.get("trust_code", False)
    if not isinstance(trust, bool):
        raise _fail(f"{where}.trust_code", f"expected true or false, got {trust!r}.")
    load_options = dict(value.get("load_options") or {})
    _canonical(load_options)
    return ModelSpec(path, str(value.get("name") or Path(str(value["path"])).stem),
                     str(value.get("activation", "relu")), str(value.get("architecture", "feedforward")), trust,
                     load_options, _expectations(value.get("expect"), f"{where}.expect"))


def _lower_bound(value, where: str) -> dict | None:
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(where, f"expected true/false or {{n_starts: ..., steps: ...}}, got {value!r}.")
    _check_keys(value, LOWER_BOUND_KEYS, where)
    for key, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _fail(f"{where}.{key}", f"expected an integer >= 0, got {v!r}.")
    return dict(value)


@dataclass(frozen=True)
class Manifest:
    """A batch: models x methods x norms x outputs x domains, with solver settings and expectations.

    Build it from a file with :meth:`from_file` or from the same structure in Python with :meth:`from_dict`.
    ``methods`` and ``outputs`` may be ``"all"`` (the methods that apply to each model; every output row).
    A ``None`` domain is the global bound.

    Examples
    --------
    >>> import numpy as np, lipbound, tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> np.savez(folder / "net.npz", W0=np.eye(2), W1=np.ones((1, 2)))
    >>> np.save(folder / "points.npy", np.arange(6.0).reshape(3, 2))
    >>> manifest = lipbound.batch.Manifest.from_dict({
    ...     "models": ["net.npz"], "methods": ["mp", "lipsdp-neuron"],
    ...     "domains": ["global", {"points": "points.npy", "radii": [0.1, 1.0]}]}, base_dir=folder)
    >>> jobs = list(manifest.jobs())
    >>> len(jobs), jobs[0].method, jobs[-1].domain.radius
    (14, 'mp', 1.0)
    """

    models: tuple[ModelSpec, ...]
    methods: tuple[str, ...] | str = ("lipsdp-neuron",)
    norms: tuple[str, ...] = ("l2",)
    outputs: tuple[int | None, ...] | str = (None,)
    domains: tuple[DomainSpec | None, ...] = (None,)
    solver: str = "auto"
    options: dict = field(default_factory=dict)
    device: str | None = None
    lower_bound: dict | None = None
    expect: dict = field(default_factory=dict)
    source: Path | None = None

    def __post_init__(self):
        from lipbound.solvers import SOLVERS

        where = str(self.source or "(in Python)")
        for key in ("models", "methods", "norms", "outputs", "domains"):
            if not getattr(self, key):
                raise _fail(where, f"'{key}' is empty: nothing to run.")
        if self.solver != "auto" and self.solver not in SOLVERS:
            raise _fail(f"{where} solver", f"unknown solver {self.solver!r}; choose auto or one of "
                                           f"{', '.join(SOLVERS)}.")
        if self.methods != "all":
            for method in self.methods:
                if method not in METHODS:
                    raise _fail(f"{where} methods", f"unknown method {method!r}; choose from {', '.join(METHODS)} "
                                                    "or 'all'.")
        for norm in self.norms:
            if norm not in NORMS:
                raise _fail(f"{where} norms", f"unknown norm {norm!r}; choose from {', '.join(NORMS)}.")
        if self.outputs != "all":
            for out in self.outputs:
                if out is not None and (isinstance(out, bool) or not isinstance(out, int) or out < 0):
                    raise _fail(f"{where} outputs", f"expected output indices >= 0 or 'all', got {out!r}.")
        if self.device is not None and self.solver not in ("auto", "native"):
            raise _fail(f"{where} device", f"device={self.device!r} needs solver native (or auto), not "
                                            f"{self.solver!r}.")
        reserved = sorted(set(self.options) & set(RESERVED_OPTIONS))
        if reserved:
            raise _fail(f"{where} options", f"{reserved} are set by the manifest's own keys (methods, norms, "
                                            "outputs, domains, solver, device), not in options.")
        _canonical(self.options)

    @classmethod
    def from_dict(cls, data: Mapping, base_dir: str | Path = ".", source: Path | None = None) -> Manifest:
        """Parse and validate a manifest structure; relative paths are relative to ``base_dir``."""
        where = str(source or "(in Python)")
        if not isinstance(data, Mapping):
            raise _fail(where, f"expected a mapping at the top level, got {type(data).__name__}.")
        _check_keys(data, MANIFEST_KEYS, where)
        if "models" not in data:
            raise _fail(where, "missing 'models' (a list of model files).")
        base = Path(base_dir).resolve()
        models = tuple(_model(m, base, f"models[{i}]") for i, m in enumerate(_as_list(data["models"], "models")))
        methods = data.get("methods", ["lipsdp-neuron"])
        methods = "all" if methods == "all" else tuple(_as_list(methods, "methods"))
        outputs = data.get("outputs")
        outputs = "all" if outputs == "all" else tuple(_as_list(outputs, "outputs"))
        domains = tuple(_domain(d, base, f"domains[{i}]") for i, d in enumerate(_as_list(data.get("domains"),
                                                                                            "domains")))
        options = data.get("options") or {}
        if not isinstance(options, Mapping):
            raise _fail(f"{where} options", f"expected a mapping of certify() options, got {options!r}.")
        device = data.get("device")
        return cls(models=models, methods=methods, norms=tuple(_as_list(data.get("norms", ["l2"]), "norms")),
                   outputs=outputs, domains=domains, solver=str(data.get("solver", "auto")).lower(),
                   options=dict(options), device=None if device is None else str(device),
                   lower_bound=_lower_bound(data.get("lower_bound"), "lower_bound"),
                   expect=_expectations(data.get("expect"), "expect"), source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> Manifest:
        """Read a YAML (``.yaml``/``.yml``) or JSON manifest; paths in it are relative to its folder."""
        path = Path(path)
        if not path.exists():
            raise ManifestError(f"manifest not found: {path}.")
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ManifestError(f"manifest {path} is not valid YAML: {exc}") from exc
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"manifest {path} is not valid JSON ({exc}); YAML files need a .yaml "
                                    "suffix.") from exc
        return cls.from_dict(data, base_dir=path.parent, source=path)

    def expectation(self, model: ModelSpec, method: str) -> dict:
        """The expectation a job must meet: the manifest's, then the model's, then the model's for ``method``."""
        merged = {}
        for level in (self.expect.get("*"), self.expect.get(method), model.expect.get("*"),
                      model.expect.get(method)):
            merged.update(level or {})
        return merged

    def _model_facts(self, model: ModelSpec) -> tuple[list[str], list[int | None]]:
        """Methods and outputs of one model; loads it only for ``"all"`` (a load failure then yields one job that
        records the error)."""
        methods = self.methods
        outputs = self.outputs
        if methods == "all" or outputs == "all":
            from lipbound import load
            from lipbound.api import applicable_methods

            try:
                network = load(model.path, **model.load_kwargs())
            except Exception as exc:  # noqa: BLE001 - any importer failure becomes the job's recorded error
                log.warning("batch: cannot load %s to expand 'all' (%s); its jobs will record the error",
                            model.path, exc)
                return (["lipsdp-neuron"] if methods == "all" else list(methods),
                        [None] if outputs == "all" else list(outputs))
            if methods == "all":
                methods = applicable_methods(network)
            if outputs == "all":
                outputs = list(range(network.dims[-1]))
        return list(methods), list(outputs)

    def _regions(self) -> Iterator[JobDomain | None]:
        for spec in self.domains:
            if spec is None:
                yield None
                continue
            rows, points = spec.points.load()
            for row, center in zip(rows, points, strict=True):
                for norm in spec.ball_norms:
                    for radius in spec.radii:
                        yield JobDomain(center, radius, norm, spec.bounds_method, int(row), spec.points.label)

    def jobs(self) -> Iterator[Job]:
        """The jobs, lazily, in a stable order (model, method, norm, output, region); duplicates (same id) once."""
        seen: set[str] = set()
        for model in self.models:
            sha = file_sha256(model.path)
            model_key = sha if sha is not None else f"missing:{model.path}"
            methods, outputs = self._model_facts(model)
            for method in methods:
                expect = self.expectation(model, method)
                for norm in self.norms:
                    for output in outputs:
                        for region in self._regions():
                            inputs = {"model": model_key, "load": model.identity(), "method": method,
                                      "norm": norm, "output_index": output,
                                      "domain": None if region is None else region.identity(),
                                      "solver": self.solver, "options": self.options,
                                      "lower_bound": self.lower_bound}
                            jid = job_id(inputs)
                            if jid in seen:
                                log.warning("batch: %s/%s/%s appears twice in the manifest (same inputs); run once",
                                            model.name, method, norm)
                                continue
                            seen.add(jid)
                            yield Job(jid, model, sha, method, norm, output, region, self.solver, self.options,
                                      self.device, self.lower_bound, expect)

    def count(self) -> int:
        """Number of jobs (expands once without keeping them)."""
        return sum(1 for _ in self.jobs())


def as_manifest(manifest) -> Manifest:
    """A :class:`Manifest` from a Manifest, a file path or a dict (relative paths: the working directory)."""
    if isinstance(manifest, Manifest):
        return manifest
    if isinstance(manifest, (str, Path)):
        return Manifest.from_file(manifest)
    if isinstance(manifest, Mapping):
        return Manifest.from_dict(manifest)
    raise TypeError(f"manifest must be a lipbound.batch.Manifest, a path or a dict, got {type(manifest).__name__}.")
