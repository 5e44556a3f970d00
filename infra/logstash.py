"""The Logstash pipeline that turns the model servers' ECS JSON lines (shipped raw by filebeat) into
Elasticsearch documents, and the ECS field contract it, Kibana and the server share.

``LOG_FIELDS`` is the single source of truth: the server must write these fields
(tests/test_logging_contract.py checks every line of a real server), the pipeline below
references exactly these fields, and the Kibana saved searches query only these. Prediction events
(``PREDICTION_FIELDS``) are routed to their own indices (``predictions_index_prefix``), so their
retention and readers are separate from the access logs'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.serving.errors import UserError

SERVICE_NAME = "dlstack-model-server"
ACCESS_DATASET = "dlstack.access"
PREDICTIONS_DATASET = "dlstack.predictions"  # sampled prediction events (services/serving/server/predlog.py)

# Every line the server writes (gunicorn's own lines included).
BASE_FIELDS: tuple[str, ...] = ("@timestamp", "log.level", "message", "ecs.version", "service.name")
# Every access line (event.dataset = dlstack.access) adds these; int fields are typed below.
ACCESS_FIELDS: tuple[str, ...] = (
    "event.dataset",
    "labels.model",
    "labels.model_version",
    "http.request.id",
    "http.request.method",
    "url.path",
    "http.response.status_code",
    "event.duration",
)
# An access line for a failed request (status >= 400) adds these.
ERROR_FIELDS: tuple[str, ...] = ("error.message", "error.type")
# Every prediction event (event.dataset = dlstack.predictions) adds these.
PREDICTION_FIELDS: tuple[str, ...] = (
    "event.dataset",
    "labels.model",
    "labels.model_version",
    "http.request.id",
    "http.response.status_code",
    "event.duration",
    "dlstack.prediction.form",
    "dlstack.prediction.latency_ms",
)
# ...and these, null when absent (no inputs decoded, no outputs unless 200): V2 tensors, or their summaries
# when the line would exceed the server's max_bytes. Stored, never indexed (see infra.logging).
PREDICTION_TENSOR_FIELDS: tuple[str, ...] = ("dlstack.prediction.inputs", "dlstack.prediction.outputs")
LOG_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(BASE_FIELDS + ACCESS_FIELDS + ERROR_FIELDS + PREDICTION_FIELDS))
INTEGER_FIELDS: tuple[str, ...] = ("http.response.status_code", "event.duration")
FLOAT_FIELDS: tuple[str, ...] = ("dlstack.prediction.latency_ms",)
# ecs-logging writes these as literal dotted keys at the top level (everything else is nested).
TOP_LEVEL_DOTTED: tuple[str, ...] = ("log.level", "ecs.version")

INDEX_PREFIX = "dlstack-logs"
PREDICTIONS_INDEX_PREFIX = "dlstack-predictions"  # its own indices: own retention, own readers
BEATS_PORT = 5044
ERROR_TAG = "dlstack_error"
CONTRACT_TAG = "_dlstack_contract_violation"

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def ref(field: str) -> str:
    """Logstash field reference of an ECS dotted name: ``http.request.id`` -> ``[http][request][id]``."""
    return "".join(f"[{part}]" for part in field.split("."))


@dataclass(frozen=True)
class PipelineArgs:
    """Where the pipeline listens and ships to."""

    es_cluster_name: str = "eck"  # default "eck"; the ECK elasticsearchRefs clusterName, prefix of its env vars
    index_prefix: str = INDEX_PREFIX  # default dlstack-logs; daily indices <prefix>-YYYY.MM.dd
    beats_port: int = BEATS_PORT  # default 5044; TCP port filebeat ships to
    # default dlstack-predictions; daily indices <prefix>-YYYY.MM.dd for the prediction events
    predictions_index_prefix: str = PREDICTIONS_INDEX_PREFIX

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.es_cluster_name):
            raise UserError(f"logstash: es_cluster_name {self.es_cluster_name!r} must be a DNS-1123 name, e.g. 'eck'")
        if not _NAME.fullmatch(self.index_prefix):
            raise UserError(f"logstash: index_prefix {self.index_prefix!r} must be lowercase letters, digits and '-'")
        if not _NAME.fullmatch(self.predictions_index_prefix):
            raise UserError(
                f"logstash: predictions_index_prefix {self.predictions_index_prefix!r} must be lowercase letters, "
                "digits and '-'"
            )
        overlap = overlapping_prefixes(self.index_prefix, self.predictions_index_prefix)
        if overlap:
            raise UserError(f"logstash: {overlap}")
        if not 0 < self.beats_port < 65536:
            raise UserError(f"logstash: beats_port {self.beats_port} must be a TCP port (1-65535)")


def overlapping_prefixes(logs: str, predictions: str) -> str | None:
    """Why two index prefixes may not be used together, or None.

    ``<logs>-*`` must not match a prediction index (nor the reverse): the logs' retention, data view
    and readers would then cover prediction events, which may hold personal data.
    """
    for a, b in ((logs, predictions), (predictions, logs)):
        if a == b or b.startswith(f"{a}-"):
            return (
                f"index prefixes {logs!r} (logs) and {predictions!r} (predictions) overlap: {a}-* would match "
                f"{b}-* indices; pick prefixes where neither starts with the other plus '-'"
            )
    return None


def pipeline(args: PipelineArgs | None = None) -> str:
    """The pipeline config (``logstash.conf`` text) for the Logstash resource of the Logging component."""
    a = args or PipelineArgs()
    env = a.es_cluster_name.upper().replace("-", "_") + "_ES"
    renames = "\n".join(f'        "{f}" => "{ref(f)}"' for f in TOP_LEVEL_DOTTED)
    converts = "\n".join(f'          "{ref(f)}" => "integer"' for f in INTEGER_FIELDS)
    required = " or ".join(f"!{ref(f)}" for f in BASE_FIELDS + ACCESS_FIELDS)
    pred_converts = "\n".join(
        f'          "{ref(f)}" => "{"float" if f in FLOAT_FIELDS else "integer"}"'
        for f in PREDICTION_FIELDS
        if f in INTEGER_FIELDS + FLOAT_FIELDS
    )
    pred_required = " or ".join(f"!{ref(f)}" for f in BASE_FIELDS + PREDICTION_FIELDS)
    return f"""# Generated by dlstack (infra/logstash.py): model-server ECS JSON lines from filebeat to Elasticsearch.
