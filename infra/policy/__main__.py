"""The dlstack policy pack: ``pulumi preview --policy-pack infra/policy`` (or ``pulumi up``).

Every rule is a plain function in ``policies.py``; this file only wraps them for pulumi-policy.
The environment is ``prod`` when the policy config says ``{"environment": "prod"}``
(``--policy-pack-config``, or ``pulumi policy enable ... --config``), else when the stack is named
``prod`` / ``prod-*`` (read from each resource's URN); anything else is ``dev``.

Importing this module builds the policies but starts nothing: ``PolicyPack`` serves gRPC forever,
so it is constructed only when the file runs as ``__main__`` (as the Pulumi CLI runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    PolicyPack,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the CLI runs this file; policies.py sits beside it
import policies

PACK_NAME = "dlstack"
CONFIG_SCHEMA = PolicyConfigSchema(properties={"environment": {"type": "string", "enum": ["dev", "prod"]}})


def _is_k8s_object(resource_type: str, props: Any) -> bool:
    # Helm releases are not Kubernetes objects; their charts are reviewed upstream.
    return resource_type.startswith("kubernetes:") and isinstance(props, dict) and "kind" in props


def resource_policy(name: str, description: str, rule: policies.ResourceRule) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        if not _is_k8s_object(args.resource_type, args.props):
            return
        env = policies.environment(args.get_config(), policies.stack_of_urn(args.urn))
        for message in rule(args.props, env):
            report_violation(message, None)

    return ResourceValidationPolicy(
        name=name,
        description=description,
        validate=validate,
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=CONFIG_SCHEMA,
    )


def stack_policy(name: str, description: str, rule: Any) -> StackValidationPolicy:
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        objs = [r.props for r in args.resources if _is_k8s_object(r.resource_type, r.props)]
        stack = next((policies.stack_of_urn(r.urn) for r in args.resources), None)
        env = policies.environment(args.get_config(), stack)
        for message in rule(objs, env):
            report_violation(message, None)

    return StackValidationPolicy(
        name=name,
        description=description,
        validate=validate,
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=CONFIG_SCHEMA,
    )


def build_policies() -> list[ResourceValidationPolicy | StackValidationPolicy]:
    out: list[ResourceValidationPolicy | StackValidationPolicy] = [
        resource_policy(name, description, rule) for name, (description, rule) in policies.RESOURCE_RULES.items()
    ]
    out += [stack_policy(name, description, rule) for name, (description, rule) in policies.STACK_RULES.items()]
    return out


def main() -> PolicyPack:
    return PolicyPack(PACK_NAME, policies=list(build_policies()), enforcement_level=EnforcementLevel.MANDATORY)


if __name__ == "__main__":
    main()
