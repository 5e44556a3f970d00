"""The model registry: immutable, content-addressed model versions with lineage.

A version is a set of blobs (the framework files, by sha256) plus an index entry holding
the ``model.yaml`` content and the lineage (framework version, git commit, datasets,
metrics, author, time). Versions are integers as strings, assigned under the store lock,
and never rewritten; identical content registered again returns the existing version.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from services.artifact import (
    MODEL_YAML,
    ArtifactError,
    FileEntry,
    Framework,
    ModelSpec,
    format_validation_error,
    read_spec,
    verify_files,
    write_spec,
)
from services.registry.store import LocalStore, RegistryError, Store

REGISTRY_ENV = "DLSTACK_REGISTRY"
LATEST = "latest"  # built-in alias: the highest version
_REF_RE = re.compile(
    r"^(?P<name>[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(?::(?P<version>[0-9]+)|@(?P<alias>[A-Za-z0-9_.-]+))?$"
)
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")
# Python distributions whose version is recorded for each framework (runtime first).
_FRAMEWORK_DISTS: dict[str, tuple[str, ...]] = {
    "pytorch": ("torch",),
    "keras": ("keras",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "onnx": ("onnxruntime", "onnx"),
}


def default_root() -> Path:
    """``$DLSTACK_REGISTRY``, else ``.registry`` at the git toplevel of the CWD, else in the CWD."""
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return Path(env)
    top = git_output(["rev-parse", "--show-toplevel"], Path.cwd())
    return Path(top or Path.cwd()) / ".registry"


def git_output(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def framework_version(framework: str) -> str | None:
    """Installed version of the framework's runtime, from package metadata (no import)."""
    for dist in _FRAMEWORK_DISTS.get(framework, ()):
        try:
            return f"{dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``name``, ``name:version`` or ``name@alias`` -> (name, version, alias)."""
    m = _REF_RE.match(ref.strip())
    if not m:
        raise RegistryError(
            f"{ref!r} is not a model reference; "
            "use NAME:VERSION (e.g. mnist-mlp:3) or NAME@ALIAS (e.g. mnist-mlp@champion)"
        )
    return m["name"], m["version"], m["alias"]


@dataclass(frozen=True)
class DatasetRef:
    oid: str  # Git LFS oid = sha256 of the content
    path: str | None = None  # repo path when it was given as a path; None when given as an oid


@dataclass(frozen=True)
class ModelVersion:
    """One immutable registered version; ``path`` is a ready artifact directory."""

    name: str  # model name (DNS-1123 label)
    version: str  # "1", "2", ...
    framework: str  # pytorch | keras | tensorflow | onnx
    sha256: str  # ModelSpec.sha256: one digest for the model files
    spec: ModelSpec  # the model.yaml content, version set
    path: Path  # artifact dir inside the registry (model.yaml + files); read it, never edit it
    created: str = ""  # ISO-8601 UTC registration time
    author: str = ""  # git user.name or $USER
    framework_version: str | None = None  # e.g. "torch==2.13.0"
    git_commit: str | None = None  # commit of the working tree at registration; None outside git
    git_dirty: bool = False  # True when the working tree had uncommitted changes
    datasets: tuple[DatasetRef, ...] = ()  # training data lineage
    metrics: dict[str, float | str] = field(default_factory=dict)  # e.g. {"accuracy": 0.97}
    note: str | None = None  # free text
    aliases: tuple[str, ...] = ()  # aliases pointing at this version

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def export(self, dest: Path | str) -> Path:
        """Write a standalone artifact directory (for the image build); refuses a non-empty ``dest``."""
        d = Path(dest)
        if d.exists() and any(d.iterdir()):
            raise RegistryError(f"{d} is not empty; export into a new or empty directory")
        verify_files(self.path, self.spec)
        d.mkdir(parents=True, exist_ok=True)
        for f in self.spec.files:
            src = self.path / f.path
            if src.is_dir():
                shutil.copytree(src, d / f.path, dirs_exist_ok=True)
            else:
                (d / f.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, d / f.path)
        write_spec(d, self.spec)
        _make_writable(d)
        return d

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (``models show --json``)."""
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "framework": self.framework,
            "framework_version": self.framework_version,
            "sha256": self.sha256,
            "created": self.created,
            "author": self.author,
            "git_commit": self.git_commit,
            "git_dirty": self.git_dirty,
            "datasets": [{"oid": d.oid, "path": d.path} for d in self.datasets],
            "metrics": dict(self.metrics),
            "note": self.note,
            "aliases": list(self.aliases),
            "signature": self.spec.signature.model_dump(mode="json"),
            "path": str(self.path),
        }


@dataclass(frozen=True)
class Registration:
    version: ModelVersion  # the registered (or already existing) version
    created: bool  # False when identical content was already registered


def _make_writable(d: Path) -> None:
    for p in [d, *d.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)


def _content_key(spec: ModelSpec) -> str:
    """Identity of a version: files + framework + signature + serving (not lineage or version)."""
    body = {
        "files": spec.sha256,
        "framework": spec.framework.value,
        "signature": spec.signature.model_dump(mode="json"),
        "serving": spec.serving.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _files_of(artifact: Path, spec: ModelSpec) -> list[tuple[str, Path]]:
    """(relative path, absolute path) of every regular file the spec's entries cover."""
    out: list[tuple[str, Path]] = []
    for entry in spec.files:
        p = artifact / entry.path
        if p.is_dir():
            out += [(q.relative_to(artifact).as_posix(), q) for q in sorted(p.rglob("*")) if q.is_file()]
        else:
            out.append((entry.path, p))
    return out


