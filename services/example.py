"""Build the reference models that ``make serve`` and the benchmarks use, deterministically.

``python -m services.example --out DIR [--model mnist-mlp|tiny-cnn]`` writes a packaged artifact. Weights
come from a fixed seed and tracing is made reproducible (see ``trace``), so every run on one installation
gives the same sha256 (TorchScript debug info holds the installation's source paths).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.serving.artifact import ModelSpec, Serving
from services.serving.errors import DlstackError

SEED = 20240601


def mnist_mlp() -> Any:
    """784-512-512-10 MLP: input "input" FP32 [-1, 784] -> logits "output" FP32 [-1, 10]."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def tiny_cnn() -> Any:
    """A small image classifier on 3x64x64 (≈3-4 ms per single-image forward on one CPU thread)."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32, 1),
        *block(32, 32, 2),
        *block(32, 64, 1),
        *block(64, 64, 1),
        *block(64, 64, 2),
        *block(64, 64, 1),
        *block(64, 128, 2),
        *block(128, 128, 1),
        *block(128, 128, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


# name -> (builder, input shape without the batch dim, output width)
MODELS: dict[str, tuple[Callable[[], Any], tuple[int, ...], int]] = {
    "mnist-mlp": (mnist_mlp, (784,), 10),
    "tiny-cnn": (tiny_cnn, (3, 64, 64), 10),
}


def trace(module: Any, example: Any) -> Any:
    """torch.jit.trace with reproducible bytes.

    Not torch.jit.script: scripting writes module constants in hash-seed order, so bytes changed per run (these
    models have no control flow, so a trace is the whole model). The trace's debug info records the Python call
    stack, so it runs in a fresh thread whose stack is the same whoever calls ``build``.
    """
    import torch

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["module"] = torch.jit.trace(module, example)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=run, name="dlstack-trace")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["module"]


def save_model(model: str, path: Path | str) -> None:
    """Build and save one reference model as TorchScript (call it in a fresh interpreter, see ``build``)."""
    import torch

    builder, shape, _ = MODELS[model]
    trace(builder().eval(), torch.zeros((1, *shape))).save(str(path))


def build(
    out: Path | str, model: str = "mnist-mlp", *, force: bool = False, isolated: bool = True, **serving: Any
) -> ModelSpec:
    """Build, save and package one reference model into ``out``; returns its spec.

    ``isolated`` saves in a fresh interpreter: TorchScript numbers its classes per process (``___torch_mangle_N``),
    so a process that scripted anything before would write other bytes. ``main`` is itself fresh and skips that.
    """
    from services.packaging import package_model
    from services.serving.artifact import TensorSpec

    if model not in MODELS:
        raise DlstackError(f"unknown example model {model!r}; choose one of {sorted(MODELS)}")
    _, shape, classes = MODELS[model]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        if isolated:
            code = "import sys; from services.example import save_model; save_model(sys.argv[1], sys.argv[2])"
            root = Path(__file__).resolve().parent.parent
            done = subprocess.run(
                [sys.executable, "-c", code, model, str(path)], cwd=root, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise DlstackError(f"building {model} failed:\n{done.stderr[-2000:]}")
        else:
            save_model(model, path)
        return package_model(
            path,
            name=model,
            framework="pytorch",
            out=out,
            inputs=[TensorSpec(name="input", datatype="FP32", shape=(-1, *shape))],  # type: ignore[arg-type]
            outputs=[TensorSpec(name="output", datatype="FP32", shape=(-1, classes))],  # type: ignore[arg-type]
            serving=Serving(**serving),
            metadata={"source": f"services.example:{model}", "seed": SEED},
            force=force,
        )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.example", description=__doc__)
    p.add_argument("--out", required=True, type=Path, help="artifact dir: empty or an earlier build")
    p.add_argument("--model", default="mnist-mlp", choices=sorted(MODELS), help="which model (default mnist-mlp)")
    p.add_argument("--max-batch-size", type=int, default=8, help="serving.max_batch_size (default 8)")
    args = p.parse_args(argv)
    try:
        spec = build(args.out, args.model, isolated=False, max_batch_size=args.max_batch_size)
    except DlstackError as exc:
        print(f"{p.prog}: error: {exc.message}", file=sys.stderr)
        return 2
    print(f"{spec.name}:{spec.version} -> {args.out} sha256={spec.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
