"""Tiny Python packages made on the spot, for installing into sandboxes without any network.

A wheel and an sdist of a one-module project whose build backend ships inside the sdist
(``backend-path``, no build requirements): pip's and uv's isolated builds then need nothing
from an index. ``simple_index`` lays out a PEP 503 "simple" index of wheels for a static
file server.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

#: A PEP 517 backend that builds a pure-Python wheel with the standard library alone.
BACKEND = """
import base64, hashlib, os, tomllib, zipfile


def _project():
    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    return project["name"].replace("-", "_"), project["version"]


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name, version = _project()
    info = f"{name}-{version}.dist-info"
    files = {}
    for root, _, names in os.walk(name):
        for n in sorted(names):
            if n.endswith(".py"):
                with open(os.path.join(root, n), "rb") as f:
                    files[f"{root}/{n}"] = f.read()
    meta = f"Metadata-Version: 2.1\\nName: {name}\\nVersion: {version}\\n"
    files[f"{info}/METADATA"] = meta.encode()
    tags = "Wheel-Version: 1.0\\nGenerator: demo\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    files[f"{info}/WHEEL"] = tags.encode()
    lines = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = ("\\n".join([*lines, f"{info}/RECORD,,"]) + "\\n").encode()
    wheel = f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel
"""


def _project(root: Path, name: str, version: str) -> Path:
    """A project directory: ``name`` (a module printing nothing, with ``VALUE = name``)."""
    project = root / f"{name}-{version}"
    (project / name).mkdir(parents=True)
    (project / name / "__init__.py").write_text(f"VALUE = {name!r}\n")
    (project / "demo_backend.py").write_text(BACKEND)
    (project / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "{version}"\n\n'
        '[build-system]\nrequires = []\nbuild-backend = "demo_backend"\nbackend-path = ["."]\n'
    )
    (project / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return project


def wheel(out: Path, name: str, version: str = "0.1") -> Path:
    """Build ``name``'s wheel into ``out`` with the project's own backend, here on the host."""
    project = _project(out / ".src", name, version)
    built = subprocess.run(
        [sys.executable, "-c", f"import demo_backend as b; print(b.build_wheel({str(out)!r}))"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return out / built


def sdist(out: Path, name: str, version: str = "0.1") -> Path:
    project = _project(out / ".src", name, version)
    path = out / f"{name}-{version}.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(project, arcname=project.name)
    path.write_bytes(buf.getvalue())
    return path


def simple_index(root: Path, wheels: list[Path]) -> None:
    """``root/simple/<name>/index.html`` linking ``root/files/<wheel>#sha256=...`` (PEP 503)."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    projects: dict[str, list[str]] = {}
    for w in wheels:
        data = w.read_bytes()
        (root / "files" / w.name).write_bytes(data)
        project = w.name.split("-")[0].lower().replace("_", "-")
        digest = hashlib.sha256(data).hexdigest()
        projects.setdefault(project, []).append(
            f'<a href="/files/{w.name}#sha256={digest}">{w.name}</a>'
        )
    for project, links in projects.items():
        (root / "simple" / project).mkdir(parents=True, exist_ok=True)
        (root / "simple" / project / "index.html").write_text(
            "<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>\n"
        )
    index = "".join(f'<a href="/simple/{p}/">{p}</a>' for p in projects)
    page = f"<!DOCTYPE html><html><body>{index}</body></html>\n"
    (root / "simple" / "index.html").write_text(page)
