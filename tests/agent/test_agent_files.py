"""File routes: binary safety, atomic writes, parents, details, stat, raw upload/download."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


@pytest.fixture
def d(tmp_path: Path) -> Path:
    p = tmp_path / "data"
    p.mkdir()
    return p


BINARY = bytes(range(256)) * 4


def test_base64_write_and_read(client: httpx.Client, d: Path) -> None:
    path = str(d / "bin")
    b64 = base64.b64encode(BINARY).decode()
    r = client.post("/write_file", json={"path": path, "content": b64, "encoding": "base64"})
    assert r.json() == {"success": True}
    assert Path(path).read_bytes() == BINARY
    r = client.post("/read_file", json={"path": path, "encoding": "base64"}).json()
    assert r == {"content": b64, "encoding": "base64"}


def test_read_non_utf8_without_encoding_is_marked_lossy(client: httpx.Client, d: Path) -> None:
    (d / "b").write_bytes(b"a\xffb")
    r = client.post("/read_file", json={"path": str(d / "b")}).json()
    assert r["content"] == "a\ufffdb" and r["lossy"] is True


def test_create_parents(client: httpx.Client, d: Path) -> None:
    path = d / "x" / "y" / "z.txt"
    r = client.post(
        "/write_file", json={"path": str(path), "content": "hi", "create_parents": True}
    )
    assert r.json() == {"success": True}
    assert path.read_text() == "hi"


def test_write_keeps_mode_of_replaced_file_and_sets_mode(client: httpx.Client, d: Path) -> None:
    p = d / "script.sh"
    p.write_text("old")
    p.chmod(0o755)
    client.post("/write_file", json={"path": str(p), "content": "new"})
    assert p.read_text() == "new" and stat.S_IMODE(p.stat().st_mode) == 0o755
    client.post("/write_file", json={"path": str(d / "m"), "content": "", "mode": "0600"})
    assert stat.S_IMODE((d / "m").stat().st_mode) == 0o600


def test_write_is_atomic_no_temp_left(client: httpx.Client, d: Path) -> None:
    for i in range(5):
        client.post("/write_file", json={"path": str(d / "f"), "content": str(i) * 1000})
    assert sorted(os.listdir(d)) == ["f"]
    r = client.post("/write_file", json={"path": str(d / "nodir" / "f"), "content": "x"})
    assert r.status_code == 404
    assert sorted(os.listdir(d)) == ["f"]


def test_write_through_symlink_replaces_target(client: httpx.Client, d: Path) -> None:
    (d / "real").write_text("old")
    (d / "link").symlink_to(d / "real")
    client.post("/write_file", json={"path": str(d / "link"), "content": "new"})
    assert (d / "link").is_symlink() and (d / "real").read_text() == "new"


def test_list_dir_details(client: httpx.Client, d: Path) -> None:
    (d / "f").write_bytes(b"12345")
    (d / "sub").mkdir()
    (d / "ln").symlink_to("f")
    r = client.post("/list_dir", json={"path": str(d), "details": True}).json()
    assert r["entries"] == ["f", "ln", "sub"]
    rows = {row["name"]: row for row in r["details"]}
    assert rows["f"]["type"] == "file" and rows["f"]["size"] == 5
    assert rows["f"]["mode"] == "0644" or len(rows["f"]["mode"]) == 4
    assert rows["sub"]["type"] == "directory"
    assert rows["ln"]["type"] == "symlink" and rows["ln"]["target"] == "f"
    assert isinstance(rows["f"]["mtime"], float)
    # without details: Koyeb's shape only
    assert client.post("/list_dir", json={"path": str(d)}).json() == {"entries": ["f", "ln", "sub"]}


def test_stat(client: httpx.Client, d: Path) -> None:
    (d / "f").write_text("abc")
    r = client.post("/stat", json={"path": str(d / "f")}).json()
    assert r["exists"] is True and r["type"] == "file" and r["size"] == 3
    assert client.post("/stat", json={"path": str(d)}).json()["type"] == "directory"
    assert client.post("/stat", json={"path": str(d / "none")}).json() == {
        "path": str(d / "none"),
        "exists": False,
    }
    (d / "ln").symlink_to("f")
    assert client.post("/stat", json={"path": str(d / "ln")}).json()["type"] == "file"
    r = client.post("/stat", json={"path": str(d / "ln"), "follow_symlinks": False}).json()
    assert r["type"] == "symlink" and r["target"] == "f"


def test_raw_upload_and_download_stream(client: httpx.Client, d: Path) -> None:
    size = 8 * 1024 * 1024 + 123
    block = os.urandom(1 << 20)

    def gen() -> Iterator[bytes]:  # chunked upload, never one big buffer
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            sent += len(piece)
            yield piece

    expected = hashlib.sha256(b"".join(gen())).hexdigest()
    path = d / "big" / "blob"
    r = client.put("/files", params={"path": str(path), "create_parents": "true"}, content=gen())
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "path": str(path), "size": size}
    h = hashlib.sha256()
    with client.stream("GET", "/files", params={"path": str(path)}) as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == str(size)
        for chunk in r.iter_bytes():
            h.update(chunk)
    assert h.hexdigest() == expected
    # with Content-Length
    r = client.put("/files", params={"path": str(d / "small")}, content=b"\x00\xff")
    assert r.status_code == 200 and (d / "small").read_bytes() == b"\x00\xff"
    # keep-alive still works after streamed bodies
    assert client.get("/files", params={"path": str(d / "small")}).content == b"\x00\xff"


def test_download_errors(client: httpx.Client, d: Path) -> None:
    r = client.get("/files", params={"path": str(d / "missing")})
    assert r.status_code == 404 and "No such file" in r.json()["error"]
    r = client.get("/files", params={"path": str(d)})
    assert r.status_code == 400 and "Is a directory" in r.json()["error"]
    assert client.get("/files").status_code == 400


def test_file_errors_are_4xx_with_koyeb_shape(client: httpx.Client, d: Path) -> None:
    cases = [
        ("/read_file", {"path": str(d / "missing")}, 404),
        ("/read_file", {"path": str(d)}, 400),
        ("/delete_file", {"path": str(d / "missing")}, 404),
        ("/delete_file", {"path": str(d)}, 400),
        ("/delete_dir", {"path": str(d / "missing")}, 404),
        ("/list_dir", {"path": str(d / "missing")}, 404),
        ("/write_file", {"path": str(d), "content": "x"}, 400),
    ]
    (d / "file").write_text("x")
    cases += [
        ("/make_dir", {"path": str(d / "file")}, 409),
        ("/delete_dir", {"path": str(d / "file")}, 400),
        ("/list_dir", {"path": str(d / "file")}, 400),
        ("/make_dir", {"path": str(d / "file" / "sub")}, 400),
    ]
    for route, body, status in cases:
        r = client.post(route, json=body)
        assert r.status_code == status, (route, body, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"]
        if route not in ("/read_file", "/list_dir"):
            assert r.json()["success"] is False


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses file permissions")
def test_permission_denied_is_403(client: httpx.Client, d: Path) -> None:
    (d / "ro").mkdir(mode=0o500)
    r = client.post("/write_file", json={"path": str(d / "ro" / "f"), "content": "x"})
    assert r.status_code == 403


def test_download_ranges(client: httpx.Client, d: Path) -> None:
    data = bytes(range(256)) * 40
    (d / "f").write_bytes(data)
    url = "/files"
    params = {"path": str(d / "f")}
    r = client.get(url, params=params)
    assert r.status_code == 200 and r.headers["accept-ranges"] == "bytes" and r.content == data
    for header, first, expected in [
        ("bytes=0-9", 0, data[:10]),
        ("bytes=100-", 100, data[100:]),
        ("bytes=-5", len(data) - 5, data[-5:]),
        ("bytes=10000-99999", 10000, data[10000:]),
    ]:
        r = client.get(url, params=params, headers={"Range": header})
        assert r.status_code == 206, header
        assert r.content == expected
        assert r.headers["content-range"] == (
            f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
        )
    for bad in ["bytes=20000-", "bytes=5-2", "bytes=x-y", "bytes=-"]:
        assert client.get(url, params=params, headers={"Range": bad}).status_code == 416, bad
    # several ranges: the whole file
    r = client.get(url, params=params, headers={"Range": "bytes=0-1,5-6"})
    assert r.status_code == 200 and r.content == data


def test_download_procfs_file_with_zero_size(client: httpx.Client) -> None:
    r = client.get("/files", params={"path": "/proc/self/status"})
    assert r.status_code == 200 and b"Pid:" in r.content
    assert client.get("/files", params={"path": "/dev/null"}).status_code == 400


@pytest.mark.parametrize("route", ["/write_file", "/files"])
def test_write_without_parent_names_the_missing_directory(
    client: httpx.Client, d: Path, route: str
) -> None:
    """Like Koyeb's executor the write fails (404, "No such file", which its SDK classifies),
    and the message says which directory is missing and how to make it."""
    path = d / "a" / "b" / "f"
    if route == "/write_file":
        r = client.post(route, json={"path": str(path), "content": "x"})
    else:
        r = client.put(route, params={"path": str(path)}, content=b"x")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error.startswith(f"No such file or directory: {path}")
    assert f"{d / 'a'} does not exist" in error
    assert "make_dir" in error and "create_parents" in error
    assert r.json()["success"] is False
    assert sorted(os.listdir(d)) == []
