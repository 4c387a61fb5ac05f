"""``core/entry.py``: one tensor's three forms (planned, produced, recorded).

- ``TensorEntry.plan``: the file dtype, shape and bytes are decided from the source and the export
  dtype, once; integer tensors keep their dtype.
- ``ProducedTensor.of``: the final role is the planned one unless the merge refined it.
- ``TensorRecord.to_json``: the manifest's entry, keys in the order manifests always had (the old
  record was a ``Fingerprint``'s JSON without the name, then file, role and sources).
- ``plan_export``: the entries and the shard plan hold the very same objects, each knowing its file.
"""
from __future__ import annotations

import torch
from torch import nn

from sa2va_hooks.core.entry import ProducedTensor, TensorEntry, TensorRecord, nbytes_of
from sa2va_hooks.core.plan import plan_export
from sa2va_hooks.core.fingerprint import Fingerprint
from sa2va_hooks.core.merge import ROLE_FROZEN, ROLE_LORA, ROLE_TRAINABLE, MergedTensor, SourceTensor


def _source(dtype: torch.dtype = torch.float32, role: str = ROLE_FROZEN, static: bool = True) -> SourceTensor:
    def produce(d: torch.dtype) -> MergedTensor:
        return MergedTensor(torch.ones(2, 3, dtype=d))

    return SourceTensor("w", (2, 3), dtype, role, ("base.w",), produce, static=static)


def test_entry_plan_decides_file_dtype_and_bytes() -> None:
    e = TensorEntry.plan("model.w", _source(), torch.bfloat16)
    assert (e.name, e.shape, e.dtype, e.nbytes, e.role, e.frozen_only, e.file) == \
        ("model.w", (2, 3), torch.bfloat16, 12, ROLE_FROZEN, True, "")
    assert e.sources == ("base.w",)
    assert e.materialize().tensor.dtype is torch.bfloat16
    ints = TensorEntry.plan("ids", _source(torch.int64), torch.bfloat16)
    assert (ints.dtype, ints.nbytes) == (torch.int64, 48)
    assert e.in_file("a.safetensors").file == "a.safetensors" and e.file == ""


def test_entry_equality_is_identity() -> None:
    a = TensorEntry.plan("w", _source(), None)
    assert a == a and a != TensorEntry.plan("w", _source(), None)


def test_nbytes_of_scalar_and_empty() -> None:
    assert nbytes_of((), torch.float16) == 2 and nbytes_of((0, 4), torch.float32) == 0


def test_produced_role_refined_by_merge_only() -> None:
    e = TensorEntry.plan("b", _source(), None)
    host = torch.zeros(2, 3)
    assert ProducedTensor.of(e, MergedTensor(host), host, 0.0, 0.0).role == ROLE_FROZEN
    changed = ProducedTensor.of(e, MergedTensor(host, ROLE_LORA, 0.5, True), host, 0.0, 0.0)
    assert (changed.role, changed.delta_rel_norm, changed.differs_from_base) == (ROLE_LORA, 0.5, True)


def test_record_json_is_the_old_dict() -> None:
    e = TensorEntry.plan("w", _source(role=ROLE_TRAINABLE, static=False), torch.float16).in_file("m.safetensors")
    host = torch.zeros(2, 3, dtype=torch.float16)
    rec = ProducedTensor.of(e, MergedTensor(host), host, 1.5, -2.0).record("abc")
    fp = Fingerprint(name="w", dtype="float16", shape=(2, 3), digest="abc", norm=1.5, sum=-2.0)
    old = {**{k: v for k, v in fp.to_json().items() if k != "name"},
           "file": "m.safetensors", "role": ROLE_TRAINABLE, "sources": ["base.w"]}
    assert list(rec.to_json().items()) == list(old.items())
    assert isinstance(rec, TensorRecord) and rec.name == "w"


class _Identity:
    name, template_table, required_tokens = "identity", None, ()

    def hf_root(self, model: nn.Module) -> nn.Module:
        return model

    def map_keys(self, keys):
        return {k: k for k in keys}

    def writes_tied(self, hf_name: str) -> bool:
        return False


def test_plan_export_entries_are_the_shards_objects() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    ep = plan_export(model, _Identity(), torch.bfloat16, 40)
    assert list(ep.entries) == ["0.weight", "0.bias", "1.weight", "1.bias"]  # export order
    in_shards = [e for _, es in ep.shards.files for e in es]
    assert sorted(map(id, in_shards)) == sorted(map(id, ep.entries.values()))
    for fname, es in ep.shards.files:
        assert all(e.file == fname for e in es)
    assert [e.frozen_only for e in in_shards] == [True, True, False, False]  # frozen shards first
    assert ep.shards.total_size == sum(e.nbytes for e in in_shards) == (16 + 4 + 8 + 2) * 2
