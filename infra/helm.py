"""Pinned Helm charts: every chart the stack installs goes through ``helm_release``.

A ``kubernetes.helm.v3.Release`` is a real custom resource (the provider runs Helm), so under
Pulumi's mocks its inputs -- chart, repository, version, values -- are recorded and the offline
render writes them to ``helm/``. (``helm.v4.Chart`` is a remote component: under mocks it renders
nothing, which is why it is not used.) Chart versions are pinned here, in one table, so an upgrade is
one reviewed line; ``helm_release`` refuses a chart that is not pinned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from services.serving.errors import UserError


@dataclass(frozen=True)
class Chart:
    name: str  # chart name in the repository
    repo: str  # Helm repository URL
    version: str  # exact chart version (never a range)


CHARTS: dict[str, Chart] = {
    "ingress-nginx": Chart("ingress-nginx", "https://kubernetes.github.io/ingress-nginx", "4.14.1"),
    "metrics-server": Chart("metrics-server", "https://kubernetes-sigs.github.io/metrics-server/", "3.13.0"),
    "nvidia-device-plugin": Chart("nvidia-device-plugin", "https://nvidia.github.io/k8s-device-plugin", "0.18.2"),
    # Installed only when a model autoscales on load; 2.20.2 = the CRD schema vendored in tests/schemas.
    "keda": Chart("keda", "https://kedacore.github.io/charts", "2.20.2"),
    # Owned by the workloads components (infra/logging.py, infra/monitoring.py); pinned here too.
    "eck-operator": Chart("eck-operator", "https://helm.elastic.co", "3.5.0"),
    "kube-prometheus-stack": Chart(
        "kube-prometheus-stack", "https://prometheus-community.github.io/helm-charts", "88.0.0"
    ),
}


def pinned(chart: str) -> Chart:
    try:
        return CHARTS[chart]
    except KeyError:
        raise UserError(f'chart "{chart}" is not pinned; add it to infra.helm.CHARTS with an exact version') from None


def helm_release(
    name: str,
    *,
    chart: str,
    namespace: pulumi.Input[str],
    values: Mapping[str, Any] | None = None,
    version: str | None = None,
    repo: str | None = None,
    opts: pulumi.ResourceOptions | None = None,
) -> k8s.helm.v3.Release:
    """A Helm release of a pinned chart; ``name`` is both the Pulumi name and the Helm release name.

    ``version``/``repo`` default to the pin in ``CHARTS`` (pass them only to override a pin for one
    release). The release waits for its resources (``skip_await=False``) and rolls back on failure.
    """
    pin = pinned(chart)
    return k8s.helm.v3.Release(
        name,
        k8s.helm.v3.ReleaseArgs(
            name=name,  # a fixed release name: no random suffix, stable resource names inside the chart
            chart=pin.name,
            version=version or pin.version,
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=repo or pin.repo),
            namespace=namespace,
            values=dict(values or {}),
            atomic=True,
            cleanup_on_fail=True,
            timeout=600,
        ),
        opts=opts,
    )
