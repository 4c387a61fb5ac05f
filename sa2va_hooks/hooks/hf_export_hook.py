"""HFExportHook: a verified HF snapshot of the in-memory model at each checkpoint.

Thin by design: it reads runner state, decides when, and calls ``export_hf``. It never raises
into the training loop (a failed export is logged as an error and training goes on), and it
never changes a model parameter: the merge is out of place.

When: in ``after_train_iter`` / ``after_train_epoch`` on every rank, just after CheckpointHook
(priority LOWEST), whenever CheckpointHook's own schedule says it saved (or every ``interval``
iterations). Under every runner and strategy (single process, DDP, DeepSpeed ZeRO-1/2/3, FSDP)
every rank calls the collective ``export_hf``: the shards are split between the ranks, and a
failure on any rank is one error on every rank, with nothing published.
"""
from __future__ import annotations

import re
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..compat import allow_mmengine_checkpoint_globals
from ..core.dist import DEFAULT_TIMEOUT_S, RankGroup, agree
from ..core.manifest import MANIFEST_FILE
from ..core.sharding import needs_gather
from ..core.publish import clean_leftovers, remove_snapshot
from ..core.shards import parse_size
from ..converters.base import converter_for_run
from ..export import FrontFailedError, export_hf, prepare_background_export, prepare_gathered_export, reserve_staging
from .common import (CURRENT_TRAINED_KEY, background_exports, build_callable_cfg, checkpoint_dir, checkpoint_due,
                     checkpoint_point, config_sha256, ensure_baseline, has_checkpoint_schedule, process_state,
                     unwrapped_model)
from .common import snapshot_keep_last
from ..core.errors import BadValueError

