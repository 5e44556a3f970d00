"""Shared fixtures: free ports and tiny real models built in tmp_path (nothing binary is committed)."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

# `import tensorflow` imports keras with the TF backend; pin torch first so any test order works.
os.environ.setdefault("KERAS_BACKEND", "torch")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


def make_torch_mlp_artifact(
    out: Path,
    name: str = "mlp",
    sizes: tuple[int, ...] = (8, 16, 3),
    version: str = "1",
    seed: int = 0,
    **serving: object,
) -> Path:
    """A TorchScript MLP artifact written straight through services.artifact (no packaging code involved)."""
    import torch

    from services.artifact import FileEntry, ModelSpec, Serving, Signature, TensorSpec, file_sha256, write_spec

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).eval()
    out.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(model)
    scripted.save(str(out / "model.pt"))
    spec = ModelSpec(
        name=name,
        version=version,
        framework="pytorch",  # type: ignore[arg-type]
        files=(FileEntry(path="model.pt", sha256=file_sha256(out / "model.pt")),),
        signature=Signature(
            inputs=(TensorSpec(name="input", datatype="FP32", shape=(-1, sizes[0])),),  # type: ignore[arg-type]
            outputs=(TensorSpec(name="output", datatype="FP32", shape=(-1, sizes[-1])),),  # type: ignore[arg-type]
        ),
        serving=Serving(**serving),  # type: ignore[arg-type]
    )
    write_spec(out, spec)
    return out


@pytest.fixture
def torch_mlp_artifact(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``torch_mlp_artifact(name=..., sizes=..., max_batch_size=...)`` -> artifact dir."""

    def make(**kw: object) -> Path:
        name = str(kw.get("name", "mlp"))
        return make_torch_mlp_artifact(tmp_path / f"artifact-{name}-{kw.get('version', '1')}", **kw)  # type: ignore[arg-type]

    return make
