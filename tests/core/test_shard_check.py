"""shard_check: a safetensors header read without loading a tensor, checked against files written by
safetensors' own ``save_file`` and read back with its own ``safe_open``; damaged files are named."""
from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sa2va_hooks.core.shard_check import hash_safetensors_file, read_safetensors_header, tensor_header_problems

NO_MANIFEST = SimpleNamespace(tensors={})  # only the header's own consistency is checked


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 5, generator=g), "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
            "c.ids": torch.randint(0, 100, (2, 2), generator=g)}


def test_header_matches_what_safetensors_wrote(tmp_path):
    path = tmp_path / "m.safetensors"
    ts = _tensors()
    save_file(ts, str(path), metadata={"format": "pt"})
    raw, header = read_safetensors_header(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert raw == data[:8 + n]
    assert json.loads(data[8:8 + n]) == header
    assert header.pop("__metadata__") == {"format": "pt"}
    assert set(header) == set(ts)
    with safe_open(str(path), framework="pt") as f:
        for name in ts:
            assert header[name]["shape"] == list(f.get_tensor(name).shape)
    assert {header[k]["dtype"] for k in ts} == {"F32", "BF16", "I64"}
    assert tensor_header_problems("m.safetensors", header, NO_MANIFEST, len(data) - len(raw)) == []


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8 + n // 2])
    with pytest.raises(ValueError, match="does not fit"):
        read_safetensors_header(path)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="shorter than the 8-byte"):
        read_safetensors_header(path)


def test_truncated_data_and_wrong_offsets_are_named(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path))
    raw, header = read_safetensors_header(path)
    header.pop("__metadata__", None)
    data_size = path.stat().st_size - len(raw)
    short = tensor_header_problems("m.safetensors", header, NO_MANIFEST, data_size - 4)
    assert any("m.safetensors" in p and "tensors end at byte" in p for p in short), short
    bad = json.loads(json.dumps(header))
    start, end = bad["a.weight"]["data_offsets"]
    bad["a.weight"]["data_offsets"] = [start, end - 4]
    problems = tensor_header_problems("m.safetensors", bad, NO_MANIFEST, data_size)
    assert any("a.weight" in p and "m.safetensors" in p and "do not hold" in p for p in problems), problems


def test_hash_reads_tensors_from_disk(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path))
    before = hash_safetensors_file(path)
    assert set(before) == set(_tensors())
    other = _tensors()
    other["a.weight"][1, 2] += 1.0
    save_file(other, str(path))
    after = hash_safetensors_file(path)
    assert [n for n in before if before[n] != after[n]] == ["a.weight"]
