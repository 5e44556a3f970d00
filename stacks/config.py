"""The typed stack configuration: one pydantic schema for ``Pulumi.<stack>.yaml`` and ``pulumi.Config``.

The program parses the config exactly once, before any resource exists. The same parser reads
a stack file (offline render, promotion, capacity planning) and the Pulumi engine's config
(``pulumi up``), so both paths accept and reject the same things. Every error names the stack
file, the key path and the fix, e.g.::

    Pulumi.prod.yaml: dlstack:models[1].resources.cpu: "2 cores" is not a Kubernetes quantity (e.g. "2" or "500m")

Problems found while reading the YAML also name the line (``Pulumi.prod.yaml:12: dlstack:models[0]...``).
A stack file is untrusted input, read with bounds (``check_stack_text``): at most ``MAX_FILE_BYTES``,
UTF-8, one document, nesting at most ``MAX_DEPTH``, aliases expanding it to at most ``ALIAS_EXPANSION``
times its size, no duplicate keys, no tags beyond plain YAML, numbers of at most ``MAX_DIGITS`` digits
and finite. Every ``config:`` key is ``dlstack:<key>`` or belongs to one of ``PROVIDER_NAMESPACES``
(kubernetes:, pulumi:, random:, docker-build:); anything else is an error with a suggestion, because
a misspelt namespace used to be skipped silently. Names, references and digests use the full-string
grammar of ``services.serving.names``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from services.serving import names
from services.serving.artifact import Framework
from services.serving.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "dlstack"  # the Pulumi config namespace: keys are "dlstack:<field>"
# Keys that only ever hold secrets: set them with `pulumi config set --secret`, never in plain text.
# (Elasticsearch credentials are not config at all: ECK generates the elastic user's Secret.)
SECRET_KEYS = ("grafana_admin_password",)

# Pulumi's own namespaces and the providers this program uses (requirements.txt): their keys belong to
# them and pass through unchecked. Any other namespace is a typo or a setting nothing reads.
PROVIDER_NAMESPACES = ("kubernetes", "pulumi", "random", "docker-build")
# The top-level keys of a Pulumi stack file; anything else (e.g. "confg:") is a typo Pulumi ignores.
STACK_FILE_KEYS = ("config", "encryptionsalt", "secretsprovider", "encryptedkey", "environment")

# Hostile-input bounds. A stack file is a few kilobytes; these are far above any real one and far below
# what would exhaust memory or recursion.
MAX_FILE_BYTES = 1 << 20  # read at most this much: a stack file is not a data set
MAX_DEPTH = 32  # nested mappings/lists; the schema needs 6, and ruamel's composer recurses per level
MAX_STRING = 1024  # characters of one dlstack: string (a URL, a context name)
MAX_DIGITS = 18  # digits of a number; a bigger one is a typo and may not even fit an int64 in Kubernetes
# Aliases may expand the document to at most this multiple of the file's size (the "billion laughs"
# bomb expands a 1 KB file into gigabytes).
ALIAS_EXPANSION = 4

# All patterns below are used with fullmatch: "$" also matches before a trailing newline.
# The shared grammar of names, versions, aliases and digests (registry, config and infra agree on it).
_DNS_LABEL = names.DNS_LABEL
_QUANTITY = re.compile(r"(?P<num>\d{1,15}(\.\d{1,9})?|\.\d{1,9})(?P<suffix>m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_SUFFIX = {
    "": 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}
# A stack pins a version or an alias: unlike names.MODEL_REF, a bare name is not a reference here.
_MODEL_REF = re.compile(
    rf"(?P<name>{names.DNS_LABEL.pattern})(?::(?P<version>{names.VERSION.pattern})|@(?P<alias>{names.ALIAS.pattern}))"
)
_DIGEST = names.DIGEST
_DURATION = re.compile(r"[1-9][0-9]{0,5}(h|d|w|y)")
_K8S_VERSION = re.compile(r"1\.[0-9]{2}")
_SEMVER = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
# Kubernetes qualified name (extended resources such as nvidia.com/gpu): DNS-subdomain prefix / name.
_QUALIFIED = re.compile(
    r"(?:[a-z0-9]([-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
# docker/distribution reference grammar (reference/regexp.go): a repository is [domain/]path, the path
# components lower-case. The domain is only recognised as such when it has a "." or ":" or is localhost.
_IMAGE_DOMAIN = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?"
)
_IMAGE_PATH = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*")
_IMAGE_NAME_MAX = 255  # distribution's limit on a whole repository name


class ConfigError(UserError):
    """The stack config is invalid; the message names the file, the key path and the fix."""


def _q(value: str, limit: int = 80) -> str:
    """``value`` double-quoted for a one-line message: control and line-break characters escaped, long text cut.

    A value is echoed in the error about it; raw, a "name\\n" would break the message over two lines
    and a 1 MB string would flood the terminal.
    """
    out = []
    for ch in value[:limit]:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(json.dumps(ch)[1:-1] if ord(ch) < 0x80 else f"\\u{ord(ch):04x}")
    more = f"... ({len(value)} characters)" if len(value) > limit else ""
    return '"' + "".join(out) + '"' + more


def _text(value: Any) -> str:
    """Any free-form string of the schema: printable, one line, bounded."""
    if not isinstance(value, str):
        return value  # type: ignore[no-any-return]  # pydantic's str check reports the wrong type
    if not value.isprintable():
        raise ValueError(f"{_q(value)} contains a control or line-break character; remove it")
    return value


# A free-form string (a kube context name): one printable line.
Text = Annotated[str, BeforeValidator(_text), Field(min_length=1, max_length=253)]
# Strict scalars: YAML's 2.0, true and "3" are not the integer 2, 1 and 3 (a float for a replica count
# is a mistake to report, not to round). Strict floats still take integers (p99_ms: 250).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


def parse_quantity(value: str) -> float:
    """A Kubernetes quantity as a number: cores for CPU ("500m" -> 0.5), bytes for memory ("1Gi" -> 2**30)."""
    m = _QUANTITY.fullmatch(str(value))
    if not m:
        raise ValueError(f'{_q(str(value))} is not a Kubernetes quantity (e.g. "2" or "500m")')
    return float(m["num"]) * _SUFFIX[m["suffix"] or ""]


def _quantity(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f'{_show(value)} is not a Kubernetes quantity (e.g. "2" or "500m")')
    text = str(value)
    if parse_quantity(text) <= 0:
        raise ValueError(f"{_q(text)} must be greater than zero")
    return text


def _memory(value: Any) -> str:
    text = _quantity(value)
    if text.endswith("m"):  # "512m" is 0.512 bytes, a classic typo for "512Mi"
        raise ValueError(f'{_q(text)} means millibytes; write memory as e.g. "512Mi" or "2Gi"')
    return text


Quantity = Annotated[str, BeforeValidator(_quantity)]
Memory = Annotated[str, BeforeValidator(_memory)]


def _duration(value: Any) -> str:
    text = str(value)
    if not _DURATION.fullmatch(text):
        raise ValueError(f'{_q(text)} is not a retention duration (e.g. "15d", "12h", "2w")')
    return text


Duration = Annotated[str, BeforeValidator(_duration)]


def _dns_label(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if not names.matches(_DNS_LABEL, text):
        raise ValueError(
            f'{_q(text)} is not a DNS-1123 label (lower-case letters, digits and "-", at most 63 characters, '
            "starting and ending with a letter or digit)"
        )
    return text


DnsLabel = Annotated[str, BeforeValidator(_dns_label)]


def _model_ref(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if not names.matches(_MODEL_REF, text):
        raise ValueError(
            f'{_q(text)} is not a model reference (write "name:version" or "name@alias", e.g. "mnist-mlp:1")'
        )
    return text


ModelRef = Annotated[str, BeforeValidator(_model_ref)]


def _model_registry(value: Any) -> str:
    from services.registry.location import check_location

    if not isinstance(value, str):
        raise ValueError(f"{_show(value)} is not a registry location (write a directory or s3://BUCKET/PREFIX)")
    # The location parser strips whitespace (so "s3://b\\n" would pass) and echoes the value raw.
    if not value.isprintable() or value != value.strip():
        raise ValueError(f"{_q(value)} has a control character or surrounding whitespace; remove it")
    return check_location(value)


# Where the stack's models are registered: the grammar of services.registry.location.
ModelRegistry = Annotated[str, BeforeValidator(_model_registry)]


def ref_name(ref: str) -> str:
    """The model name of a reference ("mnist-mlp:1" -> "mnist-mlp")."""
    m = _MODEL_REF.fullmatch(ref)
    if not m:
        raise UserError(f'{_q(ref)} is not a model reference (write "name:version" or "name@alias")')
    return m["name"]


def image_repository_problem(value: str) -> str | None:
    """Why ``value`` is not an image repository prefix (``host[:port]/path``), or None if it is one.

    The docker/distribution grammar, so a bad value fails here and not at push time; the model's name
    is appended as the last path component, and a tag or digest is added per model, never here.
    """
    example = 'write host[:port]/path, e.g. "ghcr.io/acme/dlstack"'
    if not value.isprintable() or any(c.isspace() for c in value):
        return f"it contains whitespace or a control character; {example}"
    if "://" in value:
        return f'drop the scheme "{value.split("://", 1)[0]}://"; {example}'
    if "@" in value:
        return "it has a digest; the digest is pinned per model (image.digest), not on the repository"
    if value.endswith("/"):
        return "remove the trailing /"
    parts = value.split("/")
    if "" in parts:
        return f'it has an empty path component ("//" or a leading /); {example}'
    if len(value) + 1 + 63 > _IMAGE_NAME_MAX:  # "/<model name>" is appended
        return f"it is {len(value)} characters; with a model name appended it must stay within {_IMAGE_NAME_MAX}"
    first = parts[0]
    path = parts
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        path = parts[1:]
        if not _IMAGE_DOMAIN.fullmatch(first):
            return f'"{first}" is not a registry host[:port]; {example}'
        port = first.rsplit(":", 1)[1] if ":" in first and not first.endswith("]") else None
        if port is not None and not 0 < int(port) <= 65535:
            return f"port {port} is out of range (1-65535)"
    for part in path:
        if ":" in part:
            return "it has a tag; tags are set per model (the content hash), not on the repository"
        if part != part.lower():
            return f'the repository path must be lower-case ("{part}")'
        if not _IMAGE_PATH.fullmatch(part):
            return (
                f'"{part}" is not a repository path component (lower-case letters and digits, '
                'separated by ".", "_", "__" or "-")'
            )
    return None


class _Strict(BaseModel):
    # allow_inf_nan: NaN and inf are never a latency, a ratio or a size (and compare false with every bound).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class KubernetesConfig(_Strict):
    context: Text  # required; kube context that pulumi-kubernetes targets
    version: str = "1.31"  # default 1.31; server minor version the manifests are validated against

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> str:
        text = v if isinstance(v, str) else str(v)
        if not _K8S_VERSION.fullmatch(text):
            raise ValueError(f'{_q(text)} is not a Kubernetes minor version (write it quoted, e.g. "1.31")')
        return text


class ImagesConfig(_Strict):
    registry: str = Field(min_length=1)  # required; where model images are pushed, e.g. localhost:5001/dlstack
    push: Bool = True  # default true; false builds into the local image store only

    @field_validator("registry")
    @classmethod
    def _registry(cls, v: str) -> str:
        why = image_repository_problem(v)
        if why:
            raise ValueError(f"{_q(v)} is not an image repository: {why}")
        return v


class IngressConfig(_Strict):
    domain: str = Field(min_length=1)  # required; models at <domain>/models/<name>/, UIs at kibana.<domain> etc.
    class_name: str = "nginx"  # default nginx; IngressClass of the ingress-nginx chart
    tls: Bool = False  # default false; true adds TLS (secret "<host>-tls", e.g. from cert-manager) to every Ingress
    replicas: Int = Field(default=1, ge=1, le=100)  # default 1; ingress-nginx controller replicas

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        # 253 minus the longest UI prefix ("alertmanager.") keeps every derived host a valid DNS name.
        if len(v) > 240 or not all(names.matches(_DNS_LABEL, part) for part in v.split(".")):
            raise ValueError(f'{_q(v)} is not a DNS domain (e.g. "dlstack.localtest.me")')
        return v

    @field_validator("class_name")
    @classmethod
    def _class_name(cls, v: str) -> str:
        if len(v) > 253 or not all(names.matches(_DNS_LABEL, part) for part in v.split(".")):
            raise ValueError(f'{_q(v)} is not an IngressClass name (a DNS subdomain, e.g. "nginx")')
        return v

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def tls_secret(self) -> str | None:
        return f"{self.domain}-tls" if self.tls else None

    def host(self, app: str) -> str:
        """The host of a platform UI, e.g. ``kibana.<domain>``."""
        return f"{app}.{self.domain}"

    def url(self, app: str) -> str:
        return f"{self.scheme}://{self.host(app)}/"

    def model_url(self, name: str) -> str:
        """Where a model is served (ModelService routes /models/<name>/ on the domain's host)."""
        return f"{self.scheme}://{self.domain}/models/{name}/"


class NamespacesConfig(_Strict):
    models: DnsLabel = "models"  # default models; model servers (Pod Security "restricted")
    logging: DnsLabel = "logging"  # default logging; ECK, Elasticsearch, Kibana, Logstash, Filebeat
    monitoring: DnsLabel = "monitoring"  # default monitoring; Prometheus, Alertmanager, Grafana
    ingress: DnsLabel = "ingress"  # default ingress; ingress-nginx controller

    @model_validator(mode="after")
    def _distinct(self) -> NamespacesConfig:
        names = [self.models, self.logging, self.monitoring, self.ingress]
        if len(set(names)) != len(names):
            raise ValueError(f"namespace names must be distinct, got {names}")
        return self


class ElasticsearchConfig(_Strict):
    nodes: Int = Field(default=1, ge=1, le=50)  # default 1; 3 for a highly available cluster
    cpu: Quantity = "1"  # default 1 core per node (request)
    memory: Memory = "2Gi"  # default 2Gi per node (request = limit; JVM heap is half)
    storage: Memory = "10Gi"  # default 10Gi PVC per node


class LoggingConfig(_Strict):
    version: str = "8.17.4"  # default 8.17.4; Elastic stack version run by ECK
    retention_days: Int = Field(default=7, ge=1, le=3650)  # default 7 days; ILM deletes older indices
    # default 3 days; ILM deletes older prediction-log indices (sampled inputs may be personal data)
    predictions_retention_days: Int = Field(default=3, ge=1, le=3650)
    elasticsearch: ElasticsearchConfig = ElasticsearchConfig()
    kibana_replicas: Int = Field(default=1, ge=1, le=100)  # default 1
    logstash_replicas: Int = Field(default=1, ge=1, le=100)  # default 1

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _SEMVER.fullmatch(v):
            raise ValueError(f'{_q(v)} is not an Elastic stack version (e.g. "8.17.4")')
        return v


class MonitoringConfig(_Strict):
    retention: Duration = "7d"  # default 7d; Prometheus TSDB retention
    storage: Memory = "10Gi"  # default 10Gi; Prometheus PVC
    prometheus_replicas: Int = Field(default=1, ge=1, le=100)  # default 1
    prometheus_cpu: Quantity = "500m"  # default 500m (request)
    prometheus_memory: Memory = "2Gi"  # default 2Gi (request)
    alertmanager_replicas: Int = Field(default=1, ge=1, le=100)  # default 1
    grafana_replicas: Int = Field(default=1, ge=1, le=100)  # default 1


class ReplicasConfig(_Strict):
    # At most 1000: HPA takes an int32, and a bigger number is a typo, not a plan.
    min: Int = Field(default=1, ge=1, le=1000)  # default 1; HPA minReplicas (and the Deployment's initial size)
    max: Int = Field(default=1, ge=1, le=1000)  # default 1; HPA maxReplicas
    target_cpu_percent: Int = Field(default=70, ge=1, le=100)  # default 70 %; HPA CPU utilization target

    @model_validator(mode="after")
    def _order(self) -> ReplicasConfig:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max}); raise max or lower min")
        return self


