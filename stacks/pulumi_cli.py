"""``python -m stacks.pulumi_cli up|preview|destroy --stack ENV``: the real deployment path.

Runs the pulumi CLI against the kube context of the stack config, with Pulumi's local file backend
(``.pulumi-state/`` in the repo, gitignored) unless ``PULUMI_BACKEND_URL`` says otherwise. Fails
fast, with one message saying what to do, when the pulumi CLI, kubectl, the passphrase or the
cluster is missing -- and points to ``make render``, which needs none of them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from services.serving.errors import DlstackError, UserError

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".pulumi-state"
OFFLINE_HINT = "to see what would be deployed without it, run `make render ENV={stack}`"


def _env(stack: str, interactive: bool) -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("PULUMI_BACKEND_URL"):
        STATE_DIR.mkdir(exist_ok=True)
        env["PULUMI_BACKEND_URL"] = f"file://{STATE_DIR}"
    local = env["PULUMI_BACKEND_URL"].startswith("file://")
    has_passphrase = "PULUMI_CONFIG_PASSPHRASE" in env or "PULUMI_CONFIG_PASSPHRASE_FILE" in env
    if local and not has_passphrase and not interactive:
        raise UserError(
            "the local state backend encrypts secrets with a passphrase: export PULUMI_CONFIG_PASSPHRASE "
            "(or PULUMI_CONFIG_PASSPHRASE_FILE), or run from a terminal to be prompted; "
            + OFFLINE_HINT.format(stack=stack)
        )
    return env


def _check_cluster(context: str, stack: str, env: dict[str, str]) -> None:
    kubectl = shutil.which("kubectl", path=env.get("PATH"))
    if kubectl is None:
        raise UserError(
            "kubectl is not installed (needed to check the cluster): see https://kubernetes.io/docs/tasks/tools/; "
            + OFFLINE_HINT.format(stack=stack)
        )
    try:
        res = subprocess.run(
            [kubectl, "--context", context, "--request-timeout=5s", "get", "--raw", "/readyz"],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
            check=False,
        )
        ok, why = res.returncode == 0, (res.stderr or res.stdout).strip().splitlines()
    except subprocess.TimeoutExpired:
        ok, why = False, ["timed out"]
    if not ok:
        start = "start it with `make cluster` (kind)" if context.startswith("kind-") else "check your kubeconfig"
        raise UserError(
            f"the cluster of kube context {context!r} is unreachable ({why[-1] if why else 'no answer'}): "
            f"{start}; {OFFLINE_HINT.format(stack=stack)}"
        )


def commands(action: str, stack: str, yes: bool, extra: Sequence[str] = ()) -> list[list[str]]:
    """The pulumi command lines for ``action`` (``pulumi`` first; the caller resolves it on PATH)."""
    cwd = ["--cwd", str(ROOT)]
    select = ["pulumi", "stack", "select", "--create", stack, "--non-interactive", *cwd]
    run = ["pulumi", action, "--stack", stack, *cwd]
    if action == "preview":
        run.append("--diff")
    elif yes:
        run.append("--yes")
    return [select, [*run, *extra]]


def run(
    action: str, stack: str, *, yes: bool = False, extra: Sequence[str] = (), config_file: Path | None = None
) -> int:
    from stacks.config import load_stack_config

    interactive = sys.stdin.isatty()
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        raise UserError(
            "the pulumi CLI is not installed: install it with `curl -fsSL https://get.pulumi.com | sh` "
            "(https://www.pulumi.com/docs/iac/download-install/); " + OFFLINE_HINT.format(stack=stack)
        )
    cfg = load_stack_config(stack, config_file)  # validates the stack file before the engine sees it
    env = _env(stack, interactive)
    _check_cluster(cfg.kubernetes.context, stack, env)
    for cmd in commands(action, stack, yes, extra):
        rc = subprocess.run([pulumi, *cmd[1:]], cwd=ROOT, env=env, check=False).returncode
        if rc != 0:
            return rc
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stacks.pulumi_cli", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "preview", "destroy"))
    parser.add_argument("--stack", required=True, help="stack name (Pulumi.<stack>.yaml), e.g. dev or prod")
    parser.add_argument("--yes", action="store_true", help="skip pulumi's confirmation prompt (up, destroy)")
    parser.add_argument("extra", nargs="*", help="more pulumi flags, after --")
    args = parser.parse_args(argv)
    try:
        return run(args.action, args.stack, yes=args.yes, extra=args.extra)
    except DlstackError as exc:
        print(f"dlstack {args.action}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
