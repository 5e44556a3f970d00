"""``dlstack promote`` and ``dlstack rollback``: move pinned model versions between stacks.

Promotion copies what dev runs (a registry version, resolved from an alias, plus the image
digest dev built) into ``Pulumi.prod.yaml``. It edits only ``model`` and ``image`` of the
chosen entries with ruamel.yaml round-trip, so comments and key order survive, validates
the result with the ``stacks.config`` schema before an atomic write, can gate on the SLO
measured by Prometheus, prints the offline render diff, and appends a record to the
promotion history, which ``rollback`` walks back.

A pinned digest is only runnable where the image is: when prod's image registry is another one,
the image dev runs is copied there by digest (``stacks.images``, skopeo) and read back, after every
check and before any write, so a failed copy leaves the stack file and the history untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.serving import names
from services.serving.errors import UserError
from stacks.images import ImageCopy, ImageCopyError, check_insecure, copy_image, promoted_tag, split_ref
from stacks.yamledit import Doc, YamlEditError, commit, locked, recover

if TYPE_CHECKING:
    from services.registry import Registry

HISTORY_ENV = "DLSTACK_PROMOTIONS"
DEFAULT_HISTORY = Path("stacks") / "promotions.yaml"
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_WINDOW_RE = re.compile(r"^[1-9][0-9]*(s|m|h|d)$")
_HISTORY_HEADER = (
    "# Promotion history, appended by `dlstack promote` and `dlstack rollback` (newest last).\n"
    "# `dlstack rollback --env prod --model NAME` restores the version before the latest promotion.\n"
)
# Routes that carry inference traffic: the SLO is about predictions, not probes or scrapes.
_INFER_ROUTES = "infer|v1_predict"


class PromotionError(UserError):
    """A promotion or rollback was refused; the message says why and what to do."""


@dataclass(frozen=True)
class GateResult:
    model: str  # model name
    version: str  # version whose traffic was measured
    window: str  # PromQL range, e.g. "1h"
    requests: float  # requests in the window (estimated from rates)
    error_ratio: float | None  # measured 5xx ratio; None = no data
    p99_ms: float | None  # measured p99 latency; None = no data
    slo_error_ratio: float  # objective from the target stack's slo
    slo_p99_ms: float  # objective from the target stack's slo
    passed: bool  # False when over either objective or without data
    reason: str  # human summary


@dataclass(frozen=True)
class Change:
    model: str  # model entry name
    old: str  # previous ref in the target stack, e.g. mnist-mlp:1
    new: str  # new pinned ref, e.g. mnist-mlp:2
    old_digest: str | None  # previous image digest pin (None = built from the registry)
    digest: str | None  # new image digest pin (None = unknown: the pin is removed)

    @property
    def noop(self) -> bool:
        return self.old == self.new and self.old_digest == self.digest


@dataclass
class PromotionResult:
    changes: list[Change]  # one per promoted model
    target: Path  # the edited stack file
    diff: str  # unified diff of the stack file
    render_diff: str | None  # offline render diff, None when render is unavailable
    render_note: str  # why render_diff is None, or ""
    gates: list[GateResult] = field(default_factory=list)  # SLO gate results (empty without --require-slo)
    images: dict[str, ImageCopy] = field(default_factory=dict)  # model -> its image copy (digest-pinned only)
    written: bool = False  # False for --dry-run


# ---- files, git, yaml -------------------------------------------------------------------


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def default_stack_dir() -> Path:
    top = _git(["rev-parse", "--show-toplevel"], Path.cwd())
    return Path(top) if top else Path.cwd()


def default_history(stack_dir: Path) -> Path:
    env = os.environ.get(HISTORY_ENV)
    return Path(env) if env else stack_dir / DEFAULT_HISTORY


def _models(doc: Doc, path: Path) -> list[Any]:
    data = doc.data
    cfg = data.get("config") if isinstance(data, dict) else None
    models = cfg.get("dlstack:models") if isinstance(cfg, dict) else None
    if not isinstance(models, list):
        raise PromotionError(f"{path.name}: no `config: dlstack:models:` list; add the models this stack serves")
    return models


def _entry(doc: Doc, path: Path, name: str) -> int | None:
    """Index of the entry called ``name`` in the stack's model list (None: absent)."""
    return next((i for i, m in enumerate(_models(doc, path)) if isinstance(m, dict) and m.get("name") == name), None)


