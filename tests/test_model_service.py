"""ModelService under Pulumi mocks: the wiring between its objects, asserted on the recorded inputs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pulumi
import pytest

from infra.model_service import CanaryArgs, ModelService, ModelServiceArgs
from services.serving.errors import UserError
from services.serving.server.settings import ServerSettings
from tests.k8s_checks import find, manifest_errors, manifests, one, pod_spec_of, pss_restricted_violations, record

ROOT = Path(__file__).resolve().parent.parent
DIGEST = "sha256:" + "ab" * 32
REQUIRED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
)


def render(name: str = "mnist-mlp", **kw: Any) -> list[dict[str, Any]]:
    args = ModelServiceArgs(**{"image": f"registry.local/dlstack/{name}@{DIGEST}", "model_version": "1", **kw})
    return manifests(record(lambda: ModelService(name, args)))


@pytest.fixture(scope="module")
def dev() -> list[dict[str, Any]]:
    return render(min_replicas=1, max_replicas=3)


@pytest.fixture(scope="module")
def prod() -> list[dict[str, Any]]:
    return render(
        min_replicas=2,
        max_replicas=6,
        topology_spread=True,
        gpu_count=1,
        ingress_host="mnist-mlp.models.example",
        ingress_tls_secret="mnist-mlp.models.example-tls",
        canary=CanaryArgs(
            image=f"registry.local/dlstack/mnist-mlp@sha256:{'cd' * 32}", model_version="2", weight=25, replicas=2
        ),
    )


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment)["env"] if "value" in e}


def test_objects_dev_and_prod(dev: list[dict[str, Any]], prod: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in dev)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "ServiceMonitor",
            "NetworkPolicy",
            "Ingress",
        ]
    ), "no PDB below 2 replicas, no canary unless asked"
    assert len(find(prod, "Deployment")) == 2 and len(find(prod, "Ingress")) == 2
    assert len(find(prod, "PodDisruptionBudget")) == 2  # stable (min 2) and canary (2 replicas)


def test_every_object_named_labelled_and_valid(dev: list[dict[str, Any]], prod: list[dict[str, Any]]) -> None:
    for obj in dev + prod:
        meta = obj["metadata"]
        assert meta["name"] and meta["namespace"] == "models", obj["kind"]
        missing = [k for k in REQUIRED_LABELS if not meta["labels"].get(k)]
        assert not missing, f"{obj['kind']}/{meta['name']} lacks {missing}"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "dlstack"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "pulumi"
        assert manifest_errors(obj) == []
        spec = pod_spec_of(obj)
        if spec is not None:
            assert pss_restricted_violations(spec) == []


def test_hpa_targets_the_deployment(dev: list[dict[str, Any]]) -> None:
    deployment, hpa = one(dev, "Deployment"), one(dev, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["averageUtilization"] == 70
    assert "replicas" not in deployment["spec"], "the HPA owns spec.replicas; a fixed value would fight it"


def test_service_selects_the_pods_on_the_named_port(dev: list[dict[str, Any]]) -> None:
    deployment, service = one(dev, "Deployment"), one(dev, "Service")
    assert selects(service["spec"]["selector"], pod_labels(deployment))
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert port["targetPort"] in container_ports
    assert service["spec"]["type"] == "ClusterIP"


def test_service_monitor_selects_the_service_and_its_named_port(prod: list[dict[str, Any]]) -> None:
    monitor = one(prod, "ServiceMonitor")
    services = find(prod, "Service")
    assert len(services) == 2
    for service in services:  # stable and canary are both scraped
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}


def test_probes_on_the_v2_health_routes(dev: list[dict[str, Any]]) -> None:
    c = container(dev[[o["kind"] for o in dev].index("Deployment")])
    ports = {p["name"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    # The startup budget must cover a slow model load before liveness may kill the pod.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 60


def test_restricted_security_context_and_writable_paths(dev: list[dict[str, Any]]) -> None:
    deployment = one(dev, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    sc = c["securityContext"]
    assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == one(dev, "ServiceAccount")["metadata"]["name"]
    # Read-only root: every path the server writes is an emptyDir, and the metrics dir is one of them.
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/tmp"] in empty_dirs
    assert mounts[env_of(deployment)["PROMETHEUS_MULTIPROC_DIR"]] in empty_dirs
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["priorityClassName"] == "dlstack-model-serving"


def test_grace_period_covers_prestop_and_gunicorn_drain(dev: list[dict[str, Any]]) -> None:
    deployment = one(dev, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    env = env_of(deployment)
    prestop = container(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = int(env["DLSTACK_DRAIN_SECONDS"]) + int(env["DLSTACK_GRACEFUL_TIMEOUT"])
    assert prestop >= 1
    assert spec["terminationGracePeriodSeconds"] > prestop + drain  # a margin, or SIGKILL cuts the drain


def test_server_reads_every_env_var_we_set(dev: list[dict[str, Any]]) -> None:
    env = env_of(one(dev, "Deployment"))
    fields = {ServerSettings.env_name(f) for f in ServerSettings.model_fields}
    unknown = [k for k in env if k.startswith("DLSTACK_") and k not in fields]
    assert not unknown, f"the model server has no setting for {unknown}"
    settings = ServerSettings.from_env({**env, "DLSTACK_ARTIFACT_DIR": "/model"})
    assert settings.bind == "0.0.0.0:8080" and settings.workers == 2 and settings.cpu_limit == 2.0
    assert (settings.graceful_timeout, settings.drain_seconds) == (25, 0)
    # Nothing set in the args: model.yaml `serving` and the server's defaults decide, so nothing is written.
    unset = ("max_batch_size", "max_batch_time_ms", "max_body_bytes", "prediction_log_sample", "drift_sample")
    for field in (*unset, "drift_max_rows_per_s"):
        assert ServerSettings.env_name(field) not in env, field


def test_args_that_are_set_reach_the_pod_env_under_the_settings_names() -> None:
    env = env_of(
        one(
            render(
                max_batch_size=16,
                max_batch_time_ms=0.5,
                max_body_bytes=4096,
                prediction_log_sample=0.01,
                prediction_log_max_bytes=512,
                drift_sample=0.1,
                drift_max_rows_per_s=40,
            ),
            "Deployment",
        )
    )
    settings = ServerSettings.from_env({**env, "DLSTACK_ARTIFACT_DIR": "/model"})
    assert (settings.max_batch_size, settings.max_batch_time_ms, settings.max_body_bytes) == (16, 0.5, 4096)
    assert (settings.prediction_log_sample, settings.prediction_log_max_bytes) == (0.01, 512)
    assert (settings.drift_sample, settings.drift_max_rows_per_s) == (0.1, 40)
    assert env["DLSTACK_MAX_BATCH_SIZE"] == "16" and env["DLSTACK_PREDICTION_LOG_SAMPLE"] == "0.01"


def test_network_policy_admits_only_ingress_controller_and_prometheus(dev: list[dict[str, Any]]) -> None:
    policy, deployment = one(dev, "NetworkPolicy"), one(dev, "Deployment")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(deployment))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    namespaces = []
    for rule in policy["spec"]["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": "http"}]
        (peer,) = rule["from"]
        assert peer["podSelector"]["matchLabels"], "a bare namespace selector would admit every pod there"
        namespaces.append(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    assert sorted(namespaces) == ["ingress", "monitoring"]


def test_ingress_rewrites_models_prefix_to_server_root(dev: list[dict[str, Any]]) -> None:
    ingress, service = one(dev, "Ingress"), one(dev, "Service")
    annotations = ingress["metadata"]["annotations"]
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"]["name"] == service["metadata"]["name"]
    assert path["backend"]["service"]["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert annotations["nginx.ingress.kubernetes.io/use-regex"] == "true"
    # Apply the regex and rewrite the way ingress-nginx does (PCRE groups, $N in rewrite-target).
    pattern, target = re.compile("^" + path["path"]), annotations["nginx.ingress.kubernetes.io/rewrite-target"]
    cases = {
        "/models/mnist-mlp/v2/health/ready": "/v2/health/ready",
        "/models/mnist-mlp": "/",
        "/models/mnist-mlp/": "/",
    }
    for url, expected in cases.items():
        m = pattern.match(url)
        assert m, url
        assert m.expand(target.replace("$", "\\")) == expected
    assert not pattern.match("/models/mnist-mlpx/v2"), "the prefix must not capture other models"


def test_canary_deployment_and_weighted_ingress(prod: list[dict[str, Any]]) -> None:
    stable, canary = one(prod, "Deployment", "mnist-mlp"), one(prod, "Deployment", "mnist-mlp-canary")
    assert container(canary)["image"].endswith("cd" * 32) and pod_labels(canary)["app.kubernetes.io/version"] == "2"
    assert canary["spec"]["replicas"] == 2
    service, canary_service = one(prod, "Service", "mnist-mlp"), one(prod, "Service", "mnist-mlp-canary")
    assert selects(service["spec"]["selector"], pod_labels(stable))
    assert not selects(service["spec"]["selector"], pod_labels(canary)), "stable traffic must not reach the canary"
    assert selects(canary_service["spec"]["selector"], pod_labels(canary))
    main, weighted = one(prod, "Ingress", "mnist-mlp"), one(prod, "Ingress", "mnist-mlp-canary")
    annotations = weighted["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/canary"] == "true"
    assert annotations["nginx.ingress.kubernetes.io/canary-weight"] == "25"
    assert "nginx.ingress.kubernetes.io/canary" not in main["metadata"]["annotations"]
    # ingress-nginx pairs a canary with the main Ingress of the same host and path.
    rule, canary_rule = main["spec"]["rules"][0], weighted["spec"]["rules"][0]
    assert canary_rule["host"] == rule["host"] == "mnist-mlp.models.example"
    assert canary_rule["http"]["paths"][0]["path"] == rule["http"]["paths"][0]["path"]
    assert canary_rule["http"]["paths"][0]["backend"]["service"]["name"] == "mnist-mlp-canary"
    assert main["spec"]["tls"] == [
        {"hosts": ["mnist-mlp.models.example"], "secretName": "mnist-mlp.models.example-tls"}
    ]


def test_pdbs_select_their_own_pods(prod: list[dict[str, Any]]) -> None:
    stable, canary = one(prod, "Deployment", "mnist-mlp"), one(prod, "Deployment", "mnist-mlp-canary")
    pdb, canary_pdb = (
        one(prod, "PodDisruptionBudget", "mnist-mlp"),
        one(prod, "PodDisruptionBudget", "mnist-mlp-canary"),
    )
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(stable))
    assert not selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(canary))
    assert selects(canary_pdb["spec"]["selector"]["matchLabels"], pod_labels(canary))


def test_gpu_requests_and_tolerations_only_when_asked(dev: list[dict[str, Any]], prod: list[dict[str, Any]]) -> None:
    cpu_only = one(dev, "Deployment")
    assert "nvidia.com/gpu" not in container(cpu_only)["resources"]["limits"]
    assert "tolerations" not in cpu_only["spec"]["template"]["spec"]
    gpu = one(prod, "Deployment", "mnist-mlp")
    resources = container(gpu)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    tolerations = gpu["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_resources_requests_and_derived_limits(dev: list[dict[str, Any]]) -> None:
    resources = container(one(dev, "Deployment"))["resources"]
    assert resources["requests"] == {"cpu": "1", "memory": "1Gi"}
    assert resources["limits"] == {"cpu": "2000m", "memory": "1Gi"}  # 2 x CPU request, memory not overcommitted
    assert env_of(one(dev, "Deployment"))["DLSTACK_CPU_LIMIT"] == "2000m"


def test_topology_spread_in_prod_only(dev: list[dict[str, Any]], prod: list[dict[str, Any]]) -> None:
    assert "topologySpreadConstraints" not in one(dev, "Deployment")["spec"]["template"]["spec"]
    stable = one(prod, "Deployment", "mnist-mlp")
    constraints = stable["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for c in constraints:
        assert selects(c["labelSelector"]["matchLabels"], pod_labels(stable))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "need 1 <= min <= max"),
        ({"cpu": "2 cores"}, 'cpu "2 cores" is not a Kubernetes quantity'),
        ({"canary": CanaryArgs(image="r/m@sha256:" + "0" * 64, model_version="2", weight=150)}, "canary.weight 150"),
        ({"canary": CanaryArgs(image="r/m:2", model_version="1")}, "equals the stable version"),
        ({"run_as_user": 0}, "run_as_user 0 must be a non-root UID"),
        ({"cpu": "1Gi"}, 'cpu "1Gi" is not a CPU quantity'),
        ({"max_batch_size": 0}, "DLSTACK_MAX_BATCH_SIZE='0' is out of range; set it to a whole number >= 1"),
        ({"drift_sample": 1.5}, "DLSTACK_DRIFT_SAMPLE='1.5' is out of range; set it to a number between 0 and 1"),
        ({"graceful_timeout_s": 0}, "DLSTACK_GRACEFUL_TIMEOUT='0' is out of range; set it to a whole number >= 1"),
    ],
)
def test_bad_args_fail_before_anything_is_created(kw: dict[str, Any], message: str) -> None:
    created: list[Any] = []

    def program() -> None:
        args = ModelServiceArgs(image="r/m:1", model_version="1", **kw)
        created.append(ModelService("mnist-mlp", args))

    with pytest.raises(UserError, match=re.escape(message)):
        record(program)
    assert not created


def test_image_may_be_an_output_known_after_the_build() -> None:
    """The program passes ModelImage.ref, a digest only known once the image is pushed."""
    digest = "sha256:" + "12" * 32

    def program() -> None:
        image = pulumi.Output.concat("registry.local/mnist-mlp", "@", pulumi.Output.from_input(digest))
        canary = CanaryArgs(image=pulumi.Output.concat("registry.local/mnist-mlp@", digest), model_version="2")
        ModelService("mnist-mlp", ModelServiceArgs(image=image, model_version="1", min_replicas=2, canary=canary))

    objs = manifests(record(program))
    stable, canary = one(objs, "Deployment", "mnist-mlp"), one(objs, "Deployment", "mnist-mlp-canary")
    assert container(stable)["image"] == f"registry.local/mnist-mlp@{digest}"
    assert container(canary)["image"] == f"registry.local/mnist-mlp@{digest}"
    # The canary of an HA service is HA too: 2 replicas and its own PDB unless told otherwise.
    assert canary["spec"]["replicas"] == 2
    assert one(objs, "PodDisruptionBudget", "mnist-mlp-canary")


def test_bad_name_is_rejected_with_the_rule() -> None:
    with pytest.raises(UserError, match="DNS-1123"):
        ModelServiceArgs(image="r/m:1", model_version="1").validate("Mnist_MLP")