class Registry:
    """``Registry(root)`` over a ``Store``; ``root`` defaults to ``default_root()``."""

    def __init__(self, root: Path | str | None = None, store: Store | None = None) -> None:
        self.root = (Path(root) if root is not None else default_root()).absolute()
        self.store: Store = store if store is not None else LocalStore(self.root)

    # ---- reading -------------------------------------------------------------------------

    def _index(self) -> dict[str, Any]:
        return self.store.read_index()

    def names(self) -> list[str]:
        return sorted(self._index()["models"])

    def versions(self, name: str) -> list[ModelVersion]:
        index = self._index()
        model = self._model(index, name)
        return [self._version(index, name, v) for v in sorted(model["versions"], key=int)]

    def list_all(self) -> list[ModelVersion]:
        index = self._index()
        return [
            self._version(index, n, v)
            for n in sorted(index["models"])
            for v in sorted(index["models"][n]["versions"], key=int)
        ]

    def resolve(self, ref: str) -> ModelVersion:
        """``name:version`` or ``name@alias`` (``@latest`` built in) -> the version, materialized."""
        name, version, alias = parse_ref(ref)
        index = self._index()
        model = self._model(index, name)
        if version is None:
            alias = alias or LATEST
            if alias == LATEST and LATEST not in model["aliases"]:
                version = max(model["versions"], key=int)
            elif alias in model["aliases"]:
                version = model["aliases"][alias]
            else:
                known = ", ".join(sorted(model["aliases"])) or "none"
                raise RegistryError(
                    f"model {name!r} has no alias {alias!r} (aliases: {known}); "
                    f"set it with `dlstack models alias set {name} {alias} VERSION`"
                )
        if version not in model["versions"]:
            known = ", ".join(sorted(model["versions"], key=int))
            raise RegistryError(
                f"model {name!r} has no version {version!r} (versions: {known}); "
                f"list them with `dlstack models show {name}`"
            )
        mv = self._version(index, name, version)
        self._materialize(mv, index["models"][name]["versions"][version])
        return mv

    def get(self, name: str, version: str) -> ModelVersion:
        return self.resolve(f"{name}:{version}")

    def models_for_dataset(self, oid: str) -> list[ModelVersion]:
        """Lineage: every version trained on the dataset ``oid``."""
        return [mv for mv in self.list_all() if any(d.oid == oid for d in mv.datasets)]

    def _model(self, index: dict[str, Any], name: str) -> dict[str, Any]:
        if name not in index["models"]:
            known = ", ".join(sorted(index["models"])) or "none"
            raise RegistryError(
                f"model {name!r} is not in the registry {self.root} (models: {known}); "
                f"add it with `dlstack models register PATH --name {name} --framework F`"
            )
        model: dict[str, Any] = index["models"][name]
        return model

    def _version(self, index: dict[str, Any], name: str, version: str) -> ModelVersion:
        model = index["models"][name]
        e = model["versions"][version]
        try:
            spec = ModelSpec.model_validate(e["spec"])
        except ValidationError as exc:
            raise RegistryError(f"{self.root}: {name}:{version}: bad entry: {format_validation_error(exc)}") from exc
        return ModelVersion(
            name=name,
            version=version,
            framework=spec.framework.value,
            sha256=spec.sha256,
            spec=spec,
            path=self.root / "models" / name / version,
            created=e.get("created", ""),
            author=e.get("author", ""),
            framework_version=e.get("framework_version"),
            git_commit=e.get("git_commit"),
            git_dirty=bool(e.get("git_dirty", False)),
            datasets=tuple(DatasetRef(d["oid"], d.get("path")) for d in e.get("datasets", ())),
            metrics=dict(e.get("metrics", {})),
            note=e.get("note"),
            aliases=tuple(sorted(a for a, v in model["aliases"].items() if v == version)),
        )

    def _materialize(self, mv: ModelVersion, entry: dict[str, Any]) -> None:
        """Build ``mv.path`` from blobs if it is absent (a fresh clone, another machine)."""
        if (mv.path / MODEL_YAML).is_file():
            return
        mv.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=mv.path.parent, prefix=f".{mv.version}."))
        try:
            for rel, sha in entry["blobs"].items():
                self.store.get_blob(sha, tmp / rel)
            write_spec(tmp, mv.spec)
            for p in tmp.rglob("*"):
                if p.is_file():
                    p.chmod(0o444)
            try:
                tmp.rename(mv.path)
            except OSError:
                if not (mv.path / MODEL_YAML).is_file():  # lost a race to a concurrent reader: fine
                    raise
        finally:
            if tmp.exists():
                _make_writable(tmp)
                shutil.rmtree(tmp, ignore_errors=True)

    # ---- writing -------------------------------------------------------------------------

    def register(
        self,
        path: Path | str,
        name: str,
        framework: str,
        datasets: tuple[DatasetRef, ...] = (),
        metrics: dict[str, float | str] | None = None,
        note: str | None = None,
    ) -> Registration:
        """Store an artifact directory as the next version of ``name`` (or return the identical one)."""
        artifact = Path(path)
        try:
            fw = Framework(framework)
        except ValueError:
            raise RegistryError(
                f"--framework {framework!r} is not one of {', '.join(f.value for f in Framework)}"
            ) from None
        spec = read_spec(artifact)
        if spec.framework != fw:
            raise RegistryError(f"{artifact}: model.yaml says framework {spec.framework.value!r}, not {fw.value!r}")
        try:
            verify_files(artifact, spec)
        except ArtifactError as exc:
            raise RegistryError(exc.message) from exc
        try:
            spec = ModelSpec.model_validate({**spec.model_dump(mode="json"), "name": name})
        except ValidationError as exc:
            raise RegistryError(f"--name {name!r}: {format_validation_error(exc)}") from exc
        # Blobs first, outside the lock: they are content-addressed, so concurrent puts are harmless.
        blobs = {rel: self.store.put_blob(p) for rel, p in _files_of(artifact, spec)}
        key = _content_key(spec)
        lineage = {
            "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "author": _author(),
            "framework_version": framework_version(fw.value),
            "datasets": [{"oid": d.oid, "path": d.path} for d in datasets],
            "metrics": dict(metrics or {}),
            "note": note,
            **_git_state(),
        }
        with self.store.lock():
            index = self._index()
            model = index["models"].setdefault(name, {"aliases": {}, "versions": {}})
            for v, e in model["versions"].items():
                if e["content_key"] == key:
                    return Registration(self.resolve(f"{name}:{v}"), created=False)
            version = str(max((int(v) for v in model["versions"]), default=0) + 1)
            final = spec.model_copy(
                update={"version": version, "metadata": {**spec.metadata, "registry": _meta(lineage)}}
            )
            model["versions"][version] = {
                "content_key": key,
                "spec": final.model_dump(mode="json"),
                "blobs": blobs,
                **lineage,
            }
            self.store.write_index(index)
        return Registration(self.resolve(f"{name}:{version}"), created=True)

    def set_alias(self, name: str, alias: str, version: str) -> ModelVersion:
        if not _ALIAS_RE.match(alias) or alias == LATEST:
            raise RegistryError(
                f"alias {alias!r} is invalid: use a letter then letters, digits, '_', '.', '-' (and not {LATEST!r})"
            )
        with self.store.lock():
            index = self._index()
            model = self._model(index, name)
            if version not in model["versions"]:
                raise RegistryError(f"model {name!r} has no version {version!r}; see `dlstack models show {name}`")
            model["aliases"][alias] = version
            self.store.write_index(index)
        return self.resolve(f"{name}:{version}")

    def verify(self, only: str | None = None) -> list[str]:
        """Re-hash every blob and materialized file (or those of ``only``, a NAME:VERSION); one line per problem."""
        problems: list[str] = []
        index = self._index()
        for name in sorted(index["models"]):
            for version, e in sorted(index["models"][name]["versions"].items(), key=lambda kv: int(kv[0])):
                ref = f"{name}:{version}"
                if only is not None and ref != only:
                    continue
                for rel, sha in sorted(e["blobs"].items()):
                    if not self.store.has_blob(sha):
                        problems.append(f"{ref}: {rel}: blob {sha} is missing")
                    elif (got := self.store.blob_sha256(sha)) != sha:
                        problems.append(f"{ref}: {rel}: blob is corrupted (sha256 {got}, expected {sha})")
                try:
                    spec = ModelSpec.model_validate(e["spec"])
                except ValidationError as exc:
                    problems.append(f"{ref}: bad model.yaml in the index: {format_validation_error(exc)}")
                    continue
                for f in spec.files:
                    sub = {r: s for r, s in e["blobs"].items() if r == f.path or r.startswith(f.path + "/")}
                    if _expected_tree(f, sub) != f.sha256:
                        problems.append(f"{ref}: {f.path}: stored blobs don't add up to the sha256 in model.yaml")
                checkout = self.root / "models" / name / version
                if (checkout / MODEL_YAML).is_file():
                    try:
                        verify_files(checkout, spec)
                        if read_spec(checkout) != spec:
                            problems.append(f"{ref}: {checkout / MODEL_YAML} was edited")
                    except ArtifactError as exc:
                        problems.append(f"{ref}: {exc.message}")
        return problems

    def repair_checkout(self, ref: str) -> ModelVersion:
        """Delete a materialized copy so the next ``resolve`` rebuilds it from verified blobs."""
        mv = self.resolve(ref)
        _make_writable(mv.path)
        shutil.rmtree(mv.path)
        return self.resolve(ref)


