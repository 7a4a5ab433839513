"""The host-wide uid slot registry (engines/local/uid_slots.py), on a registry of its own."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sandlot.engines.local.uid_slots import SlotRegistry


def _registry(tmp_path: Path, name: str) -> SlotRegistry:
    owner = tmp_path / name / "sandboxes"
    owner.mkdir(parents=True)
    return SlotRegistry(owner, root=tmp_path / "ids")


def _claim(reg: SlotRegistry, sandbox_id: str) -> int:
    return reg.allocate(sandbox_id, lambda slot: (Path(reg.owner) / sandbox_id).mkdir())


def test_owners_share_one_numbering_and_free_only_their_own(tmp_path: Path) -> None:
    a, b = _registry(tmp_path, "a"), _registry(tmp_path, "b")
    assert [_claim(a, "x"), _claim(b, "x"), _claim(a, "y")] == [0, 1, 2]
    b.release("y", 2)  # not b's: kept
    a.release("x", 1)  # slot 1 is b's x, not a's: kept
    assert a.owned() == {"x": 0, "y": 2} and b.owned() == {"x": 1}
    a.release("x", 0)
    assert _claim(b, "z") == 0  # lowest free


def test_a_failed_claim_frees_its_slot(tmp_path: Path) -> None:
    a = _registry(tmp_path, "a")

    def fail(slot: int) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        a.allocate("x", fail)
    assert a.owned() == {} and _claim(a, "y") == 0


def test_stale_entries_are_reclaimed(tmp_path: Path) -> None:
    a, b = _registry(tmp_path, "a"), _registry(tmp_path, "b")
    _claim(a, "gone")
    _claim(b, "alive")
    (Path(a.owner) / "gone").rmdir()  # a crashed between removing the sandbox and releasing
    (tmp_path / "ids" / "slots" / "7").write_text("")  # half-written by a crash
    assert b.reclaim_stale() == [0, 7]
    assert b.owned() == {"alive": 1}


def test_adopt_registers_old_sandboxes_and_keeps_conflicts(tmp_path: Path) -> None:
    a, b = _registry(tmp_path, "a"), _registry(tmp_path, "b")
    _claim(a, "first")
    b.adopt({"old": 0, "older": 3})  # 0 is a's: a conflict from before the registry
    assert b.owned() == {"older": 3} and a.owned() == {"first": 0}


def test_concurrent_allocations_never_share_a_slot(tmp_path: Path) -> None:
    regs = [_registry(tmp_path, f"r{i}") for i in range(4)]
    got: list[int] = []
    lock = threading.Lock()

    def work(reg: SlotRegistry) -> None:
        for n in range(25):
            slot = _claim(reg, f"s{n}")
            with lock:
                got.append(slot)

    threads = [threading.Thread(target=work, args=(r,)) for r in regs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(100))


def test_registry_dir_of_another_owner_is_refused(tmp_path: Path) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    root = tmp_path / "ids"
    root.mkdir()
    os.chown(root, 65534, 65534)
    from sandlot.engines.base import EngineError

    with pytest.raises(EngineError, match="owned by root"):
        SlotRegistry(tmp_path, root=root)
