"""OpenAPI 3 document generated from the Flask URL map, so it cannot drift from the served routes."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask

_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
_HIDDEN_METHODS = {"HEAD", "OPTIONS"}
_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_BODY = {
    "infer": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "JSON header (Inference-Header-Content-Length bytes) followed by binary tensor data",
        },
    },
    "v1_predict": {"application/json": {"schema": {"type": "object", "required": ["instances"]}}},
}
_ERRORS = {
    "infer": ("400", "404", "413", "415", "503"),
    "v1_predict": ("400", "404", "413", "415", "503"),
    "model_metadata": ("404",),
    "model_ready": ("404", "503"),
    "ready": ("503",),
}


def openapi_path(rule: str) -> str:
    """Flask ``/v2/models/<name>`` -> OpenAPI ``/v2/models/{name}``."""
    return _PARAM.sub(r"{\1}", rule)


def served_operations(app: Flask) -> set[tuple[str, str]]:
    """(OpenAPI path, lower-case method) for every registered rule."""
    return {
        (openapi_path(r.rule), m.lower())
        for r in app.url_map.iter_rules()
        for m in (r.methods or ())
        if m not in _HIDDEN_METHODS
    }


def openapi_document(app: Flask) -> dict[str, Any]:
    from services.serving.server.app import SERVER_VERSION

    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        doc = (view.__doc__ or rule.endpoint).strip().splitlines()[0]
        path = openapi_path(rule.rule)
        for method in sorted((rule.methods or set()) - _HIDDEN_METHODS):
            op: dict[str, Any] = {
                "operationId": f"{method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}",
                "summary": doc,
                "tags": [rule.endpoint],
                "parameters": [
                    {"name": a, "in": "path", "required": True, "schema": {"type": "string"}}
                    for a in sorted(rule.arguments)
                ],
                "responses": {
                    "200": {"description": "success"},
                    **{code: _ERROR for code in _ERRORS.get(rule.endpoint, ())},
                    "500": _ERROR,
                },
            }
            if rule.endpoint in _BODY:
                op["requestBody"] = {"required": True, "content": _BODY[rule.endpoint]}
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "dlstack model server", "version": SERVER_VERSION},
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "InferenceRequest": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "Tensor": {
                    "type": "object",
                    "required": ["name", "shape", "datatype"],
                    "properties": {
                        "name": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "datatype": {"type": "string"},
                        "parameters": {"type": "object"},
                        "data": {"type": "array"},
                    },
                },
            }
        },
    }
