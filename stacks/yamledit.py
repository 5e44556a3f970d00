"""Edit a YAML file in place, byte for byte, and commit several edited files as one unit.

Why not load and dump with ruamel round-trip? A dump re-emits the whole file: it drops ``...``,
re-indents irregular blocks, re-flows plain multi-line scalars and moves comments, so a reviewer
sees changes nobody asked for. Here ruamel only *parses* (events with source positions); an edit
replaces the exact source span of one value, or inserts a line, and every other byte (BOM, CRLF,
``%YAML`` directive, ``---``/``...`` markers, comments, quoting, block scalars, indentation) is copied
as it was. The result is parsed again and must equal the original data with exactly the intended
changes applied, so a splicing mistake is an error, never a wrong file.

Anchors and aliases: an edit inside an anchored node that an alias (or a ``<<`` merge) also uses
would change the other place too, so it is refused; an edit of a value that *is* an alias replaces
that alias with the new value (un-aliased for the edited entry only).

``commit`` writes several files as one unit that survives SIGKILL at any point (see its docstring);
``recover`` finishes an interrupted commit and removes temp files; ``locked`` serialises writers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.serving.errors import UserError

MAX_BYTES = 8 * 1024 * 1024  # stack and history files are small; more is a mistake or an attack
MAX_DEPTH = 64
MAX_EXPANSION = 100_000  # nodes after expanding aliases: an alias bomb stops here, not at 5 GB
JOURNAL = ".dlstack-journal"
TMP_MARK = ".dlstack-tmp-"
PAUSE_ENV = "DLSTACK_PROMOTE_TEST_PAUSE_S"
PAUSE_MARKER = "dlstack-promote-test: step "
_STR = "tag:yaml.org,2002:str"
Path_ = tuple[str | int, ...]


class YamlEditError(UserError):
    """The file cannot be edited safely; the message says where and what to do."""


# ---- parsing ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    kind: str  # "map", "seq", "scalar" or "alias"
    start: int  # source index of the node (anchor and tag included)
    end: int  # source index after the node's own token(s); collections: see Doc.node_end
    anchor: str | None = None
    style: str | None = None  # scalars: None (plain), "'", '"', "|", ">"
    flow: bool = False
    value: str = ""  # scalars
    items: list[Any] = field(default_factory=list)  # seq: [Node]; map: [(key Node, value Node)]
    target: Node | None = None  # aliases: the anchored node


def _decode(data: bytes, name: str) -> str:
    if len(data) > MAX_BYTES:
        raise YamlEditError(f"{name}: {len(data)} bytes, more than the {MAX_BYTES // 2**20} MiB a stack file may be")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlEditError(
            f"{name}: not UTF-8 (byte {exc.start} is 0x{data[exc.start]:02x}); save it as UTF-8"
        ) from exc


def _yaml_error(name: str, exc: Exception) -> YamlEditError:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return YamlEditError(f"{name}: not valid YAML{where}: {problem}; fix the file (or restore it from git)")


def _compose(text: str, name: str) -> tuple[Node | None, dict[int, int]]:
    """The document's node tree from ruamel's events, and how often each anchored node is aliased."""
    from ruamel.yaml import YAML, events

    refs: dict[int, int] = {}
    anchors: dict[str, Node] = {}
    stack: list[Node] = []
    pending_key: list[Node | None] = []
    root: Node | None = None
    docs = 0

    def add(node: Node) -> None:
        nonlocal root
        if not stack:
            root = node
            return
        parent = stack[-1]
        if parent.kind == "seq":
            parent.items.append(node)
        elif pending_key[-1] is None:
            pending_key[-1] = node
        else:
            parent.items.append((pending_key[-1], node))
            pending_key[-1] = None

    try:
        for ev in YAML().parse(text):
            s, e = ev.start_mark.index, ev.end_mark.index
            if isinstance(ev, events.DocumentStartEvent):
                docs += 1
                if docs > 1:
                    raise YamlEditError(f"{name}: holds more than one YAML document; keep one")
            elif isinstance(ev, events.AliasEvent):
                target = anchors.get(ev.anchor)
                if target is None:
                    raise YamlEditError(f"{name}: alias *{ev.anchor} has no anchor &{ev.anchor} before it")
                refs[id(target)] = refs.get(id(target), 0) + 1
                add(Node("alias", s, e, target=target))
            elif isinstance(ev, events.ScalarEvent):
                node = Node("scalar", s, e, anchor=ev.anchor, style=ev.style, value=ev.value)
                add(node)
                if ev.anchor:
                    anchors[ev.anchor] = node
            elif isinstance(ev, (events.MappingStartEvent, events.SequenceStartEvent)):
                if len(stack) >= MAX_DEPTH:
                    raise YamlEditError(f"{name}: nested deeper than {MAX_DEPTH} levels; flatten it")
                kind = "map" if isinstance(ev, events.MappingStartEvent) else "seq"
                node = Node(kind, s, e, anchor=ev.anchor, flow=bool(ev.flow_style))
                add(node)
                if ev.anchor:
                    anchors[ev.anchor] = node
                stack.append(node)
                pending_key.append(None)
            elif isinstance(ev, (events.MappingEndEvent, events.SequenceEndEvent)):
                node = stack.pop()
                pending_key.pop()
                node.end = e
    except YamlEditError:
        raise
    except RecursionError as exc:
        raise YamlEditError(f"{name}: nested too deeply to read; flatten it") from exc
    except Exception as exc:  # ruamel raises many types; all mean "not YAML"
        raise _yaml_error(name, exc) from exc
    _check_expansion(root, name)
    return root, refs


def _check_expansion(root: Node | None, name: str) -> None:
    sizes: dict[int, int] = {}

    def size(n: Node) -> int:
        if n.kind == "alias":
            assert n.target is not None
            return size(n.target)
        if id(n) in sizes:
            return sizes[id(n)]
        total = 1
        for item in n.items:
            total += size(item[0]) + size(item[1]) if isinstance(item, tuple) else size(item)
            if total > MAX_EXPANSION:
                break
        sizes[id(n)] = total
        return total

    if root is not None and size(root) > MAX_EXPANSION:
        raise YamlEditError(
            f"{name}: its aliases expand to more than {MAX_EXPANSION} nodes (an alias bomb?); write the values out"
        )


def _plain(text: str, name: str) -> Any:
    from ruamel.yaml import YAML

    try:
        return _unshare(YAML(typ="safe", pure=True).load(text))
    except RecursionError as exc:
        raise YamlEditError(f"{name}: nested too deeply to read; flatten it") from exc
    except Exception as exc:  # ruamel raises many types; all mean "not YAML"
        raise _yaml_error(name, exc) from exc


def _unshare(x: Any) -> Any:
    """A copy in which no two places share an object: an edit at one path never shows at another."""
    if isinstance(x, dict):
        return {k: _unshare(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unshare(v) for v in x]
    return x


# ---- rendering ----------------------------------------------------------------------------------


def _plain_ok(s: str) -> bool:
    from ruamel.yaml.nodes import ScalarNode
    from ruamel.yaml.resolver import VersionedResolver

    if not re.fullmatch(r"[A-Za-z0-9_./@~+-][A-Za-z0-9_./@~+:=-]*", s) or s.endswith(":") or s.startswith("-"):
        return False
    # Plain only if every YAML reader (1.1: Pulumi's Go loader; 1.2) reads it back as this string.
    return all(
        str(VersionedResolver(version=v).resolve(ScalarNode, s, (True, False))) == _STR for v in ((1, 1), (1, 2))
    )


def render_scalar(value: Any, style: str | None = None) -> str:
    """``value`` as one line of YAML: the given quoting style where it reads back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    s = str(value)
    if style is None and _plain_ok(s):
        return s
    if style != '"' and s.isprintable():
        return "'" + s.replace("'", "''") + "'"
    return json.dumps(s)  # JSON strings are YAML double-quoted scalars


