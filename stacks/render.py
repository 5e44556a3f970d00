"""Offline render: the Pulumi program evaluated with mocks, written out as reviewable files.

``dlstack render --stack dev --out DIR`` needs no pulumi CLI, cluster or credentials. It writes::

    DIR/manifests/<namespace|_cluster>/<kind>-<name>.yaml   every Kubernetes object as it would be sent
    DIR/helm/<namespace>/<release>.yaml                     chart, repo, version, values
    DIR/images/<repository>-<tag>.yaml                      context, Dockerfile, build args, tags
    DIR/rules/<namespace>/<name>.yaml                       PrometheusRule groups (plain Prometheus format)
    DIR/index.json                                          every resource, its file, the stack outputs

The same input renders byte-identical files (sorted keys, no timestamps, deterministic mock ids);
secret values are replaced by a fixed mask. ``dlstack render-diff A B`` compares two renders
field by field and prints a markdown review summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.outdir import Claim, check_dir, check_file, clean_relpath, replace_dir, replace_file
from services.serving.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
KINDS_DIR = ("manifests", "helm", "images", "rules")
MAX_VALUE = 100  # characters of a value shown in the diff table


# -------------------------------------------------------------------------------------------------
# YAML (PyYAML's C dumper when available: rendering thousands of files must stay fast)


def _yaml_dump(obj: Any) -> str:
    import yaml

    text = yaml.dump(obj, Dumper=_dumper(), sort_keys=True, default_flow_style=False, allow_unicode=True, width=120)
    return str(text)


_DUMPER: Any = None


def _dumper() -> Any:
    """PyYAML's safe dumper (C emitter when available) with a faster representer for plain data.

    The stock representer looks every node up through the type's MRO and its alias tables; a render
    only holds dicts, lists and scalars, so ``_nodes`` builds the same node tree directly. Anything
    else (another type, or one object appearing twice, which the stock dumper writes as an anchor)
    goes through the stock representer, so the text is always exactly what ``yaml.safe_dump`` writes.
    """
    global _DUMPER
    if _DUMPER is not None:
        return _DUMPER
    import yaml
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode

    base = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    STR, INT, BOOL, NULL, FLOAT = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "bool", "null", "float"))
    SEQ, MAP = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"

    class _NotPlain(Exception):
        pass

    assert not base.yaml_path_resolvers  # what makes ``resolve`` a pure function (see below)
    _tags: dict[tuple[str, tuple[bool, bool]], str] = {}

    class FastDumper(base):  # type: ignore[misc, valid-type]
        _stock = False  # this document needs the stock representer (set on the first surprise)

        def represent(self, data: Any) -> None:
            self._stock = not (self.default_flow_style is False and self.default_style is None and self.sort_keys)
            super().represent(data)

        def represent_data(self, data: Any) -> Any:
            if not self._stock:
                try:
                    return self._nodes(data, set())
                except _NotPlain:
                    self._stock = True  # the stock representer recurses through here: stay on it
            return super().represent_data(data)

        def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
            # The emitter asks twice per scalar which tag its text would resolve to. The answer
            # depends only on the arguments (the safe dumper has no path resolvers), and a render
            # repeats the same label keys and values thousands of times.
            if kind is not ScalarNode:
                return base.resolve(self, kind, value, implicit)
            key = (value, implicit)
            tag = _tags.get(key)
            if tag is None:
                if len(_tags) > 100_000:
                    _tags.clear()
                tag = _tags[key] = base.resolve(self, kind, value, implicit)
            return tag

        def _nodes(self, data: Any, seen: set[int]) -> Any:
            t = type(data)
            if t is str:
                return ScalarNode(STR, data)
            if t is dict:
                if id(data) in seen:
                    raise _NotPlain  # shared object: the stock dumper writes an anchor and an alias
                seen.add(id(data))
                items = list(data.items())
                with contextlib.suppress(TypeError):  # mixed key types stay unsorted, as in the stock dumper
                    items = sorted(items)
                return MappingNode(MAP, [(self._nodes(k, seen), self._nodes(v, seen)) for k, v in items], False)
            if t is list:
                if id(data) in seen:
                    raise _NotPlain
                seen.add(id(data))
                return SequenceNode(SEQ, [self._nodes(v, seen) for v in data], False)
            if t is bool:
                return ScalarNode(BOOL, "true" if data else "false")
            if t is int:
                return ScalarNode(INT, str(data))
            if data is None:
                return ScalarNode(NULL, "null")
            if t is float and data == data and abs(data) != float("inf"):
                value = repr(data).lower()
                if "." not in value and "e" in value:
                    value = value.replace("e", ".0e", 1)
                return ScalarNode(FLOAT, value)
            raise _NotPlain

    _DUMPER = FastDumper
    return _DUMPER


def _json_dump(obj: Any) -> str:
    """``json.dumps(obj, indent=1, sort_keys=True)``, faster for plain data.

    With ``indent`` the standard library falls back to its pure-Python encoder (generators per
    value); the index of a 500-model render has ~5,600 entries. Types other than dicts with str
    keys, lists, str, int, bool and None go through ``json.dumps`` itself.
    """
    from json.encoder import encode_basestring_ascii as enc

    class NotPlain(Exception):
        pass

    def text(o: Any, pad: str) -> str:
        t = type(o)
        if t is str:
            return str(enc(o))
        if t is dict:
            if not o:
                return "{}"
            inner = pad + " "
            items = []
            for k, v in sorted(o.items()):
                if type(k) is not str:
                    raise NotPlain
                items.append(f"{enc(k)}: {text(v, inner)}")
            return "{\n" + inner + (",\n" + inner).join(items) + "\n" + pad + "}"
        if t is list:
            if not o:
                return "[]"
            inner = pad + " "
            return "[\n" + inner + (",\n" + inner).join(text(v, inner) for v in o) + "\n" + pad + "]"
        if o is None:
            return "null"
        if t is bool:
            return "true" if o else "false"
        if t is int:
            return int.__repr__(o)
        raise NotPlain

    try:
        return text(obj, "")
    except (NotPlain, TypeError):
        return json.dumps(obj, indent=1, sort_keys=True)


def _yaml_load(text: str) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(text, Loader=loader)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _write_tree(root: Path, files: dict[str, str]) -> None:
    """Write ``{relative path: text}`` under ``root``, each directory created once."""
    for d in sorted({(root / rel).parent for rel in files}):
        d.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (root / rel).write_text(text, encoding="utf-8")


# -------------------------------------------------------------------------------------------------
# render


@dataclass(frozen=True)
class RenderResult:
    out: Path  # the render directory
    files: int  # files written (index.json excluded)
    resources: int  # resources registered (components included)
    outputs: dict[str, Any]  # stack outputs, resolved


def _rel(value: str, root: Path) -> str:
    """Paths inside the repo are written relative to it, so renders of two checkouts compare equal."""
    try:
        return Path(value).relative_to(root).as_posix()
    except ValueError:
        return value


def _mask_secret(obj: dict[str, Any]) -> dict[str, Any]:
    from stacks.mocks import MASK

    out = dict(obj)
    for key in ("data", "stringData"):
        if isinstance(out.get(key), dict):
            out[key] = dict.fromkeys(sorted(out[key]), MASK)
    return out


def evaluate(stack: str, config_file: Path | None = None, registry: Any = None) -> tuple[Any, dict[str, Any]]:
    """Parse the stack config and run the program under mocks: (mocks with every resource, outputs)."""
    from stacks.config import load_stack_config
    from stacks.mocks import run_program
    from stacks.program import BuildOptions, build, stack_registry

    cfg = load_stack_config(stack, config_file)
    # A Registry object as given; a location string as --registry; None: $DLSTACK_REGISTRY, then the stack's key.
    reg = registry if registry is not None and not isinstance(registry, str) else stack_registry(cfg, registry)
    options = BuildOptions(build_root=ROOT / "build" / "images", prepare_images=False)
    mocks, outputs = run_program(lambda: build(cfg, reg, options), project="dlstack", stack=stack)
    return mocks, outputs


INDEX = "index.json"


def _rules_file(manifest: str) -> str | None:
    """``rules/<ns>/<name>.yaml``, written beside ``manifests/<ns>/prometheusrule-<name>.yaml``."""
    top, _, rest = manifest.partition("/")
    ns, _, base = rest.partition("/")
    if top != "manifests" or not base.startswith("prometheusrule-"):
        return None
    return f"rules/{ns}/{base.removeprefix('prometheusrule-')}"


def _render_claim(d: Path) -> Claim | None:
    """The files a previous render in ``d`` wrote, read from its index.json; None when ``d`` holds no render.

    Only paths under the render's own folders are ever claimed, so a tampered index cannot make
    ``render --out`` delete anything else.
    """
    try:
        if not stat.S_ISREG(os.lstat(d / INDEX).st_mode):
            return None
        doc = json.loads((d / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(doc, dict) and isinstance(doc.get("stack"), str) and isinstance(doc.get("resources"), list)):
        return None
    paths = {INDEX}
    for entry in doc["resources"]:
        if not isinstance(entry, dict):
            return None
        rel = entry.get("file")
        if rel is None:
            continue
        if not clean_relpath(rel) or rel.partition("/")[0] not in KINDS_DIR:
            return None
        paths.add(rel)
        rules = _rules_file(rel)
        if rules is not None:
            paths.add(rules)
    return Claim(frozenset(paths))


def check_out(out: Path) -> Path:
    """Refuse an ``--out`` that is not absent, empty or a previous render (before the slow evaluation)."""
    return check_dir(out, label="--out", what="render", recognise=_render_claim)


def render(stack: str, out: Path, config_file: Path | None = None, registry: Any = None) -> RenderResult:
    """Render ``stack`` into ``out`` (replaced atomically: a failed render leaves the old one intact).

    ``out`` must be absent, empty or a previous render (see ``services.outdir``); anything else is refused.
    """
    from stacks.mocks import DOCKER_IMAGE, HELM_RELEASE, gc_paused

    check_out(out)
    with gc_paused():
        return _render(stack, out, config_file, registry, DOCKER_IMAGE, HELM_RELEASE)


def _render(
    stack: str, out: Path, config_file: Path | None, registry: Any, DOCKER_IMAGE: str, HELM_RELEASE: str
) -> RenderResult:
    mocks, outputs = evaluate(stack, config_file, registry)
    with replace_dir(out, label="--out", what="render", recognise=_render_claim) as tmp:
        files: dict[str, str] = {}
        index: list[dict[str, Any]] = []
        for rec in mocks.resources:
            entry: dict[str, Any] = {"type": rec.typ, "name": rec.name, "parent": rec.parent.rsplit("::", 1)[-1]}
            rel: str | None = None
            if rec.is_k8s_object:
                obj = rec.inputs
                meta = obj.get("metadata") or {}
                ns = meta.get("namespace") or "_cluster"
                if obj["kind"] == "Secret":
                    obj = _mask_secret(obj)
                rel = f"manifests/{ns}/{obj['kind'].lower()}-{meta.get('name', rec.name)}.yaml"
                files[rel] = _yaml_dump(obj)
                if obj["kind"] == "PrometheusRule":
                    rules = {"groups": (obj.get("spec") or {}).get("groups", [])}
                    # The path _rules_file derives from the manifest's: how a later render recognises it.
                    files[f"rules/{ns}/{meta.get('name', rec.name)}.yaml"] = _yaml_dump(rules)
            elif rec.typ == HELM_RELEASE:
                i = rec.inputs
                doc = {
                    "name": i.get("name", rec.name),
                    "namespace": i.get("namespace", "default"),
                    "chart": i.get("chart"),
                    "repo": (i.get("repositoryOpts") or {}).get("repo"),
                    "version": i.get("version"),
                    "values": i.get("values") or {},
                    "options": {
                        k: v
                        for k, v in sorted(i.items())
                        if k not in ("name", "namespace", "chart", "repositoryOpts", "version", "values")
                    },
                }
                rel = f"helm/{doc['namespace']}/{doc['name']}.yaml"
                files[rel] = _yaml_dump(doc)
            elif rec.typ == DOCKER_IMAGE:
                i = rec.inputs
                tags = i.get("tags") or []
                doc = {
                    "tags": tags,
                    "context": _rel((i.get("context") or {}).get("location", ""), ROOT),
                    "dockerfile": _rel((i.get("dockerfile") or {}).get("location", ""), ROOT),
                    "build_args": i.get("buildArgs") or {},
                    "platforms": i.get("platforms") or [],
                    "push": i.get("push"),
                    "labels": i.get("labels") or {},
                    "digest (mock)": rec.answer.get("digest"),
                }
                # <repository>-v<version>: the content hash part of the tag stays inside the file, so
                # a code change shows up as a changed tag rather than a removed and an added image.
                repo_tag = tags[0].rsplit("/", 1)[-1] if tags else rec.name
                repo, _, tag = repo_tag.partition(":")
                rel = f"images/{repo}-{tag.rsplit('-', 1)[0] if tag else 'latest'}.yaml"
                files[rel] = _yaml_dump(doc)
            if rel is not None:
                entry["file"] = rel
            index.append(entry)
        _write_tree(tmp, files)
        index.sort(key=lambda e: (e["type"], e["name"]))
        doc = {"stack": stack, "resources": index, "outputs": outputs, "files": len(files)}
        _write(tmp / INDEX, _json_dump(doc) + "\n")
    return RenderResult(out=out.absolute(), files=len(files), resources=len(mocks.resources), outputs=outputs)


# -------------------------------------------------------------------------------------------------
# render-diff


def load_render(d: Path) -> dict[str, Any]:
    """Every rendered file of a render directory, parsed: {relative path: document}."""
    if not (d / "index.json").is_file():
        raise UserError(f"{d} is not a render (no index.json); create it with `dlstack render --stack ENV --out {d}`")
    docs: dict[str, Any] = {}
    for sub in KINDS_DIR:
        for f in sorted((d / sub).rglob("*.yaml")):
            docs[f.relative_to(d).as_posix()] = _yaml_load(f.read_text(encoding="utf-8"))
    return docs


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves by dotted path; list items that carry a unique ``name`` are keyed by it (stable under reordering)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict) and obj:
        for k in obj:
            out.update(flatten(obj[k], f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj:
        names = [x.get("name") for x in obj if isinstance(x, dict)]
        by_name = len(names) == len(obj) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
        for i, x in enumerate(obj):
            out.update(flatten(x, f"{prefix}[{x['name'] if by_name else i}]"))
    else:
        out[prefix] = obj
    return out


@dataclass(frozen=True)
class Change:
    path: str  # dotted field path
    old: Any  # None when added
    new: Any  # None when removed


@dataclass(frozen=True)
class RenderDiff:
    added: list[str]
    removed: list[str]
    changed: dict[str, list[Change]]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


_MISSING = object()


def diff_docs(a: dict[str, Any], b: dict[str, Any]) -> RenderDiff:
    changed: dict[str, list[Change]] = {}
    for key in sorted(set(a) & set(b)):
        if a[key] == b[key]:
            continue
        fa, fb = flatten(a[key]), flatten(b[key])
        rows = []
        for path in sorted(set(fa) | set(fb)):
            old, new = fa.get(path, _MISSING), fb.get(path, _MISSING)
            if old != new:
                rows.append(Change(path, None if old is _MISSING else old, None if new is _MISSING else new))
        changed[key] = rows
    return RenderDiff(added=sorted(set(b) - set(a)), removed=sorted(set(a) - set(b)), changed=changed)


def diff_renders(a: Path, b: Path) -> RenderDiff:
    return diff_docs(load_render(a), load_render(b))


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    text = text.replace("|", "\\|").replace("\n", "\\n")
    return f"`{text[:MAX_VALUE]}{'…' if len(text) > MAX_VALUE else ''}`"


def to_markdown(d: RenderDiff, a_label: str, b_label: str) -> str:
    lines = [
        f"# Render diff: `{a_label}` → `{b_label}`",
        "",
        f"**{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed**",
        "",
    ]
    if d.empty:
        lines.append("No differences.")
    if d.added:
        lines += ["## Added", "", *[f"- `{k}`" for k in d.added], ""]
    if d.removed:
        lines += ["## Removed", "", *[f"- `{k}`" for k in d.removed], ""]
    if d.changed:
        lines += ["## Changed", ""]
        for key, rows in d.changed.items():
            lines += [f"### `{key}`", "", "| field | old | new |", "|---|---|---|"]
            lines += [f"| `{c.path}` | {_show(c.old)} | {_show(c.new)} |" for c in rows]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render_git_ref(
    ref: str, stack: str, out: Path, config_file: Path | None = None, repo: Path = ROOT, registry: str | None = None
) -> Path:
    """Render ``stack`` as it was at git ``ref`` of ``repo`` (``git archive`` into a temp dir, its own code).

    Read-only for the repository: no worktree, no checkout. The model registry is the current one.
    """
    with tempfile.TemporaryDirectory(prefix="dlstack-ref-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", ref], capture_output=True, check=False
        )
        if archive.returncode != 0:
            raise UserError(
                f"git ref {ref!r} cannot be read: {archive.stderr.decode().strip()}; pass a commit or branch"
            )
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
        if not (src / "stacks" / "render.py").is_file():
            raise UserError(f"git ref {ref!r} has no stacks/render.py; pick a commit that has the offline render")
        from stacks.config import load_stack_config
        from stacks.program import stack_registry

        # The registry this render uses (the working tree's stack file decides), whatever the old code's default.
        current = stack_registry(load_stack_config(stack, config_file), registry)
        env = {**os.environ, "DLSTACK_REGISTRY": current.url, "PYTHONPATH": str(src)}
        cmd = [sys.executable, "-m", "stacks.cli", "render", "--stack", stack, "--out", str(out.absolute())]
        if config_file is not None:
            cmd += ["--config-file", str(config_file.absolute())]
        res = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise UserError(f"rendering {stack} at {ref} failed:\n{(res.stderr or res.stdout).strip()}")
    return out


# -------------------------------------------------------------------------------------------------
# CLI


_REGISTRY_HELP = (
    "model registry: a directory or s3://BUCKET/PREFIX (default $DLSTACK_REGISTRY, else the stack's "
    "dlstack:registry, else .registry)"
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "render",
        help="render the stack offline (Pulumi mocks): manifests, Helm releases, images, rules",
        description="Evaluate the Pulumi program in-process with mocks; no pulumi CLI, cluster or credentials.",
    )
    p.add_argument("--stack", required=True, help="stack name: reads Pulumi.<stack>.yaml (e.g. dev, prod)")
    p.add_argument("--config-file", type=Path, help="a stack file in the Pulumi.<stack>.yaml format to use instead")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory: new, empty or a previous render (replaced; anything else is refused)",
    )
    p.add_argument("--registry", help=_REGISTRY_HELP)
    p.set_defaults(func=_render_cmd)

    d = sub.add_parser(
        "render-diff",
        help="compare two renders (or a git ref with the working tree) as a markdown review summary",
    )
    d.add_argument("a", nargs="?", type=Path, help="old render directory")
    d.add_argument("b", nargs="?", type=Path, help="new render directory")
    d.add_argument("--git", metavar="REF", help="render --stack at git REF and compare with the working tree")
    d.add_argument("--stack", help="stack for --git (e.g. dev)")
    d.add_argument("--config-file", type=Path, help="stack file for --git renders")
    d.add_argument("--out", type=Path, help="also write the markdown to this file (new, or a previous render-diff)")
    d.add_argument("--registry", help=_REGISTRY_HELP + " (for --git)")
    d.set_defaults(func=_diff_cmd)


def finish_interrupted_promotion(stack_dir: Path) -> None:
    """A promotion killed after its commit point left a journal: finish it before reading the stack file,
    so a render never shows a stack file without its history record (see stacks/yamledit.py)."""
    from stacks.yamledit import JOURNAL, locked, recover

    if (stack_dir / JOURNAL).exists():
        with locked([stack_dir, stack_dir / "stacks"]):
            recover(stack_dir, [stack_dir / "stacks"])


def _render_cmd(args: argparse.Namespace) -> int:
    if args.config_file is not None and not args.config_file.is_file():
        raise UserError(f"--config-file {args.config_file}: no such file")
    finish_interrupted_promotion(args.config_file.parent if args.config_file else ROOT)
    res = render(args.stack, args.out, args.config_file, registry=args.registry)
    print(f"rendered {args.stack}: {res.resources} resources, {res.files} files in {res.out}")
    return 0


_DIFF_HEAD = b"# Render diff: `"  # how to_markdown starts: what makes a file a previous render-diff


def _is_diff(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(len(_DIFF_HEAD)) == _DIFF_HEAD
    except OSError:
        return False


_DIFF_OUT: dict[str, Any] = {"label": "--out", "what": "render-diff", "recognise": _is_diff}


def _diff_cmd(args: argparse.Namespace) -> int:
    if args.out:
        check_file(args.out, **_DIFF_OUT)  # before rendering: a refusal must not cost two renders
    if args.git:
        if not args.stack:
            raise UserError("render-diff --git REF needs --stack (e.g. --stack dev)")
        if args.a or args.b:
            raise UserError("render-diff takes either two directories or --git REF, not both")
        with tempfile.TemporaryDirectory(prefix="dlstack-diff-") as tmp:
            old = render_git_ref(args.git, args.stack, Path(tmp) / "old", args.config_file, registry=args.registry)
            new = render(args.stack, Path(tmp) / "new", args.config_file, registry=args.registry).out
            text = to_markdown(diff_renders(old, new), f"{args.stack}@{args.git}", f"{args.stack}@working tree")
    else:
        if not (args.a and args.b):
            raise UserError("render-diff needs two render directories A B (or --git REF --stack ENV)")
        text = to_markdown(diff_renders(args.a, args.b), str(args.a), str(args.b))
    if args.out:
        replace_file(args.out, text.encode(), **_DIFF_OUT)  # a new file or a previous diff, never another file
    sys.stdout.write(text)
    return 0


def iter_files(d: Path) -> Iterator[Path]:
    """Every file of a render, sorted (for byte comparisons)."""
    yield from sorted(p for p in d.rglob("*") if p.is_file())
