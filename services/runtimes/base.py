"""The runtime lifecycle every framework module follows: ``load()`` sets ready, then ``predict()``."""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from services.artifact import ModelSpec


class Runtime(abc.ABC):
    """One loaded model. Subclasses implement ``_load`` and ``_predict`` only."""

    framework: str = ""

    def __init__(self, spec: ModelSpec, artifact_dir: Path, threads: int | None = None) -> None:
        self.spec = spec
        self.artifact_dir = Path(artifact_dir)
        self.threads = threads  # intra-op threads; None = the framework's default
        self.ready = False

    def load(self) -> None:
        self._load()
        self.ready = True

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one forward pass: batch-first numpy arrays in, keyed by signature names, and out."""
        if not self.ready:
            raise RuntimeError(f"model {self.spec.name!r} is not loaded; call load() first")
        return self._predict(inputs)

    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def _predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def file(self, index: int = 0) -> Path:
        return self.artifact_dir / self.spec.files[index].path
