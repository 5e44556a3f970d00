"""``ModelService``: one model served on Kubernetes by the dlstack model server.

It creates a hardened Deployment (and a ServiceAccount), then calls its own helpers, each of which
returns what it creates (cdk8s-plus style): ``expose_via_service``, ``autoscale`` (CPU) or
``autoscale_on_load`` (KEDA, when ``load_autoscaling`` is set; never both),
``add_disruption_budget``, ``monitor``, ``restrict_ingress``, ``expose_via_ingress`` and
``add_canary``. Every object carries an explicit ``metadata.name`` and the recommended
``app.kubernetes.io/*`` labels.

Drain arithmetic (why ``terminationGracePeriodSeconds`` is what it is): on deletion the pod is
removed from the Service endpoints while the preStop hook sleeps ``prestop_seconds`` (so the
ingress controller and kube-proxy stop sending new requests); only then does the kubelet send
SIGTERM. The server then keeps serving for ``drain_seconds`` with readiness 503 (0 by default: the
preStop sleep already did that) and gunicorn finishes in-flight requests for up to
``graceful_timeout_s``. The grace period is
``prestop_seconds + drain_seconds + graceful_timeout_s + drain_margin_s`` (defaults 5 + 0 + 25 + 5 =
35 s), so SIGKILL never cuts a request that gunicorn was still allowed to finish.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra.autoscaling import LoadAutoscaling, ScaledObject, ScaledObjectArgs
from infra.cluster_baseline import INGRESS_CONTROLLER, PRIORITY_MODELS, PROMETHEUS
from services.serving import names
from services.serving.errors import UserError
from services.serving.server.settings import ServerSettings

_QUANTITY = re.compile(r"^(\d+(\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_CPU = re.compile(r"^(\d+(\.\d+)?|\.\d+)(m?)$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

COMPONENT = "model-server"
HTTP_PORT_NAME = "http"
LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"
METRICS_DIR = "/tmp/metrics"  # PROMETHEUS_MULTIPROC_DIR as in the image; a memory-backed emptyDir
TRACK_LABEL = "dlstack.io/track"  # "stable" or "canary": keeps the two Deployments' selectors apart
ALLOW_LB_ANNOTATION = "dlstack.io/allow-load-balancer"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _k(obj: Any) -> Any:
    """Plain camelCase dicts go to pulumi-kubernetes as they are; this keeps mypy off their TypedDicts."""
    return obj


@dataclass(frozen=True)
class CanaryArgs:
    """A second version taking ``weight`` percent of the ingress traffic."""

    image: pulumi.Input[str]  # required; full image reference of the canary, e.g. ModelImage.ref (repo@sha256:...)
    model_version: str  # required; the canary's model version (label app.kubernetes.io/version)
    weight: int = 10  # default 10; percent of requests routed to the canary (0-100)
    replicas: int | None = None  # default None = 2 when the stable min is >= 2 (prod HA), else 1; not autoscaled


@dataclass(frozen=True)
class ModelServiceArgs:
    """How to serve one model. ``name`` of the component names every object."""

    image: pulumi.Input[str]  # required; full image reference, e.g. ModelImage.ref (repo@sha256:<digest>)
    model_version: str  # required; label app.kubernetes.io/version and the server's model version
    framework: str = "pytorch"  # default pytorch; informational label dlstack.io/framework
    namespace: str = "models"  # default models; must exist (cluster baseline)
    min_replicas: int = 1  # default 1; HPA minReplicas (a PDB is added from 2)
    max_replicas: int = 3  # default 3; HPA maxReplicas
    target_cpu_percent: int = 70  # default 70 %; HPA CPU utilization target (of the request)
    cpu: str = "1"  # default 1 core; CPU request
    memory: str = "1Gi"  # default 1Gi; memory request
    cpu_limit: str | None = None  # default = 2 x cpu; CPU limit
    memory_limit: str | None = None  # default = memory; memory limit (no overcommit)
    workers: int = 2  # default 2; gunicorn worker processes (DLSTACK_WORKERS)
    threads: int | None = None  # default None = CPU limit / workers (server); intra-op threads per worker
    http_threads: int | None = None  # default None = server decides (4); threads for the Flask routes per worker
    # None = not written to the pod: the server's default (ServerSettings), for these four model.yaml `serving`
    max_batch_size: int | None = None  # default None = model.yaml (auto: 8 rows for a variable batch dim, else 1)
    max_batch_time_ms: float | None = None  # default None = model.yaml (2 ms); how long a batch may wait to fill
    max_body_bytes: int | None = None  # default None = model.yaml (16 MiB); request body limit in bytes
    prediction_log_sample: float | None = None  # default None = off; fraction of requests in the prediction log
    prediction_log_max_bytes: int | None = None  # default None = server default (4096); bytes per logged event
    drift_sample: float | None = None  # default None = off; fraction of requests binned for drift
    drift_max_rows_per_s: float | None = None  # default None = server default (20); rows binned per s per replica
    gpu_count: int = 0  # default 0 = CPU only; GPUs per replica (limit on gpu_resource)
    gpu_resource: str = "nvidia.com/gpu"  # default nvidia.com/gpu; extended resource name
    gpu_tolerations: tuple[dict[str, str], ...] = (GPU_TOLERATION,)  # default tolerate the nvidia.com/gpu taint
    priority_class_name: str | None = PRIORITY_MODELS  # default dlstack-model-serving (cluster baseline); None = none
    topology_spread: bool = False  # default False; True (prod) spreads pods over zones and nodes
    port: int = 8080  # default 8080; container and Service port, also serves /metrics
    run_as_user: int = 10001  # default 10001; numeric non-root UID/GID the image is built for
    prestop_seconds: int = 5  # default 5 s; endpoint removal propagation before SIGTERM
    drain_seconds: int = 0  # default 0 s; server keeps serving with readiness 503 after SIGTERM (preStop does it)
    graceful_timeout_s: int = 25  # default 25 s; gunicorn graceful_timeout (DLSTACK_GRACEFUL_TIMEOUT)
    drain_margin_s: int = 5  # default 5 s; slack on top of the drain before SIGKILL
    tmp_size: str = "256Mi"  # default 256Mi; emptyDir size limit for /tmp (root FS is read-only)
    ingress_host: str | None = None  # default None = any host; e.g. mnist-mlp.dlstack.localtest.me
    ingress_class_name: str = "nginx"  # default nginx; IngressClass of ingress-nginx
    ingress_tls_secret: str | None = None  # default None = plain HTTP; TLS secret for ingress_host
    proxy_body_size: str = "16m"  # default 16m; ingress-nginx body limit (server's max_body_bytes)
    ingress_namespace: str = "ingress"  # default ingress; namespace of the ingress-nginx controller
    ingress_pod_labels: dict[str, str] = field(  # default ingress-nginx controller pods
        default_factory=lambda: dict(INGRESS_CONTROLLER)
    )
    monitoring_namespace: str = "monitoring"  # default monitoring; namespace of Prometheus
    prometheus_pod_labels: dict[str, str] = field(  # default kube-prometheus-stack Prometheus pods
        default_factory=lambda: dict(PROMETHEUS)
    )
    extra_env: dict[str, str] = field(default_factory=dict)  # default none; more env for the server
    canary: CanaryArgs | None = None  # default None; see add_canary
    load_autoscaling: LoadAutoscaling | None = None  # default None = CPU HPA; set: a KEDA ScaledObject instead

    def server_env(self) -> dict[str, str]:
        """The pod's ``DLSTACK_*`` env: names and parsing from ``ServerSettings``; unset (None) is left out."""
        return ServerSettings.to_env(
            bind=f"0.0.0.0:{self.port}",
            workers=self.workers,
            # The cgroup limit is also readable, but an explicit value keeps the layout reproducible.
            cpu_limit=self.effective_cpu_limit,
            max_batch_size=self.max_batch_size,
            max_batch_time_ms=self.max_batch_time_ms,
            max_body_bytes=self.max_body_bytes,
            graceful_timeout=self.graceful_timeout_s,
            drain_seconds=self.drain_seconds,
            http_threads=self.http_threads,
            intra_op_threads=self.threads,
            prediction_log_sample=self.prediction_log_sample,
            prediction_log_max_bytes=self.prediction_log_max_bytes,
            drift_sample=self.drift_sample,
            drift_max_rows_per_s=self.drift_max_rows_per_s,
        )

    @property
    def termination_grace_seconds(self) -> int:
        return self.prestop_seconds + self.drain_seconds + self.graceful_timeout_s + self.drain_margin_s

    @property
    def effective_cpu_limit(self) -> str:
        if self.cpu_limit is not None:
            return self.cpu_limit
        return f"{round(_cores(self.cpu) * 2000)}m"

    def validate(self, name: str) -> None:
        """Raise ``UserError`` naming every bad field and its fix; nothing is created before this passes."""
        problems: list[str] = []
        if not names.matches(names.DNS_LABEL, name):
            problems.append(f'name "{name}" is not a DNS-1123 label (lower-case letters, digits, "-"; at most 63)')
        elif len(name) > 56:  # "-canary" is appended to canary objects
            problems.append(f'name "{name}" is longer than 56 characters; shorten it (canary objects add "-canary")')
        if not _image_ok(self.image):
            problems.append(f'image "{self.image}" is not an image reference (e.g. "registry/mnist-mlp@sha256:...")')
        if not _LABEL_VALUE.fullmatch(self.model_version) or len(self.model_version) > 63:
            problems.append(f'model_version "{self.model_version}" is not a valid label value (e.g. "1" or "2024.1")')
        if not names.matches(names.DNS_LABEL, self.namespace):
            problems.append(f'namespace "{self.namespace}" is not a DNS-1123 label')
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            problems.append(
                f"replicas min={self.min_replicas} max={self.max_replicas}: need 1 <= min <= max; "
                "raise max or lower min"
            )
        if not 1 <= self.target_cpu_percent <= 100:
            problems.append(f"target_cpu_percent {self.target_cpu_percent} must be between 1 and 100")
        for key in ("cpu", "memory", "cpu_limit", "memory_limit", "tmp_size"):
            value = getattr(self, key)
            if value is not None and not _QUANTITY.fullmatch(str(value)):
                problems.append(f'{key} "{value}" is not a Kubernetes quantity (e.g. "500m", "2", "1Gi")')
        if self.cpu_limit is None and _QUANTITY.fullmatch(self.cpu) and not _CPU.fullmatch(self.cpu):
            problems.append(f'cpu "{self.cpu}" is not a CPU quantity (e.g. "500m" or "2"); or set cpu_limit')
        if self.workers < 1:
            problems.append(f"workers {self.workers} must be >= 1")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads {self.threads} must be >= 1 or None (server decides)")
        if self.gpu_count < 0:
            problems.append(f"gpu_count {self.gpu_count} must be >= 0 (0 = CPU only)")
        if self.run_as_user < 1:
            problems.append(f"run_as_user {self.run_as_user} must be a non-root UID (>= 1, e.g. 10001)")
        if not 1 <= self.port <= 65535:
            problems.append(f"port {self.port} is not a TCP port")
        if min(self.prestop_seconds, self.drain_seconds, self.graceful_timeout_s, self.drain_margin_s) < 0:
            problems.append("prestop_seconds, drain_seconds, graceful_timeout_s and drain_margin_s must be >= 0")
        if self.load_autoscaling is not None:
            problems += self.load_autoscaling.problems()
        if self.ingress_tls_secret and not self.ingress_host:
            problems.append("ingress_tls_secret needs ingress_host (TLS certificates name a host)")
        if self.canary is not None:
            c = self.canary
            if not 0 <= c.weight <= 100:
                problems.append(f"canary.weight {c.weight} must be between 0 and 100 (a percentage)")
            if c.replicas is not None and c.replicas < 1:
                problems.append(f"canary.replicas {c.replicas} must be >= 1")
            if not _image_ok(c.image):
                problems.append(f'canary.image "{c.image}" is not an image reference')
            if not _LABEL_VALUE.fullmatch(c.model_version) or len(c.model_version) > 63:
                problems.append(f'canary.model_version "{c.model_version}" is not a valid label value')
            if c.model_version == self.model_version:
                problems.append(f'canary.model_version "{c.model_version}" equals the stable version; use another one')
        if not problems:  # the checks above name the args; this catches what only the server's parsing knows
            try:
                self.server_env()
            except UserError as exc:
                problems.append(exc.message)
        if problems:
            raise UserError(f"ModelService {name}: " + "; ".join(problems))


