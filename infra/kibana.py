"""Kibana saved objects as code: the data view over the model-server log indices and a saved search
for model errors, as dicts ready for Kibana's saved-objects import (NDJSON, one object a line).

Both use only the fields of ``infra.logstash.LOG_FIELDS``, the contract the server writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from infra.logstash import ACCESS_DATASET, INDEX_PREFIX, LOG_FIELDS

DATA_VIEW_ID = "dlstack-model-server-logs"
ERRORS_SEARCH_ID = "dlstack-model-errors"
ERRORS_SEARCH_TITLE = "dlstack model errors"  # the error-ratio alert points people here
_INDEX_REF = "kibanaSavedObjectMeta.searchSourceJSON.index"

# Failed requests: the server answers them with an error.message; 5xx are ours, 4xx the caller's.
ERRORS_QUERY = f'event.dataset : "{ACCESS_DATASET}" and http.response.status_code >= 400'
ERRORS_COLUMNS: tuple[str, ...] = (
    "labels.model",
    "labels.model_version",
    "http.response.status_code",
    "error.type",
    "error.message",
    "url.path",
    "http.request.id",
)


def data_view(index_prefix: str = INDEX_PREFIX) -> dict[str, Any]:
    """The data view (``index-pattern`` saved object) over ``<index_prefix>-*``, time field @timestamp."""
    return {
        "type": "index-pattern",
        "id": DATA_VIEW_ID,
        "attributes": {
            "title": f"{index_prefix}-*",
            "name": "dlstack model servers",
            "timeFieldName": "@timestamp",
        },
        "references": [],
    }


def errors_search(query: str = ERRORS_QUERY, columns: Sequence[str] = ERRORS_COLUMNS) -> dict[str, Any]:
    """The saved search for failed inference requests, newest first, over the data view."""
    source = {"query": {"query": query, "language": "kuery"}, "filter": [], "indexRefName": _INDEX_REF}
    return {
        "type": "search",
        "id": ERRORS_SEARCH_ID,
        "attributes": {
            "title": ERRORS_SEARCH_TITLE,
            "description": "Inference requests answered 4xx/5xx by dlstack model servers, with the error message.",
            "columns": list(columns),
            "sort": [["@timestamp", "desc"]],
            "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps(source, sort_keys=True)},
        },
        "references": [{"name": _INDEX_REF, "type": "index-pattern", "id": DATA_VIEW_ID}],
    }


def saved_objects(index_prefix: str = INDEX_PREFIX) -> list[dict[str, Any]]:
    """Everything to import, data view first (the search references it)."""
    return [data_view(index_prefix), errors_search()]


def to_ndjson(objects: Sequence[dict[str, Any]]) -> str:
    """Kibana's import format (POST /api/saved_objects/_import): one JSON object a line."""
    return "".join(json.dumps(o, sort_keys=True) + "\n" for o in objects)


_KQL_FIELD = re.compile(r"([@A-Za-z_][\w.@]*)\s*(?::|>=|<=|>|<)")


def query_fields(search: dict[str, Any]) -> set[str]:
    """Fields a saved search uses: those its KQL query compares, its columns and its sort."""
    source = json.loads(search["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
    query = re.sub(r'"[^"]*"', '""', source["query"]["query"])  # values are not fields
    fields = set(_KQL_FIELD.findall(query))
    fields.update(search["attributes"]["columns"])
    fields.update(field for field, _ in search["attributes"]["sort"])
    return fields


def unknown_fields(search: dict[str, Any]) -> set[str]:
    """Fields of a saved search that the server does not write (should be empty)."""
    return query_fields(search) - set(LOG_FIELDS)
