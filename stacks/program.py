"""The dlstack Pulumi program: typed config in, components composed, stack outputs out.

``build(cfg, registry)`` is the whole program. ``stacks/__main__.py`` runs it under ``pulumi up``
(config read from the engine), ``stacks.render`` runs it offline under mocks (config read from the
stack file); both pass the same validated ``StackConfig``, parsed once before anything is created.
Every model reference is resolved through the registry first, so a missing model fails the run
before a single resource exists.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pulumi
import pulumi_kubernetes as k8s

from infra.autoscaling import LoadAutoscaling
from infra.cluster_baseline import (
    PRIORITY_MODELS,
    ClusterBaseline,
    ClusterBaselineArgs,
    ModelQuota,
    Namespaces,
)
from infra.model_image import ModelImage, ModelImageArgs
from infra.model_service import CanaryArgs, ModelService, ModelServiceArgs
from services.serving.errors import UserError
from stacks.config import ModelConfig, StackConfig, parse_quantity

ROOT = Path(__file__).resolve().parent.parent
MODEL_PORT = 8080  # the model server's port (ModelServiceArgs.port default), also /metrics


class ResolvedModel(Protocol):
    """What the program needs from ``services.registry.ModelVersion``."""

    name: str
    version: str
    framework: str
    sha256: str

    def export(self, dest: Path | str) -> Path: ...


class ModelResolver(Protocol):
    """What the program needs from ``services.registry.Registry`` (or one of its snapshots)."""

    def resolve(self, ref: str) -> Any: ...

    def snapshot(self) -> ModelResolver:
        """A view over one read of the index: a stack's models cost one request to an object store."""
        ...


def stack_registry(cfg: StackConfig, flag: str | None = None) -> Any:
    """The registry the stack deploys from: ``--registry`` > ``$DLSTACK_REGISTRY`` > ``dlstack:registry`` > default.

    ``pulumi up`` (``stacks/__main__.py``) and the offline render both build it here, so CI on a fresh
    checkout resolves the same versions from the team's bucket as a laptop does.
    """
    from services.registry import Registry

    return Registry.for_stack(cfg.registry, flag=flag)


@dataclass(frozen=True)
class BuildOptions:
    build_root: Path = ROOT / "build" / "images"  # default <repo>/build/images; image build contexts
    prepare_images: bool = True  # default True; False (offline render) records builds without staging contexts


def _k(obj: Any) -> Any:
    """Plain camelCase dicts go to pulumi-kubernetes as they are (keeps mypy off its TypedDicts)."""
    return obj


# -------------------------------------------------------------------------------------------------
# config -> component args (pure functions: unit-tested without Pulumi)


def _cpu(cores: float) -> str:
    return f"{math.ceil(cores * 1000)}m"


def _mem(nbytes: float) -> str:
    return f"{math.ceil(nbytes / 2**20)}Mi"


def model_quota(cfg: StackConfig) -> ModelQuota:
    """The models namespace quota = what every model needs at maximum scale during a rollout.

    Per model: ``max`` replicas + 1 surge pod (``maxSurge: 1``), plus the canary's pod and its
    surge pod. Each pod counts its requests and limits (GPU requests when it has GPUs).
    """
    req_cpu = req_mem = lim_cpu = lim_mem = 0.0
    pods = gpus = 0
    max_cpu = max_mem = 0.0
    for m in cfg.models:
        n = m.replicas.max + 1 + (2 if m.canary is not None else 0)
        r = m.resources
        req_cpu += n * parse_quantity(r.cpu)
        req_mem += n * parse_quantity(r.memory)
        lim_cpu += n * parse_quantity(r.cpu_limit)
        lim_mem += n * parse_quantity(r.memory_limit)
        max_cpu = max(max_cpu, parse_quantity(r.cpu_limit))
        max_mem = max(max_mem, parse_quantity(r.memory_limit))
        pods += n
        gpus += n * (m.gpu.count if m.gpu else 0)
    if not cfg.models:
        return ModelQuota(
            pods=1, requests_cpu="100m", requests_memory="128Mi", limits_cpu="500m", limits_memory="512Mi"
        )
    return ModelQuota(
        requests_cpu=_cpu(req_cpu),
        requests_memory=_mem(req_mem),
        limits_cpu=_cpu(lim_cpu),
        limits_memory=_mem(lim_mem),
        pods=pods,
        gpus=gpus,
        max_container_cpu=_cpu(max_cpu),
        max_container_memory=_mem(max_mem),
    )


