"""Messages that say what happened, with the path and the numbers, for the faults users hit."""
from __future__ import annotations

import errno
from collections import namedtuple

import pytest
import torch

from conftest import tiny_qwen2
from sa2va_hooks import export_hf
from sa2va_hooks.core import writer
from sa2va_hooks.offline.checkpoint_io import NotACheckpointError, load_checkpoint


def test_free_space_margin_scales_with_the_export(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    size = sum(p.numel() * p.element_size() for p in tiny_qwen2().parameters())
    # a small disk that holds the export and its proportional margin: accepted (a fixed 16 MiB was refused)
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda d: Usage(2 << 20, 0, size + writer.free_space_margin(size)))
    export_hf(tiny_qwen2(), tmp_path / "ok")
    # one byte less: refused before anything is written, in MiB, naming the directory
    monkeypatch.setattr(writer.shutil, "disk_usage",
                        lambda d: Usage(2 << 20, 0, size + writer.free_space_margin(size) - 1))
    with pytest.raises(OSError, match=rf"not enough free space in {tmp_path}: the export needs [0-9.]+ MiB") as e:
        export_hf(tiny_qwen2(), tmp_path / "refused")
    assert e.value.errno == errno.ENOSPC and "GiB" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]
    assert writer.free_space_margin(10 << 30) > 100 * writer.free_space_margin(0)


def test_a_write_error_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        real = f.write

        def no_space(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write = no_space
        with pytest.raises(OSError) as e:
            writer._write_bytes(f, b"abc")
        f.write = real
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content,words", [
    (b"", "is empty (0 bytes)"),
    (bytes(range(7, 200)), "is not a torch checkpoint (it starts with bytes 07 08"),
])
def test_a_file_that_is_no_checkpoint_is_called_so(tmp_path, content, words):
    bad = tmp_path / "iter_3.pth"
    bad.write_bytes(content)
    with pytest.raises(NotACheckpointError, match=r".*".join(map(lambda w: __import__("re").escape(w),
                                                                 [str(bad), words]))):
        load_checkpoint(bad)


def test_a_real_checkpoint_still_loads(tmp_path):
    good = tmp_path / "iter_1.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": {}}, good)
    assert torch.equal(load_checkpoint(good)["state_dict"]["w"], torch.ones(2))
