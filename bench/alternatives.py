"""The same workloads for the alternatives, driven through their command lines as users drive
them: raw crun (the floor: no server, no agent, a read-only rootfs), podman and docker (Debian's
``docker.io`` daemon, started here with its own data root and stopped afterwards).

Every backend runs the host's default sandlot image (imported as ``sandlot-bench``), with no
network (``--network none``; crun: a new, empty network namespace). A backend that cannot run on
this machine raises :class:`Unavailable` from ``__enter__`` and its figures are reported as
skipped with that reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.machine import make_tmp
from bench.sandlot_workloads import STREAM_SCRIPT
from bench.stats import Result, ms_since, skipped, summarize

IMAGE_TAG = "sandlot-bench"


class Unavailable(RuntimeError):
    """This alternative cannot run here; the message is the reason reported as the skip."""


def _run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:6])}... exited {proc.returncode}: "
            f"{proc.stderr.decode(errors='replace').strip()[-400:]}"
        )
    return proc


def _mounts_under(root: Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(str(root) + "/"):
                out.append(point)
    return out


def unmount_all_under(root: Path) -> None:
    for point in sorted(_mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def cgroup_memory_of_pid(pid: int) -> int | None:
    """The memory cgroup usage of the cgroup that holds ``pid`` (v1 or v2)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            f = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.usage_in_bytes"
            break
    else:
        f = Path("/sys/fs/cgroup") / lines[0].split(":", 2)[2].lstrip("/") / "memory.current"
    try:
        return int(f.read_text())
    except (OSError, ValueError):
        return None


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def host_helper_kib(pid: int) -> tuple[str, int]:
    """The per-container process the engine keeps on the host (docker's containerd-shim,
    podman's conmon): the container init's parent, when it is one of those."""
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        comm = Path(f"/proc/{ppid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return "", 0
    if comm.startswith(("containerd-shim", "conmon")):
        return comm, pss_kib(ppid)
    return "", 0


class Backend:
    name = "?"
    #: The seconds an image import or daemon start may take (first start only).
    can_copy_files = True

    def __enter__(self) -> Backend:
        raise NotImplementedError

    def __exit__(self, *exc: object) -> None:
        raise NotImplementedError

    # argv builders
    def run_argv(self, name: str, cmd: list[str]) -> list[str]:
        raise NotImplementedError

    def start_idle(self, name: str) -> None:
        raise NotImplementedError

    def exec_argv(self, name: str, cmd: list[str]) -> list[str]:
        raise NotImplementedError

    def create_delete_argv(self, name: str) -> list[str]:
        raise NotImplementedError

    def remove(self, names: list[str]) -> None:
        raise NotImplementedError

    def init_pid(self, name: str) -> int | None:
        raise NotImplementedError

    def cp_in_argv(self, local: str, name: str, remote: str) -> list[str]:
        raise NotImplementedError

    def cp_out_argv(self, name: str, remote: str, local: str) -> list[str]:
        raise NotImplementedError

    env: dict[str, str] | None = None

    def how(self, verb: str, what: str) -> str:
        return f"`{self.name} {verb}` {what} (command line, one process per call)"


# -- raw crun --------------------------------------------------------------------------------------


class Crun(Backend):
    """``crun run`` / ``crun exec`` on a bundle whose root is the image's rootfs, read-only."""

    name = "crun"
    can_copy_files = False

    def __init__(self, rootfs: Path) -> None:
        self.rootfs = rootfs
        self.tmp: Path | None = None
        self._bundles: dict[tuple[str, ...], Path] = {}
        self._names: set[str] = set()

    def __enter__(self) -> Crun:
        if shutil.which("crun") is None:
            raise Unavailable("crun is not installed")
        self.tmp = make_tmp("slb-crun-")
        self.state_root = self.tmp / "root"
        from sandlot.engines.local import cgroups

        self.hybrid = cgroups.detect_layout() is cgroups.CgroupLayout.HYBRID
        try:
            self.run_argv("probe", ["true"])  # builds the first bundle
            proc = _run(self.run_argv("probe-" + os.urandom(3).hex(), ["true"]), check=False)
            if proc.returncode != 0:
                raise Unavailable(f"crun run fails here: {proc.stderr.decode()[-300:]}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tmp is None:
            return
        with contextlib.suppress(Exception):
            self.remove(sorted(self._names))
        unmount_all_under(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None

    def how(self, verb: str, what: str) -> str:
        verb = "run" if verb.startswith("run") else verb  # crun run deletes on exit anyway
        return f"`crun {verb}` {what} (bundle on the image rootfs, read-only)"

    def _crun(self, *args: str) -> list[str]:
        base = ["crun", "--root", str(self.state_root), *args]
        if self.hybrid:  # crun 1.8 refuses the hybrid layout; hide cgroup2 in a private mount ns
            return [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                'umount /sys/fs/cgroup/unified && exec "$0" "$@"',
                *base,
            ]
        return base

    def _bundle(self, cmd: list[str]) -> Path:
        key = tuple(cmd)
        if key in self._bundles:
            return self._bundles[key]
        assert self.tmp is not None
        bundle = self.tmp / f"bundle{len(self._bundles)}"
        bundle.mkdir()
        subprocess.run(["crun", "spec", "-b", str(bundle)], check=True, capture_output=True)
        config = json.loads((bundle / "config.json").read_text())
        config["root"] = {"path": str(self.rootfs), "readonly": True}
        config["process"]["args"] = cmd
        config["process"]["terminal"] = False
        config["process"]["env"] = [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
        ]
        (bundle / "config.json").write_text(json.dumps(config))
        self._bundles[key] = bundle
        return bundle

    def run_argv(self, name: str, cmd: list[str]) -> list[str]:
        return self._crun("run", "--bundle", str(self._bundle(cmd)), name)

    def start_idle(self, name: str) -> None:
        self._names.add(name)
        argv = self._crun(
            "run", "--detach", "--bundle", str(self._bundle(["sleep", "infinity"])), name
        )
        # Never give a detached container a pipe: crun would wait on it.
        subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=60,
        )

    def exec_argv(self, name: str, cmd: list[str]) -> list[str]:
        return self._crun("exec", name, *cmd)

    def create_delete_argv(self, name: str) -> list[str]:
        return self.run_argv(name, ["true"])  # crun run deletes the container when it exits

    def remove(self, names: list[str]) -> None:
        for name in names:
            subprocess.run(
                self._crun("delete", "--force", name), capture_output=True, check=False, timeout=60
            )
            self._names.discard(name)

    def init_pid(self, name: str) -> int | None:
        proc = _run(self._crun("state", name), check=False)
        if proc.returncode != 0:
            return None
        return int(json.loads(proc.stdout).get("pid") or 0) or None


# -- docker and podman -----------------------------------------------------------------------------


class _Cli(Backend):
    run_flags: tuple[str, ...] = ()

    def __init__(self, rootfs: Path) -> None:
        self.rootfs = rootfs
        self.tmp: Path | None = None
        self.cli: list[str] = []

    def _import_image(self) -> None:
        tar = subprocess.Popen(
            ["tar", "-C", str(self.rootfs), "-c", "."],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert tar.stdout is not None
        imp = subprocess.run(
            [*self.cli, "import", "-", IMAGE_TAG],
            stdin=tar.stdout,
            capture_output=True,
            env=self.env,
            timeout=600,
            check=False,
        )
        tar.stdout.close()
        tar.wait()
        if imp.returncode != 0:
            raise Unavailable(f"{self.name} import failed: {imp.stderr.decode()[-300:]}")

    def run_argv(self, name: str, cmd: list[str]) -> list[str]:
        return [*self.cli, "run", *self.run_flags, "--name", name, IMAGE_TAG, *cmd]

    def start_idle(self, name: str) -> None:
        _run(
            [
                *self.cli,
                "run",
                "-d",
                *self.run_flags,
                "--name",
                name,
                IMAGE_TAG,
                "sleep",
                "infinity",
            ],
            env=self.env,
        )

    def exec_argv(self, name: str, cmd: list[str]) -> list[str]:
        return [*self.cli, "exec", name, *cmd]

    def create_delete_argv(self, name: str) -> list[str]:
        return [*self.cli, "run", "--rm", *self.run_flags, "--name", name, IMAGE_TAG, "true"]

    def remove(self, names: list[str]) -> None:
        for i in range(0, len(names), 50):
            _run(
                [*self.cli, "rm", "-f", *names[i : i + 50]], env=self.env, check=False, timeout=300
            )

    def init_pid(self, name: str) -> int | None:
        proc = _run([*self.cli, "inspect", "-f", "{{.State.Pid}}", name], env=self.env, check=False)
        try:
            return int(proc.stdout.decode().strip()) or None
        except ValueError:
            return None

    def cp_in_argv(self, local: str, name: str, remote: str) -> list[str]:
        return [*self.cli, "cp", local, f"{name}:{remote}"]

    def cp_out_argv(self, name: str, remote: str, local: str) -> list[str]:
        return [*self.cli, "cp", f"{name}:{remote}", local]

    def _remove_everything(self) -> None:
        proc = _run([*self.cli, "ps", "-aq"], env=self.env, check=False, timeout=60)
        ids = proc.stdout.decode().split()
        if ids:
            self.remove(ids)


class Docker(_Cli):
    """Debian's dockerd on its own data root, exec root and socket; no iptables, no bridge."""

    name = "docker"
    run_flags = ("--network", "none")

    def __enter__(self) -> Docker:
        dockerd, client = shutil.which("dockerd"), "/usr/bin/docker"
        if dockerd is None or not os.path.exists(client):
            raise Unavailable("Debian's docker.io is not installed (apt-get install docker.io)")
        self.tmp = make_tmp("slb-dk-")
        sock = self.tmp / "docker.sock"
        self.env = {**os.environ, "DOCKER_CONFIG": str(self.tmp / "config")}
        self.env.pop("DOCKER_HOST", None)
        self.cli = [client, "-H", f"unix://{sock}"]
        self.log = open(self.tmp / "dockerd.log", "wb")
        try:
            self.daemon = subprocess.Popen(
                [
                    dockerd,
                    "--data-root",
                    str(self.tmp / "data"),
                    "--exec-root",
                    str(self.tmp / "exec"),
                    "-H",
                    f"unix://{sock}",
                    "--pidfile",
                    str(self.tmp / "docker.pid"),
                    "--iptables=false",
                    "--ip-masq=false",
                    "--bridge=none",
                    "--log-level",
                    "error",
                ],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + 60
            while _run([*self.cli, "info"], env=self.env, check=False).returncode != 0:
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    tail = (self.tmp / "dockerd.log").read_text(errors="replace")[-400:]
                    raise Unavailable(f"dockerd did not start: {tail}")
                time.sleep(0.2)
            self._import_image()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tmp is None:
            return
        try:
            if getattr(self, "daemon", None) is not None and self.daemon.poll() is None:
                with contextlib.suppress(Exception):
                    self._remove_everything()
                self.daemon.send_signal(signal.SIGTERM)
                try:
                    self.daemon.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.daemon.pid, signal.SIGKILL)
                    self.daemon.wait(10)
        finally:
            with contextlib.suppress(Exception):
                self.log.close()
            unmount_all_under(self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class Podman(_Cli):
    """podman with its own storage root, run root and tmpdir; runc (crun refuses the hybrid
    cgroup layout), cgroupfs, file events. ``--ulimit``: podman raises nofile/nproc by default,
    which this host's bounding set (no CAP_SYS_RESOURCE) refuses."""

    name = "podman"
    run_flags = ("--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")

    def __enter__(self) -> Podman:
        podman = shutil.which("podman")
        if podman is None:
            raise Unavailable("podman is not installed (apt-get install podman)")
        self.tmp = make_tmp("slb-pm-")
        runtime = shutil.which("runc") or "runc"
        self.cli = [
            podman,
            "--root",
            str(self.tmp / "root"),
            "--runroot",
            str(self.tmp / "run"),
            "--tmpdir",
            str(self.tmp / "tmp"),
            "--runtime",
            runtime,
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--storage-driver",
            "overlay",
            "--log-level",
            "error",
        ]
        self.env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": "/dev/null"}
        try:
            self._import_image()
            probe = _run(self.run_argv("probe", ["true"]), env=self.env, check=False)
            if probe.returncode != 0:
                raise Unavailable(f"podman run fails here: {probe.stderr.decode()[-300:]}")
            self.remove(["probe"])
        except BaseException:
            self.__exit__()
            raise
        return self

    def remove(self, names: list[str]) -> None:
        for i in range(0, len(names), 50):
            _run(
                [*self.cli, "rm", "-f", "-t", "0", *names[i : i + 50]],
                env=self.env,
                check=False,
                timeout=300,
            )

    def __exit__(self, *exc: object) -> None:
        if self.tmp is None:
            return
        try:
            with contextlib.suppress(Exception):
                self._remove_everything()
            with contextlib.suppress(Exception):
                _run([*self.cli, "rmi", "-af"], env=self.env, check=False, timeout=120)
        finally:
            unmount_all_under(self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


# -- the workloads, for any backend ----------------------------------------------------------------


class AltBench:
    def __init__(self, backend: Backend, log: Any) -> None:
        self.b = backend
        self.log = log
        self._seq = 0

    def _name(self, what: str) -> str:
        self._seq += 1
        return f"slb-{what}-{os.getpid()}-{self._seq}"

    def _call(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return _run(argv, env=self.b.env, timeout=timeout)

    @contextlib.contextmanager
    def idle(self, count: int) -> Iterator[list[str]]:
        names: list[str] = []
        try:
            for _ in range(count):
                name = self._name("idle")
                names.append(name)
                self.b.start_idle(name)
            yield names
        finally:
            self.b.remove(names)

    def tti_cold(self, n: int) -> Result:
        samples, names = [], []
        try:
            for _ in range(n):
                name = self._name("tti")
                names.append(name)
                t0 = time.perf_counter()
                out = self._call(self.b.run_argv(name, ["echo", "hi"]))
                samples.append(ms_since(t0))
                if out.stdout != b"hi\n":
                    raise RuntimeError(f"{self.b.name}: echo hi printed {out.stdout!r}")
        finally:
            if not isinstance(self.b, Crun):
                self.b.remove(names)
        return summarize(samples, how=self.b.how("run", "echo hi"))

    def exec_rtt(self, n: int) -> Result:
        with self.idle(1) as (name,):
            argv = self.b.exec_argv(name, ["true"])
            for _ in range(3):
                self._call(argv)
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                self._call(argv)
                samples.append(ms_since(t0))
        return summarize(samples, how=self.b.how("exec", "true"))

    def exec_throughput(
        self, concurrency: list[int], containers: int, ops: int, rounds: int
    ) -> dict[str, Result]:
        out: dict[str, Result] = {}
        with self.idle(containers) as names:
            for c in concurrency:
                rates = []
                for _ in range(rounds):
                    counter = iter(range(ops))
                    lock = threading.Lock()
                    errors: list[BaseException] = []

                    def worker(
                        w: int,
                        counter: Iterator[int] = counter,
                        lock: threading.Lock = lock,
                        errors: list[BaseException] = errors,
                    ) -> None:
                        while True:
                            with lock:
                                i = next(counter, None)
                            if i is None:
                                return
                            try:
                                self._call(self.b.exec_argv(names[(w + i) % len(names)], ["true"]))
                            except BaseException as exc:
                                errors.append(exc)
                                return

                    threads = [threading.Thread(target=worker, args=(w,)) for w in range(c)]
                    t0 = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    if errors:
                        raise errors[0]
                    rates.append(ops / (time.perf_counter() - t0))
                out[f"c={c}"] = summarize(
                    rates, higher_is_better=True, ops_per_round=ops, sandboxes=containers
                )
        return out

    def stream_latency(self, lines: int, gap_s: float = 0.02) -> Result:
        script = STREAM_SCRIPT.format(lines=lines, gap=gap_s)
        with self.idle(1) as (name,):
            proc = subprocess.Popen(
                self.b.exec_argv(name, ["python3", "-c", script]),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                env=self.b.env,
                bufsize=0,
            )
            assert proc.stdout is not None
            samples = []
            buf = b""
            try:
                while True:
                    chunk = proc.stdout.read(65536)
                    if not chunk:
                        break
                    now = time.time()
                    buf += chunk
                    *done, buf = buf.split(b"\n")
                    samples += [(now - float(x)) * 1000 for x in done if x]
            finally:
                proc.wait(60)
        if len(samples) < lines:
            raise RuntimeError(f"{self.b.name} stream: got {len(samples)} of {lines} lines")
        return summarize(samples[1:], how=self.b.how("exec", "python3 (stdout pipe)"))

    def files(
        self, sizes: dict[str, int], rounds: int
    ) -> tuple[dict[str, Result], dict[str, Result]]:
        if not self.b.can_copy_files:
            reason = f"{self.b.name} has no file API (the host writes the rootfs directly)"
            return ({k: skipped(reason) for k in sizes}, {k: skipped(reason) for k in sizes})
        write: dict[str, Result] = {}
        read: dict[str, Result] = {}
        tmp = make_tmp("slb-files-")
        try:
            with self.idle(1) as (name,):
                for label, size in sizes.items():
                    src, back = tmp / "src.bin", tmp / "back.bin"
                    src.write_bytes(os.urandom(size))
                    w, r = [], []
                    for i in range(rounds):
                        remote = f"/root/bench-{label}-{i}.bin"
                        t0 = time.perf_counter()
                        self._call(self.b.cp_in_argv(str(src), name, remote), timeout=600)
                        w.append(size / 2**20 / (time.perf_counter() - t0))
                        back.unlink(missing_ok=True)
                        t0 = time.perf_counter()
                        self._call(self.b.cp_out_argv(name, remote, str(back)), timeout=600)
                        r.append(size / 2**20 / (time.perf_counter() - t0))
                        if back.read_bytes() != src.read_bytes():
                            raise RuntimeError(f"{self.b.name} cp {label}: bytes differ")
                        self._call(self.b.exec_argv(name, ["rm", "-f", remote]))
                    how = f"{self.b.name} cp (CLI)"
                    write[label] = summarize(w, higher_is_better=True, bytes=size, how=how)
                    read[label] = summarize(r, higher_is_better=True, bytes=size, how=how)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return write, read

    def idle_memory(self, count: int, settle_s: float) -> Result:
        with self.idle(count) as names:
            time.sleep(settle_s)
            values, helpers, helper_name = [], [], ""
            for name in names:
                pid = self.b.init_pid(name)
                if pid is None:
                    continue
                used = cgroup_memory_of_pid(pid)
                if used is not None:
                    values.append(used / 2**20)
                comm, kib = host_helper_kib(pid)
                if comm:
                    helper_name = comm
                    helpers.append(kib / 1024)
        if not values:
            return skipped(f"no cgroup memory accounting readable for {self.b.name} containers")
        extra: dict[str, Any] = {
            "running": len(names),
            "workload": "sleep infinity (no agent)",
            "source": "cgroup memory usage of each container",
        }
        if helpers:
            extra["host_helper"] = helper_name
            extra["host_helper_pss_mib_median"] = round(sorted(helpers)[len(helpers) // 2], 2)
        return summarize(values, **extra)

    def create_delete(self, concurrency: int, cycles: int, rounds: int) -> Result:
        rates = []
        for _ in range(rounds):
            names = [self._name("cd") for _ in range(cycles)]
            it = iter(names)
            lock = threading.Lock()
            errors: list[BaseException] = []

            def worker(
                it: Iterator[str] = it,
                lock: threading.Lock = lock,
                errors: list[BaseException] = errors,
            ) -> None:
                while True:
                    with lock:
                        name = next(it, None)
                    if name is None:
                        return
                    try:
                        self._call(self.b.create_delete_argv(name))
                    except BaseException as exc:
                        errors.append(exc)
                        return

            threads = [threading.Thread(target=worker) for _ in range(concurrency)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rates.append(cycles / (time.perf_counter() - t0))
            if errors:
                self.b.remove(names)
                raise errors[0]
        return summarize(
            rates,
            higher_is_better=True,
            concurrency=concurrency,
            cycles_per_round=cycles,
            how=self.b.how("run --rm", "true"),
        )
