"""What becomes of a background export when training does not go on normally, in real mmengine
Runner trainings of the tiny Sa2VA model: training crashes or is interrupted while an export is in
flight; the run is killed mid-export and resumed; an export never ends. Every wait in these tests
is for a state (a thread ended, a file written), never for a fixed time."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sa2va_hooks.core.manifest import ExportManifest
from sa2va_hooks.core.verify import verify_snapshot
from sa2va_demo.runs import train_tiny

REPO = Path(__file__).resolve().parents[2]

# The export of iteration 1 holds its first shard until the training thread has ended (a state);
# training then fails at the start of iteration 2 with the given exception.
_CRASHING_RUN = """
import sys, threading, time
import sa2va_hooks.core.rank_writer as ex
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from sa2va_demo.runs import train_tiny

class HeldWriter(ex.ShardWriter):
    def __init__(self, *args, **kwargs):
        while threading.main_thread().is_alive():
            time.sleep(0.01)
        super().__init__(*args, **kwargs)

ex.ShardWriter = HeldWriter

@HOOKS.register_module()
class Crash(Hook):
    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter == 1:
            raise KeyboardInterrupt() if sys.argv[3] == "interrupt" else RuntimeError("the training step failed")

train_tiny(sys.argv[1], sys.argv[2], max_iters=4, save_interval=1,
           hooks=[dict(type="FingerprintHook"), dict(type="HFExportHook", dtype="fp32"), dict(type="Crash")])
"""


def _log_text(work: Path) -> str:
    return "\n".join(p.read_text() for p in work.glob("*/*.log"))


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_an_export_in_flight_finishes_when_training_crashes_or_is_interrupted(tiny_base, tmp_path, how):
    """Before: at interpreter shutdown the hashing pool refused new work, no snapshot was written
    and the log said "training continues". After: the export finishes before the process exits,
    and the log says training had ended."""
    work = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _CRASHING_RUN, str(work), str(tiny_base), how], timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode != 0, "training was meant to fail"
    assert ("KeyboardInterrupt" if how == "interrupt" else "the training step failed") in proc.stderr
    snap = work / "hf" / "iter_1"
    assert verify_snapshot(snap) == [], proc.stderr[-3000:]
    assert ExportManifest.load(snap).provenance["iteration"] == 1
    log = _log_text(work)
    assert "exported iter 1" in log and "training had already ended" in log
    assert "training continues" not in log
    assert [p.name for p in (work / "hf").iterdir()] == ["iter_1"]


# Killed while the export of iteration 2 writes (a state: its first shard is being written).
_KILLED_MID_EXPORT = """
import os, sys
import sa2va_hooks.core.rank_writer as ex
from sa2va_demo.runs import train_tiny

class DyingWriter(ex.ShardWriter):
    def __init__(self, path, slots):
        super().__init__(path, slots)
        if path.parent.name.startswith("iter_2."):
            os._exit(9)

ex.ShardWriter = DyingWriter
train_tiny(sys.argv[1], sys.argv[2], max_iters=4, save_interval=2,
           hooks=[dict(type="FingerprintHook"), dict(type="HFExportHook", dtype="fp32")])
"""


def test_a_resumed_checkpoint_without_its_snapshot_is_exported_at_resume(tiny_base, tmp_path):
    """Before: the checkpoint whose export was killed never got a snapshot, silently. After: on
    resume it is exported from the resumed weights, equal to an offline export of that checkpoint."""
    from sa2va_hooks.offline import export_checkpoint
    from sa2va_demo.runs import tiny_config
    work = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_EXPORT, str(work), str(tiny_base)], timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert (work / "iter_2.pth").is_file() and not (work / "hf" / "iter_2").exists()

    train_tiny(work, tiny_base, max_iters=4, save_interval=2, resume_from=work / "iter_2.pth",
               hooks=[dict(type="FingerprintHook"), dict(type="HFExportHook", dtype="fp32")])
    log = _log_text(work)
    assert "resumed at iteration 2, whose checkpoint has no snapshot" in log
    assert sorted(p.name for p in (work / "hf").iterdir()) == ["iter_2", "iter_4"]
    assert verify_snapshot(work / "hf" / "iter_2") == []
    # an independent path: the checkpoint file, loaded offline into a freshly built model
    cfg = tiny_config(tmp_path / "offline_cfg", tiny_base)
    cfg_file = tmp_path / "tiny.py"
    cfg.dump(str(cfg_file))
    offline = export_checkpoint(cfg_file, work / "iter_2.pth", tmp_path / "offline", dtype="fp32",
                                converter="tiny_sa2va", log=lambda _: None)
    assert ExportManifest.load(work / "hf" / "iter_2").root_digest == offline.manifest.root_digest


def test_training_never_waits_longer_than_timeout_s_for_an_export(tiny_base, tmp_path):
    """An export that never ends by itself (held until the test releases it, after training):
    with when_busy='wait', each later checkpoint waits timeout_s at most, then skips its export
    saying which rank's export is still running; training finishes, and the held export is then
    published."""
    import sa2va_hooks.core.pipeline as ex
    real_run = ex.ExportTask._run
    release = threading.Event()

    def held_run(self):
        if self.out_dir.name == "iter_1":
            release.wait()
        return real_run(self)

    ex.ExportTask._run = held_run
    try:
        runner = train_tiny(tmp_path, tiny_base, max_iters=3, save_interval=1,
                            hooks=[dict(type="FingerprintHook"),
                                   dict(type="HFExportHook", when_busy="wait", timeout_s=0.5)])
    finally:
        ex.ExportTask._run = real_run
        release.set()
    assert runner.iter == 3
    held = [t for t in threading.enumerate() if t.name == "sa2va_hooks-export-iter_1"]
    for t in held:
        t.join()
    log = _log_text(tmp_path)
    for it in (2, 3):
        assert (f"HF export of iteration {it} SKIPPED: the export to {tmp_path / 'hf' / 'iter_1'} is still running "
                "on rank(s) 0 after 0.5s") in log
    assert "the process waits for the export to" in log
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["iter_1"]
    assert verify_snapshot(tmp_path / "hf" / "iter_1") == []
