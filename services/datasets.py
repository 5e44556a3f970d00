"""Datasets in Git LFS: ``dlstack datasets add|list|show|verify`` and the manifest they keep.

The manifest (``stacks/datasets.yaml`` by default, ``$DLSTACK_DATASETS`` or ``--manifest``)
records each dataset's repo path, LFS oid (the sha256 of its content), size and
description. People edit it, so it is written with ruamel.yaml round-trip (comments and
order kept) and atomically. Models refer to datasets by oid; ``datasets show`` lists the
registered models trained on one (lineage).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.serving import names
from services.serving.atomic import atomic_write
from services.serving.errors import UserError
from services.serving.paths import inside, relative_problem

MANIFEST_ENV = "DLSTACK_DATASETS"
DEFAULT_MANIFEST = Path("stacks") / "datasets.yaml"
LFS_SPEC = "version https://git-lfs.github.com/spec/v1"
DEFAULT_THRESHOLD = 1 << 20  # blobs above 1 MiB committed without LFS are flagged
REPO_ROOT = "the repository"  # how messages name the root every manifest path must stay in
_HEADER = (
    "# Datasets tracked with Git LFS (`dlstack datasets add PATH`). Paths are relative to the repo root;\n"
    "# oid is the sha256 of the content (the Git LFS object id). Comments here are kept.\n"
)


class DatasetError(UserError):
    """A dataset, the manifest or the LFS set-up is wrong; the message says how to fix it."""


@dataclass(frozen=True)
class Dataset:
    path: str  # relative to the repo root, posix
    oid: str  # sha256 of the content (Git LFS oid)
    size: int  # bytes
    description: str = ""  # free text


# ---- git helpers ----------------------------------------------------------------------------


def _git(args: list[str], cwd: Path, check: bool = True, input_: str | None = None) -> str:
    try:
        res = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False, input=input_
        )
    except OSError as exc:
        raise DatasetError(f"git is not installed ({exc}); install git and git-lfs") from exc
    if check and res.returncode != 0:
        raise DatasetError(f"`git {' '.join(args)}` failed in {cwd}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def repo_root(start: Path) -> Path:
    d = start if start.is_dir() else start.parent
    d = d if d.exists() else Path.cwd()
    res = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=d, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise DatasetError(f"{start} is not inside a git repository; datasets live in the repo with Git LFS")
    return Path(res.stdout.strip())


def default_manifest() -> Path:
    env = os.environ.get(MANIFEST_ENV)
    if env:
        return Path(env)
    res = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False)
    root = Path(res.stdout.strip()) if res.returncode == 0 else Path.cwd()
    return root / DEFAULT_MANIFEST


def parse_pointer(data: bytes) -> tuple[str, int] | None:
    """(oid, size) of a Git LFS pointer file, or None when ``data`` is real content."""
    if len(data) > 1024 or not data.startswith(LFS_SPEC.encode()):
        return None
    fields = dict(line.split(" ", 1) for line in data.decode(errors="replace").splitlines() if " " in line)
    oid = fields.get("oid", "").removeprefix("sha256:")
    if not names.matches(names.SHA256, oid) or not fields.get("size", "").isdigit():
        return None
    return oid, int(fields["size"])


def content_oid(path: Path) -> tuple[str, int]:
    """(oid, size) of a working-tree file: from its pointer if LFS content isn't fetched, else hashed."""
    with path.open("rb") as fh:
        head = fh.read(1025)
    ptr = parse_pointer(head)
    if ptr:
        return ptr
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def lfs_tracked(repo: Path, rel: str) -> bool:
    out = _git(["check-attr", "filter", "--", rel], repo)
    return out.strip().endswith(": lfs")


# ---- the manifest ---------------------------------------------------------------------------


def _yaml() -> Any:
    from ruamel.yaml import YAML

    y = YAML()  # round-trip: keeps comments and key order
    y.indent(mapping=2, sequence=4, offset=2)
    y.preserve_quotes = True
    return y


