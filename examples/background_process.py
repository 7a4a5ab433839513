"""Background processes: launch, list, kill."""

from sandlot import Sandbox


def main() -> None:
    with Sandbox.create() as sandbox:
        pid = sandbox.launch_process("python3 -m http.server 8000", cwd="/tmp")
        print("launched", pid)
        for process in sandbox.list_processes():
            print(process.id, process.status, process.command)
        sandbox.kill_process(pid)
        print("still running:", sandbox.kill_all_processes())


if __name__ == "__main__":
    main()
