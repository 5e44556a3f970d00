"""The templated access line (``logs.access_json``) is byte for byte the line ``logs.access_line`` builds."""

from __future__ import annotations

import logging
import os

import orjson
import pytest

from services.serving.server import logs


@pytest.mark.parametrize(
    ("model", "version", "rid", "method", "path", "status"),
    [
        ("mlp", "1", "7153abc37420f3674a161c90574b47d7", "POST", "/v2/models/mlp/infer", 200),
        ('we"ird\\name', "2\n", "client-id", "GET", '/a"b\\c/\u00e9', 404),
        ("m", "v", "x" * 200, "DELETE", "/v2/health/ready", 503),
    ],
)
def test_access_json_matches_access_line(
    model: str, version: str, rid: str, method: str, path: str, status: int
) -> None:
    level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    for now in (1_764_000_000.0, 1_764_000_000.999, 1_764_000_123.0421):
        fields = {
            "labels": {"model": model, "model_version": version},
            "http": {"request": {"id": rid, "method": method}, "response": {"status_code": status}},
            "url": {"path": path},
            "event": {"duration": 15_641_847, "dataset": logs.ACCESS_DATASET},
        }
        want = logs.access_line(now, os.getpid(), level, f"{method} {path} {status}", fields)
        got = logs.access_json(now, level, model, version, rid, method, path, status, 15_641_847)
        assert got == want
        assert orjson.loads(got)["url"]["path"] == path
