"""``sandlot snapshot create/ls/rm`` and ``sandlot fork``: snapshots through the SDK, like the
other commands (``sandlot create --snapshot ID`` spawns one)."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from sandlot.cli.commands import parse_pairs, sdk_errors, summary
from sandlot.images.sizes import human
from sandlot.sdk import Sandbox, Snapshot
from sandlot.sdk.types import SnapshotStatus, SnapshotType


def _view(snap: Snapshot) -> dict[str, object]:
    return snap.info


@click.group()
def snapshot() -> None:
    """Snapshots of sandboxes' filesystems: take, list and remove them
    (spawn one with ``sandlot create --snapshot ID``)."""


@snapshot.command(name="create")
@click.argument("sandbox_id")
@click.argument("name")
@click.option(
    "--type",
    "kind",
    type=click.Choice([t.value for t in SnapshotType]),
    default="filesystem",
    show_default=True,
    help="filesystem: the file changes; full: also memory and processes (gvisor only).",
)
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label (repeatable).")
@click.option("--no-wait", is_flag=True, help="Answer while it is being made.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON.")
@sdk_errors
def snapshot_create(
    sandbox_id: str, name: str, kind: str, labels: tuple[str, ...], no_wait: bool, as_json: bool
) -> None:
    """Snapshot a sandbox's filesystem and print the snapshot's id."""
    sb = Sandbox.get_from_id(sandbox_id)
    try:
        snap = sb.snapshot(
            name,
            snapshot_type=SnapshotType(kind),
            wait_available=not no_wait,
            labels=parse_pairs(labels, "--label") or None,
        )
    finally:
        sb.close()
    click.echo(json.dumps(_view(snap)) if as_json else snap.id)


@snapshot.command(name="ls")
@click.option("--sandbox", "sandbox_id", default=None, help="Only snapshots of this sandbox.")
@click.option("--deleted", is_flag=True, help="Deleted snapshots instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@sdk_errors
def snapshot_ls(sandbox_id: str | None, deleted: bool, as_json: bool) -> None:
    """List the project's snapshots."""
    status = SnapshotStatus.DELETED if deleted else None
    snaps = Snapshot.list(sandbox_id=sandbox_id, status=status, limit=10_000)
    if as_json:
        click.echo(json.dumps([_view(s) for s in snaps]))
        return
    table = Table("NAME", "STATUS", "TYPE", "SIZE", "CREATED", box=None)
    table.add_column("ID", no_wrap=True, min_width=24)  # ids are what scripts copy: never cut
    for s in snaps:
        table.add_row(
            s.name,
            s.status.value,
            s.snapshot_type.value,
            human(s.size) if s.size is not None else "",
            s.created_at.isoformat()[:19] if s.created_at else "",
            s.id,
        )
    Console().print(table)


@snapshot.command(name="rm")
@click.argument("snapshot_ids", nargs=-1, required=True)
@sdk_errors
def snapshot_rm(snapshot_ids: tuple[str, ...]) -> None:
    """Delete snapshots (refused while a sandbox or another snapshot uses one)."""
    for snapshot_id in snapshot_ids:
        Snapshot.get(snapshot_id).delete()
        click.echo(snapshot_id)


@click.command()
@click.argument("sandbox_id")
@click.option("-n", "count", default=1, show_default=True, help="How many sandboxes (1-16).")
@click.option("--json", "as_json", is_flag=True, help="Print the new sandboxes as JSON.")
@sdk_errors
def fork(sandbox_id: str, count: int, as_json: bool) -> None:
    """Start new sandboxes from a sandbox's current filesystem; print their ids."""
    sb = Sandbox.get_from_id(sandbox_id)
    try:
        forks = sb.fork(n=count)
    finally:
        sb.close()
    items = [summary(f) for f in forks]
    for f in forks:
        f.close()
    click.echo(json.dumps(items) if as_json else "\n".join(i["id"] for i in items))
