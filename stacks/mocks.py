"""Pulumi mocks that record every resource, and a runner that evaluates a program with them.

Used by the offline render (``dlstack render``) and by the tests. The mock answers the way the
real providers would for what the program reads back: Kubernetes objects get their
``metadata.name`` (there are no auto-names under mocks; without it references resolve to nothing),
images a deterministic fake digest, random passwords a fixed mask. Nothing depends on time or
randomness, so two evaluations of the same input record the same resources.

Speed: Pulumi's stock ``MockMonitor`` deserializes every resource's inputs into Python, calls
``Mocks.new_resource`` and serializes the answer back (an event loop per RPC thread); the SDK
then turns the whole answer into typed outputs. ``RecordingMonitor`` keeps the inputs as the
protobuf ``Struct`` the SDK sent (decoded lazily, once, when the render reads them) and answers
with only the identity fields programs read back (apiVersion, kind, metadata). That halves the
cost per resource, which dominates the render time (see tests/bench/render_bench.py).

Pulumi's runtime settings are process-global (context variables plus a root stack resource);
``run_program`` evaluates each program in a fresh ``contextvars.Context``, so it can be called
any number of times in one process.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import gc
import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pulumi
from google.protobuf import json_format, struct_pb2
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime.proto import resource_pb2

MASK = "<masked: secret>"  # what every secret value looks like in a render
K8S_PREFIX = "kubernetes:"
HELM_RELEASE = "kubernetes:helm.sh/v3:Release"
DOCKER_IMAGE = "docker-build:index:Image"
RANDOM_PASSWORD = "random:index/randomPassword:RandomPassword"
STACK = "pulumi:pulumi:Stack"

# Pulumi's wire encoding of special values (pulumi/runtime/rpc.py).
_SIG = "4dabf18193072939515e22adb298388d"
_SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
_RESOURCE_SIG = "5cf8f73096256a8f31e491e813e4eb8e"
_UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"


def _plain(value: Any, *, secrets: str | None) -> Any:
    """A wire value as plain Python: secrets masked (or unwrapped when ``secrets`` is None), ints as ints."""
    if isinstance(value, dict):
        sig = value.get(_SIG)
        if sig == _SECRET_SIG:
            inner = _plain(value.get("value"), secrets=None)
            if secrets is None:
                return inner
            # A secret map (e.g. a Secret's stringData) keeps its keys, so the object stays valid.
            return dict.fromkeys(sorted(inner), secrets) if isinstance(inner, dict) else secrets
        if sig == _RESOURCE_SIG:
            return value.get("id") or value.get("urn")
        return {k: _plain(v, secrets=secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, secrets=secrets) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # the wire has one number type; Kubernetes fields are integers
    if value == _UNKNOWN:
        return "<unknown>"
    return value


@dataclass
class Recorded:
    """One registered resource: type token, logical name, parent URN and its inputs as sent."""

    typ: str  # e.g. "kubernetes:apps/v1:Deployment"
    name: str  # the Pulumi logical name
    custom: bool  # False for ComponentResources
    parent: str  # parent URN ("" for the stack's direct children)
    urn: str
    wire: struct_pb2.Struct  # the inputs exactly as the SDK serialized them
    answer: dict[str, Any] = field(default_factory=dict)  # what the mock added to the inputs
    _inputs: dict[str, Any] | None = None

    @property
    def inputs(self) -> dict[str, Any]:
        """Inputs as plain data; secret values are replaced by ``MASK``."""
        if self._inputs is None:
            self._inputs = _plain(json_format.MessageToDict(self.wire), secrets=MASK)
        return self._inputs

    @property
    def is_k8s_object(self) -> bool:
        return (
            self.custom
            and self.typ.startswith(K8S_PREFIX)
            and self.typ != HELM_RELEASE
            and "kind" in self.wire.fields
            and "apiVersion" in self.wire.fields
        )


def fake_digest(*parts: str) -> str:
    return "sha256:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


class RecordingMocks(pulumi.runtime.Mocks):
    """Records every resource; answers like the providers for the fields programs read back."""

    def __init__(self) -> None:
        self.resources: list[Recorded] = []
        self._lock = threading.Lock()

    # The stock path (used by pulumi's MockMonitor if someone plugs these mocks into it).
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        wire = struct_pb2.Struct()
        wire.update(args.inputs)
        answer = self.answer(args.typ, args.name, wire)
        return f"{args.name}-id", {**args.inputs, **answer}

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        return {}, None

    def answer(self, typ: str, name: str, wire: struct_pb2.Struct) -> dict[str, Any]:
        """The fields a provider would add or that programs read back."""
        f = wire.fields
        if typ == HELM_RELEASE:
            ns = f["namespace"].string_value if "namespace" in f else "default"
            return {"status": {"name": f["name"].string_value if "name" in f else name, "namespace": ns}}
        if typ == DOCKER_IMAGE:
            tags = [v.string_value for v in f["tags"].list_value.values] if "tags" in f else []
            args = json_format.MessageToJson(f["buildArgs"], sort_keys=True) if "buildArgs" in f else ""
            digest = fake_digest(name, *tags, args)
            return {"digest": digest, "ref": f"{tags[0].rsplit(':', 1)[0]}@{digest}" if tags else digest}
        if typ == RANDOM_PASSWORD:
            return {"result": MASK, "bcryptHash": MASK}
        return {}

    def record(self, rec: Recorded) -> None:
        with self._lock:
            self.resources.append(rec)

    # -- queries used by tests and the render ----------------------------------------------------

    def of_type(self, typ: str) -> list[Recorded]:
        return [r for r in self.resources if r.typ == typ]

    def k8s_objects(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = [r.inputs for r in self.resources if r.is_k8s_object]
        return [o for o in out if kind is None or o["kind"] == kind]

    def k8s_object(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        for obj in self.k8s_objects(kind):
            meta = obj.get("metadata") or {}
            if meta.get("name") == name and (namespace is None or meta.get("namespace") == namespace):
                return obj
        raise KeyError(f"no {kind} {namespace}/{name} was registered")


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """A MockMonitor that records the wire inputs and answers with identity fields only."""

    mocks: RecordingMocks

    def __init__(self, mocks: RecordingMocks) -> None:
        super().__init__(mocks)

    def RegisterResource(self, request: Any) -> Any:
        urn = self.make_urn(request.parent, request.type, request.name)
        if request.type == STACK:
            return resource_pb2.RegisterResourceResponse(urn=urn)
        wire = struct_pb2.Struct()
        wire.CopyFrom(request.object)
        rec = Recorded(request.type, request.name, bool(request.custom), request.parent, urn, wire)
        state = struct_pb2.Struct()
        if request.type.startswith(K8S_PREFIX) and request.type != HELM_RELEASE:
            for key in ("apiVersion", "kind"):
                if key in wire.fields:
                    state.fields[key].CopyFrom(wire.fields[key])
            # Only the identity of the object: programs read names back, and every extra field
            # (labels, annotations) is turned into typed outputs by the SDK for nothing.
            meta = state.fields["metadata"].struct_value
            sent = wire.fields["metadata"].struct_value.fields if "metadata" in wire.fields else {}
            for key in ("name", "namespace"):
                if key in sent:
                    meta.fields[key].CopyFrom(sent[key])
            if "name" not in meta.fields:  # no auto-naming under mocks: keep references resolvable
                meta.fields["name"].string_value = request.name
        elif request.custom:
            state.CopyFrom(wire)
            rec.answer = self.mocks.answer(request.type, request.name, wire)
            state.update(rec.answer)
        self.mocks.record(rec)
        id_ = f"{request.name}-id" if request.custom else ""
        self.resources[urn] = pulumi_mocks.MockMonitor.ResourceRegistration(urn, id_, {})
        return resource_pb2.RegisterResourceResponse(urn=urn, id=id_, object=state)


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a program registers thousands of resources.

    Every resource leaves thousands of live futures, tasks and Outputs; each full collection walks
    all of them, which made render time grow faster than linearly (200 models: 11.2 s CPU with the
    collector on, 6.8 s with it off). Everything is freed once the evaluation is over.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each submitted call at once on the calling thread.

    The SDK sends every RPC to the default executor; with the in-process monitor those calls are
    short and CPU-bound, so threads only add GIL hand-offs and event-loop wake-ups.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut


@contextmanager
def _fast_sdk() -> Iterator[None]:
    """SDK work that means nothing offline is skipped for the duration of one mocked evaluation.

    * source positions: the SDK runs ``traceback.extract_stack`` for every resource;
    * unknown scans: each Output walks its whole value looking for preview "unknowns", which
      cannot exist here (no preview, and the monitor never answers with unknowns);
    * RPC threads: see ``_InlineExecutor``.
    Together with ``gc_paused`` this roughly halves the CPU time of a render.
    """
    from pulumi import output as pulumi_output
    from pulumi.runtime import resource as runtime_resource
    from pulumi.runtime.proto import source_pb2
    from pulumi.runtime.sync_await import _ensure_event_loop

    stack_trace, unknowns = runtime_resource._get_stack_trace, pulumi_output.contains_unknowns
    loop = _ensure_event_loop()
    executor = getattr(loop, "_default_executor", None)
    runtime_resource._get_stack_trace = source_pb2.StackTrace  # type: ignore[assignment]
    pulumi_output.contains_unknowns = lambda _value: False  # type: ignore[assignment]
    loop.set_default_executor(_InlineExecutor(max_workers=1))
    try:
        yield
    finally:
        runtime_resource._get_stack_trace = stack_trace
        pulumi_output.contains_unknowns = unknowns
        loop._default_executor = executor  # type: ignore[attr-defined]


def run_program(
    program: Callable[[], Any],
    *,
    project: str = "dlstack",
    stack: str = "dev",
    config: dict[str, str] | None = None,
    mocks: RecordingMocks | None = None,
) -> tuple[RecordingMocks, Any]:
    """Evaluate ``program`` under mocks and wait until every resource is registered.

    Returns the mocks (with every recorded resource) and the program's return value with all
    Outputs resolved to plain values. Exceptions raised by the program propagate.
    """
    mocks = mocks if mocks is not None else RecordingMocks()
    ctx = contextvars.Context()  # fresh settings, root stack and config for every evaluation
    with _fast_sdk(), gc_paused():
        result = ctx.run(_run, program, mocks, project, stack, config or {})
    return mocks, result


def _run(program: Callable[[], Any], mocks: RecordingMocks, project: str, stack: str, config: dict[str, str]) -> Any:
    from pulumi.runtime import settings
    from pulumi.runtime.config import set_all_config
    from pulumi.runtime.stack import run_pulumi_func
    from pulumi.runtime.sync_await import _sync_await

    set_all_config(config, [])
    settings.ROOT.set(None)
    pulumi.runtime.set_mocks(mocks, project=project, stack=stack, preview=False, monitor=RecordingMonitor(mocks))
    holder: dict[str, Any] = {}

    def body() -> None:
        holder["value"] = _sync_await(pulumi.Output.from_input(program()).future())

    _sync_await(run_pulumi_func(body))
    return holder.get("value")


__all__ = ["MASK", "Recorded", "RecordingMocks", "RecordingMonitor", "fake_digest", "run_program"]
