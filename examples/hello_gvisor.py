"""The hello example under gVisor: the sandbox's code talks to gVisor's user-space kernel, and
only gVisor talks to the host's (needs runsc on the server's host: scripts/setup.sh builds it).

    python examples/hello_gvisor.py

With no SANDLOT_URL this uses the local sandlot server (started in the background if needed).
"""

from sandlot import Sandbox


def main() -> None:
    sandbox = Sandbox.create(runtime="gvisor")
    try:
        print(sandbox.exec("echo 'Hello from Koyeb Sandbox!'").stdout.strip())
        print("kernel:", sandbox.exec("uname -r").stdout.strip())  # 4.19.0-gvisor here
    finally:
        sandbox.delete()


if __name__ == "__main__":
    main()
