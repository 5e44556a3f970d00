"""``dlstack outputs``: a stack's outputs as ``pulumi stack output --json`` prints them, without the CLI.

The program is evaluated offline under the render's mocks (``stacks.render.evaluate``), so the
result is what the stack file *would* deploy with the current registry: versions resolved from
aliases, model sha256, image refs and URLs, in the JSON shape ``dlstack promote --outputs`` reads.

One thing cannot be known offline: the digest of an image that ``pulumi up`` has yet to build.
The mocks make one up so that the render is complete; written to an outputs file, such a digest
would be promoted into prod as if it were a real image. So every built image is given as the
tag it is pushed under (``registry/name:v2-<content hash>``) and carries no digest; promote then
drops prod's stale pin and prod builds the version from the registry. Digests that the stack file
pins (``image.digest``, e.g. in prod) are real and kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from services.serving.errors import UserError


def stack_outputs(stack: str, config_file: Path | None = None, registry: Any = None) -> tuple[dict[str, Any], int]:
    """(the stack outputs, how many image refs lost their made-up digest)."""
    from stacks.mocks import DOCKER_IMAGE
    from stacks.render import evaluate

    mocks, outputs = evaluate(stack, config_file, registry)
    made_up = {
        str(r.answer["ref"]): str(r.inputs["tags"][0])
        for r in mocks.of_type(DOCKER_IMAGE)
        if r.answer.get("ref") and r.inputs.get("tags")
    }
    replaced = [0]

    def swap(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, str) and value in made_up:
            replaced[0] += 1
            return made_up[value]
        return value

    result = swap(outputs)
    if not isinstance(result, dict):
        raise UserError(
            f"the {stack} program returned {type(result).__name__} outputs, not a map; fix stacks/program.py"
        )
    return result, replaced[0]


def to_json(outputs: dict[str, Any]) -> str:
    """As the pulumi CLI prints it: two-space indent, keys sorted (Go maps marshal sorted)."""
    return json.dumps(outputs, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# -------------------------------------------------------------------------------------------------
# CLI


def register(sub: Any) -> None:
    p = sub.add_parser(
        "outputs",
        help="print the stack outputs offline, as `pulumi stack output --json` would (for promote --outputs)",
        description=(
            "Evaluate the Pulumi program offline (as `dlstack render` does) and print its stack outputs as JSON: "
            "what the stack file would deploy. Images are not built offline, so built images are given by tag, "
            "without a digest."
        ),
    )
    p.add_argument("--stack", required=True, help="stack name: reads Pulumi.<stack>.yaml (e.g. dev, prod)")
    p.add_argument("--config-file", type=Path, help="a stack file in the Pulumi.<stack>.yaml format to use instead")
    p.add_argument(
        "--registry",
        help="registry: a directory or s3://BUCKET/PREFIX (default $DLSTACK_REGISTRY, the stack's dlstack:registry, "
        "else .registry)",
    )
    p.add_argument("--out", type=Path, metavar="FILE", help="write the JSON to FILE instead of stdout")
    p.set_defaults(func=_outputs_cmd)


def _outputs_cmd(args: argparse.Namespace) -> int:
    from services import outdir
    from services.registry import Registry

    if args.config_file is not None and not args.config_file.is_file():
        raise UserError(f"--config-file {args.config_file}: no such file; pass an existing Pulumi.<stack>.yaml")
    # No --registry: evaluate() takes $DLSTACK_REGISTRY, else the stack file's dlstack:registry.
    registry = Registry(args.registry) if args.registry else None
    # Outputs have at least "models"; any other file at --out is the user's and is never replaced.
    ours: dict[str, Any] = {"label": "--out", "what": "outputs file", "recognise": outdir.json_with_keys("models")}
    if args.out is not None:
        outdir.check_file(args.out, **ours)  # before the evaluation
    outputs, undigested = stack_outputs(args.stack, args.config_file, registry)
    text = to_json(outputs)
    if args.out is not None:
        outdir.replace_file(args.out, text.encode(), **ours)
        print(f"wrote {args.out}: the outputs of {args.stack}, evaluated offline")
    else:
        sys.stdout.write(text)
    if undigested:
        # stderr: stdout is the JSON, usually redirected into the file promote reads.
        print(
            f"note: {undigested} image(s) are built by `pulumi up` and have no digest offline, so they are given by "
            "tag; promoting from these outputs pins the version only and the target stack builds its own image "
            f"(`pulumi stack output --json -s {args.stack}` after `pulumi up` has the digests)",
            file=sys.stderr,
        )
    return 0
