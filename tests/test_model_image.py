"""ModelImage: content-addressed tags, the staged build context, the recorded build, promoted pins."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from infra.model_image import ModelImage, ModelImageArgs, image_tag, server_code_hash
from services.serving.errors import UserError
from stacks.mocks import DOCKER_IMAGE, run_program
from tests.conftest import ROOT, make_torch_mlp_artifact

pytestmark = pytest.mark.xdist_group("model-image")

SHA = "a" * 64


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from services.registry import Registry

    tmp = tmp_path_factory.mktemp("image")
    reg = Registry(tmp / "registry")
    reg.register(make_torch_mlp_artifact(tmp / "art", name="mnist-mlp"), "mnist-mlp", "pytorch")
    return reg


def test_tag_changes_exactly_when_model_or_server_code_changes(tmp_path: Path) -> None:
    services = tmp_path / "services"
    shutil.copytree(ROOT / "services" / "serving", services, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    code = server_code_hash(services)
    assert server_code_hash(services) == code
    base = image_tag("1", SHA, code, "pytorch")
    assert base.startswith("v1-") and len(base) == len("v1-") + 12
    assert image_tag("1", SHA, code, "pytorch") == base  # unchanged model + code: same tag, no rebuild
    assert image_tag("1", "b" * 64, code, "pytorch") != base
    assert image_tag("1", SHA, code, "onnx") != base
    (services / "server" / "app.py").write_text((services / "server" / "app.py").read_text() + "\n# changed\n")
    server_code_hash.cache_clear()
    assert image_tag("1", SHA, server_code_hash(services), "pytorch") != base
    (services / "server" / "__pycache__").mkdir(exist_ok=True)  # bytecode never changes the tag
    (services / "server" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    server_code_hash.cache_clear()
    assert server_code_hash(services) == server_code_hash.__wrapped__(services)


def test_build_is_recorded_with_context_dockerfile_args_and_digest_ref(tmp_path: Path, registry) -> None:  # type: ignore[no-untyped-def]
    mv = registry.resolve("mnist-mlp:1")
    args = ModelImageArgs(
        model_name=mv.name,
        version=mv.version,
        framework=mv.framework,
        model_sha256=mv.sha256,
        registry="localhost:5001/dlstack",
        build_root=tmp_path / "contexts",
        export=mv.export,
    )
    holder: dict[str, ModelImage] = {}

    def program():  # type: ignore[no-untyped-def]
        holder["img"] = ModelImage("mnist-mlp-image", args)
        return holder["img"].ref

    mocks, ref = run_program(program)
    img = holder["img"]
    (build,) = mocks.of_type(DOCKER_IMAGE)
    ctx = tmp_path / "contexts" / f"mnist-mlp-{img.tag}"
    assert build.inputs["tags"] == [f"localhost:5001/dlstack/mnist-mlp:{img.tag}"]
    assert build.inputs["context"]["location"] == str(ctx)
    assert build.inputs["dockerfile"]["location"] == str(ctx / "services" / "serving" / "Dockerfile")
    assert build.inputs["buildArgs"] == {"FRAMEWORK": "pytorch", "MODEL_DIR": "model"}
    assert build.inputs["push"] is True
    assert ref == f"localhost:5001/dlstack/mnist-mlp@{build.answer['digest']}"
    # The staged context: the server code + Dockerfile and the exported, verified artifact.
    staged = ctx / "services" / "serving"
    assert (staged / "Dockerfile").read_bytes() == (ROOT / "services" / "serving" / "Dockerfile").read_bytes()
    assert (staged / "server" / "app.py").is_file()
    assert sorted(p.name for p in (ctx / "services").iterdir()) == ["serving"]  # no tooling in the image
    assert not list(ctx.rglob("__pycache__"))
    assert sorted(p.name for p in (ctx / "model").iterdir()) == ["model.pt", "model.yaml"]
    assert (ctx / "model" / "model.pt").read_bytes() == (mv.path / "model.pt").read_bytes()
    # A second program run reuses the staged context and gives the same tag and digest.
    before = (ctx / "model" / "model.yaml").stat().st_mtime_ns
    _, ref2 = run_program(program)
    assert ref2 == ref
    assert (ctx / "model" / "model.yaml").stat().st_mtime_ns == before


def test_promoted_digest_is_used_as_is_and_nothing_is_built() -> None:
    digest = "sha256:" + "c" * 64
    args = ModelImageArgs("mnist-mlp", "3", "pytorch", SHA, "ghcr.io/acme/dlstack", image_digest=digest)
    mocks, ref = run_program(lambda: ModelImage("mnist-mlp-image", args).ref)
    assert ref == f"ghcr.io/acme/dlstack/mnist-mlp@{digest}"
    assert mocks.of_type(DOCKER_IMAGE) == []


def test_bad_args_are_rejected_before_anything_exists() -> None:
    args = ModelImageArgs("Bad_Name", "1", "pytorch", SHA, "https://r.example", image_digest="sha256:xyz")
    with pytest.raises(UserError) as err:
        run_program(lambda: ModelImage("x", args))
    assert err.value.message == (
        'ModelImage x: image_digest "sha256:xyz" is not "sha256:" + 64 hex digits; '
        'model_name "Bad_Name" is not a valid image repository name; '
        'registry "https://r.example" is not host[:port]/path'
    )
