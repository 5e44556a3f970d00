"""``ClusterBaseline``: what every dlstack cluster needs before any model runs.

Namespaces (Pod Security admission labels), the models namespace's ResourceQuota and LimitRange,
PriorityClasses, default-deny NetworkPolicies plus exactly the flows the stack uses (``FLOWS``),
and the pinned cluster add-ons: ingress-nginx, metrics-server (the HPA's CPU metrics), only
when a model asks for GPUs the NVIDIA device plugin, and only when a model autoscales on load KEDA
(in its own namespace; its operator queries Prometheus, the one flow it adds to ``FLOWS``).

Network flows are data, not code: ``flows(args)`` returns the table, and every allowed connection
becomes an egress rule on the client side and an ingress rule on the server side (one
NetworkPolicy each), so the two ends can never disagree and a review reads one table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra.helm import helm_release
from services.serving.errors import UserError

# Well-known pod labels of the charts/operators the stack installs (set by those charts, not by us).
INGRESS_CONTROLLER = {"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"}
MODEL_SERVER = {"app.kubernetes.io/component": "model-server"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
ALERTMANAGER = {"app.kubernetes.io/name": "alertmanager"}
GRAFANA = {"app.kubernetes.io/name": "grafana"}
KUBE_STATE_METRICS = {"app.kubernetes.io/name": "kube-state-metrics"}
PROMETHEUS_OPERATOR = {"app": "kube-prometheus-stack-operator"}
# ECK labels every pod it manages with its type, whatever the resource's name.
ELASTICSEARCH = {"common.k8s.elastic.co/type": "elasticsearch"}
KIBANA = {"common.k8s.elastic.co/type": "kibana"}
LOGSTASH = {"common.k8s.elastic.co/type": "logstash"}
FILEBEAT = {"common.k8s.elastic.co/type": "beat"}
ECK_OPERATOR = {"control-plane": "elastic-operator"}
LOGGING_SETUP = {"app.kubernetes.io/component": "logging-setup"}  # infra.logging's ILM/saved-objects Jobs
KUBE_DNS = {"k8s-app": "kube-dns"}
KEDA_OPERATOR = {"app.kubernetes.io/name": "keda-operator"}  # the pod that runs the scalers' queries

PRIORITY_MODELS = "dlstack-model-serving"
PRIORITY_PLATFORM = "dlstack-platform"


def _k(obj: Any) -> Any:
    """Plain camelCase dicts go to pulumi-kubernetes as they are (one serialization, no Output per field)."""
    return obj


@dataclass(frozen=True)
class Peer:
    """One end of a flow: pods in a namespace, or addresses outside the pod network (``cidr``)."""

    name: str  # short name used in policy names, e.g. "prometheus"
    namespace: str | None = None  # None = not a pod (``cidr``)
    pods: dict[str, str] = field(default_factory=dict)  # pod label selector; {} = every pod in the namespace
    cidr: str | None = None  # for non-pod peers: the API server, nodes, the internet


@dataclass(frozen=True)
class Port:
    port: int  # TCP/UDP port number
    protocol: str = "TCP"  # TCP | UDP


@dataclass(frozen=True)
class Flow:
    """An allowed connection ``src`` -> ``dst`` on ``ports``; ``why`` ends up as an annotation."""

    name: str  # DNS-1123 fragment, unique: names the two NetworkPolicies
    src: Peer
    dst: Peer
    ports: tuple[Port, ...]
    why: str


@dataclass(frozen=True)
class Namespaces:
    models: str = "models"  # default models
    logging: str = "logging"  # default logging
    monitoring: str = "monitoring"  # default monitoring
    ingress: str = "ingress"  # default ingress

    def all(self) -> tuple[str, str, str, str]:
        return (self.models, self.logging, self.monitoring, self.ingress)


@dataclass(frozen=True)
class ModelQuota:
    """The models namespace's budget: sized from the models' maximum scale, not guessed."""

    requests_cpu: str = "8"  # default 8 cores; sum of CPU requests
    requests_memory: str = "16Gi"  # default 16Gi; sum of memory requests
    limits_cpu: str = "16"  # default 16 cores; sum of CPU limits
    limits_memory: str = "16Gi"  # default 16Gi; sum of memory limits
    pods: int = 20  # default 20; pod count
    gpus: int = 0  # default 0; nvidia.com/gpu requests (0 = no GPU quota line)
    max_container_cpu: str = "4"  # default 4 cores; LimitRange max per container
    max_container_memory: str = "8Gi"  # default 8Gi; LimitRange max per container


@dataclass(frozen=True)
class ClusterBaselineArgs:
    namespaces: Namespaces = Namespaces()
    kubernetes_version: str = "1.31"  # default 1.31; pins the Pod Security standard version
    quota: ModelQuota = ModelQuota()
    model_port: int = 8080  # default 8080; model server HTTP port (also /metrics)
    ha: bool = False  # default False; True (prod): 2+ controller replicas, PDBs, spread
    ingress_replicas: int = 1  # default 1; ingress-nginx controller replicas
    ingress_class_name: str = "nginx"  # default nginx; IngressClass the chart creates
    kind: bool = True  # default True; dev on kind: hostPorts 80/443 on the ingress-ready node
    gpu: bool = False  # default False; True installs the NVIDIA device plugin
    keda: bool = False  # default False; True installs KEDA (a model autoscales on load)
    keda_namespace: str = "keda"  # default keda; created with KEDA, Pod Security "restricted"
    eck_operator_namespace: str | None = None  # default = logging namespace
    prometheus_operator_namespace: str | None = None  # default = monitoring namespace
    api_server_cidr: str = "0.0.0.0/0"  # default any; narrow to the control plane's addresses when known
    node_cidr: str = "0.0.0.0/0"  # default any; node addresses (kubelet/cAdvisor, node-exporter)
    alert_receivers_cidr: str = "0.0.0.0/0"  # default any; where Alertmanager sends notifications (HTTPS)

    def validate(self) -> None:
        problems = []
        if len(set(self.namespaces.all())) != 4:
            problems.append(f"namespaces must be distinct, got {list(self.namespaces.all())}")
        if self.keda and self.keda_namespace in self.namespaces.all():
            problems.append(f'keda_namespace "{self.keda_namespace}" must differ from {list(self.namespaces.all())}')
        if self.ha and self.ingress_replicas < 2:
            problems.append(f"ha needs ingress_replicas >= 2 (got {self.ingress_replicas})")
        if not 1 <= self.model_port <= 65535:
            problems.append(f"model_port {self.model_port} is not a TCP port")
        if self.quota.pods < 1:
            problems.append("quota.pods must be >= 1")
        if problems:
            raise UserError("ClusterBaseline: " + "; ".join(problems))


def flows(args: ClusterBaselineArgs) -> list[Flow]:
    """Every connection the stack makes, and nothing else (default deny covers the rest)."""
    ns = args.namespaces
    eck_ns = args.eck_operator_namespace or ns.logging
    prom_op_ns = args.prometheus_operator_namespace or ns.monitoring
    api = Peer("apiserver", cidr=args.api_server_cidr)
    https_api = (Port(443), Port(6443))  # the kubernetes Service (443) and the control plane port (6443)
    ingress = Peer("ingress", ns.ingress, INGRESS_CONTROLLER)
    models = Peer("models", ns.models, MODEL_SERVER)
    prometheus = Peer("prometheus", ns.monitoring, PROMETHEUS)
    alertmanager = Peer("alertmanager", ns.monitoring, ALERTMANAGER)
    grafana = Peer("grafana", ns.monitoring, GRAFANA)
    ksm = Peer("kube-state-metrics", ns.monitoring, KUBE_STATE_METRICS)
    prom_op = Peer("prometheus-operator", prom_op_ns, PROMETHEUS_OPERATOR)
    es = Peer("elasticsearch", ns.logging, ELASTICSEARCH)
    kibana = Peer("kibana", ns.logging, KIBANA)
    logstash = Peer("logstash", ns.logging, LOGSTASH)
    filebeat = Peer("filebeat", ns.logging, FILEBEAT)
    eck_op = Peer("eck-operator", eck_ns, ECK_OPERATOR)
    setup = Peer("logging-setup", ns.logging, LOGGING_SETUP)
    model = (Port(args.model_port),)
    out = [
        # The front door: clients -> ingress-nginx -> models, Kibana, Grafana.
        Flow("world-to-ingress", Peer("world", cidr="0.0.0.0/0"), ingress, (Port(80), Port(443)), "public HTTP(S)"),
        Flow("apiserver-to-ingress", api, ingress, (Port(8443),), "ingress-nginx admission webhook"),
        Flow("ingress-to-models", ingress, models, model, "inference requests routed by the Ingresses"),
        Flow("ingress-to-kibana", ingress, kibana, (Port(5601),), "Kibana UI through the ingress"),
        Flow("ingress-to-grafana", ingress, grafana, (Port(3000),), "Grafana UI through the ingress"),
        Flow("ingress-to-apiserver", ingress, api, https_api, "controller watches Ingresses and Endpoints"),
        # Metrics: Prometheus scrapes the model servers' /metrics (same port as inference) and the stack.
        Flow("prometheus-to-models", prometheus, models, model, "scrape /metrics on the model servers"),
        Flow("prometheus-to-ingress", prometheus, ingress, (Port(10254),), "scrape ingress-nginx metrics"),
        Flow("prometheus-to-alertmanager", prometheus, alertmanager, (Port(9093),), "send alerts"),
        Flow("prometheus-to-ksm", prometheus, ksm, (Port(8080),), "scrape kube-state-metrics (replicas, requests)"),
        Flow(
            "prometheus-to-nodes",
            prometheus,
            Peer("nodes", cidr=args.node_cidr),
            (Port(10250), Port(9100)),
            "scrape kubelet/cAdvisor (container CPU/memory) and node-exporter (host network)",
        ),
        Flow("prometheus-to-apiserver", prometheus, api, https_api, "Kubernetes service discovery"),
        Flow("grafana-to-prometheus", grafana, prometheus, (Port(9090),), "dashboards query Prometheus"),
        Flow("grafana-to-apiserver", grafana, api, https_api, "dashboard sidecar reads ConfigMaps"),
        Flow("ksm-to-apiserver", ksm, api, https_api, "kube-state-metrics lists objects"),
        Flow(
            "alertmanager-to-receivers",
            alertmanager,
            Peer("receivers", cidr=args.alert_receivers_cidr),
            (Port(443),),
            "notifications (webhook, chat, paging) over HTTPS",
        ),
        Flow("prometheus-operator-to-apiserver", prom_op, api, https_api, "operator reconciles CRDs"),
        Flow("apiserver-to-prometheus-operator", api, prom_op, (Port(10250),), "PrometheusRule admission webhook"),
        # Logs: filebeat (every node) -> Logstash -> Elasticsearch <- Kibana.
        Flow("filebeat-to-logstash", filebeat, logstash, (Port(5044),), "beats protocol"),
        Flow("filebeat-to-apiserver", filebeat, api, https_api, "add_kubernetes_metadata enriches log lines"),
        Flow("logstash-to-elasticsearch", logstash, es, (Port(9200),), "index log events"),
        Flow("kibana-to-elasticsearch", kibana, es, (Port(9200),), "Kibana's backend"),
        Flow("setup-to-elasticsearch", setup, es, (Port(9200),), "Job applies the ILM policy and index template"),
        Flow("setup-to-kibana", setup, kibana, (Port(5601),), "Job imports the Kibana saved objects"),
        Flow("eck-operator-to-elasticsearch", eck_op, es, (Port(9200),), "operator manages cluster settings, ILM"),
        Flow("eck-operator-to-apiserver", eck_op, api, https_api, "operator reconciles CRDs"),
        Flow("apiserver-to-eck-operator", api, eck_op, (Port(9443),), "ECK admission webhook"),
    ]
    if args.ha:
        out += [
            Flow("elasticsearch-transport", es, es, (Port(9300),), "node-to-node transport (several nodes)"),
            Flow(
                "alertmanager-gossip",
                alertmanager,
                alertmanager,
                (Port(9094), Port(9094, "UDP")),
                "Alertmanager cluster gossip (several replicas)",
            ),
        ]
    else:  # a single-node Elasticsearch still talks to itself on the transport port at startup
        out.append(Flow("elasticsearch-transport", es, es, (Port(9300),), "node-to-node transport"))
    # DNS: every namespace whose pods open connections by name; models pods make no outbound calls.
    kube_dns = Peer("kube-dns", "kube-system", KUBE_DNS)
    for n in (ns.ingress, ns.monitoring, ns.logging):
        out.append(Flow(f"{n}-dns", Peer(n, n, {}), kube_dns, (Port(53, "UDP"), Port(53, "TCP")), "DNS lookups"))
    if args.keda:
        keda = Peer("keda-operator", args.keda_namespace, KEDA_OPERATOR)
        out.append(Flow("keda-to-prometheus", keda, prometheus, (Port(9090),), "KEDA's prometheus triggers"))
    return out


def _peer_rule(peer: Peer) -> dict[str, Any]:
    if peer.namespace is None:
        return {"ipBlock": {"cidr": peer.cidr}}
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": peer.namespace}},
        "podSelector": {"matchLabels": dict(peer.pods)},
    }


class ClusterBaseline(pulumi.ComponentResource):
    """Namespaces, quotas, priorities, network policies and cluster add-ons for one dlstack cluster."""

    namespaces: dict[str, k8s.core.v1.Namespace]
    network_policies: list[k8s.networking.v1.NetworkPolicy]
    priority_classes: list[k8s.scheduling.v1.PriorityClass]
    resource_quota: k8s.core.v1.ResourceQuota
    limit_range: k8s.core.v1.LimitRange
    ingress_nginx: k8s.helm.v3.Release
    metrics_server: k8s.helm.v3.Release
    device_plugin: k8s.helm.v3.Release | None
    keda: k8s.helm.v3.Release | None
    models_namespace: pulumi.Output[str]

    def __init__(self, name: str, args: ClusterBaselineArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        args.validate()
        super().__init__("dlstack:cluster_baseline:ClusterBaseline", name, None, opts)
        self.name = name
        self.args = args
        self._child = pulumi.ResourceOptions(parent=self)
        self.namespaces = self.create_namespaces()
        after_ns = pulumi.ResourceOptions(parent=self, depends_on=list(self.namespaces.values()))
        self._after_ns = after_ns
        self.priority_classes = self.add_priority_classes()
        self.resource_quota = self.add_resource_quota()
        self.limit_range = self.add_limit_range()
        self.network_policies = self.add_network_policies()
        self.ingress_nginx = self.install_ingress_nginx()
        self.metrics_server = self.install_metrics_server()
        self.device_plugin = self.install_device_plugin() if args.gpu else None
        self.keda = self.install_keda() if args.keda else None
        self.models_namespace = pulumi.Output.from_input(args.namespaces.models)
        self.register_outputs({"models_namespace": self.models_namespace})

    # ------------------------------------------------------------------------------------------

    def _pod_security(self, namespace: str) -> dict[str, str]:
        """Pod Security admission: models run "restricted"; the platform namespaces need more.

        ingress-nginx binds 80/443 (NET_BIND_SERVICE; "baseline"); filebeat reads host log paths
        and node-exporter uses the host network (hostPath/hostNetwork: "privileged"). Those
        namespaces still warn and audit against "restricted" so drift is visible.
        """
        ns = self.args.namespaces
        level = {ns.models: "restricted", ns.ingress: "baseline", self.args.keda_namespace: "restricted"}.get(
            namespace, "privileged"
        )
        version = f"v{self.args.kubernetes_version}"
        return {
            "pod-security.kubernetes.io/enforce": level,
            "pod-security.kubernetes.io/enforce-version": version,
            "pod-security.kubernetes.io/warn": "restricted",
            "pod-security.kubernetes.io/warn-version": version,
            "pod-security.kubernetes.io/audit": "restricted",
            "pod-security.kubernetes.io/audit-version": version,
        }

    def create_namespaces(self) -> dict[str, k8s.core.v1.Namespace]:
        out = {}
        for role, namespace in zip(
            ("models", "logging", "monitoring", "ingress"), self.args.namespaces.all(), strict=True
        ):
            labels = {
                "app.kubernetes.io/part-of": "dlstack",
                "app.kubernetes.io/managed-by": "pulumi",
                "dlstack.io/role": role,
                **self._pod_security(namespace),
            }
            out[role] = k8s.core.v1.Namespace(
                f"{self.name}-ns-{role}", metadata=_k({"name": namespace, "labels": labels}), opts=self._child
            )
        if self.args.keda:
            namespace = self.args.keda_namespace
            labels = {"app.kubernetes.io/part-of": "dlstack", "app.kubernetes.io/managed-by": "pulumi"}
            out["keda"] = k8s.core.v1.Namespace(
                f"{self.name}-ns-keda",
                metadata=_k({"name": namespace, "labels": {**labels, **self._pod_security(namespace)}}),
                opts=self._child,
            )
        return out

    def add_priority_classes(self) -> list[k8s.scheduling.v1.PriorityClass]:
        """Model servers outrank the platform: under node pressure logging/monitoring are preempted first."""
        specs = [
            (PRIORITY_MODELS, 100000, "dlstack model servers (user-facing inference)"),
            (PRIORITY_PLATFORM, 50000, "dlstack logging and monitoring"),
        ]
        return [
            k8s.scheduling.v1.PriorityClass(
                f"{self.name}-{pc}",
                metadata=_k({"name": pc, "labels": {"app.kubernetes.io/part-of": "dlstack"}}),
                value=value,
                global_default=False,
                preemption_policy="PreemptLowerPriority",
                description=desc,
                opts=self._child,
            )
            for pc, value, desc in specs
        ]

    def add_resource_quota(self) -> k8s.core.v1.ResourceQuota:
        q = self.args.quota
        hard: dict[str, str] = {
            "requests.cpu": q.requests_cpu,
            "requests.memory": q.requests_memory,
            "limits.cpu": q.limits_cpu,
            "limits.memory": q.limits_memory,
            "pods": str(q.pods),
            "services.loadbalancers": "0",  # models are reached through the ingress only
            "services.nodeports": "0",
        }
        if q.gpus:
            hard["requests.nvidia.com/gpu"] = str(q.gpus)
        return k8s.core.v1.ResourceQuota(
            f"{self.name}-models-quota",
            metadata=_k({"name": "models-quota", "namespace": self.args.namespaces.models}),
            spec=_k({"hard": hard}),
            opts=self._after_ns,
        )

    def add_limit_range(self) -> k8s.core.v1.LimitRange:
        """Defaults for containers that set nothing (the quota rejects pods without requests otherwise)."""
        q = self.args.quota
        return k8s.core.v1.LimitRange(
            f"{self.name}-models-limits",
            metadata=_k({"name": "models-limits", "namespace": self.args.namespaces.models}),
            spec=_k(
                {
                    "limits": [
                        {
                            "type": "Container",
                            "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                            "default": {"cpu": "500m", "memory": "512Mi"},
                            "max": {"cpu": q.max_container_cpu, "memory": q.max_container_memory},
                        }
                    ]
                }
            ),
            opts=self._after_ns,
        )

    def add_network_policies(self) -> list[k8s.networking.v1.NetworkPolicy]:
        managed = set(self.args.namespaces.all())
        out = []
        for namespace in self.args.namespaces.all():
            out.append(
                self._policy(
                    namespace,
                    "default-deny",
                    {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
                    "deny everything not allowed by an allow-* policy",
                )
            )
        for flow in flows(self.args):
            ports = [{"protocol": p.protocol, "port": p.port} for p in flow.ports]
            if flow.src.namespace in managed:
                spec = {
                    "podSelector": {"matchLabels": dict(flow.src.pods)},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [_peer_rule(flow.dst)], "ports": ports}],
                }
                out.append(self._policy(flow.src.namespace, f"allow-egress-{flow.name}", spec, flow.why))
            if flow.dst.namespace in managed:
                spec = {
                    "podSelector": {"matchLabels": dict(flow.dst.pods)},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [_peer_rule(flow.src)], "ports": ports}],
                }
                out.append(self._policy(flow.dst.namespace, f"allow-ingress-{flow.name}", spec, flow.why))
        return out

    def _policy(
        self, namespace: str | None, name: str, spec: dict[str, Any], why: str
    ) -> k8s.networking.v1.NetworkPolicy:
        assert namespace is not None
        return k8s.networking.v1.NetworkPolicy(
            f"{self.name}-{namespace}-{name}",
            metadata=_k(
                {
                    "name": name,
                    "namespace": namespace,
                    "labels": {"app.kubernetes.io/part-of": "dlstack"},
                    "annotations": {"dlstack.io/why": why},
                }
            ),
            spec=_k(spec),
            opts=self._after_ns,
        )

    # ------------------------------------------------------------------------------------------
    # add-ons (pinned charts, infra/helm.py)

    def install_ingress_nginx(self) -> k8s.helm.v3.Release:
        a = self.args
        controller: dict[str, Any] = {
            "replicaCount": a.ingress_replicas,
            "ingressClassResource": {"name": a.ingress_class_name, "default": True},
            "ingressClass": a.ingress_class_name,
            "metrics": {"enabled": True, "serviceMonitor": {"enabled": True}},
            "priorityClassName": PRIORITY_PLATFORM,
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
            "allowSnippetAnnotations": False,  # snippets let Ingress authors inject nginx config
            "config": {"use-forwarded-headers": "false", "enable-real-ip": "false"},
        }
        if a.kind:
            # kind's documented ingress setup: hostPorts on the node labelled ingress-ready=true.
            controller |= {
                "hostPort": {"enabled": True},
                "service": {"type": "NodePort"},
                "nodeSelector": {"ingress-ready": "true", "kubernetes.io/os": "linux"},
                "tolerations": [
                    {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}
                ],
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            }
        else:
            controller["service"] = {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}
        if a.ha:
            controller |= {
                "minAvailable": 1,  # chart renders a PodDisruptionBudget when replicaCount > 1
                "topologySpreadConstraints": [
                    {
                        "maxSkew": 1,
                        "topologyKey": "topology.kubernetes.io/zone",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": dict(INGRESS_CONTROLLER)},
                    }
                ],
            }
        return helm_release(
            "ingress-nginx",
            chart="ingress-nginx",
            namespace=a.namespaces.ingress,
            values={"controller": controller},
            opts=self._after_ns,
        )

    def install_metrics_server(self) -> k8s.helm.v3.Release:
        args = ["--kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname"]
        if self.args.kind:
            args.append("--kubelet-insecure-tls")  # kind's kubelets serve self-signed certificates
        values: dict[str, Any] = {
            "args": args,
            "replicas": 2 if self.args.ha else 1,
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        }
        if self.args.ha:
            values["podDisruptionBudget"] = {"enabled": True, "minAvailable": 1}
        return helm_release(
            "metrics-server", chart="metrics-server", namespace="kube-system", values=values, opts=self._child
        )

    def install_device_plugin(self) -> k8s.helm.v3.Release:
        """Advertises nvidia.com/gpu on GPU nodes; only installed when a model asks for GPUs."""
        return helm_release(
            "nvidia-device-plugin",
            chart="nvidia-device-plugin",
            namespace="kube-system",
            values={
                "priorityClassName": "system-node-critical",
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                # Only nodes that have GPUs (labelled by GPU feature discovery or by hand).
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
            },
            opts=self._child,
        )

    def install_keda(self) -> k8s.helm.v3.Release:
        """KEDA (operator, metrics API server, admission webhooks and its CRDs), for models that scale on load.

        The ScaledObjects wait for this release: its CRDs must exist before one can be created.
        """
        ha = self.args.ha
        values: dict[str, Any] = {
            "crds": {"install": True},
            "priorityClassName": PRIORITY_PLATFORM,
            # The operator elects a leader: a second replica takes over without a scaling gap.
            "operator": {"replicaCount": 2 if ha else 1},
            "webhooks": {"replicaCount": 2 if ha else 1},
        }
        if ha:
            values["podDisruptionBudget"] = {"operator": {"minAvailable": 1}, "webhooks": {"minAvailable": 1}}
        return helm_release(
            "keda", chart="keda", namespace=self.args.keda_namespace, values=values, opts=self._after_ns
        )
