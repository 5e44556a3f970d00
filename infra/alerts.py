"""Per-model SLO recording rules and alerts, in plain Prometheus rule-file format.

One group per model, generated from the model's SLO. The Monitoring component wraps the
groups in a PrometheusRule; ``dlstack render`` writes them as rule files for ``promtool``.

Label contract (what the ServiceMonitor and kube-state-metrics must produce):

* model-server series carry ``model`` and ``version`` (from the server) plus the target labels
  ``namespace``, ``pod`` and ``job``; ``job`` is the scraped Service's name (the
  ServiceMonitor default), which we assume is ``ModelSLO.job`` (default: the model name);
* kube-state-metrics series carry ``namespace`` and ``deployment`` (= ``ModelSLO.deployment``,
  default: the model name).

A canary runs as its own Deployment and Service named ``<name>-canary``, so the job and deployment
matchers also accept that suffix: a crashed canary pages like a crashed stable pod.

The SLO counts only inference routes (``infer``, ``v1_predict``): probes and scrapes would
dilute it. An error is a 5xx answer; 4xx are the caller's fault and do not burn the budget.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from services.serving import names
from services.serving.errors import UserError

INFER_ROUTES = "infer|v1_predict"
ERROR_CODES = "5.."
# Aggregation labels of every recording rule; dashboards and alerts rely on them.
RECORD_BY = "namespace, model, version"

REQUESTS_RATE = "model:dlstack_requests:rate5m"
ERRORS_RATE = "model:dlstack_request_errors:rate5m"
ERROR_RATIO = "model:dlstack_request_error_ratio:rate5m"
LATENCY_P50 = "model:dlstack_request_duration_seconds:p50_5m"
LATENCY_P99 = "model:dlstack_request_duration_seconds:p99_5m"

ALERT_ERROR_RATIO = "DlstackModelErrorRatioHigh"
ALERT_LATENCY = "DlstackModelLatencyP99High"
ALERT_TARGET_DOWN = "DlstackModelTargetDown"
ALERT_PODS_NOT_READY = "DlstackModelPodsNotReady"
ALERTS = (ALERT_ERROR_RATIO, ALERT_LATENCY, ALERT_TARGET_DOWN, ALERT_PODS_NOT_READY)

CANARY_SUFFIX = "-canary"
RUNBOOK_BASE = "https://github.com/dlstack/dlstack/blob/main/README.md#runbook"

_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


@dataclass(frozen=True)
class ModelSLO:
    """What the rules need to know about one deployed model."""

    name: str  # model name = the `model` label the server exports (DNS-1123 label)
    namespace: str  # Kubernetes namespace of the model's Deployment
    error_ratio: float  # SLO: max share of 5xx on inference routes, 0 < x < 1 (e.g. 0.01)
    p99_ms: float  # SLO: max p99 request latency of inference routes, milliseconds
    job: str = ""  # default "" = name; Prometheus `job` label = the model Service's name
    deployment: str = ""  # default "" = name; the Deployment kube-state-metrics reports
    error_for: str = "5m"  # default 5m; how long the ratio must exceed the SLO before firing
    latency_for: str = "10m"  # default 10m; how long p99 must exceed the SLO before firing
    down_for: str = "2m"  # default 2m; how long a scrape target must be down
    not_ready_for: str = "5m"  # default 5m; how long available < desired replicas
    runbook_url: str = RUNBOOK_BASE  # default README runbook section; anchor per alert is appended

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        if not names.matches(names.DNS_LABEL, self.name):
            raise UserError(f"{where}: name must be a DNS-1123 label (lowercase letters, digits, '-')")
        if not names.matches(names.DNS_LABEL, self.namespace):
            raise UserError(f"{where}: namespace {self.namespace!r} must be a DNS-1123 label")
        if not 0 < self.error_ratio < 1:
            raise UserError(f"{where}: slo.error_ratio {self.error_ratio} must be between 0 and 1 (e.g. 0.01 = 1%)")
        if not self.p99_ms > 0:
            raise UserError(f"{where}: slo.p99_ms {self.p99_ms} must be a positive number of milliseconds")
        for field in ("error_for", "latency_for", "down_for", "not_ready_for"):
            value = getattr(self, field)
            if not _DURATION.fullmatch(value):
                raise UserError(f"{where}: {field}={value!r} is not a Prometheus duration (e.g. '5m', '30s', '1h')")

    @property
    def job_label(self) -> str:
        return self.job or self.name

    @property
    def deployment_name(self) -> str:
        return self.deployment or self.name

    @property
    def job_matcher(self) -> str:
        return f'job=~"{self.job_label}({CANARY_SUFFIX})?"'

    @property
    def deployment_matcher(self) -> str:
        return f'deployment=~"{self.deployment_name}({CANARY_SUFFIX})?"'

    @property
    def selector(self) -> str:
        """Label matchers selecting this model's server series."""
        return f'namespace="{self.namespace}", model="{self.name}"'


def _recording_rules(m: ModelSLO) -> list[dict[str, Any]]:
    sel = m.selector
    infer = f'{sel}, route=~"{INFER_ROUTES}"'
    total = f"sum by ({RECORD_BY}) (rate(dlstack_requests_total{{{infer}}}[5m]))"
    errors = f'sum by ({RECORD_BY}) (rate(dlstack_requests_total{{{infer}, code=~"{ERROR_CODES}"}}[5m]))'
    buckets = f"sum by ({RECORD_BY}, le) (rate(dlstack_request_duration_seconds_bucket{{{infer}}}[5m]))"
    # The static labels equal what the expressions already keep; they make each model's rules
    # distinct to `promtool check rules`, which rejects same-name rules with the same labels.
    labels = {"namespace": m.namespace, "model": m.name}
    rules = [
        (REQUESTS_RATE, total),
        # `or ... * 0` keeps a 0 series while there are no 5xx at all, so dashboards and the
        # ratio show 0 instead of "no data".
        (ERRORS_RATE, f"{errors} or ({total} * 0)"),
        (ERROR_RATIO, f"{ERRORS_RATE}{{{sel}}} / {REQUESTS_RATE}{{{sel}}}"),
        (LATENCY_P50, f"histogram_quantile(0.5, {buckets})"),
        (LATENCY_P99, f"histogram_quantile(0.99, {buckets})"),
    ]
    return [{"record": record, "expr": expr, "labels": dict(labels)} for record, expr in rules]