def load_manifest(manifest: Path) -> Any:
    if not manifest.exists():
        doc = _yaml().load(_HEADER + "datasets: []\n")
        return doc
    try:
        doc = _yaml().load(manifest.read_text())
    except Exception as exc:  # ruamel raises many types; all mean "not YAML"
        raise DatasetError(f"{manifest}: not valid YAML: {exc}") from exc
    if doc is None:
        doc = _yaml().load(_HEADER + "datasets: []\n")
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), list):
        raise DatasetError(f"{manifest}: expected a mapping with a `datasets:` list")
    for i, e in enumerate(doc["datasets"]):
        missing = [k for k in ("path", "oid", "size") if not isinstance(e, dict) or k not in e]
        if missing:
            raise DatasetError(
                f"{manifest}: datasets[{i}] lacks {', '.join(missing)}; re-add it with `dlstack datasets add`"
            )
        # The path is joined to the repo root and handed to git and open(): "../x" or "/etc/passwd" never is.
        problem = relative_problem(e["path"], REPO_ROOT)
        if problem is not None:
            raise DatasetError(f"{manifest}: datasets[{i}].path {problem}")
        if not names.matches(names.SHA256, e["oid"]):
            raise DatasetError(
                f"{manifest}: datasets[{i}].oid {e['oid']!r} is not a sha256 (64 lowercase hex digits); "
                "re-add it with `dlstack datasets add`"
            )
        if not isinstance(e["size"], int) or isinstance(e["size"], bool) or e["size"] < 0:
            raise DatasetError(
                f"{manifest}: datasets[{i}].size {e['size']!r} is not a byte count; "
                "re-add it with `dlstack datasets add`"
            )
    return doc


def write_yaml_atomic(path: Path, doc: Any) -> None:
    """ruamel round-trip dump through a temp file + fsync + rename."""
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    atomic_write(path, buf.getvalue())


def datasets(manifest: Path | None = None) -> list[Dataset]:
    doc = load_manifest(manifest or default_manifest())
    return [
        Dataset(str(e["path"]), str(e["oid"]), int(e["size"]), str(e.get("description") or "")) for e in doc["datasets"]
    ]


def add(path: Path, description: str = "", manifest: Path | None = None) -> Dataset:
    """LFS-track ``path`` (unless a pattern already covers it) and record it in the manifest."""
    manifest = manifest or default_manifest()
    if not path.is_file():
        raise DatasetError(f"{path} is not a file; give the path of a dataset file inside the repo")
    if path.is_symlink():  # LFS would store the link, not the data; and its target may be in another repo
        raise DatasetError(f"{path} is a symlink; add the file it points to, inside the repo")
    repo = repo_root(path.resolve())
    rel = path.resolve().relative_to(repo).as_posix()
    if not lfs_tracked(repo, rel):
        _git(["lfs", "track", "--filename", rel], repo)
    oid, size = content_oid(path)
    doc = load_manifest(manifest)
    entry = next((e for e in doc["datasets"] if e["path"] == rel), None)
    if entry is None:
        from ruamel.yaml.comments import CommentedMap

        entry = CommentedMap()
        entry["path"] = rel
        doc["datasets"].append(entry)
    entry["oid"] = oid
    entry["size"] = size
    if description or "description" not in entry:
        entry["description"] = description
    write_yaml_atomic(manifest, doc)
    return Dataset(rel, oid, size, str(entry["description"]))


def find(ref: str, manifest: Path | None = None) -> Dataset:
    """A manifest entry by repo path or oid (a unique oid prefix of 8+ characters works)."""
    manifest = manifest or default_manifest()
    items = datasets(manifest)
    rel = ref
    p = Path(ref)
    if p.exists():
        with contextlib.suppress(DatasetError):
            rel = p.resolve().relative_to(repo_root(p.resolve())).as_posix()
    hits = [d for d in items if d.path in (ref, rel) or (len(ref) >= 8 and d.oid.startswith(ref))]
    if len(hits) != 1:
        why = "is ambiguous" if hits else "is not in"
        raise DatasetError(f"dataset {ref!r} {why} {manifest}; add it with `dlstack datasets add PATH`")
    return hits[0]


def resolve_dataset(ref: str, manifest: Path | None = None) -> Any:
    """A ``--dataset`` argument -> ``DatasetRef``: an oid as is, a path via the manifest or its content."""
    from services.registry import DatasetRef

    if names.matches(names.SHA256, ref):
        return DatasetRef(ref, None)
    try:
        d = find(ref, manifest)
        return DatasetRef(d.oid, d.path)
    except DatasetError:
        p = Path(ref)
        if not p.is_file():
            raise
    oid, _ = content_oid(p)  # same oid `git lfs pointer --file` computes
    try:
        rel = p.resolve().relative_to(repo_root(p.resolve())).as_posix()
    except DatasetError:
        rel = str(p)
    return DatasetRef(oid, rel)


