"""The model artifact: a directory with a ``model.yaml`` and the framework file(s).

``model.yaml`` is the one contract between ``dlstack package``, the registry, the
image build and the server. Everything in it is validated here, once.
"""

from __future__ import annotations

import hashlib
import io
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.serving import names
from services.serving.atomic import atomic_write
from services.serving.errors import UserError
from services.serving.paths import check_relative, inside, tree_files

MODEL_YAML = "model.yaml"
ARTIFACT_ROOT = "the artifact directory"  # how messages name the root every files[].path must stay in
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?")  # Kubernetes label value, used with fullmatch
# Rows per forward pass when model.yaml leaves serving.max_batch_size unset and every input has a variable
# batch dim. Measured on the MLP (tests/bench): batching off had a worse p99 than the naive server; 8 rows
# cost a small model ~the time of one, and a batch only waits max_batch_time_ms (2 ms) to fill.
AUTO_MAX_BATCH_SIZE = 8


class ArtifactError(UserError):
    """An artifact is malformed, incomplete or corrupted; the message says how to fix it."""


class Framework(StrEnum):
    PYTORCH = "pytorch"
    KERAS = "keras"
    TENSORFLOW = "tensorflow"
    ONNX = "onnx"


class Datatype(StrEnum):
    """Open Inference Protocol V2 tensor datatypes."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BYTES = "BYTES"

    @property
    def numpy(self) -> np.dtype[Any]:
        return np.dtype(_TO_NUMPY[self])

    @classmethod
    def from_numpy(cls, dtype: np.dtype[Any] | type) -> Datatype:
        kind = np.dtype(dtype)
        for dt, np_name in _TO_NUMPY.items():
            if np.dtype(np_name) == kind:
                return dt
        if kind.kind in ("U", "S", "O"):
            return cls.BYTES
        raise ArtifactError(f"numpy dtype {kind} has no V2 datatype")


_TO_NUMPY: dict[Datatype, str] = {
    Datatype.BOOL: "bool",
    Datatype.UINT8: "uint8",
    Datatype.UINT16: "uint16",
    Datatype.UINT32: "uint32",
    Datatype.UINT64: "uint64",
    Datatype.INT8: "int8",
    Datatype.INT16: "int16",
    Datatype.INT32: "int32",
    Datatype.INT64: "int64",
    Datatype.FP16: "float16",
    Datatype.FP32: "float32",
    Datatype.FP64: "float64",
    Datatype.BYTES: "object",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One named input or output tensor."""

    name: str  # tensor name as the model and the protocol see it
    datatype: Datatype  # V2 datatype, e.g. FP32
    shape: tuple[int, ...]  # dims; -1 marks a variable dim (dim 0 is the batch dim)

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < -1 or d == 0 for d in v):
            raise ValueError(f"dims must be positive or -1 (variable), got {list(v)}")
        return v

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(s == -1 or s == g for s, g in zip(self.shape, shape, strict=True))


class Signature(_Strict):
    inputs: tuple[TensorSpec, ...]  # at least one
    outputs: tuple[TensorSpec, ...]  # at least one

    @property
    def variable_batch(self) -> bool:
        """Dim 0 of every input is -1: requests can be stacked into one batch."""
        return all(t.shape and t.shape[0] == -1 for t in self.inputs)

    @model_validator(mode="after")
    def _unique(self) -> Signature:
        for side in ("inputs", "outputs"):
            specs = getattr(self, side)
            if not specs:
                raise ValueError(f"signature.{side} must list at least one tensor")
            names = [t.name for t in specs]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"signature.{side} has duplicate names: {dupes}")
        return self


class FileEntry(_Strict):
    path: str  # relative to the artifact dir; a directory for a SavedModel
    sha256: str  # hex digest of the file, or of the directory tree (see tree_sha256)

    @field_validator("path")
    @classmethod
    def _inside(cls, v: str) -> str:
        # Syntax only (no disk access): "../x", "/etc/passwd" are refused wherever a spec is read,
        # model.yaml or a registry index; symlinks and FIFOs are checked when files are opened.
        return check_relative(v, ARTIFACT_ROOT)


class Serving(_Strict):
    """Per-model serving settings; env vars and CLI flags override them."""

    # default None = auto: AUTO_MAX_BATCH_SIZE (8) for a variable batch dim, else 1 (off); rows per forward pass
    max_batch_size: int | None = Field(default=None, ge=1)
    max_batch_time_ms: float = Field(default=2.0, ge=0)  # default 2 ms; wait for a batch to fill
    threads: int | None = Field(default=None, ge=1)  # default None = CPU limit / workers; intra-op threads
    keras_backend: str = "torch"  # default torch, so TensorFlow is not needed for .keras models
    reject_nonfinite: bool = False  # default False; True answers 400 to NaN/Inf inputs
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)  # default 16 MiB request limit


