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
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..compat import allow_mmengine_checkpoint_globals
from ..core.manifest import MANIFEST_FILE
from ..export import export_hf
from .common import (CURRENT_TRAINED_KEY, build_callable_cfg, checkpoint_due, checkpoint_point, config_sha256,
                     ensure_baseline, has_checkpoint_schedule, process_state, unwrapped_model)

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
        keep_last: keep only the newest N snapshots written here (None keeps all).
        tokenizer: a tokenizer, a path, or an mmengine config dict to build one; the model's
            ``tokenizer`` attribute is used when absent.
    """

    priority = "LOWEST"  # after CheckpointHook, so the checkpoint path is known

    def __init__(self, out_dir: str | None = None, interval: int | None = None, converter: Any = "auto",
                 dtype: Any = None, max_shard_size: int | str = "5GB", keep_last: int | None = None,
                 tokenizer: Any = None) -> None:
        allow_mmengine_checkpoint_globals()  # so that mmengine can resume from our checkpoints
        if interval is not None and interval < 1:
            raise ValueError(f"HFExportHook interval must be a positive number of iterations, got {interval}")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"HFExportHook keep_last must be at least 1 (or None to keep all), got {keep_last}")
        self.out_dir = out_dir
        self.interval = interval
        self.converter = converter
        self.dtype = dtype
        self.max_shard_size = max_shard_size
        self.keep_last = keep_last
        self.tokenizer = tokenizer
        self._last_exported_iter: int | None = None
        self._baseline: dict = {}

    # -- timing: the checkpoint schedule (or our interval), on every rank -----------------------
    def before_train(self, runner) -> None:
        self._baseline, _, _ = ensure_baseline(runner)  # collective under ZeRO-3
        if self.interval is None and not has_checkpoint_schedule(runner):
            runner.logger.warning("[sa2va_hooks] HFExportHook exports at checkpoints, but this run has no "
                                  "CheckpointHook with a positive interval: it will export nothing. Set "
                                  "HFExportHook(interval=N) to export every N iterations.")
        self._remove_stale_staging(runner)
        if isinstance(self.tokenizer, dict):
            self.tokenizer = build_callable_cfg(self.tokenizer)

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

    # -- the export ---------------------------------------------------------------------------
    def _export_at(self, runner, point: dict) -> None:
        """Every rank comes here at the same point and takes part (export_hf is collective)."""
        if point["iter"] == self._last_exported_iter:
            return
        self._last_exported_iter = point["iter"]
        root = Path(self.out_dir) if self.out_dir else Path(runner.work_dir) / "hf"
        out = root / f"iter_{point['iter']}"
        try:
            self._export(runner, out, point)
        except Exception as e:  # noqa: BLE001 - an export must never stop training
            runner.logger.error(f"[sa2va_hooks] HF export of iteration {point['iter']} to {out} FAILED; training "
                                f"continues and earlier snapshots are untouched. Cause: {type(e).__name__}: {e}")
            runner.logger.debug(traceback.format_exc())

    def _export(self, runner, out: Path, point: dict) -> None:
        t0 = time.perf_counter()
        ckpt = runner.message_hub.get_info("last_ckpt") if self.interval is None else None
        provenance = {"iteration": point["iter"], "epoch": point["epoch"], "work_dir": str(runner.work_dir),
                      "config_sha256": config_sha256(runner), "checkpoint": str(ckpt) if ckpt else None,
                      "exported_by": "HFExportHook"}
        converter = self.converter
        if self.tokenizer is not None:
            converter = {**(converter if isinstance(converter, dict) else {"type": converter}),
                         "tokenizer": self.tokenizer}
        shared = process_state(runner).get(CURRENT_TRAINED_KEY) or {}
        trained = shared.get("trained") if shared.get("iter") == point["iter"] else None
        manifest = export_hf(unwrapped_model(runner), out, converter=converter, dtype=self.dtype,
                             max_shard_size=self.max_shard_size, provenance=provenance, baseline=self._baseline,
                             overwrite=True, trained=trained)
        effect = manifest.training_effect
        size = sum(f["size"] for f in manifest.files.values())
        runner.logger.info(
            f"[sa2va_hooks] exported iter {point['iter']} to {out} in {time.perf_counter() - t0:.2f}s: "
            f"{len(manifest.tensors)} tensors, {size} bytes, root {manifest.root_digest}, read back and verified; "
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

    def _remove_stale_staging(self, runner) -> None:
        """A process killed mid-export leaves ``iter_N.incomplete-*``; those are ours by name and
        never a finished snapshot, so they are removed (and said) when training starts again."""
        root = Path(self.out_dir) if self.out_dir else Path(runner.work_dir) / "hf"
        if not root.is_dir() or not is_main_process():
            return
        for stale in sorted(root.glob("iter_*.incomplete-*")):
            shutil.rmtree(stale, ignore_errors=True)
            runner.logger.warning(f"[sa2va_hooks] removed {stale}: an export interrupted by an earlier crash")

    def _prune(self, root: Path, keep: Path) -> None:
        if self.keep_last is None:
            return
        snaps = sorted((int(m.group(1)), p) for p in root.iterdir()
                       if (m := _ITER_DIR.match(p.name)) and (p / MANIFEST_FILE).is_file())
        for _, p in snaps[:-self.keep_last]:
            if p != keep:
                shutil.rmtree(p)
