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
# Load autoscaling (KEDA, infra/autoscaling.py): short windows, since a 5m rate lags a surge by minutes,
# kept per job so the stable Deployment (job = its Service, "<name>") scales on its own pods' load,
# not on the canary's ("<name>-canary"); summed over versions, so a rollout's old and new pods count.
LOAD_BY = "namespace, model, job"
LOAD_RPS = "model_job:dlstack_requests:rate1m"
LOAD_INFLIGHT = "model_job:dlstack_inflight_requests:sum"
LOAD_P99 = "model_job:dlstack_request_duration_seconds:p99_1m"

ALERT_ERROR_RATIO = "DlstackModelErrorRatioHigh"
ALERT_LATENCY = "DlstackModelLatencyP99High"
ALERT_TARGET_DOWN = "DlstackModelTargetDown"
ALERT_PODS_NOT_READY = "DlstackModelPodsNotReady"
ALERTS = (ALERT_ERROR_RATIO, ALERT_LATENCY, ALERT_TARGET_DOWN, ALERT_PODS_NOT_READY)
# Drift (ModelSLO.drift): the population stability index of the live bins of
# services/serving/server/drift.py against the registered reference; "{window}" is ModelSLO.drift_window.
ALERT_DRIFT = "DlstackModelDrift"
DRIFT_LIVE_RATIO = "model:dlstack_drift_live_ratio:{window}"  # share of sampled rows per bin
DRIFT_GROUP_PSI = "model_group:dlstack_drift_psi:{window}"  # PSI per (tensor, group)
DRIFT_PSI = "model:dlstack_drift_psi:{window}"  # the score: the worst group's PSI per model and version
DRIFT_ROWS = "model:dlstack_drift_rows:{window}"  # sampled rows in the window (the alert's minimum)
DRIFT_EPSILON = 1e-4  # floor of a bin's share, so an empty bin gives a large but finite ln()
DRIFT_BY = "namespace, model, version, tensor, group"

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
    load_rules: bool = False  # default False; True adds the LOAD_* recording rules a KEDA ScaledObject queries
    drift: bool = False  # default False; True adds the DRIFT_* rules and DlstackModelDrift (stack drift.sample > 0)
    drift_psi: float = 0.2  # default 0.2; PSI above which the drift alert fires (0.1-0.2 moderate, > 0.2 major)
    drift_window: str = "1h"  # default 1h; window of live bins compared with the reference
    drift_for: str = "15m"  # default 15m; how long the PSI must stay above drift_psi
    drift_min_rows: int = 500  # default 500; fewer sampled rows in the window keep the alert quiet (noise)

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
        if not self.drift_psi > 0 or self.drift_min_rows < 1:
            raise UserError(
                f"{where}: drift_psi={self.drift_psi} and drift_min_rows={self.drift_min_rows} must both be > 0"
            )
        for field in ("error_for", "latency_for", "down_for", "not_ready_for", "drift_window", "drift_for"):
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
    if m.load_rules:
        rules += _load_rules(m)
    if m.drift:
        rules += _drift_rules(m)
    return [{"record": record, "expr": expr, "labels": dict(labels)} for record, expr in rules]


def drift_record(template: str, m: ModelSLO) -> str:
    return template.format(window=m.drift_window)


def _drift_rules(m: ModelSLO) -> list[tuple[str, str]]:
    sel, w, eps = m.selector, m.drift_window, f"{DRIFT_EPSILON:g}"
    rate = f"rate(dlstack_drift_bin_total{{{sel}}}[{w}])"
    # "> 0" drops groups without sampled rows in the window: no series rather than 0/0 = NaN.
    live = f"sum by ({DRIFT_BY}, bin) ({rate}) / on ({DRIFT_BY}) group_left () (sum by ({DRIFT_BY}) ({rate}) > 0)"
    p_live = f"clamp_min({drift_record(DRIFT_LIVE_RATIO, m)}{{{sel}}}, {eps})"
    # Every pod of a version exports the same reference shares: max picks one.
    p_ref = f"clamp_min(max by ({DRIFT_BY}, bin) (dlstack_drift_reference_ratio{{{sel}}}), {eps})"
    rows = f"sum by ({DRIFT_BY}) (increase(dlstack_drift_bin_total{{{sel}}}[{w}]))"
    return [
        (drift_record(DRIFT_LIVE_RATIO, m), live),
        (drift_record(DRIFT_GROUP_PSI, m), f"sum by ({DRIFT_BY}) (({p_live} - {p_ref}) * ln({p_live} / {p_ref}))"),
        (drift_record(DRIFT_PSI, m), f"max by ({RECORD_BY}) ({drift_record(DRIFT_GROUP_PSI, m)}{{{sel}}})"),
        (drift_record(DRIFT_ROWS, m), f"max by ({RECORD_BY}) ({rows})"),
    ]


def _drift_alert(m: ModelSLO) -> dict[str, Any]:
    sel = m.selector
    psi, rows = drift_record(DRIFT_PSI, m), drift_record(DRIFT_ROWS, m)
    return _alert(
        m,
        ALERT_DRIFT,
        f"{psi}{{{sel}}} > {m.drift_psi:g} and on ({RECORD_BY}) {rows}{{{sel}}} >= {m.drift_min_rows}",
        m.drift_for,
        "warning",
        f"{m.name} {{{{ $labels.version }}}}: production inputs/outputs drifted from the reference",
        f"The population stability index of {m.namespace}/{m.name} version {{{{ $labels.version }}}}'s sampled "
        f'inputs/outputs against its registered reference is {{{{ $value | printf "%.2f" }}}} over {m.drift_window} '
        f"(threshold {m.drift_psi:g}). Find the drifting tensor and group on the model dashboard's drift panel "
        f"({drift_record(DRIFT_GROUP_PSI, m)}); compare recent inputs in the prediction log.",
    )


def _load_rules(m: ModelSLO) -> list[tuple[str, str]]:
    infer = f'{m.selector}, route=~"{INFER_ROUTES}"'
    buckets = f"sum by ({LOAD_BY}, le) (rate(dlstack_request_duration_seconds_bucket{{{infer}}}[1m]))"
    return [
        (LOAD_RPS, f"sum by ({LOAD_BY}) (rate(dlstack_requests_total{{{infer}}}[1m]))"),
        (LOAD_INFLIGHT, f"sum by ({LOAD_BY}) (dlstack_inflight_requests{{{m.selector}}})"),
        (LOAD_P99, f"histogram_quantile(0.99, {buckets})"),
    ]


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
        group["rules"] = _recording_rules(m) + _alerts(m) + ([_drift_alert(m)] if m.drift else [])
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