def _at(i: int, *keys: str) -> tuple[str | int, ...]:
    return ("config", "dlstack:models", i, *keys)


def _check_clean(path: Path, force: bool) -> None:
    if force:
        return
    status = _git(["status", "--porcelain", "--", path.name], path.parent)
    if status:  # None = not a git repo: nothing to protect against
        raise PromotionError(
            f"{path.name} has uncommitted changes; commit or stash them first (promotion must be reviewable "
            "on its own), or pass --force"
        )


def _validate(stack: str, path: Path, data: bytes) -> Any:
    from stacks.config import load_stack_config

    with tempfile.TemporaryDirectory(prefix="dlstack-promote-") as tmp:
        candidate = Path(tmp) / path.name
        candidate.write_bytes(data)
        try:
            return load_stack_config(stack, candidate)
        except UserError as exc:
            raise PromotionError(f"the resulting {path.name} would be invalid, nothing was written: {exc}") from exc


# ---- what dev runs ----------------------------------------------------------------------


MAX_OUTPUTS_BYTES = 16 * 1024 * 1024  # stack outputs are kilobytes; a bigger file is the wrong file


def read_outputs(stack: str, stack_dir: Path, outputs: Path | None) -> dict[str, Any] | None:
    """Stack outputs as JSON: ``--outputs FILE``, else ``pulumi stack output --json``, else None."""
    fix = f"write it with `pulumi stack output --json -s {stack}`"
    if outputs is not None:
        size = outputs.stat().st_size if outputs.is_file() else 0
        if size > MAX_OUTPUTS_BYTES:
            raise PromotionError(
                f"--outputs {outputs}: {size} bytes, more than the {MAX_OUTPUTS_BYTES // 2**20} MiB stack outputs "
                f"can be; {fix}"
            )
        try:
            data = json.loads(outputs.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc) or type(exc).__name__
            if isinstance(exc, RecursionError):
                why = "nested too deeply"
            raise PromotionError(f"--outputs {outputs}: unreadable ({why}); {fix}") from exc
    elif shutil.which("pulumi"):
        res = subprocess.run(
            ["pulumi", "stack", "output", "--json", "-s", stack],
            cwd=stack_dir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if res.returncode != 0:
            raise PromotionError(f"`pulumi stack output --json -s {stack}` failed: {res.stderr.strip()}")
        try:
            data = json.loads(res.stdout or "{}")
        except (ValueError, RecursionError) as exc:
            raise PromotionError(f"`pulumi stack output --json -s {stack}` printed no JSON object") from exc
    else:
        return None
    if not isinstance(data, dict):
        raise PromotionError(f"stack outputs of {stack}: expected a JSON object with a `models` map; {fix}")
    if "models" in data and not isinstance(data["models"], dict):
        raise PromotionError(
            f"stack outputs of {stack}: `models` is a JSON {_json_type(data['models'])}, expected an object of "
            f"model name -> {{version, image, ...}}; {fix}"
        )
    return data


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def _running(outputs: dict[str, Any], stack: str, name: str) -> tuple[str | None, str | None, str | None]:
    """(version, digest, model sha256) a stack reports for ``name``: ``models`` = {name: {version, image, ...}}.

    Every value is checked against its grammar: it ends up in the stack file and in the history.
    """
    entry = (outputs.get("models") or {}).get(name)
    if entry is None:
        return None, None, None
    where = f"stack outputs of {stack}: models.{name}"
    fix = f"write them with `pulumi stack output --json -s {stack}`"
    if not isinstance(entry, dict):
        raise PromotionError(f"{where} is a JSON {_json_type(entry)}, expected an object; {fix}")
    for key in ("version", "image", "digest", "sha256"):
        v = entry.get(key)
        ok = v is None or isinstance(v, str) or (key == "version" and type(v) is int)
        if not ok:
            raise PromotionError(f"{where}.{key} is a JSON {_json_type(v)}, expected a string; {fix}")
    version = entry.get("version")
    if isinstance(version, str) and ":" in version:
        version = version.rsplit(":", 1)[1]
    if version is not None and not names.matches(names.VERSION, str(version)):
        raise PromotionError(f"{where}.version {entry['version']!r} is not a registry version (1, 2, ...); {fix}")
    digest = entry.get("digest")
    if digest is not None and not names.matches(names.DIGEST, digest):
        raise PromotionError(f"{where}.digest {digest!r} is not sha256: and 64 lowercase hex digits; {fix}")
    if not digest:
        m = _DIGEST_RE.search(str(entry.get("image") or ""))
        digest = m.group(0) if m else None
    sha = entry.get("sha256")
    if sha is not None and not names.matches(names.SHA256, sha):
        raise PromotionError(f"{where}.sha256 {sha!r} is not 64 lowercase hex digits; {fix}")
    return (str(version) if version is not None else None), digest, sha


def _image_copy(outputs: dict[str, Any], name: str, mv: Any, digest: str, src: Any, dst: Any) -> ImageCopy:
    """Where entry ``name``'s image comes from (the ref dev reports, else dev's images.registry) and goes."""
    entry = outputs["models"][name]
    repo = split_ref(str(entry["image"]))[0] if entry.get("image") else ""
    model = mv.name
    # The program names images <images.registry>/<registry model name>, so the target is what prod will pull.
    return ImageCopy(
        source=repo or f"{src.images.registry}/{model}",
        target=f"{dst.images.registry}/{model}",
        digest=digest,
        tag=promoted_tag(mv.version, digest),
    )


# ---- the SLO gate -----------------------------------------------------------------------


def _prom_query(url: str, query: str) -> list[dict[str, Any]]:
    import requests

    try:
        r = requests.get(f"{url.rstrip('/')}/api/v1/query", params={"query": query}, timeout=30)
        body = r.json()
    except (requests.RequestException, ValueError) as exc:
        raise PromotionError(
            f"Prometheus at {url} is unreachable or not Prometheus ({exc}); check --prometheus"
        ) from exc
    if body.get("status") != "success":
        raise PromotionError(f"Prometheus rejected the query {query!r}: {body.get('error', body)}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _scalar(result: list[dict[str, Any]]) -> float | None:
    if not result:
        return None
    v = float(result[0]["value"][1])
    return None if math.isnan(v) else v


def slo_gate(
    prometheus: str, model: str, version: str, slo_error_ratio: float, slo_p99_ms: float, window: str = "1h"
) -> GateResult:
    """Error ratio (5xx of inference requests) and p99 latency of ``model:version`` over ``window``."""
    if not _WINDOW_RE.match(window):
        raise PromotionError(f"--window {window!r} is not a Prometheus duration; use e.g. 30m, 1h, 1d")
    sel = f'model="{model}",version="{version}",route=~"{_INFER_ROUTES}"'
    total = _scalar(_prom_query(prometheus, f"sum(increase(dlstack_requests_total{{{sel}}}[{window}]))")) or 0.0
    errors = _scalar(_prom_query(prometheus, f'sum(rate(dlstack_requests_total{{{sel},code=~"5.."}}[{window}]))'))
    rate_all = _scalar(_prom_query(prometheus, f"sum(rate(dlstack_requests_total{{{sel}}}[{window}]))"))
    p99 = _scalar(
        _prom_query(
            prometheus,
            f"histogram_quantile(0.99, sum by (le) (rate(dlstack_request_duration_seconds_bucket{{{sel}}}[{window}])))",
        )
    )
    error_ratio = (errors or 0.0) / rate_all if rate_all else None
    p99_ms = p99 * 1000 if p99 is not None and not math.isinf(p99) else None
    base = dict(
        model=model,
        version=version,
        window=window,
        requests=round(total, 3),
        slo_error_ratio=slo_error_ratio,
        slo_p99_ms=slo_p99_ms,
    )
    if total <= 0 or error_ratio is None or p99_ms is None:
        return GateResult(
            **base,  # type: ignore[arg-type]
            error_ratio=None,
            p99_ms=None,
            passed=False,
            reason=f"no inference traffic for {model}:{version} in the last {window}: nothing proves the SLO",
        )
    over = []
    if error_ratio > slo_error_ratio:
        over.append(f"error ratio {error_ratio:.4f} > SLO {slo_error_ratio}")
    if p99_ms > slo_p99_ms:
        over.append(f"p99 {p99_ms:.1f} ms > SLO {slo_p99_ms} ms")
    reason = (
        "; ".join(over) or f"error ratio {error_ratio:.4f} <= {slo_error_ratio}, p99 {p99_ms:.1f} ms <= {slo_p99_ms} ms"
    )
    return GateResult(
        **base,  # type: ignore[arg-type]
        error_ratio=round(error_ratio, 6),
        p99_ms=round(p99_ms, 3),
        passed=not over,
        reason=reason,
    )


# ---- render diff ------------------------------------------------------------------------


def render_diff(stack: str, before: Path, after: Path, reg: Registry) -> tuple[str | None, str]:
    """Offline render of ``stack`` from both config files and their markdown diff; (None, why) if unavailable."""
    try:
        from stacks.render import diff_renders, render, to_markdown
    except ImportError as exc:
        return None, f"render is unavailable ({exc}); review the stack file diff above instead"
    try:
        with tempfile.TemporaryDirectory(prefix="dlstack-promote-render-") as tmp:
            a = render(stack, Path(tmp) / "before", config_file=before, registry=reg).out
            b = render(stack, Path(tmp) / "after", config_file=after, registry=reg).out
            text = to_markdown(diff_renders(a, b), f"{stack} now", f"{stack} after promotion")
    except UserError as exc:
        return None, f"render failed, so there is no render diff: {exc.message}"
    return text, ""


# ---- history ------------------------------------------------------------------------------


_PROMOTIONS = ("promotions",)
_REF_KEYS = ("from", "to", "model", "old", "new")


class History:
    """The promotion history file, parsed and checked, with the records to append."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc: Doc | None = None
        self.new: list[dict[str, Any]] = []
        if path.exists() and not path.is_file():  # checked now: a failed rename after the commit point would strand
            raise PromotionError(f"{path}: not a regular file; pass the promotion history file as --history")
        data = path.read_bytes() if path.exists() else b""
        if data.strip():
            self.doc = Doc(data, str(path))
            self.records = self._check(self.doc.data)
        else:
            self.records = []

    def _check(self, data: Any) -> list[dict[str, Any]]:
        fix = "restore it from git, or fix the record by hand"
        if not isinstance(data, dict) or not isinstance(data.get("promotions"), list):
            raise PromotionError(f"{self.path}: expected a mapping with a `promotions:` list; {fix}")
        records: list[dict[str, Any]] = data["promotions"]
        for i, r in enumerate(records):
            where = f"{self.path}: promotions[{i}]"
            if not isinstance(r, dict):
                raise PromotionError(f"{where} is not a mapping; {fix}")
            if r.get("action") not in ("promote", "rollback"):
                raise PromotionError(f"{where}.action is {r.get('action')!r}, expected promote or rollback; {fix}")
            for key in _REF_KEYS:
                if not isinstance(r.get(key), str):
                    raise PromotionError(f"{where}.{key} is {r.get(key)!r}, expected a string; {fix}")
            for key in ("old", "new"):
                if not names.matches(names.MODEL_REF, r[key]) or ":" not in r[key]:
                    raise PromotionError(f"{where}.{key} {r[key]!r} is not a pinned NAME:VERSION; {fix}")
            for key in ("old_digest", "digest"):
                if r.get(key) is not None and not names.matches(names.DIGEST, r[key]):
                    raise PromotionError(f"{where}.{key} {r[key]!r} is not sha256: and 64 hex digits; {fix}")
            undoes = r.get("undoes")
            if r["action"] == "rollback" and not (type(undoes) is int and 0 <= undoes < i):
                raise PromotionError(
                    f"{where}.undoes is {undoes!r}, expected the index of an earlier promotion (0..{i - 1}); {fix}"
                )
        return records

    def append(self, record: dict[str, Any]) -> None:
        self.new.append(record)

    def text(self) -> bytes:
        """The file with the new records appended, every other byte as it was."""
        from ruamel.yaml import YAML

        y = YAML()
        y.default_flow_style = False
        y.width = 4096
        y.indent(mapping=2, sequence=2, offset=0)
        buf = io.StringIO()
        y.dump(self.new, buf)
        items = buf.getvalue()
        if self.doc is None:
            text = _HISTORY_HEADER + "promotions:\n" + "".join("  " + line for line in items.splitlines(True))
            doc = Doc(text.encode(), str(self.path))
            if doc.data != {"promotions": self.new}:
                raise PromotionError(f"{self.path}: the new history would not read back as written")
            return text.encode()
        self.doc.append_block_item(_PROMOTIONS, items)
        for r in self.new:
            self.doc.expect_appended(_PROMOTIONS, r)
        return self.doc.result()


def history(path: Path) -> list[dict[str, Any]]:
    return [dict(e) for e in History(path).records]


def _who(cwd: Path) -> str:
    return _git(["config", "user.name"], cwd) or os.environ.get("USER") or "unknown"


# ---- promote ------------------------------------------------------------------------------


def _apply(doc: Doc, i: int, ref: str, digest: str | None) -> None:
    doc.set(_at(i, "model"), ref)
    image = doc.get(_at(i)).get("image")
    if digest is None:
        if image is not None:
            doc.delete(_at(i, "image"))  # the old digest is another version's image
    elif isinstance(image, dict):
        doc.set(_at(i, "image", "digest"), digest)
    else:
        doc.set_map(_at(i, "image"), {"digest": digest})


def _digest_of(entry: Any) -> str | None:
    image = entry.get("image")
    return str(image["digest"]) if isinstance(image, dict) and image.get("digest") else None


@contextlib.contextmanager
def _transaction(stack_dir: Path, hist: Path) -> Iterator[None]:
    """One writer at a time per directory; an interrupted earlier write is finished first; one-line errors."""
    dirs = [stack_dir, hist.parent]
    try:
        with locked(dirs):
            recover(stack_dir, [hist.parent])
            yield
    except YamlEditError as exc:
        raise PromotionError(exc.message) from exc
    except OSError as exc:  # a file we must read or write: say which and why, never a traceback
        raise PromotionError(f"{exc.filename or stack_dir}: {exc.strerror or exc}") from exc


def promote(
    from_stack: str = "dev",
    to_stack: str = "prod",
    models: Sequence[str] = (),
    *,
    outputs: Path | None = None,
    force: bool = False,
    require_slo: bool = False,
    prometheus: str | None = None,
    window: str = "1h",
    registry: str | None = None,
    stack_dir: Path | None = None,
    history_file: Path | None = None,
    dry_run: bool = False,
    render: bool = True,
    insecure_registries: Sequence[str] = (),
) -> PromotionResult:
    """Pin ``to_stack``'s models to what ``from_stack`` runs; refuse with a reason on any doubt.

    Everything (registry, outputs, history, the new stack file and its validation, the render diff,
    the image copy) is computed before the first write; then the stack file and the history are
    replaced together (``stacks.yamledit.commit``), so a failure or a kill leaves both old or both new.
    """
    if from_stack == to_stack:
        raise PromotionError(f"--from and --to are both {from_stack!r}; promote between two stacks, e.g. dev -> prod")
    try:
        insecure = check_insecure(insecure_registries)
    except ImageCopyError as exc:
        raise PromotionError(exc.message) from exc
    if require_slo and not prometheus:
        raise PromotionError("--require-slo needs --prometheus URL (the Prometheus that scrapes the source stack)")
    stack_dir = stack_dir or default_stack_dir()
    hist_path = history_file or default_history(stack_dir)
    if not stack_dir.is_dir():
        raise PromotionError(f"{stack_dir} is not a directory; pass the directory with the stack files as --stack-dir")
    with _transaction(stack_dir, hist_path):
        return _promote(
            from_stack, to_stack, models, outputs=outputs, force=force, require_slo=require_slo,
            prometheus=prometheus, window=window, registry=registry, stack_dir=stack_dir, hist_path=hist_path,
            dry_run=dry_run, render=render, insecure=insecure,
        )  # fmt: skip


def _promote(
    from_stack: str,
    to_stack: str,
    models: Sequence[str],
    *,
    outputs: Path | None,
    force: bool,
    require_slo: bool,
    prometheus: str | None,
    window: str,
    registry: str | None,
    stack_dir: Path,
    hist_path: Path,
    dry_run: bool,
    render: bool,
    insecure: Any,
) -> PromotionResult:
    from services.registry import Registry
    from stacks.config import load_stack_config

    src_path, dst_path = stack_dir / f"Pulumi.{from_stack}.yaml", stack_dir / f"Pulumi.{to_stack}.yaml"
    for p in (src_path, dst_path):
        if not p.is_file():
            raise PromotionError(f"{p} does not exist; run from the repo root or pass --stack-dir")
    _check_clean(dst_path, force)
    src = load_stack_config(from_stack, src_path)
    dst = load_stack_config(to_stack, dst_path)
    names_ = list(models) or [m.name for m in src.models]
    if not names_:
        raise PromotionError(f"{src_path.name} has no models to promote")
    # The source stack's registry: that is where the versions it runs were resolved.
    reg = Registry.for_stack(src.registry, flag=registry)
    outs = read_outputs(from_stack, stack_dir, outputs)
    if outs is None and not force:
        raise PromotionError(
            f"cannot tell which versions {from_stack} runs: no `pulumi` CLI and no --outputs FILE; "
            f"pass --outputs with the JSON of `pulumi stack output --json -s {from_stack}`, "
            f"or --force to promote what {src_path.name} pins"
        )
    before = dst_path.read_bytes()
    doc = Doc(before, dst_path.name)
    hist = History(hist_path)  # parsed and checked now: a bad history must stop us before any write
    changes: list[Change] = []
    images: dict[str, ImageCopy] = {}
    src_models = {m.name: m for m in src.models}
    for name in names_:
        if name not in src_models:
            raise PromotionError(
                f"model {name!r} is not in {src_path.name} (models: {', '.join(src_models) or 'none'})"
            )
        i = _entry(doc, dst_path, name)
        if i is None:
            raise PromotionError(
                f"model {name!r} is not in {dst_path.name}; add an entry for it there first "
                f"(name, model, framework, replicas, resources, slo), commit it, then promote"
            )
        try:
            mv = reg.resolve(src_models[name].model)
        except UserError as exc:
            raise PromotionError(f"{src_path.name}: {name}: {exc.message}") from exc
        problems = reg.verify(only=mv.ref)
        if problems:
            raise PromotionError(f"{mv.ref} fails registry verification: {'; '.join(problems)}")
        digest = None
        if outs is not None:
            running, digest, sha = _running(outs, from_stack, name)
            if running != mv.version:
                raise PromotionError(
                    f"{from_stack} does not run {mv.ref} (its outputs report version {running or 'none'} for {name}); "
                    f"deploy it first (`pulumi up -s {from_stack}`), then promote"
                )
            if sha is not None and sha != mv.sha256:
                raise PromotionError(
                    f"{from_stack} runs {name} version {running} with model sha256 {sha}, but the registry's "
                    f"{mv.ref} is {mv.sha256}: this is another registry; pass the right --registry"
                )
        if dst.model(name).framework.value != mv.framework:
            raise PromotionError(
                f"{dst_path.name}: {name} has framework {dst.model(name).framework.value} but {mv.ref} is "
                f"{mv.framework}; fix the framework in {dst_path.name}"
            )
        if outs is not None and digest is not None:
            try:
                images[name] = _image_copy(outs, name, mv, digest, src, dst)
            except ImageCopyError as exc:
                raise PromotionError(f"stack outputs of {from_stack}: models.{name}.image: {exc.message}") from exc
        entry = doc.get(_at(i))
        changes.append(Change(name, str(entry["model"]), mv.ref, _digest_of(entry), digest))
        _apply(doc, i, mv.ref, digest)
    after = doc.result()
    _validate(to_stack, dst_path, after)
    gates: list[GateResult] = []
    if require_slo:
        assert prometheus is not None
        for c in changes:
            slo = dst.model(c.model).slo
            _, version = c.new.rsplit(":", 1)
            g = slo_gate(prometheus, c.new.split(":")[0], version, slo.error_ratio, slo.p99_ms, window)
            gates.append(g)
        failed = [g for g in gates if not g.passed]
        if failed:
            raise PromotionError(
                "SLO gate failed, nothing was written: "
                + "; ".join(f"{g.model}:{g.version}: {g.reason}" for g in failed)
            )
    commit_sha, user, now = _git(["rev-parse", "HEAD"], stack_dir), _who(stack_dir), _now()
    for c in changes:
        if c.noop:
            continue
        gate = next((asdict(g) for g in gates if g.model == c.new.split(":")[0]), None)
        copied = images[c.model] if c.model in images and images[c.model].needed else None
        hist.append(
            {
                "action": "promote",
                "from": from_stack,
                "to": to_stack,
                "model": c.model,
                "old": c.old,
                "new": c.new,
                "old_digest": c.old_digest,
                "digest": c.digest,
                # The image prod now pulls, and where it was copied from (None: nothing was copied).
                "image_from": copied.source_ref if copied else None,
                "image_to": copied.target_ref if copied else None,
                "git_commit": commit_sha,
                "time": now,
                "user": user,
                "gate": gate,
            }
        )
    new_history = hist.text() if hist.new else None
    result = _finish(to_stack, dst_path, before, after, reg, render)
    result.changes, result.gates, result.images = changes, gates, images
    if dry_run:
        return result
    # Last step before writing: every check has passed, and a pin must never precede its image.
    # A no-op re-copies too (skopeo skips what is there): it repairs a pin whose image never arrived.
    for img in images.values():
        if img.needed:
            try:
                copy_image(img, insecure)
            except ImageCopyError as exc:
                raise PromotionError(f"image copy failed, nothing was written: {exc.message}") from exc
    files = {dst_path: after}
    if new_history is not None:
        files[hist_path] = new_history
    if after != before or new_history is not None:
        commit(stack_dir, files)
    result.written = True
    return result


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _finish(stack: str, path: Path, before: bytes, after: bytes, reg: Registry, render: bool) -> PromotionResult:
    a, b = before.decode("utf-8"), after.decode("utf-8")
    diff = "".join(
        difflib.unified_diff(
            a.splitlines(keepends=True), b.splitlines(keepends=True), f"a/{path.name}", f"b/{path.name}"
        )
    )
    rdiff, note = None, "render skipped (--no-render)"
    if render:
        with tempfile.TemporaryDirectory(prefix="dlstack-promote-") as tmp:
            new = Path(tmp) / path.name
            new.write_bytes(after)
            rdiff, note = render_diff(stack, path, new, reg)
    return PromotionResult(changes=[], target=path, diff=diff, render_diff=rdiff, render_note=note)


# ---- rollback -----------------------------------------------------------------------------


def rollback(
    env: str,
    model: str,
    *,
    stack_dir: Path | None = None,
    history_file: Path | None = None,
    registry: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    render: bool = True,
) -> PromotionResult:
    """Restore the version ``env`` ran before its latest (not yet rolled back) promotion of ``model``."""
    stack_dir = stack_dir or default_stack_dir()
    hist_path = history_file or default_history(stack_dir)
    if not stack_dir.is_dir():
        raise PromotionError(f"{stack_dir} is not a directory; pass the directory with the stack files as --stack-dir")
    with _transaction(stack_dir, hist_path):
        return _rollback(env, model, stack_dir, hist_path, registry, force, dry_run, render)


def _rollback(
    env: str,
    model: str,
    stack_dir: Path,
    hist_path: Path,
    registry: str | None,
    force: bool,
    dry_run: bool,
    render: bool,
) -> PromotionResult:
    from services.registry import Registry
    from stacks.config import load_stack_config

    path = stack_dir / f"Pulumi.{env}.yaml"
    if not path.is_file():
        raise PromotionError(f"{path} does not exist; run from the repo root or pass --stack-dir")
    hist = History(hist_path)
    records = hist.records
    undone = {int(r["undoes"]) for r in records if r.get("action") == "rollback"}
    candidates = [
        (i, r)
        for i, r in enumerate(records)
        if r.get("action") == "promote" and r.get("to") == env and r.get("model") == model and i not in undone
    ]
    if not candidates:
        raise PromotionError(f"{hist_path.name} has no promotion of {model!r} to {env} left to roll back")
    idx, rec = candidates[-1]
    _check_clean(path, force)
    before = path.read_bytes()
    doc = Doc(before, path.name)
    i = _entry(doc, path, model)
    if i is None:
        raise PromotionError(f"model {model!r} is not in {path.name}; nothing to roll back")
    entry = doc.get(_at(i))
    current = str(entry.get("model"))
    if current != rec["new"] and not force:
        raise PromotionError(
            f"{path.name} pins {current} but the latest promotion set {rec['new']}; it was edited by hand, "
            "so rollback would not restore a known state; fix it by hand or pass --force"
        )
    change = Change(model, current, str(rec["old"]), _digest_of(entry), rec.get("old_digest"))
    _apply(doc, i, change.new, change.digest)
    after = doc.result()
    _validate(env, path, after)
    cfg = load_stack_config(env, path)
    reg = Registry.for_stack(cfg.registry, flag=registry)
    hist.append(
        {
            "action": "rollback",
            "from": env,
            "to": env,
            "model": model,
            "old": change.old,
            "new": change.new,
            "old_digest": change.old_digest,
            "digest": change.digest,
            "undoes": idx,
            # No copy: the restored image was promoted (copied) into this registry before.
            "image_from": None,
            "image_to": None,
            "git_commit": _git(["rev-parse", "HEAD"], stack_dir),
            "time": _now(),
            "user": _who(stack_dir),
            "gate": None,
        }
    )
    new_history = hist.text()
    result = _finish(env, path, before, after, reg, render)
    result.changes = [change]
    if dry_run:
        return result
    commit(stack_dir, {path: after, hist_path: new_history})
    result.written = True
    return result


# ---- CLI ----------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("promote", help="pin a stack's models to what another stack runs (dev -> prod)")
    p.add_argument("--from", dest="from_stack", default="dev", help="source stack (default dev)")
    p.add_argument("--to", dest="to_stack", default="prod", help="target stack (default prod)")
    p.add_argument("--model", action="append", default=[], help="model entry name (repeatable; default all)")
    p.add_argument("--outputs", type=Path, help="JSON of `pulumi stack output --json -s FROM`")
    p.add_argument("--force", action="store_true", help="allow uncommitted target changes / unknown running state")
    p.add_argument("--require-slo", action="store_true", help="refuse unless Prometheus shows the SLO is met")
    p.add_argument("--prometheus", help="Prometheus base URL for --require-slo")
    p.add_argument("--window", default="1h", help="SLO measurement window (default 1h)")
    p.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a loopback image registry that serves plain HTTP (repeatable); others: registries.conf",
    )
    _common(p)
    p.set_defaults(func=cmd_promote)

    p = subparsers.add_parser("rollback", help="restore the version before the latest promotion")
    p.add_argument("--env", required=True, help="stack to roll back, e.g. prod")
    p.add_argument("--model", required=True, help="model entry name")
    p.add_argument("--force", action="store_true", help="allow uncommitted changes / a hand-edited pin")
    _common(p)
    p.set_defaults(func=cmd_rollback)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        help="model registry: a directory or s3://BUCKET/PREFIX (default $DLSTACK_REGISTRY, else the stack file's "
        "dlstack:registry, else ./.registry)",
    )
    p.add_argument("--stack-dir", type=Path, help="directory with the Pulumi.<stack>.yaml files (default repo root)")
    p.add_argument("--history", type=Path, help=f"promotion history (default ${HISTORY_ENV} or {DEFAULT_HISTORY})")
    p.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    p.add_argument("--no-render", action="store_true", help="skip the offline render diff")


def _report(result: PromotionResult, verb: str) -> None:
    for c in result.changes:
        if c.noop:
            print(f"unchanged {c.model}: {c.new}")
            continue
        pin = (
            f" (image {c.digest})"
            if c.digest
            else " (no image digest known: prod builds from the registry; no image to copy)"
        )
        print(f"{verb} {c.model}: {c.old} -> {c.new}{pin}")
    for name, img in result.images.items():
        if not img.needed:
            print(f"image {name}: {img.source_ref} is already in the target's registry (same repository)")
        elif result.written:
            print(f"copied image {name}: {img.source_ref} -> {img.target_ref} (digest read back from the target)")
        else:
            print(f"would copy image {name}: {img.source_ref} -> {img.target_ref}")
    for g in result.gates:
        print(f"SLO gate {g.model}:{g.version} over {g.window}: {'PASS' if g.passed else 'FAIL'}: {g.reason}")
    print(result.diff or f"{result.target.name}: no change", end="" if result.diff else "\n")
    if result.render_diff is not None:
        print(f"--- offline render diff of {result.target.name} (before -> after) ---")
        print(result.render_diff or "(render output unchanged)")
    else:
        print(f"note: {result.render_note}")
    print("written: " + str(result.target) if result.written else "dry run: nothing written")


def cmd_promote(args: argparse.Namespace) -> int:
    result = promote(
        args.from_stack,
        args.to_stack,
        args.model,
        outputs=args.outputs,
        force=args.force,
        require_slo=args.require_slo,
        prometheus=args.prometheus,
        window=args.window,
        registry=args.registry,
        stack_dir=args.stack_dir,
        history_file=args.history,
        dry_run=args.dry_run,
        render=not args.no_render,
        insecure_registries=args.insecure_registry,
    )
    _report(result, "promoted" if result.written else "would promote")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    result = rollback(
        args.env,
        args.model,
        stack_dir=args.stack_dir,
        history_file=args.history,
        registry=args.registry,
        force=args.force,
        dry_run=args.dry_run,
        render=not args.no_render,
    )
    _report(result, "rolled back" if result.written else "would roll back")
    return 0