def _render_flow(values: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{render_scalar(k)}: {render_scalar(v)}" for k, v in values.items()) + "}"


# ---- the document ---------------------------------------------------------------------------------


class Doc:
    """A YAML file's text, its node tree and its plain data; edits are recorded, then applied by ``result``."""

    def __init__(self, data: bytes, name: str) -> None:
        self.name = name
        self.text = _decode(data, name)
        self.eol = "\r\n" if "\r\n" in self.text else "\n"
        self.root, self.refs = _compose(self.text, name)
        self.data = _plain(self.text, name)
        self.expected = _unshare(self.data)
        self.edits: list[tuple[int, int, str]] = []
        self._shared = [n for n in self._walk(self.root) if n.anchor and self.refs.get(id(n))]

    @classmethod
    def read(cls, path: Path, name: str | None = None) -> Doc:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise YamlEditError(f"{name or path}: unreadable ({exc.strerror})") from exc
        return cls(data, name or path.name)

    # -- geometry

    def _walk(self, n: Node | None) -> Iterator[Node]:
        if n is None or n.kind == "alias":
            return
        yield n
        for item in n.items:
            if isinstance(item, tuple):
                yield from self._walk(item[0])
                yield from self._walk(item[1])
            else:
                yield from self._walk(item)

    def node_end(self, n: Node) -> int:
        """Where the node's source ends (block collections end with their last value, not the next token)."""
        if n.kind in ("map", "seq") and not n.flow and n.items:
            last = n.items[-1]
            return self.node_end(last[1] if isinstance(last, tuple) else last)
        return n.end

    def _line_start(self, pos: int) -> int:
        start = self.text.rfind("\n", 0, pos) + 1
        return 1 if start == 0 and self.text.startswith("\ufeff") else start

    def _column(self, pos: int) -> int:
        return pos - self._line_start(pos)

    def _after_line(self, pos: int) -> int:
        """The start of the line after the one ``pos`` is on (``pos`` itself if it starts a line)."""
        if pos > 0 and self.text[pos - 1] == "\n":
            return pos
        nl = self.text.find("\n", pos)
        return len(self.text) if nl < 0 else nl + 1

    def _indent_step(self) -> int:
        for n in self._walk(self.root):
            if n.kind == "map" and not n.flow:
                for k, v in n.items:
                    if v.kind == "map" and not v.flow and v.items:
                        step = self._column(v.items[0][0].start) - self._column(k.start)
                        if step > 0:
                            return step
        return 2

    def where(self, path: Path_) -> str:
        out = ""
        for p in path:
            out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
        return out or "the document"

    # -- navigation

    def _find(self, path: Path_) -> Node:
        """The node at ``path`` (following aliases); every step must exist as the file's own key."""
        node = self.root
        for i, step in enumerate(path):
            while node is not None and node.kind == "alias":
                node = node.target
            if node is None:
                break
            if isinstance(step, int) and node.kind == "seq" and 0 <= step < len(node.items):
                node = node.items[step]
                continue
            if isinstance(step, str) and node.kind == "map":
                own = self._own(node, step)
                if own is not None:
                    node = own[1]
                    continue
                parent_data = _get(self.data, path[:i])
                if isinstance(parent_data, dict) and step in parent_data:
                    raise YamlEditError(
                        f"{self.name}: {self.where(path[: i + 1])} comes from a YAML merge (<<), so editing it "
                        "would change the entry it is merged from too; write it out in this entry, commit, retry"
                    )
            raise YamlEditError(f"{self.name}: {self.where(path[: i + 1])} does not exist")
        if node is None:
            raise YamlEditError(f"{self.name}: {self.where(path)} does not exist")
        return node

    @staticmethod
    def _own(m: Node, key: str) -> tuple[Node, Node] | None:
        return next((kv for kv in m.items if kv[0].kind == "scalar" and kv[0].value == key), None)

    def _check_unshared(self, start: int, end: int, path: Path_) -> None:
        for n in self._shared:
            if n.start <= start and end <= self.node_end(n):
                line = self.text.count("\n", 0, n.start) + 1
                raise YamlEditError(
                    f"{self.name}: {self.where(path)} is inside the YAML anchor &{n.anchor} (line {line}), which "
                    f"an alias also uses: editing it would change that place too; write the value out without "
                    f"the anchor, commit, then retry"
                )

    def _edit(self, start: int, end: int, text: str, path: Path_) -> None:
        self._check_unshared(start, end, path)
        self.edits.append((start, end, text.replace("\n", self.eol)))

    # -- edits

    def get(self, path: Path_) -> Any:
        return _get(self.data, path)

    def set(self, path: Path_, value: Any) -> None:
        """Set the scalar at ``path`` (a mapping key, inserted when absent), keeping its quoting style."""
        parent = self._find(path[:-1])
        key = path[-1]
        if parent.kind != "map" or not isinstance(key, str):
            raise YamlEditError(f"{self.name}: {self.where(path[:-1])} is not a mapping")
        own = self._own(parent, key)
        if own is None:
            self._insert(parent, path, render_scalar(value))
        else:
            k, v = own
            if v.kind == "alias":  # un-alias this place only: the anchor and its other users stay
                self._edit(v.start, v.end, render_scalar(value), path)
            elif v.kind == "scalar" and v.style not in ("|", ">"):
                prefix = re.match(r"(?:[&!]\S*\s+)*", self.text[v.start : v.end])
                head = prefix.group(0) if prefix else ""
                if v.anchor and self.refs.get(id(v)):
                    self._check_unshared(v.start, v.end, path)
                self._edit(v.start + len(head), v.end, render_scalar(value, v.style), path)
            else:  # a block scalar or a collection becomes one line after the key
                end = self.node_end(v)
                tail = self.eol if self.text[end - 1 : end] == "\n" else ""
                self._edit(k.end, end, ": " + render_scalar(value) + tail.replace("\r\n", "\n"), path)
        _put(self.expected, path, value)

    def set_map(self, path: Path_, values: Mapping[str, Any], *, flow: bool = False) -> None:
        """Update the mapping at ``path`` with ``values`` (created, in flow or block style, when absent)."""
        parent = self._find(path[:-1])
        key = path[-1]
        if parent.kind != "map" or not isinstance(key, str):
            raise YamlEditError(f"{self.name}: {self.where(path[:-1])} is not a mapping")
        own = self._own(parent, key)
        if own is not None and own[1].kind == "map":
            target = own[1]
            for k, v in values.items():
                sub = (*path, k)
                if self._own(target, k) is not None or not target.flow:
                    self.set(sub, v)
                    continue
                # A new key in a flow mapping: after the last pair, or right after "{".
                self._check_unshared(target.start, target.start, sub)
                at = target.items[-1][1].end if target.items else target.start + 1
                sep = ", " if target.items else ""
                self._edit(at, at, f"{sep}{render_scalar(k)}: {render_scalar(v)}", sub)
                _put(self.expected, sub, v)
            return
        parent_data = _get(self.data, path[:-1])
        current = parent_data.get(key) if isinstance(parent_data, dict) else None
        merged = {**(current if isinstance(current, dict) else {}), **values}
        if own is not None:  # an alias or a scalar: replace the value with the full mapping, in flow style
            knode, vnode = own
            end = self.node_end(vnode) if vnode.kind != "alias" else vnode.end
            self._edit(knode.end, end, ": " + _render_flow(merged), path)
        elif flow or parent.flow:
            self._insert(parent, path, _render_flow(merged))
        else:
            step = self._indent_step()
            lines = "".join(f"\n{' ' * step}{render_scalar(k)}: {render_scalar(v)}" for k, v in merged.items())
            self._insert(parent, path, "", lines)
        _put(self.expected, path, merged)

    def _insert(self, m: Node, path: Path_, value: str, block: str = "") -> None:
        key = render_scalar(path[-1])
        self._check_unshared(m.start, m.start, path)  # a new key in a shared mapping shows everywhere
        if m.flow:
            at = m.items[-1][1].end if m.items else m.start + 1
            self._edit(at, at, f"{', ' if m.items else ''}{key}: {value}", path)
            return
        col = self._column(m.items[0][0].start)
        at = self._after_line(self.node_end(m.items[-1][1]))
        lead = "" if at == 0 or self.text[at - 1] == "\n" else "\n"
        body = block.replace("\n", "\n" + " " * col)
        self._edit(at, at, f"{lead}{' ' * col}{key}:{' ' + value if value else ''}{body}\n", path)

    def delete(self, path: Path_) -> None:
        """Remove the key at ``path`` with its value (and the comments on those lines)."""
        parent = self._find(path[:-1])
        key = path[-1]
        own = self._own(parent, str(key)) if parent.kind == "map" else None
        if own is None:
            if isinstance(_get(self.data, path[:-1]), dict) and key in _get(self.data, path[:-1]):
                self._find(path)  # raises the merge message
            return
        k, v = own
        if parent.flow:
            idx = parent.items.index(own)
            start = parent.items[idx - 1][1].end if idx else k.start
            end = v.end if idx else (parent.items[1][0].start if len(parent.items) > 1 else v.end)
            self._edit(start, end, "", path)
        else:
            ls = self._line_start(k.start)
            if self.text[ls : k.start].strip():
                raise YamlEditError(
                    f"{self.name}: {self.where(path)} shares its line with the item's dash; move it to a line of "
                    "its own, commit, then retry"
                )
            self._edit(ls, self._after_line(self.node_end(v) if v.kind != "alias" else v.end), "", path)
        parent_data = _get(self.expected, path[:-1])
        parent_data.pop(key, None)

    def append_block_item(self, path: Path_, item_text: str) -> None:
        """Append a block sequence item (``item_text``: lines starting with "- " at column 0) to the list at
        ``path``; an empty flow list ``[]`` becomes a block list."""
        seq = self._find(path)
        parent = self._find(path[:-1])
        own = self._own(parent, str(path[-1])) if parent.kind == "map" else None
        if seq.kind != "seq" or own is None:
            raise YamlEditError(f"{self.name}: {self.where(path)} is not a list")
        self._check_unshared(seq.start, seq.start, path)
        if seq.flow:
            if seq.items:
                raise YamlEditError(
                    f"{self.name}: {self.where(path)} is a [flow, list]; write it as a block list (one '- ' item "
                    "per line), commit, then retry"
                )
            col = self._column(own[0].start) + 2
            text = item_text.rstrip("\n").replace("\n", "\n" + " " * col)
            self._edit(own[0].end, seq.end, ":\n" + " " * col + text, path)
        else:
            col = self._column(seq.start)  # a block list starts at its first dash
            at = self._after_line(self.node_end(seq))
            lead = "" if at == 0 or self.text[at - 1] == "\n" else "\n"
            self._edit(at, at, lead + " " * col + item_text.rstrip("\n").replace("\n", "\n" + " " * col) + "\n", path)

    def expect_appended(self, path: Path_, value: Any) -> None:
        _get(self.expected, path).append(_unshare(value))

    def result(self) -> bytes:
        """The edited bytes; they must parse to the original data with exactly the recorded edits."""
        out, pos = [], 0
        for start, end, text in sorted(self.edits, key=lambda e: (e[0], e[1])):
            if start < pos:
                raise YamlEditError(f"{self.name}: two edits overlap; edit the file by hand")
            out += [self.text[pos:start], text]
            pos = end
        out.append(self.text[pos:])
        new = "".join(out)
        if _plain(new, self.name) != self.expected:
            raise YamlEditError(
                f"{self.name}: the edit would not read back as intended (an unusual construct?); edit it by hand"
            )
        return new.encode("utf-8")


