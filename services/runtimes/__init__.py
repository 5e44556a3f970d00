"""One thin module per framework; ``create_runtime`` picks it from ``model.yaml``."""

from __future__ import annotations

from pathlib import Path

from services.artifact import Framework, ModelSpec
from services.runtimes.base import Runtime

__all__ = ["Runtime", "create_runtime"]


def create_runtime(spec: ModelSpec, artifact_dir: Path, threads: int | None = None) -> Runtime:
    """Import only the chosen framework, so a torch model never pays for TensorFlow."""
    if spec.framework is Framework.PYTORCH:
        from services.runtimes.pytorch import PyTorchRuntime as cls
    elif spec.framework is Framework.KERAS:
        from services.runtimes.keras import KerasRuntime as cls  # type: ignore[assignment]
    elif spec.framework is Framework.TENSORFLOW:
        from services.runtimes.tensorflow import TensorFlowRuntime as cls  # type: ignore[assignment]
    else:
        from services.runtimes.onnx import OnnxRuntime as cls  # type: ignore[assignment]
    return cls(spec, artifact_dir, threads)
