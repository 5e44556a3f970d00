"""The whole render of dev and prod judged by tools we did not write.

* built-in kinds: kubernetes-validate, strict, for Kubernetes 1.31 and 1.34;
* custom resources: the strict upstream CRD schemas vendored in tests/schemas;
* every pod in the models namespace: Pod Security Standards "restricted".

Each judge is also shown to fail on a deliberately broken object, so a pass means something.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from stacks.config import load_stack_config
from tests.k8s_checks import (
    K8S_VERSIONS,
    crd_errors,
    is_custom_resource,
    kubernetes_errors,
    load_manifests,
    pod_spec_of,
    pss_restricted_violations,
    rendered_manifests,
)

pytestmark = pytest.mark.xdist_group("render")  # shares the dev/prod render with the other judges
EXPECTED_CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "Elasticsearch", "Kibana", "Logstash", "Beat"}


@pytest.fixture(scope="module", params=["dev", "prod"])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    stack = request.param
    objs = load_manifests(rendered_manifests(stack))
    # Helm releases are recorded under DIR/helm, not as manifests; none may sneak in here.
    assert not [o for o in objs if str(o["apiVersion"]).startswith("helm.sh/")]
    return stack, objs


def test_kubernetes_validate_has_the_exact_versions() -> None:
    from kubernetes_validate.utils import all_versions

    for version in K8S_VERSIONS:
        assert f"{version}.0" in all_versions(), f"kubernetes-validate lacks {version}; it would validate an older one"


def test_builtin_kinds_are_valid_for_every_supported_version(rendered: tuple[str, list[dict]]) -> None:
    stack, objs = rendered
    builtin = [o for o in objs if not is_custom_resource(o)]
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Ingress", "NetworkPolicy"} <= {
        o["kind"] for o in builtin
    }
    errors = [e for o in builtin for v in K8S_VERSIONS for e in kubernetes_errors(o, v)]
    assert not errors, f"{stack}:\n" + "\n".join(errors)


def test_custom_resources_match_strict_crd_schemas(rendered: tuple[str, list[dict]]) -> None:
    stack, objs = rendered
    custom = [o for o in objs if is_custom_resource(o)]
    assert {o["kind"] for o in custom} >= EXPECTED_CUSTOM_KINDS
    errors = [e for o in custom for e in crd_errors(o)]
    assert not errors, f"{stack}:\n" + "\n".join(errors)


def test_models_namespace_pods_are_pod_security_restricted(rendered: tuple[str, list[dict]]) -> None:
    stack, objs = rendered
    models_ns = load_stack_config(stack).namespaces.models
    pods = [(o, pod_spec_of(o)) for o in objs if o["metadata"].get("namespace") == models_ns]
    pods = [(o, s) for o, s in pods if s is not None]
    assert len(pods) >= 2, "expected the model Deployments"
    problems = [f"{o['kind']}/{o['metadata']['name']}: {v}" for o, s in pods for v in pss_restricted_violations(s)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# the judges can fail

GOOD_POD: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [
        {
            "name": "app",
            "image": "registry/app@sha256:" + "0" * 64,
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
    ],
    "volumes": [{"name": "tmp", "emptyDir": {}}],
}


def test_pss_checker_accepts_a_minimal_restricted_pod() -> None:
    assert pss_restricted_violations(GOOD_POD) == []
    with_bind = copy.deepcopy(GOOD_POD)
    with_bind["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    assert pss_restricted_violations(with_bind) == []


def _break(path: str, value: Any) -> dict[str, Any]:
    pod = copy.deepcopy(GOOD_POD)
    *parents, leaf = path.split(".")
    node: Any = pod
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return pod


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("hostNetwork", True, "hostNetwork must be false"),
        ("hostPID", True, "hostPID must be false"),
        ("volumes", [{"name": "root", "hostPath": {"path": "/"}}], "type ['hostPath'] is not allowed"),
        ("securityContext.runAsNonRoot", None, "runAsNonRoot must be true"),
        ("securityContext.seccompProfile", {"type": "Unconfined"}, "must not be Unconfined"),
        ("containers.0.securityContext.privileged", True, "privileged must be false"),
        ("containers.0.securityContext.allowPrivilegeEscalation", None, "allowPrivilegeEscalation must be false"),
        ("containers.0.securityContext.capabilities", {"drop": ["NET_RAW"]}, "capabilities.drop must include ALL"),
        ("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}, "only contain NET_BIND"),
        ("containers.0.securityContext.runAsUser", 0, "runAsUser must not be 0"),
        ("containers.0.ports", [{"containerPort": 80, "hostPort": 80}], "hostPort 80 is not allowed"),
        ("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}], "sysctl kernel.msgmax"),
    ],
)
def test_pss_checker_rejects_each_broken_control(path: str, value: Any, expected: str) -> None:
    violations = pss_restricted_violations(_break(path, value))
    assert any(expected in v for v in violations), violations


def test_crd_schema_rejects_a_typo_in_a_service_monitor() -> None:
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "m", "namespace": "models"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "endpoints": [{"port": "http", "path": "/metrics"}]},
    }
    assert crd_errors(monitor) == []
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    (error,) = crd_errors(monitor)
    assert "spec/endpoints/0" in error and "'intervall' was unexpected" in error


def test_kubernetes_validate_rejects_a_wrong_type_in_a_deployment(tmp_path: Path) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "models"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i@sha256:0"}]},
            },
        },
    }
    for version in K8S_VERSIONS:
        assert kubernetes_errors(deployment, version) == []
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    for version in K8S_VERSIONS:
        (error,) = kubernetes_errors(wrong_type, version)
        assert "spec.replicas" in error and "'two' is not of type" in error
        (error,) = kubernetes_errors(typo, version)
        assert "imagePullPolicyy" in error
