"""The default image does what users of Koyeb's, E2B's and Daytona's images try first: pip
install (as root and as another user, system-wide, ``--user`` and in a venv), uv, building a C
extension, Node.js and npm. Everything is installed offline, from packages this test makes and
uploads into a real sandbox (no index, no network)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from support import demo_packages
from support.local import IMAGES_DIR, SandboxHandle, create_sandbox, local_engine_unavailable

from sandlot.engines.local import LocalEngine
from sandlot.engines.local.mounts import mounts_under, unmount
from sandlot.images.store import ImageStore

pytestmark = [pytest.mark.anyio, pytest.mark.root]


def as_alice(script: str) -> str:
    """``script`` as a user other than root, in her home (E2B runs commands as "user")."""
    return f"runuser -u alice -- env HOME=/home/alice sh -c 'cd && {script}'"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = local_engine_unavailable()
    if reason:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("default-image")
    yield path
    for point in mounts_under(path):
        unmount(point)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("packages")
    made = [
        demo_packages.wheel(out, "sandlot_demo_wheel"),
        demo_packages.sdist(out, "sandlot_demo_sdist"),
    ]
    return {p.name: p.read_bytes() for p in made}


@pytest.fixture(scope="module")
async def sandbox(state: Path, packages: dict[str, bytes]) -> AsyncIterator[SandboxHandle]:
    """One sandbox of the default image for the module: the packages in /pkgs, a user alice."""
    engine = LocalEngine(state, images=ImageStore(IMAGES_DIR))
    try:
        handle = await create_sandbox(engine, "default", "small")
        handle.client.timeout = httpx.Timeout(300)  # pip builds in venvs: slow on a busy host
        try:
            for name, data in packages.items():
                r = await handle.client.put(
                    "/files",
                    params={"path": f"/pkgs/{name}", "create_parents": "true"},
                    content=data,
                )
                assert r.status_code == 200, r.text
            await handle.sh("useradd -m alice && chmod 755 /pkgs")
            yield handle
        finally:
            await handle.aclose()
    finally:
        for info in await engine.list():
            await engine.delete(info.id)
        await engine.close()


WHEEL = "/pkgs/sandlot_demo_wheel-0.1-py3-none-any.whl"
SDIST = "/pkgs/sandlot_demo_sdist-0.1.tar.gz"
IMPORT_BOTH = "import sandlot_demo_wheel as w, sandlot_demo_sdist as s; print(w.VALUE, s.VALUE)"
BOTH = "sandlot_demo_wheel sandlot_demo_sdist\n"


async def test_python_names_python3(sandbox: SandboxHandle) -> None:
    assert (await sandbox.sh("python --version")).startswith("Python 3.")


async def test_pip_install_as_root(sandbox: SandboxHandle) -> None:
    await sandbox.sh(f"pip install --no-index {WHEEL} {SDIST} 2>&1")
    assert await sandbox.sh(f"cd / && python3 -c '{IMPORT_BOTH}'") == BOTH
    await sandbox.sh("pip uninstall -y sandlot_demo_wheel sandlot_demo_sdist 2>&1")
    await sandbox.sh(f"pip install --user --no-index {WHEEL} {SDIST} 2>&1")
    assert await sandbox.sh(f"cd / && python3 -c '{IMPORT_BOTH}'") == BOTH
    await sandbox.sh("pip uninstall -y sandlot_demo_wheel sandlot_demo_sdist 2>&1")


async def test_pip_install_as_a_user(sandbox: SandboxHandle) -> None:
    # Without --user too: pip falls back to the user's site-packages by itself.
    await sandbox.sh(as_alice(f"pip install --no-index {WHEEL} 2>&1"))
    await sandbox.sh(as_alice(f"pip install --user --no-index {SDIST} 2>&1"))
    out = await sandbox.sh(as_alice(f'python3 -c "{IMPORT_BOTH}"'))
    assert out == BOTH
    assert "sandlot_demo" not in await sandbox.sh("cd / && python3 -m pip list 2>/dev/null")


@pytest.mark.parametrize("who", ["root", "alice"])
async def test_venv(sandbox: SandboxHandle, who: str) -> None:
    venv = f"/tmp/venv-{who}"
    script = (
        f"python3 -m venv {venv} && {venv}/bin/pip install --no-index {WHEEL} {SDIST} 2>&1"
        f' && {venv}/bin/python -c "{IMPORT_BOTH}"'
    )
    out = await sandbox.sh(as_alice(script) if who == "alice" else script)
    assert out.endswith(BOTH)


@pytest.mark.parametrize("who", ["root", "alice"])
async def test_uv(sandbox: SandboxHandle, who: str) -> None:
    venv = f"/tmp/uv-{who}"
    script = (
        f"uv --version && uv venv --offline --python /usr/bin/python3 {venv} 2>&1"
        f" && uv pip install --offline --no-index --python {venv}/bin/python {WHEEL} {SDIST} 2>&1"
        f' && {venv}/bin/python -c "{IMPORT_BOTH}"'
    )
    out = await sandbox.sh(as_alice(script) if who == "alice" else script)
    assert out.startswith("uv 0.13.8") and out.endswith(BOTH)


async def test_uv_installs_system_wide_as_root(sandbox: SandboxHandle) -> None:
    """No PEP 668 marker: uv's --system install is not refused either."""
    await sandbox.sh(f"uv pip install --offline --no-index --system {WHEEL} 2>&1")
    assert await sandbox.sh("cd / && python3 -c 'import sandlot_demo_wheel'") == ""
    await sandbox.sh("uv pip uninstall --system sandlot_demo_wheel 2>&1")