def _get(data: Any, path: Path_) -> Any:
    for p in path:
        data = data[p]
    return data


def _put(data: Any, path: Path_, value: Any) -> None:
    _get(data, path[:-1])[path[-1]] = _unshare(value)


# ---- committing several files as one unit -------------------------------------------------------------
#
# Scheme (redo journal): 1. write every new content to a temp file beside its target and fsync it;
# 2. write a journal naming each (target, temp, sha256) to a temp file, fsync, rename it to
# STACK_DIR/.dlstack-journal and fsync the directory: this rename is the commit point; 3. rename
# each temp over its target (fsync the directory); 4. remove the journal. Killed before 2, the
# targets are untouched and `recover` deletes the temps; killed after 2, `recover` (run first by
# every command that reads these files) renames the remaining temps into place. The sha256 lets it
# refuse a temp file that is not the one journaled.


def _pause(step: str) -> None:
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        print(PAUSE_MARKER + step, file=sys.stderr, flush=True)
        time.sleep(float(pause))


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(dirs: Sequence[Path]) -> Iterator[None]:
    """Hold an exclusive lock on each directory (flock on the directory itself: no lock file is left)."""
    fds: list[int] = []
    try:
        for d in sorted({Path(os.path.abspath(d)) for d in dirs if d.is_dir()}):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise YamlEditError(
                    f"another dlstack promote, rollback or capacity --write-config is writing in {d}; "
                    "wait for it to finish, then retry"
                ) from exc
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing releases the lock


