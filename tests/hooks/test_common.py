"""hooks/common.py on a stand-in runner (the attributes the helpers read) with mmengine's real
CheckpointHook and MessageHub: checkpoint schedule and directory, how many snapshots are kept, orphan
sidecars, the config digest, and the baseline fingerprints recorded once. References: the schedule
recomputed by hand from CheckpointHook's documented rule, hashlib, and ``core.fingerprint`` on the
model's trainable parameters."""
from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmengine.hooks import CheckpointHook
from mmengine.logging import MessageHub

from sa2va_hooks.core.fingerprint import fingerprint_tensor
from sa2va_hooks.core.vocab import SIDECAR_SUFFIX
from sa2va_hooks.hooks import common
from sa2va_hooks.hooks.fingerprint_hook import orphan_sidecars  # the FingerprintHook's, since issue 17 step 6


def _runner(tmp_path: Path, hook: CheckpointHook | None = None, **kw) -> SimpleNamespace:
    hooks = [hook] if hook is not None else []
    r = SimpleNamespace(hooks=hooks, work_dir=str(tmp_path), logger=logging.getLogger("test_common"), iter=0,
                        epoch=0, max_iters=10, max_epochs=3, **kw)
    return r


@pytest.mark.parametrize("interval,save_begin,save_last", [(2, 0, True), (3, 4, False), (5, 0, False)])
def test_checkpoint_due_follows_checkpoint_hooks_rule(tmp_path, interval, save_begin, save_last):
    hook = CheckpointHook(interval=interval, by_epoch=False, save_begin=save_begin, save_last=save_last)
    r = _runner(tmp_path, hook)
    due = []
    for it in range(r.max_iters):
        r.iter = it
        due.append(common.checkpoint_due(r, "iter"))
        assert not common.checkpoint_due(r, "epoch")  # iteration-based
        assert common.checkpoint_point(r, "iter") == (it + 1, 0)
    want = [((it + 1 - save_begin) >= 0 and (it + 1 - save_begin) % interval == 0) or (save_last and it == 9)
            for it in range(10)]
    assert due == want
    assert common.has_checkpoint_schedule(r)
    none = _runner(tmp_path)
    assert not common.checkpoint_due(none, "iter") and not common.has_checkpoint_schedule(none)


def test_checkpoint_dir_and_keep_last(tmp_path, caplog):
    hook = CheckpointHook(interval=1, by_epoch=False, max_keep_ckpts=3)
    r = _runner(tmp_path, hook)
    assert common.checkpoint_dir(r) == tmp_path
    hook.out_dir = str(tmp_path / "ckpts")
    assert common.checkpoint_dir(r) == tmp_path / "ckpts"
    assert common.max_keep_ckpts(r) == 3
    with caplog.at_level(logging.INFO, logger="test_common"):
        assert common.snapshot_keep_last(r, None, at_checkpoints=True) == 3
    assert "keep_last follows CheckpointHook max_keep_ckpts=3" in caplog.text
    assert common.snapshot_keep_last(r, 5, at_checkpoints=True) == 5
    assert common.snapshot_keep_last(r, None, at_checkpoints=False) is None
    hook.max_keep_ckpts = -1
    assert common.max_keep_ckpts(r) is None and common.snapshot_keep_last(r, None, True) is None


def test_orphan_sidecars_are_ours_of_removed_checkpoints_only(tmp_path):
    hook = CheckpointHook(interval=1, by_epoch=False, max_keep_ckpts=1)
    r = _runner(tmp_path, hook)

    def sidecar(ckpt: str, of: str | None = None, text: str | None = None) -> Path:
        p = tmp_path / (ckpt + SIDECAR_SUFFIX)
        p.write_text(text if text is not None else json.dumps({"checkpoint": str(tmp_path / (of or ckpt)),
                                                               "trained": {}}))
        return p
    gone = sidecar("iter_1.pth")
    sidecar("iter_2.pth")
    (tmp_path / "iter_2.pth").write_bytes(b"x")  # its checkpoint is still there
    sidecar("iter_3.pth", of="iter_9.pth")  # says it belongs to another checkpoint
    sidecar("iter_4.pth", text="not json")
    sidecar("epoch_5.pth")  # not CheckpointHook's name for this run
    assert orphan_sidecars(r, tmp_path) == [(gone, "iter_1.pth")]
    hook.max_keep_ckpts = -1  # CheckpointHook removes nothing: nothing is an orphan
    assert orphan_sidecars(r, tmp_path) == []


