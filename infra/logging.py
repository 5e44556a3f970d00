"""``Logging``: the ELK stack run by ECK (Elastic Cloud on Kubernetes).

Filebeat (a DaemonSet ``Beat``) autodiscovers the model-server containers of the models namespace
and ships their ECS JSON lines to Logstash, which parses them (``infra.logstash.pipeline``) and
writes to Elasticsearch; Kibana shows them with saved searches/dashboards imported as code.

Credentials are never in config: ECK generates the ``elastic`` user Secret
(``<cluster>-es-elastic-user``) and the HTTP CA Secrets, and everything that talks to Elasticsearch
or Kibana mounts those Secrets. Retention is an ILM policy (delete after ``retention_days``) bound
to the log indices by an index template; a setup Job applies both through the Elasticsearch API, and
a second Job imports the Kibana saved objects through Kibana's ``_import`` API.

Sampled prediction events (``dlstack.predictions``; their inputs may be personal data) have their own
indices, ILM policy (``predictions_retention_days``, shorter than the logs' by default), an index
template that stores the tensors without indexing them, and a reader role of their own: reading the
logs (``dlstack-logs-reader``) does not grant reading predictions (``dlstack-predictions-reader``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra import kibana, logstash
from infra.helm import helm_release
from services.serving import names
from services.serving.errors import UserError

_QUANTITY = re.compile(r"^(\d+(\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")

# curl, pinned by digest (8.11.1): the setup Jobs need nothing else; runs as any non-root UID.
CURL_IMAGE = "curlimages/curl:8.11.1@sha256:c1fe1679c34d9784c1b0d1e5f62ac0a79fca01fb6377cdd33e90473c6f9f9a69"
BEATS_PORT = logstash.BEATS_PORT
ILM_POLICY = "dlstack-logs"
PREDICTIONS_ILM_POLICY = "dlstack-predictions"
LOGS_READER_ROLE = "dlstack-logs-reader"
PREDICTIONS_READER_ROLE = "dlstack-predictions-reader"
JOB_UID = 10001
SETUP_COMPONENT = "logging-setup"  # pod label app.kubernetes.io/component of the setup Jobs (NetworkPolicy peer)


def _k(obj: Any) -> Any:
    """Plain camelCase dicts go to pulumi-kubernetes as they are; this keeps mypy off their TypedDicts."""
    return obj


@dataclass(frozen=True)
class LoggingArgs:
    """Sizing and retention of the logging stack."""

    namespace: str = "logging"  # default logging; must exist (cluster baseline)
    models_namespace: str = "models"  # default models; Filebeat autodiscovers containers here only
    cluster_name: str = "dlstack"  # default dlstack; name of the Elasticsearch/Kibana/Logstash objects
    version: str = "8.17.4"  # default 8.17.4; Elastic stack version ECK runs
    retention_days: int = 7  # default 7 days; ILM deletes log indices older than this
    es_nodes: int = 1  # default 1; Elasticsearch nodes (3 in prod for a master quorum)
    es_cpu: str = "1"  # default 1 core per node (request)
    es_memory: str = "2Gi"  # default 2Gi per node (request = limit; ECK sizes the heap to half)
    es_storage: str = "10Gi"  # default 10Gi PVC per node
    storage_class: str | None = None  # default None = the cluster's default StorageClass
    es_allow_mmap: bool = False  # default False: no vm.max_map_count sysctl (privileged init) needed
    kibana_replicas: int = 1  # default 1
    logstash_replicas: int = 1  # default 1
    index_prefix: str = logstash.INDEX_PREFIX  # default dlstack-logs; Logstash writes <prefix>-YYYY.MM.dd
    predictions_retention_days: int = 3  # default 3 days; ILM deletes prediction-log indices older than this
    # default dlstack-predictions; Logstash writes the prediction events to <prefix>-YYYY.MM.dd
    predictions_index_prefix: str = logstash.PREDICTIONS_INDEX_PREFIX
    pipeline: str | None = None  # default None = infra.logstash.pipeline() for this cluster; Logstash config
    saved_objects: str | None = None  # default None = infra.kibana.saved_objects(); NDJSON for Kibana
    operator_namespace: str | None = None  # default None = namespace; where the ECK operator runs

    def validate(self, name: str) -> None:
        problems: list[str] = []
        for key in ("namespace", "models_namespace", "cluster_name"):
            if not names.matches(names.DNS_LABEL, getattr(self, key)):
                problems.append(f'{key} "{getattr(self, key)}" is not a DNS-1123 label')
        if len(self.cluster_name) > 36:  # ECK appends e.g. "-es-default-0" and "-es-elastic-user"
            problems.append(f'cluster_name "{self.cluster_name}" is longer than 36 characters; shorten it')
        if not _VERSION.fullmatch(self.version):
            problems.append(f'version "{self.version}" is not an Elastic stack version (e.g. "8.17.4")')
        if not 1 <= self.retention_days <= 3650:
            problems.append(f"retention_days {self.retention_days} must be between 1 and 3650")
        if not 1 <= self.predictions_retention_days <= 3650:
            problems.append(f"predictions_retention_days {self.predictions_retention_days} must be between 1 and 3650")
        for key in ("es_nodes", "kibana_replicas", "logstash_replicas"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1 (got {getattr(self, key)})")
        for key in ("es_cpu", "es_memory", "es_storage"):
            if not _QUANTITY.fullmatch(getattr(self, key)):
                problems.append(f'{key} "{getattr(self, key)}" is not a Kubernetes quantity (e.g. "1", "2Gi")')
        if not names.matches(names.DNS_LABEL, self.index_prefix):
            problems.append(f'index_prefix "{self.index_prefix}" must be lower-case letters, digits and "-"')
        if not names.matches(names.DNS_LABEL, self.predictions_index_prefix):
            problems.append(
                f'predictions_index_prefix "{self.predictions_index_prefix}" must be lower-case letters, digits and "-"'
            )
        elif overlap := logstash.overlapping_prefixes(self.index_prefix, self.predictions_index_prefix):
            problems.append(overlap)
        if problems:
            raise UserError(f"Logging {name}: " + "; ".join(problems))

    # ECK's well-known names for what it generates from cluster_name.
    @property
    def es_service(self) -> str:
        return f"{self.cluster_name}-es-http"

    @property
    def es_user_secret(self) -> str:
        return f"{self.cluster_name}-es-elastic-user"

    @property
    def logstash_beats_service(self) -> str:
        return f"{self.cluster_name}-ls-beats"

    @property
    def kibana_service(self) -> str:
        return f"{self.cluster_name}-kb-http"


def ilm_policy(retention_days: int) -> dict[str, Any]:
    """Delete an index ``retention_days`` after its creation (Logstash already writes one index a day)."""
    return {
        "policy": {
            "_meta": {"managed_by": "dlstack"},
            "phases": {
                "hot": {"min_age": "0ms", "actions": {}},
                "delete": {"min_age": f"{retention_days}d", "actions": {"delete": {}}},
            },
        }
    }


def index_template(index_prefix: str, replicas: int) -> dict[str, Any]:
    """A composable template binding the ILM policy to every daily log index ``<prefix>-*``."""
    return {
        "index_patterns": [f"{index_prefix}-*"],
        "priority": 500,
        "template": {
            "settings": {"index.lifecycle.name": ILM_POLICY, "index.number_of_replicas": replicas},
        },
        "_meta": {"managed_by": "dlstack"},
    }


def _mapping(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"a.b": {...}}`` -> Elasticsearch's nested ``properties`` form."""
    root: dict[str, Any] = {}
    for dotted, spec in fields.items():
        node = root
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {"properties": {}})["properties"]
        node[leaf] = spec
    return root


