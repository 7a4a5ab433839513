"""The local engine: sandboxes as OCI containers run by crun on this machine.

One sandbox on disk (``<state>/sandboxes/<id>/``)::

    meta.json        what the sandbox was created from; ``"ready": true`` once create succeeded
    userns           its user namespace, owned by its own host uid and pinned here (userns.py)
    lower/           the image rootfs, id-mapped read-only into the sandbox's uid range
    disk.img         ext4 image sized by the instance type (the disk quota; sparse unless
                     the server runs with ``--overcommit none``),
    layer/           ... mounted here, holding upper/ and work/ (the writable overlay layer)
                     and sandlot/: /etc/hosts & co, /.sandlot/run, /.sandlot/config and the
                     agent's log (see own_files.py: all of it within the quota)
    bundle/          OCI bundle: config.json and rootfs/ (the overlay mount)
    agent.sock       the agent's socket, made here and handed to it as fd 3 (out of its reach)
    pasta.pid        the user-mode network process, for sandboxes with outbound access

Every step of ``create`` is undone by ``delete``, which tolerates any partial state; ``recover``
runs ``delete`` over whatever a crash left half-made and re-attaches the rest. Before anything
is written a create is admitted against what the host has left (admission.py, 0.15 ms). Costs of
the per-create steps added for host resources, measured on this (busy) host: the sandbox's own
user namespace 7.6-8.8 ms (userns.py; the throwaway one for the id-mapped mount: 1.8-5.8 ms);
a disk's preallocation with ``--overcommit none`` 1 ms for 1 GiB, 120 ms for 32 GiB (disks.py).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sandlot import netpolicy
from sandlot.agent.commands import HIDDEN_ENV
from sandlot.ca_certs import ExtraCA
from sandlot.engines.base import (
    RUNTIMES,
    AgentAddress,
    EngineError,
    EngineUnavailableError,
    ImageError,
    InsufficientResources,
    NetworkMode,
    SandboxInfo,
    SandboxNotFound,
    SandboxSpec,
    SandboxState,
    SnapshotInfo,
)
from sandlot.engines.local import (
    cgroups,
    checkpoint,
    gvisor,
    gvisor_bundle,
    gvisor_net,
    hostlimits,
    idmap,
    mounts,
    network,
    oom,
    own_files,
    runtime_image,
    userns,
)
from sandlot.engines.local.admission import (
    DEFAULT_RESERVE,
    Admission,
    Claim,
    Overcommit,
    claim_of,
)
from sandlot.engines.local.ca_store import CAStore
from sandlot.engines.local.disks import DiskStock, preallocate
from sandlot.engines.local.gvisor_agent_watch import AgentWatches
from sandlot.engines.local.hostlimits import grantable_open_files
from sandlot.engines.local.oci_runtime import OciRuntime
from sandlot.engines.local.oci_spec import SandboxConfig, build_config, host_block_device_dirs
from sandlot.engines.local.rootfs_paths import resolve_in_root
from sandlot.engines.local.socket_links import short_link
from sandlot.engines.local.uid_slots import SlotRegistry
from sandlot.images.snapshots import SnapshotStore, StoredSnapshot, image_of
from sandlot.images.store import Image, ImageStore
from sandlot.instance_types import get_instance_type
from sandlot.paths import (
    SANDBOX_AGENT_PID_FILE,
    SANDBOX_AGENT_SOCKET,
    SANDBOX_CLAIM_FILE,
    SANDBOX_ENV_FILE,
    SANDBOX_MAIN_COMMAND_FILE,
    SANDBOX_PROCESS_JOURNAL,
    SANDBOX_SECRET_FILE,
    images_dir,
)
from sandlot.runtime.closure import AGENT_ENV, agent_command, build_runtime

_ID_ALPHABET = set("abcdefghijklmnopqrstuvwxyz0123456789-")


def images_in_use(state_dir: Path) -> set[Path]:
    """The image rootfs of every sandbox under ``state_dir`` (running, asleep or half made)
    and of every snapshot: what ``sandlot image prune`` must keep."""
    used: set[Path] = set()
    if (state_dir / "snapshots").is_dir():
        used |= SnapshotStore(state_dir / "snapshots").base_images()
    sandboxes = state_dir / "sandboxes"
    if not sandboxes.is_dir():
        return used
    for meta in sandboxes.glob("*/meta.json"):
        try:
            used.add(Path(json.loads(meta.read_text())["image_rootfs"]))
        except (OSError, ValueError, KeyError, TypeError):
            # unreadable: keep every image rather than guess
            raise ImageError(f"cannot read {meta}: not pruning") from None
    return used


class LocalEngine:
    """Runs sandboxes with crun (or runc) on this host. Needs root."""

    name = "local"

    def __init__(
        self,
        state_dir: Path,
        *,
        images: ImageStore | None = None,
        oci_runtime: str | None = None,
        overcommit: Overcommit = Overcommit.ALLOW,
        reserve: float = DEFAULT_RESERVE,
        extra_ca: ExtraCA | None = None,
    ) -> None:
        if os.geteuid() != 0:
            raise EngineUnavailableError(
                "the local engine needs root (it mounts overlays, creates user namespaces and "
                "cgroups); run the sandlot server as root"
            )
        self.state_dir = state_dir
        self.sandboxes_dir = state_dir / "sandboxes"
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self.sandboxes_dir.chmod(0o711)
        self._socket_root = short_link(self.sandboxes_dir)
        self.disks = DiskStock(state_dir / "disks")
        self.images = images or ImageStore(images_dir(state_dir))
        #: Filesystem snapshots: layers stacked on images (images/snapshots.py).
        self.snapshots = SnapshotStore(state_dir / "snapshots", reserve)
        #: Held by a snapshot's delete and by a spawn until its meta names the snapshot's
        #: layers: a delete then sees every sandbox that uses them.
        self._snapshot_guard = asyncio.Lock()
        self.layout = cgroups.detect_layout()
        self.runtime = OciRuntime.detect(state_dir / "oci", self.layout, oci_runtime)
        self._gvisor: OciRuntime | None = None  # found on first use: runsc is optional
        self._runtime_dir: Path | None = None
        self._block_dirs = host_block_device_dirs()
        self._locks: dict[str, asyncio.Lock] = {}
        self.slots = SlotRegistry(self.sandboxes_dir)
        self._deleting: set[str] = set()
        #: gVisor sandboxes' agent sockets, adopted again when their agent restarts.
        self._agent_watches = AgentWatches()
        self._max_open_files = grantable_open_files()
        self._memsw = (
            self.layout is cgroups.CgroupLayout.V2
            or Path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
        )
        self.admission = Admission(state_dir, overcommit, reserve)
        #: The operator's extra CA certificates, given to every new sandbox (ca_store.py).
        self.ca_store = CAStore(extra_ca) if extra_ca is not None else None
        hostlimits.raise_file_max()
        pid_max = hostlimits.measure(state_dir).pid_max
        hostlimits.cap_sandbox_pids(self.layout, int(pid_max * (1 - reserve)))

    def _promised(self) -> builtins.list[tuple[str, Claim]]:
        """Every sandbox's claim (for ``--overcommit none``), from its recorded instance type."""
        out = []
        for directory in self.sandboxes_dir.iterdir():
            meta = self._read_meta(directory) or {}
            with contextlib.suppress(KeyError, ValueError):
                it = get_instance_type(meta["instance_type"])
                out.append((directory.name, claim_of(it, self._max_open_files)))
        return out

    def _admit(self, spec: SandboxSpec) -> None:
        promised = self._promised() if self.admission.overcommit is Overcommit.NONE else []
        claim = claim_of(spec.instance_type, self._max_open_files)
        self.admission.admit(spec.id, spec.instance_type.name, claim, promised)

    # -- helpers ------------------------------------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        if not sandbox_id or not set(sandbox_id) <= _ID_ALPHABET or len(sandbox_id) > 64:
            raise SandboxNotFound(f"invalid sandbox id {sandbox_id!r}")
        return self.sandboxes_dir / sandbox_id

    def _runtime_named(self, name: str) -> OciRuntime:
        """The runtime a sandbox asked for (``SandboxSpec.runtime``, kept in its meta)."""
        if name == "crun":
            return self.runtime
        if name == "gvisor":
            if self._gvisor is None:
                self._gvisor = OciRuntime.detect_gvisor(self.state_dir / "oci", self.layout)
            return self._gvisor
        raise EngineError(f"unknown runtime {name!r}: one of {', '.join(RUNTIMES)}")

    def _runtime_of(self, meta: Mapping[str, Any] | None) -> OciRuntime:
        return self._runtime_named((meta or {}).get("oci", "crun"))

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def agent_runtime(self) -> Path:
        if self._runtime_dir is None or not self._runtime_dir.exists():
            runtime_dir = build_runtime(self.state_dir / "runtime")
            runtime_image.ensure_packed(runtime_dir)
            self._runtime_dir = runtime_dir
        return self._runtime_dir

    def _address(self, directory: Path) -> AgentAddress:
        sock = self._socket_root / directory.name / "agent.sock"
        return AgentAddress(unix_path=str(sock))

    @staticmethod
    def _read_meta(directory: Path) -> dict[str, Any] | None:
        try:
            meta: dict[str, Any] = json.loads((directory / "meta.json").read_text())
            return meta
        except (OSError, ValueError):
            return None

    @staticmethod
    def _write_meta(directory: Path, meta: Mapping[str, Any]) -> None:
        tmp = directory / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.rename(directory / "meta.json")

    def _allocate_slot(self, directory: Path, meta: dict[str, Any]) -> int:
        """Give the sandbox its own uid range, host-wide (:mod:`.uid_slots`); recorded in its
        meta before anything is mounted. On the event loop: it takes ~1.5 ms, and being one
        step, a cancelled create never leaves a slot without its directory."""

        def claim(slot: int) -> None:
            meta["slot"] = slot
            directory.mkdir(mode=0o700)
            self._write_meta(directory, meta)

        return self.slots.allocate(directory.name, claim)

    # -- Engine interface ---------------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        directory = self._dir(spec.id)
        # the agent's own variables (one list, the agent's), and names no environment can hold
        bad_env = sorted(k for k in spec.env if k in HIDDEN_ENV or "=" in k or not k)
        if bad_env:
            raise EngineError(f"invalid or reserved environment variable names: {bad_env}")
        self._runtime_named(spec.runtime)  # an unknown runtime, or runsc missing: refused now
        # Admitted before anything is written (the agent runtime is built on first use).
        await asyncio.to_thread(self._admit, spec)
        try:
            stored = (
                await asyncio.to_thread(self.snapshots.get, spec.snapshot)
                if spec.snapshot
                else None
            )
            image = (
                stored.image
                if stored is not None
                else await asyncio.to_thread(
                    lambda: self.images.resolve(spec.image, auth=spec.registry_auth)
                )
            )
            built_runtime = await asyncio.to_thread(self.agent_runtime)
            runtime_dir = await asyncio.to_thread(runtime_image.ensure_mounted, built_runtime)
        except BaseException:
            self.admission.done(spec.id)
            raise
        async with self._lock(spec.id):
            if directory.exists():
                self.admission.done(spec.id)
                raise EngineError(f"sandbox {spec.id} already exists")
            meta: dict[str, Any] = {
                "id": spec.id,
                "image": spec.image,
                "image_rootfs": str(image.rootfs),
                "image_uid_base": image.uid_base,
                "image_env": image.env,
                "image_workdir": image.workdir,
                # a spawned snapshot's layers, top first, mounted over the image
                "layers": [str(p) for p in stored.layers] if stored is not None else [],
                "snapshot": spec.snapshot,
                "instance_type": spec.instance_type.name,
                "name": spec.name,
                "created_at": time.time(),
                "ready": False,
                "network": spec.network.value,
                "allow": None
                if spec.outbound_allowlist is None
                else list(netpolicy.normalize_allowlist(list(spec.outbound_allowlist))),
                "runtime": str(built_runtime),
                "oci": spec.runtime,
            }
            try:
                guard = self._snapshot_guard if spec.snapshot else contextlib.nullcontext()
                async with guard:
                    self._allocate_slot(directory, meta)
                    if spec.snapshot:  # deleted since it was read? then say so now
                        await asyncio.to_thread(self.snapshots.get, spec.snapshot)
                await asyncio.to_thread(self._prepare, directory, spec, image, meta, runtime_dir)
                if spec.id in self._deleting:
                    raise SandboxNotFound(f"sandbox {spec.id} was deleted while being created")
                pid = await self._run(directory)
                await self._connect(directory, pid, meta)
                meta["ready"] = True
                self._write_meta(directory, meta)
            except BaseException as exc:
                await asyncio.shield(self._destroy(spec.id, directory))
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise InsufficientResources(
                        "disk", f"the host's disk is full: cannot create sandbox {spec.id}"
                    ) from exc
                if isinstance(exc, OSError):  # e.g. ENOSPC under the state directory
                    # (the message, not str(exc): that would name a host path)
                    reason = exc.strerror or type(exc).__name__
                    raise EngineError(f"cannot create sandbox {spec.id}: {reason}") from exc
                raise
            finally:
                self.admission.done(spec.id)
        return SandboxInfo(spec.id, SandboxState.RUNNING, self._address(directory), pid=pid)

    @staticmethod
    def _mount_root(
        directory: Path,
        image_rootfs: Path,
        base: int,
        image_uid_base: int,
        layers: builtins.list[Path] | None = None,
    ) -> None:
        """Id-mapped image below (its owner range, ``image_uid_base``, shown as the sandbox's
        range), a spawned snapshot's layers (storage-owned, top first) over it, each id-mapped
        the same way, the sandbox's own layer above, merged at bundle/rootfs."""
        lower, layer = directory / "lower", directory / "layer"
        pin = directory / "userns"  # the sandbox's own, for crun (see userns.py)
        if not userns.is_pinned(pin):
            userns.create_pinned(base, pin)
        stacked = [(image_rootfs, lower, image_uid_base)]
        for n, source in enumerate(layers or []):
            target = directory / f"lower.{n}"
            target.mkdir(exist_ok=True)
            stacked.insert(n, (source, target, idmap.STORAGE_ID_BASE))
        fds: dict[int, int] = {}
        try:
            for source, target, first in stacked:
                if first not in fds:
                    fds[first] = idmap.userns_fd(base, first=first)
                idmap.mount_idmapped(source, target, fds[first])
        except idmap.IdmapError as exc:  # e.g. a filesystem without id-mapped mounts
            reason = f"the image's files cannot be mapped into a sandbox ({exc.reason})"
            raise ImageError(reason) from exc
        finally:
            for fd in fds.values():
                os.close(fd)
        merged = directory / "bundle" / "rootfs"
        lowers = [target for _, target, _ in stacked]
        mounts.mount_overlay(lowers, layer / "upper", layer / "work", merged)

    def _remount_if_needed(self, directory: Path, meta: dict[str, Any]) -> None:
        """After a host reboot the mounts are gone but the files are not: mount them again."""
        if meta.get("runtime"):
            runtime_image.ensure_mounted(Path(meta["runtime"]))
        if mounts.is_mountpoint(directory / "bundle" / "rootfs"):
            return
        for point in mounts.mounts_under(directory):
            mounts.unmount(point)
        base = idmap.ID_BASE + meta["slot"] * idmap.ID_RANGE
        mounts.mount_existing_disk_image(directory / "disk.img", directory / "layer")
        image_uid_base = int(meta.get("image_uid_base", 0))  # 0: made before the storage range
        layers = [Path(p) for p in meta.get("layers") or []]
        self._mount_root(directory, Path(meta["image_rootfs"]), base, image_uid_base, layers)

    def _prepare(
        self,
        directory: Path,
        spec: SandboxSpec,
        image: Image,
        meta: dict[str, Any],
        runtime_dir: Path,
    ) -> None:
        base = idmap.ID_BASE + meta["slot"] * idmap.ID_RANGE
        lower, layer = directory / "lower", directory / "layer"
        bundle, rootfs = directory / "bundle", directory / "bundle" / "rootfs"
        for d in (lower, layer, bundle, rootfs):
            d.mkdir()
        # The writable layer lives in its own filesystem image: that is the disk quota.
        self.disks.take(spec.instance_type.disk_mb, directory / "disk.img")
        if self.admission.overcommit is Overcommit.NONE:
            preallocate(directory / "disk.img", spec.instance_type.disk_mb)
        mounts.mount_existing_disk_image(directory / "disk.img", layer)
        os.chown(layer, base, base)
        upper, work = layer / "upper", layer / "work"
        for d in (upper, work):
            d.mkdir()
            os.chown(d, base, base)
        ca_env = self.ca_store.install(image.rootfs, upper, base) if self.ca_store else {}
        self._mount_root(
            directory, image.rootfs, base, image.uid_base, [Path(p) for p in meta["layers"]]
        )

        if resolve_in_root(rootfs, "/bin/sh") is None:
            raise ImageError(
                f"image {spec.image!r} has no /bin/sh: sandboxes run commands with sh -c"
            )
        hostname = (spec.name or spec.id)[:63]
        hostname = "".join(c if c.isalnum() or c == "-" else "-" for c in hostname).strip("-")
        hostname = hostname or spec.id[:12]
        etc = {
            "hostname": f"{hostname}\n",
            "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t{hostname}\n",
            "resolv.conf": network.resolv_conf(spec.network is NetworkMode.OUTBOUND),
        }
        # The commands' environment reaches the agent in a file: none of it (an image's
        # LD_PRELOAD, say, naming a file the sandbox can rewrite) reaches the agent's loader.
        command_env = {**image.env, **ca_env, **dict(spec.env)}
        command_env.setdefault("HOME", "/root")
        command_env["HOSTNAME"] = hostname
        own = own_files.prepare(
            layer,
            base,
            etc=etc,
            secret=None if spec.pool else spec.secret,
            env=command_env,
            main_command=spec.command,
        )
        env = {
            **AGENT_ENV,
            "SANDLOT_ENV_FILE": SANDBOX_ENV_FILE,
            "SANDLOT_PROCESS_JOURNAL": SANDBOX_PROCESS_JOURNAL,
        }
        if spec.runtime == "gvisor":
            env["SANDLOT_TUNNEL_FD"] = "0"  # see agent/tunnel.py
            env["SANDLOT_AGENT_PID_FILE"] = SANDBOX_AGENT_PID_FILE  # see checkpoint.py
        if spec.command is not None:
            env["SANDLOT_MAIN_COMMAND_FILE"] = SANDBOX_MAIN_COMMAND_FILE
        if spec.pool:
            env["SANDBOX_AUTH_MODE"] = "pool"
            env["SANDBOX_SECRET_PATH"] = SANDBOX_CLAIM_FILE  # the claim is kept here
        else:
            env["SANDBOX_SECRET_FILE"] = SANDBOX_SECRET_FILE
        cwd = image.workdir if resolve_in_root(rootfs, image.workdir) else "/"
        config = build_config(
            SandboxConfig(
                hostname=hostname,
                args=agent_command(
                    f"unix:{SANDBOX_AGENT_SOCKET}" if spec.runtime == "gvisor" else "fd:3"
                ),
                env=env,
                cwd=cwd,
                instance_type=spec.instance_type,
                id_base=base,
                id_range=idmap.ID_RANGE,
                runtime_dir=runtime_dir,
                # runsc's gofer opens bind sources by path as the sandbox's uid: outside the
                # state directory for it (gvisor_bundle.py)
                own_dir=gvisor_bundle.own_dir(spec.id) if spec.runtime == "gvisor" else own,
                cgroup_name=spec.id,
                privileged=spec.privileged,
                memory_swap_supported=self._memsw,
                max_open_files=self._max_open_files,
                extra_masked_paths=self._block_dirs,
                # runsc cannot join a namespace made beforehand (setns of a user namespace
                # from its multi-threaded Go process: EINVAL): it makes its own from the maps.
                userns_path=None if spec.runtime == "gvisor" else directory / "userns",
                netns_path=gvisor_net.netns_pin(directory) if spec.runtime == "gvisor" else None,
                seccomp_errno_ret=spec.runtime != "gvisor",
            )
        )
        (bundle / "config.json").write_text(json.dumps(config))

    async def _destroy(self, sandbox_id: str, directory: Path) -> None:
        """Remove everything of one sandbox, from whatever state it is in; its uid range last,
        once nothing of it is left."""
        self._agent_watches.stop(sandbox_id)
        meta = self._read_meta(directory)
        try:
            runtime = self._runtime_of(meta)
        except EngineError:  # its runtime is gone from this host: nothing of it can run
            runtime = None
        if runtime is not None:
            await runtime.kill_all(sandbox_id, "KILL")
            await runtime.delete(sandbox_id)
        network.detach_pasta(directory / "pasta.pid")
        await asyncio.to_thread(self._remove_files, sandbox_id, directory)
        if meta is not None and isinstance(meta.get("slot"), int):
            self.slots.release(sandbox_id, meta["slot"])

    def _remove_files(self, sandbox_id: str, directory: Path) -> None:
        gvisor_bundle.remove(sandbox_id)  # its mounts hold the sandbox's rootfs and disk
        for point in mounts.mounts_under(directory):
            mounts.unmount(point)
        mounts.wait_loop_released(directory / "disk.img")
        left = cgroups.remove_cgroup_dirs(cgroups.sandbox_cgroup_dirs(self.layout, sandbox_id))
        if left:
            # Processes still inside (e.g. runtime died mid-kill): kill them through the cgroup.
            for d in left:
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), 9)
            time.sleep(0.05)
            cgroups.remove_cgroup_dirs(left)
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            raise EngineError(f"could not remove the files of sandbox {sandbox_id}")

    async def delete(self, sandbox_id: str) -> None:
        directory = self._dir(sandbox_id)
        self._deleting.add(sandbox_id)
        try:
            async with self._lock(sandbox_id):
                await self._destroy(sandbox_id, directory)
        finally:
            self._deleting.discard(sandbox_id)
            self._locks.pop(sandbox_id, None)

    async def _run(self, directory: Path) -> int:
        """Start the sandbox's init with its agent's listening socket handed over as fd 3.

        Why the host makes the socket: its file then lives in the sandbox's host directory,
        which the sandbox cannot reach. A socket the agent created in a directory shared with
        the sandbox could be swapped for a symlink to any socket on the host, and the gateway
        would connect to that instead.
        """
        path = Path(str(self._address(directory).unix_path))  # short: AF_UNIX paths are limited
        meta = self._read_meta(directory) or {}
        if meta.get("oci") == "gvisor":
            mounts.unmount(directory / "agent.sock")  # the last run's agent socket (bound)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        base = idmap.ID_BASE + int(meta.get("slot", 0)) * idmap.ID_RANGE
        layer = directory / "layer"
        # Nothing of the sandbox runs now: what it left at its mount points is fixed up
        # before any of its files can matter to the runtime or the agent.
        await asyncio.to_thread(
            own_files.secure_mount_points, directory / "bundle" / "rootfs", base
        )
        if own_files.own_dir(layer).is_dir():
            log_path = own_files.own_dir(layer) / "agent.log"
            opened = await asyncio.to_thread(own_files.open_agent_log, layer)
            log_fd: int | None = opened
            # pid 1's stdout is the sandbox's own (root inside may reopen it through
            # /proc/1/fd/1): crun hands stdio to the container's root only in a user
            # namespace it makes itself, and this one is made by userns.py.
            os.fchown(opened, base, base)
        else:  # made before its disk held its own files: its config still names these
            log_path, log_fd = directory / "agent.log", None
        runtime = self._runtime_of(meta)
        if runtime.name == "runsc":
            made = own_files.own_dir(layer) / "run" / "agent.sock"
            await asyncio.to_thread(
                gvisor.remove_stale_socket, made
            )  # else adopted before the new one
            await asyncio.to_thread(gvisor_net.prepare, directory)
            try:
                bundle = await asyncio.to_thread(
                    gvisor_bundle.prepare,
                    directory.name,
                    directory / "bundle",
                    own_files.own_dir(layer),
                    base,
                )
                pid = await self._restore_or_run(directory, runtime, bundle, log_path, log_fd)
            finally:
                if log_fd is not None:
                    os.close(log_fd)
            await gvisor.adopt_agent_socket(made, directory / "agent.sock")
            self._agent_watches.start(directory.name, made, directory / "agent.sock")
            return pid
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # No umask games (the umask is process-wide: other creates run in other threads);
            # the sandbox's directory is 0700, so only root reaches the socket anyway.
            listener.bind(str(path))
            os.chmod(path, 0o600)
            listener.listen(256)
            pid = await runtime.run_detached(
                directory.name,
                directory / "bundle",
                log_path,
                directory / "init.pid",
                listener.fileno(),
                log_fd,
            )
            oom.protect_init(pid)
            return pid
        finally:
            listener.close()  # the sandbox's agent holds it now
            if log_fd is not None:
                os.close(log_fd)

    async def _restore_or_run(
        self,
        directory: Path,
        runtime: OciRuntime,
        bundle: Path,
        log_path: Path,
        log_fd: int | None,
    ) -> int:
        """A gVisor sandbox starts from its deep-sleep checkpoint if it has one (its processes
        and memory back), else afresh; a checkpoint that does not restore is dropped and the
        sandbox starts afresh (as a crun one wakes). Either way the image goes: it is stale as
        soon as the sandbox runs again."""
        image = checkpoint.image_dir(directory)
        if log_fd is not None and checkpoint.has_image(image):
            try:
                return await checkpoint.restore(
                    runtime,
                    directory.name,
                    image,
                    bundle,
                    directory / "init.pid",
                    log_fd,
                )
            except EngineError:
                await runtime.delete(directory.name)
            finally:
                await asyncio.to_thread(checkpoint.remove, image)
        return await runtime.run_detached(
            directory.name, bundle, log_path, directory / "init.pid", None, log_fd
        )

    async def _connect(self, directory: Path, pid: int, meta: dict[str, Any]) -> None:
        """Outbound access per the sandbox's policy: the nftables egress table first, then the
        interface, so there is no moment with an open network."""
        if meta.get("network") != NetworkMode.OUTBOUND.value:
            return
        allow = meta.get("allow")
        await self._open_network(directory, meta, pid, None if allow is None else tuple(allow))

    @staticmethod
    async def _open_network(
        directory: Path, meta: Mapping[str, Any], pid: int, allow: tuple[str, ...] | None
    ) -> None:
        """The egress table, then pasta if it is not there yet. crun: in the namespace of the
        sandbox's init, filtering what it sends; gVisor: in the namespace runsc joined,
        filtering what it forwards from gVisor's end (gvisor_net.py)."""
        pasta = directory / "pasta.pid"
        if meta.get("oci") == "gvisor":
            netns = str(gvisor_net.router_pin(directory))
            await network.apply_egress(netns, allow, forward_from=gvisor_net.HOST_LINK)
            if not network.pasta_alive(pasta):
                await network.attach_pasta(netns, pasta)
            return
        await network.apply_egress(f"/proc/{pid}/ns/net", allow)
        if not network.pasta_alive(pasta):
            await network.attach_pasta(f"/proc/{pid}/ns/net", pasta, directory / "userns")

    async def set_network(
        self, sandbox_id: str, mode: NetworkMode, outbound_allowlist: tuple[str, ...] | None
    ) -> None:
        directory = self._dir(sandbox_id)
        allow = (
            None
            if outbound_allowlist is None
            else list(netpolicy.normalize_allowlist(list(outbound_allowlist)))
        )
        async with self._lock(sandbox_id):
            meta = self._read_meta(directory)
            if meta is None or not meta.get("ready"):
                raise SandboxNotFound(f"no sandbox {sandbox_id}")
            meta["network"], meta["allow"] = mode.value, allow
            self._write_meta(directory, meta)
            await asyncio.to_thread(self._remount_if_needed, directory, meta)
            try:
                own_files.write_resolv_conf(
                    directory / "layer", network.resolv_conf(mode is NetworkMode.OUTBOUND)
                )
            except OSError as exc:
                raise EngineError(
                    f"cannot update the sandbox's resolv.conf: {exc.strerror}"
                ) from None
            state = await self._runtime_of(meta).state(sandbox_id)
            if state is None or not state.get("pid"):
                return  # stopped: applied at the next start
            if mode is NetworkMode.OUTBOUND:
                allowed = None if allow is None else tuple(allow)
                await self._open_network(directory, meta, int(state["pid"]), allowed)
            else:
                network.detach_pasta(directory / "pasta.pid")

    async def stop(self, sandbox_id: str) -> str | None:
        """Deep sleep: memory is released and the filesystem stays. A crun sandbox's processes
        end; a running gVisor sandbox is checkpointed first (checkpoint.py), and ``start``
        brings its processes back with their memory. Returns what was kept, if more."""
        directory = self._dir(sandbox_id)
        async with self._lock(sandbox_id):
            meta = self._read_meta(directory)
            if meta is None:
                raise SandboxNotFound(f"no sandbox {sandbox_id}")
            runtime = self._runtime_of(meta)
            self._agent_watches.stop(sandbox_id)  # its agent lets go of its socket now
            note = None
            state = await runtime.state(sandbox_id) if runtime.name == "runsc" else None
            if state is not None and state.get("status") == "running" and meta.get("ready"):
                usage = self.memory_usage(sandbox_id)
                if usage is None:
                    usage = get_instance_type(meta["instance_type"]).memory_bytes
                note = await checkpoint.sleep(runtime, sandbox_id, directory, usage)
            await runtime.kill_all(sandbox_id, "KILL")
            await runtime.delete(sandbox_id)
            network.detach_pasta(directory / "pasta.pid")
            if runtime.name == "runsc":
                await asyncio.to_thread(gvisor_bundle.remove, sandbox_id)
            return note

    async def start(self, sandbox_id: str) -> SandboxInfo:
        """Start a stopped sandbox again on its kept filesystem (its agent starts afresh)."""
        directory = self._dir(sandbox_id)
        async with self._lock(sandbox_id):
            meta = self._read_meta(directory)
            if meta is None or not meta.get("ready"):
                raise SandboxNotFound(f"no sandbox {sandbox_id}")
            runtime = self._runtime_of(meta)
            state = await runtime.state(sandbox_id)
            if state is not None and state.get("status") in ("running", "paused"):
                return await self.inspect(sandbox_id)
            if state is not None:
                await runtime.delete(sandbox_id)
            await asyncio.to_thread(self._remount_if_needed, directory, meta)
            pid = await self._run(directory)
            await self._connect(directory, pid, meta)
            return SandboxInfo(sandbox_id, SandboxState.RUNNING, self._address(directory), pid=pid)

    async def pause(self, sandbox_id: str) -> None:
        await self._set_paused(sandbox_id, True)

    async def resume(self, sandbox_id: str) -> None:
        await self._set_paused(sandbox_id, False)

    async def _set_paused(self, sandbox_id: str, paused: bool) -> None:
        """Light sleep: crun's sandboxes through the cgroup freezer (direct writes, ~0.1 ms:
        on the event loop); gVisor's through ``runsc pause``/``resume`` (gvisor.py says why)."""
        meta = self._read_meta(self._dir(sandbox_id))
        if meta is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        if meta.get("oci") == "gvisor":
            await gvisor.set_paused(self._runtime_of(meta), sandbox_id, paused)
            return
        self._set_frozen(sandbox_id, paused)

    def _set_frozen(self, sandbox_id: str, frozen: bool) -> None:
        try:
            cgroups.set_frozen(self.layout, sandbox_id, frozen)
        except cgroups.FreezerError as exc:
            raise EngineError(str(exc)) from exc

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        directory = self._dir(sandbox_id)
        meta = self._read_meta(directory)
        if meta is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        address = self._address(directory)
        if not meta.get("ready"):
            return SandboxInfo(sandbox_id, SandboxState.CREATING, address)
        state = await self._runtime_of(meta).state(sandbox_id)
        if state is None:
            saved = checkpoint.has_image(checkpoint.image_dir(directory))
            return SandboxInfo(
                sandbox_id,
                SandboxState.STOPPED,
                address,
                detail="checkpointed: its processes and memory are on disk"
                if saved
                else "the runtime has no record of it (host restarted?)",
            )
        status = state.get("status")
        if status == "running" and cgroups.is_frozen(self.layout, sandbox_id):
            status = "paused"
        mapped = {
            "running": SandboxState.RUNNING,
            "paused": SandboxState.PAUSED,
            "created": SandboxState.CREATING,
        }.get(status or "", SandboxState.STOPPED)
        return SandboxInfo(
            sandbox_id, mapped, address, pid=state.get("pid") or None, detail=str(status)
        )

    async def list(self) -> list[SandboxInfo]:
        out = []
        for directory in sorted(self.sandboxes_dir.iterdir()):
            with contextlib.suppress(SandboxNotFound):
                out.append(await self.inspect(directory.name))
        return out

    async def recover(self) -> builtins.list[str]:
        """After a crash: remove half-created sandboxes, orphaned runtime state and cgroups.
        Returns the ids that were removed.

        Only what this engine owns: its sandboxes directory, its runtime's state, and the
        sandboxes the host-wide slot registry says are its own. The cgroup parent is shared by
        every server on the host, so a cgroup there that none of these names is another
        server's (perhaps mid-create) and is left alone."""
        removed = []
        known: dict[str, Any] = {}
        for directory in sorted(self.sandboxes_dir.iterdir()):
            meta = self._read_meta(directory)
            if meta is None or not meta.get("ready"):
                await self._destroy(directory.name, directory)
                removed.append(directory.name)
            else:
                known[directory.name] = meta.get("slot")
        runtimes = [self.runtime]
        if (self.state_dir / "oci" / "runsc").exists():  # gVisor sandboxes were made here
            with contextlib.suppress(EngineUnavailableError):
                runtimes.append(self._runtime_named("gvisor"))
        for runtime in runtimes:
            for sandbox_id in await runtime.list_ids():
                if sandbox_id not in known:
                    await runtime.kill_all(sandbox_id, "KILL")  # its meta may not name it
                    await runtime.delete(sandbox_id)
                    await self._destroy(sandbox_id, self.sandboxes_dir / sandbox_id)
                    removed.append(sandbox_id)
                elif runtime.name == "runsc":  # running on: follow its agent again
                    directory = self.sandboxes_dir / sandbox_id
                    made = own_files.own_dir(directory / "layer") / "run" / "agent.sock"
                    self._agent_watches.start(sandbox_id, made, directory / "agent.sock")
        for sandbox_id in self.slots.owned().keys() - known.keys():
            cgroups.remove_cgroup_dirs(cgroups.sandbox_cgroup_dirs(self.layout, sandbox_id))
            gvisor_bundle.remove(sandbox_id)
        self.slots.adopt({i: slot for i, slot in known.items() if isinstance(slot, int)})
        self.snapshots.recover()
        self.slots.reclaim_stale()
        return removed

    # -- filesystem snapshots (images/snapshots.py) --------------------------------------------

    async def snapshot(self, sandbox_id: str, snapshot_id: str) -> SnapshotInfo:
        """Copy the sandbox's writable layer into a new snapshot. A running crun sandbox is
        frozen meanwhile (the copy is then of one moment, and nothing changes under it); a
        gVisor one is copied live (a frozen runsc sandbox hangs ``runsc state``)."""
        directory = self._dir(sandbox_id)
        async with self._lock(sandbox_id):
            meta = self._read_meta(directory)
            if meta is None or not meta.get("ready"):
                raise SandboxNotFound(f"no sandbox {sandbox_id}")
            await asyncio.to_thread(self._remount_if_needed, directory, meta)
            base = idmap.ID_BASE + int(meta["slot"]) * idmap.ID_RANGE
            rootfs = Path(meta["image_rootfs"])
            uid_base = int(meta.get("image_uid_base", 0))
            image = (
                Image(meta["image"], rootfs, meta["image_env"], meta["image_workdir"], uid_base)
                if "image_env" in meta
                else image_of(rootfs, meta["image"], uid_base)
            )
            stack = tuple(Path(p) for p in meta.get("layers") or [])
            freeze = meta.get("oci") != "gvisor" and not cgroups.is_frozen(self.layout, sandbox_id)
            state = await self._runtime_of(meta).state(sandbox_id)
            freeze = freeze and state is not None and state.get("status") == "running"
            try:
                if freeze:
                    cgroups.set_frozen(self.layout, sandbox_id, True)
                try:
                    stored: StoredSnapshot = await asyncio.to_thread(
                        self.snapshots.create,
                        snapshot_id,
                        directory / "layer" / "upper",
                        base,
                        image,
                        stack,
                    )
                finally:
                    if freeze:
                        cgroups.set_frozen(self.layout, sandbox_id, False)
            except OSError as exc:  # the message, not str(exc): that would name a host path
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise InsufficientResources("disk", "the server's disk is full") from exc
                reason = exc.strerror or type(exc).__name__
                raise EngineError(f"cannot snapshot sandbox {sandbox_id}: {reason}") from exc
        notes = [f"left out {n} {kind} entries" for kind, n in sorted(stored.dropped.items())]
        if len(stored.layers) == 1 and stack:
            notes.append(f"flattened {len(stack) + 1} stacked layers into one")
        return SnapshotInfo(snapshot_id, stored.size, tuple(notes))

    async def delete_snapshot(self, snapshot_id: str) -> None:
        def mounted() -> set[Path]:
            used: set[Path] = set()
            for directory in self.sandboxes_dir.iterdir():
                used |= {Path(p) for p in (self._read_meta(directory) or {}).get("layers") or []}
            return used

        async with self._snapshot_guard:
            await asyncio.to_thread(lambda: self.snapshots.delete(snapshot_id, mounted()))

    def memory_usage(self, sandbox_id: str) -> int | None:
        return cgroups.memory_usage_bytes(self.layout, sandbox_id)

    async def close(self) -> None:
        await self._agent_watches.close()


def new_sandbox_id() -> str:
    return secrets.token_hex(8)
