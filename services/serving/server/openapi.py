"""OpenAPI 3 document generated from the route table (``routes.TABLE``), so it cannot drift from the served routes."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from services.serving.server.routes import Route

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
    """(OpenAPI path, lower-case method) for every rule of the app's URL map (the route table's)."""
    return {
        (openapi_path(r.rule), m.lower())
        for r in app.url_map.iter_rules()
        for m in (r.methods or ())
        if m not in _HIDDEN_METHODS
    }


def openapi_document(table: tuple[Route, ...]) -> dict[str, Any]:
    from services.serving.server.app import SERVER_VERSION

    paths: dict[str, dict[str, Any]] = {}
    for route, rule in sorted(((r, p) for r in table for p in r.paths), key=lambda rp: rp[1]):
        path = openapi_path(rule)
        method = route.method
        op: dict[str, Any] = {
            "operationId": f"{method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}",
            "summary": route.summary,
            "tags": [route.name],
            "parameters": [
                {"name": a, "in": "path", "required": True, "schema": {"type": "string"}}
                for a in sorted(_PARAM.findall(rule))
            ],
            "responses": {
                "200": {"description": "success"},
                **{code: _ERROR for code in _ERRORS.get(route.name, ())},
                "500": _ERROR,
            },
        }
        if route.name in _BODY:
            op["requestBody"] = {"required": True, "content": _BODY[route.name]}
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
