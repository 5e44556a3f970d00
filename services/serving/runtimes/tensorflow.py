"""TensorFlow runtime: a SavedModel directory served through its ``serving_default`` signature."""

from __future__ import annotations

import contextlib
import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up banners would flood the JSON log stream

import numpy as np
import tensorflow as tf

from services.serving.artifact import ArtifactError, Datatype
from services.serving.runtimes.base import Runtime, check_names, check_tensor

SIGNATURE_KEY = "serving_default"


def set_threads(threads: int | None) -> None:
    if not threads:
        return
    # settable only before TF initializes its runtime; a second model in the process keeps the first value
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def tf_dtype(dtype: Any) -> Datatype | None:
    try:
        return Datatype.from_numpy(np.dtype(dtype.as_numpy_dtype))
    except (TypeError, ArtifactError):
        return None


def tf_shape(spec: Any) -> list[int | None] | None:
    """Dims of a tf.TensorSpec (None = dynamic), or None when even the rank is unknown."""
    return None if spec.shape.rank is None else list(spec.shape.as_list())


def serving_signature(path: str) -> tuple[Any, Any]:
    """The ``serving_default`` concrete function of a SavedModel; ArtifactError when there is none."""
    loaded = tf.saved_model.load(path)
    sigs = loaded.signatures
    if SIGNATURE_KEY not in sigs:
        raise ArtifactError(
            f"{path}: SavedModel has no {SIGNATURE_KEY!r} signature (has {sorted(sigs)}); save it with "
            f"tf.saved_model.save(module, dir, signatures={{'{SIGNATURE_KEY}': fn}}) or keras model.export(dir)"
        )
    # keep the loaded object alive: the concrete function only weakly references its variables
    return loaded, sigs[SIGNATURE_KEY]


class TensorFlowRuntime(Runtime):
    framework = "tensorflow"

    def _load(self) -> None:
        set_threads(self.threads)
        path = self.file()
        if not path.is_dir():
            raise self.error("a TensorFlow model must be a SavedModel directory (tf.saved_model.save)")
        try:
            self._loaded, self.fn = serving_signature(str(path))
        except ArtifactError:
            raise
        except Exception as exc:  # TF raises many error types for a broken SavedModel
            raise self.error(f"TensorFlow cannot load the SavedModel ({exc})") from exc
        sig = self.spec.signature
        ins: dict[str, Any] = self.fn.structured_input_signature[1]
        outs: dict[str, Any] = self.fn.structured_outputs
        check_names(self, "inputs", [t.name for t in sig.inputs], list(ins))
        check_names(self, "outputs", [t.name for t in sig.outputs], list(outs))
        for t in sig.inputs:
            check_tensor(self, t, tf_dtype(ins[t.name].dtype), tf_shape(ins[t.name]))
        for t in sig.outputs:
            check_tensor(self, t, tf_dtype(outs[t.name].dtype), tf_shape(outs[t.name]))

    def _predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.fn(**{t.name: tf.constant(inputs[t.name]) for t in self.spec.signature.inputs})
        return {t.name: out[t.name].numpy() for t in self.spec.signature.outputs}
