"""The naive 2018 baseline the benchmark measures dlstack against.

Flask + Gunicorn sync workers, one torch thread per worker, ``request.get_json`` and one
forward pass per request; the model is loaded at import, in every worker. It speaks just
enough of the V2 protocol (same request body, same response shape) for wrk to drive both
servers with one script. Run it with::

    NAIVE_MODEL_DIR=ARTIFACT gunicorn -w 2 -b 127.0.0.1:PORT tests.bench.naive_server:app
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from flask import Flask, jsonify, request

torch.set_num_threads(1)
_DIR = Path(os.environ["NAIVE_MODEL_DIR"])
_MODEL = torch.jit.load(str(_DIR / "model.pt")).eval()

app = Flask(__name__)


@app.get("/v2/health/ready")
def ready() -> tuple[str, int]:
    return "", 200


@app.post("/v2/models/<name>/infer")
def infer(name: str):  # type: ignore[no-untyped-def]
    body = request.get_json()
    inp = body["inputs"][0]
    x = torch.tensor(np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"]))
    with torch.no_grad():
        y = _MODEL(x).numpy()
    return jsonify(
        model_name=name,
        outputs=[{"name": "output", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}],
    )