class ModelSpec(_Strict):
    """The content of ``model.yaml``."""

    name: str  # DNS-1123 label, e.g. "mnist-mlp"
    version: str = "1"  # immutable version string
    framework: Framework
    files: tuple[FileEntry, ...]  # the framework file(s) with their sha256
    signature: Signature
    serving: Serving = Serving()
    metadata: dict[str, Any] = Field(default_factory=dict)  # free-form (registry lineage etc.)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        # It becomes a Kubernetes label value and a path segment: full match, so "1\n" or "1/../x" never pass.
        if len(v) > 63 or not _LABEL_VALUE.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a version: use letters, digits, '.', '_' and '-', starting and ending with a "
                "letter or digit, at most 63 (e.g. 1 or 2)"
            )
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not names.matches(names.DNS_LABEL, v):  # full match: "mlp\n" is not a name
            raise ValueError(f"{v!r} is not a DNS-1123 label (lowercase letters, digits and '-', max 63)")
        return v

    @property
    def max_batch_size(self) -> int:
        """``serving.max_batch_size``, or when unset (auto) 8 if the signature's batch dim is variable, else 1."""
        if self.serving.max_batch_size is not None:
            return self.serving.max_batch_size
        return AUTO_MAX_BATCH_SIZE if self.signature.variable_batch else 1

    @property
    def sha256(self) -> str:
        """One digest for the whole model: the digests of its files, in order."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.path}\0{f.sha256}\n".encode())
        return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(path: Path, root: Path | None = None, what: str = "") -> str:
    """sha256 of a file, or of a directory as (relative path, file digest) lines in sorted order.

    A directory's entries are checked first (``services.serving.paths.tree_files``): a FIFO or a symlink out of
    ``root`` (default ``path``) is an ArtifactError naming ``what``, never hashed or waited on.
    """
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in tree_files(path, root, what, ARTIFACT_ROOT, ArtifactError):
        h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def _yaml() -> Any:
    from ruamel.yaml import YAML

    y = YAML(typ="safe", pure=True)
    y.default_flow_style = None
    y.width = 4096  # never fold a sha256 onto its own line
    return y


def read_spec(artifact_dir: Path | str) -> ModelSpec:
    """Parse and validate ``model.yaml`` without touching the model files."""
    d = Path(artifact_dir)
    path = d / MODEL_YAML
    if not path.is_file():
        raise ArtifactError(
            f"{d}: no {MODEL_YAML}; create the artifact with `dlstack package MODEL_FILE ... --out {d}`"
        )
    try:
        raw = _yaml().load(path.read_text())
    except Exception as exc:  # ruamel raises many types; all mean "not YAML"
        raise ArtifactError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a mapping at the top level")
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{path}: {format_validation_error(exc)}") from exc


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"]).replace(".[", "[")
        msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own validators' messages
        parts.append(f"{loc or '<root>'}: {msg}")
    return "; ".join(parts)


def verify_files(artifact_dir: Path | str, spec: ModelSpec) -> None:
    """Re-hash every file; raise naming the first missing or corrupted one."""
    d = Path(artifact_dir)
    for i, f in enumerate(spec.files):
        what = f"{d / MODEL_YAML}: files[{i}]"
        if not names.matches(names.SHA256, f.sha256):
            raise ArtifactError(
                f"{what}.sha256 {f.sha256!r} is not a sha256 (64 lowercase hex digits); re-package the model"
            )
        p = artifact_file(d, f.path, f"{what}.path")
        if not p.exists():
            raise ArtifactError(f"{d}: file {f.path!r} listed in {MODEL_YAML} is missing")
        got = tree_sha256(p, d, f"{what}.path {f.path!r}")
        if got != f.sha256:
            raise ArtifactError(
                f"{d}: file {f.path!r} is corrupted or was changed: sha256 {got} != {f.sha256} in {MODEL_YAML}; "
                "re-package the model or restore the file"
            )


def artifact_file(artifact_dir: Path, rel: str, what: str) -> Path:
    """``artifact_dir / rel`` after the one path check (``paths.inside``): inside, no FIFO, no device."""
    return inside(artifact_dir, rel, what, ARTIFACT_ROOT, ArtifactError)


def load_spec(artifact_dir: Path | str) -> ModelSpec:
    """Read and verify an artifact: the server calls this before loading the model."""
    spec = read_spec(artifact_dir)
    verify_files(artifact_dir, spec)
    return spec


def write_spec(artifact_dir: Path | str, spec: ModelSpec) -> Path:
    """Write ``model.yaml`` atomically (temp file + rename), readable by the image's non-root user."""
    buf = io.StringIO()
    # None means "unset" (threads: CPU split, max_batch_size: auto): left out, as a person would write it
    _yaml().dump(spec.model_dump(mode="json", exclude_none=True), buf)
    return atomic_write(Path(artifact_dir) / MODEL_YAML, buf.getvalue(), mode=0o644)
