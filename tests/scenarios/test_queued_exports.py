"""HFExportHook(when_busy='queue'), the default, in real mmengine Runner trainings of the tiny
Sa2VA model: a checkpoint during an export is captured into the second buffer set and queued
behind it, training not waiting; a third one while one runs and one is queued waits for the
running one (bounded by timeout_s), or skips. Exports are made slow by state, never by the clock:
the export of iteration 1 is held at its start until the test (or the hook's wait) releases it."""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

import sa2va_hooks.core.pipeline as pipeline
from sa2va_hooks.core.manifest import ExportManifest
from sa2va_hooks.core.verify import verify_snapshot
from sa2va_hooks.hooks.common import BackgroundExports
from sa2va_hooks.hooks.hf_export_hook import HFExportHook
from sa2va_demo.runs import tiny_config, train_tiny


def _log_text(work: Path) -> str:
    return "\n".join(p.read_text() for p in work.glob("*/*.log"))


def _thread(name: str) -> threading.Thread | None:
    return next((t for t in threading.enumerate() if t.name == f"sa2va_hooks-export-{name}"), None)


class _HoldFirstExport:
    """The export of iteration 1 waits at the start of its thread until ``release`` is set."""

    def __init__(self, monkeypatch) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        real = pipeline.ExportTask._run

        def held_run(task):
            if task.out_dir.name == "iter_1":
                self.entered.set()
                if not self.release.wait(120):  # a safety net only: the test releases it
                    raise TimeoutError("the test never released the export of iteration 1")
            return real(task)

        monkeypatch.setattr(pipeline.ExportTask, "_run", held_run)


class _Probe:
    """What the run's QueueProbeHook saw: a deep copy of the trainable tensors at every
    checkpoint, and ``at_return(runner, it)`` called once HFExportHook has returned."""

    current: "_Probe | None" = None  # the config names the hook by type; it finds its probe here

    def __init__(self, at_return=None) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.at_return = at_return
        _Probe.current = self