class LimitsConfig(_Strict):
    cpu: Quantity | None = None  # default 2 x the CPU request
    memory: Memory | None = None  # default = the memory request (no overcommit, OOM is predictable)


class ResourcesConfig(_Strict):
    cpu: Quantity = "1"  # default 1 core (request)
    memory: Memory = "1Gi"  # default 1Gi (request)
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _limits(self) -> ResourcesConfig:
        for key in ("cpu", "memory"):
            limit = getattr(self.limits, key)
            if limit is not None and parse_quantity(limit) < parse_quantity(getattr(self, key)):
                raise ValueError(f'limits.{key} "{limit}" is below the request "{getattr(self, key)}"; raise it')
        return self

    @property
    def cpu_limit(self) -> str:
        if self.limits.cpu is not None:
            return self.limits.cpu
        return f"{round(parse_quantity(self.cpu) * 2000)}m"

    @property
    def memory_limit(self) -> str:
        return self.limits.memory or self.memory


class BatchingConfig(_Strict):
    """Overrides of the model's model.yaml ``serving``; unset fields are not written to the pod at all."""

    # default None = model.yaml (unset there: 8 for a variable batch dim, else 1); rows per forward pass
    max_batch_size: Int | None = Field(default=None, ge=1, le=4096)
    max_batch_time_ms: Float | None = Field(default=None, ge=0, le=1000)  # default None = model.yaml (2 ms)


