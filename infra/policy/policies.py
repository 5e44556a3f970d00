"""The checks a reviewer would do by hand, as plain functions over Kubernetes object dicts.

Each resource rule takes one object (camelCase, as rendered or as the Pulumi engine sees the inputs)
and the environment ("dev" or "prod") and returns violation messages; an empty list means the object
passes. The stack rule takes every object at once. ``__main__.py`` wraps them for pulumi-policy; the
tests call them directly and through the wrappers. Standard library only: the policy pack's own
virtualenv does not have dlstack installed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

ALLOW_LB_ANNOTATION = "dlstack.io/allow-load-balancer"
POD_TEMPLATE_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}\Z")  # \Z: "$" would let a trailing newline through

Obj = Mapping[str, Any]
ResourceRule = Callable[[Obj, str], list[str]]


def environment(config: Mapping[str, Any], stack: str | None) -> str:
    """``prod`` or ``dev``: the policy config ``environment`` wins, else a stack named ``prod``/``prod-*``."""
    value = config.get("environment")
    if value in ("dev", "prod"):
        return str(value)
    if stack and (stack == "prod" or stack.startswith("prod-")):
        return "prod"
    return "dev"


def stack_of_urn(urn: str) -> str | None:
    """``urn:pulumi:<stack>::<project>::<type>::<name>`` -> ``<stack>``."""
    if not urn.startswith("urn:pulumi:"):
        return None
    return urn[len("urn:pulumi:") :].split("::", 1)[0] or None


def _name(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')}/{meta.get('name', '?')}"


def pod_spec(obj: Obj) -> Mapping[str, Any] | None:
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind in POD_TEMPLATE_KINDS:
        return (spec.get("template") or {}).get("spec") or {}
    if kind == "CronJob":
        return ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    return None


def _containers(spec: Mapping[str, Any], init: bool = True) -> list[Mapping[str, Any]]:
    keys = ("initContainers", "containers") if init else ("containers",)
    return [c for k in keys for c in spec.get(k) or []]


# ---------------------------------------------------------------------------------------------
# resource rules


def requests_and_limits(obj: Obj, env: str) -> list[str]:
    """Every container sets CPU and memory requests and limits (scheduling, quota, no noisy neighbours)."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    out = []
    for c in _containers(spec):
        res = c.get("resources") or {}
        for side in ("requests", "limits"):
            missing = [r for r in ("cpu", "memory") if not (res.get(side) or {}).get(r)]
            if missing:
                out.append(
                    f"{_name(obj)}: container {c.get('name')} has no {side} for {', '.join(missing)}; "
                    f"set resources.{side}.{missing[0]}"
                )
    return out


def pinned_images(obj: Obj, env: str) -> list[str]:
    """No ``:latest`` or untagged images; in prod every image is pinned by digest (what was tested runs)."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    out = []
    for c in _containers(spec):
        image = str(c.get("image") or "")
        where = f"{_name(obj)}: container {c.get('name')} image {image!r}"
        digest = bool(_DIGEST.search(image))
        last = image.rsplit("/", 1)[-1].split("@", 1)[0]
        tag = last.split(":", 1)[1] if ":" in last else ""
        if not image:
            out.append(f"{where}: no image set")
        elif tag == "latest":
            out.append(f"{where}: uses :latest; pin a version tag (dev) or a digest (prod)")
        elif env == "prod" and not digest:
            out.append(f"{where}: prod needs a digest (repo@sha256:...); promote the image with `dlstack promote`")
        elif not tag and not digest:
            out.append(f"{where}: has no tag or digest (means :latest); pin a version")
    return out


def probes(obj: Obj, env: str) -> list[str]:
    """Long-running containers have readiness and liveness probes (traffic only to ready pods, restarts)."""
    if obj.get("kind") not in LONG_RUNNING_KINDS:
        return []
    spec = pod_spec(obj) or {}
    out = []
    for c in _containers(spec, init=False):
        missing = [p for p in ("readinessProbe", "livenessProbe") if not c.get(p)]
        if missing:
            out.append(f"{_name(obj)}: container {c.get('name')} has no {' or '.join(missing)}; add an HTTP probe")
    return out


def non_root(obj: Obj, env: str) -> list[str]:
    """Containers run as non-root: runAsNonRoot true (pod or container) and never runAsUser 0."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    psc = spec.get("securityContext") or {}
    out = []
    for c in _containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.append(f"{_name(obj)}: container {c.get('name')} does not set runAsNonRoot: true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{_name(obj)}: container {c.get('name')} runs as UID 0; use a numeric non-root UID")
    return out


