"""``python -m sandlot.agent --listen unix:PATH | tcp:HOST:PORT | fd:N``.

Argument parsing is done by hand: :mod:`argparse` costs milliseconds of start-up that every
sandbox would pay.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

USAGE = """usage: python -m sandlot.agent --listen unix:PATH | tcp:HOST:PORT | fd:N

  fd:N   an inherited socket, already bound and listening (the engine's way)

Environment:
  SANDBOX_SECRET         bearer secret clients must present
  SANDBOX_SECRET_FILE    file holding the secret (instead of SANDBOX_SECRET)
  SANDBOX_AUTH_MODE      "pool": the first bearer token presented becomes the secret
  SANDBOX_SECRET_PATH    pool mode: where the claimed secret is persisted
  SANDLOT_AGENT_MAX_BODY largest JSON request body, in bytes (default 64 MiB)
  SANDLOT_ENV_FILE       JSON object: the environment commands run with (instead of the
                         agent's own, which then never carries the commands' variables)
  SANDLOT_PROCESS_JOURNAL  file journalling background processes, so that a restarted agent
                         still lists them (see sandlot.agent.journal)
  SANDLOT_AGENT_PID_FILE with unix:PATH, where the agent writes its pid: SIGUSR1 then closes
                         its sockets for a gVisor checkpoint, SIGUSR2 listens again
                         (see sandlot.agent.checkpoint)
  SANDLOT_MAIN_COMMAND_FILE  file holding the sandbox's main process (a sh -c line), started
                         and restarted by the agent (see sandlot.agent.main_process)
"""


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT to leave the accept loop."""


def _parse_args(argv: list[str]) -> str:
    listen = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        if arg == "--listen" and i + 1 < len(argv):
            listen = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--listen="):
            listen = arg.split("=", 1)[1]
            i += 1
            continue
        sys.stderr.write(f"sandlot-agent: unknown argument {arg!r}\n{USAGE}")
        raise SystemExit(2)
    if not listen:
        sys.stderr.write(USAGE)
        raise SystemExit(2)
    return listen


def main(argv: list[str] | None = None) -> int:
    listen = _parse_args(sys.argv[1:] if argv is None else argv)

    from sandlot.agent.app import DEFAULT_MAX_BODY, App
    from sandlot.agent.auth import Authenticator, ConfigError
    from sandlot.agent.checkpoint import Parking
    from sandlot.agent.http11 import Listener

    try:
        auth = Authenticator.from_env(os.environ)
        max_body = int(os.environ.get("SANDLOT_AGENT_MAX_BODY", DEFAULT_MAX_BODY))
        app = App(auth, max_body=max_body)
    except (ConfigError, ValueError) as exc:
        sys.stderr.write(f"sandlot-agent: {exc}\n")
        return 2
    try:
        listener = Listener(listen)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"sandlot-agent: cannot listen on {listen}: {exc}\n")
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a vanished client is an EPIPE, not a death
    parking = Parking.from_env(dict(os.environ), listener)
    try:
        if parking is None:
            listener.serve_forever(app.dispatch)
        else:
            parking.install()
            parking.serve(app.dispatch)
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        listener.close()
        app.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
