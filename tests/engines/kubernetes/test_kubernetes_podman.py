"""The engine's Pod spec run for real by ``podman kube play`` (no kubelet is needed for that):
the init container copies the agent runtime from a runtime image into the sandbox's image,
which has no Python at all (busybox only), the agent reads its secret from the Secret's volume
and answers on its port.

podman 4.3 (Debian 12) differs from a kubelet in ways the test works around, each said where
it is done: its own storage, runc and cgroupfs (crun refuses this host's hybrid cgroups), a
``nofile`` limit this host allows, the Secret given as a podman secret whose ``data`` it reads
without base64-decoding, ``restartPolicy: Never`` (with ``Always`` it restarts the init
container and then cannot remove it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandlot.engines.base import SandboxSpec
from sandlot.engines.kubernetes import manifests
from sandlot.engines.kubernetes.settings import KubernetesSettings
from sandlot.instance_types import get_instance_type
from sandlot.runtime.closure import build_runtime

pytestmark = pytest.mark.root

RUNTIME_IMAGE = "localhost/sandlot-runtime:k8s-test"
SANDBOX_IMAGE = "localhost/sandlot-busybox:k8s-test"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "podman kube play runs as root here (CI does)"
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("catatonit", "catatonit")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package}; scripts/setup.sh does)"
    return None


@pytest.fixture(scope="module")
def podman() -> Iterator[list[str]]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    tmp = Path(tempfile.mkdtemp(prefix="sl-k8s-podman-"))
    (tmp / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n'
    )
    os.environ["CONTAINERS_CONF"] = str(tmp / "containers.conf")
    os.environ["CONTAINERS_REGISTRIES_CONF"] = "/dev/null"
    cli = [
        shutil.which("podman") or "podman",
        *("--root", str(tmp / "root"), "--runroot", str(tmp / "run")),
        *("--tmpdir", str(tmp / "tmp"), "--runtime", shutil.which("runc") or "runc"),
        *("--cgroup-manager", "cgroupfs", "--events-backend", "file", "--log-level", "error"),
    ]
    try:
        # The runtime image: the agent runtime at /.sandlot/runtime, nothing else.
        runtime = build_runtime(tmp / "runtime-build")
        with tarfile.open(tmp / "runtime.tar", "w") as tar:
            tar.add(runtime, arcname=".sandlot/runtime")
        # The sandbox's image: a static busybox as /bin/sh, no Python.
        with tarfile.open(tmp / "busybox.tar", "w") as tar:
            tar.add("/bin/busybox", arcname="bin/busybox")
            link = tarfile.TarInfo("bin/sh")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
            for d in ("tmp", "etc"):
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
                tar.addfile(info)
        for tar_path, image in (
            (tmp / "runtime.tar", RUNTIME_IMAGE),
            (tmp / "busybox.tar", SANDBOX_IMAGE),
        ):
            subprocess.run(
                [*cli, "import", "-q", str(tar_path), image], check=True, capture_output=True
            )
        yield cli
    finally:
        # All of this storage's own (--root above), nothing of the host's podman.
        for command in (
            ["pod", "rm", "-f", "-a"],
            ["rmi", "-a", "-f"],
            ["volume", "prune", "-f"],
            ["secret", "rm", "-a"],
        ):
            subprocess.run([*cli, *command], capture_output=True, check=False)
        os.environ.pop("CONTAINERS_CONF", None)
        os.environ.pop("CONTAINERS_REGISTRIES_CONF", None)
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_generated_pod_runs_an_image_without_python(podman: list[str]) -> None:
    spec = SandboxSpec(
        "podman1", SANDBOX_IMAGE, get_instance_type("nano"), secret="podman-agent-secret"
    )
    settings = KubernetesSettings(runtime_image=RUNTIME_IMAGE, image_pull_policy="Never")
    pod = manifests.pod(spec, settings, [])
    pod["spec"]["restartPolicy"] = "Never"  # podman 4.3, see the module's docstring
    secret = manifests.secret(spec)
    secret["data"] = secret.pop("stringData")  # podman 4.3 does not base64-decode data
    workdir = Path(tempfile.mkdtemp(prefix="sl-k8s-play-"))
    try:
        (workdir / "secret.json").write_text(json.dumps(secret))
        (workdir / "pod.yaml").write_text(
            "\n---\n".join(json.dumps(d) for d in (manifests.volume_claim(spec, settings, []), pod))
        )
        subprocess.run(
            [*podman, "secret", "create", secret["metadata"]["name"], str(workdir / "secret.json")],
            check=True,
            capture_output=True,
        )
        play = subprocess.run(
            [*podman, "kube", "play", str(workdir / "pod.yaml")], capture_output=True, text=True
        )
        assert play.returncode == 0, play.stderr[-1000:]
        # Ask the agent from inside the Pod (its network namespace: no traffic leaves it),
        # with the runtime's own Python: the image has none.
        ask = (
            "import urllib.request as u\n"
            "r = u.Request('http://127.0.0.1:7070/run', data=b'{\"cmd\": \"echo hi; "
            "ls /usr/bin/python3 || echo no-python\"}', headers={'authorization': "
            "'Bearer podman-agent-secret', 'content-type': 'application/json'})\n"
            "print(u.urlopen(r, timeout=5).read().decode())\n"
        )
        container = f"{pod['metadata']['name']}-{manifests.SANDBOX_CONTAINER}"
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(
                [
                    *podman,
                    "exec",
                    container,
                    "/.sandlot/runtime/bin/sandlot-agent",
                    "-I",
                    "-S",
                    "-c",
                    ask,
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the agent is still starting
        assert out.returncode == 0, out.stderr[-1000:]
        result = json.loads(out.stdout)
        assert result["code"] == 0
        assert result["stdout"] == "hi\nno-python\n"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
