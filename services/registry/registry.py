"""The model registry: immutable, content-addressed model versions with lineage.

A version is a set of blobs (the framework files, by sha256) plus an index entry holding
the ``model.yaml`` content and the lineage (framework version, git commit, datasets,
metrics, author, time). Versions are integers as strings, assigned inside one
``Store.update_index`` change (under the lock of a directory, by compare-and-swap on an object
store), and never rewritten; identical content registered again returns the existing version.

Reads go through a ``RegistrySnapshot``: one read of the index answers every lookup made from it,
so resolving all the models of a stack costs one request to an object store, not one per model.
A version's files are materialized on first use of ``ModelVersion.path`` (a local registry does it
at once, in ``<registry>/models/NAME/VERSION`` as it always has; an object-store registry in the
cache, ``<cache>/checkouts/``), and ``export`` streams them from the blobs.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from pydantic import ValidationError

from services.registry.cache import BlobCache
from services.registry.location import REGISTRY_ENV, RegistryLocation, parse_location, registry_location
from services.registry.store import BadIndex, LocalStore, RegistryError, Store
from services.serving import names
from services.serving.artifact import (
    ARTIFACT_ROOT,
    MODEL_YAML,
    ArtifactError,
    FileEntry,
    Framework,
    ModelSpec,
    artifact_file,
    format_validation_error,
    read_spec,
    verify_files,
    write_spec,
)
from services.serving.paths import tree_files

LATEST = "latest"  # built-in alias: the highest version
# Python distributions whose version is recorded for each framework (runtime first).
_FRAMEWORK_DISTS: dict[str, tuple[str, ...]] = {
    "pytorch": ("torch",),
    "keras": ("keras",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "onnx": ("onnxruntime", "onnx"),
}


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
    # Full match on the reference as given: "mlp:1\n" is refused, not trimmed into another version's path.
    m = names.MODEL_REF.fullmatch(ref) if isinstance(ref, str) else None
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


class _Blobs:
    """Where a version's files come from: its blobs in a store (materialize and export read them)."""

    def __init__(self, store: Store, blobs: dict[str, str]) -> None:
        self.store = store
        self.blobs = blobs  # relative path -> sha256

    def write(self, d: Path, spec: ModelSpec) -> None:
        """Every file, streamed from its blob and checked against its sha256, then model.yaml."""
        for f in spec.files:
            sub = {r: s for r, s in self.blobs.items() if r == f.path or r.startswith(f.path + "/")}
            if _expected_tree(f, sub) != f.sha256:
                raise RegistryError(
                    f"{self.store.url}: {spec.name}:{spec.version}: stored blobs don't add up to the sha256 of "
                    f"{f.path!r} in model.yaml; run `dlstack models verify`"
                )
        for rel, sha in self.blobs.items():
            self.store.get_blob(sha, d / rel)
        write_spec(d, spec)

    def materialize(self, checkout: Path, spec: ModelSpec) -> None:
        """Build ``checkout`` if it is absent (a fresh clone, another machine): read-only, renamed into place."""
        if (checkout / MODEL_YAML).is_file():
            return
        checkout.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=checkout.parent, prefix=f".{checkout.name}."))
        try:
            self.write(tmp, spec)
            for p in tmp.rglob("*"):
                if p.is_file():
                    p.chmod(0o444)
            try:
                tmp.rename(checkout)
            except OSError as exc:
                if not (checkout / MODEL_YAML).is_file():  # else: lost a race to a concurrent reader, fine
                    # Something else sits where the checkout goes (a file, a directory without model.yaml).
                    raise RegistryError(
                        f"{checkout}: cannot put the checkout of {spec.name}:{spec.version} there ({exc.strerror}); "
                        "move that path away and retry"
                    ) from None
        finally:
            if tmp.exists():
                _make_writable(tmp)
                shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class ModelVersion:
    """One immutable registered version; ``path`` is a ready artifact directory (materialized on first use)."""

    name: str  # model name (DNS-1123 label)
    version: str  # "1", "2", ...
    framework: str  # pytorch | keras | tensorflow | onnx
    sha256: str  # ModelSpec.sha256: one digest for the model files
    spec: ModelSpec  # the model.yaml content, version set
    checkout: Path  # where ``path`` materializes the artifact (model.yaml + files)
    created: str = ""  # ISO-8601 UTC registration time
    author: str = ""  # git user.name or $USER
    framework_version: str | None = None  # e.g. "torch==2.13.0"
    git_commit: str | None = None  # commit of the working tree at registration; None outside git
    git_dirty: bool = False  # True when the working tree had uncommitted changes
    datasets: tuple[DatasetRef, ...] = ()  # training data lineage
    metrics: dict[str, float | str] = field(default_factory=dict)  # e.g. {"accuracy": 0.97}
    note: str | None = None  # free text
    aliases: tuple[str, ...] = ()  # aliases pointing at this version
    source: _Blobs | None = field(default=None, repr=False, compare=False)  # None: ``checkout`` is all there is

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def path(self) -> Path:
        """The artifact directory inside the registry (or its cache); read it, never edit it."""
        if self.source is not None:
            self.source.materialize(self.checkout, self.spec)
        return self.checkout

    def export(self, dest: Path | str) -> Path:
        """Write a standalone artifact directory (for the image build) and return ``dest``.

        ``dest`` must be absent, empty or a previous artifact of this model (replaced as a whole, with
        renames); anything else is refused (``services.outdir``). Files are streamed from the registry's
        blobs (through the cache for an object store) and checked against their sha256 as they are
        written; no file is ever held in memory.
        """
        from services import outdir

        label = "export directory"
        recognise = outdir.artifact(self.name, label=label, force_hint=False)
        with outdir.replace_dir(dest, label=label, what="artifact", recognise=recognise) as d:
            self._write_export(d)
        return Path(dest)

    def _write_export(self, d: Path) -> None:
        if self.source is not None:
            self.source.write(d, self.spec)
        else:
            verify_files(self.checkout, self.spec)
            for f in self.spec.files:
                src = self.checkout / f.path
                if src.is_dir():
                    shutil.copytree(src, d / f.path, dirs_exist_ok=True)
                else:
                    (d / f.path).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, d / f.path)
            write_spec(d, self.spec)
        _make_writable(d)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (``models show --json``); ``path`` is where the files are (or will be)."""
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
            "path": str(self.checkout),
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
    for i, entry in enumerate(spec.files):
        what = f"{artifact / MODEL_YAML}: files[{i}].path"
        p = artifact_file(artifact, entry.path, what)  # inside the artifact, no FIFO or device
        if p.is_dir():
            files = tree_files(p, artifact, f"{what} {entry.path!r}", ARTIFACT_ROOT, ArtifactError)
            out += [(q.relative_to(artifact).as_posix(), q) for q in files]
        else:
            out.append((entry.path, p))
    return out


class RegistrySnapshot:
    """The registry as of one read of its index: every lookup answers from that read."""

    def __init__(self, registry: Registry, index: dict[str, Any]) -> None:
        self.registry = registry
        self.index = index

    def snapshot(self) -> RegistrySnapshot:
        return self

    def names(self) -> list[str]:
        return sorted(self.index["models"])

    def versions(self, name: str) -> list[ModelVersion]:
        model = self._model(name)
        return [self._version(name, v) for v in sorted(model["versions"], key=int)]

    def list_all(self) -> list[ModelVersion]:
        models = self.index["models"]
        return [self._version(n, v) for n in sorted(models) for v in sorted(models[n]["versions"], key=int)]

    def resolve(self, ref: str) -> ModelVersion:
        """``name:version`` or ``name@alias`` (``@latest`` built in) -> the version."""
        name, version, alias = parse_ref(ref)
        model = self._model(name)
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
        mv = self._version(name, version)
        if self.registry.location.local:
            mv.path  # noqa: B018 - a local registry keeps every resolved version checked out, as it always has
        return mv

    def get(self, name: str, version: str) -> ModelVersion:
        return self.resolve(f"{name}:{version}")

    def models_for_dataset(self, oid: str) -> list[ModelVersion]:
        """Lineage: every version trained on the dataset ``oid``."""
        return [mv for mv in self.list_all() if any(d.oid == oid for d in mv.datasets)]

    def _model(self, name: str) -> dict[str, Any]:
        return self.registry.model_entry(self.index, name)

    def _version(self, name: str, version: str) -> ModelVersion:
        model = self.index["models"][name]
        e = model["versions"][version]
        try:
            spec = ModelSpec.model_validate(e["spec"])
        except ValidationError as exc:
            raise RegistryError(
                f"{self.registry.url}: {name}:{version}: bad entry: {format_validation_error(exc)}"
            ) from exc
        return ModelVersion(
            name=name,
            version=version,
            framework=spec.framework.value,
            sha256=spec.sha256,
            spec=spec,
            checkout=self.registry.checkout_dir(name, version, e),
            created=e.get("created", ""),
            author=e.get("author", ""),
            framework_version=e.get("framework_version"),
            git_commit=e.get("git_commit"),
            git_dirty=bool(e.get("git_dirty", False)),
            datasets=tuple(DatasetRef(d["oid"], d.get("path")) for d in e.get("datasets", ())),
            metrics=dict(e.get("metrics", {})),
            note=e.get("note"),
            aliases=tuple(sorted(a for a, v in model["aliases"].items() if v == version)),
            source=_Blobs(self.registry.store, dict(e["blobs"])),
        )


class Registry:
    """The registry at ``location`` (``registry_location()`` when None: --registry > env > default).

    ``location`` is a directory or an object-store URL (``services.registry.location``); ``store``
    overrides the storage built from it (tests), ``cache`` the local blob cache of an object store.
    """

    def __init__(
        self,
        location: RegistryLocation | str | PurePath | None = None,
        store: Store | None = None,
        cache: BlobCache | None = None,
    ) -> None:
        if isinstance(location, RegistryLocation):
            self.location = location
        elif location is None:
            self.location = registry_location()
        else:
            self.location = parse_location(location, "--registry")
        self.url = self.location.url
        self.cache = cache if cache is not None else BlobCache()
        if store is None:
            if self.location.local:
                store = LocalStore(self.location.path)
            else:
                from services.registry.objectstore import ObjectStore

                store = ObjectStore(self.location, self.cache)
        self.store: Store = store

    @classmethod
    def for_stack(
        cls, stack_value: str | None, flag: str | PurePath | None = None, stack_source: str = "dlstack:registry"
    ) -> Registry:
        """The registry a stack uses: ``--registry`` > ``$DLSTACK_REGISTRY`` > its ``dlstack:registry`` > default.

        A relative directory in a stack file is taken from the repository root, where stack files live.
        """
        root = Path(__file__).resolve().parents[2]
        return cls(registry_location(flag, stack_value, stack_source, stack_base=root))

    @property
    def root(self) -> Path:
        """The directory of a local registry (an object-store registry has none: use ``url``)."""
        return self.location.path

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    def checkout_dir(self, name: str, version: str, entry: dict[str, Any]) -> Path:
        """Where a version's files are materialized.

        A local registry: ``<registry>/models/NAME/VERSION``, as before. An object store's versions go
        to the cache under the hash of their index entry, so two registries (or a bucket emptied and
        refilled) can never serve each other's files under the same NAME:VERSION.
        """
        if self.location.local:
            return self.location.path / "models" / name / version
        key = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()
        return self.cache.root / "checkouts" / f"{name}-{version}-{key[:24]}"

    def model_entry(self, index: dict[str, Any], name: str) -> dict[str, Any]:
        if name not in index["models"]:
            known = ", ".join(sorted(index["models"])) or "none"
            raise RegistryError(
                f"model {name!r} is not in the registry {self.url} (models: {known}); "
                f"add it with `dlstack models register PATH --name {name} --framework F`"
            )
        model: dict[str, Any] = index["models"][name]
        return model

    # ---- reading: each call is one read of the index; use snapshot() for many lookups ----------

    def snapshot(self) -> RegistrySnapshot:
        """One read of the index, for any number of lookups."""
        return RegistrySnapshot(self, self.store.read_index())

    def names(self) -> list[str]:
        return self.snapshot().names()

    def versions(self, name: str) -> list[ModelVersion]:
        return self.snapshot().versions(name)

    def list_all(self) -> list[ModelVersion]:
        return self.snapshot().list_all()

    def resolve(self, ref: str) -> ModelVersion:
        """``name:version`` or ``name@alias`` (``@latest`` built in) -> the version."""
        return self.snapshot().resolve(ref)

    def get(self, name: str, version: str) -> ModelVersion:
        return self.resolve(f"{name}:{version}")

    def models_for_dataset(self, oid: str) -> list[ModelVersion]:
        """Lineage: every version trained on the dataset ``oid``."""
        return self.snapshot().models_for_dataset(oid)

    # ---- writing: every change of the index is one update_index call -----------------------

    def update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Apply ``change`` to the index atomically (lock or compare-and-swap; see ``Store.update_index``)."""
        return self.store.update_index(change)

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
        # Blobs first, outside the index change: content-addressed, so concurrent puts are harmless,
        # and a writer that dies here leaves only unreferenced blobs, never a broken index.
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

        def add(index: dict[str, Any]) -> tuple[str, bool]:
            # Runs again on the re-read index after a lost compare-and-swap: the version is
            # assigned from the index that is actually replaced, so no two writers share one.
            model = index["models"].setdefault(name, {"aliases": {}, "versions": {}})
            for v, e in model["versions"].items():
                if e["content_key"] == key:
                    return v, False
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
            return version, True

        version, created = self.update(add)
        return Registration(self.resolve(f"{name}:{version}"), created=created)

    def set_alias(self, name: str, alias: str, version: str) -> ModelVersion:
        if not names.matches(names.ALIAS, alias) or alias == LATEST:
            raise RegistryError(
                f"alias {alias!r} is invalid: use a letter then letters, digits, '_', '.', '-' (and not {LATEST!r})"
            )

        def point(index: dict[str, Any]) -> None:
            model = self.model_entry(index, name)
            if version not in model["versions"]:
                raise RegistryError(f"model {name!r} has no version {version!r}; see `dlstack models show {name}`")
            model["aliases"][alias] = version

        self.update(point)
        return self.resolve(f"{name}:{version}")

    def verify(self, only: str | None = None) -> list[str]:
        """Re-hash every stored blob and materialized file (or those of ``only``, a NAME:VERSION); one line per problem.

        Blobs are read from the store itself, never from the cache, so bit rot in a bucket is found.
        """
        problems: list[str] = []
        try:
            index = self.store.read_index()
        except BadIndex as exc:  # a structurally wrong index is a finding of verify, one line per problem
            return list(exc.problems)
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
                checkout = self.checkout_dir(name, version, e)
                if (checkout / MODEL_YAML).is_file():
                    try:
                        verify_files(checkout, spec)
                        if read_spec(checkout) != spec:
                            problems.append(f"{ref}: {checkout / MODEL_YAML} was edited")
                    except ArtifactError as exc:
                        problems.append(f"{ref}: {exc.message}")
        return problems

    def repair_checkout(self, ref: str) -> ModelVersion:
        """Delete a materialized copy and rebuild it from verified blobs."""
        mv = self.snapshot().resolve(ref)
        if mv.checkout.exists():
            _make_writable(mv.checkout)
            shutil.rmtree(mv.checkout)
        mv.path  # noqa: B018 - materializes it again
        return mv


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
    "RegistrySnapshot",
    "framework_version",
    "parse_ref",
]