def baseline_args(cfg: StackConfig) -> ClusterBaselineArgs:
    ns = cfg.namespaces
    return ClusterBaselineArgs(
        namespaces=Namespaces(models=ns.models, logging=ns.logging, monitoring=ns.monitoring, ingress=ns.ingress),
        kubernetes_version=cfg.kubernetes.version,
        quota=model_quota(cfg),
        model_port=MODEL_PORT,
        ha=cfg.prod,
        ingress_replicas=cfg.ingress.replicas,
        ingress_class_name=cfg.ingress.class_name,
        kind=not cfg.prod,
        gpu=cfg.gpu,
        keda=cfg.load_autoscaling,
    )


def model_service_args(
    cfg: StackConfig,
    m: ModelConfig,
    image: pulumi.Input[str],
    version: str,
    canary: tuple[pulumi.Input[str], str] | None,
    load: LoadAutoscaling | None = None,
) -> ModelServiceArgs:
    r = m.resources
    return ModelServiceArgs(
        image=image,
        model_version=version,
        framework=m.framework.value,
        namespace=cfg.namespaces.models,
        min_replicas=m.replicas.min,
        max_replicas=m.replicas.max,
        target_cpu_percent=m.replicas.target_cpu_percent,
        cpu=r.cpu,
        memory=r.memory,
        cpu_limit=r.cpu_limit,
        memory_limit=r.memory_limit,
        workers=m.workers,
        max_batch_size=m.batching.max_batch_size,
        max_batch_time_ms=m.batching.max_batch_time_ms,
        prediction_log_sample=m.prediction_log.sample if m.prediction_log else None,
        prediction_log_max_bytes=m.prediction_log.max_bytes if m.prediction_log else None,
        drift_sample=m.drift.sample if m.drift else None,
        drift_max_rows_per_s=m.drift.max_rows_per_s if m.drift else None,
        gpu_count=m.gpu.count if m.gpu else 0,
        gpu_resource=m.gpu.resource if m.gpu else "nvidia.com/gpu",
        priority_class_name=PRIORITY_MODELS,
        topology_spread=cfg.prod,
        port=MODEL_PORT,
        ingress_host=cfg.ingress.domain,
        ingress_class_name=cfg.ingress.class_name,
        ingress_tls_secret=cfg.ingress.tls_secret,
        ingress_namespace=cfg.namespaces.ingress,
        monitoring_namespace=cfg.namespaces.monitoring,
        canary=CanaryArgs(image=canary[0], model_version=canary[1], weight=m.canary.weight)
        if canary is not None and m.canary is not None
        else None,
        load_autoscaling=load,
    )


def load_autoscaling(
    m: ModelConfig, prometheus: pulumi.Input[str], depends_on: tuple[pulumi.Resource, ...] = ()
) -> LoadAutoscaling | None:
    """The model's ``autoscaling`` entry for its ScaledObject (None: the CPU HPA); ``depends_on``: KEDA's release."""
    if m.autoscaling is None or m.load_target is None:
        return None
    return LoadAutoscaling(
        metric=m.autoscaling.metric, target=m.load_target, server_address=prometheus, depends_on=depends_on
    )


# -------------------------------------------------------------------------------------------------


