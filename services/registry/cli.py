"""``dlstack models ...``: register, list, show, alias, verify, export, copy."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from services.registry.location import GRAMMAR
from services.registry.registry import ModelVersion, Registry, parse_ref
from services.registry.store import RegistryError
from services.serving.artifact import MODEL_YAML, read_spec

REGISTRY_HELP = f"registry location: {GRAMMAR} (default $DLSTACK_REGISTRY, else .registry at the git top level)"


def register(subparsers: Any) -> None:
    models = subparsers.add_parser("models", help="model registry: register, list, show, alias, verify, export, copy")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        p.add_argument("--registry", help=REGISTRY_HELP)
        return p

    p = add("register", "store a model file or artifact directory as the next immutable version")
    p.add_argument("path", type=Path, help="artifact directory (with model.yaml) or a model file to package")
    p.add_argument("--name", required=True, help="model name (DNS-1123 label)")
    p.add_argument("--framework", required=True, help="pytorch | keras | tensorflow | onnx")
    p.add_argument("--dataset", action="append", default=[], help="dataset path (in the manifest) or LFS oid")
    p.add_argument("--metric", action="append", default=[], help="evaluation metric KEY=VALUE (repeatable)")
    p.add_argument("--note", help="free-text note")
    p.add_argument("--input", action="append", default=[], metavar="NAME:DTYPE:SHAPE", help="for packaging a file")
    p.add_argument("--output", action="append", default=[], metavar="NAME:DTYPE:SHAPE", help="for packaging a file")
    p.add_argument("--manifest", type=Path, help="dataset manifest (default stacks/datasets.yaml)")
    p.add_argument(
        "--reference-data",
        type=Path,
        metavar="FILE.npz",
        help="inputs to compute the drift reference from (np.savez(FILE, INPUT=ARRAY), >= 100 rows); "
        "stored as reference.json in the version",
    )
    p.add_argument("--json", action="store_true", help="print the version as JSON")
    p.set_defaults(func=cmd_register)

    p = add("list", "list every registered version")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = add("show", "show a model's versions (NAME) or one version (NAME:VERSION, NAME@ALIAS)")
    p.add_argument("ref")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    alias = sub.add_parser("alias", help="point an alias (e.g. champion) at a version")
    alias_sub = alias.add_subparsers(dest="alias_command", metavar="ACTION", required=True)
    p = alias_sub.add_parser("set", help="alias set NAME ALIAS VERSION")
    p.add_argument("--registry", help=REGISTRY_HELP)
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version")
    p.set_defaults(func=cmd_alias_set)

    p = add("verify", "re-hash every stored file; exit 1 and name each corrupted one")
    p.set_defaults(func=cmd_verify)

    p = add("export", "write NAME:VERSION as an artifact directory (for the image build)")
    p.add_argument("ref")
    p.add_argument("dest", type=Path)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "copy",
        help="copy versions between registries (e.g. a laptop's into the team bucket), keeping their numbers",
        description="Copy NAME (every version), NAME:VERSION or NAME@ALIAS (default: every model) from SRC to "
        "DST, keeping version numbers, sha256 and lineage; aliases DST lacks come along. Idempotent; a "
        "NAME:VERSION that DST holds with other content is refused.",
    )
    p.add_argument("src", help=f"source registry: {GRAMMAR}")
    p.add_argument("dst", help=f"destination registry: {GRAMMAR}")
    p.add_argument("refs", nargs="*", metavar="NAME[:VERSION]", help="what to copy (default: everything)")
    p.set_defaults(func=cmd_copy)


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry)


def _metrics(items: list[str]) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RegistryError(f"--metric {item!r}: use KEY=VALUE, e.g. --metric accuracy=0.97")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _package(args: argparse.Namespace, out: Path) -> Path:
    """A bare model file (or SavedModel dir) goes through ``dlstack package`` first."""
    from services.packaging import package_model, parse_tensor

    inputs = [parse_tensor(t, "--input") for t in args.input]
    outputs = [parse_tensor(t, "--output") for t in args.output]
    package_model(args.path, name=args.name, framework=args.framework, out=out, inputs=inputs, outputs=outputs)
    return out


def cmd_register(args: argparse.Namespace) -> int:
    from services.datasets import resolve_dataset

    path: Path = args.path
    if not path.exists():
        raise RegistryError(f"{path} does not exist; give a model file or an artifact directory with {MODEL_YAML}")
    datasets = tuple(resolve_dataset(d, args.manifest) for d in args.dataset)
    reg = _registry(args)
    given = (path / MODEL_YAML).is_file()
    with tempfile.TemporaryDirectory(prefix="dlstack-package-") as tmp:
        artifact = path if given else _package(args, Path(tmp) / "artifact")
        local_version = read_spec(artifact).version
        if args.reference_data is not None:
            from services.registry.reference import with_reference

            artifact = with_reference(artifact, args.reference_data, Path(tmp) / "with-reference")
        result = reg.register(
            artifact, args.name, args.framework, datasets=datasets, metrics=_metrics(args.metric), note=args.note
        )
    mv = result.version
    if args.json:
        print(json.dumps({**mv.summary(), "created": result.created}, indent=2))
        return 0
    if result.created:
        print(f"registered {mv.ref} (sha256 {mv.sha256[:12]}) in {reg.url}")
    else:
        print(f"identical content is already registered as {mv.ref}; nothing stored")
    if given and local_version != mv.version:
        # The source directory is never rewritten, so say which number is the real one.
        print(
            f"  {path}/{MODEL_YAML} still says version {local_version} (what `dlstack serve {path}` reports); "
            f"the registry's is {mv.version}: use {mv.ref}, or `dlstack models export {mv.ref} DIR`"
        )
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _row(mv: ModelVersion) -> list[str]:
    return [
        mv.name,
        mv.version,
        ",".join(mv.aliases),
        mv.framework,
        mv.sha256[:12],
        mv.created,
        mv.author,
        ",".join(d.oid[:12] for d in mv.datasets),
    ]


_HEADER = ["NAME", "VERSION", "ALIASES", "FRAMEWORK", "SHA256", "CREATED", "AUTHOR", "DATASETS"]


def cmd_list(args: argparse.Namespace) -> int:
    versions = _registry(args).list_all()
    if args.json:
        print(json.dumps([mv.summary() for mv in versions], indent=2))
    elif not versions:
        print("no models registered; add one with `dlstack models register PATH --name N --framework F`")
    else:
        print(_table([_row(mv) for mv in versions], _HEADER))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    reg = _registry(args)
    name, version, alias = parse_ref(args.ref)
    if version is None and alias is None:
        versions = reg.versions(name)
        if args.json:
            print(json.dumps([mv.summary() for mv in versions], indent=2))
        else:
            print(_table([_row(mv) for mv in versions], _HEADER))
        return 0
    mv = reg.resolve(args.ref)
    if args.json:
        print(json.dumps(mv.summary(), indent=2))
        return 0
    s = mv.summary()
    if not (mv.checkout / MODEL_YAML).is_file():
        # An object-store version is downloaded on first use (export, serve, image build), not to show it.
        s["path"] = f"{s['path']} (not downloaded yet: `dlstack models export {mv.ref} DIR` fetches it)"
    for key in ("ref", "framework", "framework_version", "sha256", "created", "author", "note", "path"):
        print(f"{key + ':':19} {s[key] if s[key] is not None else '-'}")
    git = "-" if mv.git_commit is None else mv.git_commit + (" (dirty)" if mv.git_dirty else "")
    print(f"{'git_commit:':19} {git}")
    print(f"{'aliases:':19} {', '.join(mv.aliases) or '-'}")
    print(f"{'metrics:':19} {', '.join(f'{k}={v}' for k, v in mv.metrics.items()) or '-'}")
    print(f"{'datasets:':19} {'-' if not mv.datasets else ''}")
    for d in mv.datasets:
        print(f"  {d.oid}  {d.path or ''}".rstrip())
    print("signature:")
    for side, specs in (("input ", mv.spec.signature.inputs), ("output", mv.spec.signature.outputs)):
        for t in specs:
            print(f"  {side} {t.name} {t.datatype.value} {list(t.shape)}")
    return 0


def cmd_alias_set(args: argparse.Namespace) -> int:
    mv = _registry(args).set_alias(args.name, args.alias, args.version)
    print(f"{args.name}@{args.alias} -> {mv.ref}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    reg = _registry(args)
    problems = reg.verify()
    for p in problems:
        print(f"CORRUPT {p}", file=sys.stderr)
    if problems:  # before listing: a damaged index is a finding here (exit 1), not an error (exit 2)
        print(f"{len(problems)} problem(s) in {reg.url}; restore the named files or re-register", file=sys.stderr)
        return 1
    n = len(reg.list_all())
    print(f"ok: {n} version(s) verified in {reg.url}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    mv = _registry(args).resolve(args.ref)
    out = mv.export(args.dest)
    print(f"exported {mv.ref} to {out}")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    from services.registry.copy import copy_versions
    from services.registry.location import parse_location

    src = Registry(parse_location(args.src, "SRC"))
    dst = Registry(parse_location(args.dst, "DST"))
    results = copy_versions(src, dst, args.refs)
    for r in results:
        state = "copied" if r.copied else "already there"
        print(f"{r.ref}  {r.sha256[:12]}  {state}")
        for note in r.notes:
            print(f"  {note}")
    n = sum(r.copied for r in results)
    print(f"{n} version(s) copied, {len(results) - n} already there: {src.url} -> {dst.url}")
    return 0