def _write_temp(target: Path, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARK}")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o644)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(journal_dir: Path, files: Mapping[Path, bytes]) -> None:
    """Replace every file in ``files`` with its new bytes, all or none, even across SIGKILL."""
    temps: dict[Path, Path] = {}
    journal = journal_dir / JOURNAL
    committed = False
    try:
        for target, data in files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            temps[target] = _write_temp(target, data)
        _pause("temps-written")
        record = {
            "dlstack_journal": 1,
            "files": [
                {"target": str(t.absolute()), "temp": str(p.absolute()), "sha256": hashlib.sha256(files[t]).hexdigest()}
                for t, p in temps.items()
            ],
        }
        jtmp = _write_temp(journal, json.dumps(record, indent=1).encode())
        temps[journal] = jtmp
        os.replace(jtmp, journal)
        committed = True
        _fsync_dir(journal_dir)
        _pause("journal-written")
        for target, tmp in temps.items():
            if target == journal:
                continue
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            _pause(f"replaced {target.name}")
        journal.unlink()
        _fsync_dir(journal_dir)
        _pause("journal-removed")
    except BaseException:
        if not committed:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
        else:  # past the commit point: finish now if we can; else the next command's recover() does
            with contextlib.suppress(Exception):
                recover(journal_dir)
        raise


