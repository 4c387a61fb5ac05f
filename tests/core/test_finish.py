"""finish: the read-back of a rank's own shards, the merge of every rank's records, and the file
records of a staged snapshot, each checked against an independent recomputation."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from conftest import smallest_qwen2
from sa2va_hooks import export_hf
from sa2va_hooks.core.finish import ExportVerificationError, _file_records, _merge_rank_parts, read_back
from sa2va_hooks.core.manifest import TrainingEffect


def _tiny(seed: int):
    return smallest_qwen2(seed)


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    out = tmp_path_factory.mktemp("finish") / "snap"
    manifest = export_hf(_tiny(seed=31), out, max_shard_size="4KB")
    return out, manifest


def test_read_back_passes_clean_and_catches_a_flipped_byte(snap, tmp_path):
    src, manifest = snap
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    shards = sorted(p.name for p in copy.glob("*.safetensors"))
    read_back(copy, shards, manifest.tensors)  # what was written is what the manifest recorded
    target = copy / shards[0]
    data = bytearray(target.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    name = next(k for k, e in header.items() if e["data_offsets"][0] == 0)  # the tensor the data starts with
    with safe_open(str(target), framework="pt") as f:
        before = f.get_tensor(name).clone()
    data[8 + n + 1] ^= 0x10
    target.write_bytes(bytes(data))
    with safe_open(str(target), framework="pt") as f:  # safetensors' own reader sees a different tensor
        assert not torch.equal(f.get_tensor(name), before)
    with pytest.raises(ExportVerificationError) as e:
        read_back(copy, shards, manifest.tensors)
    assert shards[0] in str(e.value) and name in str(e.value)
    read_back(copy, shards[1:], manifest.tensors)  # the other shards are untouched


class _Record:
    def __init__(self, d):
        self.d = d

    def to_json(self):
        return dict(self.d)


def test_merge_rank_parts_unions_records_and_sums_storage():
    e0, e1 = TrainingEffect(trained_tensors=1, frozen_tensors=2), TrainingEffect(trained_tensors=3, frozen_tensors=5)
    parts = [({"a": _Record({"file": "x"})}, e0, {"bytes_written": 10, "bytes_linked": 0, "linked_from": {}}),
             ({"b": _Record({"file": "y"})}, e1, {"bytes_written": 7, "bytes_linked": 4, "linked_from": {"y": "p"}})]
    tensors, effect, storage = _merge_rank_parts(parts, SimpleNamespace(entries={"a": 0, "b": 0}))
    assert tensors == {"a": {"file": "x"}, "b": {"file": "y"}}
    assert (effect.trained_tensors, effect.frozen_tensors) == (1 + 3, 2 + 5)
    assert storage == {"bytes_written": 17, "bytes_linked": 4, "linked_from": {"y": "p"}}


def test_merge_rank_parts_refuses_a_planned_tensor_no_rank_wrote():
    parts = [({"a": _Record({})}, TrainingEffect(), {"bytes_written": 0, "bytes_linked": 0, "linked_from": {}})]
    with pytest.raises(ExportVerificationError, match="written by no rank.*'lost'"):
        _merge_rank_parts(parts, SimpleNamespace(entries={"a": 0, "lost": 0}))


def test_file_records_recomputed_by_hand(snap):
    src, _ = snap
    records = _file_records(src)
    on_disk = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert sorted(records) == [r for r in on_disk if r != "export_manifest.json"]
    for rel, rec in records.items():
        data = (src / rel).read_bytes()
        assert rec["size"] == len(data)
        if rel.endswith(".safetensors"):
            (n,) = struct.unpack("<Q", data[:8])
            assert rec == {"size": len(data), "header_sha256": hashlib.sha256(data[:8 + n]).hexdigest()}
        else:
            assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
