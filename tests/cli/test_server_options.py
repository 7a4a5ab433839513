"""``sandlot server``'s host-resource options reach the local engine, and bad values are refused
before anything starts."""

from __future__ import annotations

from click.testing import CliRunner

from sandlot.cli.main import main
from sandlot.server.runner.serve import HostPolicy


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
