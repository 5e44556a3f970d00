"""Judging manifests with tools we did not write: kubernetes-validate (built-in kinds), the strict CRD
schemas vendored in tests/schemas (custom resources), a Pod Security Standards "restricted" checker, a
recording Pulumi mock for rendering single components, and the whole dev/prod render (``stacks.render``
over a real registry of tiny models), made once per test process and shared by the judging modules.

The PSS checker follows https://kubernetes.io/docs/concepts/security/pod-security-standards/
(baseline + restricted, v1.31), one function per control so a failure names the control.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pulumi
from jsonschema.validators import validator_for

SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S_VERSIONS = ("1.31", "1.34")  # the minors dlstack supports; kubernetes-validate has v1.31.0/v1.34.0 schemas
_SECRET_SIG = "4dabf18193072939515e22adb298388d"  # pulumi's marker for a secret value on the wire

POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


# ---------------------------------------------------------------------------------------------
# Recording Pulumi mocks (until stacks.render exists, and for component tests)


@dataclass
class Recorded:
    type: str  # pulumi type token, e.g. kubernetes:apps/v1:Deployment
    name: str  # pulumi resource name
    inputs: dict[str, Any]  # inputs as sent to the engine (camelCase for k8s objects), secrets unwrapped
    secret_paths: list[str] = field(default_factory=list)  # dotted paths whose value was marked secret

    @property
    def kind(self) -> str:
        return str(self.inputs.get("kind", self.type.rsplit(":", 1)[-1]))

    @property
    def obj_name(self) -> str:
        return str(self.inputs.get("metadata", {}).get("name", ""))


def plain(value: Any, secrets: list[str] | None = None, path: str = "") -> Any:
    """Engine wire values -> plain JSON: secrets unwrapped (their paths noted), integral floats back to ints."""
    if isinstance(value, dict):
        if value.get(_SECRET_SIG) == "1b47061264138c4ac30d75fd1eb44270":
            if secrets is not None:
                secrets.append(path)
            return plain(value.get("value"), secrets, path)
        return {k: plain(v, secrets, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v, secrets, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


@dataclass
class RecordingMocks(pulumi.runtime.Mocks):
    records: list[Recorded] = field(default_factory=list)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        secrets: list[str] = []
        inputs = plain(dict(args.inputs), secrets)
        self.records.append(Recorded(args.typ, args.name, inputs, secrets))
        outputs = dict(inputs)
        if args.typ == "random:index/randomPassword:RandomPassword":
            outputs["result"] = "x" * int(inputs.get("length", 16))
        outputs.setdefault("metadata", {"name": args.name})
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        return {}, None


def record(program: Callable[[], Any], stack: str = "dev") -> list[Recorded]:
    """Run ``program`` (which creates resources) under recording mocks and return what it created."""
    mocks = RecordingMocks()
    pulumi.runtime.set_mocks(mocks, project="dlstack", stack=stack, preview=False)

    @pulumi.runtime.test
    def run() -> Any:
        return program()

    run()
    return mocks.records


def manifests(records: Iterable[Recorded]) -> list[dict[str, Any]]:
    """The Kubernetes objects among the records (Helm releases and non-k8s resources skipped)."""
    out = []
    for r in records:
        if r.type.startswith("kubernetes:") and "apiVersion" in r.inputs and "kind" in r.inputs:
            out.append(r.inputs)
    return out


def find(objs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o.get("kind") == kind and (name is None or o.get("metadata", {}).get("name") == name)]


def one(objs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# Validators


def is_custom_resource(obj: dict[str, Any]) -> bool:
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    return bool(group) and "." in group and not group.endswith(".k8s.io")


def kubernetes_errors(obj: dict[str, Any], version: str, strict: bool = True) -> list[str]:
    """kubernetes-validate's verdict for a built-in kind (empty list = valid)."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    try:
        kubernetes_validate.validate(obj, version, strict=strict)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "<root>"
        return [f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {where}: {exc.message}"]
    except SchemaNotFoundError as exc:
        return [f"no Kubernetes {version} schema: {exc.message}"]
    return []


@cache
def _crd_validator(api_version: str, kind: str, strict: bool) -> Any:
    group, _, version = api_version.rpartition("/")
    path = SCHEMAS / f"{group}_{version}_{kind.lower()}{'-strict' if strict else ''}.json"
    schema = json.loads(path.read_text())
    return validator_for(schema)(schema)


def crd_errors(obj: dict[str, Any], strict: bool = True) -> list[str]:
    """Errors against the upstream CRD schema (tests/schemas); raises FileNotFoundError for an unknown kind."""
    validator = _crd_validator(obj["apiVersion"], obj["kind"], strict)
    return [
        f"{obj['kind']}/{obj.get('metadata', {}).get('name')}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: "
        f"{e.message}"
        for e in validator.iter_errors(obj)
    ]


def manifest_errors(obj: dict[str, Any], versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    if is_custom_resource(obj):
        return crd_errors(obj)
    return [e for v in versions for e in kubernetes_errors(obj, v)]


# ---------------------------------------------------------------------------------------------
# Pod Security Standards: restricted


def pod_spec_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj.get("kind")
    spec = obj.get("spec", {})
    if kind == "Pod":
        return dict(spec)
    if kind in POD_TEMPLATE_KINDS:
        return dict(spec.get("template", {}).get("spec", {}))
    if kind == "CronJob":
        return dict(spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {}))
    return None


RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            out.append((f"{key}[{c.get('name')}]", c))
    return out


def pss_restricted_violations(spec: dict[str, Any]) -> list[str]:
    """Every way a pod spec breaks Pod Security "restricted" (baseline included); empty = compliant."""
    v: list[str] = []
    psc = spec.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            v.append(f"{host} must be false")
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        bad = kinds - RESTRICTED_VOLUME_TYPES
        if bad:
            v.append(f"volume {vol.get('name')}: type {sorted(bad)} is not allowed (restricted volume types only)")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            v.append(f"sysctl {sysctl.get('name')} is not in the safe set")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        v.append("windowsOptions.hostProcess must be false")
    v += _selinux("pod", psc.get("seLinuxOptions"))
    v += _apparmor("pod", psc.get("appArmorProfile"))
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp == "Unconfined":
        v.append("pod seccompProfile must not be Unconfined")
    if psc.get("runAsUser") == 0:
        v.append("pod runAsUser must not be 0")
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            v.append(f"{where}: privileged must be false")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            v.append(f"{where}: windowsOptions.hostProcess must be false")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                v.append(f"{where}: hostPort {p['hostPort']} is not allowed")
        if sc.get("procMount", "Default") != "Default":
            v.append(f"{where}: procMount must be Default")
        v += _selinux(where, sc.get("seLinuxOptions"))
        v += _apparmor(where, sc.get("appArmorProfile"))
        if sc.get("allowPrivilegeEscalation") is not False:
            v.append(f"{where}: allowPrivilegeEscalation must be false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            v.append(f"{where}: runAsNonRoot must be true (pod or container securityContext)")
        if sc.get("runAsUser") == 0:
            v.append(f"{where}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            v.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost (got {seccomp})")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            v.append(f"{where}: capabilities.drop must include ALL")
        extra = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if extra:
            v.append(f"{where}: capabilities.add may only contain NET_BIND_SERVICE (got {sorted(extra)})")
    return v


def _selinux(where: str, opts: dict[str, Any] | None) -> list[str]:
    if not opts:
        return []
    v = []
    if opts.get("type", "") not in SELINUX_TYPES:
        v.append(f"{where}: seLinuxOptions.type {opts.get('type')} is not allowed")
    if opts.get("user") or opts.get("role"):
        v.append(f"{where}: seLinuxOptions.user/role must be unset")
    return v


def _apparmor(where: str, profile: dict[str, Any] | None) -> list[str]:
    if profile and profile.get("type") not in ("RuntimeDefault", "Localhost"):
        return [f"{where}: appArmorProfile.type must be RuntimeDefault or Localhost"]
    return []


# ---------------------------------------------------------------------------------------------
# Reading a render directory (stacks.render): DIR/manifests/**.{yaml,yml,json}


def load_manifests(directory: Path) -> list[dict[str, Any]]:
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    out: list[dict[str, Any]] = []
    for path in sorted(directory.rglob("*")):
        if path.suffix in (".yaml", ".yml"):
            out += [d for d in yaml.load_all(path.read_text()) if isinstance(d, dict)]
        elif path.suffix == ".json":
            doc = json.loads(path.read_text())
            out += doc if isinstance(doc, list) else [doc]
    return [d for d in out if "apiVersion" in d and "kind" in d]


# ---------------------------------------------------------------------------------------------
# The whole render of a stack (stacks.render, the same code as `dlstack render`), with a real registry


def stack_registry(root: Path, stacks: Iterable[str] = ("dev", "prod")) -> Any:
    """A real registry under ``root`` holding every model version the stacks reference (tiny TorchScript MLPs)."""
    from services.registry import Registry
    from stacks.config import load_stack_config
    from tests.conftest import make_torch_mlp_artifact

    wanted: dict[tuple[str, str], str] = {}
    for stack in stacks:
        cfg = load_stack_config(stack)
        for m in cfg.models:
            for ref in [m.model] + ([m.canary.model] if m.canary else []):
                name, version = re.split(r"[:@]", ref, maxsplit=1)
                wanted[(name, version)] = m.framework.value
    registry = Registry(root / "registry")
    for (name, version), framework in sorted(wanted.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        assert framework == "pytorch", "the stack registry only builds TorchScript models"
        have = {v.version for v in registry.versions(name)} if name in registry.names() else set()
        while version not in have:
            assert len(have) < 10, f"{name}:{version} is too far ahead for the test registry"
            art = make_torch_mlp_artifact(root / "artifacts" / f"{name}-{len(have) + 1}", name=name, seed=len(have))
            registry.register(art, name, framework)
            have = {v.version for v in registry.versions(name)}
    return registry


def render_stack(stack: str, out: Path, registry: Any = None) -> Path:
    """Render ``stack`` into ``out`` with ``stacks.render`` and return the manifests directory."""
    from stacks.render import render

    render(stack, out, registry=registry if registry is not None else stack_registry(out))
    return out / "manifests"


_RENDER_ROOT: list[Path] = []


def _cleanup_renders() -> None:
    import shutil

    for root in _RENDER_ROOT:
        shutil.rmtree(root, ignore_errors=True)


@cache
def _shared_registry() -> Any:
    return stack_registry(_render_root() / "registry")


def _render_root() -> Path:
    import atexit
    import tempfile

    if not _RENDER_ROOT:
        _RENDER_ROOT.append(Path(tempfile.mkdtemp(prefix="dlstack-render-")))
        atexit.register(_cleanup_renders)
    return _RENDER_ROOT[0]


@cache
def rendered_manifests(stack: str) -> Path:
    """The whole render of ``stack``, made once per test process and shared by the judging test modules
    (they run in one xdist group, so dev and prod are each rendered once per suite run)."""
    return render_stack(stack, _render_root() / stack, _shared_registry())