def predictions_template(index_prefix: str, replicas: int) -> dict[str, Any]:
    """The prediction indices' template: their own ILM policy, and mappings fixed up front.

    The tensors (inputs/outputs, or their summaries) differ in type from model to model: dynamically
    mapped, the first model's floats would make another model's strings fail to index. They are kept
    in ``_source`` (shown in Kibana) but not indexed (``enabled: false``); the fields searched are typed.
    """
    keyword = {"type": "keyword"}
    return {
        "index_patterns": [f"{index_prefix}-*"],
        "priority": 501,  # Elasticsearch refuses two templates of equal priority whose patterns overlap
        "template": {
            "settings": {"index.lifecycle.name": PREDICTIONS_ILM_POLICY, "index.number_of_replicas": replicas},
            "mappings": {
                "properties": _mapping(
                    {
                        "event.dataset": keyword,
                        "event.duration": {"type": "long"},
                        "labels.model": keyword,
                        "labels.model_version": keyword,
                        "http.request.id": keyword,
                        "http.response.status_code": {"type": "integer"},
                        "dlstack.prediction.form": keyword,
                        "dlstack.prediction.latency_ms": {"type": "float"},
                        **{f: {"type": "object", "enabled": False} for f in logstash.PREDICTION_TENSOR_FIELDS},
                    }
                )
            },
        },
        "_meta": {"managed_by": "dlstack"},
    }


