"""``ModelImage``: the serving image of one model version, content-addressed and digest-pinned.

The image is ``services/serving/Dockerfile`` built over a self-contained context directory::

    <build_root>/<model>-<tag>/
        services/serving/  the serving code, its requirements and the Dockerfile (what goes in the image,
                           nothing else: a change to the tooling beside it leaves every tag unchanged)
        model/           the artifact exported from the registry (model.yaml + files), the last layer

with build args ``FRAMEWORK`` (which runtime gets installed) and ``MODEL_DIR=model``. The tag is a
hash of the model's sha256 and of the server files that go in the image, so an unchanged model
on unchanged code has unchanged inputs and never rebuilds. Deployments use the digest-pinned
``ref`` (``registry/name@sha256:...``). A promoted model (``image_digest`` set) is not built at all:
the ref points at exactly the digest that passed in the previous environment.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pulumi

from services.serving import names
from services.serving.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "services" / "serving"  # the only code copied into the image and hashed into its tag
_EXCLUDE_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache"}


@functools.lru_cache(maxsize=4)
def server_code_hash(services: Path = SERVICES) -> str:
    """sha256 over the files copied into every image: ``services/serving/**`` (code, Dockerfile, requirements)."""
    h = hashlib.sha256()
    for f in _server_files(services):
        h.update(f.relative_to(services).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _server_files(services: Path) -> list[Path]:
    return sorted(
        f
        for f in services.rglob("*")
        if f.is_file() and not _EXCLUDE_DIRS.intersection(f.relative_to(services).parts) and f.suffix != ".pyc"
    )


def image_tag(version: str, model_sha256: str, code_hash: str, framework: str) -> str:
    """``v<version>-<12 hex>``: readable, and changes exactly when the model or the server changes."""
    digest = hashlib.sha256(f"{model_sha256}\0{code_hash}\0{framework}".encode()).hexdigest()
    return f"v{version}-{digest[:12]}"


@dataclass(frozen=True)
class ModelImageArgs:
    model_name: str  # required; registry model name, the image repository's last path element
    version: str  # required; registry version, e.g. "1"
    framework: str  # required; pytorch | keras | tensorflow | onnx (Dockerfile FRAMEWORK build arg)
    model_sha256: str  # required; ModelSpec.sha256 of the registered version
    registry: str  # required; e.g. localhost:5001/dlstack
    push: bool = True  # default True; push to ``registry``
    build_root: Path = ROOT / "build" / "images"  # default <repo>/build/images; build contexts go here
    export: Callable[[Path], Path] | None = None  # default none; writes the artifact into a dir (Registry export)
    image_digest: str | None = None  # default none = build; "sha256:..." = promoted image, never rebuilt
    services_dir: Path = SERVICES  # default <repo>/services/serving; serving code + Dockerfile
    platforms: tuple[str, ...] = ("linux/amd64",)  # default linux/amd64

    def validate(self, name: str) -> None:
        problems = []
        if self.image_digest is not None and not names.matches(names.DIGEST, self.image_digest):
            problems.append(f'image_digest "{self.image_digest}" is not "sha256:" + 64 hex digits')
        if self.image_digest is None and self.export is not None and not (self.services_dir / "Dockerfile").is_file():
            problems.append(f"{self.services_dir / 'Dockerfile'} is missing; the serving image cannot be built")
        if not names.matches(names.DNS_LABEL, self.model_name):
            problems.append(f'model_name "{self.model_name}" is not a valid image repository name')
        if not self.registry or "://" in self.registry:
            problems.append(f'registry "{self.registry}" is not host[:port]/path')
        if problems:
            raise UserError(f"ModelImage {name}: " + "; ".join(problems))


class ModelImage(pulumi.ComponentResource):
    """Builds (or pins) the serving image of one model version; ``ref`` is digest-pinned."""

    repository: str
    tag: str
    context_dir: Path
    image: pulumi.Resource | None
    ref: pulumi.Output[str]

    def __init__(self, name: str, args: ModelImageArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        args.validate(name)
        super().__init__("dlstack:model_image:ModelImage", name, None, opts)
        self.args = args
        self.repository = f"{args.registry}/{args.model_name}"
        code = server_code_hash(args.services_dir) if args.image_digest is None else "pinned"
        self.tag = image_tag(args.version, args.model_sha256, code, args.framework)
        self.context_dir = args.build_root / f"{args.model_name}-{self.tag}"
        self.image = None
        if args.image_digest is not None:
            self.ref = pulumi.Output.from_input(f"{self.repository}@{args.image_digest}")
        else:
            if args.export is not None:
                self.prepare_context()
            self.image = self.build()
            self.ref = pulumi.Output.concat(self.repository, "@", self.image.digest)  # type: ignore[attr-defined]
        self.register_outputs({"ref": self.ref, "tag": self.tag})

    def prepare_context(self) -> Path:
        """Write the build context once per tag (content-addressed: an existing one is reused as is)."""
        ctx = self.context_dir
        if (ctx / "model" / "model.yaml").is_file() and (ctx / "services" / "serving" / "Dockerfile").is_file():
            return ctx
        assert self.args.export is not None
        tmp = ctx.with_name(ctx.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        services = self.args.services_dir
        for f in _server_files(services):
            dest = tmp / "services" / "serving" / f.relative_to(services)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        self.args.export(tmp / "model")
        shutil.rmtree(ctx, ignore_errors=True)
        tmp.rename(ctx)  # atomic: a half-written context is never mistaken for a complete one
        return ctx

    def build(self) -> pulumi.Resource:
        import pulumi_docker_build as docker_build

        a = self.args
        return docker_build.Image(
            f"{self.repository.rsplit('/', 1)[-1]}-{self.tag}-image",
            docker_build.ImageArgs(
                tags=[f"{self.repository}:{self.tag}"],
                context=docker_build.BuildContextArgs(location=str(self.context_dir)),
                dockerfile=docker_build.DockerfileArgs(
                    location=str(self.context_dir / "services" / "serving" / "Dockerfile")
                ),
                build_args={"FRAMEWORK": a.framework, "MODEL_DIR": "model"},
                platforms=[docker_build.Platform(p) for p in a.platforms],
                push=a.push,
                labels={
                    "org.opencontainers.image.title": a.model_name,
                    "org.opencontainers.image.version": a.version,
                    "io.dlstack.model.sha256": a.model_sha256,
                },
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
