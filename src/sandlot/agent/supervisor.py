"""``sandlot-init``: pid 1 of every sandbox, which keeps the agent alive whatever the sandbox's
code does to it.

Why pid 1, and why this way:

- The kernel drops every signal sent to a pid namespace's init from inside that namespace
  unless init installed a handler for it; SIGKILL and SIGSTOP cannot have one. This process
  installs none (it undoes the SIGINT handler Python installs), so ``kill -9 -1``,
  ``pkill -9 ...`` or ``kill 1`` from the sandbox's code never reach it. It never exits: when
  it ends the namespace ends, and the sandbox with it. The engine stops a sandbox with SIGKILL
  from outside, which does reach it.
- The agent is its child, started by ``fork`` without ``exec``: the agent's modules are imported
  here once, before the first fork, so a restart costs a fork and the agent's own set-up (a
  few milliseconds) instead of a new interpreter (~70 ms: asyncio-free as the agent is, the
  interpreter's start and the agent's imports still take that long here). The modules' memory
  is shared copy-on-write with the child (``gc.freeze`` keeps the collector from touching it):
  measured on an idle sandbox, pid 1 adds 0.5 MiB to the sandbox's memory over the old ``tini``
  (docs/agent.md has the measurement).
- The agent's listening socket (fd 3, made by the host) stays open here, so a client that
  connects while the agent is being restarted waits in the socket's backlog and is served by
  the next agent, rather than being refused. Requests the dead agent had accepted end with the
  connection closed (the server answers them with a clear error).
- A stopped agent (``kill -STOP -1``) is continued; orphans are reaped, as by any init.
- The process names do not look like Python: pid 1 runs as ``sandlot-init`` and the agent
  renames itself ``sandlot-agent`` (``/proc/self/comm``); the command line is the runtime's
  ``sandlot-init`` link, so ``pkill python3`` and ``pkill -f python`` match neither.

The host protects this process from the sandbox's OOM (``engines/local/oom.py``): the agent
inherits that protection and takes it off each command it starts (``commands.spawn``).

Restarts back off (``RESTART_DELAYS``) when the agent keeps dying at once -- a bad secret file
is a start-up error that no restart fixes -- and each one is written to the agent's log.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import time

from sandlot.agent.journal import JOURNAL_VARIABLE

#: Seconds to wait before the n-th consecutive quick restart (then the last value, forever).
RESTART_DELAYS = (0.0, 0.0, 0.05, 0.2, 1.0)
#: An agent that lived this long was healthy: its death restarts the count of quick deaths.
HEALTHY_AFTER = 5.0
#: While a fork fails (the pids limit is reached), try again this often, reaping meanwhile.
FORK_RETRY = 0.02
AGENT_NAME = b"sandlot-agent"

#: How many times this sandbox's agent was restarted; the forked agent reads it
#: (``sandlot.agent.__main__``) to know that processes of an earlier agent may exist.
restarts = 0


def _log(message: str) -> None:
    with contextlib.suppress(OSError):  # a full disk must not stop pid 1
        os.write(2, f"sandlot-init: {message}\n".encode())


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def _run_agent(argv: list[str]) -> None:
    """In the forked child: become the agent, and never return into the supervisor's loop."""
    code = 1
    try:
        with open("/proc/self/comm", "wb") as comm:
            comm.write(AGENT_NAME)
    except OSError:
        pass
    try:
        from sandlot.agent.__main__ import main

        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # whatever it is, the child ends here
        _log(f"agent crashed: {type(exc).__name__}: {exc}")
    finally:
        os._exit(code)


def _fork_agent(argv: list[str]) -> int | None:
    try:
        pid = os.fork()
    except OSError as exc:  # EAGAIN at the pids limit, ENOMEM
        _log(f"cannot start the agent ({exc.strerror}); retrying")
        return None
    if pid == 0:
        _run_agent(argv)
    return pid


def _reap_until_agent_ends(agent: int) -> int:
    """Wait for children until ``agent`` exits; reap orphans and continue a stopped agent.
    Returns the agent's wait status."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WUNTRACED)
        except ChildProcessError:  # pragma: no cover - the agent is our child: cannot happen
            return 0
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        if pid != agent:
            continue
        if os.WIFSTOPPED(status):
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent, signal.SIGCONT)
            continue
        return status


def _reap_for(seconds: float) -> None:
    """Sleep ``seconds`` while reaping whatever exits (zombies hold pids a fork needs)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, FORK_RETRY))


def supervise(argv: list[str]) -> None:
    """Run the agent with ``argv`` for ever, restarting it whenever it ends."""
    global restarts
    quick_deaths = 0
    while True:
        started = time.monotonic()
        pid = _fork_agent(argv)
        if pid is None:
            _reap_for(FORK_RETRY)
            continue
        status = _reap_until_agent_ends(pid)
        lived = time.monotonic() - started
        quick_deaths = 0 if lived >= HEALTHY_AFTER else quick_deaths + 1
        restarts += 1
        delay = RESTART_DELAYS[min(quick_deaths, len(RESTART_DELAYS) - 1)]
        _log(
            f"agent (pid {pid}) {_describe(status)} after {lived:.1f}s; "
            f"restart {restarts}" + (f" in {delay:g}s" if delay else "")
        )
        if delay:
            _reap_for(delay)


def main() -> None:
    # pid 1 ignores every signal from inside its namespace as long as it has no handler:
    # Python's own SIGINT handler would let `kill -INT 1` end the sandbox.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    argv = sys.argv[1:]
    # Import the agent (not run it) once: each restart is then a fork away.
    import sandlot.agent.__main__
    import sandlot.agent.app

    sandlot.agent.__main__.parse_args(argv)  # a usage error ends here, before any fork
    journal = os.environ.get(JOURNAL_VARIABLE)
    if journal:  # the sandbox (re)starts: no process of an earlier life is left
        with contextlib.suppress(OSError):
            os.unlink(journal)
    gc.collect()
    gc.freeze()
    supervise(argv)


if __name__ == "__main__":
    main()
