"""``ScaledObject``: a model Deployment scaled on its request load by KEDA, instead of on CPU by an HPA.

CPU is a weak signal for a model server: a batching server can be saturated at modest CPU, and an
I/O-bound one never reaches its target. KEDA reads the model's own Prometheus recording rules
(``infra.alerts.LOAD_*``, 1-minute windows) through a ``prometheus`` trigger and drives an HPA it owns
(``keda-hpa-<name>``). A model has either the CPU HPA or this, never both: two autoscalers on one
Deployment overwrite each other's replica count (``ModelService`` creates one or the other, and the
policy pack's ``one-autoscaler`` rule refuses a render with both).

Metrics and what the threshold means (KEDA's ``metricType``):

* ``rps``: inference requests/s summed over the stable pods; ``AverageValue``, so the threshold is
  per replica (replicas = ceil(total / threshold));
* ``inflight``: requests being answered at once, summed; ``AverageValue``, per replica;
* ``p99_ms``: p99 latency of the stable pods' inference requests in ms; ``Value``, so replicas grow
  in proportion to p99 / threshold.

Every query ends in ``or vector(0)``: a model that has not answered yet has no request series, and
KEDA would report an empty result as an error. When Prometheus itself cannot be queried
``failure_threshold`` times in a row, the ``fallback`` keeps the current replica count (never fewer
than min) rather than guess; KEDA allows a fallback only on ``AverageValue`` triggers, so a p99
trigger has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra.alerts import LOAD_INFLIGHT, LOAD_P99, LOAD_RPS
from services.serving import names
from services.serving.errors import UserError

API_VERSION = "keda.sh/v1alpha1"
KIND = "ScaledObject"
# metric -> (recording rule, how the series are combined, KEDA metricType)
METRICS: dict[str, tuple[str, str, str]] = {
    "rps": (LOAD_RPS, "sum", "AverageValue"),
    "inflight": (LOAD_INFLIGHT, "sum", "AverageValue"),
    "p99_ms": (LOAD_P99, "max", "Value"),
}


def _k(obj: Any) -> Any:
    """Plain camelCase dicts go to pulumi-kubernetes as they are (keeps mypy off its TypedDicts)."""
    return obj


@dataclass(frozen=True)
class LoadAutoscaling:
    """How a model scales on load; ``ModelServiceArgs.load_autoscaling`` (None there = the CPU HPA)."""

    metric: str  # required; rps | inflight | p99_ms (see the module docstring)
    target: float  # required; the threshold: per replica for rps and inflight, milliseconds for p99_ms
    server_address: pulumi.Input[str]  # required; in-cluster Prometheus URL, e.g. Monitoring.prometheus_service
    polling_interval_s: int = 15  # default 15 s; how often KEDA queries Prometheus (KEDA's own default is 30)
    failure_threshold: int = 3  # default 3; failed queries in a row before the fallback holds the replicas
    depends_on: tuple[pulumi.Resource, ...] = ()  # default none; in a stack: the KEDA release (its CRDs)

    def problems(self) -> list[str]:
        out = []
        if self.metric not in METRICS:
            out.append(f'load_autoscaling.metric "{self.metric}" is not one of {", ".join(METRICS)}')
        if not (math.isfinite(self.target) and self.target > 0):
            out.append(f"load_autoscaling.target {self.target:g} must be a number > 0")
        if self.polling_interval_s < 1:
            out.append(f"load_autoscaling.polling_interval_s {self.polling_interval_s} must be >= 1")
        if self.failure_threshold < 1:
            out.append(f"load_autoscaling.failure_threshold {self.failure_threshold} must be >= 1")
        if isinstance(self.server_address, str) and not self.server_address.startswith(("http://", "https://")):
            out.append(f'load_autoscaling.server_address "{self.server_address}" must be an http(s):// URL')
        return out


def query(metric: str, namespace: str, model: str, job: str) -> str:
    """The PromQL KEDA runs: one number for the stable pods (``job`` = their Service) of ``model``."""
    record, combine, _ = METRICS[metric]
    series = f'{record}{{namespace="{namespace}", model="{model}", job="{job}"}}'
    if metric == "p99_ms":
        # No request in the window makes histogram_quantile NaN; ">= 0" drops it so the result is 0.
        return f"(({combine}({series}) * 1000) >= 0) or vector(0)"
    return f"{combine}({series}) or vector(0)"


def threshold(target: float) -> str:
    """KEDA reads the threshold as a string (Go ParseFloat); no exponent, no trailing zeros."""
    text = f"{target:.6f}".rstrip("0").rstrip(".")
    return text if text != "0" else f"{target:g}"


@dataclass(frozen=True)
class ScaledObjectArgs:
    deployment: str  # required; the Deployment to scale (= its ScaledObject's name)
    namespace: str  # required; the Deployment's namespace
    model: str  # required; the ``model`` label the server exports
    job: str  # required; the Prometheus ``job`` of the pods to count = their Service's name
    min_replicas: int  # required; minReplicaCount (>= 1: a model is never scaled to zero)
    max_replicas: int  # required; maxReplicaCount
    load: LoadAutoscaling  # required; metric, target and Prometheus
    labels: dict[str, str] = field(default_factory=dict)  # default none; metadata labels

    def validate(self, name: str) -> None:
        problems = list(self.load.problems())
        for key in ("deployment", "namespace", "model", "job"):
            value = getattr(self, key)
            if not names.matches(names.DNS_LABEL, value):
                problems.append(f'{key} "{value}" is not a DNS-1123 label')
        if not 1 <= self.min_replicas <= self.max_replicas:
            got = f"min={self.min_replicas} max={self.max_replicas}"
            problems.append(f"replicas {got}: need 1 <= min <= max; raise max or lower min")
        if problems:
            raise UserError(f"ScaledObject {name}: " + "; ".join(problems))

    def spec(self) -> dict[str, Any]:
        load = self.load
        _, _, metric_type = METRICS[load.metric]
        trigger = {
            "type": "prometheus",
            "name": load.metric.replace("_", "-"),
            "metricType": metric_type,
            "metadata": {
                "serverAddress": load.server_address,
                "query": query(load.metric, self.namespace, self.model, self.job),
                "threshold": threshold(load.target),
            },
        }
        spec: dict[str, Any] = {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": self.deployment},
            "pollingInterval": load.polling_interval_s,
            "minReplicaCount": self.min_replicas,
            "maxReplicaCount": self.max_replicas,
            "triggers": [trigger],
        }
        if metric_type == "AverageValue":
            spec["fallback"] = {
                "failureThreshold": load.failure_threshold,
                "replicas": self.min_replicas,
                "behavior": "currentReplicasIfHigher",
            }
        return spec


class ScaledObject(pulumi.ComponentResource):
    """One KEDA ScaledObject (keda.sh/v1alpha1) for one Deployment."""

    scaled_object: k8s.apiextensions.CustomResource

    def __init__(self, name: str, args: ScaledObjectArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        args.validate(name)
        super().__init__("dlstack:autoscaling:ScaledObject", name, None, opts)
        self.args = args
        self.scaled_object = k8s.apiextensions.CustomResource(
            name,
            api_version=API_VERSION,
            kind=KIND,
            metadata=_k({"name": args.deployment, "namespace": args.namespace, "labels": dict(args.labels)}),
            spec=_k(args.spec()),
            # On the object itself: a component's depends_on does not hold back its children.
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(args.load.depends_on)),
        )
        self.register_outputs({"name": args.deployment})
