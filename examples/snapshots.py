"""Three ways to start sandboxes from a prepared filesystem: a snapshot, a fork, a template.

    python examples/snapshots.py

With no SANDLOT_URL this uses the local sandlot server (started in the background if needed).
See docs/snapshots.md.
"""

from sandlot import Sandbox


def main() -> None:
    with Sandbox.create(image="busybox") as sandbox:
        sandbox.exec("mkdir -p /work && echo prepared > /work/state")

        # 1. a snapshot: the sandbox's files kept, spawned as often as you like
        snapshot = sandbox.snapshot("prepared")
        with snapshot.spawn() as spawned:
            print("spawned sees:", spawned.exec("cat /work/state").stdout.strip())

        # 2. a fork: new running sandboxes from this one's files as they are now
        forks = sandbox.fork(n=2)
        for fork in forks:
            print("fork sees:", fork.exec("cat /work/state").stdout.strip())
            fork.delete()
        snapshot.delete()

    # 3. a template: the steps, built once into a snapshot
    template = (
        Sandbox.template("greeter", "busybox", workdir="/app")
        .file("/app/name", "world\n")
        .run("echo hello $(cat name) > greeting")
    )
    built = template.build()
    with built.spawn() as sandbox:
        print("template says:", sandbox.exec("cat /app/greeting").stdout.strip())
    built.delete()


if __name__ == "__main__":
    main()