input {{
  beats {{
    port => {a.beats_port}
  }}
}}

filter {{
  # filebeat ships each container line raw in [message]; model servers write one ECS JSON object per line.
  if [message] =~ /^\\{{/ {{
    json {{
      source => "message"
      skip_on_invalid_json => true
    }}
  }}
  if {ref("service.name")} == "{SERVICE_NAME}" {{
    # ecs-logging writes these two as dotted top-level keys; nest them like every other ECS field.
    mutate {{
      rename => {{
{renames}
      }}
    }}
    if {ref("event.dataset")} == "{ACCESS_DATASET}" {{
      mutate {{
        convert => {{
{converts}
        }}
      }}
      # Tag lines that break the contract instead of dropping them: nothing is lost, and they are easy to find.
      if {required} {{
        mutate {{ add_tag => ["{CONTRACT_TAG}"] }}
      }}
      if {ref("http.response.status_code")} >= 500 or {ref("error.message")} {{
        mutate {{ add_tag => ["{ERROR_TAG}"] }}
      }}
      if {ref("error.message")} and !{ref("error.type")} {{
        mutate {{ add_field => {{ "{ref("error.type")}" => "unknown" }} }}
      }}
    }}
    # Sampled prediction events (inputs may be personal data) go to their own indices, nowhere else.
    if {ref("event.dataset")} == "{PREDICTIONS_DATASET}" {{
      mutate {{
        convert => {{
{pred_converts}
        }}
        add_field => {{ "[@metadata][target]" => "predictions" }}
      }}
      if {pred_required} {{
        mutate {{ add_tag => ["{CONTRACT_TAG}"] }}
      }}
    }}
  }}
}}

output {{
  if [@metadata][target] == "predictions" {{
{_es_output(env, a.predictions_index_prefix)}
  }} else {{
{_es_output(env, a.index_prefix)}
  }}
}}
"""


def _es_output(env: str, index_prefix: str) -> str:
    """An elasticsearch output to daily ``<index_prefix>-YYYY.MM.dd`` indices, credentials from ECK's env vars."""
    return f"""    elasticsearch {{
      hosts => ["${{{env}_HOSTS}}"]
      user => "${{{env}_USER}}"
      password => "${{{env}_PASSWORD}}"
      ssl_enabled => true
      ssl_certificate_authorities => "${{{env}_SSL_CERTIFICATE_AUTHORITY}}"
      index => "{index_prefix}-%{{+YYYY.MM.dd}}"
    }}"""


_REF = re.compile(r"((?:\[[^\[\]\s\"]+\])+)")
_QUOTED_DOTTED = re.compile(r'"([a-z@_]+(?:\.[a-z_]+)+)"\s*=>')


def referenced_fields(config: str) -> set[str]:
    """The event fields a pipeline config references, as ECS dotted names.

    Counts ``[a][b]`` references and quoted dotted keys on the left of ``=>`` (rename sources);
    skips ``[@metadata]`` and comments.
    """
    fields: set[str] = set()
    for line in config.splitlines():
        code = line.split("#", 1)[0]  # the generated config has no '#' inside strings
        for m in _REF.finditer(code):
            name = ".".join(re.findall(r"\[([^\]]+)\]", m.group(1)))
            if not name.startswith("@metadata"):
                fields.add(name)
        fields.update(_QUOTED_DOTTED.findall(code))
    return fields