def reader_role(index_prefix: str) -> dict[str, Any]:
    """An Elasticsearch role that may read ``<index_prefix>-*`` and nothing else (grant it per person)."""
    return {
        "indices": [{"names": [f"{index_prefix}-*"], "privileges": ["read", "view_index_metadata"]}],
        "metadata": {"managed_by": "dlstack"},
    }


def _labels(obj_name: str, component: str, version: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": obj_name,
        "app.kubernetes.io/instance": obj_name,
        "app.kubernetes.io/version": version,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "dlstack",
        "app.kubernetes.io/managed-by": "pulumi",
    }


class Logging(pulumi.ComponentResource):
    """eck-operator + Elasticsearch + Kibana + Logstash + Filebeat, ILM retention and Kibana saved objects."""

    operator: k8s.helm.v3.Release
    elasticsearch: k8s.apiextensions.CustomResource
    kibana: k8s.apiextensions.CustomResource
    logstash: k8s.apiextensions.CustomResource
    beat: k8s.apiextensions.CustomResource
    retention_job: k8s.batch.v1.Job
    saved_objects_job: k8s.batch.v1.Job
    setup_network_policy: k8s.networking.v1.NetworkPolicy
    elasticsearch_url: pulumi.Output[str]
    kibana_url: pulumi.Output[str]
    elastic_user_secret: pulumi.Output[str]

    def __init__(self, name: str, args: LoggingArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        args.validate(name)
        # Generate the documents first: nothing is created if one of them is invalid.
        pipeline = args.pipeline
        if pipeline is None:
            pipeline = logstash.pipeline(
                logstash.PipelineArgs(
                    es_cluster_name=args.cluster_name,
                    index_prefix=args.index_prefix,
                    predictions_index_prefix=args.predictions_index_prefix,
                )
            )
        saved_objects = args.saved_objects
        if saved_objects is None:
            saved_objects = kibana.to_ndjson(kibana.saved_objects(args.index_prefix, args.predictions_index_prefix))
        super().__init__("dlstack:logging:Logging", name, None, opts)
        self.name = name
        self.args = args
        a = args
        ns = a.namespace
        self.operator = helm_release(
            "eck-operator",
            chart="eck-operator",
            namespace=a.operator_namespace or ns,
            values=self.operator_values(),
            opts=pulumi.ResourceOptions(parent=self),
        )
        # Custom resources need the operator's CRDs (and its webhook) first.
        crd_opts = pulumi.ResourceOptions(parent=self, depends_on=[self.operator])
        self.elasticsearch = self._cr(
            f"{name}-elasticsearch", "elasticsearch.k8s.elastic.co/v1", "Elasticsearch", "elasticsearch",
            self.elasticsearch_spec(), crd_opts,
        )  # fmt: skip
        self.kibana = self._cr(
            f"{name}-kibana", "kibana.k8s.elastic.co/v1", "Kibana", "kibana", self.kibana_spec(), crd_opts
        )
        self.logstash = self._cr(
            f"{name}-logstash", "logstash.k8s.elastic.co/v1alpha1", "Logstash", "logstash",
            self.logstash_spec(pipeline), crd_opts,
        )  # fmt: skip
        self.filebeat_rbac()
        self.beat = self._cr(
            f"{name}-filebeat", "beat.k8s.elastic.co/v1beta1", "Beat", "filebeat", self.beat_spec(), crd_opts,
            obj_name=f"{a.cluster_name}-filebeat",
        )  # fmt: skip
        after_es = pulumi.ResourceOptions(parent=self, depends_on=[self.elasticsearch], delete_before_replace=True)
        after_kb = pulumi.ResourceOptions(parent=self, depends_on=[self.kibana], delete_before_replace=True)
        self.setup_network_policy = self.isolate_setup_jobs()
        self.retention_job = self.apply_retention(after_es)
        self.saved_objects_job = self.import_saved_objects(saved_objects, after_kb)
        self.elasticsearch_url = pulumi.Output.from_input(f"https://{a.es_service}.{ns}.svc:9200")
        self.kibana_url = pulumi.Output.from_input(f"https://{a.kibana_service}.{ns}.svc:5601")
        self.elastic_user_secret = pulumi.Output.from_input(a.es_user_secret)
        self.register_outputs(
            {
                "elasticsearch_url": self.elasticsearch_url,
                "kibana_url": self.kibana_url,
                "elastic_user_secret": self.elastic_user_secret,
                "logstash_beats_service": a.logstash_beats_service,
            }
        )

    # ------------------------------------------------------------------------------------------

    def _meta(self, obj_name: str, component: str) -> dict[str, Any]:
        return {
            "name": obj_name,
            "namespace": self.args.namespace,
            "labels": _labels(obj_name, component, self.args.version),
        }

    def _cr(
        self,
        resource_name: str,
        api_version: str,
        kind: str,
        component: str,
        spec: dict[str, Any],
        opts: pulumi.ResourceOptions,
        obj_name: str | None = None,
    ) -> k8s.apiextensions.CustomResource:
        return k8s.apiextensions.CustomResource(
            resource_name,
            api_version=api_version,
            kind=kind,
            metadata=self._meta(obj_name or self.args.cluster_name, component),
            spec=spec,
            opts=opts,
        )

    def operator_values(self) -> dict[str, Any]:
        return {
            "installCRDs": True,
            "resources": {"requests": {"cpu": "100m", "memory": "150Mi"}, "limits": {"memory": "1Gi"}},
            # The operator's own telemetry phones home; a production cluster should not.
            "telemetry": {"disabled": True},
        }

    def elasticsearch_spec(self) -> dict[str, Any]:
        a = self.args
        pvc: dict[str, Any] = {
            "metadata": {"name": "elasticsearch-data"},  # ECK's expected claim name
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": a.es_storage}}},
        }
        if a.storage_class:
            pvc["spec"]["storageClassName"] = a.storage_class
        return {
            "version": a.version,
            "nodeSets": [
                {
                    "name": "default",
                    "count": a.es_nodes,
                    "config": {"node.store.allow_mmap": a.es_allow_mmap},
                    "podTemplate": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "elasticsearch",
                                    "resources": {
                                        "requests": {"cpu": a.es_cpu, "memory": a.es_memory},
                                        "limits": {"memory": a.es_memory},
                                    },
                                }
                            ]
                        }
                    },
                    "volumeClaimTemplates": [pvc],
                }
            ],
        }

    def kibana_spec(self) -> dict[str, Any]:
        a = self.args
        return {
            "version": a.version,
            "count": a.kibana_replicas,
            "elasticsearchRef": {"name": a.cluster_name},
            "podTemplate": {
                "spec": {
                    "containers": [
                        {
                            "name": "kibana",
                            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
                        }
                    ]
                }
            },
        }

    def logstash_spec(self, pipeline: str) -> dict[str, Any]:
        """ECK injects ``<CLUSTERNAME>_ES_HOSTS/_USER/_PASSWORD/_SSL_CERTIFICATE_AUTHORITY`` from the ref."""
        a = self.args
        return {
            "version": a.version,
            "count": a.logstash_replicas,
            "elasticsearchRefs": [{"name": a.cluster_name, "clusterName": a.cluster_name}],
            "pipelines": [{"pipeline.id": "dlstack", "config.string": pipeline}],
            "services": [
                {
                    "name": "beats",
                    "service": {
                        "spec": {
                            "type": "ClusterIP",
                            "ports": [
                                {"name": "beats", "port": BEATS_PORT, "targetPort": BEATS_PORT, "protocol": "TCP"}
                            ],
                        }
                    },
                }
            ],
            "podTemplate": {
                "spec": {
                    "containers": [
                        {
                            "name": "logstash",
                            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
                        }
                    ]
                }
            },
        }

    def filebeat_rbac(self) -> k8s.core.v1.ServiceAccount:
        """Read-only access to pod/namespace/node metadata, which autodiscover needs to enrich events."""
        a = self.args
        sa_name = f"{a.cluster_name}-filebeat"
        opts = pulumi.ResourceOptions(parent=self)
        sa = k8s.core.v1.ServiceAccount(
            f"{self.name}-filebeat-sa", metadata=_k(self._meta(sa_name, "filebeat")), opts=opts
        )
        cluster_meta = {"name": sa_name, "labels": _labels(sa_name, "filebeat", a.version)}
        k8s.rbac.v1.ClusterRole(
            f"{self.name}-filebeat-role",
            metadata=_k(cluster_meta),
            rules=_k(
                [
                    {
                        "apiGroups": [""],
                        "resources": ["pods", "namespaces", "nodes"],
                        "verbs": ["get", "list", "watch"],
                    },
                    {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get", "list", "watch"]},
                ]
            ),
            opts=opts,
        )
        k8s.rbac.v1.ClusterRoleBinding(
            f"{self.name}-filebeat-binding",
            metadata=_k(cluster_meta),
            role_ref=_k({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": sa_name}),
            subjects=_k([{"kind": "ServiceAccount", "name": sa_name, "namespace": a.namespace}]),
            opts=opts,
        )
        return sa

    def beat_spec(self) -> dict[str, Any]:
        """Filebeat as a DaemonSet: container logs of the models namespace only, to Logstash's beats port."""
        a = self.args
        config = {
            "filebeat.autodiscover": {
                "providers": [
                    {
                        "type": "kubernetes",
                        "node": "${NODE_NAME}",
                        "namespace": a.models_namespace,
                        "templates": [
                            {
                                "condition": {"equals": {"kubernetes.namespace": a.models_namespace}},
                                "config": [
                                    {
                                        "type": "filestream",
                                        "id": "container-${data.kubernetes.container.id}",
                                        "paths": ["/var/log/containers/*${data.kubernetes.container.id}.log"],
                                        "prospector.scanner.symlinks": True,
                                        # CRI framing off; the ECS JSON line itself is parsed by Logstash.
                                        "parsers": [{"container": {"stream": "all", "format": "auto"}}],
                                    }
                                ],
                            }
                        ],
                    }
                ]
            },
            # add_cloud_metadata is left out: the metadata endpoint is outside the allowed network flows.
            "processors": [{"add_host_metadata": {}}],
            "output.logstash": {"hosts": [f"{a.logstash_beats_service}.{a.namespace}.svc:{BEATS_PORT}"]},
        }
        host_path = [("varlogcontainers", "/var/log/containers"), ("varlogpods", "/var/log/pods")]
        # "beat-data" replaces ECK's emptyDir: the registry of read offsets survives a restart,
        # so a restarted Filebeat neither re-ships nor skips lines.
        data = {
            "name": "beat-data",
            "hostPath": {"path": f"/var/lib/{a.cluster_name}-filebeat-data", "type": "DirectoryOrCreate"},
        }
        return {
            "type": "filebeat",
            "version": a.version,
            "config": config,
            "daemonSet": {
                "podTemplate": {
                    "spec": {
                        "serviceAccountName": f"{a.cluster_name}-filebeat",
                        "automountServiceAccountToken": True,  # autodiscover watches the API
                        "dnsPolicy": "ClusterFirstWithHostNet",
                        "terminationGracePeriodSeconds": 30,
                        "containers": [
                            {
                                "name": "filebeat",
                                # Container log files are root-owned 0640 on the node.
                                "securityContext": {"runAsUser": 0},
                                "env": [
                                    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
                                ],
                                "resources": {
                                    "requests": {"cpu": "100m", "memory": "200Mi"},
                                    "limits": {"memory": "500Mi"},
                                },
                                "volumeMounts": [{"name": n, "mountPath": p, "readOnly": True} for n, p in host_path],
                            }
                        ],
                        "volumes": [{"name": n, "hostPath": {"path": p}} for n, p in host_path] + [data],
                    }
                }
            },
        }

    # ------------------------------------------------------------------------------------------
    # setup Jobs (curl against the ECK-managed HTTPS endpoints, credentials from ECK's Secrets)

    def _job(
        self,
        resource_name: str,
        obj_name: str,
        script: str,
        files: dict[str, str],
        ca_secret: str,
        opts: pulumi.ResourceOptions,
    ) -> k8s.batch.v1.Job:
        a = self.args
        cm = k8s.core.v1.ConfigMap(
            f"{resource_name}-files",
            metadata=_k(self._meta(obj_name, SETUP_COMPONENT)),
            data=files,
            opts=pulumi.ResourceOptions(parent=self),
        )
        mounts: list[tuple[str, str, dict[str, Any]]] = [
            ("files", "/setup", {"configMap": {"name": obj_name}}),
            ("elastic-user", "/secrets/elastic-user", {"secret": {"secretName": a.es_user_secret}}),
            (
                "ca",
                "/secrets/ca",
                {"secret": {"secretName": ca_secret, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            ),
        ]
        pod_spec = {
            "restartPolicy": "OnFailure",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": JOB_UID,
                "runAsGroup": JOB_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "setup",
                    "image": CURL_IMAGE,
                    "imagePullPolicy": "Always",
                    "command": ["/bin/sh", "-ec", script],
                    "resources": {
                        "requests": {"cpu": "50m", "memory": "32Mi"},
                        "limits": {"cpu": "200m", "memory": "64Mi"},
                    },
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": JOB_UID,
                        "allowPrivilegeEscalation": False,
                        "privileged": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "volumeMounts": [{"name": n, "mountPath": p, "readOnly": True} for n, p, _ in mounts],
                }
            ],
            "volumes": [{"name": n, **src} for n, _, src in mounts],
        }
        return k8s.batch.v1.Job(
            resource_name,
            metadata=_k(self._meta(obj_name, SETUP_COMPONENT)),
            spec=_k(
                {
                    # Kibana/Elasticsearch may still be starting: curl retries, the Job retries after that.
                    "backoffLimit": 6,
                    "activeDeadlineSeconds": 1800,
                    "template": {
                        "metadata": {"labels": _labels(obj_name, SETUP_COMPONENT, a.version)},
                        "spec": pod_spec,
                    },
                }
            ),
            opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(depends_on=[cm])),
        )

    def isolate_setup_jobs(self) -> k8s.networking.v1.NetworkPolicy:
        """Nothing may connect to the setup Jobs' pods (they are clients only; their egress is the baseline's)."""
        obj_name = f"{self.args.cluster_name}-{SETUP_COMPONENT}"
        return k8s.networking.v1.NetworkPolicy(
            f"{self.name}-setup-netpol",
            metadata=_k(self._meta(obj_name, SETUP_COMPONENT)),
            spec=_k(
                {
                    "podSelector": {"matchLabels": {"app.kubernetes.io/component": SETUP_COMPONENT}},
                    "policyTypes": ["Ingress"],
                    "ingress": [],
                }
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )

    @staticmethod
    def _curl(url_var: str) -> str:
        # The password goes through a curl config on stdin, never onto the command line (ps) or into env.
        return (
            'api() { printf \'user = "elastic:%s"\\n\' "$(cat /secrets/elastic-user/elastic)" | '
            "curl --config - --silent --show-error --fail-with-body --retry 30 --retry-all-errors "
            f'--retry-delay 10 --cacert /secrets/ca/ca.crt "$@"; }}; BASE="{url_var}"\n'
        )

    def apply_retention(self, opts: pulumi.ResourceOptions) -> k8s.batch.v1.Job:
        """A Job that PUTs the ILM policies and the index templates binding them to the log and prediction
        indices, then one reader role per kind of index."""
        a = self.args
        obj_name = f"{a.cluster_name}-ilm-setup"
        replicas = 0 if a.es_nodes == 1 else 1  # a single node can't hold replicas (health stays yellow)
        files = {
            "ilm-policy.json": json.dumps(ilm_policy(a.retention_days), sort_keys=True),
            "index-template.json": json.dumps(index_template(a.index_prefix, replicas), sort_keys=True),
            "predictions-ilm-policy.json": json.dumps(ilm_policy(a.predictions_retention_days), sort_keys=True),
            "predictions-index-template.json": json.dumps(
                predictions_template(a.predictions_index_prefix, replicas), sort_keys=True
            ),
            "logs-reader-role.json": json.dumps(reader_role(a.index_prefix), sort_keys=True),
            "predictions-reader-role.json": json.dumps(reader_role(a.predictions_index_prefix), sort_keys=True),
        }
        put = 'api -X PUT -H "Content-Type: application/json" --data-binary @/setup/'
        script = self._curl(f"https://{a.es_service}.{a.namespace}.svc:9200") + "".join(
            f'{put}{file} "$BASE/{path}"\n'
            for file, path in (
                ("ilm-policy.json", f"_ilm/policy/{ILM_POLICY}"),
                ("index-template.json", f"_index_template/{ILM_POLICY}"),
                ("predictions-ilm-policy.json", f"_ilm/policy/{PREDICTIONS_ILM_POLICY}"),
                ("predictions-index-template.json", f"_index_template/{PREDICTIONS_ILM_POLICY}"),
                ("logs-reader-role.json", f"_security/role/{LOGS_READER_ROLE}"),
                ("predictions-reader-role.json", f"_security/role/{PREDICTIONS_READER_ROLE}"),
            )
        )
        return self._job(
            f"{self.name}-ilm-setup", obj_name, script, files, f"{a.cluster_name}-es-http-certs-public", opts
        )

    def import_saved_objects(self, ndjson: str, opts: pulumi.ResourceOptions) -> k8s.batch.v1.Job:
        """A Job that POSTs the saved objects to Kibana's ``_import`` API (overwrite: the code is the truth)."""
        a = self.args
        obj_name = f"{a.cluster_name}-kibana-objects"
        script = self._curl(f"https://{a.kibana_service}.{a.namespace}.svc:5601") + (
            'out=$(api -X POST -H "kbn-xsrf: true" --form file=@/setup/saved-objects.ndjson '
            '"$BASE/api/saved_objects/_import?overwrite=true")\n'
            'echo "$out"\n'
            # _import answers 200 even when objects fail; only "success":true means all were imported.
            'case "$out" in *\'"success":true\'*) ;; *) exit 1 ;; esac\n'
        )
        files = {"saved-objects.ndjson": ndjson}
        return self._job(
            f"{self.name}-kibana-objects", obj_name, script, files, f"{a.cluster_name}-kb-http-certs-public", opts
        )
