"""A real ENOSPC, on a tmpfs the test mounts itself (root only): the disk fills during an export, in a
plain export_hf and in a training loop. Nothing appears under the final name, the staging directory
is removed, the earlier snapshot still verifies, and training goes on."""
from __future__ import annotations

import errno
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import tiny_qwen2
from sa2va_hooks import export_hf, verify_snapshot
from sa2va_hooks.core import writer
from sa2va_demo.runs import train_tiny


def _mount_tmpfs(where: Path, size_bytes: int) -> None:
    where.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A factory: mount_small_disk(bytes) -> its path; unmounted at the end."""
    mounted: list[Path] = []

    def mount(size_bytes: int) -> Path:
        where = tmp_path / f"disk_{uuid.uuid4().hex[:6]}"
        _mount_tmpfs(where, size_bytes)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _snapshot_bytes(path: Path) -> int:
    """What the snapshot takes on a tmpfs: whole pages per file."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in path.iterdir())


def _disk_filled_after_the_check(monkeypatch) -> None:
    """The free-space check passes, as it does when another writer fills the disk after it."""
    import sa2va_hooks.core.publish as ex
    for module in (writer, ex):
        monkeypatch.setattr(module, "check_free_space", lambda *a, **k: None)


def test_disk_full_mid_export_leaves_nothing_and_keeps_the_earlier_snapshot(small_disk, tmp_path, monkeypatch):
    export_hf(tiny_qwen2(seed=1), tmp_path / "probe")
    size = _snapshot_bytes(tmp_path / "probe")
    disk = small_disk(4 << 20)
    export_hf(tiny_qwen2(seed=1), disk / "iter_1")
    # another writer fills the disk until half a snapshot is left
    (disk / "other_files").write_bytes(b"\0" * (shutil.disk_usage(disk).free - size // 2))
    free_before = shutil.disk_usage(disk).free

    # first, the check itself refuses, on the real filesystem, before writing a byte
    with pytest.raises(OSError, match=rf"not enough free space in {disk}: the export needs [0-9.]+ MiB"):
        export_hf(tiny_qwen2(seed=2), disk / "iter_2")
    # then, the disk fills during the write: a real ENOSPC from the kernel, naming the file
    _disk_filled_after_the_check(monkeypatch)
    with pytest.raises(OSError) as e:
        export_hf(tiny_qwen2(seed=2), disk / "iter_2")
    assert e.value.errno == errno.ENOSPC and str(disk) in str(e.value.filename or e.value)
    assert sorted(p.name for p in disk.iterdir()) == ["iter_1", "other_files"]
    assert verify_snapshot(disk / "iter_1") == []
    assert shutil.disk_usage(disk).free == free_before


def test_disk_full_during_training_export_fails_loudly_and_training_goes_on(small_disk, tiny_base, tmp_path,
                                                                            monkeypatch):
    probe = train_tiny(tmp_path / "probe", tiny_base, max_iters=1, save_interval=1,
                       hooks=[dict(type="HFExportHook", dtype="bf16", background=False)])
    assert probe.iter == 1
    size = _snapshot_bytes(tmp_path / "probe" / "hf" / "iter_1")
    disk = small_disk(size * 3 // 2 // 4096 * 4096)
    _disk_filled_after_the_check(monkeypatch)
    runner = train_tiny(tmp_path / "work", tiny_base, max_iters=6, save_interval=3,
                        hooks=[dict(type="HFExportHook", out_dir=str(disk), dtype="bf16")])
    assert runner.iter == 6  # training went on
    log = "\n".join(p.read_text() for p in (tmp_path / "work").glob("*/*.log"))
    failed = [line for line in log.splitlines() if "HF export of iteration 6" in line and "FAILED" in line]
    assert len(failed) == 1 and "No space left on device" in failed[0]
    assert f"{disk}/iter_6.incomplete-" in failed[0].split("Cause:")[1]  # the file (or directory) it happened on
    assert sorted(p.name for p in disk.iterdir()) == ["iter_3"]
    assert verify_snapshot(disk / "iter_3") == []
