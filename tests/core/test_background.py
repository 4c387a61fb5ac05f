"""start_export: the same snapshot as export_hf, of the moment of the capture, in the background;
frozen shards hard-linked from the previous snapshot."""
from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import peft_reference, tiny_qwen2, train_like
from sa2va_hooks import ExportManifest, ModelChangedError, SnapshotBuffers, export_hf, start_export, verify_snapshot
from sa2va_hooks.export import prepare_background_export, prepare_gathered_export


def _peft(targets="all-linear", saved=("embed_tokens", "lm_head"), vocab=96):
    pm = get_peft_model(tiny_qwen2(vocab=vocab), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                            modules_to_save=list(saved) or None))
    train_like(pm)
    return pm


def _lora_b(pm):
    return pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight


def test_background_export_equals_synchronous_export(tmp_path):
    pm = _peft()
    sync = export_hf(pm, tmp_path / "sync", dtype="bf16", max_shard_size="20KB")
    job = start_export(pm, tmp_path / "bg", dtype="bf16", max_shard_size="20KB")
    bg = job.result()
    assert bg.root_digest == sync.root_digest
    assert {n: t["digest"] for n, t in bg.tensors.items()} == {n: t["digest"] for n, t in sync.tensors.items()}
    assert bg.trained["root"] == sync.trained["root"]
    assert bg.provenance["background"] is True and sync.provenance["background"] is False
    assert verify_snapshot(tmp_path / "bg") == []
    # the files load, and hold PEFT's own merge
    want = peft_reference(pm, torch.bfloat16)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "bg", torch_dtype=torch.bfloat16).state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_snapshot_holds_the_captured_moment_not_a_later_step(tmp_path):
    """A training step between the capture and the background read does not reach the files."""
    pm = _peft()
    at_capture = export_hf(pm, tmp_path / "reference")
    job = prepare_background_export(pm, tmp_path / "bg")  # captured, not started
    with torch.no_grad():  # an optimizer step: trainable tensors (LoRA, saved copies) change in place
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.5)
    manifest = job.start().result()
    assert manifest.root_digest == at_capture.root_digest
    assert manifest.trained["root"] == at_capture.trained["root"]
    assert export_hf(pm, tmp_path / "after").root_digest != at_capture.root_digest  # the step did change them


def test_frozen_tensor_changed_during_background_export_is_refused(tmp_path):
    pm = _peft(targets=["q_proj", "v_proj"])
    job = prepare_background_export(pm, tmp_path / "bg")
    frozen = pm.base_model.model.model.layers[1].mlp.down_proj.weight
    assert not frozen.requires_grad
    with torch.no_grad():
        frozen.mul_(1.01)  # in place, as a buggy training step would
    with pytest.raises(ModelChangedError, match=r"modified in place.*layers\.1\.mlp\.down_proj\.weight"):
        job.start().result()
    assert sorted(os.listdir(tmp_path)) == []  # nothing published, no staging left


def test_capture_reuses_its_buffers():
    pm = _peft()
    buffers = SnapshotBuffers()
    allocated = buffers.prepare(pm)
    first = buffers.capture(pm)
    ptrs = {n: t.data_ptr() for n, t in first.by_name.items()}
    train_like(pm, seed=5)
    second = buffers.capture(pm)
    assert {n: t.data_ptr() for n, t in second.by_name.items()} == ptrs and buffers.nbytes == allocated
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert set(second.trainable) == trainable
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert torch.equal(second.by_name[n], p.detach()), n


