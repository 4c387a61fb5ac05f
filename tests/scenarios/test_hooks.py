"""FingerprintHook and HFExportHook in real mmengine Runner trainings of the tiny Sa2VA model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sa2va_hooks.core.fingerprint import FingerprintSet, fingerprint_state
from sa2va_hooks.core.manifest import ExportManifest
from sa2va_demo.runs import train_tiny
from sa2va_demo.tiny_sa2va import TinySa2VA


def _log_text(work: Path) -> str:
    return "\n".join(p.read_text() for p in work.glob("*/*.log"))


def _trained_fps(model) -> FingerprintSet:
    return FingerprintSet.of(fingerprint_state((n, p) for n, p in model.named_parameters() if p.requires_grad))


def test_checkpoint_meta_and_sidecar_match_the_reloaded_model(trained_run, tiny_base):
    _, work = trained_run
    for it in (3, 6):
        ckpt = torch.load(work / f"iter_{it}.pth", map_location="cpu", weights_only=False)
        recorded = FingerprintSet.from_json(ckpt["meta"]["sa2va_hooks"]["trained"])
        sidecar = json.loads((work / f"iter_{it}.pth.fingerprints.json").read_text())
        assert sidecar["trained"]["root"] == recorded.root
        model = TinySa2VA(base_dir=str(tiny_base))
        result = model.load_state_dict(ckpt["state_dict"], strict=False)
        assert result.unexpected_keys == []
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable.isdisjoint(result.missing_keys)
        assert _trained_fps(model).tensors == recorded.tensors
        assert ExportManifest.load(work / "hf" / f"iter_{it}").trained["root"] == recorded.root
    log = _log_text(work)
    assert "checkpoint at iter 3: 38 trainable tensors" in log and "38 changed since the last checkpoint" in log


def test_different_seeds_give_different_digests_same_frozen_tensors(trained_run, tiny_base, tmp_path):
    _, work0 = trained_run
    train_tiny(tmp_path, tiny_base, seed=1, data_seed=1)
    a, b = ExportManifest.load(work0 / "hf" / "iter_6"), ExportManifest.load(tmp_path / "hf" / "iter_6")
    assert a.root_digest != b.root_digest
    differ = {n for n in a.tensors if a.tensors[n]["digest"] != b.tensors[n]["digest"]}
    trained = {n for n, t in a.tensors.items() if t["role"] != "frozen"}
    assert differ == trained and len(trained) == 24


def test_resumed_run_reproduces_the_same_digests(trained_run, tiny_base, tmp_path):
    _, work0 = trained_run
    train_tiny(tmp_path, tiny_base, seed=0, data_seed=0, resume_from=work0 / "iter_3.pth")
    a, b = ExportManifest.load(work0 / "hf" / "iter_6"), ExportManifest.load(tmp_path / "hf" / "iter_6")
    assert a.root_digest == b.root_digest
    assert a.trained["root"] == b.trained["root"]
    assert not (tmp_path / "hf" / "iter_3").exists()  # resumed after iteration 3


def test_frozen_shards_are_linked_at_the_default_shard_size(trained_run):
    """The tiny model is far under the default 5GB, yet its frozen tensors get files of their own,
    so the export at iteration 6 hard-links them from iteration 3's snapshot."""
    import os
    _, work = trained_run
    first, second = (ExportManifest.load(work / "hf" / f"iter_{it}") for it in (3, 6))
    trained = {t["file"] for t in second.tensors.values() if t["role"] != "frozen"}
    frozen = {t["file"] for t in second.tensors.values()} - trained
    assert frozen and trained, "no file of frozen tensors only"
    assert first.storage["bytes_linked"] == 0
    assert set(second.storage["linked_from"]) == frozen
    assert second.storage["bytes_linked"] == sum((work / "hf" / "iter_6" / f).stat().st_size for f in frozen) > 0
    for f in frozen:
        assert os.stat(work / "hf" / "iter_6" / f).st_ino == os.stat(work / "hf" / "iter_3" / f).st_ino


def test_failed_export_is_logged_and_training_goes_on(tiny_base, tmp_path, monkeypatch):
    from sa2va_hooks.core import pipeline

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device (injected by the test)")

    monkeypatch.setattr(pipeline.ExportTask, "_finish", full_disk)
    runner = train_tiny(tmp_path, tiny_base)
    assert runner.iter == 6 and (tmp_path / "iter_6.pth").is_file()
    log = _log_text(tmp_path)
    assert "HF export of iteration 6" in log and "FAILED" in log and "injected by the test" in log
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_an_unknown_converter_stops_the_run_before_the_first_step(tiny_base, tmp_path):
    """A configuration error is refused in before_train, listing the known converters, not once per
    checkpoint after hours of training."""
    hooks = [dict(type="FingerprintHook"), dict(type="HFExportHook", converter="no_such_converter")]
    with pytest.raises(KeyError, match=r"unknown converter 'no_such_converter'; known converters: .*sa2va, sa2va_qwen"):
        train_tiny(tmp_path, tiny_base, hooks=hooks)
    assert not list(tmp_path.glob("iter_*.pth"))