def resolve_models(cfg: StackConfig, registry: ModelResolver) -> dict[str, ResolvedModel]:
    """Every reference of the stack (mains and canaries) resolved once; one error lists every problem."""
    refs = sorted({m.model for m in cfg.models} | {m.canary.model for m in cfg.models if m.canary})
    out: dict[str, ResolvedModel] = {}
    problems = []
    if not refs:
        return out
    try:
        view = registry.snapshot()  # one index read for every reference (an object store: one GET)
    except UserError as exc:  # unreachable, missing bucket, bad credentials: one line, before any resource
        raise UserError(f"the model registry cannot be read: {exc.message}") from None
    for ref in refs:
        try:
            out[ref] = view.resolve(ref)
        except UserError as exc:
            problems.append(f"{ref}: {exc.message}")
    for i, m in enumerate(cfg.models):
        checks = [("model", m.model)] + ([("canary.model", m.canary.model)] if m.canary else [])
        for key, ref in checks:
            mv = out.get(ref)
            if mv is not None and str(mv.framework) != m.framework.value:
                problems.append(
                    f"dlstack:models[{i}].{key}: {ref} is a {mv.framework} model, but framework says "
                    f"{m.framework.value}; fix the framework key"
                )
    if problems:
        raise UserError(
            "model references could not be resolved (register them with `dlstack models register` "
            "or `make example`):\n  " + "\n  ".join(problems)
        )
    return out


def _image(cfg: StackConfig, name: str, mv: ResolvedModel, digest: str | None, opts: BuildOptions) -> ModelImage:
    return ModelImage(
        name,
        ModelImageArgs(
            model_name=mv.name,
            version=mv.version,
            framework=str(mv.framework),
            model_sha256=mv.sha256,
            registry=cfg.images.registry,
            push=cfg.images.push,
            build_root=opts.build_root,
            export=mv.export if opts.prepare_images else None,
            image_digest=digest,
        ),
    )


def _platform_ingress(
    cfg: StackConfig, name: str, namespace: str, host: str, service: str, port: int, extra: dict[str, str], opts: Any
) -> k8s.networking.v1.Ingress:
    """An Ingress for a platform UI (Kibana, Grafana) on its own host under the stack's domain."""
    spec: dict[str, Any] = {
        "ingressClassName": cfg.ingress.class_name,
        "rules": [
            {
                "host": host,
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {"service": {"name": service, "port": {"number": port}}},
                        }
                    ]
                },
            }
        ],
    }
    if cfg.ingress.tls:
        spec["tls"] = [{"hosts": [host], "secretName": f"{host}-tls"}]
    return k8s.networking.v1.Ingress(
        f"{name}-ingress",
        metadata=_k(
            {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/part-of": "dlstack", "app.kubernetes.io/managed-by": "pulumi"},
                "annotations": extra,
            }
        ),
        spec=_k(spec),
        opts=opts,
    )


def build(cfg: StackConfig, registry: ModelResolver, options: BuildOptions | None = None) -> dict[str, Any]:
    """Create every resource of the stack; returns the stack outputs (Outputs or plain values)."""
    opts = options or BuildOptions()
    models = resolve_models(cfg, registry)  # fails before anything is created
    ns = cfg.namespaces

    provider = k8s.Provider(
        "kubernetes",
        context=cfg.kubernetes.context,
        enable_server_side_apply=True,
        delete_unreachable=False,
    )
    providers = {"kubernetes": provider}
    root = pulumi.ResourceOptions(providers=providers)

    baseline = ClusterBaseline("baseline", baseline_args(cfg), root)
    after_baseline = pulumi.ResourceOptions(providers=providers, depends_on=[baseline])
    # Models wait for exactly what their pods need (namespace, priority classes, quota defaults):
    # depending on the whole baseline component makes every model await its ~60 children.
    for_models = pulumi.ResourceOptions(
        providers=providers,
        depends_on=[
            baseline.namespaces["models"],
            *baseline.priority_classes,
            baseline.resource_quota,
            baseline.limit_range,
        ],
    )

    observability = _observability(cfg, after_baseline)
    keda = (baseline.keda,) if baseline.keda is not None else ()

    outputs: dict[str, Any] = {"environment": cfg.environment, "models": {}}
    for m in cfg.models:
        mv = models[m.model]
        image = _image(cfg, f"{m.name}-image", mv, m.image.digest if m.image else None, opts)
        canary: tuple[pulumi.Input[str], str] | None = None
        canary_image: ModelImage | None = None
        if m.canary is not None:
            cmv = models[m.canary.model]
            pinned = m.image.canary_digest if m.image else None
            canary_image = _image(cfg, f"{m.name}-canary-image", cmv, pinned, opts)
            canary = (canary_image.ref, cmv.version)
        ModelService(
            m.name,
            # Deployments run the digest-pinned ref: exactly the image that was built (or promoted).
            model_service_args(
                cfg, m, image.ref, mv.version, canary, load_autoscaling(m, observability["prometheus"], keda)
            ),
            for_models,
        )
        entry: dict[str, Any] = {
            "model": mv.name,
            "version": mv.version,
            "sha256": mv.sha256,
            "image": image.ref,
            "url": cfg.ingress.model_url(m.name),
        }
        if canary_image is not None and m.canary is not None:
            entry["canary"] = {
                "version": canary[1] if canary else "",
                "image": canary_image.ref,
                "weight": m.canary.weight,
            }
        outputs["models"][m.name] = entry
    outputs["kibana_url"] = cfg.ingress.url("kibana")
    outputs["grafana_url"] = cfg.ingress.url("grafana")
    outputs["namespaces"] = {
        "models": ns.models,
        "logging": ns.logging,
        "monitoring": ns.monitoring,
        "ingress": ns.ingress,
    }
    return outputs