def recover(journal_dir: Path, other_dirs: Sequence[Path] = ()) -> list[Path]:
    """Finish a commit that was interrupted after its commit point; delete temps of one killed before it.

    Returns the targets it completed. Call it under ``locked`` before reading the files.
    """
    journal = journal_dir / JOURNAL
    done: list[Path] = []
    dirs = {Path(os.path.abspath(journal_dir))} | {Path(os.path.abspath(d)) for d in other_dirs}
    if journal.exists():
        where = f"{journal}: an interrupted promotion's journal"
        try:
            record = json.loads(journal.read_bytes())
            entries = record["files"]
            assert record.get("dlstack_journal") == 1 and isinstance(entries, list)
            plan = [(Path(e["target"]), Path(e["temp"]), str(e["sha256"])) for e in entries]
        except (OSError, ValueError, KeyError, TypeError, AssertionError, RecursionError) as exc:
            raise YamlEditError(
                f"{where} is unreadable ({type(exc).__name__}); compare the stack file and the history with git, "
                "fix them, then delete the journal"
            ) from exc
        for target, tmp, sha in plan:
            if tmp.parent != target.parent or not tmp.name.startswith(f".{target.name}{TMP_MARK}"):
                raise YamlEditError(f"{where} names {tmp}, which is not a temp file of {target}; delete the journal")
            dirs.add(target.parent)
            if tmp.exists():
                if hashlib.sha256(tmp.read_bytes()).hexdigest() != sha:
                    raise YamlEditError(
                        f"{where}: {tmp} is not the content it journaled; compare {target.name} with git, "
                        "then delete the journal and the temp file"
                    )
                os.replace(tmp, target)
                _fsync_dir(target.parent)
                done.append(target)
            elif not target.exists() or hashlib.sha256(target.read_bytes()).hexdigest() != sha:
                raise YamlEditError(
                    f"{where}: {target} was neither replaced nor is its temp file there; compare it with git, "
                    "then delete the journal"
                )
        journal.unlink()
        _fsync_dir(journal_dir)
    for d in dirs:  # temps of a writer killed before its commit point (we hold the lock: no one else writes)
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and TMP_MARK in p.name and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)
    return done
