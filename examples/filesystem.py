"""Files in a sandbox: write, read (binary-safe), list, rename, upload and download."""

import tempfile
from pathlib import Path

from sandlot import Sandbox


def main() -> None:
    with Sandbox.create() as sandbox:
        fs = sandbox.filesystem
        fs.mkdir("/work/project", recursive=True)
        fs.write_files(
            [
                {"path": "/work/project/main.py", "content": "print('hi from main.py')\n"},
                {"path": "/work/project/data.bin", "content": bytes(range(256))},
            ]
        )
        print(fs.list_dir("/work/project"))
        print(sandbox.exec("python3 main.py", cwd="/work/project").stdout, end="")
        assert fs.read_bytes("/work/project/data.bin") == bytes(range(256))
        fs.rename_file("/work/project/main.py", "/work/project/app.py")
        print("exists:", fs.exists("/work/project/app.py"), fs.is_dir("/work/project"))
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "copy.bin"
            fs.download_file(local, "/work/project/data.bin")
            print("downloaded", local.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