def test_frozen_shards_are_linked_and_survive_deleting_the_older_snapshot(tmp_path):
    # LoRA on attention only: the MLPs, norms are frozen and land in shards of their own
    pm = _peft(targets=["q_proj", "v_proj"], saved=())
    first = export_hf(pm, tmp_path / "iter_1", dtype="bf16", max_shard_size="12KB")
    train_like(pm, seed=7)  # a later checkpoint: trained tensors changed, frozen ones did not
    second = export_hf(pm, tmp_path / "iter_2", dtype="bf16", max_shard_size="12KB", link_from=tmp_path / "iter_1")
    linked = second.storage["linked_from"]
    trained_files = {t["file"] for t in second.tensors.values() if t["role"] != "frozen"}
    frozen_files = {t["file"] for t in second.tensors.values()} - trained_files
    # the trained shards come last; every shard before them holds frozen tensors only
    assert max(frozen_files) < min(trained_files)
    assert set(linked) == frozen_files and len(frozen_files) >= 2
    assert second.storage["bytes_linked"] == sum((tmp_path / "iter_2" / f).stat().st_size for f in frozen_files)
    assert first.storage["bytes_linked"] == 0
    for f in frozen_files:
        assert os.stat(tmp_path / "iter_2" / f).st_ino == os.stat(tmp_path / "iter_1" / f).st_ino
    for f in trained_files:
        assert os.stat(tmp_path / "iter_2" / f).st_ino != os.stat(tmp_path / "iter_1" / f).st_ino
    assert second.root_digest != first.root_digest
    assert verify_snapshot(tmp_path / "iter_1") == [] and verify_snapshot(tmp_path / "iter_2") == []
    shutil.rmtree(tmp_path / "iter_1")
    assert verify_snapshot(tmp_path / "iter_2") == []
    ref = peft_reference(pm, torch.bfloat16)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "iter_2", torch_dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items())


def test_an_edit_to_a_linked_file_fails_verify_in_every_snapshot_sharing_it(tmp_path):
    pm = _peft(targets=["q_proj", "v_proj"], saved=())
    export_hf(pm, tmp_path / "a", max_shard_size="12KB")
    m = export_hf(pm, tmp_path / "b", max_shard_size="12KB", link_from=tmp_path / "a")
    shared = sorted(m.storage["linked_from"])[0]
    path = tmp_path / "b" / shared
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    with open(path, "r+b") as f:  # in place: both names are one file
        f.write(bytes(data))
    assert any(shared in p for p in verify_snapshot(tmp_path / "a"))
    assert any(shared in p for p in verify_snapshot(tmp_path / "b"))


def test_a_damaged_previous_shard_is_written_afresh_not_linked(tmp_path, caplog):
    pm = _peft(targets=["q_proj", "v_proj"], saved=())
    first = export_hf(pm, tmp_path / "a", max_shard_size="12KB")
    frozen_file = next(t["file"] for t in first.tensors.values() if t["role"] == "frozen")
    path = tmp_path / "a" / frozen_file
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="sa2va_hooks"):
        m = export_hf(pm, tmp_path / "b", max_shard_size="12KB", link_from=tmp_path / "a")
    assert frozen_file not in m.storage["linked_from"]
    assert "no longer holds what its manifest says" in caplog.text and frozen_file in caplog.text
    assert verify_snapshot(tmp_path / "b") == []
    assert os.stat(tmp_path / "b" / frozen_file).st_ino != os.stat(path).st_ino
    assert ExportManifest.load(tmp_path / "b").root_digest == first.root_digest


def test_gathered_in_front_written_behind_equals_synchronous_export(tmp_path):
    """The ZeRO-3 / FSDP path in one process: this thread stages every tensor (where the gathers
    would be) into a queue of a few KB, the job's thread writes them; same snapshot as export_hf."""
    from sa2va_hooks.core.dist import RankGroup
    from sa2va_hooks.export import prepare_gathered_export
    pm = _peft()
    sync = export_hf(pm, tmp_path / "sync", dtype="bf16", max_shard_size="20KB")
    job = prepare_gathered_export(pm, tmp_path / "bg", dtype="bf16", max_shard_size="20KB").start()
    job.task.gather_in_front(RankGroup(0, 1), budget=8 << 10)  # smaller than most tensors: the writer paces it
    with torch.no_grad():  # training resumes once the gathers are done: the snapshot must not see it
        for p in pm.parameters():
            p.add_(1.0)
    bg = job.result()
    assert bg.root_digest == sync.root_digest and bg.trained == sync.trained
    assert bg.provenance["background"] is True and bg.provenance["training_paused_s"] > 0
    assert verify_snapshot(tmp_path / "bg") == []


