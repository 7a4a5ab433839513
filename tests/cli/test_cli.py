"""The ``sandlot`` command line against a real server and real sandboxes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.runtimes import RUNSC_MISSING

from sandlot.cli.main import main


@pytest.fixture
def cli(api_url: str) -> CliRunner:
    return CliRunner(env={"SANDLOT_URL": api_url})


def test_run_prints_42(cli: CliRunner) -> None:
    result = cli.invoke(main, ["run", "--", "python3", "-c", "print(6*7)"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "42\n"


def test_run_returns_the_commands_exit_code(cli: CliRunner) -> None:
    result = cli.invoke(
        main, ["run", "--image", "busybox", "--", "sh", "-c", "echo oops >&2; exit 7"]
    )
    assert result.exit_code == 7
    assert "oops" in result.stderr


def test_create_ls_exec_cp_rm(cli: CliRunner, tmp_path: Path) -> None:
    created = cli.invoke(main, ["create", "--name", "cli-box", "--label", "team=a", "--json"])
    assert created.exit_code == 0, created.output
    info = json.loads(created.stdout)
    sid = info["id"]
    assert "secret" not in info
    assert info["runtime"] == "crun"  # the server's default
    try:
        listed = cli.invoke(main, ["ls", "--label", "team=a", "--json"])
        assert [s["id"] for s in json.loads(listed.stdout)] == [sid]
        assert json.loads(listed.stdout)[0]["runtime"] == "crun"
        table = cli.invoke(main, ["ls"])
        assert "cli-box" in table.stdout and "RUNTIME" in table.stdout
        shown = cli.invoke(main, ["info", sid])
        assert shown.exit_code == 0, shown.output
        assert f"id:               {sid}" in shown.stdout
        assert "runtime:          crun" in shown.stdout
        assert json.loads(cli.invoke(main, ["info", sid, "--json"]).stdout)["id"] == sid

        out = cli.invoke(
            main,
            [
                "exec",
                sid,
                "--",
                "sh",
                "-c",
                "echo $FOO",
            ],
            env={},
        )
        assert out.exit_code == 0
        out = cli.invoke(main, ["exec", sid, "--env", "FOO=bar", "--", "echo $FOO"])
        assert out.stdout == "bar\n"

        payload = os.urandom(300_000) + b"\x00\xff tail"
        src = tmp_path / "in.bin"
        src.write_bytes(payload)
        assert cli.invoke(main, ["cp", str(src), f"{sid}:/root/in.bin"]).exit_code == 0
        back = tmp_path / "back.bin"
        assert cli.invoke(main, ["cp", f"{sid}:/root/in.bin", str(back)]).exit_code == 0
        assert back.read_bytes() == payload
    finally:
        removed = cli.invoke(main, ["rm", sid])
    assert removed.exit_code == 0
    gone = cli.invoke(main, ["exec", sid, "--", "true"])
    assert gone.exit_code == 1
    assert "not found" in gone.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--instance-type", "huge", "--", "true"], "unknown instance_type 'huge'"),
        (["run", "--env", "NOEQUALS", "--", "true"], "expected KEY=VALUE"),
        (["run"], "missing command"),
        (["run", "--runtime", "kata", "--", "true"], "'kata' is not one of"),
        (["info", "no-such-sandbox"], "not found"),
        (["exec", "no-such-sandbox", "--", "true"], "not found"),
        (["cp", "a", "b"], "exactly one of SOURCE and DEST"),
        (["image", "pull", "Not/Lower:1"], "not a registry reference"),
        (["image", "pull", "127.0.0.1:1/nothing:1"], "cannot pull 127.0.0.1:1/nothing:1"),
        (["token", "create", "--scope", "root"], "'root' is not one of"),
        (["quota", "set", "p", "--memory", "lots"], "expected a size such as 512M"),
        (["quota", "set", "p", "--cpu", "x"], "expected a number or 'none'"),
        (["quota", "set", "p"], "give at least one of"),
    ],
)
def test_bad_input_is_a_clear_error(cli: CliRunner, args: list[str], message: str) -> None:
    result = cli.invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output + result.stderr
    assert "Traceback" not in result.output


def test_token_create_list_revoke(cli: CliRunner) -> None:
    created = cli.invoke(main, ["token", "create", "--project", "cli-proj", "--json"])
    assert created.exit_code == 0, created.output
    tok = json.loads(created.stdout)
    assert tok["token"]
    listed = json.loads(cli.invoke(main, ["token", "ls", "--json"]).stdout)
    assert tok["id"] in [t["id"] for t in listed]
    assert all(t.get("token") is None for t in listed)
    assert cli.invoke(main, ["token", "revoke", tok["id"]]).exit_code == 0


def test_token_scopes(cli: CliRunner) -> None:
    args = ["token", "create", "--project", "cli-scope", "--scope", "privileged", "--json"]
    tok = json.loads(cli.invoke(main, args).stdout)
    assert tok["scope"] == "privileged"
    table = cli.invoke(main, ["token", "ls", "--project", "cli-scope"]).stdout
    assert "SCOPE" in table and "privileged" in table
    assert cli.invoke(main, ["token", "revoke", tok["id"]]).exit_code == 0


def test_quota_set_show_remove(cli: CliRunner) -> None:
    args = ["quota", "set", "cli-quota", "--max-sandboxes", "3", "--memory", "8G"]
    result = cli.invoke(main, [*args, "--cpu", "4", "--disk", "20G"])
    assert result.exit_code == 0, result.output
    shown = {q["project"]: q for q in json.loads(cli.invoke(main, ["quota", "--json"]).stdout)}
    quota = shown["cli-quota"]
    assert (quota["max_sandboxes"], quota["memory_mb"], quota["vcpu"]) == (3, 8192, 4.0)
    assert quota["disk_mb"] == 20480 and quota["usage"]["sandboxes"] == 0
    assert cli.invoke(main, ["quota", "set", "cli-quota", "--memory", "none"]).exit_code == 0
    table = cli.invoke(main, ["quota"]).stdout
    assert "cli-quota" in table and "0 / 3" in table and "0M / -" in table
    assert cli.invoke(main, ["quota", "rm", "cli-quota"]).stdout.strip() == "cli-quota"


def test_events_after_delete(cli: CliRunner) -> None:
    created = cli.invoke(main, ["create", "--image", "busybox"])
    sid = created.stdout.strip()
    assert cli.invoke(main, ["rm", sid]).exit_code == 0
    out = cli.invoke(main, ["events", sid, "--json"])
    assert out.exit_code == 0, out.output
    assert [e["kind"] for e in json.loads(out.stdout)] == ["created", "deleted"]
    text = cli.invoke(main, ["events", sid])
    assert "deleted on request" in text.stdout


def test_secret_create_list_remove(cli: CliRunner) -> None:
    args = ["secret", "create", "cli-reg", "--registry", "ghcr.io", "--username", "bot",
            "--password-stdin"]  # fmt: skip
    made = cli.invoke(main, args, input="tok-123\n")
    assert made.exit_code == 0, made.output + made.stderr
    assert made.output.strip() == "cli-reg"
    again = cli.invoke(main, args, input="tok-123\n")
    assert again.exit_code == 1 and "already exists" in again.stderr
    empty = cli.invoke(main, [*args[:3], "--registry", "ghcr.io", "--username", "bot",
                              "--password-stdin"], input="")  # fmt: skip
    assert empty.exit_code != 0 and "no password" in empty.output + empty.stderr
    listed = cli.invoke(main, ["secret", "ls", "--json"])
    items = json.loads(listed.output)
    assert [(i["name"], i["registry"], i["username"]) for i in items] == [
        ("cli-reg", "ghcr.io", "bot")
    ]
    assert "tok-123" not in listed.output
    assert cli.invoke(main, ["secret", "rm", "cli-reg"]).output.strip() == "cli-reg"
    gone = cli.invoke(main, ["secret", "rm", "cli-reg"])
    assert gone.exit_code == 1 and "not found" in gone.stderr


@pytest.mark.skipif(shutil.which("runsc") is None, reason=RUNSC_MISSING)
def test_create_runtime_gvisor_shown_by_info_and_ls(cli: CliRunner) -> None:
    created = cli.invoke(main, ["create", "--runtime", "gvisor", "--json"])
    assert created.exit_code == 0, created.output
    sid = json.loads(created.stdout)["id"]
    try:
        assert json.loads(created.stdout)["runtime"] == "gvisor"
        assert "runtime:          gvisor" in cli.invoke(main, ["info", sid]).stdout
        listed = json.loads(cli.invoke(main, ["ls", "--json"]).stdout)
        assert {s["id"]: s["runtime"] for s in listed}[sid] == "gvisor"
        row = next(line for line in cli.invoke(main, ["ls"]).stdout.splitlines() if sid in line)
        assert "gvisor" in row.split()
        out = cli.invoke(main, ["exec", sid, "--", "cat /proc/version"])
        assert "gvisor" in out.stdout
    finally:
        cli.invoke(main, ["rm", sid])
