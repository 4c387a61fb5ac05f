"""FingerprintHook driven by hand on a stand-in runner (the attributes the hook reads, mmengine's real
CheckpointHook and MessageHub), no training loop: at a checkpoint the schedule predicts, the record in
message_hub, the sidecar beside the checkpoint CheckpointHook saved, and the checkpoint's meta. The
reference is ``core.fingerprint`` recomputed on the model's trainable parameters; the real trainings
are in tests/scenarios/test_hooks.py."""
from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import torch
from mmengine.hooks import CheckpointHook
from mmengine.logging import MessageHub

from sa2va_hooks.core.fingerprint import FingerprintSet, fingerprint_state
from sa2va_hooks.core.vocab import SIDECAR_SUFFIX
from sa2va_hooks.hooks.common import CHECKPOINT_RECORD_KEY, META_KEY
from sa2va_hooks.hooks.fingerprint_hook import FingerprintHook
from sa2va_hooks.offline.checkpoint_io import read_sidecar


def _setup(tmp_path, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    model[0].requires_grad_(False)
    runner = SimpleNamespace(model=model, hooks=[CheckpointHook(interval=2, by_epoch=False)], iter=0, epoch=0,
                             max_iters=6, work_dir=str(tmp_path), logger=logging.getLogger("test_fingerprint_hook"),
                             message_hub=MessageHub.get_instance(f"test_fph_{random.random()}"))
    return runner, model


def _train_step(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))


def _trained_root(model) -> str:
    return FingerprintSet.of(fingerprint_state((n, p.detach()) for n, p in model.named_parameters()
                                               if p.requires_grad)).root


def test_record_and_sidecar_at_each_checkpoint_the_schedule_predicts(tmp_path):
    runner, model = _setup(tmp_path, int(torch.randint(0, 10 ** 6, (1,))))
    hook = FingerprintHook()
    hook.before_train(runner)
    roots = {}
    for it in range(runner.max_iters):
        runner.iter = it
        hook.before_train_iter(runner, it)
        _train_step(model, seed=it)
        hook.after_train_iter(runner, it)
        record = runner.message_hub.get_info(CHECKPOINT_RECORD_KEY)
        if (it + 1) % 2 == 0:  # CheckpointHook(interval=2) saves now: the record is of these weights
            roots[it + 1] = _trained_root(model)
            assert record["iter"] == it + 1 and record["trained"]["root"] == roots[it + 1]
            ckpt = tmp_path / f"iter_{it + 1}.pth"
            ckpt.write_bytes(b"")
            runner.message_hub.update_info("last_ckpt", str(ckpt))
        else:
            assert record is None or record["iter"] == it  # nothing new between checkpoints
    hook.after_train(runner)
    for it, root in roots.items():
        side = read_sidecar(tmp_path / f"iter_{it}.pth{SIDECAR_SUFFIX}")
        assert side["iter"] == it and side["trained"]["root"] == root and side["checkpoint"].endswith(f"iter_{it}.pth")
    assert len(set(roots.values())) == len(roots)  # training changed them between checkpoints


def test_no_sidecar_when_checkpoint_hook_saved_nothing(tmp_path, caplog):
    runner, model = _setup(tmp_path, 1)
    hook = FingerprintHook()
    hook.before_train(runner)
    runner.iter = 1
    hook.after_train_iter(runner, 1)
    with caplog.at_level(logging.WARNING, logger="test_fingerprint_hook"):
        hook.before_train_iter(runner, 2)
    assert "CheckpointHook saved none there; no sidecar was written" in caplog.text
    assert not list(tmp_path.glob(f"*{SIDECAR_SUFFIX}"))


def test_before_save_checkpoint_puts_the_record_into_meta(tmp_path):
    runner, model = _setup(tmp_path, 2)
    hook = FingerprintHook()
    hook.before_train(runner)
    runner.iter = 1
    hook.after_train_iter(runner, 1)
    ckpt = {"meta": {"iter": 2, "epoch": 0}}
    hook.before_save_checkpoint(runner, ckpt)
    assert ckpt["meta"][META_KEY]["trained"]["root"] == _trained_root(model)
    # a checkpoint the schedule did not predict (iteration 5): fingerprinted right there
    _train_step(model, seed=9)
    other = {"meta": {"iter": 5, "epoch": 0}}
    hook.before_save_checkpoint(runner, other)
    assert other["meta"][META_KEY]["iter"] == 5 and other["meta"][META_KEY]["trained"]["root"] == _trained_root(model)
    assert other["message_hub"]["runtime_info"][CHECKPOINT_RECORD_KEY] == other["meta"][META_KEY]


def test_before_train_logs_an_error_when_the_frozen_part_changed_since_the_first_start(tmp_path, caplog):
    runner, model = _setup(tmp_path, 3)
    FingerprintHook().before_train(runner)
    with torch.no_grad():
        model[0].weight.add_(1)
    runner.__dict__.pop("_sa2va_hooks_process_state")  # a new process resuming the same run
    with caplog.at_level(logging.ERROR, logger="test_fingerprint_hook"):
        FingerprintHook().before_train(runner)
    assert "the frozen parameters changed since this run started" in caplog.text
