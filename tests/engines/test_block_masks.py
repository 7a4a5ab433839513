"""Which sysfs directories hide the host's disks (found on a fake sysfs tree)."""

from __future__ import annotations

from pathlib import Path

from sandlot.engines.local.oci_spec import host_block_device_dirs


def _device(sys_root: Path, relative: str, *, partition: bool = False) -> None:
    device = sys_root / "devices" / relative
    device.mkdir(parents=True)
    if partition:
        (device / "partition").write_text("1\n")
    link = sys_root / "class" / "block" / device.name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(device)


def test_disks_parents_are_masked_partitions_and_virtual_devices_are_not(tmp_path: Path) -> None:
    _device(tmp_path, "pci0000:00/0000:00:02.0/virtio1/block/vda")
    _device(tmp_path, "pci0000:00/0000:00:02.0/virtio1/block/vda/vda1", partition=True)
    _device(tmp_path, "pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1")
    _device(tmp_path, "pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p1", partition=True)
    _device(tmp_path, "virtual/block/loop0")
    assert host_block_device_dirs(tmp_path) == (
        "/sys/devices/pci0000:00/0000:00:02.0/virtio1/block",
        "/sys/devices/pci0000:00/0000:00:04.0/nvme/nvme0",
    )


def test_no_block_class(tmp_path: Path) -> None:
    assert host_block_device_dirs(tmp_path) == ()