def _observability(cfg: StackConfig, opts: pulumi.ResourceOptions) -> dict[str, Any]:
    """Logging (ECK) and Monitoring (kube-prometheus-stack) plus Ingresses for Kibana and Grafana."""
    from infra.logging import Logging, LoggingArgs
    from infra.monitoring import Monitoring, MonitoringArgs, slos_for

    ns = cfg.namespaces
    lg, mon = cfg.logging, cfg.monitoring
    secret_conf = pulumi.Config("dlstack")
    grafana_password = secret_conf.get_secret("grafana_admin_password")  # None: Monitoring generates one
    logging = Logging(
        "logging",
        LoggingArgs(
            namespace=ns.logging,
            models_namespace=ns.models,
            version=lg.version,
            retention_days=lg.retention_days,
            predictions_retention_days=lg.predictions_retention_days,
            es_nodes=lg.elasticsearch.nodes,
            es_cpu=lg.elasticsearch.cpu,
            es_memory=lg.elasticsearch.memory,
            es_storage=lg.elasticsearch.storage,
            kibana_replicas=lg.kibana_replicas,
            logstash_replicas=lg.logstash_replicas,
        ),
        opts,
    )
    monitoring = Monitoring(
        "monitoring",
        MonitoringArgs(
            namespace=ns.monitoring,
            # Models that scale on load get the short-window rules their ScaledObject queries.
            models=tuple(
                dataclasses.replace(slo, load_rules=m.autoscaling is not None, drift=m.drift is not None)
                for slo, m in zip(slos_for(cfg.models, ns.models), cfg.models, strict=True)
            ),
            retention=mon.retention,
            storage=mon.storage,
            prometheus_replicas=mon.prometheus_replicas,
            prometheus_cpu=mon.prometheus_cpu,
            prometheus_memory=mon.prometheus_memory,
            alertmanager_replicas=mon.alertmanager_replicas,
            grafana_replicas=mon.grafana_replicas,
            grafana_admin_password=grafana_password,
        ),
        opts,
    )
    kibana = _platform_ingress(
        cfg,
        "kibana",
        ns.logging,
        cfg.ingress.host("kibana"),
        logging.args.kibana_service,
        5601,
        {"nginx.ingress.kubernetes.io/backend-protocol": "HTTPS"},  # ECK serves Kibana over TLS
        pulumi.ResourceOptions(parent=logging),
    )
    grafana = _platform_ingress(
        cfg,
        "grafana",
        ns.monitoring,
        cfg.ingress.host("grafana"),
        f"{monitoring.args.release_name}-grafana",
        80,
        {},
        pulumi.ResourceOptions(parent=monitoring),
    )
    return {
        "logging": logging,
        "monitoring": monitoring,
        "kibana_ingress": kibana,
        "grafana_ingress": grafana,
        "prometheus": monitoring.prometheus_service,
    }
