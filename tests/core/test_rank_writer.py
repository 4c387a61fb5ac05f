"""RankWriter with a single-rank group: the shards it writes hold exactly the planned tensors, read
back with safetensors' own reader against the model's own state dict; a producer's error is
returned (latched), not raised."""
from __future__ import annotations

import torch
from safetensors import safe_open

from sa2va_hooks.converters.base import resolve_converter
from sa2va_hooks.core.dist import RankGroup
from sa2va_hooks.core.observer import NO_OBSERVER
from sa2va_hooks.core.plan import plan_export
from sa2va_hooks.core.produce import SyncProducer, trained_fingerprints
from sa2va_hooks.core.rank_writer import RankWriter


def _tiny(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                        max_position_embeddings=32, tie_word_embeddings=False))


def _writer(model, max_shard_size="4KB"):
    plan = plan_export(model, resolve_converter("auto", model), None, max_shard_size).shards
    trained = trained_fingerprints(model, RankGroup(0, 1))
    return plan, RankWriter(plan, 0, 1, trained=trained, baseline=None, progress=False, collective=False)


def test_single_rank_writes_exactly_the_planned_tensors(tmp_path):
    model = _tiny(seed=51)
    plan, writer = _writer(model)
    assert len(plan.files) >= 2
    assert writer.write(tmp_path, SyncProducer(NO_OBSERVER, False), readback=True) is None
    want = model.state_dict()
    got, where = {}, {}
    for fname, entries in plan.files:
        with safe_open(str(tmp_path / fname), framework="pt") as f:
            assert sorted(f.keys()) == sorted(e.name for e in entries)
            for k in f.keys():
                got[k], where[k] = f.get_tensor(k), fname
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert {n: r.file for n, r in writer.tensors.items()} == where
    assert writer.storage()["bytes_written"] == sum((tmp_path / f).stat().st_size for f, _ in plan.files)


class _FailingProducer:
    """Produces the first file's tensors, then reports an error the way a producer does: in the latch."""

    def __init__(self):
        self.inner = SyncProducer(NO_OBSERVER, False)
        self.files = 0
        self.closed = False

    def produce(self, entries, own, latch):
        self.files += 1
        if self.files == 2:
            latch.set(RuntimeError("producer failed on the second file"))
            return
        yield from self.inner.produce(entries, own, latch)

    def finish(self, latch):
        pass

    def close(self):
        self.closed = True
        self.inner.close()


def test_producer_error_is_returned_not_raised(tmp_path):
    model = _tiny(seed=52)
    plan, writer = _writer(model)
    producer = _FailingProducer()
    error = writer.write(tmp_path, producer, readback=True)
    assert isinstance(error, RuntimeError) and "second file" in str(error)
    assert producer.closed
    second = plan.files[1][0]
    assert not any(r.file == second for r in writer.tensors.values())  # nothing recorded for the failed file
    later = [f for f, _ in plan.files[2:]]
    assert not any((tmp_path / f).exists() for f in later)  # after the failure nothing more is written
