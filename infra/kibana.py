"""Kibana saved objects as code: the data view over the model-server log indices and a saved search
for model errors; a data view over the prediction-log indices with saved searches for failed and for
the slowest predictions; as dicts ready for Kibana's saved-objects import (NDJSON, one object a line).

They use only the fields of ``infra.logstash.LOG_FIELDS``, the contract the server writes
(prediction searches: ``BASE_FIELDS`` + ``PREDICTION_FIELDS``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from infra.logstash import (
    ACCESS_DATASET,
    BASE_FIELDS,
    INDEX_PREFIX,
    LOG_FIELDS,
    PREDICTION_FIELDS,
    PREDICTIONS_DATASET,
    PREDICTIONS_INDEX_PREFIX,
)

DATA_VIEW_ID = "dlstack-model-server-logs"
ERRORS_SEARCH_ID = "dlstack-model-errors"
ERRORS_SEARCH_TITLE = "dlstack model errors"  # the error-ratio alert points people here
_INDEX_REF = "kibanaSavedObjectMeta.searchSourceJSON.index"
PREDICTIONS_VIEW_ID = "dlstack-predictions"
FAILED_PREDICTIONS_ID = "dlstack-failed-predictions"
SLOWEST_PREDICTIONS_ID = "dlstack-slowest-predictions"

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


# Sampled predictions answered with anything but 200 (the event keeps the inputs that caused it).
FAILED_PREDICTIONS_QUERY = f'event.dataset : "{PREDICTIONS_DATASET}" and not http.response.status_code : 200'
SLOWEST_PREDICTIONS_QUERY = f'event.dataset : "{PREDICTIONS_DATASET}"'  # sorted by latency, slowest first
PREDICTION_COLUMNS: tuple[str, ...] = (
    "labels.model",
    "labels.model_version",
    "http.response.status_code",
    "dlstack.prediction.latency_ms",
    "dlstack.prediction.form",
    "http.request.id",
)
PREDICTION_SEARCH_FIELDS: tuple[str, ...] = BASE_FIELDS + PREDICTION_FIELDS


def data_view(
    index_prefix: str = INDEX_PREFIX, view_id: str = DATA_VIEW_ID, name: str = "dlstack model servers"
) -> dict[str, Any]:
    """The data view (``index-pattern`` saved object) over ``<index_prefix>-*``, time field @timestamp."""
    return {
        "type": "index-pattern",
        "id": view_id,
        "attributes": {
            "title": f"{index_prefix}-*",
            "name": name,
            "timeFieldName": "@timestamp",
        },
        "references": [],
    }


def predictions_view(predictions_prefix: str = PREDICTIONS_INDEX_PREFIX) -> dict[str, Any]:
    """The data view over the prediction-log indices (separate from the logs': different readers)."""
    return data_view(predictions_prefix, PREDICTIONS_VIEW_ID, "dlstack predictions (sampled)")


def _search(
    search_id: str,
    title: str,
    description: str,
    query: str,
    columns: Sequence[str],
    sort: Sequence[tuple[str, str]],
    view_id: str,
) -> dict[str, Any]:
    source = {"query": {"query": query, "language": "kuery"}, "filter": [], "indexRefName": _INDEX_REF}
    return {
        "type": "search",
        "id": search_id,
        "attributes": {
            "title": title,
            "description": description,
            "columns": list(columns),
            "sort": [list(s) for s in sort],
            "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps(source, sort_keys=True)},
        },
        "references": [{"name": _INDEX_REF, "type": "index-pattern", "id": view_id}],
    }


def failed_predictions_search(query: str = FAILED_PREDICTIONS_QUERY) -> dict[str, Any]:
    """Sampled predictions that were not answered 200, newest first."""
    return _search(
        FAILED_PREDICTIONS_ID,
        "dlstack failed predictions (sampled)",
        "Sampled prediction events answered with a non-200 status, with the inputs that caused them.",
        query,
        PREDICTION_COLUMNS,
        [("@timestamp", "desc")],
        PREDICTIONS_VIEW_ID,
    )


def slowest_predictions_search(query: str = SLOWEST_PREDICTIONS_QUERY) -> dict[str, Any]:
    """Sampled predictions, slowest first (filter on labels.model in Kibana for one model)."""
    return _search(
        SLOWEST_PREDICTIONS_ID,
        "dlstack slowest predictions (sampled)",
        "Sampled prediction events by latency, slowest first; add labels.model : <name> for one model.",
        query,
        PREDICTION_COLUMNS,
        [("dlstack.prediction.latency_ms", "desc"), ("@timestamp", "desc")],
        PREDICTIONS_VIEW_ID,
    )


def errors_search(query: str = ERRORS_QUERY, columns: Sequence[str] = ERRORS_COLUMNS) -> dict[str, Any]:
    """The saved search for failed inference requests, newest first, over the data view."""
    return _search(
        ERRORS_SEARCH_ID,
        ERRORS_SEARCH_TITLE,
        "Inference requests answered 4xx/5xx by dlstack model servers, with the error message.",
        query,
        columns,
        [("@timestamp", "desc")],
        DATA_VIEW_ID,
    )


def saved_objects(
    index_prefix: str = INDEX_PREFIX, predictions_prefix: str = PREDICTIONS_INDEX_PREFIX
) -> list[dict[str, Any]]:
    """Everything to import, each data view before the searches that reference it."""
    return [
        data_view(index_prefix),
        errors_search(),
        predictions_view(predictions_prefix),
        failed_predictions_search(),
        slowest_predictions_search(),
    ]


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


def unknown_fields(search: dict[str, Any], fields: Sequence[str] = LOG_FIELDS) -> set[str]:
    """Fields of a saved search that the server does not write (should be empty); ``fields``: what the
    lines it searches carry (``PREDICTION_SEARCH_FIELDS`` for the prediction searches)."""
    return query_fields(search) - set(fields)