def _sample(v: float, block: str) -> float:
    if not 0 < v <= 1:
        raise ValueError(f"must be > 0 and at most 1 (got {v:g}): a fraction of requests; remove {block} for off")
    return v


class PredictionLogConfig(_Strict):
    """Sampled prediction log (inputs/outputs as ECS lines) for this model; absent = off."""

    sample: Float  # required; fraction of requests logged, in (0, 1], e.g. 0.01
    max_bytes: Int | None = Field(default=None, ge=256)  # default None = the server's (4096); bytes per event

    @field_validator("sample")
    @classmethod
    def _sample(cls, v: float) -> float:
        return _sample(v, "prediction_log")


class DriftConfig(_Strict):
    """Input/output drift binning for this model; absent = off."""

    sample: Float  # required; fraction of requests binned, in (0, 1], e.g. 0.1
    # default None = the server's (20); rows binned per second per replica, at most; 0 = no cap
    max_rows_per_s: Float | None = Field(default=None, ge=0)

    @field_validator("sample")
    @classmethod
    def _sample(cls, v: float) -> float:
        return _sample(v, "drift")


class SloConfig(_Strict):
    error_ratio: Float = Field(gt=0, lt=1)  # required; allowed 5xx ratio, e.g. 0.01 = 1 %
    p99_ms: Float = Field(gt=0, le=3_600_000)  # required; p99 request latency objective in ms (at most an hour)


