"""The seed's exec_stream example: output as it is produced, through event listeners."""

import sys

from sandlot import Sandbox


def main() -> None:
    with Sandbox.create() as sandbox:
        stream = sandbox.exec_stream("for i in 1 2 3; do echo step $i; sleep 0.2; done; exit 0")
        stream.add_event_listener("stdout", lambda ev: sys.stdout.write(ev.data["data"]))
        stream.add_event_listener("stderr", lambda ev: sys.stderr.write(ev.data["data"]))
        stream.add_event_listener(
            "exit", lambda ev: sys.stderr.write(f"Exit code: {ev.data['code']}\n")
        )
        stream.add_event_listener("end", lambda ev: print("Command finished"))
        stream.wait()


if __name__ == "__main__":
    main()