def test_gathered_export_failure_in_the_writer_publishes_nothing(tmp_path, monkeypatch):
    import errno

    import sa2va_hooks.core.rank_writer as ex
    from sa2va_hooks.core.dist import RankGroup
    pm = _peft()

    def full_disk(path, slots):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ex, "ShardWriter", full_disk)
    job = prepare_gathered_export(pm, tmp_path / "bg", max_shard_size="20KB").start()
    job.task.gather_in_front(RankGroup(0, 1), budget=8 << 10)
    with pytest.raises(OSError, match="No space left"):
        job.result()
    assert sorted(os.listdir(tmp_path)) == []


def test_frozen_tensor_changed_while_the_background_thread_writes_is_refused(tmp_path, monkeypatch):
    """The change lands in the middle of the background export (after every shard was written,
    before publishing), from another thread than the one exporting."""
    import threading

    import sa2va_hooks.core.finish as ex
    pm = _peft(targets=["q_proj", "v_proj"])
    frozen = pm.base_model.model.model.layers[0].mlp.up_proj.weight
    real = ex.write_index
    seen = []

    def write_then_train(*args, **kwargs):
        real(*args, **kwargs)
        seen.append(threading.current_thread().name)
        with torch.no_grad():
            frozen.add_(1e-3)

    monkeypatch.setattr(ex, "write_index", write_then_train)
    job = start_export(pm, tmp_path / "bg")
    with pytest.raises(ModelChangedError, match=r"layers\.0\.mlp\.up_proj\.weight"):
        job.result()
    assert seen and seen[0].startswith("sa2va_hooks-export") and seen[0] != threading.current_thread().name
    assert sorted(os.listdir(tmp_path)) == []


def test_a_writer_thread_that_died_never_blocks_the_gathers(tmp_path, monkeypatch):
    """If the export's thread ends before taking the staged tensors, the training thread's
    gathers still run to the end (every rank must enter them) and return."""
    import sa2va_hooks.core.background as ex
    from sa2va_hooks.core.dist import RankGroup
    pm = _peft()

    def broken_stream(model):
        raise RuntimeError("no CUDA stream for you")

    monkeypatch.setattr(ex, "_own_stream", broken_stream)
    job = prepare_gathered_export(pm, tmp_path / "bg", max_shard_size="20KB").start()
    job.wait()
    job.task.gather_in_front(RankGroup(0, 1), budget=1 << 10)  # would block forever on a full queue
    with pytest.raises(RuntimeError, match="no CUDA stream"):
        job.result()
    assert sorted(os.listdir(tmp_path)) == []  # its staging directory removed too


def test_a_job_started_after_another_runs_once_that_one_ended_even_if_it_failed(tmp_path):
    """``start(after=job)``: the queued export's thread waits for the running one (held by an
    observer until the test releases it, a state, not a delay), then runs, although that one
    failed. Its capture, in a second buffer set, is of its own moment: a step after it does not
    reach the files."""
    from sa2va_hooks.core.observer import ExportObserver

    class Held(ExportObserver):
        def __init__(self) -> None:
            self.entered, self.release = threading.Event(), threading.Event()

        def tensor_producing(self, entry) -> None:
            self.entered.set()
            assert self.release.wait(60), "the test never released the first export"
            raise OSError(28, "No space left on device")

    class Seen(ExportObserver):
        def __init__(self) -> None:
            self.names: list[str] = []

        def tensor_producing(self, entry) -> None:
            self.names.append(entry.name)

    pm = _peft()
    first_sets, second_sets = SnapshotBuffers(), SnapshotBuffers()
    held, seen = Held(), Seen()
    first = prepare_background_export(pm, tmp_path / "first", buffers=first_sets, observer=held).start()
    assert held.entered.wait(60)
    train_like(pm, seed=3)
    reference = export_hf(pm, tmp_path / "reference")
    second = prepare_background_export(pm, tmp_path / "second", buffers=second_sets, observer=seen)
    second.start(after=first)
    train_like(pm, seed=4)  # training goes on while both are in flight
    assert second.running and seen.names == [], "the queued export ran while the first was still running"
    held.release.set()
    assert second.wait(60) and first.wait(0)
    assert isinstance(first.error, OSError) and not (tmp_path / "first").exists()
    manifest = second.result()
    assert seen.names and second.queued_s > 0
    assert manifest.root_digest == reference.root_digest
    assert verify_snapshot(tmp_path / "second") == []
