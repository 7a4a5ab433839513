"""The user-facing CLI commands: sandboxes, files, tokens and images.

Every command goes through the SDK (so the CLI exercises exactly what users call), talks to
``SANDLOT_URL`` or the local server (started on demand), and prints either a human table or, with
``--json``, one JSON document a script can parse. Errors become a one-line message and exit 1;
``exec`` and ``run`` exit with the command's own code.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from sandlot.sdk import Sandbox
from sandlot.sdk.control import ControlClient
from sandlot.sdk.errors import SandboxError
from sandlot.sdk.types import ExitEvent, QuotaInfo, StderrEvent, StdoutEvent

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True)


def sdk_errors(fn: F) -> F:
    """Turn SDK errors into a clean message and exit code 1 (no traceback for user errors)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SandboxError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def parse_pairs(values: Iterable[str], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", param_hint=what)
        out[key] = val
    return out


def command_string(argv: tuple[str, ...]) -> str:
    """One argument is taken as a shell command line; several are quoted and joined."""
    if not argv:
        raise click.UsageError("missing command (put it after --)")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def summary(sb: Sandbox) -> dict[str, Any]:
    return {k: v for k, v in sb.info.items() if k != "secret"}


def stream_command(sb: Sandbox, cmd: str, cwd: str | None, env: dict[str, str]) -> int:
    """Run ``cmd``, copying its output to ours as it comes; return its exit code."""
    code = 1
    with sb.exec_stream(cmd, cwd=cwd, env=env or None, timeout=None) as stream:
        for event in stream:
            if isinstance(event, StdoutEvent):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, StderrEvent):
                sys.stderr.write(event.text)
                sys.stderr.flush()
            elif isinstance(event, ExitEvent):
                code = event.code
    return code


create_options = [
    click.option("--image", default=None, help="Image (default: the default image)."),
    click.option("--name", default=None, help="Name shown in listings."),
    click.option(
        "--instance-type",
        default="micro",
        show_default=True,
        help="nano, micro, small, medium, large or xlarge.",
    ),
    click.option(
        "--env",
        "env",
        multiple=True,
        metavar="KEY=VALUE",
        help="Environment variable (repeatable).",
    ),
    click.option(
        "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label (repeatable)."
    ),
    click.option(
        "--runtime",
        type=click.Choice(["crun", "gvisor"]),
        default=None,
        help="crun (a container on the host's kernel) or gvisor (gVisor's user-space kernel "
        "between the code and the host's). Default: the server's (sandlot server --runtime).",
    ),
]


def with_create_options(fn: F) -> F:
    for option in reversed(create_options):
        fn = option(fn)
    return fn


@click.command()
@with_create_options
@click.option("--snapshot", default=None, help="Start from this snapshot's filesystem (its id).")
@click.option("--json", "as_json", is_flag=True, help="Print the sandbox as JSON.")
@sdk_errors
def create(
    image: str | None,
    name: str | None,
    instance_type: str,
    env: tuple[str, ...],
    labels: tuple[str, ...],
    snapshot: str | None,
    runtime: str | None,
    as_json: bool,
) -> None:
    """Create a sandbox and print its id."""
    sb = Sandbox.create(
        image=image,
        name=name,
        instance_type=instance_type,
        env=parse_pairs(env, "--env"),
        labels=parse_pairs(labels, "--label"),
        snapshot=snapshot,
        runtime=runtime,
    )
    info = summary(sb)
    sb.close()  # the sandbox keeps running: only the handle goes
    click.echo(json.dumps(info) if as_json else info["id"])


