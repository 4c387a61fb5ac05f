"""FingerprintHook: record what was trained at every checkpoint, in three places.

- ``checkpoint["meta"]["sa2va_hooks"]``: travels with the checkpoint;
- ``<checkpoint>.fingerprints.json``: readable without unpickling anything;
- one log line: count, bytes, root digest, and how many trainable tensors changed since the
  previous checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..compat import allow_mmengine_checkpoint_globals
from ..core.fingerprint import FingerprintSet
from ..export import trained_fingerprints
from .common import CURRENT_TRAINED_KEY, META_KEY, ensure_baseline, unwrapped_model

SIDECAR_SUFFIX = ".fingerprints.json"


@HOOKS.register_module()
class FingerprintHook(Hook):
    # After CheckpointHook (VERY_LOW), so the checkpoint path is known when the sidecar is written.
    priority = "LOWEST"

    def __init__(self) -> None:
        allow_mmengine_checkpoint_globals()  # so that mmengine can resume from our checkpoints
        self._pending: dict | None = None
        self._last: FingerprintSet | None = None

    def before_train(self, runner) -> None:
        baseline, frozen_now, recorded = ensure_baseline(runner)
        self._frozen_root = frozen_now
        if recorded is not None and recorded != frozen_now:
            runner.logger.error(
                f"[sa2va_hooks] the frozen parameters changed since this run started: root digest {frozen_now}, "
                f"recorded {recorded}. The base model or pretrained_pth differs from the one trained on; exports "
                "of this run will not hold the base it was trained with.")
        runner.logger.info(f"[sa2va_hooks] frozen parameters root digest {frozen_now}; "
                           f"{len(baseline)} trainable tensors fingerprinted before training")

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        trained = trained_fingerprints(unwrapped_model(runner))
        meta = checkpoint.setdefault("meta", {})
        record = {"trained": trained.to_json(), "frozen_root": getattr(self, "_frozen_root", None),
                  "iter": meta.get("iter"), "epoch": meta.get("epoch")}
        meta[META_KEY] = record
        changed = (len(trained.tensors) if self._last is None else
                   sum(1 for k, fp in trained.tensors.items()
                       if k not in self._last.tensors or self._last.tensors[k].digest != fp.digest))
        since = "since the start of this process" if self._last is None else "since the last checkpoint"
        runner.logger.info(f"[sa2va_hooks] checkpoint at iter {meta.get('iter')}: {len(trained.tensors)} trainable "
                           f"tensors, {trained.nbytes} bytes, root {trained.root}; {changed} changed {since}")
        self._last = trained
        self._pending = record
        runner.message_hub.update_info(CURRENT_TRAINED_KEY, {"iter": meta.get("iter"), "trained": trained},
                                       resumed=False)

    def _write_sidecar(self, runner) -> None:
        if self._pending is None:
            return
        record, self._pending = self._pending, None
        if not is_main_process():  # checkpoints are written by rank 0 only
            return
        ckpt = runner.message_hub.get_info("last_ckpt")
        if not ckpt:
            runner.logger.warning("[sa2va_hooks] a checkpoint was saved but its path is unknown (no 'last_ckpt' in "
                                  "message_hub); the fingerprint sidecar was not written. They are in its meta.")
            return
        path = Path(str(ckpt) + SIDECAR_SUFFIX)
        try:
            path.write_text(json.dumps({"checkpoint": str(ckpt), **record}, indent=1))
        except OSError as e:
            runner.logger.error(f"[sa2va_hooks] could not write fingerprint sidecar {path}: {e}. Training continues; "
                                "the fingerprints are in the checkpoint's meta.")

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._write_sidecar(runner)

    def after_train_epoch(self, runner) -> None:
        self._write_sidecar(runner)

    def after_train(self, runner) -> None:
        self._write_sidecar(runner)