def _expected_tree(entry: FileEntry, blobs: dict[str, str]) -> str:
    """The ``tree_sha256`` the blobs would produce, without materializing them."""
    if list(blobs) == [entry.path]:
        return blobs[entry.path]
    h = hashlib.sha256()
    for rel in sorted(blobs, key=lambda r: PurePosixPath(r).parts):
        h.update(f"{rel[len(entry.path) + 1 :]}\0{blobs[rel]}\n".encode())
    return h.hexdigest()


def _meta(lineage: dict[str, Any]) -> dict[str, Any]:
    return {k: lineage[k] for k in ("created", "author", "framework_version", "git_commit", "git_dirty", "datasets")}


def _author() -> str:
    return git_output(["config", "user.name"], Path.cwd()) or os.environ.get("USER") or getpass.getuser()


def _git_state() -> dict[str, Any]:
    cwd = Path.cwd()
    commit = git_output(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return {"git_commit": None, "git_dirty": False}
    dirty = bool(git_output(["status", "--porcelain", "--untracked-files=no"], cwd))
    return {"git_commit": commit, "git_dirty": dirty}


__all__ = [
    "LATEST",
    "REGISTRY_ENV",
    "DatasetRef",
    "ModelVersion",
    "Registration",
    "Registry",
    "default_root",
    "framework_version",
    "parse_ref",
]