_ITER_DIR = re.compile(r"^iter_(\d+)$")


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
        background: export on a background thread (the default). Training pauses only while
            the trainable tensors are copied into reused host buffers; the frozen rest is read,
            merged, written, read back and verified while training goes on, and the snapshot
            holds exactly the weights of its checkpoint iteration. ``False`` exports
            synchronously, training waiting until the snapshot is published. Under ZeRO-3 and
            FSDP (partitioned parameters) the export is always synchronous: only a collective
            gather, in the training thread, can read those parameters.
        when_busy: what a checkpoint does while the previous background export is still
            running: ``"wait"`` for it (then export this one), or ``"skip"`` this export. Logged
            either way. Training never waits longer than ``timeout_s``: past it this checkpoint's
            export is skipped, saying which rank's export is still running.
        timeout_s: the longest a rank's background export waits for another rank at one step
            (a stuck or dead rank is named, the export abandoned on every rank, nothing
            published), and the longest training waits for an export in flight. Default 600 s.
    """

    priority = "LOWEST"  # after CheckpointHook, so the checkpoint path is known

    def __init__(self, out_dir: str | None = None, interval: int | None = None, converter: Any = "auto",
                 dtype: Any = None, max_shard_size: int | str = "5GB", keep_last: int | None = None,
                 tokenizer: Any = None, background: bool = True, when_busy: str = "wait",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        allow_mmengine_checkpoint_globals()  # so that mmengine can resume from our checkpoints
        if interval is not None and interval < 1:
            raise BadValueError(f"HFExportHook interval must be a positive number of iterations, got {interval}")
        if keep_last is not None and keep_last < 1:
            raise BadValueError(f"HFExportHook keep_last must be at least 1 (or None to keep all), got {keep_last}")
        if when_busy not in ("wait", "skip"):
            raise BadValueError(f"HFExportHook when_busy must be 'wait' or 'skip', got {when_busy!r}")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise BadValueError(f"HFExportHook timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.background = background
        self.when_busy = when_busy
        self.out_dir = out_dir
        self.interval = interval
        self.converter = converter
        self.dtype = dtype
        self.max_shard_size = max_shard_size
        self.keep_last = keep_last
        self.tokenizer = tokenizer
        self._last_exported_iter: int | None = None
        self._baseline: dict = {}
        self._keep: int | None = keep_last  # what _prune keeps; before_train may follow max_keep_ckpts

    # -- timing: the checkpoint schedule (or our interval), on every rank -----------------------
    def before_train(self, runner) -> None:
        self._baseline, _, _ = ensure_baseline(runner)  # collective under ZeRO-3
        self._prepare_background(runner)
        self._keep = snapshot_keep_last(runner, self.keep_last, at_checkpoints=self.interval is None)
        if self.interval is None and not has_checkpoint_schedule(runner):
            runner.logger.warning("[sa2va_hooks] HFExportHook exports at checkpoints, but this run has no "
                                  "CheckpointHook with a positive interval: it will export nothing. Set "
                                  "HFExportHook(interval=N) to export every N iterations.")
        self._remove_stale_staging(runner)
        if isinstance(self.tokenizer, dict):
            self.tokenizer = build_callable_cfg(self.tokenizer)
        self._converter = self._resolve_converter(runner)
        self._catch_up_after_resume(runner)

    def _catch_up_after_resume(self, runner) -> None:
        """A run stopped while an export was in flight (killed, crashed, preempted) left that
        checkpoint without a snapshot. On resume the model holds exactly the resumed checkpoint's
        weights, so a missing snapshot of it is exported now (every rank is here); an earlier
        checkpoint without one is named in the log with the command that exports it. Only for
        checkpoints of this run's own checkpoint directory: a run started from another run's
        checkpoint did not miss its export."""
        ckpt_dir = checkpoint_dir(runner)
        if self.interval is not None or runner.iter <= 0 or not (ckpt_dir / f"iter_{runner.iter}.pth").exists():
            return
        root = Path(self.out_dir) if self.out_dir else Path(runner.work_dir) / "hf"
        have = {int(m.group(1)) for p in (root.iterdir() if root.is_dir() else ())
                if (m := _ITER_DIR.match(p.name)) and (p / MANIFEST_FILE).is_file()}
        if runner.iter not in have:
            runner.logger.warning(f"[sa2va_hooks] resumed at iteration {runner.iter}, whose checkpoint has no "
                                  f"snapshot in {root} (its export did not finish before the run stopped): "
                                  "exporting it now, from the resumed weights")
            self._export_at(runner, {"iter": runner.iter, "epoch": runner.epoch})
        newest = max(have, default=-1)
        for ckpt in _checkpoints_between(ckpt_dir, newest, runner.iter):
            runner.logger.warning(
                f"[sa2va_hooks] checkpoint {ckpt} has no snapshot in {root} (the run stopped before its export "
                f"finished). Export it with: python tools/export.py CONFIG {ckpt} --out {root / ckpt.stem}")

    def _resolve_converter(self, runner):
        """The converter, resolved and checked once, before the first step: a missing hf_code_dir, a
        template the remote code does not know or a tokenizer without the model's added tokens stops
        the run here, naming the option to set, instead of failing every export hours later. The
        run config's top-level ``template`` and ``tokenizer`` are the defaults (the model's own
        tokenizer wins over the latter)."""
        spec = self.converter
        if self.tokenizer is not None:
            spec = {**(spec if isinstance(spec, dict) else {"type": spec}), "tokenizer": self.tokenizer}
        tok_cfg = runner.cfg.get("tokenizer")
        conv, error = None, None
        try:
            conv = converter_for_run(spec, unwrapped_model(runner), template=runner.cfg.get("template"),
                                     tokenizer=(lambda: build_callable_cfg(tok_cfg)) if tok_cfg is not None else None)
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, below
            error = e
        # every rank stops, or none: a rank that alone saw a problem (a path missing on its node) would
        # otherwise leave the others waiting in training's first collective
        agree(RankGroup.current(), error, "HFExportHook's check of its converter, before training")
        runner.logger.info(f"[sa2va_hooks] HFExportHook converter: {conv.describe(unwrapped_model(runner))}")
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

    def after_train(self, runner) -> None:
        self._finish_background(runner)

    def after_run(self, runner) -> None:
        self._finish_background(runner)

    # -- background exports ------------------------------------------------------------------
    def _prepare_background(self, runner) -> None:
        """Prepay what the first export would otherwise pay: the pinned staging buffer (as large
        as the largest tensor), the capture buffers (allocated and touched once, pinned on a GPU)
        and the gloo group the export threads talk over (collective: every rank is here)."""
        bg = background_exports(runner)
        model = unwrapped_model(runner)
        reserve_staging(model, self.dtype)
        bg.enabled = self.background
        bg.when_busy = self.when_busy
        bg.timeout_s = self.timeout_s
        if not bg.enabled:
            return
        if bg.group is None:
            bg.group = RankGroup.background(self.timeout_s)
        if needs_gather(model):
            runner.logger.info("[sa2va_hooks] parameters are partitioned (DeepSpeed ZeRO-3 or FSDP): at each export "
                               "the training thread gathers them (collective) and copies them to the host; the "
                               "writing, read-back and publishing run in the background")
            return
        t0 = time.perf_counter()
        allocated = bg.buffers.prepare(model)
        runner.logger.info(f"[sa2va_hooks] background export: {allocated} bytes of capture buffers for the trainable "
                           f"tensors allocated in {time.perf_counter() - t0:.2f}s; when an export is still running "
                           f"at the next checkpoint: {self.when_busy}")

    def _finish_background(self, runner) -> None:
        """After the last iteration: wait for the export in flight, so the run ends with its
        snapshot published (or its failure logged), and no thread outlives the run."""
        bg = background_exports(runner)
        if not bg.wait(runner, "training ended", bg.timeout_s):
            runner.logger.error(f"[sa2va_hooks] the process waits for the export to {bg.job.out_dir} at exit (it is "
                                "not a daemon thread); if it is stopped first, that checkpoint has no snapshot: "
                                "export it with tools/export.py")
        bg.capture, bg.capture_iter = None, None

    # -- the export ---------------------------------------------------------------------------
    def _export_at(self, runner, point: dict) -> None:
        """Every rank comes here at the same point and takes part (export_hf is collective)."""
        if point["iter"] == self._last_exported_iter:
            return
        self._last_exported_iter = point["iter"]
        root = Path(self.out_dir) if self.out_dir else Path(runner.work_dir) / "hf"
        out = root / f"iter_{point['iter']}"
        try:
            if background_exports(runner).enabled:
                self._start_background(runner, out, point)
            else:
                self._export(runner, out, point)
        except Exception as e:  # noqa: BLE001 - an export must never stop training
            self._failed(runner, point, out, e)

    def _failed(self, runner, point: dict, out: Path, e: BaseException) -> None:
        runner.logger.error(f"[sa2va_hooks] HF export of iteration {point['iter']} to {out} FAILED; "
                            f"{_training_state()} and earlier snapshots are untouched. Cause: {type(e).__name__}: {e}")
        runner.logger.debug("".join(traceback.format_exception(e)))

    def _arguments(self, runner, point: dict) -> dict:
        ckpt = runner.message_hub.get_info("last_ckpt") if self.interval is None else None
        provenance = {"iteration": point["iter"], "epoch": point["epoch"], "work_dir": str(runner.work_dir),
                      "config_sha256": config_sha256(runner), "checkpoint": str(ckpt) if ckpt else None,
                      "exported_by": "HFExportHook"}
        converter = getattr(self, "_converter", None) or self._resolve_converter(runner)
        shared = process_state(runner).get(CURRENT_TRAINED_KEY) or {}
        trained = shared.get("trained") if shared.get("iter") == point["iter"] else None
        return dict(converter=converter, dtype=self.dtype, max_shard_size=self.max_shard_size, provenance=provenance,
                    baseline=self._baseline, overwrite=True, trained=trained)

    def _export(self, runner, out: Path, point: dict) -> None:
        t0 = time.perf_counter()
        manifest = export_hf(unwrapped_model(runner), out, link_from=self._link_source(out),
                             **self._arguments(runner, point))
        self._report(runner, out, point, manifest, f"in {time.perf_counter() - t0:.2f}s (training waited)")

    def _start_background(self, runner, out: Path, point: dict) -> None:
        """Capture now (or take FingerprintHook's capture of this very checkpoint), agree on every
        rank that the capture and the plan succeeded, then let a thread do the rest."""
        bg = background_exports(runner)
        if self.when_busy == "wait":
            bg.wait(runner, f"one export at a time; iteration {point['iter']} is due", bg.timeout_s)
        group = RankGroup.current()
        busy = [r for r, b in enumerate(group.all_gather(bg.busy)) if b]  # collective: all skip, or none
        if busy:
            self._skip(runner, point, busy)
            return
        if needs_gather(unwrapped_model(runner)):
            return self._start_gathered(runner, out, point)
        t0 = time.perf_counter()
        job, error = None, None
        try:
            model = unwrapped_model(runner)
            capture = bg.capture if bg.capture_iter == point["iter"] else None
            job = prepare_background_export(model, out, capture=capture, buffers=bg.buffers, group=bg.group,
                                            link_from=self._link_source(out),
                                            on_done=lambda j: self._done(runner, point, j),
                                            **self._arguments(runner, point))
        except Exception as e:  # noqa: BLE001 - every rank must learn of it before any thread starts
            error = e
        finally:
            bg.capture, bg.capture_iter = None, None
        agree(group, error, f"preparing the export of iteration {point['iter']}")
        paused = time.perf_counter() - t0
        job.task.provenance["training_paused_s"] = round(paused, 4)
        bg.job = job.start()
        runner.logger.info(f"[sa2va_hooks] export of iter {point['iter']} to {out} started in the background; "
                           f"training paused {paused:.3f}s for it")

    def _skip(self, runner, point: dict, busy: list[int]) -> None:
        running = background_exports(runner).job
        where = f"the export to {running.out_dir}" if running is not None and running.running else "an earlier export"
        ranks = ", ".join(map(str, busy))
        if self.when_busy == "skip":
            runner.logger.warning(f"[sa2va_hooks] HF export of iteration {point['iter']} SKIPPED: {where} is still "
                                  f"running on rank(s) {ranks} (HFExportHook(when_busy='skip')).")
        else:
            runner.logger.error(f"[sa2va_hooks] HF export of iteration {point['iter']} SKIPPED: {where} is still "
                                f"running on rank(s) {ranks} after {self.timeout_s:g}s (HFExportHook(timeout_s=...)); "
                                "training does not wait longer. Export this checkpoint later with tools/export.py.")

    def _start_gathered(self, runner, out: Path, point: dict) -> None:
        """ZeRO-3 / FSDP: the thread that writes starts first; then this (training) thread enters
        every gather with the other ranks and hands host copies to it, at most 1.5 x
        max_shard_size ahead of the writer. Training resumes once the gathers are done."""
        bg = background_exports(runner)
        group = RankGroup.current()
        t0 = time.perf_counter()
        job, error = None, None
        try:
            job = prepare_gathered_export(unwrapped_model(runner), out, group=bg.group,
                                          on_done=lambda j: self._done(runner, point, j),
                                          **self._arguments(runner, point))
        except Exception as e:  # noqa: BLE001 - every rank must learn of it before any thread starts
            error = e
        agree(group, error, f"preparing the export of iteration {point['iter']}")
        bg.job = job.start()
        job.task.gather_in_front(group, int(1.5 * parse_size(self.max_shard_size)))  # collective
        paused = time.perf_counter() - t0
        runner.logger.info(f"[sa2va_hooks] export of iter {point['iter']} to {out}: gathered in {paused:.3f}s "
                           "(training paused); writing in the background")

    def _done(self, runner, point: dict, job) -> None:
        """On the export's thread, when it ends: the log line, then retention (rank 0)."""
        if isinstance(job.error, FrontFailedError):
            return  # the training thread logged it
        if job.error is not None:
            self._failed(runner, point, job.out_dir, job.error)
            return
        how = f"in the background in {job.seconds:.2f}s"
        if not threading.main_thread().is_alive():
            how += " (training had already ended: the export was finished before the process exits)"
        self._report(runner, job.out_dir, point, job.manifest, how)

    def _report(self, runner, out: Path, point: dict, manifest, how: str) -> None:
        effect = manifest.training_effect
        size = sum(f["size"] for f in manifest.files.values())
        storage = manifest.storage
        runner.logger.info(
            f"[sa2va_hooks] exported iter {point['iter']} to {out} {how}: {len(manifest.tensors)} tensors, "
            f"{size} bytes ({storage.get('bytes_written', size)} written, {storage.get('bytes_linked', 0)} hard-linked "
            f"from the previous snapshot), root {manifest.root_digest}, read back and verified; "
            f"{effect['trained_differ_from_base']}/{effect['trained_tensors']} trained tensors differ from the base, "
            f"max relative LoRA delta {effect['lora_rel_delta_max']}")
        for note in manifest.notes:
            runner.logger.info(f"[sa2va_hooks] note: {note}")
        if effect["identical_to_base"] and point["iter"] > 0:
            runner.logger.error(
                f"[sa2va_hooks] export {out} is IDENTICAL to the base model at iteration {point['iter']}: none of its "
                f"{effect['trained_tensors']} trained tensors differs from the base after the cast to "
                f"{manifest.dtype}. Training did not reach these weights (learning rate 0, frozen by mistake, or "
                "deltas below the export dtype's resolution).")
        if is_main_process():
            self._prune(out.parent, keep=out)

    @staticmethod
    def _link_source(out: Path) -> Path | None:
        """The newest complete snapshot beside ``out`` (this run's previous export, also after a
        resume): its frozen shards are hard-linked when they are byte for byte the same."""
        if not out.parent.is_dir():
            return None
        snaps = sorted((int(m.group(1)), p) for p in out.parent.iterdir()
                       if (m := _ITER_DIR.match(p.name)) and p != out and (p / MANIFEST_FILE).is_file())
        return snaps[-1][1] if snaps else None

    def _remove_stale_staging(self, runner) -> None:
        """A process killed mid-export, mid-replace or mid-prune leaves ``iter_N.incomplete-*``,
        ``iter_N.old-*`` or ``iter_N.trash-*``; those are ours by name. When training starts again an
        interrupted replace is undone and the rest removed, each said in the log."""
        root = Path(self.out_dir) if self.out_dir else Path(runner.work_dir) / "hf"
        if not is_main_process():
            return
        clean_leftovers(root, owns=lambda name: bool(_ITER_DIR.match(name)),
                        log=lambda msg: runner.logger.warning(f"[sa2va_hooks] {msg}"))

    def _prune(self, root: Path, keep: Path) -> None:
        if self._keep is None:
            return
        snaps = sorted((int(m.group(1)), p) for p in root.iterdir()
                       if (m := _ITER_DIR.match(p.name)) and (p / MANIFEST_FILE).is_file())
        for _, p in snaps[:-self._keep]:
            if p != keep:
                remove_snapshot(p)


def _training_state() -> str:
    """What training is doing while an export's outcome is logged: an export thread can outlive
    a crashed or interrupted training loop (it is finished before the process exits)."""
    if threading.main_thread().is_alive():
        return "training continues"
    return "training has already ended (its main thread exited: an exception or an interrupt)"


def _checkpoints_between(folder: Path, after: int, before: int) -> list[Path]:
    """mmengine's ``iter_N.pth`` (a file, or a DeepSpeed directory) in ``folder`` with
    ``after < N < before``."""
    found = []
    for p in (folder.iterdir() if folder.is_dir() else ()):
        m = re.match(r"^iter_(\d+)\.pth$", p.name)
        if m and after < int(m.group(1)) < before:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]
