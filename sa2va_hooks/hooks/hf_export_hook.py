"""HFExportHook: a verified HF snapshot of the in-memory model at each checkpoint.

Thin by design: it reads runner state, decides when, and calls ``start_checkpoint_export``,
which chooses how (synchronous; captured, then a background thread; under ZeRO-3 / FSDP each
rank's own pieces captured, then assembled and written by a thread). It never raises into the training loop
(a failed export is logged as an error and training goes on), and never changes a parameter.

When: in ``after_train_iter`` / ``after_train_epoch`` on every rank, just after CheckpointHook
(priority LOWEST), whenever CheckpointHook's own schedule says it saved (or every ``interval``
iterations). Every rank takes part in every export (single process, DDP, DeepSpeed ZeRO-1/2/3,
FSDP): a failure on any rank is one error on every rank, with nothing published.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..export import (DEFAULT_TIMEOUT_S, BadValueError, FrontFailedError, converter_for_run, on_every_rank,
                      reserve_staging, start_checkpoint_export)
from .common import (CURRENT_TRAINED_KEY, WHEN_BUSY, allow_mmengine_checkpoint_globals, background_choice,
                     background_exports, build_callable_cfg, checkpoint_due, checkpoint_point, catch_up_after_resume,
                     complete_snapshots, config_sha256, describe_start, ensure_baseline, export_root,
                     has_checkpoint_schedule, log_failed, log_skipped, process_state, remove_stale_staging,
                     report_export, snapshot_keep_last, unwrapped_model)


@HOOKS.register_module()
class HFExportHook(Hook):
    """Export at every checkpoint (``interval=None``) or every ``interval`` training iterations.

    Args:
        out_dir: where snapshots go; ``{work_dir}/hf`` by default. Each is ``iter_{N}``.
        interval: export every N iterations instead of at checkpoints.
        converter: 'auto', a converter name, or a dict such as
            ``dict(type='sa2va', hf_code_dir=..., template=...)``.
        dtype: dtype of the exported floating tensors ('bf16', 'fp16', 'fp32'); None keeps them.
        max_shard_size: shard limit, as transformers' (e.g. '5GB').
        keep_last: keep only the newest N snapshots written here. None: when exporting at
            checkpoints and CheckpointHook has ``max_keep_ckpts > 0``, that many (said in the log);
            otherwise all.
        tokenizer: a tokenizer, a path, or an mmengine config dict to build one. Leave it out for
            Sa2VA: the model's own tokenizer (``model.tokenizer``, v2 ``model.mllm.tokenizer``, the one
            with ``[SEG]``) is used, then the config's top-level ``tokenizer`` (often the base one).
            A given tokenizer wins, and one that lacks a token the model's code needs is refused in
            ``before_train``.
        background: export in the background (True, the default): training pauses only while the
            trainable tensors (ZeRO-3/FSDP: this rank's pieces) are copied into reused host buffers;
            a thread merges the rest (and assembles pieces over a gloo group of its own), and the
            hashing, writing and read-back run in a process of their own when the model is on a
            GPU (so they never hold the GIL training needs), in threads on the CPU. "process" or
            "thread" chooses; ``False`` exports synchronously. The snapshot holds exactly the
            weights of its checkpoint iteration.
        when_busy: what a checkpoint does while the previous background export is still
            running. ``"queue"`` (the default): capture now into a second buffer set and queue the
            export behind the running one (training pauses only for the capture); with one already
            queued, wait for the running one first. ``"wait"`` for it, then export this one
            (ZeRO-3/FSDP: "queue" does this). ``"skip"`` this export. Logged every time. Training
            never waits longer than ``timeout_s``: past it this export is skipped, naming the ranks.
        timeout_s: the longest a rank's background export waits for another rank at one step
            (a stuck or dead rank is named, the export abandoned on every rank, nothing
            published), and the longest training waits for an export in flight. Default 600 s.
    """

    priority = "LOWEST"  # after CheckpointHook, so the checkpoint path is known

    def __init__(self, out_dir: str | None = None, interval: int | None = None, converter: Any = "auto",
                 dtype: Any = None, max_shard_size: int | str = "5GB", keep_last: int | None = None,
                 tokenizer: Any = None, background: bool = True, when_busy: str = "queue",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        allow_mmengine_checkpoint_globals()  # so that mmengine can resume from our checkpoints
        if interval is not None and interval < 1:
            raise BadValueError(f"HFExportHook interval must be a positive number of iterations, got {interval}")
        if keep_last is not None and keep_last < 1:
            raise BadValueError(f"HFExportHook keep_last must be at least 1 (or None to keep all), got {keep_last}")
        if when_busy not in WHEN_BUSY:
            raise BadValueError(f"HFExportHook when_busy must be one of {', '.join(WHEN_BUSY)}, got {when_busy!r}")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise BadValueError(f"HFExportHook timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.timeout_s, self.background, self.when_busy = float(timeout_s), background_choice(background), when_busy
        self.out_dir, self.interval, self.converter, self.dtype = out_dir, interval, converter, dtype
        self.max_shard_size, self.keep_last, self.tokenizer = max_shard_size, keep_last, tokenizer
        self._last_exported_iter: int | None = None
        self._baseline: dict = {}
        self._keep: int | None = keep_last  # what prune_snapshots keeps; before_train may follow max_keep_ckpts

    # -- timing: the checkpoint schedule (or our interval), on every rank -----------------------
    def before_train(self, runner) -> None:
        self._baseline, _, _ = ensure_baseline(runner)  # collective under ZeRO-3
        reserve_staging(unwrapped_model(runner), self.dtype)  # the pinned buffer, as large as the largest tensor
        background_exports(runner).prepare(runner, unwrapped_model(runner), self.background, self.when_busy,
                                           self.timeout_s)
        self._keep = snapshot_keep_last(runner, self.keep_last, at_checkpoints=self.interval is None)
        if self.interval is None and not has_checkpoint_schedule(runner):
            runner.logger.warning("[sa2va_hooks] HFExportHook exports at checkpoints, but this run has no "
                                  "CheckpointHook with a positive interval: it will export nothing. Set "
                                  "HFExportHook(interval=N) to export every N iterations.")
        if is_main_process():
            remove_stale_staging(export_root(runner, self.out_dir),
                                 log=lambda msg: runner.logger.warning(f"[sa2va_hooks] {msg}"))
        if isinstance(self.tokenizer, dict):
            self.tokenizer = build_callable_cfg(self.tokenizer)
        self._converter = self._resolve_converter(runner)
        if self.interval is None:
            catch_up_after_resume(runner, export_root(runner, self.out_dir),
                                  export=lambda: self._export_at(runner, {"iter": runner.iter, "epoch": runner.epoch}))

    def _resolve_converter(self, runner):
        """The converter, resolved and checked once, before the first step, on every rank (all stop,
        or none): a missing hf_code_dir, a template the remote code does not know or a tokenizer
        without the model's added tokens stops the run here, naming the option to set, instead of
        failing every export hours later. The run config's top-level ``template`` and ``tokenizer``
        are the defaults (the model's own tokenizer wins over the latter)."""
        spec = self.converter
        if self.tokenizer is not None:
            spec = {**(spec if isinstance(spec, dict) else {"type": spec}), "tokenizer": self.tokenizer}
        tok_cfg, template, model = runner.cfg.get("tokenizer"), runner.cfg.get("template"), unwrapped_model(runner)
        tokenizer = (lambda: build_callable_cfg(tok_cfg)) if tok_cfg is not None else None
        conv = on_every_rank(lambda: converter_for_run(spec, model, template=template, tokenizer=tokenizer),
                             "HFExportHook's check of its converter, before training")  # all stop, or none
        runner.logger.info(f"[sa2va_hooks] HFExportHook converter: {conv.describe(model)}")
        return conv

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        due = (self.every_n_train_iters(runner, self.interval) if self.interval is not None
               else checkpoint_due(runner, "iter"))
        if due:
            it, epoch = checkpoint_point(runner, "iter")
            self._export_at(runner, {"iter": it, "epoch": epoch})

    def after_train_epoch(self, runner) -> None:
        if self.interval is None and checkpoint_due(runner, "epoch"):
            it, epoch = checkpoint_point(runner, "epoch")
            self._export_at(runner, {"iter": it, "epoch": epoch})

    def after_train(self, runner) -> None:  # also after_run: the run ends with no export in flight
        background_exports(runner).finish(runner)

    after_run = after_train

    # -- the export ---------------------------------------------------------------------------
    def _export_at(self, runner, point: dict) -> None:
        """Every rank comes here at the same point and takes part (the export is collective). In the
        background modes one agreement comes first, in the training thread (``admit``), so that every
        rank queues, waits or skips this export alike and all enter the same collectives after it."""
        if point["iter"] == self._last_exported_iter:
            return
        self._last_exported_iter = point["iter"]
        out, bg = export_root(runner, self.out_dir) / f"iter_{point['iter']}", background_exports(runner)
        try:
            if bg.enabled:
                busy = bg.admit(runner, point["iter"])  # collective: every rank queues, waits or skips alike
                if busy:
                    return log_skipped(runner, point["iter"], busy, bg.running(), bg.when_busy, self.timeout_s)
            try:  # this rank's options; a failure is agreed on with the export's own preparation
                options, failed = self._options(runner, point, out), None
            except Exception as e:  # noqa: BLE001 - every rank must learn of it (background modes)
                options, failed = {}, e
            if bg.enabled:
                options.update(bg.start_options(runner, point["iter"]))
            converter = getattr(self, "_converter", None) or self._resolve_converter(runner)  # agreed: all or none
            handle = start_checkpoint_export(
                unwrapped_model(runner), out, converter=converter, mode="auto" if bg.enabled else "sync",
                failed=failed, on_done=lambda h: self._done(runner, point, h),
                label=f"preparing the export of iteration {point['iter']}", **options)
            if not handle.background:
                return report_export(runner, out, point, handle.manifest, f"in {handle.seconds:.2f}s (training waited)",
                                     self._keep)
            ahead = bg.started(handle)  # the export this one is queued behind, if any
            paused = handle.run_front()  # gathered: the gathers, collective; else nothing left to do
            runner.logger.info(f"[sa2va_hooks] export of iter {point['iter']} to {out}"
                               f"{describe_start(handle.mode, ahead, paused)}")
        except Exception as e:  # noqa: BLE001 - an export must never stop training
            log_failed(runner, point["iter"], out, e)

    def _options(self, runner, point: dict, out: Path) -> dict:
        ckpt = runner.message_hub.get_info("last_ckpt") if self.interval is None else None
        provenance = {"iteration": point["iter"], "epoch": point["epoch"], "work_dir": str(runner.work_dir),
                      "config_sha256": config_sha256(runner), "checkpoint": str(ckpt) if ckpt else None,
                      "exported_by": "HFExportHook"}
        shared = process_state(runner).get(CURRENT_TRAINED_KEY) or {}
        previous = complete_snapshots(out.parent, but=out)  # its same frozen shards are hard-linked
        return dict(dtype=self.dtype, max_shard_size=self.max_shard_size, provenance=provenance,
                    baseline=self._baseline, overwrite=True, link_from=previous[-1][1] if previous else None,
                    trained=shared.get("trained") if shared.get("iter") == point["iter"] else None)

    def _done(self, runner, point: dict, handle) -> None:
        """On the export's thread, when it ends: the log line, then retention (rank 0)."""
        if isinstance(handle.error, FrontFailedError):
            return  # the training thread logged it
        if handle.error is not None:
            return log_failed(runner, point["iter"], handle.out_dir, handle.error)
        how = f"in the background in {handle.seconds:.2f}s"
        if not threading.main_thread().is_alive():
            how += " (training had already ended: the export was finished before the process exits)"
        report_export(runner, handle.out_dir, point, handle.manifest, how, self._keep)
