"""One thin module per framework; ``create_runtime`` picks it from ``model.yaml``."""

from __future__ import annotations

from pathlib import Path

from services.serving.artifact import Framework, ModelSpec
from services.serving.runtimes.base import Runtime

__all__ = ["Runtime", "create_runtime"]


def create_runtime(spec: ModelSpec, artifact_dir: Path, threads: int | None = None) -> Runtime:
    """Import only the chosen framework, so a torch model never pays for TensorFlow."""
    cls: type[Runtime]
    if spec.framework is Framework.PYTORCH:
        from services.serving.runtimes.pytorch import PyTorchRuntime

        cls = PyTorchRuntime
    elif spec.framework is Framework.KERAS:
        from services.serving.runtimes.keras import KerasRuntime

        cls = KerasRuntime
    elif spec.framework is Framework.TENSORFLOW:
        from services.serving.runtimes.tensorflow import TensorFlowRuntime

        cls = TensorFlowRuntime
    else:
        from services.serving.runtimes.onnx import OnnxRuntime

        cls = OnnxRuntime
    return cls(spec, artifact_dir, threads)
