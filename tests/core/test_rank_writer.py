"""RankWriter with a single-rank group: the shards it writes hold exactly the planned tensors, read
back with safetensors' own reader against the model's own state dict; a producer's error is
returned (latched), not raised. And two ranks (threads over a StoreGroup) writing a collective
export: its frozen shards are linked together, and a link that fails on its owner is written on
every rank in step."""
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

    repeatable = True

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


# -- hard links when producing is collective (ZeRO-3, FSDP) ----------------------------------------
# Two ranks as threads of this process, talking over a StoreGroup on one HashStore (as
# tests/core/test_dist.py does). The producer records every file it is asked for: under ZeRO-3 that
# call is where a rank enters the file's gathers, so the two ranks' records must be equal.

def _frozen_tiny(seed: int):
    model = _tiny(seed)
    for n, p in model.named_parameters():
        p.requires_grad_("mlp" in n)  # everything else frozen: several frozen-only shards at 4KB
    return model


class _CountingProducer:
    """A SyncProducer that records which file it produced, and for whom (own or not)."""

    def __init__(self, repeatable: bool = True):
        self.inner = SyncProducer(NO_OBSERVER, False)
        self.repeatable = repeatable
        self.calls: list[tuple[str, bool]] = []

    def produce(self, entries, own, latch):
        self.calls.append((entries[0].name, own))
        yield from self.inner.produce(entries, own, latch)

    def finish(self, latch):
        pass

    def close(self):
        self.inner.close()


def _two_ranks(model, staging, previous, *, repeatable: bool = True, previous_on=(0, 1)):
    """Both ranks' writers, run at once; returns [(writer, producer, error)] by rank."""
    import threading

    import torch.distributed as dist

    from sa2va_hooks.core.dist import StoreGroup
    plan = plan_export(model, resolve_converter("auto", model), None, "4KB").shards
    trained = trained_fingerprints(model, RankGroup(0, 1))
    store, out = dist.HashStore(), [None, None]

    def rank(r):
        writer = RankWriter(plan, r, 2, trained=trained, baseline=None, progress=False, collective=True,
                            previous=previous if r in previous_on else None,
                            group=StoreGroup(r, 2, 30.0, store=store))
        producer = _CountingProducer(repeatable)
        out[r] = (writer, producer, writer.write(staging, producer, readback=True))
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(o is not None for o in out), "a rank did not finish (out of step with the other?)"
    return plan, out


def _previous(model, tmp_path):
    from sa2va_hooks import export_hf
    from sa2va_hooks.core.publish import _Previous
    export_hf(model, tmp_path / "a", max_shard_size="4KB", group=RankGroup(0, 1))
    return _Previous.load(tmp_path / "a")


def _frozen_files(plan):
    return [f for f, entries in plan.files if all(e.frozen_only for e in entries)]


def test_collective_ranks_link_frozen_shards_together_and_enter_each_gather_once(tmp_path):
    model = _frozen_tiny(seed=53)
    previous = _previous(model, tmp_path)
    staging = tmp_path / "b"
    staging.mkdir()
    plan, out = _two_ranks(model, staging, previous)
    frozen = _frozen_files(plan)
    assert len(frozen) >= 2 and len(frozen) < len(plan.files)
    assert [e for _, _, e in out] == [None, None]
    (w0, p0, _), (w1, p1, _) = out
    assert {w0.owners[f] for f in frozen} == {0, 1}, "each rank owns a frozen file: both broadcast sources"
    order = [entries[0].name for _, entries in plan.files]
    assert [n for n, _ in p0.calls] == [n for n, _ in p1.calls] == order, "every file's gathers entered once"
    linked = {**w0.linked_from, **w1.linked_from}
    assert sorted(linked) == sorted(frozen)
    for f in frozen:
        assert (staging / f).stat().st_ino == (tmp_path / "a" / f).stat().st_ino
    assert w0.storage()["bytes_linked"] + w1.storage()["bytes_linked"] == sum(
        (staging / f).stat().st_size for f in frozen)


def test_a_link_that_fails_on_its_owner_is_written_on_every_rank_in_step(tmp_path):
    model = _frozen_tiny(seed=54)
    previous = _previous(model, tmp_path)
    plan = plan_export(model, resolve_converter("auto", model), None, "4KB").shards
    from sa2va_hooks.core.shards import assign_shards
    owners = assign_shards(plan, 2)
    victim = next(f for f in _frozen_files(plan) if owners[f] == 1)  # decided on rank 1, broadcast from it
    (tmp_path / "a" / victim).unlink()
    staging = tmp_path / "b"
    staging.mkdir()
    plan, out = _two_ranks(model, staging, previous)
    assert [e for _, _, e in out] == [None, None]
    (w0, p0, _), (w1, p1, _) = out
    first = next(entries[0].name for f, entries in plan.files if f == victim)
    assert [n for n, _ in p0.calls] == [n for n, _ in p1.calls], "both ranks entered the same gathers"
    assert [n for n, _ in p0.calls].count(first) == 2, "the failed link's file was produced again on rank 0 too"
    assert (first, True) in p1.calls and p1.calls.count((first, True)) == 2
    assert victim not in {**w0.linked_from, **w1.linked_from}
    assert set(_frozen_files(plan)) - {victim} == set(w0.linked_from) | set(w1.linked_from)
    with safe_open(str(staging / victim), framework="pt") as f:
        want = model.state_dict()
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), want[k]), k
    assert w1.tensors[first].file == victim and w1.storage()["bytes_written"] > 0


def test_a_rank_without_the_previous_snapshot_writes_its_frozen_shards_and_the_other_still_links(tmp_path):
    model = _frozen_tiny(seed=55)
    previous = _previous(model, tmp_path)
    staging = tmp_path / "b"
    staging.mkdir()
    plan, out = _two_ranks(model, staging, previous, previous_on=(0,))  # rank 1 could not load it
    assert [e for _, _, e in out] == [None, None]
    (w0, p0, _), (w1, p1, _) = out
    assert [n for n, _ in p0.calls] == [n for n, _ in p1.calls]
    mine = [f for f in _frozen_files(plan) if w0.owners[f] == 0]
    assert sorted(w0.linked_from) == sorted(mine) and w1.linked_from == {}
    assert all((staging / f).is_file() for f, _ in plan.files)


def test_a_producer_that_cannot_repeat_links_nothing_when_collective(tmp_path):
    model = _frozen_tiny(seed=56)
    previous = _previous(model, tmp_path)
    staging = tmp_path / "b"
    staging.mkdir()
    plan, out = _two_ranks(model, staging, previous, repeatable=False)
    assert [e for _, _, e in out] == [None, None]
    for writer, producer, _ in out:
        assert writer.linked_from == {} and len(producer.calls) == len(plan.files)