def _alert(m: ModelSLO, name: str, expr: str, for_: str, severity: str, summary: str, desc: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity, "model": m.name},
        "annotations": {
            "summary": summary,
            "description": desc,
            "runbook_url": f"{m.runbook_url}-{name.lower()}",
        },
    }


def _alerts(m: ModelSLO) -> list[dict[str, Any]]:
    sel = m.selector
    pct = f"{m.error_ratio * 100:g}%"
    secs = m.p99_ms / 1000
    dep = f'namespace="{m.namespace}", {m.deployment_matcher}'
    return [
        _alert(
            m,
            ALERT_ERROR_RATIO,
            f"{ERROR_RATIO}{{{sel}}} > {m.error_ratio:g}",
            m.error_for,
            "critical",
            f"{m.name} {{{{ $labels.version }}}}: 5xx ratio above the {pct} SLO",
            f"{{{{ $value | humanizePercentage }}}} of inference requests to {m.namespace}/{m.name} version "
            f"{{{{ $labels.version }}}} failed over 5m (SLO {pct}). Check the server logs in Kibana "
            "(saved search 'dlstack model errors') and recent promotions; roll back with `dlstack rollback`.",
        ),
        _alert(
            m,
            ALERT_LATENCY,
            f"{LATENCY_P99}{{{sel}}} > {secs:g}",
            m.latency_for,
            "warning",
            f"{m.name} {{{{ $labels.version }}}}: p99 latency above the {m.p99_ms:g} ms SLO",
            f"p99 of inference requests to {m.namespace}/{m.name} version {{{{ $labels.version }}}} is "
            f"{{{{ $value | humanizeDuration }}}} (SLO {m.p99_ms:g} ms). Check CPU throttling and replicas on the "
            "model dashboard; re-run `dlstack capacity` and raise replicas or CPU.",
        ),
        _alert(
            m,
            ALERT_TARGET_DOWN,
            f'up{{namespace="{m.namespace}", {m.job_matcher}}} == 0',
            m.down_for,
            "critical",
            f"{m.name}: metrics target {{{{ $labels.pod }}}} is down",
            f"Prometheus cannot scrape {{{{ $labels.instance }}}} (pod {{{{ $labels.pod }}}}) of "
            f"{m.namespace}/{m.name}. Check the pod with "
            f"`kubectl -n {m.namespace} describe pod {{{{ $labels.pod }}}}`.",
        ),
        _alert(
            m,
            ALERT_PODS_NOT_READY,
            f"kube_deployment_status_replicas_available{{{dep}}} < on (namespace, deployment) "
            f"kube_deployment_spec_replicas{{{dep}}}",
            m.not_ready_for,
            "warning",
            f"{m.name}: fewer ready replicas than desired",
            f"Deployment {m.namespace}/{{{{ $labels.deployment }}}} has {{{{ $value }}}} available replicas, "
            f"fewer than desired. Check `kubectl -n {m.namespace} get pods` for crash loops, failed readiness probes "
            "(model load errors) or unschedulable pods.",
        ),
    ]


def group_name(m: ModelSLO) -> str:
    return f"dlstack-{m.namespace}-{m.name}"


def rule_groups(models: Sequence[ModelSLO], *, interval: str = "") -> list[dict[str, Any]]:
    """One rule group per model: recording rules first, then that model's alerts.

    ``interval`` (default "" = Prometheus' global evaluation interval) sets each group's
    evaluation interval.
    """
    seen: set[tuple[str, str]] = set()
    for m in models:
        if (m.namespace, m.name) in seen:
            raise UserError(f"model {m.name!r} is listed twice in namespace {m.namespace!r}; give each one SLO")
        seen.add((m.namespace, m.name))
    if interval and not _DURATION.fullmatch(interval):
        raise UserError(f"rule group interval {interval!r} is not a Prometheus duration (e.g. '30s')")
    groups = []
    for m in models:
        group: dict[str, Any] = {"name": group_name(m)}
        if interval:
            group["interval"] = interval
        group["rules"] = _recording_rules(m) + _alerts(m)
        groups.append(group)
    return groups


def rule_file(models: Sequence[ModelSLO], *, interval: str = "") -> dict[str, Any]:
    """A whole Prometheus rule file (``{"groups": [...]}``), as ``promtool check rules`` expects."""
    return {"groups": rule_groups(models, interval=interval)}


def rule_expressions(groups: Iterable[dict[str, Any]]) -> list[str]:
    """Every PromQL expression in the groups (recording rules and alerts), in order."""
    return [str(rule["expr"]) for g in groups for rule in g["rules"]]


def rule_file_yaml(models: Sequence[ModelSLO], *, interval: str = "") -> str:
    """The rule file as YAML text, ready for ``promtool check rules`` or a ``rule_files`` entry."""
    import io

    from ruamel.yaml import YAML

    y = YAML(typ="safe", pure=True)
    y.default_flow_style = False
    y.width = 4096  # keep each PromQL expression on one line
    buf = io.StringIO()
    y.dump(rule_file(models, interval=interval), buf)
    return buf.getvalue()
