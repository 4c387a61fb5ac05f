"""FingerprintHook: record what was trained at every checkpoint, in three places.

- inside the checkpoint: ``message_hub`` runtime info ``sa2va_hooks/checkpoint``, which every
  runner and strategy saves with the checkpoint (DeepSpeed's ``iter_N.pth/`` directories
  included); the classic Runner also gets it in ``checkpoint["meta"]["sa2va_hooks"]``;
- ``<checkpoint>.fingerprints.json``: readable without unpickling anything (rank 0 writes it, and
  removes it again when CheckpointHook's ``max_keep_ckpts`` removed its checkpoint);
- one log line: count, bytes, root digest, and how many trainable tensors changed since the
  previous checkpoint.

When: in ``after_train_iter`` / ``after_train_epoch`` on every rank, just before CheckpointHook
(this hook's priority is LOW, CheckpointHook's VERY_LOW), whenever CheckpointHook's own schedule
says it is about to save. It never relies on ``before_save_checkpoint``, which
``DeepSpeedStrategy`` never calls. Fingerprinting is collective (ZeRO-3 gathers one module at a
time; the hashing is split between the ranks), and every rank enters it at the same point.
"""
from __future__ import annotations

import json
import os
import re
import traceback
from pathlib import Path

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..export import (FingerprintSet, RankGroup, checkpoint_export_mode, fingerprint_capture, fingerprint_pieces,
                      trained_fingerprints)
from .common import (CHECKPOINT_RECORD_KEY, FROZEN_ROOT_ALGORITHM_KEY, CURRENT_TRAINED_KEY, META_KEY, SIDECAR_SUFFIX,
                     allow_mmengine_checkpoint_globals, background_exports, checkpoint_due, checkpoint_hook,
                     checkpoint_point, ensure_baseline, max_keep_ckpts, process_state, unwrapped_model)


