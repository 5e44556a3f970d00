"""Typed Pulumi components of dlstack (``dlstack:<module>:<Type>``) and the pure generators they use.

Components are re-exported lazily (PEP 562): ``from infra import ClusterBaseline`` works, while
``import infra.alerts`` (a pure generator) does not pay for importing pulumi_kubernetes.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClusterBaseline": "infra.cluster_baseline",
    "ClusterBaselineArgs": "infra.cluster_baseline",
    "ModelImage": "infra.model_image",
    "ModelImageArgs": "infra.model_image",
    "ModelService": "infra.model_service",
    "ModelServiceArgs": "infra.model_service",
    "CanaryArgs": "infra.model_service",
    "Logging": "infra.logging",
    "LoggingArgs": "infra.logging",
    "Monitoring": "infra.monitoring",
    "MonitoringArgs": "infra.monitoring",
    "helm_release": "infra.helm",
    "CHARTS": "infra.helm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'infra' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