class GpuConfig(_Strict):
    count: Int = 1  # default 1; GPUs per replica (1-16)
    resource: str = "nvidia.com/gpu"  # default nvidia.com/gpu; extended resource name

    @field_validator("count")
    @classmethod
    def _count(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"count must be >= 1 (got {v}); remove the gpu block to run on CPU")
        if v > 16:  # no node has more; a bigger count leaves the pod Pending forever
            raise ValueError(f"count must be <= 16 (got {_show(v)}); GPUs are per replica, add replicas instead")
        return v

    @field_validator("resource")
    @classmethod
    def _resource(cls, v: str) -> str:
        if len(v) > 253 or not _QUALIFIED.fullmatch(v):
            raise ValueError(f'{_q(v)} is not an extended resource name (e.g. "nvidia.com/gpu")')
        return v


class CanaryConfig(_Strict):
    model: ModelRef  # required; the candidate version, e.g. mnist-mlp:2
    weight: Int  # required; percent of traffic routed to the canary, 0-100

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: int) -> int:
        if not 0 <= v <= 100:
            raise ValueError(f"weight must be between 0 and 100 (a percentage), got {_show(v)}")
        return v


class ImagePinConfig(_Strict):
    digest: str  # required; sha256:<64 hex>, written by promotion; the image is used as is, not rebuilt
    canary_digest: str | None = None  # default none; the canary's pinned digest

    @field_validator("digest", "canary_digest")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        if v is not None and not names.matches(_DIGEST, v):
            raise ValueError(f'{_q(v)} is not an image digest (write "sha256:" and 64 lower-case hex digits)')
        return v


