"""SIGKILL at every step of a publish (replace by swap, replace by two renames) and of a prune: after
each kill and the next start's cleanup (what the hook and tools/export.py run), every final name is
a complete snapshot that verifies, the replaced one is never lost, and nothing of ours is left.

The publish and prune steps are file-system calls only, so each runs in a forked child that
SIGKILLs itself just before the N-th call of one instrumented function (each fsync, the swap, each
rename, each tree delete, the first and last unlink inside a delete). A first run of each mode
without a kill counts those calls; every one of them then becomes a kill point.
"""
from __future__ import annotations

import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest

from conftest import tiny_qwen2
from sa2va_hooks import export_hf, verify_snapshot
from sa2va_hooks.core import publish as writer
from sa2va_hooks.core.manifest import MANIFEST_FILE
from sa2va_hooks.core.publish import clean_leftovers

MODES = ("replace", "fallback", "prune")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three complete snapshots: the two already published, and the new one to publish over iter_1."""
    d = tmp_path_factory.mktemp("sources")
    for name, seed in (("iter_1", 1), ("iter_2", 2), ("new", 3)):
        export_hf(tiny_qwen2(seed=seed), d / name)
    return d


def _setup(root: Path, sources: Path) -> Path:
    root.mkdir()
    for n in ("iter_1", "iter_2"):
        shutil.copytree(sources / n, root / n)
    staging = root / f"iter_1.incomplete-{uuid.uuid4().hex[:12]}"
    shutil.copytree(sources / "new", staging)
    return staging


def _run(root: Path, staging: Path, mode: str, kill_at: tuple[str, int] | None) -> tuple[int, dict]:
    """Fork; the child instruments the calls, runs the step, and reports its counts through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: file-system calls only, then _exit (no pytest teardown here)
        os.close(read)
        counts: dict[str, int] = {}

        def instrument(owner, attr, label):
            real = getattr(owner, attr)

            def wrapper(*a, **k):
                counts[label] = counts.get(label, 0) + 1
                if kill_at == (label, counts[label]):
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*a, **k)
            setattr(owner, attr, wrapper)
        try:
            if mode == "fallback":
                writer.exchange = lambda a, b: False  # a filesystem without RENAME_EXCHANGE
            for owner, attr, label in [(writer, "fsync_path", "fsync"), (writer, "exchange", "exchange"),
                                       (os, "rename", "rename"), (shutil, "rmtree", "rmtree"),
                                       (os, "unlink", "unlink")]:
                instrument(owner, attr, label)
            if mode == "prune":
                writer.remove_snapshot(root / "iter_2")
            else:
                writer.publish(staging, root / "iter_1", overwrite=True)
            os.write(write, repr(counts).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    return status, (eval(out) if out else {})  # noqa: S307 - our own child's repr of a dict of ints


def _points(tmp_path: Path, sources: Path, mode: str) -> list[tuple[str, int]]:
    root = tmp_path / f"count_{mode}"
    status, counts = _run(root, _setup(root, sources), mode, None)
    assert os.WIFEXITED(status) and counts, (status, counts)
    points = [(fn, n) for fn in ("fsync", "exchange", "rename", "rmtree") for n in range(1, counts.get(fn, 0) + 1)]
    if counts.get("unlink"):
        points += [("unlink", 1), ("unlink", counts["unlink"])]
    return points


def _check_after_kill(root: Path, sources: Path, mode: str, point) -> None:
    clean_leftovers(root, owns=lambda n: n.startswith("iter_"), log=lambda m: None)  # the next start
    names = sorted(p.name for p in root.iterdir())
    want = (["iter_1", "iter_2"], ["iter_1"]) if mode == "prune" else (["iter_1", "iter_2"],)
    assert names in want, (mode, point, names)  # a replaced snapshot is never lost, nothing leaks
    for n in names:
        assert verify_snapshot(root / n) == [], (mode, point, n)
    if mode != "prune":  # iter_1 is the old snapshot or the new one, whole
        got = (root / "iter_1" / MANIFEST_FILE).read_text()
        assert got in ((sources / "iter_1" / MANIFEST_FILE).read_text(), (sources / "new" / MANIFEST_FILE).read_text())


@pytest.mark.parametrize("mode", MODES)
def test_a_kill_at_any_step_leaves_only_complete_snapshots(tmp_path, sources, mode):
    points = _points(tmp_path, sources, mode)
    for i, point in enumerate(points):
        root = tmp_path / f"{mode}_{i}"
        staging = _setup(root, sources)
        status, _ = _run(root, staging, mode, point)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (point, status)
        _check_after_kill(root, sources, mode, point)


def test_there_are_at_least_twenty_kill_points(tmp_path, sources):
    counts = {m: len(_points(tmp_path, sources, m)) for m in MODES}
    assert sum(counts.values()) >= 20, counts
