"""Where sandlot keeps things, on the host and inside every sandbox.

Host paths can be moved with ``SANDLOT_STATE_DIR`` (tests use a temporary one). Paths inside a
sandbox are fixed: the engine mounts them, the agent and the server rely on them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

#: Inside every sandbox: the read-only runtime that runs the agent (Python closure + agent code).
SANDBOX_RUNTIME_DIR = "/.sandlot/runtime"
#: Inside every sandbox: a directory the agent may write (the pool-mode claim is kept there).
SANDBOX_RUN_DIR = "/.sandlot/run"
#: gVisor sandboxes: where the agent makes its socket (runsc cannot hand it a host socket; the
#: engine then links the socket file where the sandbox cannot reach it, see engines/local).
SANDBOX_AGENT_SOCKET = f"{SANDBOX_RUN_DIR}/agent.sock"
#: gVisor sandboxes: where the agent writes its pid, for the checkpoint hook to signal it
#: (sandlot.agent.checkpoint).
SANDBOX_AGENT_PID_FILE = f"{SANDBOX_RUN_DIR}/agent.pid"
#: Pool mode: where the agent keeps the secret it was claimed with (across restarts).
SANDBOX_CLAIM_FILE = f"{SANDBOX_RUN_DIR}/secret"
#: Where the agent journals its background processes (a restarted agent still lists them).
SANDBOX_PROCESS_JOURNAL = f"{SANDBOX_RUN_DIR}/processes"
#: Inside every sandbox: the agent's read-only configuration (host-owned: the sandbox can read
#: it, never change it): its secret and the environment its commands get.
SANDBOX_CONFIG_DIR = "/.sandlot/config"
SANDBOX_SECRET_FILE = f"{SANDBOX_CONFIG_DIR}/secret"
SANDBOX_ENV_FILE = f"{SANDBOX_CONFIG_DIR}/env"
#: The sandbox's main process (entrypoint/command/args), a ``sh -c`` line the agent runs.
SANDBOX_MAIN_COMMAND_FILE = f"{SANDBOX_CONFIG_DIR}/main"


def state_dir() -> Path:
    """Root of the host's persistent state (images, sandboxes, database)."""
    configured = os.environ.get("SANDLOT_STATE_DIR")
    if configured:
        return Path(configured)
    return _default_state_dir()


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/sandlot")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(xdg) / "sandlot"


def images_dir(state: Path | None = None) -> Path:
    """Where built images live: ``SANDLOT_IMAGES_DIR``, else ``<state>/images``. (Tests and
    benchmarks run servers with their own state directory but share the built images.)"""
    configured = os.environ.get("SANDLOT_IMAGES_DIR")
    if configured:
        return Path(configured)
    return (state if state is not None else state_dir()) / "images"


def runtime_dir() -> Path:
    """Per-user runtime directory: the server's default socket lives here.
    ``$XDG_RUNTIME_DIR/sandlot``, else ``sandlot-$UID`` in the temporary directory (``$TMPDIR``,
    usually ``/tmp``), where anyone may have created it first: see :mod:`sandlot.local_trust`."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "sandlot"
    return Path(tempfile.gettempdir()) / f"sandlot-{os.geteuid()}"


def default_server_socket(state: Path | None = None) -> Path:
    """The local server's socket for a state directory (default: :func:`state_dir`), where the
    CLI and the SDK find it (a TCP server serves its admin API there too). One per state dir:
    ``sandlot.sock`` for the default one, ``sandlot-<hash of its path>.sock`` for another, so
    that servers with their own ``SANDLOT_STATE_DIR`` never meet on one socket."""
    state = state if state is not None else state_dir()
    if state.resolve() == _default_state_dir().resolve():
        return runtime_dir() / "sandlot.sock"
    digest = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:12]
    return runtime_dir() / f"sandlot-{digest}.sock"