@HOOKS.register_module(force=True)
class QueueProbeHook(Hook):
    """After HFExportHook (both LOWEST, this one registered later), at every iteration."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.probe = _Probe.current

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        it = runner.iter + 1
        self.probe.weights[it] = {n: p.detach().clone() for n, p in runner.model.named_parameters()
                                  if p.requires_grad}
        if self.probe.at_return is not None:
            self.probe.at_return(runner, it)


def _hooks(probe: _Probe, **export) -> list[dict]:
    return [dict(type="FingerprintHook"), dict(type="HFExportHook", dtype="fp32", **export),
            dict(type="QueueProbeHook")]


def _assert_holds_its_iteration(work: Path, tiny_base, probe: _Probe, it: int, tmp_path: Path) -> None:
    """The snapshot of ``it`` is that iteration's weights: the deep copy taken at ``it`` equals the
    checkpoint saved there, and an offline export of that checkpoint has the snapshot's digest."""
    from sa2va_hooks.offline import export_checkpoint
    saved = torch.load(work / f"iter_{it}.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert probe.weights[it] and all(torch.equal(saved[n], t) for n, t in probe.weights[it].items())
    cfg_file = tmp_path / "tiny.py"
    tiny_config(tmp_path / "offline_cfg", tiny_base).dump(str(cfg_file))
    offline = export_checkpoint(cfg_file, work / f"iter_{it}.pth", tmp_path / f"offline_{it}", dtype="fp32",
                                converter="tiny_sa2va", log=lambda _: None)
    assert ExportManifest.load(work / "hf" / f"iter_{it}").root_digest == offline.manifest.root_digest
    assert verify_snapshot(work / "hf" / f"iter_{it}") == []


def test_queue_is_the_default_and_a_checkpoint_during_an_export_is_queued_without_waiting(
        tiny_base, tmp_path, monkeypatch):
    held, seen = _HoldFirstExport(monkeypatch), {}
    work = tmp_path / "run"

    def at_return(runner, it):
        if it == 2:  # HFExportHook has returned from the checkpoint of iteration 2
            first_held = held.entered.is_set() and not held.release.is_set() and _thread("iter_1") is not None
            seen.update(first_held=first_held,
                        second_queued=_thread("iter_2") is not None, second_published=(work / "hf" / "iter_2").exists())
            held.release.set()

    probe = _Probe(at_return)
    runner = train_tiny(work, tiny_base, max_iters=2, save_interval=1, hooks=_hooks(probe, timeout_s=60))
    held.release.set()
    assert [h.when_busy for h in runner.hooks if isinstance(h, HFExportHook)] == ["queue"]
    assert seen == dict(first_held=True, second_queued=True, second_published=False), seen
    log = _log_text(work)
    assert (f"export of iter 2 to {work / 'hf' / 'iter_2'} queued: the export of iter 1 is still running; it starts "
            "when that one ends (training paused") in log
    assert "the queued export of iter 2 starts now: the export of iter 1 ended (published)" in log
    assert "iteration 2 is due" not in log  # nobody waited at the checkpoint
    assert sorted(p.name for p in (work / "hf").iterdir()) == ["iter_1", "iter_2"]
    for it in (1, 2):
        _assert_holds_its_iteration(work, tiny_base, probe, it, tmp_path)


def test_a_third_checkpoint_while_one_runs_and_one_is_queued_waits_for_the_running_one(
        tiny_base, tmp_path, monkeypatch):
    """The export of iteration 1 is released only when the hook waits for it (at the checkpoint of
    iteration 3: one running, one queued); that frees its buffer set and the third is queued."""
    held = _HoldFirstExport(monkeypatch)
    real_wait_for = BackgroundExports._wait_for
    waits = []

    def noting_wait_for(runner, handle, why, timeout):
        waits.append((handle.out_dir.name, why))
        if handle.out_dir.name == "iter_1":
            held.release.set()
        return real_wait_for(runner, handle, why, timeout)

    monkeypatch.setattr(BackgroundExports, "_wait_for", staticmethod(noting_wait_for))
    work, probe = tmp_path / "run", _Probe()
    train_tiny(work, tiny_base, max_iters=3, save_interval=1, hooks=_hooks(probe, timeout_s=60))
    assert waits[0] == ("iter_1", "the export of iter 2 is queued behind it; iteration 3 is due"), waits
    log = _log_text(work)
    assert f"for the background export to {work / 'hf' / 'iter_1'} to finish (the export of iter 2 is queued" in log
    assert "SKIPPED" not in log
    assert sorted(p.name for p in (work / "hf").iterdir()) == ["iter_1", "iter_2", "iter_3"]
    for it in (2, 3):
        _assert_holds_its_iteration(work, tiny_base, probe, it, tmp_path)


def test_a_third_checkpoint_skips_when_the_running_export_outlasts_timeout_s(tiny_base, tmp_path, monkeypatch):
    """The export of iteration 1 never ends during training: iteration 2 is queued behind it, and
    iteration 3 waits timeout_s for it, then is skipped, saying so; both held exports are
    published once released."""
    held = _HoldFirstExport(monkeypatch)
    work, probe = tmp_path / "run", _Probe()
    try:
        runner = train_tiny(work, tiny_base, max_iters=3, save_interval=1, hooks=_hooks(probe, timeout_s=0.5))
    finally:
        held.release.set()
    assert runner.iter == 3
    for name in ("iter_2", "iter_1"):
        t = _thread(name)
        if t is not None:
            t.join()
    log = _log_text(work)
    assert (f"HF export of iteration 3 SKIPPED: the export to {work / 'hf' / 'iter_1'}, with another queued behind "
            "it, is still running on rank(s) 0 after 0.5s") in log
    assert f"the process waits for the export to {work / 'hf' / 'iter_2'} at exit" in log
    assert sorted(p.name for p in (work / "hf").iterdir()) == ["iter_1", "iter_2"]
    _assert_holds_its_iteration(work, tiny_base, probe, 2, tmp_path)