# Autoscaling on load (KEDA): what each metric's target means, per replica for the summed ones.
LOAD_METRICS = {
    "rps": "inference requests/s per replica",
    "inflight": "requests being answered at once, per replica",
    "p99_ms": "p99 latency of the model's inference requests, milliseconds",
}
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class AutoscalingConfig(_Strict):
    """Scale on request load through a KEDA ScaledObject instead of the CPU HPA (never both)."""

    metric: Literal["rps", "inflight", "p99_ms"]  # required; see LOAD_METRICS
    # default none: for rps, capacity.per_replica_rps / (1 + capacity.headroom); required for the others
    target: Float | None = None

    @field_validator("target")
    @classmethod
    def _target(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1e6:
            raise ValueError(f"must be > 0 and at most 1000000 (got {v:g}); write the per-replica target")
        return v


class CapacityConfig(_Strict):
    """What `dlstack capacity --write-config` measured for the version this entry runs (written by the tool)."""

    per_replica_rps: Float = Field(gt=0, le=1e6)  # required; sustainable req/s of one replica under the p99 SLO
    headroom: Float = Field(ge=0, lt=1)  # required; spare share the sizing kept, e.g. 0.3
    measured: str  # required; the day of the measurement, YYYY-MM-DD

    @field_validator("measured", mode="before")
    @classmethod
    def _measured(cls, v: Any) -> str:
        import datetime

        text = v if isinstance(v, str) else str(v)  # YAML reads an unquoted 2026-11-28 as a date
        try:
            valid = bool(_DATE.fullmatch(text)) and bool(datetime.date.fromisoformat(text))
        except ValueError:  # 2026-13-40
            valid = False
        if not valid:
            raise ValueError(f'{_q(text)} is not a date; write it as "YYYY-MM-DD"')
        return text


class ModelConfig(_Strict):
    name: DnsLabel  # required; Deployment/Service/host name, e.g. mnist-mlp
    model: ModelRef  # required; registry reference name:version or name@alias
    framework: Framework  # required; must match the registered model
    replicas: ReplicasConfig = ReplicasConfig()
    resources: ResourcesConfig = ResourcesConfig()
    batching: BatchingConfig = BatchingConfig()
    slo: SloConfig  # required; alerting and the promotion gate use it
    gpu: GpuConfig | None = None  # default none = CPU only
    canary: CanaryConfig | None = None  # default none
    image: ImagePinConfig | None = None  # default none = build from the registry artifact
    workers: Int = Field(default=2, ge=1, le=64)  # default 2; gunicorn worker processes per replica
    autoscaling: AutoscalingConfig | None = None  # default none = the CPU HPA (replicas.target_cpu_percent)
    capacity: CapacityConfig | None = None  # default none; written by `dlstack capacity --write-config`
    prediction_log: PredictionLogConfig | None = None  # default none = off; {sample: 0.01, max_bytes: 4096}
    drift: DriftConfig | None = None  # default none = off; {sample: 0.1} (max_rows_per_s: the server's 20)

    @property
    def load_target(self) -> float | None:
        """The ScaledObject threshold: ``autoscaling.target``, else (rps) the measured capacity less its headroom.

        Dividing by 1 + headroom matches the replica count `dlstack capacity` recommends, so the load the
        sizing planned for is reached at the same replica count either way. None: no autoscaling, or no
        default (the stack check reports it).
        """
        a = self.autoscaling
        if a is None:
            return None
        if a.target is not None:
            return a.target
        if a.metric == "rps" and self.capacity is not None:
            return round(self.capacity.per_replica_rps / (1 + self.capacity.headroom), 3)
        return None

    @model_validator(mode="after")
    def _canary(self) -> ModelConfig:
        if self.canary is not None:
            if self.canary.model == self.model:
                raise ValueError(f'canary.model "{self.canary.model}" is the main model; point it at another version')
            if ref_name(self.canary.model) != ref_name(self.model):
                raise ValueError(
                    f'canary.model "{self.canary.model}" is not a version of "{ref_name(self.model)}"; '
                    f'write "{ref_name(self.model)}:<version>"'
                )
        return self


class StackConfig(_Strict):
    environment: Literal["dev", "prod"]  # required; prod enforces high availability
    kubernetes: KubernetesConfig
    images: ImagesConfig
    ingress: IngressConfig
    namespaces: NamespacesConfig = NamespacesConfig()
    logging: LoggingConfig = LoggingConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    models: tuple[ModelConfig, ...] = ()  # default none; the models this stack serves
    # default none = .registry at the repository root (one machine); for a team, the shared model
    # registry, e.g. s3://acme-models/dlstack (gs://, az:// too). A relative directory is taken from the
    # repository root. --registry and $DLSTACK_REGISTRY override it.
    registry: ModelRegistry | None = None

    @property
    def prod(self) -> bool:
        return self.environment == "prod"

    @property
    def gpu(self) -> bool:
        """Whether any model asks for GPUs (the NVIDIA device plugin is installed only then)."""
        return any(m.gpu is not None for m in self.models)

    @property
    def load_autoscaling(self) -> bool:
        """Whether any model scales on load (KEDA is installed only then)."""
        return any(m.autoscaling is not None for m in self.models)

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise UserError(f'no model "{name}" in the stack config; known: {[m.name for m in self.models]}')


# -------------------------------------------------------------------------------------------------
# Cross-field checks that span several entries (per-entry checks live in the models above).


def _stack_checks(cfg: StackConfig, unmeasured_ok: bool = False) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, m in enumerate(cfg.models):
        if m.name in seen:
            msg = f'"{m.name}" is already used by models[{seen[m.name]}]; names must be unique'
            problems.append((f"models[{i}].name", msg))
        seen.setdefault(m.name, i)
        if cfg.prod and m.replicas.min < 2:
            msg = f"prod needs at least 2 replicas for high availability (got {m.replicas.min})"
            problems.append((f"models[{i}].replicas.min", msg))
        if m.image is not None and m.image.canary_digest is not None and m.canary is None:
            problems.append((f"models[{i}].image.canary_digest", "is set but the model has no canary; remove it"))
        if m.autoscaling is not None and m.load_target is None and not unmeasured_ok:
            how = "`dlstack capacity ARTIFACT --target-rps N --p99-ms MS --write-config ENV`"
            why = (
                f"is required: no measured capacity for this model; measure one replica with {how}, or set it"
                if m.autoscaling.metric == "rps"
                else f"is required for metric {m.autoscaling.metric} ({LOAD_METRICS[m.autoscaling.metric]}); set it"
            )
            problems.append((f"models[{i}].autoscaling.target", why))
        elif m.autoscaling is not None and m.autoscaling.metric == "p99_ms" and (m.load_target or 0) > m.slo.p99_ms:
            msg = (
                f"{m.load_target:g} ms is above slo.p99_ms ({m.slo.p99_ms:g} ms): replicas would be added only "
                "after the SLO is broken; set it below the SLO"
            )
            problems.append((f"models[{i}].autoscaling.target", msg))
    if cfg.prod:
        if cfg.logging.elasticsearch.nodes < 3:
            problems.append(
                (
                    "logging.elasticsearch.nodes",
                    f"prod needs at least 3 Elasticsearch nodes for a quorum (got {cfg.logging.elasticsearch.nodes})",
                )
            )
        if cfg.ingress.replicas < 2:
            msg = f"prod needs at least 2 ingress controller replicas (got {cfg.ingress.replicas})"
            problems.append(("ingress.replicas", msg))
    return problems


# -------------------------------------------------------------------------------------------------
# Error formatting: pydantic errors -> "file: dlstack:key.path[i]: message".


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_:-]{1,64}")  # ":" for namespaced keys; "." would read as a path


def _key(part: str) -> str:
    """A key as written in a message: quoted when it holds anything but letters, digits, "_" and "-"."""
    return part if _PLAIN_KEY.fullmatch(part) and not part.endswith(":") else _q(part, 40)


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += (f"{NAMESPACE}:" if i == 0 else ".") + _key(str(part))
    return out