def test_config_sha256_of_the_file_else_the_text(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(f"x = {random.random()}\n")
    r = _runner(tmp_path, cfg=SimpleNamespace(filename=str(cfg_file), pretty_text="ignored"))
    assert common.config_sha256(r) == hashlib.sha256(cfg_file.read_bytes()).hexdigest()
    r.cfg = SimpleNamespace(filename=None, pretty_text="a = 1")
    assert common.config_sha256(r) == hashlib.sha256(b"a = 1").hexdigest()
    r.cfg = None
    assert common.config_sha256(r) is None


def test_unwrapped_model_reaches_inside_a_deepspeed_engine(tmp_path):
    inner = torch.nn.Linear(2, 2)
    DeepSpeedEngine = type("DeepSpeedEngine", (torch.nn.Module,), {})
    engine = DeepSpeedEngine()
    engine.module = inner
    assert common.unwrapped_model(_runner(tmp_path, model=engine)) is inner
    assert common.unwrapped_model(_runner(tmp_path, model=inner)) is inner


def test_baseline_is_recorded_once_and_read_back(tmp_path):
    torch.manual_seed(int(torch.randint(0, 10 ** 6, (1,))))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    hub = MessageHub.get_instance(f"test_common_{random.random()}")
    r = _runner(tmp_path, model=model, message_hub=hub)
    ref = {n: fingerprint_tensor(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad}
    baseline, frozen_now, recorded = common.ensure_baseline(r)
    assert recorded is None and baseline == ref
    assert hub.get_info(common.FROZEN_ROOT_KEY) == frozen_now
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    again, frozen_again, recorded_again = common.ensure_baseline(r)
    assert again == ref  # what was recorded before training, not the weights now
    assert frozen_again == frozen_now == recorded_again  # once per process


def test_background_exports_are_one_per_runner(tmp_path):
    a, b = _runner(tmp_path), _runner(tmp_path)
    assert common.background_exports(a) is common.background_exports(a)
    assert common.background_exports(a) is not common.background_exports(b)
    st = common.background_exports(a)
    assert not st.busy and st.wait(a, "test") is True


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, "Process"])
def test_background_takes_true_false_process_or_thread_only(bad):
    for good in (True, False, "process", "thread"):
        assert common.background_choice(good) is good
    with pytest.raises(common.BadValueError, match="background must be True, False, 'process' or 'thread'"):
        common.background_choice(bad)


def test_the_host_process_is_used_on_a_gpu_unless_chosen_otherwise(monkeypatch):
    """Decision 62: background=True puts the host work in a process of its own when a parameter is on a
    GPU (a stand-in module whose one parameter says so), in threads on the CPU; "process"/"thread" and
    SA2VA_HOOKS_HOST_PROCESS=1/0 choose."""
    class OnGpu(torch.nn.Module):
        def parameters(self, recurse=True):
            return iter([SimpleNamespace(device=torch.device("cuda", 0))])

    cpu, gpu = torch.nn.Linear(2, 2), OnGpu()
    monkeypatch.delenv("SA2VA_HOOKS_HOST_PROCESS", raising=False)
    assert [common.wants_host_process(True, m) for m in (cpu, gpu)] == [False, True]
    assert [common.wants_host_process("process", m) for m in (cpu, gpu)] == [True, True]
    assert [common.wants_host_process("thread", m) for m in (cpu, gpu)] == [False, False]
    monkeypatch.setenv("SA2VA_HOOKS_HOST_PROCESS", "1")
    assert common.wants_host_process(True, cpu) and not common.wants_host_process("thread", cpu)
    monkeypatch.setenv("SA2VA_HOOKS_HOST_PROCESS", "0")
    assert not common.wants_host_process(True, gpu) and common.wants_host_process("process", gpu)
