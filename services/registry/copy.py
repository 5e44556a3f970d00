"""``dlstack models copy SRC DST [NAME[:VERSION]...]``: versions from one registry into another.

Any pair of backends (a laptop's ``.registry`` into the team's bucket, one bucket into another).
A version keeps its number, its files (sha256) and its lineage: the index entry is copied as it is.
Blobs go first, streamed and checked on the way (through a temp file, never in memory beyond one
chunk on the read side); then one index change adds every missing version, so a copy that fails
half way leaves DST's index as it was. Copying again changes nothing (idempotent). A NAME:VERSION
that DST already holds with other content is refused, naming both digests: versions never change.

Aliases of the copied versions come along where DST has no such alias; an alias DST already points
elsewhere is left alone and reported (DST's deployments may rely on it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.registry.registry import Registry, parse_ref
from services.registry.store import RegistryError


@dataclass(frozen=True)
class CopyResult:
    ref: str  # NAME:VERSION
    sha256: str  # ModelSpec.sha256 of the version
    copied: bool  # False: DST already held it, identical
    notes: tuple[str, ...] = ()  # aliases kept or copied


Selection = dict[tuple[str, str], dict[str, Any]]


def _selected(src: Registry, refs: Sequence[str]) -> tuple[Selection, dict[str, dict[str, str]]]:
    """(name, version) -> SRC's entry for every selected version, and SRC's aliases; one read of SRC's index."""
    snap = src.snapshot()
    models = snap.index["models"]
    out: Selection = {}
    if not refs:
        refs = sorted(models)
        if not refs:
            raise RegistryError(f"{src.url} holds no models; nothing to copy")
    for ref in refs:
        name, version, alias = parse_ref(ref)
        model = src.model_entry(snap.index, name)
        if version is None and alias is None:
            chosen = sorted(model["versions"], key=int)
        else:
            chosen = [snap.resolve(ref).version]
        for v in chosen:
            out[(name, v)] = model["versions"][v]
    return out, {name: dict(models[name]["aliases"]) for name, _ in out}


def copy_versions(src: Registry, dst: Registry, refs: Sequence[str] = ()) -> list[CopyResult]:
    """Copy the versions ``refs`` name (NAME: all its versions; none: everything) from ``src`` to ``dst``."""
    if src.url == dst.url:
        raise RegistryError(f"SRC and DST are the same registry ({src.url}); name two different ones")
    chosen, src_aliases = _selected(src, refs)
    # Blobs first: each one DST lacks is streamed out of SRC (verified) into a temp file and stored.
    with tempfile.TemporaryDirectory(prefix="dlstack-copy-") as tmp:
        for entry in chosen.values():
            for sha in sorted(set(entry["blobs"].values())):
                if dst.store.has_blob(sha):
                    continue
                f = Path(tmp) / sha
                src.store.get_blob(sha, f)
                dst.store.put_blob(f)
                f.unlink()

    def add(index: dict[str, Any]) -> list[CopyResult]:
        # Pure function of DST's index: it may run again after a lost compare-and-swap.
        results: list[CopyResult] = []
        for (name, version), entry in sorted(chosen.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
            model = index["models"].setdefault(name, {"aliases": {}, "versions": {}})
            sha = _spec_sha(entry)
            have = model["versions"].get(version)
            if have is not None and (have["content_key"], have["blobs"]) != (entry["content_key"], entry["blobs"]):
                raise RegistryError(
                    f"{dst.url} already has {name}:{version} with other content (sha256 {_spec_sha(have)[:12]}, "
                    f"{src.url} has {sha[:12]}); versions never change: copy other versions, or register "
                    "this one in DST as a new version"
                )
            notes: list[str] = []
            for alias, target in sorted(src_aliases[name].items()):
                if target != version:
                    continue
                current = model["aliases"].get(alias)
                if current is None:
                    model["aliases"][alias] = version
                    notes.append(f"{name}@{alias} -> {name}:{version}")
                elif current != version:
                    notes.append(f"kept {name}@{alias} -> {name}:{current} in DST (SRC points it at {version})")
            if have is None:
                model["versions"][version] = dict(entry)
            results.append(CopyResult(f"{name}:{version}", sha, copied=have is None, notes=tuple(notes)))
        return results

    result: list[CopyResult] = dst.update(add)
    return result


def _spec_sha(entry: dict[str, Any]) -> str:
    from services.serving.artifact import ModelSpec

    return ModelSpec.model_validate(entry["spec"]).sha256


__all__ = ["CopyResult", "copy_versions"]
