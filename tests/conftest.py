"""Shared fixtures: free ports, tiny real models built in tmp_path (nothing binary is committed), git, and
the system tools some tests need (``@pytest.mark.tool("promtool")``)."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# `import tensorflow` imports keras with the TF backend; pin torch first so any test order works.
os.environ.setdefault("KERAS_BACKEND", "torch")
# The tests commit in temporary repos; a fresh machine has no git identity (and must not need one).
for _key, _value in (("GIT_AUTHOR_NAME", "dlstack tests"), ("GIT_AUTHOR_EMAIL", "tests@dlstack.invalid")):
    os.environ.setdefault(_key, _value)
    os.environ.setdefault(_key.replace("AUTHOR", "COMMITTER"), _value)

ROOT = Path(__file__).resolve().parent.parent

# System tools by the Debian package that provides them; `make sysdeps` installs them all.
TOOL_PACKAGES = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "git-lfs": "git-lfs",
    "wrk": "wrk",
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.tool(NAME, ...)``: skip where NAME is missing on a laptop, fail under CI=true.

    CI must prove every test ran, so a missing tool there is an install bug, not a reason to skip.
    """
    for mark in item.iter_markers("tool"):
        for name in mark.args:
            if shutil.which(name) is None:
                msg = f"{name} is not installed: run `make sysdeps` (apt-get install {TOOL_PACKAGES[name]})"
                if in_ci():
                    pytest.fail(f"CI=true: {msg}", pytrace=False)
                pytest.skip(msg)


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run git in ``repo``; a failure shows git's own stderr (CalledProcessError would hide it)."""
    res = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise AssertionError(f"`git {' '.join(args)}` failed ({res.returncode}) in {repo}:\n{res.stderr}{res.stdout}")
    return res.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


def write_torchscript_artifact(
    out: Path,
    module: Any,
    *,
    name: str,
    inputs: tuple[str, int] = ("input", 8),
    outputs: tuple[str, int] = ("output", 3),
    version: str = "1",
    **serving: object,
) -> Path:
    """Script ``module`` into ``out/model.pt`` and write its model.yaml: one FP32 [-1, width] input and output."""
    import torch

    from services.serving.artifact import FileEntry, ModelSpec, Serving, Signature, TensorSpec, file_sha256, write_spec

    out.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module).save(str(out / "model.pt"))
    spec = ModelSpec(
        name=name,
        version=version,
        framework="pytorch",  # type: ignore[arg-type]
        files=(FileEntry(path="model.pt", sha256=file_sha256(out / "model.pt")),),
        signature=Signature(
            inputs=(TensorSpec(name=inputs[0], datatype="FP32", shape=(-1, inputs[1])),),  # type: ignore[arg-type]
            outputs=(TensorSpec(name=outputs[0], datatype="FP32", shape=(-1, outputs[1])),),  # type: ignore[arg-type]
        ),
        serving=Serving(**serving),  # type: ignore[arg-type]
    )
    write_spec(out, spec)
    return out


def make_torch_mlp_artifact(
    out: Path,
    name: str = "mlp",
    sizes: tuple[int, ...] = (8, 16, 3),
    version: str = "1",
    seed: int = 0,
    **serving: object,
) -> Path:
    """A TorchScript MLP artifact written straight through services.serving.artifact (no packaging code involved)."""
    import torch

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).eval()
    return write_torchscript_artifact(
        out, model, name=name, inputs=("input", sizes[0]), outputs=("output", sizes[-1]), version=version, **serving
    )


def stack_models_registry(tmp: Path) -> Any:
    """A registry under ``tmp`` with what both stack files deploy, mnist-mlp:1 and tiny-cnn:1, as tiny real MLPs."""
    from services.registry import Registry

    reg = Registry(tmp / "registry")
    for name in ("mnist-mlp", "tiny-cnn"):
        reg.register(make_torch_mlp_artifact(tmp / "src" / name, name=name), name, "pytorch")
    return reg


@pytest.fixture
def torch_mlp_artifact(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``torch_mlp_artifact(name=..., sizes=..., max_batch_size=...)`` -> artifact dir."""

    def make(**kw: object) -> Path:
        name = str(kw.get("name", "mlp"))
        return make_torch_mlp_artifact(tmp_path / f"artifact-{name}-{kw.get('version', '1')}", **kw)  # type: ignore[arg-type]

    return make


# The S3 API server on loopback (tests/s3.py): a session fixture any test module can ask for.
from tests.s3 import s3_server  # noqa: E402, F401