def load_balancer_allowed(obj: Obj, env: str) -> list[str]:
    """A LoadBalancer Service (a public IP, a cloud bill) needs an explicit, reviewed annotation."""
    if obj.get("kind") != "Service" or (obj.get("spec") or {}).get("type") != "LoadBalancer":
        return []
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    if annotations.get(ALLOW_LB_ANNOTATION) == "true":
        return []
    return [
        f'{_name(obj)}: type LoadBalancer needs the annotation {ALLOW_LB_ANNOTATION}: "true" '
        "(or use the ingress controller)"
    ]


RESOURCE_RULES: dict[str, tuple[str, ResourceRule]] = {
    "requests-and-limits": ("Containers set CPU and memory requests and limits.", requests_and_limits),
    "pinned-images": ("No :latest or untagged images; digests in prod.", pinned_images),
    "probes": ("Long-running containers have readiness and liveness probes.", probes),
    "non-root": ("Containers run as a non-root user.", non_root),
    "no-unapproved-load-balancer": ("LoadBalancer Services need an explicit allow annotation.", load_balancer_allowed),
}


# ---------------------------------------------------------------------------------------------
# stack rule


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    match = selector.get("matchLabels") or {}
    if not match and not selector.get("matchExpressions"):
        return False  # an empty selector in a PDB selects everything: too broad to count
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values):
            return False
        if (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def _autoscaler_target(obj: Obj) -> tuple[str, str, str] | None:
    """(namespace, kind, name) an HPA or a KEDA ScaledObject scales; None for any other object.

    A ScaledObject's scaleTargetRef.kind defaults to Deployment (KEDA's default).
    """
    kind = obj.get("kind")
    if kind == "HorizontalPodAutoscaler":
        default = ""
    elif kind == "ScaledObject" and str(obj.get("apiVersion", "")).startswith("keda.sh/"):
        default = "Deployment"
    else:
        return None
    ref = (obj.get("spec") or {}).get("scaleTargetRef") or {}
    return (obj.get("metadata") or {}).get("namespace") or "", ref.get("kind") or default, ref.get("name") or ""


def _min_replicas(obj: Obj) -> int:
    spec = obj.get("spec") or {}
    if obj.get("kind") == "ScaledObject":
        return int(spec.get("minReplicaCount", 0))  # KEDA's default is 0: scale to zero
    return int(spec.get("minReplicas", 1))


def prod_high_availability(objs: Iterable[Obj], env: str) -> list[str]:
    """Prod: every Deployment runs >= 2 replicas (spec.replicas, or its autoscaler's minimum) and has a PDB."""
    if env != "prod":
        return []
    objs = list(objs)
    scalers = [o for o in objs if _autoscaler_target(o) is not None]
    pdbs = [o for o in objs if o.get("kind") == "PodDisruptionBudget"]
    out = []
    for d in (o for o in objs if o.get("kind") == "Deployment"):
        meta = d.get("metadata") or {}
        name, ns = meta.get("name"), meta.get("namespace")
        spec = d.get("spec") or {}
        replicas = spec.get("replicas")
        for h in scalers:
            if _autoscaler_target(h) == (ns or "", "Deployment", name):
                replicas = _min_replicas(h)
        if replicas is None:
            replicas = 1  # the API default
        if replicas < 2:
            out.append(f"Deployment/{name}: prod needs at least 2 replicas (got {replicas}); raise replicas.min")
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        covered = any(
            (p.get("metadata") or {}).get("namespace") == ns
            and _selects((p.get("spec") or {}).get("selector") or {}, labels)
            for p in pdbs
        )
        if not covered:
            out.append(f"Deployment/{name}: prod needs a PodDisruptionBudget selecting its pods")
    return out


def one_autoscaler(objs: Iterable[Obj], env: str) -> list[str]:
    """A workload has at most one autoscaler: an HPA and a KEDA ScaledObject (or two of either) on the same
    Deployment overwrite each other's replica count, so it flaps between their answers."""
    by_target: dict[tuple[str, str, str], list[str]] = {}
    for o in objs:
        target = _autoscaler_target(o)
        if target is not None:
            by_target.setdefault(target, []).append(_name(o))
    return [
        f"{kind}/{name} in {ns or 'the default namespace'} has {len(owners)} autoscalers ({', '.join(owners)}); "
        "keep one: `autoscaling:` in the model's entry replaces the CPU HPA"
        for (ns, kind, name), owners in sorted(by_target.items())
        if len(owners) > 1
    ]


STACK_RULES: dict[str, tuple[str, Callable[[Iterable[Obj], str], list[str]]]] = {
    "prod-high-availability": (
        "Prod Deployments run >= 2 replicas and have a PodDisruptionBudget.",
        prod_high_availability,
    ),
    "one-autoscaler": (
        "A workload is scaled by one autoscaler (an HPA or a KEDA ScaledObject), never by two.",
        one_autoscaler,
    ),
}
