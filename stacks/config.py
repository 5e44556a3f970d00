"""The typed stack configuration: one pydantic schema for ``Pulumi.<stack>.yaml`` and ``pulumi.Config``.

The program parses the config exactly once, before any resource exists. The same parser reads
a stack file (offline render, promotion, capacity planning) and the Pulumi engine's config
(``pulumi up``), so both paths accept and reject the same things. Every error names the stack
file, the key path and the fix, e.g.::

    Pulumi.prod.yaml: dlstack:models[1].resources.cpu: "2 cores" is not a Kubernetes quantity (e.g. "2" or "500m")
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.artifact import Framework
from services.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "dlstack"  # the Pulumi config namespace: keys are "dlstack:<field>"
# Keys that only ever hold secrets: set them with `pulumi config set --secret`, never in plain text.
# (Elasticsearch credentials are not config at all: ECK generates the elastic user's Secret.)
SECRET_KEYS = ("grafana_admin_password",)

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^(?P<num>\d+(\.\d+)?|\.\d+)(?P<suffix>m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
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
_MODEL_REF = re.compile(
    r"^(?P<name>[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(:(?P<version>[0-9]+)|@(?P<alias>[A-Za-z][A-Za-z0-9_.-]{0,62}))$"
)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_DURATION = re.compile(r"^[1-9][0-9]*(h|d|w|y)$")
_K8S_VERSION = re.compile(r"^1\.[0-9]{2}$")


class ConfigError(UserError):
    """The stack config is invalid; the message names the file, the key path and the fix."""


def parse_quantity(value: str) -> float:
    """A Kubernetes quantity as a number: cores for CPU ("500m" -> 0.5), bytes for memory ("1Gi" -> 2**30)."""
    m = _QUANTITY.match(str(value))
    if not m:
        raise ValueError(f'"{value}" is not a Kubernetes quantity (e.g. "2" or "500m")')
    return float(m["num"]) * _SUFFIX[m["suffix"] or ""]


def _quantity(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f'{value!r} is not a Kubernetes quantity (e.g. "2" or "500m")')
    text = str(value)
    parse_quantity(text)
    if parse_quantity(text) <= 0:
        raise ValueError(f'"{text}" must be greater than zero')
    return text


def _memory(value: Any) -> str:
    text = _quantity(value)
    if text.endswith("m"):  # "512m" is 0.512 bytes, a classic typo for "512Mi"
        raise ValueError(f'"{text}" means millibytes; write memory as e.g. "512Mi" or "2Gi"')
    return text


Quantity = Annotated[str, BeforeValidator(_quantity)]
Memory = Annotated[str, BeforeValidator(_memory)]


def _duration(value: Any) -> str:
    text = str(value)
    if not _DURATION.match(text):
        raise ValueError(f'"{text}" is not a retention duration (e.g. "15d", "12h", "2w")')
    return text


Duration = Annotated[str, BeforeValidator(_duration)]


def _dns_label(value: Any) -> str:
    text = str(value)
    if not _DNS_LABEL.match(text):
        raise ValueError(
            f'"{text}" is not a DNS-1123 label (lower-case letters, digits and "-", at most 63 characters, '
            "starting and ending with a letter or digit)"
        )
    return text


DnsLabel = Annotated[str, BeforeValidator(_dns_label)]


def _model_ref(value: Any) -> str:
    text = str(value)
    if not _MODEL_REF.match(text):
        raise ValueError(
            f'"{text}" is not a model reference (write "name:version" or "name@alias", e.g. "mnist-mlp:1")'
        )
    return text


ModelRef = Annotated[str, BeforeValidator(_model_ref)]


def _model_registry(value: Any) -> str:
    from services.registry.location import check_location

    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a registry location (write a directory or s3://BUCKET/PREFIX)")
    return check_location(value)


# Where the stack's models are registered: the grammar of services.registry.location.
ModelRegistry = Annotated[str, BeforeValidator(_model_registry)]


def ref_name(ref: str) -> str:
    """The model name of a reference ("mnist-mlp:1" -> "mnist-mlp")."""
    m = _MODEL_REF.match(ref)
    if not m:
        raise UserError(f'"{ref}" is not a model reference (write "name:version" or "name@alias")')
    return m["name"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KubernetesConfig(_Strict):
    context: str = Field(min_length=1)  # required; kube context that pulumi-kubernetes targets
    version: str = "1.31"  # default 1.31; server minor version the manifests are validated against

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> str:
        text = str(v)
        if not _K8S_VERSION.match(text):
            raise ValueError(f'"{text}" is not a Kubernetes minor version (write it quoted, e.g. "1.31")')
        return text


class ImagesConfig(_Strict):
    registry: str = Field(min_length=1)  # required; where model images are pushed, e.g. localhost:5001/dlstack
    push: bool = True  # default true; false builds into the local image store only

    @field_validator("registry")
    @classmethod
    def _registry(cls, v: str) -> str:
        if "://" in v or v.endswith("/") or " " in v:
            raise ValueError(
                f'"{v}" is not an image registry path (write host[:port]/path, e.g. "ghcr.io/acme/dlstack")'
            )
        return v


class IngressConfig(_Strict):
    domain: str = Field(min_length=1)  # required; models at <domain>/models/<name>/, UIs at kibana.<domain> etc.
    class_name: str = "nginx"  # default nginx; IngressClass of the ingress-nginx chart
    tls: bool = False  # default false; true adds TLS (secret "<host>-tls", e.g. from cert-manager) to every Ingress
    replicas: int = Field(default=1, ge=1)  # default 1; ingress-nginx controller replicas

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        if not all(_DNS_LABEL.match(part) for part in v.split(".")):
            raise ValueError(f'"{v}" is not a DNS domain (e.g. "dlstack.localtest.me")')
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
    nodes: int = Field(default=1, ge=1, le=50)  # default 1; 3 for a highly available cluster
    cpu: Quantity = "1"  # default 1 core per node (request)
    memory: Memory = "2Gi"  # default 2Gi per node (request = limit; JVM heap is half)
    storage: Memory = "10Gi"  # default 10Gi PVC per node


class LoggingConfig(_Strict):
    version: str = "8.17.4"  # default 8.17.4; Elastic stack version run by ECK
    retention_days: int = Field(default=7, ge=1, le=3650)  # default 7 days; ILM deletes older indices
    elasticsearch: ElasticsearchConfig = ElasticsearchConfig()
    kibana_replicas: int = Field(default=1, ge=1)  # default 1
    logstash_replicas: int = Field(default=1, ge=1)  # default 1


class MonitoringConfig(_Strict):
    retention: Duration = "7d"  # default 7d; Prometheus TSDB retention
    storage: Memory = "10Gi"  # default 10Gi; Prometheus PVC
    prometheus_replicas: int = Field(default=1, ge=1)  # default 1
    prometheus_cpu: Quantity = "500m"  # default 500m (request)
    prometheus_memory: Memory = "2Gi"  # default 2Gi (request)
    alertmanager_replicas: int = Field(default=1, ge=1)  # default 1
    grafana_replicas: int = Field(default=1, ge=1)  # default 1


class ReplicasConfig(_Strict):
    min: int = Field(default=1, ge=1)  # default 1; HPA minReplicas (and the Deployment's initial size)
    max: int = Field(default=1, ge=1)  # default 1; HPA maxReplicas
    target_cpu_percent: int = Field(default=70, ge=1, le=100)  # default 70 %; HPA CPU utilization target

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
    max_batch_size: int = Field(default=1, ge=1, le=4096)  # default 1 = off; rows per forward pass
    max_batch_time_ms: float = Field(default=2.0, ge=0, le=1000)  # default 2 ms; wait for a batch to fill


class SloConfig(_Strict):
    error_ratio: float = Field(gt=0, lt=1)  # required; allowed 5xx ratio, e.g. 0.01 = 1 %
    p99_ms: float = Field(gt=0)  # required; p99 request latency objective in ms


class GpuConfig(_Strict):
    count: int = 1  # default 1; GPUs per replica (>= 1)
    resource: str = "nvidia.com/gpu"  # default nvidia.com/gpu; extended resource name

    @field_validator("count")
    @classmethod
    def _count(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"count must be >= 1 (got {v}); remove the gpu block to run on CPU")
        return v


class CanaryConfig(_Strict):
    model: ModelRef  # required; the candidate version, e.g. mnist-mlp:2
    weight: int  # required; percent of traffic routed to the canary, 0-100

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: int) -> int:
        if not 0 <= v <= 100:
            raise ValueError(f"weight must be between 0 and 100 (a percentage), got {v}")
        return v


class ImagePinConfig(_Strict):
    digest: str  # required; sha256:<64 hex>, written by promotion; the image is used as is, not rebuilt
    canary_digest: str | None = None  # default none; the canary's pinned digest

    @field_validator("digest", "canary_digest")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        if v is not None and not _DIGEST.match(v):
            raise ValueError(f'"{v}" is not an image digest (write "sha256:" and 64 lower-case hex digits)')
        return v


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
    workers: int = Field(default=2, ge=1, le=64)  # default 2; gunicorn worker processes per replica

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

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise UserError(f'no model "{name}" in the stack config; known: {[m.name for m in self.models]}')


# -------------------------------------------------------------------------------------------------
# Cross-field checks that span several entries (per-entry checks live in the models above).


def _stack_checks(cfg: StackConfig) -> list[tuple[str, str]]:
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


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += (f"{NAMESPACE}:" if i == 0 else ".") + part
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
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _message(err: Any) -> tuple[tuple[int | str, ...], str]:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        valid = _fields_at(loc[:-1])
        prefix = f"{NAMESPACE}:" if len(loc) == 1 else ""  # top-level keys are written "dlstack:<key>"
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f'did you mean "{prefix}{close[0]}"?' if close else f"valid keys: {', '.join(valid)}"
        return loc, f"unknown key; {hint}"
    if kind == "missing":
        return loc, "is required; add it"
    msg = str(err["msg"])
    if kind == "value_error":
        return loc, msg.removeprefix("Value error, ")
    if kind == "literal_error":
        return loc, f"{_show(err['input'])} is not allowed: {msg[0].lower()}{msg[1:]}"
    return loc, f"{_show(err['input'])} is invalid: {msg[0].lower()}{msg[1:]}"


def _strip_ns(raw: dict[str, Any], source: str) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in raw.items():
        ns, sep, name = str(key).partition(":")
        if not sep:
            raise ConfigError(f'{source}: config key "{key}" has no namespace; write "{NAMESPACE}:{key}"')
        if ns != NAMESPACE:
            continue  # provider settings (e.g. "kubernetes:...") belong to their providers
        if name in SECRET_KEYS:
            if not (isinstance(value, dict) and set(value) == {"secure"}):
                raise ConfigError(
                    f"{source}: {key}: is a secret and must not be stored in plain text; "
                    f"run `pulumi config set --secret {key} <value>` (or remove it to generate one)"
                )
            continue
        data[name] = value
    return data


def parse_config(data: dict[str, Any], source: str) -> StackConfig:
    """Validate config values keyed by their short names ("models", not "dlstack:models")."""
    try:
        cfg = StackConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc, msg = _message(err)
            lines.append(f"{source}: {_key_path(loc)}: {msg}" if loc else f"{source}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    problems = _stack_checks(cfg)
    if problems:
        raise ConfigError("\n".join(f"{source}: {NAMESPACE}:{path}: {msg}" for path, msg in problems))
    return cfg


def stack_file(stack: str) -> Path:
    return ROOT / f"Pulumi.{stack}.yaml"


def read_stack_file(path: Path) -> dict[str, Any]:
    """The raw ``config:`` mapping of a stack file (namespaced keys), with a clear error when unreadable."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    if not path.is_file():
        raise ConfigError(f"{path}: no such stack file; create it (see Pulumi.dev.yaml) or pass --config-file")
    try:
        doc = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except YAMLError as exc:
        raise ConfigError(f"{path.name}: is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise ConfigError(f'{path.name}: has no "config:" mapping; a stack file looks like Pulumi.dev.yaml')
    return dict(doc["config"])


def load_stack_config(stack: str, path: Path | None = None) -> StackConfig:
    """Parse ``Pulumi.<stack>.yaml`` (or ``path``, same format) into a validated ``StackConfig``."""
    path = path if path is not None else stack_file(stack)
    raw = read_stack_file(path)
    return parse_config(_strip_ns(raw, path.name), path.name)


def load_pulumi_config(stack: str) -> StackConfig:
    """The same schema, read from the running Pulumi engine (``pulumi up``/``preview``)."""
    import pulumi
    from pulumi.runtime import config as runtime_config

    source = f"Pulumi.{stack}.yaml"
    conf = pulumi.Config(NAMESPACE)
    # Unknown keys must fail here as they do offline, so look at every key the engine holds.
    keys = set(runtime_config.CONFIG.get()) | set(runtime_config.get_config_env())
    data: dict[str, Any] = {}
    for key in sorted(keys):
        ns, _, name = key.partition(":")
        if ns != NAMESPACE or name in SECRET_KEYS:
            continue
        text = conf.get(name)
        try:  # objects and lists arrive JSON-encoded, scalars as plain strings (the same as get_object)
            data[name] = json.loads(text) if text is not None else None
        except ValueError:
            data[name] = text
    return parse_config(data, source)
