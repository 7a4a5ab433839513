"""A stand-in for a node's kubelet, for tests on a control plane without nodes: it watches a
namespace's Pods through the real API server and, for each new sandbox Pod, does what a
kubelet would do -- runs its agent and reports the Pod running with an IP -- and stops the agent
when the Pod is deleted.

STAND-IN, NOT A KUBELET: the agent runs as a plain process on this host (no container, no image,
no isolation; it must only ever run the tests' own commands), on its own loopback address
(``127.77.x.y``, the "Pod IP") at the Pod's agent port. Its environment is what the Pod spec
says, with each ``secretKeyRef`` resolved from the real Secret and the Secret volume's file
written to a temporary directory: so a test through it checks that the Pod spec carries what
the agent needs, and that the engine and the server reach agents at Pod IPs.

Pods whose image is :data:`UNPULLABLE` are reported as a kubelet reports an image it cannot
pull (``ErrImagePull``).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import traceback
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.kube import ControlPlane
from support.proctree import kill_tree

UNPULLABLE = "registry.invalid/no-such-image:1"


@dataclass
class _Running:
    proc: subprocess.Popen[bytes] | None
    dir: Path
    ip: str


class LoopKubelet:
    def __init__(self, cp: ControlPlane, namespace: str, run_agents: bool = True) -> None:
        """``run_agents=False``: report Pods running without starting their agents (what
        bench/kubernetes.py measures: the API server's and the engine's share alone)."""
        self.cp = cp
        self.namespace = namespace
        self.run_agents = run_agents
        self.running: dict[str, _Running] = {}  # by Pod uid
        self._next_ip = 0
        self._lock = threading.Lock()
        self._resp: Any = None
        self._conn: http.client.HTTPSConnection | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="loop-kubelet")

    def __enter__(self) -> LoopKubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # Closing the response from here would wait for the thread's read: shut the socket
        # down under it instead, which ends the read at once.
        with contextlib.suppress(Exception):
            self._resp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        with self._lock:
            for uid in list(self.running):
                self._kill(uid)

    def pod_ips(self) -> set[str]:
        with self._lock:
            return {r.ip for r in self.running.values()}

    # -- the API ----------------------------------------------------------------------------

    def _open(self, path: str) -> Any:
        req = urllib.request.Request(self.cp.url + path)
        req.add_header("authorization", f"Bearer {self.cp.tokens['admin']}")
        ctx = ssl.create_default_context(cafile=str(self.cp.ca_file))
        return urllib.request.urlopen(req, context=ctx, timeout=None)

    def _patch_status(self, name: str, status: dict[str, Any]) -> None:
        """One kept-alive connection (a new TLS handshake per Pod was most of this stand-in's
        cost); a Pod deleted meanwhile answers 404, which is fine."""
        body = json.dumps({"status": status}).encode()
        headers = {
            "authorization": f"Bearer {self.cp.tokens['admin']}",
            "content-type": "application/merge-patch+json",
        }
        path = f"/api/v1/namespaces/{self.namespace}/pods/{name}/status"
        for _ in range(2):
            if self._conn is None:
                host, port = self.cp.url.removeprefix("https://").rsplit(":", 1)
                ctx = ssl.create_default_context(cafile=str(self.cp.ca_file))
                self._conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
            try:
                self._conn.request("PATCH", path, body, headers)
                self._conn.getresponse().read()
                return
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None

    def _secret_data(self, name: str) -> dict[str, str]:
        status, body = self.cp.request("GET", f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
        if status != 200:
            return {}
        data = json.loads(body).get("data") or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    # -- the watch --------------------------------------------------------------------------

    def _run(self) -> None:
        version = ""
        while not self._stop.is_set():
            try:
                self._resp = self._open(
                    f"/api/v1/namespaces/{self.namespace}/pods?watch=1"
                    f"&resourceVersion={version}&timeoutSeconds=600"
                )
                for line in self._resp:
                    event = json.loads(line)
                    pod = event["object"]
                    version = pod["metadata"].get("resourceVersion", version)
                    if event["type"] == "DELETED":
                        with self._lock:
                            self._kill(pod["metadata"]["uid"])
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        self._maybe_start(pod)
            except Exception:
                if self._stop.is_set():
                    return
                # Shown with a failing test's output: what this stand-in could not do.
                print("loop kubelet:", traceback.format_exc(), file=sys.stderr)
                self._stop.wait(0.1)

    # -- "running" a Pod ----------------------------------------------------------------------

    def _maybe_start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        if meta.get("deletionTimestamp"):
            return
        with self._lock:
            if uid in self.running:
                return
            self._next_ip += 1
            ip = f"127.77.{self._next_ip // 250}.{self._next_ip % 250 + 1}"
            work = Path(tempfile.mkdtemp(prefix="loopkubelet-"))
            self.running[uid] = _Running(None, work, ip)
        container = spec["containers"][0]
        if container["image"] == UNPULLABLE:
            self._patch_status(
                meta["name"],
                {
                    "phase": "Pending",
                    "containerStatuses": [
                        {
                            "name": container["name"],
                            "image": container["image"],
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "state": {"waiting": {"reason": "ErrImagePull"}},
                        }
                    ],
                },
            )
            return
        if self.run_agents:
            env = self._environment(pod, work)
            listen = container["command"][container["command"].index("--listen") + 1]
            port = listen.rsplit(":", 1)[1]
            log = open(work / "agent.log", "wb")  # noqa: SIM115 - kept open for the process
            proc = subprocess.Popen(
                [sys.executable, "-m", "sandlot.agent", "--listen", f"tcp:{ip}:{port}"],
                env=env,
                cwd=work,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            log.close()
            with self._lock:
                if uid in self.running:
                    self.running[uid].proc = proc
                else:  # deleted while starting
                    proc.kill()
                    proc.wait()
                    return
        self._patch_status(
            meta["name"],
            {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                ],
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": container["image"],
                        "imageID": "",
                        "ready": True,
                        "restartCount": 0,
                        "started": True,
                        "state": {"running": {}},
                    }
                ],
            },
        )

    def _environment(self, pod: dict[str, Any], work: Path) -> dict[str, str]:
        container = pod["spec"]["containers"][0]
        secrets: dict[str, dict[str, str]] = {}

        def secret_value(ref: dict[str, str]) -> str:
            if ref["name"] not in secrets:
                secrets[ref["name"]] = self._secret_data(ref["name"])
            return secrets[ref["name"]].get(ref["key"], "")

        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "LC_ALL": "C"}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            elif ref := item.get("valueFrom", {}).get("secretKeyRef"):
                env[item["name"]] = secret_value(ref)
        # The paths the Pod mounts, moved under this Pod's directory.
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for key, value in list(env.items()):
            for vol_name, mount_path in mounts.items():
                if value.startswith(mount_path + "/"):
                    local = work / vol_name / value[len(mount_path) + 1 :]
                    local.parent.mkdir(parents=True, exist_ok=True)
                    source = volumes.get(vol_name, {}).get("secret")
                    if source is not None:
                        item = next(i for i in source["items"] if i["path"] == local.name)
                        local.write_text(
                            secret_value({"name": source["secretName"], "key": item["key"]})
                        )
                    env[key] = str(local)
        return env

    def _kill(self, uid: str) -> None:
        running = self.running.pop(uid, None)
        if running is None:
            return
        if running.proc is not None and running.proc.poll() is None:
            kill_tree(running.proc.pid)  # the agent and the commands it started
            running.proc.wait()
        shutil.rmtree(running.dir, ignore_errors=True)
