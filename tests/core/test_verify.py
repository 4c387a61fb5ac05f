"""verify_snapshot on a fresh export of a tiny random Qwen2: clean, then one change at a time, each
reported naming the file it concerns."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

from conftest import smallest_qwen2
from sa2va_hooks import export_hf
from sa2va_hooks.core.shard_check import read_safetensors_header
from sa2va_hooks.core.verify import SnapshotInputError, verify_snapshot


def _tiny(seed: int):
    return smallest_qwen2(seed)


@pytest.fixture(scope="module")
def snapshot_factory(tmp_path_factory):
    src = tmp_path_factory.mktemp("verify_src") / "snap"
    export_hf(_tiny(seed=21), src, max_shard_size="4KB")
    n = [0]

    def fresh(tmp_path):
        n[0] += 1
        dst = tmp_path / f"copy{n[0]}"
        shutil.copytree(src, dst)
        return dst
    return fresh


def _shards(d):
    return sorted(d.glob("*.safetensors"))


def test_fresh_export_verifies_clean(snapshot_factory, tmp_path):
    snap = snapshot_factory(tmp_path)
    assert len(_shards(snap)) >= 2  # the index and several shards are checked too
    assert verify_snapshot(snap) == []


def test_one_changed_data_byte_names_the_tensor_and_file(snapshot_factory, tmp_path):
    snap = snapshot_factory(tmp_path)
    shard = _shards(snap)[0]
    raw, header = read_safetensors_header(shard)
    header.pop("__metadata__", None)
    name, entry = max(header.items(), key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    data = bytearray(shard.read_bytes())
    data[len(raw) + entry["data_offsets"][0] + 1] ^= 0x40  # a byte inside that tensor, size unchanged
    shard.write_bytes(bytes(data))
    with safe_open(str(shard), framework="pt") as f:  # safetensors' own reader sees the change
        assert f.get_tensor(name).numel() > 0
    problems = verify_snapshot(snap)
    assert problems and all(shard.name in p for p in problems), problems
    assert any(name in p for p in problems), problems
    # header-only verification does not read the data, and the file records hold only the header's digest
    assert verify_snapshot(snap, data=False) == []


def test_missing_shard_is_named(snapshot_factory, tmp_path):
    snap = snapshot_factory(tmp_path)
    gone = _shards(snap)[-1]
    gone.unlink()
    problems = verify_snapshot(snap)
    assert f"missing file {gone.name}" in problems, problems


def test_extra_file_is_named(snapshot_factory, tmp_path):
    snap = snapshot_factory(tmp_path)
    (snap / "notes.txt").write_text("not exported")
    assert verify_snapshot(snap) == ["extra file notes.txt"]


def test_changed_config_is_named_and_no_manifest_is_bad_input(snapshot_factory, tmp_path):
    snap = snapshot_factory(tmp_path)
    cfg = json.loads((snap / "config.json").read_text())
    cfg["vocab_size"] = 33
    (snap / "config.json").write_text(json.dumps(cfg))
    problems = verify_snapshot(snap)
    assert any(p.startswith("mismatch size of config.json") for p in problems), problems
    assert any("vocab_size" in p for p in problems), problems
    (snap / "export_manifest.json").unlink()
    with pytest.raises(SnapshotInputError):
        verify_snapshot(snap)