def test_export_identical_to_base_is_reported_as_an_error(tiny_base, tmp_path):
    train_tiny(tmp_path, tiny_base, lr=0.0)
    log = _log_text(tmp_path)
    assert "IDENTICAL to the base model at iteration 3" in log
    m = ExportManifest.load(tmp_path / "hf" / "iter_6")
    assert m.training_effect["identical_to_base"] and m.training_effect["trained_differ_from_base"] == 0


def test_keep_last_prunes_old_snapshots(tiny_base, tmp_path):
    hooks = [dict(type="HFExportHook", interval=2, keep_last=2)]
    train_tiny(tmp_path, tiny_base, hooks=hooks, save_interval=100)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["iter_4", "iter_6"]


def test_verify_cli_detects_a_flipped_byte(trained_run, tmp_path):
    import shutil
    _, work = trained_run
    snap = tmp_path / "snap"
    shutil.copytree(work / "hf" / "iter_6", snap)
    cmd = [sys.executable, "-m", "sa2va_hooks", "verify", str(snap)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    shard = sorted(snap.glob("*.safetensors"))[-1]  # the trained tensors' file (the frozen ones come first)
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "mismatch" in bad.stdout and "FAILED" in bad.stdout


def test_stale_staging_from_a_crash_is_removed_and_said(tiny_base, tmp_path):
    stale = tmp_path / "hf" / "iter_3.incomplete-deadbeef0000"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    train_tiny(tmp_path, tiny_base, hooks=[dict(type="HFExportHook")], max_iters=3, save_interval=3)
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["iter_3"]
    assert f"removed {stale}: left behind by an interrupted export" in _log_text(tmp_path)


def test_disk_full_during_a_later_export_keeps_the_earlier_snapshot(tiny_base, tmp_path, monkeypatch):
    import errno

    import sa2va_hooks.core.rank_writer as ex
    from sa2va_hooks.core.verify import verify_snapshot
    real = ex.ShardWriter
    calls = {"n": 0}

    def fail_on_second_export(path, slots):
        calls["n"] += 1
        if "iter_6" in str(path):  # the disk fills up halfway through the second export's file
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, slots)

    monkeypatch.setattr(ex, "ShardWriter", fail_on_second_export)
    runner = train_tiny(tmp_path, tiny_base, hooks=[dict(type="FingerprintHook"), dict(type="HFExportHook")])
    assert runner.iter == 6 and (tmp_path / "iter_6.pth").is_file()
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["iter_3"]
    assert verify_snapshot(tmp_path / "hf" / "iter_3") == []
    log = _log_text(tmp_path)
    assert "HF export of iteration 6" in log and "No space left on device" in log


def test_epoch_based_checkpoints_follow_checkpoint_hook_schedule(tiny_base, tmp_path):
    """by_epoch=True: CheckpointHook saves in after_train_epoch; both hooks follow its rule there
    (not before_save_checkpoint), and the record names the checkpoint's own iteration."""
    from mmengine.runner import Runner

    from sa2va_hooks.core.fingerprint import fingerprint_tensor
    from sa2va_demo.runs import tiny_config
    cfg = tiny_config(tmp_path, tiny_base, hooks=[dict(type="FingerprintHook"), dict(type="HFExportHook")])
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=2)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1, by_epoch=True)
    Runner.from_cfg(cfg).train()
    snaps = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert snaps == ["iter_16", "iter_8"]  # 32 samples, batch 4: 8 iterations an epoch
    for epoch, it in ((1, 8), (2, 16)):
        ckpt = torch.load(tmp_path / f"epoch_{epoch}.pth", map_location="cpu", weights_only=False)
        record = ckpt["meta"]["sa2va_hooks"]
        assert record["iter"] == ckpt["meta"]["iter"] == it and record["epoch"] == epoch
        assert ckpt["message_hub"]["runtime_info"]["sa2va_hooks/checkpoint"]["iter"] == it
        saved = {k: fingerprint_tensor(k, v).digest for k, v in ckpt["state_dict"].items()}
        assert saved == {k: fp["digest"] for k, fp in record["trained"]["tensors"].items()}
        sidecar = json.loads((tmp_path / f"epoch_{epoch}.pth.fingerprints.json").read_text())
        assert sidecar["trained"]["root"] == record["trained"]["root"]
        manifest = ExportManifest.load(tmp_path / "hf" / f"iter_{it}")
        assert manifest.trained["root"] == record["trained"]["root"]
