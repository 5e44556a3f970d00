"""Pulumi program entry point (``Pulumi.yaml``: ``main: stacks/``), run by ``pulumi up|preview|destroy``.

The config comes from the engine (``pulumi.Config``) through the same typed parser as the offline
render, and is validated before any resource is created. User errors end the run with the message
only (``pulumi.RunError``), not a Python traceback.
"""

from __future__ import annotations

import pulumi

from services.serving.errors import DlstackError


def main() -> None:
    from stacks.config import load_pulumi_config
    from stacks.program import build, stack_registry

    try:
        cfg = load_pulumi_config(pulumi.get_stack())
        # $DLSTACK_REGISTRY, else the stack's dlstack:registry (CI: the team's bucket), else .registry.
        outputs = build(cfg, stack_registry(cfg))
    except DlstackError as exc:
        raise pulumi.RunError(exc.message) from None
    for key, value in outputs.items():
        pulumi.export(key, value)


main()
