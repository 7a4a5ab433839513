"""``sandlot snapshot create/ls/rm``, ``sandlot create --snapshot`` and ``sandlot fork``
against a real server and real sandboxes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sandlot.cli.main import main


@pytest.fixture
def cli(api_url: str) -> CliRunner:
    return CliRunner(env={"SANDLOT_URL": api_url})


def _ok(cli: CliRunner, args: list[str]) -> str:
    result = cli.invoke(main, args)
    assert result.exit_code == 0, result.output
    return str(result.stdout)


def test_snapshot_create_ls_spawn_fork_rm(cli: CliRunner) -> None:
    source = _ok(cli, ["create", "--image", "busybox"]).strip()
    spawned: list[str] = []
    try:
        _ok(cli, ["exec", source, "--", "echo cli > /f"])
        snap = _ok(cli, ["snapshot", "create", source, "cli-snap"]).strip()
        listed = json.loads(_ok(cli, ["snapshot", "ls", "--sandbox", source, "--json"]))
        assert [(s["id"], s["status"]) for s in listed] == [(snap, "available")]
        assert snap in _ok(cli, ["snapshot", "ls"])
        spawned.append(_ok(cli, ["create", "--snapshot", snap]).strip())
        assert _ok(cli, ["exec", spawned[0], "--", "cat /f"]) == "cli\n"
        refused = cli.invoke(main, ["snapshot", "rm", snap])
        assert refused.exit_code == 1 and "in use" in refused.output
        forks = _ok(cli, ["fork", source, "-n", "2"]).split()
        spawned += forks
        assert len(forks) == 2 and _ok(cli, ["exec", forks[1], "--", "cat /f"]) == "cli\n"
        _ok(cli, ["rm", *spawned])
        spawned.clear()
        assert _ok(cli, ["snapshot", "rm", snap]).strip() == snap
        assert snap in _ok(cli, ["snapshot", "ls", "--deleted"])
    finally:
        cli.invoke(main, ["rm", source, *spawned])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["snapshot", "rm", "no-such-snapshot"], "not found"),
        (["create", "--snapshot", "no-such-snapshot"], "not found"),
        (["snapshot", "create", "no-such-sandbox", "x"], "not found"),
    ],
)
def test_bad_snapshot_input_is_a_clear_error(cli: CliRunner, args: list[str], message: str) -> None:
    result = cli.invoke(main, args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
