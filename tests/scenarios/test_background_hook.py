"""HFExportHook's background export in real mmengine Runner trainings of the tiny Sa2VA model:
same snapshots as the synchronous hook, training untouched, one export at a time, no torn
snapshot after a kill."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sa2va_hooks.core.manifest import ExportManifest
from sa2va_hooks.core.verify import verify_snapshot
from sa2va_demo.runs import train_tiny

REPO = Path(__file__).resolve().parents[2]


def _log_text(work: Path) -> str:
    return "\n".join(p.read_text() for p in work.glob("*/*.log"))


def _hooks(**export):
    return [dict(type="FingerprintHook"), dict(type="HFExportHook", dtype="bf16", **export)]


def _export_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sa2va_hooks-export")]


def test_background_and_synchronous_hooks_write_the_same_snapshots(trained_run, tiny_base, tmp_path):
    runner_bg, work_bg = trained_run  # the demo config: background export (the default)
    train_tiny(tmp_path, tiny_base, seed=0, data_seed=0, hooks=_hooks(background=False))
    for it in (3, 6):
        bg = ExportManifest.load(work_bg / "hf" / f"iter_{it}")
        sync = ExportManifest.load(tmp_path / "hf" / f"iter_{it}")
        assert bg.provenance["background"] is True and sync.provenance["background"] is False
        assert bg.root_digest == sync.root_digest
        assert {n: t["digest"] for n, t in bg.tensors.items()} == {n: t["digest"] for n, t in sync.tensors.items()}
        assert bg.trained == sync.trained
        assert verify_snapshot(work_bg / "hf" / f"iter_{it}") == []
    assert "started in the background; training paused" in _log_text(work_bg)
    assert not _export_threads()  # after_run waited; no thread outlives the run


def test_the_host_process_writes_the_same_snapshots_and_ends_with_the_run(trained_run, tiny_base, tmp_path):
    """background="process" (the default on a GPU): hashing, writing and read-back in a process of the
    hook's own; the snapshots are those of the threads (the demo run), and the process is gone after."""
    import re
    _, work_bg = trained_run
    train_tiny(tmp_path, tiny_base, seed=0, data_seed=0, hooks=_hooks(background="process"))
    for it in (3, 6):
        proc = ExportManifest.load(tmp_path / "hf" / f"iter_{it}")
        assert proc.root_digest == ExportManifest.load(work_bg / "hf" / f"iter_{it}").root_digest
        assert verify_snapshot(tmp_path / "hf" / f"iter_{it}") == []
    pid = int(re.search(r"in a process of their own \(pid (\d+)", _log_text(tmp_path)).group(1))
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # after_train closed it (and waited for it)
    assert "in a process of their own" not in _log_text(work_bg)  # the CPU default: threads


def test_training_is_bit_identical_with_the_background_hook_and_without_hooks(trained_run, tiny_base, tmp_path):
    runner_bg, _ = trained_run
    runner_none = train_tiny(tmp_path, tiny_base, seed=0, data_seed=0, hooks=[])
    with_hooks = dict(runner_bg.model.named_parameters())
    without = dict(runner_none.model.named_parameters())
    assert with_hooks.keys() == without.keys()
    changed = [n for n, p in without.items() if p.requires_grad and not torch.equal(p, with_hooks[n])]
    assert not changed, changed[:5]
    fresh = _fresh_trainables(tiny_base, without)
    assert any(not torch.equal(p, q) for (n, p), q in zip(without.items(), fresh, strict=True))
    assert all(torch.equal(p, with_hooks[n]) for n, p in without.items())


def _fresh_trainables(tiny_base, like: dict):
    """The untrained values, to show the training changed something the comparison can see."""
    from sa2va_demo.tiny_sa2va import TinySa2VA
    torch.manual_seed(0)
    fresh = dict(TinySa2VA(base_dir=str(tiny_base)).named_parameters())
    return [fresh[n] for n in like]


