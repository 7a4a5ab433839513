"""Timeouts and cancellation (the seed's AbortSignal): the command is killed either way."""

import threading

from sandlot import Sandbox, SandboxTimeoutError
from sandlot.sdk import CancelToken, CommandCancelledError


def main() -> None:
    with Sandbox.create() as sandbox:
        try:
            sandbox.exec("sleep 60", timeout=1)
        except SandboxTimeoutError as exc:
            print("timed out:", exc)
        token = CancelToken()
        threading.Timer(0.5, token.cancel).start()
        try:
            sandbox.exec("sleep 60", cancel=token)
        except CommandCancelledError as exc:
            print("cancelled:", exc)


if __name__ == "__main__":
    main()
