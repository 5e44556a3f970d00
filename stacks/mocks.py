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
import enum
import gc
import hashlib
import inspect
import math
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


def _decode_struct(struct: struct_pb2.Struct, secrets: str | None) -> dict[str, Any]:
    """``_plain(MessageToDict(struct))`` in one pass (the render decodes every resource's inputs)."""
    fields = struct.fields
    if _SIG in fields:  # secrets and resource references: the general path
        out = _plain(json_format.MessageToDict(struct), secrets=secrets)
        return out  # type: ignore[no-any-return]
    return {key: _decode_value(fields[key], secrets) for key in fields}


def _decode_value(value: struct_pb2.Value, secrets: str | None) -> Any:
    which = value.WhichOneof("kind")
    if which == "string_value":
        text = value.string_value
        return "<unknown>" if text == _UNKNOWN else text
    if which == "struct_value":
        return _decode_struct(value.struct_value, secrets)
    if which == "list_value":
        return [_decode_value(v, secrets) for v in value.list_value.values]
    if which == "number_value":
        number = value.number_value
        if number != number or number in (math.inf, -math.inf):
            raise ValueError(f"{number} cannot be serialized (JSON has no NaN or Infinity)")
        return int(number) if number.is_integer() else number
    if which == "bool_value":
        return value.bool_value
    return None


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
            self._inputs = _decode_struct(self.wire, MASK)
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
    * RPC threads: see ``_InlineExecutor``;
    * scalars: ``serialize_property``, ``deserialize_property`` and
      ``translate_output_properties`` run a dozen type checks (and a type-hint unwrap) before
      returning a str, number, bool or None as it is; most of their calls are such leaves. The
      fast paths return exactly what the SDK returns (enums, ints from floats and the unknown
      marker still go through the SDK);
    * type hints: ``unwrap_type`` re-parses the same few hundred ``Input[...]`` hints per resource;
    * URNs: the SDK computes each resource's URN through a chain of four Outputs (used only when
      no monitor exists); from plain strings it is one string concatenation;
    * alias URNs: every Kubernetes resource declares type aliases (e.g. a Deployment's old
      apiVersions) and the SDK turns each into a URN Output chain for engines without alias
      specs; the mock monitor supports alias specs (the aliases go in the request as they are),
      so those URNs are never read.
    Together with ``gc_paused`` this cuts the CPU time of a render by about 60 %.
    """
    from pulumi import _types
    from pulumi import output as pulumi_output
    from pulumi import resource as pulumi_resource
    from pulumi.runtime import resource as runtime_resource
    from pulumi.runtime import rpc
    from pulumi.runtime.proto import source_pb2
    from pulumi.runtime.sync_await import _ensure_event_loop

    patches: list[tuple[Any, str, Any]] = [
        (runtime_resource, "_get_stack_trace", lambda _orig: source_pb2.StackTrace),
        (pulumi_output, "contains_unknowns", lambda _orig: lambda _value: False),
        (rpc, "serialize_property", _scalar_fast_path),
        (rpc, "deserialize_property", _scalar_wire_fast_path),
        (rpc, "translate_output_properties", lambda orig: _scalar_output_fast_path(orig, _types.unwrap_optional_type)),
        (_types, "unwrap_type", _memoized),
        (_types, "unwrap_optional_type", _memoized),
        (runtime_resource, "create_urn", _plain_urn_fast_path),
        (pulumi_resource, "collapse_alias_to_urn", lambda _orig: _alias_unused),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    loop = _ensure_event_loop()
    executor = getattr(loop, "_default_executor", None)
    for (module, name, make), (_, _, orig) in zip(patches, saved, strict=True):
        setattr(module, name, make(orig))
    loop.set_default_executor(_InlineExecutor(max_workers=1))
    try:
        yield
    finally:
        for module, name, orig in saved:
            setattr(module, name, orig)
        loop._default_executor = executor  # type: ignore[attr-defined]


def _plain_urn_fast_path(create_urn: Callable[..., Any]) -> Callable[..., Any]:
    """``create_urn`` with the same result, computed at once when every part is a plain string."""

    def fast_create_urn(
        name: Any, type_: Any, parent: Any = None, project: str | None = None, stack: str | None = None
    ) -> Any:
        if type(name) is not str or type(type_) is not str or not (parent is None or type(parent) is str):
            return create_urn(name, type_, parent, project, stack)
        if parent is None:
            from pulumi.runtime import settings

            stack = settings.get_stack() if stack is None else stack
            project = settings.get_project() if project is None else project
            prefix = "urn:pulumi:" + stack + "::" + project + "::"
        else:
            prefix = parent[0 : parent.rfind("::")] + "$"
        return pulumi.Output.from_input(prefix + type_ + "::" + name)

    return fast_create_urn


def _alias_unused(alias: Any, default_name: str, default_type: str, default_parent: Any) -> Any:
    """Stands in for ``collapse_alias_to_urn``: its result (``Resource._aliases``) is only read for
    engines without alias specs, and the mock monitor has them."""
    return alias


# Exactly these types (no subclasses: enums are str subclasses and get converted) come back from
# ``serialize_property`` as they went in.
_SCALARS = frozenset((str, int, float, bool, type(None)))


def _scalar_fast_path(serialize: Callable[..., Any]) -> Callable[..., Any]:
    async def serialize_property(value: Any, *args: Any, **kwargs: Any) -> Any:
        if type(value) in _SCALARS and len(args) < 8 and not kwargs.get("return_protobuf_value"):
            return value
        return await serialize(value, *args, **kwargs)

    return serialize_property


def _scalar_wire_fast_path(deserialize: Callable[..., Any]) -> Callable[..., Any]:
    """``deserialize_property`` returns a wire scalar as is, except the "unknown" marker string."""
    unknown = _UNKNOWN

    def deserialize_property(value: Any, *args: Any, **kwargs: Any) -> Any:
        t = type(value)
        if t is float or t is bool or value is None or (t is str and value != unknown):
            return value
        return deserialize(value, *args, **kwargs)

    return deserialize_property


def _scalar_output_fast_path(
    translate: Callable[..., Any], unwrap_optional: Callable[[Any], Any]
) -> Callable[..., Any]:
    """``translate_output_properties`` returns a str, bool or None as is unless its hint is an enum."""
    enum_hint: dict[Any, bool] = {None: False}

    def is_enum(typ: Any) -> bool:
        try:
            return enum_hint[typ]
        except KeyError:
            t = unwrap_optional(typ)
            out = enum_hint[typ] = inspect.isclass(t) and issubclass(t, enum.Enum)
            return out
        except TypeError:  # an unhashable hint
            return True  # let the SDK decide

    def translate_output_properties(output: Any, transformer: Any, typ: Any = None, *args: Any, **kwargs: Any) -> Any:
        if type(output) in _OUTPUT_SCALARS and not is_enum(typ):
            return output
        return translate(output, transformer, typ, *args, **kwargs)

    return translate_output_properties


_OUTPUT_SCALARS = frozenset((str, bool, type(None)))


def _memoized(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    cache: dict[Any, Any] = {}

    def wrapper(val: Any) -> Any:
        try:
            return cache[val]
        except KeyError:
            out = cache[val] = fn(val)
            return out
        except TypeError:  # an unhashable hint
            return fn(val)

    return wrapper


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
