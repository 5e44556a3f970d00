"""Grafana dashboards as code (grafana-foundation-sdk builders), one per model plus an overview.

The Monitoring component puts each dashboard's JSON in a ConfigMap for the Grafana sidecar.
Every query is plain PromQL over the server's metrics, the recording rules of
``infra.alerts``, cAdvisor and kube-state-metrics; ``queries()`` lists them so tests can run
each one against a real Prometheus.

Container CPU/memory are summed per pod and joined with ``dlstack_model_info`` on
(namespace, pod): that selects exactly the pods serving the model and adds its ``model`` and
``version`` labels, without guessing pod-name patterns or container names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, Threshold, ThresholdsMode

from infra.alerts import (
    CANARY_SUFFIX,
    DRIFT_GROUP_PSI,
    DRIFT_PSI,
    ERROR_RATIO,
    INFER_ROUTES,
    LATENCY_P50,
    LATENCY_P99,
    REQUESTS_RATE,
)
from services.serving import names
from services.serving.errors import UserError

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Grafana's built-in interval variables, and what a checker substitutes for them.
GRAFANA_VARIABLES = ("$__rate_interval", "$__interval", "$__range")
TAGS = ["dlstack"]


@dataclass(frozen=True)
class Query:
    """One PromQL query of a dashboard panel."""

    panel: str  # panel title
    expr: str  # PromQL, possibly with Grafana variables such as $__rate_interval
    legend: str  # legend format; every {{label}} in it must exist on the result series

    def promql(self, rate_interval: str = "1m") -> str:
        """The expression with Grafana's interval variables replaced, ready for Prometheus' API."""
        out = self.expr
        for var in GRAFANA_VARIABLES:
            out = out.replace(var, rate_interval)
        return out


def _uid(*parts: str) -> str:
    uid = "dlstack-" + "-".join(parts)
    # Grafana caps uids at 40 characters.
    return uid if len(uid) <= 40 else uid[:31] + "-" + hashlib.sha256(uid.encode()).hexdigest()[:8]


def _target(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).range()


def _panel(
    title: str, unit: str, targets: Sequence[tuple[str, str]], *, slo: float | None = None, desc: str = ""
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(desc)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(8)
        .span(12)
        .fill_opacity(10)
        .min(0)
    )
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(_target(expr, legend, chr(ord("A") + i)))
    if slo is not None:
        # The SLO as a dashed red threshold line, so a breach is visible at a glance.
        panel = panel.thresholds(
            dash_b.ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=None, color="green"), Threshold(value=slo, color="red")])
        ).thresholds_style(common_b.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.DASHED))
    return panel


def _datasource_variable() -> dash_b.DatasourceVariable:
    return dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus")


def _encode(builder: dash_b.Dashboard) -> dict[str, Any]:
    return dict(json.loads(JSONEncoder(sort_keys=True).encode(builder.build())))


def _check_names(namespace: str, models: Sequence[str]) -> None:
    if not names.matches(names.DNS_LABEL, namespace):
        raise UserError(f"dashboard namespace {namespace!r} must be a DNS-1123 label")
    if not models:
        raise UserError("overview dashboard: no models given; list at least one model")
    for m in models:
        if not names.matches(names.DNS_LABEL, m):
            raise UserError(f"dashboard model {m!r} must be a DNS-1123 label (the model name in model.yaml)")


def _pods_of(sel: str) -> str:
    """(namespace, pod) -> (model, version) of the pods serving the selected model(s)."""
    return f"max by (namespace, pod, model, version) (dlstack_model_info{{{sel}}})"


def _resource_targets(namespace: str, sel: str, metric: str, resource: str) -> list[tuple[str, str]]:
    pods = _pods_of(sel)
    # container="" is cAdvisor's pod-level total and "POD" the pause container: both would double count.
    usage = f'{metric}{{namespace="{namespace}", container!="", container!="POD"}}'
    if metric.endswith("_total"):
        usage = f"rate({usage}[$__rate_interval])"
    used = f"sum by (namespace, pod) ({usage})"
    requests = f'kube_pod_container_resource_requests{{namespace="{namespace}", resource="{resource}"}}'
    requested = f"sum by (namespace, pod) ({requests})"
    join = "* on (namespace, pod) group_left (model, version)"
    return [
        (f"{used} {join} {pods}", "used {{pod}} ({{version}})"),
        (f"{requested} {join} {pods}", "requested {{pod}} ({{version}})"),
    ]


def model_dashboard(
    model: str,
    namespace: str,
    *,
    error_ratio: float | None = None,
    p99_ms: float | None = None,
    deployment: str = "",
    drift_window: str = "",
    drift_psi: float = 0.2,
) -> dict[str, Any]:
    """The per-model dashboard: traffic, errors, latency, batching, CPU/memory against requests, replicas.

    ``error_ratio``/``p99_ms`` (default None = no line) draw the SLO on the error and latency
    panels; ``deployment`` (default "" = model name) is the Deployment kube-state-metrics reports.
    ``drift_window`` (default "" = no drift row; the ``ModelSLO.drift_window`` of a model with drift
    on) adds the drift score, with ``drift_psi`` (default 0.2) as its alert line.
    """
    _check_names(namespace, [model])
    sel = f'namespace="{namespace}", model="{model}"'
    infer = f'{sel}, route=~"{INFER_ROUTES}"'
    dep = f'namespace="{namespace}", deployment=~"{deployment or model}({CANARY_SUFFIX})?"'
    ri = "$__rate_interval"
    by_code = "{{version}} {{code}}"

    def avg(metric: str) -> str:
        return (
            f"sum by (model, version) (rate({metric}_sum{{{sel}}}[{ri}])) / "
            f"sum by (model, version) (rate({metric}_count{{{sel}}}[{ri}]))"
        )

    builder = (
        dash_b.Dashboard(f"dlstack / {namespace} / {model}")
        .uid(_uid(namespace, model))
        .tags([*TAGS, model])
        .description(f"Model server metrics of {model} in namespace {namespace} (generated by dlstack).")
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(_datasource_variable())
        .with_row(dash_b.Row("Traffic and SLO"))
        .with_panel(
            _panel(
                "Request rate (inference routes)",
                "reqps",
                [(f"sum by (model, version, code) (rate(dlstack_requests_total{{{infer}}}[{ri}]))", by_code)],
            )
        )
        .with_panel(
            _panel(
                "Error ratio (5xx)",
                "percentunit",
                [(f"{ERROR_RATIO}{{{sel}}}", "{{version}}")],
                slo=error_ratio,
                desc="Share of inference requests answered 5xx over 5m; the red line is the SLO.",
            )
        )
        .with_panel(
            _panel(
                "Latency p50 / p99 (inference routes)",
                "s",
                [(f"{LATENCY_P50}{{{sel}}}", "p50 {{version}}"), (f"{LATENCY_P99}{{{sel}}}", "p99 {{version}}")],
                slo=None if p99_ms is None else p99_ms / 1000,
                desc="Request latency quantiles over 5m; the red line is the p99 SLO.",
            )
        )
        .with_panel(
            _panel(
                "In-flight requests",
                "short",
                [(f"sum by (model, version) (dlstack_inflight_requests{{{sel}}})", "{{version}}")],
            )
        )
        .with_row(dash_b.Row("Model"))
        .with_panel(
            _panel(
                "Batch size (rows per forward pass, mean)",
                "short",
                [(avg("dlstack_batch_size"), "{{version}}")],
                desc="Dynamic batching at work: 1 means requests are served one by one.",
            )
        )
        .with_panel(
            _panel(
                "Forward pass duration (mean / p99)",
                "s",
                [
                    (avg("dlstack_inference_duration_seconds"), "mean {{version}}"),
                    (
                        "histogram_quantile(0.99, sum by (model, version, le) "
                        f"(rate(dlstack_inference_duration_seconds_bucket{{{sel}}}[{ri}])))",
                        "p99 {{version}}",
                    ),
                ],
            )
        )
        .with_row(dash_b.Row("Resources"))
        .with_panel(
            _panel(
                "CPU used vs requested (cores)",
                "short",
                _resource_targets(namespace, sel, "container_cpu_usage_seconds_total", "cpu"),
            )
        )
        .with_panel(
            _panel(
                "Memory working set vs requested",
                "bytes",
                _resource_targets(namespace, sel, "container_memory_working_set_bytes", "memory"),
            )
        )
        .with_panel(
            _panel(
                "Replicas",
                "short",
                [
                    (f"kube_deployment_spec_replicas{{{dep}}}", "desired {{deployment}}"),
                    (f"kube_deployment_status_replicas_available{{{dep}}}", "available {{deployment}}"),
                ],
            )
        )
    )
    if drift_window:
        psi, by_group = (t.format(window=drift_window) for t in (DRIFT_PSI, DRIFT_GROUP_PSI))
        builder = builder.with_row(dash_b.Row("Drift")).with_panel(
            _panel(
                f"Drift score (PSI vs reference, {drift_window})",
                "short",
                [
                    (f"{psi}{{{sel}}}", "score {{version}}"),
                    (f"{by_group}{{{sel}}}", "{{version}} {{tensor}}/{{group}}"),
                ],
                slo=drift_psi,
                desc="Population stability index of the sampled inputs and outputs against the reference registered "
                "with the model (--reference-data): the score is the worst feature group; staying above the red line "
                "fires DlstackModelDrift. Under 0.1 is no shift, 0.1-0.2 moderate, over 0.2 major.",
            )
        )
    return _encode(builder)


def overview_dashboard(models: Sequence[str], namespace: str, *, deployments: Sequence[str] = ()) -> dict[str, Any]:
    """All models of a namespace side by side: traffic, error ratio, p99, CPU and replicas per model.

    ``deployments`` (default () = the model names) are the Deployments kube-state-metrics reports.
    """
    _check_names(namespace, models)
    alternatives = "|".join(models)
    deps = "|".join(deployments or models)
    sel = f'namespace="{namespace}", model=~"{alternatives}"'
    dep = f'namespace="{namespace}", deployment=~"({deps})({CANARY_SUFFIX})?"'
    ri = "$__rate_interval"
    cpu = (
        f'sum by (namespace, pod) (rate(container_cpu_usage_seconds_total{{namespace="{namespace}", container!="", '
        f'container!="POD"}}[{ri}])) * on (namespace, pod) group_left (model, version) {_pods_of(sel)}'
    )
    builder = (
        dash_b.Dashboard(f"dlstack / {namespace} / overview")
        .uid(_uid(namespace, "overview"))
        .tags(TAGS)
        .description(f"Every dlstack model in namespace {namespace} (generated by dlstack).")
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(_datasource_variable())
        .with_panel(
            _panel("Request rate by model", "reqps", [(f"sum by (model) ({REQUESTS_RATE}{{{sel}}})", "{{model}}")])
        )
        .with_panel(
            _panel("Error ratio (5xx) by model", "percentunit", [(f"{ERROR_RATIO}{{{sel}}}", "{{model}} {{version}}")])
        )
        .with_panel(_panel("p99 latency by model", "s", [(f"{LATENCY_P99}{{{sel}}}", "{{model}} {{version}}")]))
        .with_panel(_panel("CPU used by model (cores)", "short", [(f"sum by (model) ({cpu})", "{{model}}")]))
        .with_panel(
            _panel(
                "Available / desired replicas",
                "short",
                [
                    (f"kube_deployment_status_replicas_available{{{dep}}}", "available {{deployment}}"),
                    (f"kube_deployment_spec_replicas{{{dep}}}", "desired {{deployment}}"),
                ],
            )
        )
    )
    return _encode(builder)


def _panels(panels: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels") or [])  # collapsed rows nest their panels


def queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every Prometheus query of a dashboard JSON, with its panel title and legend."""
    return [
        Query(panel=str(p.get("title", "")), expr=str(t["expr"]), legend=str(t.get("legendFormat", "")))
        for p in _panels(dashboard.get("panels") or [])
        for t in p.get("targets") or []
        if t.get("expr")
    ]


def promql_expressions(dashboard: dict[str, Any], rate_interval: str = "1m") -> list[str]:
    """Every PromQL expression of a dashboard, Grafana variables substituted (see ``Query.promql``)."""
    return [q.promql(rate_interval) for q in queries(dashboard)]
