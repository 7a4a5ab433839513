"""The seed's hello example, in Python: create a sandbox, run a command, delete it.

    python examples/hello.py

With no SANDLOT_URL this uses the local sandlot server (started in the background if needed).
"""

from sandlot import Sandbox


def main() -> None:
    sandbox = Sandbox.create()
    result = sandbox.exec("echo 'Hello from Koyeb Sandbox!'")
    print(result.stdout.strip())
    sandbox.delete()


if __name__ == "__main__":
    main()