def _unwrap(tp: Any) -> Any:
    """The model class inside Optional[...] / tuple[..., ...] / Annotated[...] annotations."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType, tuple, list):
            inner = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
            if not inner:
                return None
            tp = inner[0]
        else:
            return tp


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """The valid keys of the mapping at ``loc`` (for "did you mean")."""
    cls: Any = StackConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return []
        cls = _unwrap(cls.model_fields[part].annotation)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def _show(value: Any) -> str:
    """A value for a one-line message: strings quoted and escaped, anything long cut short."""
    if isinstance(value, str):
        return _q(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**MAX_DIGITS:
        return f"a {len(str(abs(value)))}-digit number"
    text = repr(value)
    if len(text) > 80 or not text.isprintable():
        if isinstance(value, dict | list | tuple):
            return f"{'a mapping' if isinstance(value, dict) else 'a list'} ({len(value)} entries)"
        return f"a {type(value).__name__}"
    return text


def _message(err: Any) -> tuple[tuple[int | str, ...], str]:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        valid = _fields_at(loc[:-1])
        prefix = f"{NAMESPACE}:" if len(loc) == 1 else ""  # top-level keys are written "dlstack:<key>"
        close = _close(key, valid)
        hint = f'did you mean "{prefix}{close}"?' if close else f"valid keys: {', '.join(valid)}"
        return loc, f"unknown key; {hint}"
    if kind == "missing":
        return loc, "is required; add it"
    if kind in ("int_type", "float_type", "bool_type") and isinstance(err["input"], float | int | bool):
        scalar = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false"}[kind]
        return loc, f"{_show(err['input'])} is invalid: write {scalar}"
    # Wrong shapes: say what to write, not pydantic's class names ("instance of ReplicasConfig", "tuple").
    shape = {
        "tuple_type": "a list (one '- item' per line)",
        "list_type": "a list (one '- item' per line)",
        "model_type": "a mapping (key: value)",
        "dict_type": "a mapping (key: value)",
        "string_type": "a string (quote it)",
    }.get(kind)
    if shape is not None:
        return loc, f"{_show(err['input'])} is invalid: write {shape}"
    if kind == "finite_number":
        return loc, f"{_show(err['input'])} is not a finite number; write a number"
    msg = str(err["msg"])
    if kind == "value_error":
        return loc, msg.removeprefix("Value error, ")
    if kind == "literal_error":
        return loc, f"{_show(err['input'])} is not allowed: {msg[0].lower()}{msg[1:]}"
    return loc, f"{_show(err['input'])} is invalid: {msg[0].lower()}{msg[1:]}"


def _close(word: str, choices: typing.Iterable[str]) -> str | None:
    """The choice ``word`` most likely misspells: a case-insensitive match first, then difflib."""
    choices = list(choices)
    for c in choices:
        if c.lower() == word.lower():
            return c
    close = difflib.get_close_matches(word.lower(), choices, n=1, cutoff=0.6)
    return close[0] if close else None


# "dlstack.models", "dlstack/models", "dlstack_models": the namespace written with the wrong separator.
_SEPARATOR_TYPO = re.compile(r"(?P<ns>[A-Za-z][A-Za-z0-9_-]*?)[./_ ](?P<name>[A-Za-z].*)")


def _namespace_problem(key: str) -> str | None:
    """Why the ``config:`` key ``key`` is not one this program or a known provider reads, or None.

    A typo in "dlstack:" used to be skipped as some other provider's setting, rendering a stack with
    no models and exit code 0; every key must now belong to dlstack or a listed provider.
    """
    fields = list(StackConfig.model_fields) + list(SECRET_KEYS)
    ns, sep, name = key.partition(":")
    if not sep:
        m = _SEPARATOR_TYPO.fullmatch(key)
        if m and _close(m["ns"], [NAMESPACE]) is not None:
            fix = _close(m["name"], fields) or m["name"]
            return f'the namespace needs a ":"; did you mean {_q(NAMESPACE + ":" + fix)}?'
        fix = _close(key, fields)
        if fix is not None:
            return f"has no namespace; did you mean {_q(NAMESPACE + ':' + fix)}?"
        return f'has no namespace; write "{NAMESPACE}:<key>" (keys: {", ".join(fields)})'
    if ns == NAMESPACE:
        if not name:
            return f'has no key after "{NAMESPACE}:"; write "{NAMESPACE}:<key>" (keys: {", ".join(fields)})'
        return None  # the schema checks the key itself, with its own suggestion
    if ns in PROVIDER_NAMESPACES:
        return None  # provider settings (e.g. "kubernetes:context") belong to their providers
    if _close(ns, [NAMESPACE]) is not None:
        fix = _close(name, fields) or name
        return f"unknown namespace {_q(ns)}; did you mean {_q(NAMESPACE + ':' + fix)}?"
    provider = _close(ns, PROVIDER_NAMESPACES)
    if provider is not None:
        return f"unknown namespace {_q(ns)}; did you mean {_q(provider + ':' + name)}?"
    return (
        f'unknown namespace {_q(ns)}; this program reads "{NAMESPACE}:" keys, and only the providers\' '
        f"namespaces ({', '.join(p + ':' for p in PROVIDER_NAMESPACES)}) may appear besides"
    )


def _strip_ns(raw: dict[Any, Any], source: str) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f'{source}: config key {_show(key)} is not a string; write "{NAMESPACE}:<key>"')
        problem = _namespace_problem(key)
        if problem:
            raise ConfigError(f"{source}: {_key(key)}: {problem}")
        ns, _, name = key.partition(":")
        if ns != NAMESPACE:
            continue
        if name in SECRET_KEYS:
            if not (isinstance(value, dict) and set(value) == {"secure"} and isinstance(value["secure"], str)):
                raise ConfigError(
                    f"{source}: {key}: is a secret and must not be stored in plain text; "
                    f"run `pulumi config set --secret {key} <value>` (or remove it to generate one)"
                )
            continue
        _check_tree(value, (name,), source)
        data[name] = value
    return data


def _check_tree(value: Any, loc: tuple[int | str, ...], source: str) -> None:
    """Bounds the schema cannot express: nesting, key types, string length, number size and finiteness.

    Runs on the engine's values as on a file's (a file was also checked while parsing, with lines).
    Iterative, so a hostile depth cannot exhaust the recursion limit here either.
    """
    todo: list[tuple[Any, tuple[int | str, ...]]] = [(value, loc)]
    while todo:
        node, where = todo.pop()
        if len(where) > MAX_DEPTH:
            raise ConfigError(f"{source}: {_key_path(where[:3])}: nests deeper than {MAX_DEPTH} levels; flatten it")
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ConfigError(f"{source}: {_key_path(where)}: key {_show(k)} is not a string; quote it")
                todo.append((v, (*where, k)))
        elif isinstance(node, list | tuple):
            todo.extend((v, (*where, i)) for i, v in enumerate(node))
        elif isinstance(node, str) and len(node) > MAX_STRING:
            msg = f"is {len(node)} characters long; at most {MAX_STRING} are allowed, shorten it"
            raise ConfigError(f"{source}: {_key_path(where)}: {msg}")
        elif isinstance(node, bool):
            continue
        elif isinstance(node, int) and abs(node) >= 10**MAX_DIGITS:
            msg = f"{_show(node)} is out of range; write a number of at most {MAX_DIGITS} digits"
            raise ConfigError(f"{source}: {_key_path(where)}: {msg}")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{source}: {_key_path(where)}: {node!r} is not a finite number; write a number")


def parse_config(data: dict[str, Any], source: str, *, unmeasured_ok: bool = False) -> StackConfig:
    """Validate config values keyed by their short names ("models", not "dlstack:models").

    ``unmeasured_ok``: `dlstack capacity` reads a stack whose ``autoscaling: {metric: rps}`` still waits
    for the measurement that gives it its target; everything else is checked as always.
    """
    try:
        cfg = StackConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        errors = exc.errors()
        for err in errors[:_MAX_REPORTED]:
            loc, msg = _message(err)
            lines.append(f"{source}: {_key_path(loc)}: {msg}" if loc else f"{source}: {msg}")
        if len(errors) > _MAX_REPORTED:
            lines.append(f"{source}: ... and {len(errors) - _MAX_REPORTED} more problems")
        raise ConfigError("\n".join(lines)) from None
    problems = _stack_checks(cfg, unmeasured_ok)
    if problems:
        raise ConfigError("\n".join(f"{source}: {NAMESPACE}:{path}: {msg}" for path, msg in problems))
    return cfg


_MAX_REPORTED = 20  # a file with 10,000 bad entries gets the first 20 lines and a count, not a flood


def stack_file(stack: str) -> Path:
    return ROOT / f"Pulumi.{stack}.yaml"


# -------------------------------------------------------------------------------------------------
# Reading a stack file safely: bounded bytes, strict UTF-8, then a pass over the YAML event stream
# (the parser is iterative: nothing is built yet) that bounds depth, alias expansion, numbers and
# strings and finds duplicate keys, all with line numbers, before ruamel composes and constructs.

_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}
_INT = re.compile(r"[-+]?(?:0o[0-7_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*)")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?")
_NOT_FINITE = re.compile(r"[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")


@dataclass
class _Frame:
    """An open mapping or list while walking the events."""

    mapping: bool
    anchor: str | None
    line: int
    weight: int = 1  # size once aliases are expanded: 1 per node plus the characters of scalars
    index: int = 0  # list: the next item's index
    key: str | None = None  # mapping: the key whose value comes next (None: a key comes next)
    keys: dict[str, int] = field(default_factory=dict)  # mapping: key -> line, for duplicates


def _where(stack: list[_Frame]) -> str:
    """The key path of the node being read, as messages write it: "dlstack:models[0].replicas"."""
    parts: list[int | str] = []
    for f in stack:
        if f.mapping and f.key is not None:
            parts.append(f.key)
        elif not f.mapping:
            parts.append(f.index)
    if parts[:1] == ["config"] and len(parts) > 1:
        parts = parts[1:]
    out = ""
    for i, part in enumerate(parts):
        out += f"[{part}]" if isinstance(part, int) else ("." if i else "") + _key(part)
    return out


def _check_events(text: str, name: str) -> None:
    from ruamel.yaml import YAML
    from ruamel.yaml.events import (
        AliasEvent,
        CollectionEndEvent,
        CollectionStartEvent,
        DocumentStartEvent,
        MappingStartEvent,
        ScalarEvent,
    )

    limit = ALIAS_EXPANSION * max(len(text), 1)
    stack: list[_Frame] = []
    anchors: dict[str, int] = {}  # anchor -> expanded weight of its node
    total = 0
    documents = 0

    def fail(line: int, msg: str) -> typing.NoReturn:
        where = _where(stack)
        raise ConfigError(f"{name}:{line + 1}: {where}: {msg}" if where else f"{name}:{line + 1}: {msg}")

    def finish(weight: int, anchor: str | None) -> None:
        if anchor is not None:
            anchors[anchor] = weight
        if stack:
            parent = stack[-1]
            parent.weight += weight
            if parent.mapping:
                parent.key = None
            else:
                parent.index += 1

    for ev in YAML(typ="safe", pure=True).parse(text):
        line = ev.start_mark.line if ev.start_mark is not None else 0
        if isinstance(ev, DocumentStartEvent):
            documents += 1
            if documents > 1:
                fail(line, 'holds more than one YAML document ("---"); a stack file is one mapping')
            continue
        parent = stack[-1] if stack else None
        awaiting_key = parent is not None and parent.mapping and parent.key is None
        if isinstance(ev, CollectionEndEvent):
            done = stack.pop()
            finish(done.weight, done.anchor)
            continue
        if awaiting_key and not isinstance(ev, ScalarEvent):
            fail(line, "a key must be a plain string, not a mapping, list or alias; write it as text")
        tag = getattr(ev, "tag", None)
        if tag is not None and tag not in _TAGS:
            fail(line, f"the tag {_q(str(tag))} is not allowed; remove it (stack files hold plain YAML)")
        if isinstance(ev, AliasEvent):
            anchor = str(ev.anchor)
            if any(f.anchor == anchor for f in stack):
                fail(line, f"the alias *{anchor} refers to a node that contains it; remove the recursion")
            if anchor not in anchors:
                fail(line, f"the alias *{anchor} has no anchor &{anchor} before it; define it first")
            total += anchors[anchor]
            if total > limit:
                fail(
                    line,
                    f"aliases expand the file beyond {ALIAS_EXPANSION}x its size (*{anchor} repeats "
                    f"{anchors[anchor]} units); write the values out or use fewer aliases",
                )
            finish(anchors[anchor], None)
        elif isinstance(ev, CollectionStartEvent):
            if len(stack) >= MAX_DEPTH:
                fail(line, f"nests deeper than {MAX_DEPTH} levels; flatten it")
            total += 1
            stack.append(_Frame(mapping=isinstance(ev, MappingStartEvent), anchor=ev.anchor, line=line))
        elif isinstance(ev, ScalarEvent):
            value = str(ev.value)
            total += len(value) + 1
            if awaiting_key:
                assert parent is not None
                if value in parent.keys:
                    fail(
                        line,
                        f"the key {_q(value)} appears twice (lines {parent.keys[value] + 1} and {line + 1}); keep one",
                    )
                parent.keys[value] = line
                parent.key = value
                parent.weight += len(value) + 1
                continue
            if ev.style is None and tag is None:  # a plain scalar: YAML reads numbers from it
                problem = _number_problem(value)
                if problem:
                    fail(line, problem)
            where = _where(stack)
            # Only dlstack's own values: a provider's (an inline kubeconfig) may be long.
            if where.startswith(f"{NAMESPACE}:") and len(value) > MAX_STRING:
                fail(line, f"is {len(value)} characters long; at most {MAX_STRING} are allowed, shorten it")
            finish(len(value) + 1, ev.anchor)


def _number_problem(value: str) -> str | None:
    """Why a plain scalar YAML reads as a number is out of range (int("9" * 5000) even raises), or None."""
    if _NOT_FINITE.fullmatch(value):
        return f"{value} is not a finite number; write a number"
    digits = sum(c.isdigit() for c in value.split("e")[0].split("E")[0])
    shown = value if len(value) <= 24 else f"{value[:24]}... ({len(value)} characters)"
    out_of_range = f"{shown} is out of range; write a number of at most {MAX_DIGITS} digits"
    if _INT.fullmatch(value) and digits > MAX_DIGITS:
        return out_of_range
    if _FLOAT.fullmatch(value):
        number = float(value.replace("_", ""))
        if not math.isfinite(number) or abs(number) >= 10.0**MAX_DIGITS or digits > MAX_DIGITS + 9:
            return out_of_range
    return None


def _yaml_error(exc: Exception, text: str, name: str) -> ConfigError:
    """One line for any ruamel error: file, line, the problem and the fix (ruamel's own text spans lines)."""
    from ruamel.yaml.error import MarkedYAMLError
    from ruamel.yaml.reader import ReaderError

    if isinstance(exc, ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        char = text[exc.position] if exc.position < len(text) else ""
        code = f"U+{ord(char):04X}" if char else "a character"
        return ConfigError(f"{name}:{line}: {code} is not allowed in YAML; remove it")
    if isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        hint = "; indent with spaces, not tabs" if "\\t" in problem or "\t" in problem else ""
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        return ConfigError(f"{where}: is not valid YAML: {problem}{hint}")
    return ConfigError(f"{name}: is not valid YAML: {' '.join(str(exc).split())[:200]}")


def _read_text(path: Path) -> str:
    """The file's text: bounded, UTF-8 (a BOM is fine), with the offending byte named otherwise."""
    if not path.exists():
        raise ConfigError(f"{path}: no such stack file; create it (see Pulumi.dev.yaml) or pass --config-file")
    if not path.is_file():  # a directory, a FIFO (would block), /dev/zero (never ends)
        raise ConfigError(f"{path}: is not a regular file; pass a Pulumi.<stack>.yaml file")
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path.name}: is larger than {MAX_FILE_BYTES} bytes; a stack file is a few kilobytes")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path.name}: is UTF-16; save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path.name}:{line}: byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8; "
            "save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def check_stack_text(path: Path) -> str:
    """A stack file's text, once it is known to be safe to load with ruamel (any loader, round-trip too).

    For every reader of stack files (promotion and capacity edit them round-trip): size, encoding,
    syntax, one document, nesting, alias expansion, numbers, duplicate keys; ConfigError otherwise.
    """
    from ruamel.yaml.error import YAMLError

    text = _read_text(path)
    try:
        _check_events(text, path.name)
    except (YAMLError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise _yaml_error(exc, text, path.name) from None
    return text


def read_stack_file(path: Path) -> dict[str, Any]:
    """The raw ``config:`` mapping of a stack file (namespaced keys), with a clear error when unreadable."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    text = check_stack_text(path)
    try:
        doc = YAML(typ="safe", pure=True).load(text)
    except (YAMLError, ValueError, TypeError) as exc:  # the checks above leave only odd constructor cases
        raise _yaml_error(exc, text, path.name) from None
    example = "a stack file looks like Pulumi.dev.yaml"
    if doc is None:
        raise ConfigError(f'{path.name}: is empty; {example} ("config:" and the dlstack: keys)')
    if not isinstance(doc, dict):
        raise ConfigError(
            f"{path.name}: is {_show(doc) if not isinstance(doc, list) else 'a list'}, not a mapping; {example}"
        )
    for key in doc:
        if key not in STACK_FILE_KEYS:
            close = _close(str(key), STACK_FILE_KEYS)
            hint = f'did you mean "{close}"?' if close else f"a stack file has only {', '.join(STACK_FILE_KEYS)}"
            raise ConfigError(f"{path.name}: {_key(str(key))}: unknown top-level key; {hint}")
    if not isinstance(doc.get("config"), dict):
        raise ConfigError(f'{path.name}: has no "config:" mapping; {example}')
    return dict(doc["config"])


def load_stack_config(stack: str, path: Path | None = None, *, unmeasured_ok: bool = False) -> StackConfig:
    """Parse ``Pulumi.<stack>.yaml`` (or ``path``, same format) into a validated ``StackConfig``."""
    path = path if path is not None else stack_file(stack)
    raw = read_stack_file(path)
    return parse_config(_strip_ns(raw, path.name), path.name, unmeasured_ok=unmeasured_ok)


def load_pulumi_config(stack: str) -> StackConfig:
    """The same schema, read from the running Pulumi engine (``pulumi up``/``preview``).

    The same namespace rules and bounds apply: the engine's values come from the same stack file (or
    from ``pulumi config set``/ESC, which this program has not seen).
    """
    import pulumi
    from pulumi.runtime import config as runtime_config

    source = f"Pulumi.{stack}.yaml"
    conf = pulumi.Config(NAMESPACE)
    # Unknown keys must fail here as they do offline, so look at every key the engine holds.
    keys = set(runtime_config.CONFIG.get()) | set(runtime_config.get_config_env())
    raw: dict[str, Any] = {}
    for key in sorted(keys):
        ns, _, name = key.partition(":")
        if ns == NAMESPACE and name in SECRET_KEYS:
            continue  # the engine hands secrets over decrypted; the file check saw them encrypted
        if ns != NAMESPACE:
            raw[key] = None  # a provider's setting: only its namespace is checked
            continue
        text = conf.get(name)
        try:  # objects and lists arrive JSON-encoded, scalars as plain strings (the same as get_object)
            raw[key] = json.loads(text) if text is not None else None
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            raw[key] = text
    return parse_config(_strip_ns(raw, source), source)