@HOOKS.register_module()
class FingerprintHook(Hook):
    # Before CheckpointHook (VERY_LOW), so the record is in message_hub when the checkpoint is saved.
    priority = "LOW"

    def __init__(self) -> None:
        allow_mmengine_checkpoint_globals()  # so that mmengine can resume from our checkpoints
        self._pending: dict | None = None  # record waiting for its checkpoint path (sidecar)
        self._last: FingerprintSet | None = None
        self._frozen_root: str | None = None
        self._frozen_root_algorithm: str | None = None

    def before_train(self, runner) -> None:
        baseline, frozen_now, recorded = ensure_baseline(runner)
        self._frozen_root = frozen_now
        self._frozen_root_algorithm = runner.message_hub.get_info(FROZEN_ROOT_ALGORITHM_KEY)  # ensure_baseline set it
        if recorded is not None and recorded != frozen_now:
            runner.logger.error(
                f"[sa2va_hooks] the frozen parameters changed since this run started: root digest {frozen_now}, "
                f"recorded {recorded}. The base model or pretrained_pth differs from the one trained on; exports "
                "of this run will not hold the base it was trained with.")
        runner.logger.info(f"[sa2va_hooks] frozen parameters root digest {frozen_now}; "
                           f"{len(baseline)} trainable tensors fingerprinted before training")

    # -- timing: the checkpoint schedule, on every rank ------------------------------------------
    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._write_sidecar(runner)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._write_sidecar(runner)
        if checkpoint_due(runner, "iter"):
            self._record(runner, *checkpoint_point(runner, "iter"))

    def after_train_epoch(self, runner) -> None:
        self._write_sidecar(runner)
        if checkpoint_due(runner, "epoch"):
            self._record(runner, *checkpoint_point(runner, "epoch"))

    def after_train(self, runner) -> None:
        self._write_sidecar(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Classic Runner only (rank 0): also put the record into the checkpoint's meta. A checkpoint
        the schedule did not predict (e.g. a best-metric one) is fingerprinted here when that needs
        no collective."""
        meta = checkpoint.setdefault("meta", {})
        record = runner.message_hub.get_info(CHECKPOINT_RECORD_KEY)
        if record is None or record.get("iter") != meta.get("iter"):
            model = unwrapped_model(runner)
            if checkpoint_export_mode(model) != "captured":  # partitioned: only a collective could read them
                return
            trained = trained_fingerprints(model, group=RankGroup(0, 1))
            record = self._make_record(trained, meta.get("iter"), meta.get("epoch"))
            checkpoint.setdefault("message_hub", {}).setdefault("runtime_info", {})[CHECKPOINT_RECORD_KEY] = record
        meta[META_KEY] = record

    # -- the record ------------------------------------------------------------------------------
    def _make_record(self, trained: FingerprintSet, it: int | None, epoch: int | None) -> dict:
        return {"trained": trained.to_json(), "frozen_root": self._frozen_root,
                "frozen_root_algorithm": self._frozen_root_algorithm, "iter": it, "epoch": epoch}

    def _fingerprints(self, runner, it: int) -> FingerprintSet:
        """The trainable parameters' fingerprints now. With background exports on and whole
        parameters, they are copied into a free set of the reused capture buffers (which the export
        of this checkpoint then uses as they are) and hashed on a pool of threads, in this process
        alone; the training thread waits only for that, because the record must be inside the
        checkpoint that is saved next. Which set is free: under "queue", every rank agrees first
        (``room``, collective) and never waits for an export unless one is already queued; under
        "wait", the running export ends first. With no free set (the export will be skipped) the
        live parameters are hashed instead. Otherwise: the collective walk (ZeRO-3 and FSDP gather)."""
        model = unwrapped_model(runner)
        bg = background_exports(runner)
        mode = checkpoint_export_mode(model)
        if not bg.enabled or mode == "gathered":
            return trained_fingerprints(model)  # collective
        alone = RankGroup(0, 1) if mode == "captured" else None  # partitioned: only all ranks together
        if bg.when_busy == "queue":
            free = not bg.room(runner, it)  # collective: some rank still has two exports in flight if not
        else:
            free = not (bg.busy and bg.when_busy == "skip") and \
                bg.wait(runner, f"its buffers are needed for the capture at iteration {it}", bg.timeout_s)
            if mode == "partitioned":  # every rank takes the same path: the fingerprints are collective
                free = all(RankGroup.current().all_gather(free))
        buffers = bg.free_buffers() if free else None
        if buffers is None:  # the export will be skipped (or no set is free): hash the live parameters
            return trained_fingerprints(model, group=alone)
        capture = bg.capture_into(buffers, model, it)
        return FingerprintSet.of(fingerprint_pieces(capture, bg.fp_exchange) if mode == "partitioned"
                                 else fingerprint_capture(capture))

    def _record(self, runner, it: int, epoch: int) -> None:
        try:
            trained = self._fingerprints(runner, it)
        except Exception as e:  # noqa: BLE001 - every rank got the same error (collective); training goes on
            runner.logger.error(f"[sa2va_hooks] fingerprints of the checkpoint at iteration {it} FAILED; the "
                                f"checkpoint is saved without them. Cause: {type(e).__name__}: {e}")
            runner.logger.debug(traceback.format_exc())
            return
        record = self._make_record(trained, it, epoch)
        hub = runner.message_hub
        hub.update_info(CHECKPOINT_RECORD_KEY, record)  # resumed=True: saved inside the checkpoint
        process_state(runner)[CURRENT_TRAINED_KEY] = {"iter": it, "trained": trained}
        changed = (len(trained.tensors) if self._last is None else
                   sum(1 for k, fp in trained.tensors.items()
                       if k not in self._last.tensors or self._last.tensors[k].digest != fp.digest))
        since = "since the start of this process" if self._last is None else "since the last checkpoint"
        runner.logger.info(f"[sa2va_hooks] checkpoint at iter {it}: {len(trained.tensors)} trainable "
                           f"tensors, {trained.nbytes} bytes, root {trained.root}; {changed} changed {since}")
        self._last = trained
        self._pending = {"record": record, "iter": it, "ckpt_before": hub.get_info("last_ckpt")}

    def _write_sidecar(self, runner) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        if not is_main_process():  # one sidecar per checkpoint, beside it
            return
        ckpt = runner.message_hub.get_info("last_ckpt")
        if not ckpt or ckpt == pending["ckpt_before"]:
            runner.logger.warning(
                f"[sa2va_hooks] fingerprints were recorded for a checkpoint at iteration {pending['iter']}, but "
                "CheckpointHook saved none there; no sidecar was written. A custom checkpoint schedule? The "
                "fingerprints are in message_hub runtime info of the next checkpoint saved.")
            return
        path = Path(str(ckpt).rstrip("/") + SIDECAR_SUFFIX)
        try:
            path.write_text(json.dumps({"checkpoint": str(ckpt), **pending["record"]}, indent=1))
        except OSError as e:
            runner.logger.error(f"[sa2va_hooks] could not write fingerprint sidecar {path}: {e}. Training continues; "
                                "the fingerprints are inside the checkpoint (message_hub runtime info).")
        self._remove_orphan_sidecars(runner, path.parent)

    @staticmethod
    def _remove_orphan_sidecars(runner, ckpt_dir: Path) -> None:
        """CheckpointHook with ``max_keep_ckpts`` removed an older checkpoint (a file, or a DeepSpeed
        directory) just before it saved this one; its sidecar goes with it. Rank 0 (the caller), only
        our sidecars, only when their checkpoint is gone (orphan_sidecars)."""
        for sidecar, ckpt in orphan_sidecars(runner, ckpt_dir):
            try:
                sidecar.unlink()
            except OSError as e:
                runner.logger.warning(f"[sa2va_hooks] could not remove fingerprint sidecar {sidecar} of the removed "
                                      f"checkpoint {ckpt}: {e}")
                continue
            runner.logger.info(f"[sa2va_hooks] removed fingerprint sidecar {sidecar}: its checkpoint {ckpt} was "
                               f"removed by CheckpointHook (max_keep_ckpts={max_keep_ckpts(runner)})")


def orphan_sidecars(runner, ckpt_dir: Path) -> list[tuple[Path, str]]:
    """FingerprintHook's sidecars in ``ckpt_dir`` whose checkpoint CheckpointHook removed
    (``max_keep_ckpts``): (sidecar, checkpoint name). Only when CheckpointHook removes checkpoints at
    all, only names of CheckpointHook's own form plus our suffix (``iter_2.pth.fingerprints.json``),
    only when nothing exists under the checkpoint's name (a file or a DeepSpeed directory), and only
    files whose content says they are our sidecar of that checkpoint."""
    hook = checkpoint_hook(runner)
    if max_keep_ckpts(runner) is None or not ckpt_dir.is_dir():
        return []
    parts = re.split(r"\{[^{}]*\}", getattr(hook, "filename_tmpl", "") or "")
    if len(parts) != 2:  # not a template of one step number: nothing is recognisably ours
        return []
    name = re.compile(re.escape(parts[0]) + r"\d+" + re.escape(parts[1]) + re.escape(SIDECAR_SUFFIX))
    found = []
    for sidecar in sorted(ckpt_dir.iterdir()):
        if not name.fullmatch(sidecar.name) or not sidecar.is_file():
            continue
        ckpt = sidecar.name[:-len(SIDECAR_SUFFIX)]
        if os.path.lexists(ckpt_dir / ckpt) or not _is_sidecar_of(sidecar, ckpt):
            continue
        found.append((sidecar, ckpt))
    return found


def _is_sidecar_of(path: Path, ckpt_name: str) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and "trained" in record and
            Path(str(record.get("checkpoint", "")).rstrip("/")).name == ckpt_name)