def _image_ok(image: pulumi.Input[str]) -> bool:
    """A plain string is checked now; an Output (a digest known after the build) is trusted."""
    if not isinstance(image, str):
        return isinstance(image, pulumi.Output)
    return bool(image) and not any(c.isspace() for c in image)


def _cores(quantity: str) -> float:
    m = _CPU.fullmatch(quantity)
    if not m:
        raise UserError(f'cpu "{quantity}" is not a CPU quantity (e.g. "500m" or "2"); set cpu_limit explicitly')
    return float(m[1]) / (1000 if m[3] else 1)


class ModelService(pulumi.ComponentResource):
    """Deployment + Service + HPA (+ PDB) + ServiceMonitor + NetworkPolicy + Ingress (+ canary) for one model."""

    deployment: k8s.apps.v1.Deployment
    service_account: k8s.core.v1.ServiceAccount
    service: k8s.core.v1.Service
    hpa: k8s.autoscaling.v2.HorizontalPodAutoscaler | None
    scaled_object: ScaledObject | None
    pdb: k8s.policy.v1.PodDisruptionBudget | None
    service_monitor: k8s.apiextensions.CustomResource
    network_policy: k8s.networking.v1.NetworkPolicy
    ingress: k8s.networking.v1.Ingress
    canary_deployment: k8s.apps.v1.Deployment | None
    canary_service: k8s.core.v1.Service | None
    canary_ingress: k8s.networking.v1.Ingress | None
    canary_pdb: k8s.policy.v1.PodDisruptionBudget | None
    url_path: pulumi.Output[str]

    def __init__(self, name: str, args: ModelServiceArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        args.validate(name)
        super().__init__("dlstack:model_service:ModelService", name, None, opts)
        self.name = name
        self.args = args
        self._child = pulumi.ResourceOptions(parent=self)
        self.pdb = self.canary_pdb = None
        self.canary_deployment = self.canary_service = self.canary_ingress = None

        self.service_account = k8s.core.v1.ServiceAccount(
            f"{name}-sa",
            metadata=_k(self._meta(name)),
            automount_service_account_token=False,
            opts=self._child,
        )
        self.deployment = self._deployment(name, "stable", args.image, args.model_version, replicas=None)
        self.service = self.expose_via_service()
        # One autoscaler per Deployment: an HPA and a ScaledObject would overwrite each other's replicas.
        self.hpa, self.scaled_object = None, None
        if args.load_autoscaling is None:
            self.hpa = self.autoscale(args.min_replicas, args.max_replicas, args.target_cpu_percent)
        else:
            self.scaled_object = self.autoscale_on_load(args.load_autoscaling)
        if args.min_replicas >= 2:
            self.pdb = self.add_disruption_budget()
        self.service_monitor = self.monitor()
        self.network_policy = self.restrict_ingress()
        self.ingress = self.expose_via_ingress()
        if args.canary is not None:
            self.canary_deployment = self.add_canary(args.canary)
        self.url_path = pulumi.Output.from_input(self.path_prefix)
        self.register_outputs({"deployment": name, "service": name, "url_path": self.url_path})

    # ------------------------------------------------------------------------------------------
    # labels and metadata

    @property
    def path_prefix(self) -> str:
        return f"/models/{self.name}/"

    def selector_labels(self, track: str = "stable") -> dict[str, str]:
        """The immutable Deployment selector: never includes the version (it changes every rollout)."""
        return {
            "app.kubernetes.io/name": self.name,
            "app.kubernetes.io/instance": self.name,
            TRACK_LABEL: track,
        }

    def labels(self, version: str | None = None, track: str | None = None) -> dict[str, str]:
        out = {
            "app.kubernetes.io/name": self.name,
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/version": version or self.args.model_version,
            "app.kubernetes.io/component": COMPONENT,
            "app.kubernetes.io/part-of": "dlstack",
            "app.kubernetes.io/managed-by": "pulumi",
        }
        if track:
            out[TRACK_LABEL] = track
        return out

    def _meta(
        self,
        obj_name: str,
        *,
        version: str | None = None,
        track: str | None = None,
        annotations: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": obj_name,
            "namespace": self.args.namespace,
            "labels": self.labels(version, track),
        }
        if annotations:
            meta["annotations"] = annotations
        return meta

    # ------------------------------------------------------------------------------------------
    # the pods

    def _env(self) -> list[dict[str, Any]]:
        """What the server reads (``ServerSettings``, see ``ModelServiceArgs.server_env``) plus the metrics dir."""
        a = self.args
        env = {**a.server_env(), "PROMETHEUS_MULTIPROC_DIR": METRICS_DIR, **a.extra_env}
        return [{"name": k, "value": v} for k, v in env.items()]

    def _resources(self) -> dict[str, Any]:
        a = self.args
        requests: dict[str, str] = {"cpu": a.cpu, "memory": a.memory}
        limits: dict[str, str] = {"cpu": a.effective_cpu_limit, "memory": a.memory_limit or a.memory}
        if a.gpu_count:
            # Extended resources are not overcommitted: request == limit.
            requests[a.gpu_resource] = str(a.gpu_count)
            limits[a.gpu_resource] = str(a.gpu_count)
        return {"requests": requests, "limits": limits}

    def _probe(self, path: str, *, period: int, failures: int, timeout: int = 2) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": HTTP_PORT_NAME},
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": failures,
        }

    def pod_spec(self, image: pulumi.Input[str], track: str) -> dict[str, Any]:
        """The restricted pod: non-root numeric UID, no privilege escalation, no capabilities, read-only root."""
        a = self.args
        container: dict[str, Any] = {
            "name": COMPONENT,
            "image": image,
            # With a digest this only re-checks the manifest; with a dev tag it picks up rebuilds.
            "imagePullPolicy": "Always",
            "ports": [{"name": HTTP_PORT_NAME, "containerPort": a.port, "protocol": "TCP"}],
            "env": self._env(),
            "resources": self._resources(),
            # Startup: up to 2 s x 60 = 120 s to import the framework and load the model.
            "startupProbe": self._probe(READY_PATH, period=2, failures=60),
            "livenessProbe": self._probe(LIVE_PATH, period=10, failures=3),
            "readinessProbe": self._probe(READY_PATH, period=5, failures=2),
            "lifecycle": {"preStop": {"sleep": {"seconds": a.prestop_seconds}}},
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": a.run_as_user,
                "runAsGroup": a.run_as_user,
                "allowPrivilegeEscalation": False,
                "privileged": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": [
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "metrics", "mountPath": METRICS_DIR},
            ],
        }
        spec: dict[str, Any] = {
            "serviceAccountName": self.name,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": a.termination_grace_seconds,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": a.run_as_user,
                "runAsGroup": a.run_as_user,
                "fsGroup": a.run_as_user,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [
                {"name": "tmp", "emptyDir": {"sizeLimit": a.tmp_size}},
                # Memory-backed: the multiprocess metric files are small and rewritten constantly.
                {"name": "metrics", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            ],
        }
        if a.priority_class_name:
            spec["priorityClassName"] = a.priority_class_name
        if a.gpu_count:
            spec["tolerations"] = [dict(t) for t in a.gpu_tolerations]
        if a.topology_spread:
            selector = {"matchLabels": self.selector_labels(track)}
            spec["topologySpreadConstraints"] = [
                {
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": selector,
                    "matchLabelKeys": ["pod-template-hash"],
                },
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "DoNotSchedule",
                    "labelSelector": selector,
                    "matchLabelKeys": ["pod-template-hash"],
                },
            ]
        return spec

    def _deployment(
        self, obj_name: str, track: str, image: pulumi.Input[str], version: str, replicas: int | None
    ) -> k8s.apps.v1.Deployment:
        spec: dict[str, Any] = {
            "selector": {"matchLabels": self.selector_labels(track)},
            "revisionHistoryLimit": 5,
            # Surge only: capacity never drops below the current replica count during a rollout.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": self.labels(version, track),
                    "annotations": {"kubectl.kubernetes.io/default-container": COMPONENT},
                },
                "spec": self.pod_spec(image, track),
            },
        }
        # The stable Deployment leaves spec.replicas to the HPA (an explicit value would be reset on
        # every `pulumi up` and fight the autoscaler); it starts at 1 and the HPA raises it to min.
        if replicas is not None:
            spec["replicas"] = replicas
        return k8s.apps.v1.Deployment(
            f"{obj_name}-deployment",
            metadata=_k(self._meta(obj_name, version=version, track=track)),
            spec=_k(spec),
            opts=self._child,
        )

    # ------------------------------------------------------------------------------------------
    # helpers that return what they create

    def expose_via_service(self, track: str = "stable") -> k8s.core.v1.Service:
        """A ClusterIP Service for the ``track`` pods on the named port ``http`` (also the metrics port)."""
        obj_name = self.name if track == "stable" else f"{self.name}-{track}"
        version = self.args.model_version
        if track == "canary" and self.args.canary is not None:
            version = self.args.canary.model_version
        return k8s.core.v1.Service(
            f"{obj_name}-service",
            metadata=_k(self._meta(obj_name, version=version, track=track)),
            spec=_k(
                {
                    "type": "ClusterIP",
                    "selector": self.selector_labels(track),
                    "ports": [
                        {
                            "name": HTTP_PORT_NAME,
                            "port": self.args.port,
                            "targetPort": HTTP_PORT_NAME,
                            "protocol": "TCP",
                        }
                    ],
                }
            ),
            opts=self._child,
        )

    def autoscale(
        self, min_replicas: int, max_replicas: int, target_cpu_percent: int
    ) -> k8s.autoscaling.v2.HorizontalPodAutoscaler:
        """An autoscaling/v2 HPA on CPU utilization of the stable Deployment."""
        return k8s.autoscaling.v2.HorizontalPodAutoscaler(
            f"{self.name}-hpa",
            metadata=_k(self._meta(self.name)),
            spec=_k(
                {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": self.name},
                    "minReplicas": min_replicas,
                    "maxReplicas": max_replicas,
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {"type": "Utilization", "averageUtilization": target_cpu_percent},
                            },
                        }
                    ],
                }
            ),
            opts=self._child,
        )

    def autoscale_on_load(self, load: LoadAutoscaling) -> ScaledObject:
        """A KEDA ScaledObject on the stable pods' request load (infra/autoscaling.py), in place of ``autoscale``."""
        a = self.args
        args = ScaledObjectArgs(
            deployment=self.name,
            namespace=a.namespace,
            model=self.name,
            job=self.name,  # the stable Service; the canary's pods are job "<name>-canary"
            min_replicas=a.min_replicas,
            max_replicas=a.max_replicas,
            load=load,
            labels=self.labels(),
        )
        return ScaledObject(f"{self.name}-scaledobject", args, self._child)

    def add_disruption_budget(
        self, track: str = "stable", max_unavailable: int = 1
    ) -> k8s.policy.v1.PodDisruptionBudget:
        """At most ``max_unavailable`` of the ``track`` pods evicted at once (node drains, cluster upgrades)."""
        obj_name = self.name if track == "stable" else f"{self.name}-{track}"
        return k8s.policy.v1.PodDisruptionBudget(
            f"{obj_name}-pdb",
            metadata=_k(self._meta(obj_name, track=track)),
            spec=_k({"maxUnavailable": max_unavailable, "selector": {"matchLabels": self.selector_labels(track)}}),
            opts=self._child,
        )

    def monitor(self, interval: str = "15s") -> k8s.apiextensions.CustomResource:
        """A ServiceMonitor scraping ``/metrics`` on the named port of the stable and canary Services."""
        return k8s.apiextensions.CustomResource(
            f"{self.name}-servicemonitor",
            api_version="monitoring.coreos.com/v1",
            kind="ServiceMonitor",
            metadata=_k(self._meta(self.name)),
            spec={
                "selector": {
                    "matchLabels": {
                        "app.kubernetes.io/name": self.name,
                        "app.kubernetes.io/instance": self.name,
                        "app.kubernetes.io/component": COMPONENT,
                    }
                },
                "namespaceSelector": {"matchNames": [self.args.namespace]},
                "endpoints": [{"port": HTTP_PORT_NAME, "path": METRICS_PATH, "interval": interval, "scheme": "http"}],
            },
            opts=self._child,
        )

    def restrict_ingress(self) -> k8s.networking.v1.NetworkPolicy:
        """Only the ingress controller and Prometheus may connect, and only to the http port."""
        a = self.args

        def peer(namespace: str, pod_labels: dict[str, str]) -> dict[str, Any]:
            return {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "podSelector": {"matchLabels": dict(pod_labels)},
            }

        port = [{"protocol": "TCP", "port": HTTP_PORT_NAME}]
        return k8s.networking.v1.NetworkPolicy(
            f"{self.name}-netpol",
            metadata=_k(self._meta(self.name)),
            spec=_k(
                {
                    "podSelector": {
                        "matchLabels": {"app.kubernetes.io/name": self.name, "app.kubernetes.io/instance": self.name}
                    },
                    "policyTypes": ["Ingress"],
                    "ingress": [
                        {"from": [peer(a.ingress_namespace, a.ingress_pod_labels)], "ports": port},
                        {"from": [peer(a.monitoring_namespace, a.prometheus_pod_labels)], "ports": port},
                    ],
                }
            ),
            opts=self._child,
        )

    def _ingress_spec(self, service_name: str) -> dict[str, Any]:
        a = self.args
        rule: dict[str, Any] = {
            "http": {
                "paths": [
                    {
                        # /models/<name>/v2/... -> /v2/... on the server ($2 of the regex).
                        "path": f"/models/{self.name}(/|$)(.*)",
                        "pathType": "ImplementationSpecific",
                        "backend": {"service": {"name": service_name, "port": {"name": HTTP_PORT_NAME}}},
                    }
                ]
            }
        }
        if a.ingress_host:
            rule["host"] = a.ingress_host
        spec: dict[str, Any] = {"ingressClassName": a.ingress_class_name, "rules": [rule]}
        if a.ingress_tls_secret and a.ingress_host:
            spec["tls"] = [{"hosts": [a.ingress_host], "secretName": a.ingress_tls_secret}]
        return spec

    def _ingress_annotations(self) -> dict[str, str]:
        return {
            "nginx.ingress.kubernetes.io/use-regex": "true",
            "nginx.ingress.kubernetes.io/rewrite-target": "/$2",
            "nginx.ingress.kubernetes.io/proxy-body-size": self.args.proxy_body_size,
        }

    def expose_via_ingress(self) -> k8s.networking.v1.Ingress:
        """``/models/<name>/`` on the ingress-nginx controller, rewritten to the server root."""
        return k8s.networking.v1.Ingress(
            f"{self.name}-ingress",
            metadata=_k(self._meta(self.name, annotations=self._ingress_annotations())),
            spec=_k(self._ingress_spec(self.name)),
            opts=self._child,
        )

    def add_canary(self, canary: CanaryArgs) -> k8s.apps.v1.Deployment:
        """A second Deployment + Service for ``canary``, and an ingress-nginx canary Ingress taking ``weight`` %."""
        obj_name = f"{self.name}-canary"
        replicas = canary.replicas if canary.replicas is not None else (2 if self.args.min_replicas >= 2 else 1)
        deployment = self._deployment(obj_name, "canary", canary.image, canary.model_version, replicas=replicas)
        self.canary_service = self.expose_via_service("canary")
        annotations = {
            **self._ingress_annotations(),
            "nginx.ingress.kubernetes.io/canary": "true",
            "nginx.ingress.kubernetes.io/canary-weight": str(canary.weight),
        }
        self.canary_ingress = k8s.networking.v1.Ingress(
            f"{obj_name}-ingress",
            metadata=_k(self._meta(obj_name, version=canary.model_version, track="canary", annotations=annotations)),
            spec=_k(self._ingress_spec(obj_name)),
            opts=self._child,
        )
        if replicas >= 2:  # a PodDisruptionBudget for the canary too, so prod HA holds for both tracks
            self.canary_pdb = self.add_disruption_budget("canary")
        return deployment
