"""Admission against this host's real totals: each resource refused by name when a claim does
not fit, and nothing held after a refusal or a finished create."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sandlot.engines.base import InsufficientResources
from sandlot.engines.local import hostlimits
from sandlot.engines.local.admission import Admission, Claim, Overcommit, claim_of
from sandlot.instance_types import INSTANCE_TYPES, get_instance_type

NOTHING = Claim(disk=0, memory=0, pids=0, files=0)


def test_claim_of_bounds_file_handles_by_memory_and_processes() -> None:
    nano = claim_of(get_instance_type("nano"), None)
    assert nano.files == 256 * 1024  # pids x RLIMIT_NOFILE
    xlarge = claim_of(get_instance_type("xlarge"), None)
    assert xlarge.files == 8192 * 1024**2 // hostlimits.FILE_KMEM_BYTES  # what memory can pin
    capped = claim_of(get_instance_type("micro"), 1000)  # our own hard limit caps RLIMIT_NOFILE
    assert capped.files == 512 * 1000
    for it in INSTANCE_TYPES.values():
        assert claim_of(it, None).disk == it.disk_mb * 1024 * 1024


@pytest.mark.parametrize(
    ("resource", "field"),
    [("memory", "memory"), ("pids", "pids"), ("file handles", "files")],
)
def test_none_refuses_promises_past_the_host(tmp_path: Path, resource: str, field: str) -> None:
    room = hostlimits.measure(tmp_path)
    total = {"memory": room.memory_total, "pids": room.pid_max, "files": room.file_max}[field]
    admission = Admission(tmp_path, Overcommit.NONE)
    others = [("other", replace(NOTHING, **{field: int(total * 0.85)}))]
    one = replace(NOTHING, **{field: int(total * 0.04)})
    admission.admit("a", "micro", one, others)  # 89 %: fits under the 10 % reserve
    admission.done("a")
    two = replace(NOTHING, **{field: int(total * 0.06)})
    with pytest.raises(InsufficientResources, match=f"not enough {resource}") as refused:
        admission.admit("b", "micro", two, others)
    assert refused.value.resource == resource
    assert "promised to other sandboxes" in str(refused.value)


def test_allow_refuses_what_is_not_free_now(tmp_path: Path) -> None:
    room = hostlimits.measure(tmp_path)
    admission = Admission(tmp_path)
    admission.admit("a", "micro", claim_of(get_instance_type("micro"), None), [])
    admission.done("a")
    too_many_pids = Claim(disk=0, memory=0, pids=room.pid_max, files=0)
    with pytest.raises(InsufficientResources, match="not enough pids") as refused:
        admission.admit("b", "huge", too_many_pids, [])
    assert refused.value.resource == "pids"
    # memory is overcommitted: not checked
    admission.admit("c", "huge", Claim(disk=0, memory=room.memory_total * 4, pids=1, files=1), [])
    admission.done("c")


def test_disk_counts_creates_in_flight(tmp_path: Path) -> None:
    room = hostlimits.measure(tmp_path)
    admission = Admission(tmp_path)
    half = Claim(disk=int(room.disk_free * 0.5), memory=0, pids=0, files=0)
    admission.admit("a", "big", half, [])  # its disk is not taken yet ...
    with pytest.raises(InsufficientResources, match="not enough disk") as refused:
        admission.admit("b", "big", half, [])  # ... so it still counts
    assert refused.value.resource == "disk"
    admission.done("a")
    admission.admit("b", "big", half, [])
    admission.done("b")


def test_reserve_must_be_a_fraction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fraction"):
        Admission(tmp_path, reserve=1.5)
