"""The two reference models of the benchmark, as real TorchScript artifacts.

``python -m services.example --out DIR --model mnist-mlp|tiny-cnn`` builds them when that
module exists; until then (or if it fails) equivalent models are built here, so the
benchmark never depends on another module being finished.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from services.serving.artifact import FileEntry, ModelSpec, Signature, TensorSpec, file_sha256, read_spec, write_spec

MODELS = ("mnist-mlp", "tiny-cnn")


def build_model(name: str, out: Path) -> Path:
    """An artifact directory for ``name`` (one of MODELS), written into ``out``."""
    if name not in MODELS:
        raise ValueError(f"unknown reference model {name!r}; choose one of {', '.join(MODELS)}")
    if importlib.util.find_spec("services.example") is not None:
        proc = subprocess.run(
            [sys.executable, "-m", "services.example", "--out", str(out), "--model", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0 and (out / "model.yaml").is_file():
            return out
        print(f"services.example failed ({proc.stderr.strip()[-300:]}); building {name} here", file=sys.stderr)
    return _build_fallback(name, out)


def _build_fallback(name: str, out: Path) -> Path:
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    if name == "mnist-mlp":
        model: torch.nn.Module = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        in_shape: tuple[int, ...] = (-1, 784)
    else:
        # About 3-4 ms per one-image forward on one core, like the CNN.
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 48, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(48, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
        in_shape = (-1, 3, 64, 64)
    out.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model.eval()).save(str(out / "model.pt"))
    spec = ModelSpec(
        name=name,
        framework="pytorch",  # type: ignore[arg-type]
        files=(FileEntry(path="model.pt", sha256=file_sha256(out / "model.pt")),),
        signature=Signature(
            inputs=(TensorSpec(name="input", datatype="FP32", shape=in_shape),),  # type: ignore[arg-type]
            outputs=(TensorSpec(name="output", datatype="FP32", shape=(-1, 10)),),  # type: ignore[arg-type]
        ),
    )
    write_spec(out, spec)
    return out


def with_batching(src: Path, out: Path, max_batch_size: int) -> Path:
    """A copy of artifact ``src`` whose model.yaml sets ``serving.max_batch_size`` (1 = batching off)."""
    import shutil

    shutil.copytree(src, out, dirs_exist_ok=True)
    spec = read_spec(src)
    write_spec(
        out, spec.model_copy(update={"serving": spec.serving.model_copy(update={"max_batch_size": max_batch_size})})
    )
    return out