@click.command(name="ls")
@click.option("--name", default=None, help="Only sandboxes with this name.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Filter by label.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@sdk_errors
def list_sandboxes(name: str | None, labels: tuple[str, ...], as_json: bool) -> None:
    """List sandboxes."""
    items = [summary(sb) for sb in Sandbox.list(name=name, labels=parse_pairs(labels, "--label"))]
    if as_json:
        click.echo(json.dumps(items))
        return
    table = Table("NAME", "STATUS", "IMAGE", "TYPE", "RUNTIME", "CREATED", box=None)
    table.add_column("ID", no_wrap=True, min_width=24)  # ids are what scripts copy: never cut
    for it in items:
        status = it.get("status", "")
        if status == "sleeping" and it.get("sleep_kind"):
            status = f"sleeping ({it['sleep_kind']})"
        table.add_row(
            it.get("name") or "",
            status,
            it.get("image", ""),
            it.get("instance_type", ""),
            it.get("runtime", ""),
            str(it.get("created_at", ""))[:19],
            it["id"],
        )
    Console().print(table)


#: What ``sandlot info`` shows, in this order (``--json`` shows everything but the secret).
INFO_FIELDS = (
    "id",
    "name",
    "status",
    "sleep_kind",
    "image",
    "instance_type",
    "runtime",
    "network",
    "privileged",
    "region",
    "created_at",
    "last_activity_at",
    "idle_timeout",
    "sandbox_url",
    "error",
)


@click.command()
@click.argument("sandbox_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@sdk_errors
def info(sandbox_id: str, as_json: bool) -> None:
    """Show one sandbox: its status, image, instance type, runtime, ..."""
    sb = Sandbox.get_from_id(sandbox_id)
    try:
        shown = summary(sb)
    finally:
        sb.close()
    if as_json:
        click.echo(json.dumps(shown))
        return
    for key in INFO_FIELDS:
        value = shown.get(key)
        if value not in (None, ""):
            click.echo(f"{key + ':':<18}{value}")


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.option("--cwd", default=None, help="Working directory in the sandbox.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE")
@sdk_errors
def exec_command(
    sandbox_id: str, argv: tuple[str, ...], cwd: str | None, env: tuple[str, ...]
) -> None:
    """Run a command in a sandbox, streaming its output; exit with its code.

    sandlot exec ID -- python3 -c 'print(1)'"""
    cmd = command_string(argv)
    sb = Sandbox.get_from_id(sandbox_id)
    try:
        code = stream_command(sb, cmd, cwd, parse_pairs(env, "--env"))
    finally:
        sb.close()
    sys.exit(code)


@click.command(context_settings={"ignore_unknown_options": True})
@with_create_options
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.option("--cwd", default=None, help="Working directory in the sandbox.")
@sdk_errors
def run(
    image: str | None,
    name: str | None,
    instance_type: str,
    env: tuple[str, ...],
    labels: tuple[str, ...],
    runtime: str | None,
    argv: tuple[str, ...],
    cwd: str | None,
) -> None:
    """Create a sandbox, run one command in it, delete it; exit with the command's code.

    sandlot run -- python3 -c 'print(6*7)'"""
    cmd = command_string(argv)
    with Sandbox.create(
        image=image,
        name=name,
        instance_type=instance_type,
        env=parse_pairs(env, "--env"),
        labels=parse_pairs(labels, "--label"),
        runtime=runtime,
    ) as sb:
        code = stream_command(sb, cmd, cwd, {})
    sys.exit(code)


def _split_remote(arg: str) -> tuple[str, str] | None:
    """``ID:/path`` -> (ID, /path); a local path -> None."""
    head, sep, tail = arg.partition(":")
    if sep and head and "/" not in head and tail:
        return head, tail
    return None


@click.command()
@click.argument("source")
@click.argument("dest")
@click.option(
    "--max-bytes",
    type=click.IntRange(min=0),
    default=None,
    help="Out of a sandbox: stop (and keep nothing) past this size. Default: a regular file "
    "whole, a file of unknown length (/proc, /sys) up to 64 MiB.",
)
@sdk_errors
def cp(source: str, dest: str, max_bytes: int | None) -> None:
    """Copy a file into or out of a sandbox (binary-safe, streamed from or to disk).

    sandlot cp ./data.bin ID:/root/data.bin    |    sandlot cp ID:/root/out.txt ./out.txt"""
    src_remote, dst_remote = _split_remote(source), _split_remote(dest)
    if (src_remote is None) == (dst_remote is None):
        raise click.UsageError("exactly one of SOURCE and DEST must be ID:PATH")
    sandbox_id, remote_path = src_remote or dst_remote  # type: ignore[misc]
    sb = Sandbox.get_from_id(sandbox_id)
    try:
        if dst_remote is not None:
            sb.filesystem.upload_file(source, remote_path)
        else:
            sb.filesystem.download_file(dest, remote_path, max_bytes=max_bytes)
    except OSError as exc:  # the local side: no such file, a directory, permissions, ...
        raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}") from None
    finally:
        sb.close()


@click.command()
@click.argument("sandbox_ids", nargs=-1, required=True)
@sdk_errors
def rm(sandbox_ids: tuple[str, ...]) -> None:
    """Delete sandboxes."""
    for sandbox_id in sandbox_ids:
        sb = Sandbox.get_from_id(sandbox_id)
        sb.delete()
        click.echo(sandbox_id)


@click.command()
@click.argument("sandbox_id")
@click.option("--json", "as_json", is_flag=True)
@sdk_errors
def events(sandbox_id: str, as_json: bool) -> None:
    """Show a sandbox's history: created, slept, woke, deleted (also after deletion)."""
    with _control() as control:
        items = control.sandbox_events(sandbox_id)
    if as_json:
        click.echo(json.dumps(items))
        return
    for it in items:
        click.echo(f"{it['at'][:23]}  {it['kind']:<14} {it['detail']}")


# -- tokens -------------------------------------------------------------------------------------


def _control() -> ControlClient:
    """The control API, with the SDK's connection settings (``SANDLOT_URL``... or the local
    server)."""
    return ControlClient()


@click.group()
def token() -> None:
    """Manage API tokens (on the server's Unix socket, or with an admin-scope token)."""


@token.command(name="create")
@click.option(
    "--project",
    default="default",
    show_default=True,
    help="The project the token can see and act on.",
)
@click.option("--name", default=None, help="A note to recognise the token by.")
@click.option(
    "--scope",
    type=click.Choice(["normal", "privileged", "admin"]),
    default="normal",
    show_default=True,
    help="normal: the project's sandboxes; privileged: also privileged sandboxes; "
    "admin: also tokens and quotas of every project.",
)
@click.option("--json", "as_json", is_flag=True)
@sdk_errors
def token_create(project: str, name: str | None, scope: str, as_json: bool) -> None:
    """Create a token; it is shown once."""
    with _control() as control:
        data = control.create_token(project=project, name=name or "", scope=scope)
    if as_json:
        click.echo(json.dumps(data))
    else:
        click.echo(data["token"])
        err_console.print(
            f"token {data['id']} for project {data['project']!r}, scope {data['scope']} "
            "(shown once: store it now)"
        )


@token.command(name="ls")
@click.option("--project", default=None)
@click.option("--json", "as_json", is_flag=True)
@sdk_errors
def token_list(project: str | None, as_json: bool) -> None:
    """List tokens (never their values)."""
    with _control() as control:
        items = control.list_tokens(project)
    if as_json:
        click.echo(json.dumps(items))
        return
    table = Table("ID", "PROJECT", "SCOPE", "NAME", "CREATED", "REVOKED", box=None)
    for it in items:
        table.add_row(
            it["id"],
            it["project"],
            it.get("scope") or "normal",
            it.get("name") or "",
            str(it.get("created_at", ""))[:19],
            str(it.get("revoked_at") or ""),
        )
    Console().print(table)


@token.command(name="revoke")
@click.argument("token_id")
@sdk_errors
def token_revoke(token_id: str) -> None:
    """Revoke a token."""
    with _control() as control:
        control.revoke_token(token_id)
    click.echo(token_id)


# -- quotas -------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "M": 1, "MI": 1, "MB": 1, "MIB": 1, "G": 1024, "GI": 1024, "GB": 1024}
_SIZE_UNITS |= {"GIB": 1024, "T": 1 << 20, "TI": 1 << 20, "TB": 1 << 20, "TIB": 1 << 20}


def parse_size_mb(value: str, what: str) -> int | None:
    """``8G``, ``512M``, ``2GiB`` (binary units; a bare number is MiB) -> MiB; ``none`` -> None
    (unlimited)."""
    text = value.strip().upper()
    if text in ("NONE", "UNLIMITED"):
        return None
    number = text.rstrip("BGIMT")
    unit = text[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if amount < 0 or unit not in _SIZE_UNITS:
        raise click.BadParameter(
            f"expected a size such as 512M, 8G or 1T (or 'none'), not {value!r}", param_hint=what
        )
    return round(amount * _SIZE_UNITS[unit])


def _show_quotas(items: list[QuotaInfo]) -> None:
    def limit(used: float, allowed: float | None, unit: str = "") -> str:
        return f"{used:g}{unit} / {'-' if allowed is None else f'{allowed:g}{unit}'}"

    table = Table("PROJECT", "SANDBOXES", "MEMORY", "CPU", "DISK", box=None)
    for it in items:
        use = it["usage"]
        table.add_row(
            it["project"],
            limit(use["sandboxes"], it["max_sandboxes"]),
            limit(use["memory_mb"], it["memory_mb"], "M"),
            limit(use["vcpu"], it["vcpu"]),
            limit(use["disk_mb"], it["disk_mb"], "M"),
        )
    Console().print(table)


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@sdk_errors
def quota(ctx: click.Context, as_json: bool) -> None:
    """Per-project quotas: show usage against limits (used / allowed; - is unlimited).

    sandlot quota set PROJECT --max-sandboxes 10 --memory 8G --cpu 4 --disk 20G"""
    if ctx.invoked_subcommand is not None:
        return
    with _control() as control:
        items = control.list_quotas()
    if as_json:
        click.echo(json.dumps(items))
    else:
        _show_quotas(items)


@quota.command(name="set")
@click.argument("project")
@click.option("--max-sandboxes", default=None, help="Most sandboxes at once ('none': no limit).")
@click.option("--memory", default=None, help="Total memory, e.g. 8G ('none': no limit).")
@click.option("--cpu", default=None, help="Total vCPUs, e.g. 4 or 0.5 ('none': no limit).")
@click.option("--disk", default=None, help="Total disk, e.g. 20G ('none': no limit).")
@sdk_errors
def quota_set(
    project: str,
    max_sandboxes: str | None,
    memory: str | None,
    cpu: str | None,
    disk: str | None,
) -> None:
    """Set a project's limits (those not given stay as they are). Every sandbox counts, asleep
    too, with its instance type's memory, vCPUs and disk."""
    body: dict[str, Any] = {}

    def number(value: str, what: str, kind: type[int] | type[float]) -> int | float | None:
        if value.strip().lower() in ("none", "unlimited"):
            return None
        try:
            return kind(value)
        except ValueError:
            message = f"expected a number or 'none', not {value!r}"
            raise click.BadParameter(message, param_hint=what) from None

    if max_sandboxes is not None:
        body["max_sandboxes"] = number(max_sandboxes, "--max-sandboxes", int)
    if memory is not None:
        body["memory_mb"] = parse_size_mb(memory, "--memory")
    if cpu is not None:
        body["vcpu"] = number(cpu, "--cpu", float)
    if disk is not None:
        body["disk_mb"] = parse_size_mb(disk, "--disk")
    if not body:
        raise click.UsageError("give at least one of --max-sandboxes, --memory, --cpu, --disk")
    with _control() as control:
        _show_quotas([control.set_quota(project, **body)])


@quota.command(name="rm")
@click.argument("project")
@sdk_errors
def quota_remove(project: str) -> None:
    """Remove a project's quota (no limits)."""
    with _control() as control:
        control.delete_quota(project)
    click.echo(project)


# -- registry secrets ---------------------------------------------------------------------------


@click.group()
def secret() -> None:
    """Registry credentials for private images (``registry_secret=NAME``)."""


@secret.command(name="create")
@click.argument("name")
@click.option("--registry", required=True, help="The registry's host[:port] (docker.io, ghcr.io).")
@click.option("--username", required=True)
@click.option(
    "--password-stdin",
    is_flag=True,
    required=True,
    help="Read the password (or token) from standard input, never from the command line.",
)
@sdk_errors
def secret_create(name: str, registry: str, username: str, password_stdin: bool) -> None:
    """Create a registry secret; the password is read from standard input."""
    password = sys.stdin.read().rstrip("\r\n")
    if not password:
        raise click.ClickException("no password on standard input")
    with _control() as control:
        data = control.create_secret(name, registry, username, password)
    click.echo(data["name"])


@secret.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@sdk_errors
def secret_list(as_json: bool) -> None:
    """List the project's secrets (never their passwords)."""
    with _control() as control:
        items = control.list_secrets()
    if as_json:
        click.echo(json.dumps(items))
        return
    table = Table("NAME", "REGISTRY", "USERNAME", "CREATED", box=None)
    for it in items:
        table.add_row(it["name"], it["registry"], it["username"], it["created_at"][:19])
    Console().print(table)


@secret.command(name="rm")
@click.argument("name")
@sdk_errors
def secret_remove(name: str) -> None:
    """Delete a secret (sandboxes created with it keep running)."""
    with _control() as control:
        click.echo(control.delete_secret(name)["name"])


# -- images -------------------------------------------------------------------------------------


@click.group()
def image() -> None:
    """Build, pull and list local images."""


@image.command(name="build")
def image_build() -> None:
    """Build the default image (Debian bookworm + python3, pip, git, curl...), if needed."""
    from sandlot.engines.base import ImageError
    from sandlot.images.store import default_store

    store = default_store()
    try:
        with err_console.status("building the default image") as status:
            img = store.default_image(progress=lambda line: status.update(line))
            store.busybox_image()
    except ImageError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(img.rootfs))


@image.command(name="pull")
@click.argument("ref")
def image_pull(ref: str) -> None:
    """Pull REF from its registry again (e.g. python:3.12-slim; creates pull once, then reuse)."""
    from sandlot.engines.base import ImageError
    from sandlot.images.store import default_store

    try:
        with err_console.status(f"pulling {ref}") as status:
            img = default_store().registry_image(
                ref, progress=lambda line: status.update(line), pull=True
            )
    except ImageError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(img.rootfs))


@image.command(name="prune")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
def image_prune(dry_run: bool) -> None:
    """Remove images nothing can use any more: older versions of pulled images, default images
    of an older recipe, images stored the old way (owned by host root), half-done builds. What
    any sandbox (even asleep) was made from stays."""
    from sandlot.engines.base import ImageError
    from sandlot.engines.local.engine import images_in_use
    from sandlot.images.store import default_store
    from sandlot.paths import state_dir

    try:
        removed = default_store().prune(images_in_use(state_dir()), dry_run=dry_run)
    except ImageError as exc:
        raise click.ClickException(str(exc)) from None
    for d in removed:
        click.echo(str(d))
    err_console.print(f"{'would remove' if dry_run else 'removed'} {len(removed)} image(s)")


@image.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
def image_list(as_json: bool) -> None:
    """List built images."""
    from sandlot.images.store import default_store

    items = default_store().list()
    if as_json:
        click.echo(json.dumps(items))
        return
    for it in items:
        click.echo(f"{it['name']}\t{it['path']}")


COMMANDS = [
    create,
    list_sandboxes,
    info,
    exec_command,
    run,
    cp,
    rm,
    events,
    token,
    quota,
    secret,
    image,
]