async def test_c_extension_builds(sandbox: SandboxHandle) -> None:
    """build-essential and python3-dev: what a wheel without binaries needs."""
    source = (
        "#include <Python.h>\n"
        "static PyObject *answer(PyObject *s, PyObject *a) { return PyLong_FromLong(42); }\n"
        'static PyMethodDef m[] = {{"answer", answer, METH_NOARGS, ""}, {0}};\n'
        'static struct PyModuleDef d = {PyModuleDef_HEAD_INIT, "demo_c", 0, -1, m};\n'
        "PyMODINIT_FUNC PyInit_demo_c(void) { return PyModule_Create(&d); }\n"
    )
    r = await sandbox.client.post(
        "/write_file", json={"path": "/tmp/c/demo_c.c", "content": source, "create_parents": True}
    )
    assert r.status_code == 200, r.text
    build = (
        "cd /tmp/c && gcc -shared -fPIC $(python3-config --includes) demo_c.c"
        " -o demo_c$(python3-config --extension-suffix) 2>&1"
        " && python3 -c 'import demo_c; print(demo_c.answer())'"
    )
    assert (await sandbox.sh(build)).endswith("42\n")


async def test_node_and_npm(sandbox: SandboxHandle) -> None:
    assert (await sandbox.sh("npm --version")).strip().split(".")[0].isdigit()
    assert await sandbox.sh("node -e 'console.log(6 * 7)'") == "42\n"
    # npm installs a local package offline, for root and for a user.
    files = {
        "dep/index.js": "module.exports = 7\n",
        "dep/package.json": '{"name": "dep", "version": "1.0.0"}\n',
        "main.js": 'console.log(require("dep") * 6)\n',
    }
    for who in ("root", "alice"):
        for name, content in files.items():
            path = f"/tmp/js-{who}/{name}"
            r = await sandbox.client.post(
                "/write_file", json={"path": path, "content": content, "create_parents": True}
            )
            assert r.status_code == 200, r.text
        script = f"cd /tmp/js-{who} && npm install --offline --no-audit --no-fund ./dep 2>&1"
        if who == "alice":
            await sandbox.sh("chown -R alice /tmp/js-alice")
            script = as_alice(script)
        await sandbox.sh(script)
        assert await sandbox.sh(f"node /tmp/js-{who}/main.js") == "42\n"