def verify(manifest: Path | None = None, threshold: int = DEFAULT_THRESHOLD) -> list[str]:
    """One line per problem: manifest entries that don't match, large blobs committed without LFS."""
    manifest = manifest or default_manifest()
    repo = repo_root(manifest.resolve().parent if manifest.parent.exists() else Path.cwd())
    problems: list[str] = []
    for i, d in enumerate(datasets(manifest)):
        try:  # a symlink out of the repo, a FIFO (which would block the read) or a device is never read
            f = inside(repo, d.path, f"{manifest}: datasets[{i}].path", REPO_ROOT, DatasetError, dirs=False)
        except DatasetError as exc:
            problems.append(exc.message)
            continue
        if not lfs_tracked(repo, d.path):
            problems.append(f"{d.path}: not tracked by Git LFS; run `dlstack datasets add {d.path}`")
        staged = subprocess.run(["git", "cat-file", "-p", f":{d.path}"], cwd=repo, capture_output=True, check=False)
        if staged.returncode == 0:
            ptr = parse_pointer(staged.stdout)
            if ptr is None:
                problems.append(f"{d.path}: committed as a regular git blob, not an LFS pointer")
            elif ptr != (d.oid, d.size):
                problems.append(f"{d.path}: committed LFS pointer oid {ptr[0]} differs from the manifest oid {d.oid}")
        if not f.is_file():
            problems.append(f"{d.path}: missing from the working tree (oid {d.oid}); `git lfs pull` or restore it")
            continue
        oid, size = content_oid(f)
        if (oid, size) != (d.oid, d.size):
            problems.append(
                f"{d.path}: content sha256 {oid} ({size} bytes) does not match the manifest "
                f"({d.oid}, {d.size} bytes); the file changed: re-add it with `dlstack datasets add {d.path}`"
            )
    problems += large_non_lfs_blobs(repo, threshold)
    return problems


def large_non_lfs_blobs(repo: Path, threshold: int = DEFAULT_THRESHOLD) -> list[str]:
    """Files in the git index whose blob is larger than ``threshold`` and isn't an LFS pointer."""
    staged = _git(["ls-files", "-s", "-z"], repo)
    entries = [line.split("\t", 1) for line in staged.split("\0") if line]
    by_blob: dict[str, list[str]] = {}
    for meta, path in entries:
        mode, sha, _stage = meta.split()
        if mode != "160000":  # submodules have no blob
            by_blob.setdefault(sha, []).append(path)
    if not by_blob:
        return []
    out = _git(["cat-file", "--batch-check=%(objectname) %(objectsize)"], repo, input_="\n".join(by_blob) + "\n")
    problems = []
    for line in out.splitlines():
        sha, size = line.split()
        if int(size) > threshold:  # an LFS pointer is ~130 bytes, so anything this big is real content
            for path in by_blob[sha]:
                problems.append(
                    f"{path}: {int(size)} bytes committed without Git LFS; "
                    f"run `dlstack datasets add {path}` (or `git lfs track`) and `git lfs migrate import`"
                )
    return problems


# ---- CLI ------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    ds = subparsers.add_parser("datasets", help="datasets in Git LFS: add, list, show, verify")
    sub = ds.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)

    def add_parser(name: str, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        p.add_argument("--manifest", type=Path, help=f"manifest (default ${MANIFEST_ENV} or {DEFAULT_MANIFEST})")
        return p

    p = add_parser("add", "LFS-track a dataset file and record its oid in the manifest")
    p.add_argument("path", type=Path)
    p.add_argument("--description", default="", help="what the data is")
    p.set_defaults(func=cmd_add)
    p = add_parser("list", "list the manifest")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = add_parser("show", "one dataset and the registered models trained on it")
    p.add_argument("ref", help="repo path or oid")
    p.add_argument(
        "--registry", help="registry: a directory or s3://BUCKET/PREFIX (default $DLSTACK_REGISTRY or .registry)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)
    p = add_parser("verify", "check pointers and content against the manifest; flag large non-LFS blobs (exit 1)")
    p.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, help="bytes (default 1 MiB)")
    p.set_defaults(func=cmd_verify)


def cmd_add(args: argparse.Namespace) -> int:
    d = add(args.path, args.description, args.manifest)
    print(f"tracked {d.path} (oid {d.oid}, {d.size} bytes) in {args.manifest or default_manifest()}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    items = datasets(args.manifest)
    if args.json:
        print(json.dumps([d.__dict__ for d in items], indent=2))
    else:
        for d in items:
            print(f"{d.oid[:12]}  {d.size:>12}  {d.path}  {d.description}".rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from services.registry import Registry

    d = find(args.ref, args.manifest)
    models = Registry(args.registry).models_for_dataset(d.oid)
    if args.json:
        print(json.dumps({**d.__dict__, "models": [mv.ref for mv in models]}, indent=2))
        return 0
    print(f"path:        {d.path}\noid:         {d.oid}\nsize:        {d.size}\ndescription: {d.description or '-'}")
    print("models:      " + (", ".join(mv.ref for mv in models) or "- (no registered model was trained on it)"))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    problems = verify(args.manifest, args.threshold)
    for p in problems:
        print(f"PROBLEM {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {len(datasets(args.manifest))} dataset(s) match {args.manifest or default_manifest()}")
    return 0
