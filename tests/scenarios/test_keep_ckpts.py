"""Sidecars and snapshots follow CheckpointHook's max_keep_ckpts (issue 16, item 1): real mmengine
Runners train the tiny Sa2VA model (fresh random weights) with checkpoints at every iteration."""
from __future__ import annotations

import json
import os
from pathlib import Path

from sa2va_hooks.core.manifest import ExportManifest
from sa2va_hooks.core.verify import verify_snapshot
from sa2va_demo.runs import BannerToFileRunner, tiny_config

FOLLOWS = "keep_last follows CheckpointHook max_keep_ckpts=2; pass keep_last=N to choose"


def _log_text(work: Path) -> str:
    return "\n".join(p.read_text() for p in work.glob("*/*.log"))


def _train(work: Path, base: Path, hf_hook: dict, runner_cls=BannerToFileRunner, max_keep_ckpts: int = 2):
    cfg = tiny_config(work, base, max_iters=6, save_interval=1,
                      hooks=[dict(type="FingerprintHook"), dict(type="HFExportHook", dtype="bf16", **hf_hook)])
    cfg.default_hooks.checkpoint.max_keep_ckpts = max_keep_ckpts
    runner = runner_cls.from_cfg(cfg)
    runner.train()
    assert runner.iter == 6
    return runner


def _names(paths) -> list[str]:
    return sorted(p.name for p in paths)


def _plant_foreign_files(work: Path) -> dict[Path, str]:
    """Files the hook must never remove: a JSON of our name that is not our sidecar, and one
    whose name is not CheckpointHook's form. Neither's 'checkpoint' exists."""
    work.mkdir(parents=True, exist_ok=True)
    foreign = {work / "iter_99.pth.fingerprints.json": json.dumps({"note": "someone else's"}),
               work / "best.pth.fingerprints.json": json.dumps({"checkpoint": "best.pth", "trained": {}})}
    for p, text in foreign.items():
        p.write_text(text)
    return foreign


def _assert_only_kept(work: Path, kept_ckpts: list[int], kept_snaps: list[int], foreign: dict[Path, str]) -> None:
    assert _names(work.glob("iter_*.pth")) == [f"iter_{i}.pth" for i in kept_ckpts]
    ours = [p for p in work.glob("*.fingerprints.json") if p not in foreign]
    assert _names(ours) == [f"iter_{i}.pth.fingerprints.json" for i in kept_ckpts]
    for p, text in foreign.items():  # untouched
        assert p.read_text() == text
    assert _names((work / "hf").iterdir()) == sorted(f"iter_{i}" for i in kept_snaps)
    for i in kept_snaps:
        snap = work / "hf" / f"iter_{i}"
        assert verify_snapshot(snap) == [], snap
    for i in set(kept_ckpts) & set(kept_snaps):  # each kept sidecar is the record of its kept snapshot
        sidecar = json.loads((work / f"iter_{i}.pth.fingerprints.json").read_text())
        assert sidecar["trained"]["root"] == ExportManifest.load(work / "hf" / f"iter_{i}").trained["root"]


def test_sidecars_and_snapshots_follow_max_keep_ckpts(tiny_base, tmp_path):
    foreign = _plant_foreign_files(tmp_path)
    _train(tmp_path, tiny_base, {})
    _assert_only_kept(tmp_path, [5, 6], [5, 6], foreign)
    log = _log_text(tmp_path)
    assert log.count(FOLLOWS) == 1
    for i in (1, 2, 3, 4):
        assert (f"removed fingerprint sidecar {tmp_path / f'iter_{i}.pth.fingerprints.json'}: its checkpoint "
                f"iter_{i}.pth was removed by CheckpointHook (max_keep_ckpts=2)") in log


def test_explicit_keep_last_wins_over_max_keep_ckpts(tiny_base, tmp_path):
    foreign = _plant_foreign_files(tmp_path)
    _train(tmp_path, tiny_base, {"keep_last": 3})
    _assert_only_kept(tmp_path, [5, 6], [4, 5, 6], foreign)
    assert "keep_last follows" not in _log_text(tmp_path)


def test_without_max_keep_ckpts_everything_stays(tiny_base, tmp_path):
    _train(tmp_path, tiny_base, {}, max_keep_ckpts=-1)
    _assert_only_kept(tmp_path, [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], {})
    assert "keep_last follows" not in _log_text(tmp_path)


class DirectoryCheckpointRunner(BannerToFileRunner):
    """Saves each checkpoint as a directory ``iter_N.pth/`` holding a model-states file, the layout
    of mmengine's DeepSpeedStrategy (FlexibleRunner); CheckpointHook then removes old ones with rmtree."""

    def save_checkpoint(self, out_dir, filename, *args, **kwargs):
        os.makedirs(os.path.join(out_dir, filename), exist_ok=True)
        return super().save_checkpoint(os.path.join(out_dir, filename), "mp_rank_00_model_states.pt", *args, **kwargs)


def test_sidecars_of_removed_checkpoint_directories_go_too(tiny_base, tmp_path):
    _train(tmp_path, tiny_base, {}, runner_cls=DirectoryCheckpointRunner)
    assert _names(p for p in tmp_path.glob("iter_*.pth") if p.is_dir()) == ["iter_5.pth", "iter_6.pth"]
    assert (tmp_path / "iter_6.pth" / "mp_rank_00_model_states.pt").is_file()
    assert _names(tmp_path.glob("*.fingerprints.json")) == ["iter_5.pth.fingerprints.json",
                                                            "iter_6.pth.fingerprints.json"]
    assert _names((tmp_path / "hf").iterdir()) == ["iter_5", "iter_6"]
    assert f"removed fingerprint sidecar {tmp_path / 'iter_4.pth.fingerprints.json'}" in _log_text(tmp_path)
