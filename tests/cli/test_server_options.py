"""``sandlot server``'s host-resource options reach the local engine, and bad values are refused
before anything starts."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from sandlot.cli.main import main
from sandlot.server.runner import serve
from sandlot.server.runner.serve import HostPolicy, ServerOptions


def test_bad_overcommit_and_reserve_are_refused() -> None:
    runner = CliRunner()
    bad = runner.invoke(main, ["server", "--overcommit", "sometimes"])
    assert bad.exit_code == 2 and "'allow'" in bad.output and "'none'" in bad.output
    bad = runner.invoke(main, ["server", "--reserve", "1.5"])
    assert bad.exit_code == 2 and "--reserve" in bad.output


def test_help_documents_the_policy() -> None:
    out = CliRunner().invoke(main, ["server", "--help"]).output
    assert "--overcommit [allow|none]" in out and "--reserve" in out
    assert HostPolicy() == HostPolicy("allow", 0.10)  # the defaults the help shows


def test_help_documents_the_extra_ca_file() -> None:
    out = " ".join(CliRunner().invoke(main, ["server", "--help"]).output.split())
    assert "--extra-ca-file PATH" in out and "SANDLOT_EXTRA_CA_FILE" in out
    assert "host's own CAs are never given to sandboxes" in out


@pytest.mark.parametrize(
    "args, env, expected",
    [
        ([], {}, "crun"),
        (["--runtime", "gvisor"], {}, "gvisor"),
        ([], {"SANDLOT_RUNTIME": "gvisor"}, "gvisor"),
        (["--runtime", "crun"], {"SANDLOT_RUNTIME": "gvisor"}, "crun"),  # the option wins
    ],
)
def test_runtime_option_and_env_reach_the_server(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], expected: str
) -> None:
    seen: list[ServerOptions] = []
    monkeypatch.setattr(serve, "serve", seen.append)
    result = CliRunner(env={"SANDLOT_RUNTIME": None, **env}).invoke(main, ["server", *args])
    assert result.exit_code == 0, result.output
    assert seen[0].default_runtime == expected


def test_an_unknown_runtime_is_refused() -> None:
    bad = CliRunner().invoke(main, ["server", "--runtime", "kata"])
    assert bad.exit_code == 2 and "'crun'" in bad.output and "'gvisor'" in bad.output