def test_when_busy_skip_skips_and_says_so_wait_exports_every_checkpoint(tiny_base, tmp_path):
    """A slow disk, made by state rather than by the clock: each export stays in flight until the
    hook waits for it (at the next checkpoint with when_busy='wait', at the end of training with
    'skip'), so every later checkpoint of the skip run finds it busy, on any machine speed."""
    import threading

    import sa2va_hooks.core.pipeline as ex
    from sa2va_hooks.hooks.common import BackgroundExports
    real_run, real_wait = ex.ExportTask._run, BackgroundExports.wait
    lock, waited_for = threading.Lock(), {}

    def event(out_dir) -> threading.Event:
        with lock:
            return waited_for.setdefault(str(out_dir), threading.Event())

    def held_run(self):
        if not event(self.out_dir).wait(timeout=600):  # a safety net only: the hook must come to wait
            raise TimeoutError(f"nobody waited for the export to {self.out_dir}")
        return real_run(self)

    def noting_wait(bg, runner, why, timeout=None):
        if bg.busy:
            event(bg.job.out_dir).set()
        return real_wait(bg, runner, why, timeout)

    ex.ExportTask._run, BackgroundExports.wait = held_run, noting_wait
    try:
        train_tiny(tmp_path / "skip", tiny_base, hooks=_hooks(when_busy="skip"), max_iters=6, save_interval=1)
        train_tiny(tmp_path / "wait", tiny_base, hooks=_hooks(when_busy="wait"), max_iters=4, save_interval=1)
    finally:
        ex.ExportTask._run, BackgroundExports.wait = real_run, real_wait
    skipped = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "skip" / "hf").iterdir())
    log = _log_text(tmp_path / "skip")
    assert 1 in skipped and len(skipped) < 6
    for it in set(range(1, 7)) - set(skipped):
        assert f"HF export of iteration {it} SKIPPED: the export to" in log
    assert all(verify_snapshot(tmp_path / "skip" / "hf" / f"iter_{it}") == [] for it in skipped)
    waited = sorted(p.name for p in (tmp_path / "wait" / "hf").iterdir())
    assert waited == [f"iter_{i}" for i in range(1, 5)]
    assert "waited" in _log_text(tmp_path / "wait") and "to finish (training ended)" in _log_text(tmp_path / "wait")
    assert not _export_threads()


def test_background_failure_is_logged_and_training_goes_on(tiny_base, tmp_path):
    import sa2va_hooks.core.pipeline as ex
    real = ex.ExportTask._run

    def failing_run(self):
        if self.out_dir.name == "iter_6":
            raise OSError(28, "No space left on device", str(self.out_dir))
        return real(self)

    ex.ExportTask._run = failing_run
    try:
        runner = train_tiny(tmp_path, tiny_base, hooks=_hooks(keep_last=5))
    finally:
        ex.ExportTask._run = real
    assert runner.iter == 6 and (tmp_path / "iter_6.pth").is_file()
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["iter_3"]
    log = _log_text(tmp_path)
    assert "HF export of iteration 6" in log and "FAILED" in log and "No space left on device" in log


_KILLED_RUN = """
import sys
from sa2va_demo.runs import train_tiny
train_tiny(sys.argv[1], sys.argv[2], max_iters=60, save_interval=1,
           hooks=[dict(type="FingerprintHook"), dict(type="HFExportHook", dtype="fp32", max_shard_size="20KB")])
"""


def _published(work: Path) -> list[Path]:
    hf = work / "hf"
    return [p for p in hf.iterdir() if "." not in p.name] if hf.is_dir() else []


def _staging(work: Path) -> list[Path]:
    hf = work / "hf"
    return [p for p in hf.iterdir() if ".incomplete-" in p.name] if hf.is_dir() else []


# kill points, each a state of the run: after its first publish; while an export is staged (after a
# publish, so the kill lands mid-export with a published snapshot beside it); after three publishes
_KILL_AT = (lambda w: len(_published(w)) >= 1,
            lambda w: len(_published(w)) >= 1 and bool(_staging(w)),
            lambda w: max((int(p.name.split("_")[1]) for p in _published(w)), default=0) >= 3)


def test_a_kill_during_background_exports_leaves_no_torn_snapshot(tiny_base, tmp_path):
    """SIGKILL at several states of a run exporting in the background (one export per iteration):
    every final name verifies; the next start removes the leftovers and says so. The test waits for
    each state (polling), never for a fixed delay."""
    for n, reached in enumerate(_KILL_AT):
        work = tmp_path / f"run{n}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        err = tmp_path / f"run{n}.stderr"
        with open(err, "wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(work), str(tiny_base)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                while not reached(work):
                    assert proc.poll() is None, f"the run ended before the kill point: {err.read_text()[-3000:]}"
                    time.sleep(0.01)
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        final = _published(work)
        assert final, "no export was published before the kill"
        for snap in final:
            assert verify_snapshot(snap) == [], snap
        train_tiny(work, tiny_base, hooks=[dict(type="HFExportHook")], max_iters=1, save_interval=1)
        leftovers = [p.name for p in (work / "hf").iterdir() if ".incomplete-" in p.name]
        assert leftovers == []
