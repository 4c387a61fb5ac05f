"""Publishing is durable and crash-safe: every file is fsynced before the rename, a replace is one
atomic swap, a prune never leaves a half-deleted snapshot under its name, and our own leftovers
are restored or removed (never anything we did not create)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sa2va_hooks import export_hf, verify_snapshot
from sa2va_hooks.core import publish as writer
from sa2va_hooks.core.manifest import MANIFEST_FILE


def _kinds(names) -> set[str]:
    out = set()
    for n in names:
        out.add("shard" if n.endswith(".safetensors") else "index" if n.endswith(".index.json") else
                "remote code" if n.endswith(".py") else "manifest" if n == MANIFEST_FILE else
                "tokenizer" if n.startswith(("tokenizer", "special_tokens")) else n)
    return out


def test_every_file_and_directory_is_fsynced_before_the_rename(trained_run, tmp_path, monkeypatch):
    runner, _ = trained_run
    events = []
    real_fsync, real_rename = writer.fsync_path, os.rename
    monkeypatch.setattr(writer, "fsync_path", lambda p: (events.append(("fsync", Path(p))), real_fsync(p)))
    monkeypatch.setattr(writer.os, "rename", lambda a, b: (events.append(("rename", Path(a), Path(b))),
                                                           real_rename(a, b)))
    out = tmp_path / "hf" / "iter_1"
    export_hf(runner.model, out, converter="tiny_sa2va", dtype="bf16", max_shard_size="20KB")
    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == out)
    staging = events[publish][1]
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    files = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert {staging / f for f in files} <= synced_before, sorted(map(str, {staging / f for f in files} - synced_before))
    assert staging in synced_before
    assert {"shard", "index", "remote code", "tokenizer", "manifest", "config.json"} <= _kinds(
        f.name for f in files), _kinds(f.name for f in files)
    assert ("fsync", out.parent) in events[publish + 1:], "the parent directory is fsynced after the rename"
    assert verify_snapshot(out) == []


def _tiny_snapshot(path: Path, seed: int) -> None:
    from conftest import tiny_qwen2
    export_hf(tiny_qwen2(seed=seed), path, overwrite=True)


def test_replace_is_one_atomic_swap_and_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "iter_2"
    _tiny_snapshot(out, seed=1)
    first = (out / MANIFEST_FILE).read_text()
    swaps = []
    real_exchange = writer.exchange
    monkeypatch.setattr(writer, "exchange", lambda a, b: (swaps.append((a, b)), real_exchange(a, b))[1])
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(writer.os, "rename", lambda a, b: (renames.append((a, b)), real_rename(a, b)))
    _tiny_snapshot(out, seed=2)
    assert swaps and swaps[0][1] == out, "renameat2(RENAME_EXCHANGE) was used"
    assert not [r for r in renames if Path(r[0]) == out], "the old snapshot was never renamed away from its name"
    assert (out / MANIFEST_FILE).read_text() != first and verify_snapshot(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_2"]


def test_without_the_swap_the_two_rename_fallback_still_replaces(tmp_path, monkeypatch):
    out = tmp_path / "iter_2"
    _tiny_snapshot(out, seed=1)
    monkeypatch.setattr(writer, "exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    _tiny_snapshot(out, seed=2)
    assert verify_snapshot(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["iter_2"]


def test_a_crash_between_the_fallback_renames_is_undone_on_the_next_start(tmp_path):
    out = tmp_path / "iter_4"
    _tiny_snapshot(out, seed=3)
    want = (out / MANIFEST_FILE).read_text()
    os.rename(out, tmp_path / "iter_4.old-0123456789ab")  # what a kill after the first rename leaves
    (tmp_path / "iter_4.incomplete-aaaaaaaaaaaa").mkdir()  # and its staging
    (tmp_path / "iter_3.trash-bbbbbbbbbbbb").mkdir()  # a prune killed after its rename
    (tmp_path / "iter_3.old-notours").mkdir()  # not our pattern: never touched
    (tmp_path / "mine.old-0123456789ab").mkdir()  # ours by pattern, but not a name this caller owns
    said = writer.clean_leftovers(tmp_path, owns=lambda n: n.startswith("iter_"), log=lambda m: None)
    assert (out / MANIFEST_FILE).read_text() == want and verify_snapshot(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_3.old-notours", "iter_4", "mine.old-0123456789ab"]
    assert len(said) == 3 and any(s.startswith("restored") for s in said)


def test_prune_renames_to_trash_first(tmp_path, monkeypatch):
    out = tmp_path / "iter_5"
    _tiny_snapshot(out, seed=4)
    seen = []

    def crash_after_rename(path):  # a kill right after the rename: the final name is already gone
        seen.extend(p.name for p in tmp_path.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.shutil, "rmtree", crash_after_rename)
    with pytest.raises(KeyboardInterrupt):
        writer.remove_snapshot(out)
    assert "iter_5" not in seen and any(n.startswith("iter_5.trash-") for n in seen)
    monkeypatch.undo()
    writer.clean_leftovers(tmp_path, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_is_refused_before_anything_is_published(tmp_path):
    out = tmp_path / "iter_6"
    out.write_text("not a snapshot")
    with pytest.raises(FileExistsError, match="not a snapshot directory"):
        from conftest import tiny_qwen2
        export_hf(tiny_qwen2(), out, overwrite=True)
    assert out.read_text() == "not a snapshot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_6"]


def _export_in_child(args) -> str:
    path, seed, overwrite = args
    from conftest import tiny_qwen2
    try:
        export_hf(tiny_qwen2(seed=seed), Path(path), overwrite=overwrite)
        return "published"
    except FileExistsError as e:
        return f"refused: {e}"


@pytest.mark.parametrize("overwrite", [False, True])
def test_concurrent_writers_to_one_name(tmp_path, overwrite, monkeypatch):
    """Six processes export to one name at once. Without overwrite: one publishes, every other is
    told the name exists (no 'Directory not empty'); with it: each replaces the last. Either way the
    final name verifies and nothing is left beside it. Each rename waits 0.2 s first, so that without
    the publishing lock the checks and renames of different writers do interleave (they did: the
    test fails with the lock taken out)."""
    import multiprocessing
    import time
    real_rename = os.rename
    monkeypatch.setattr(writer.os, "rename", lambda a, b: (time.sleep(0.2), real_rename(a, b))[1])
    out = tmp_path / "iter_5"
    with multiprocessing.get_context("fork").Pool(6) as pool:
        results = pool.map(_export_in_child, [(str(out), seed, overwrite) for seed in range(6)])
    published = [r for r in results if r == "published"]
    if overwrite:
        assert len(published) == 6, results
    else:
        assert len(published) == 1, results
        assert all(r.startswith(f"refused: snapshot directory {out} already exists") for r in results
                   if r != "published"), results
    assert verify_snapshot(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_5"]
