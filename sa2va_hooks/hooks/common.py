"""Runner-state helpers shared by the hooks (the only place that knows mmengine's internals)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from mmengine.hooks import CheckpointHook
from mmengine.model import is_model_wrapper
from torch import nn

from ..core.fingerprint import Fingerprint
from ..core.dist import DEFAULT_TIMEOUT_S, RankGroup
from ..core.sharding import is_fsdp_module
from ..core.snapshot import Capture, SnapshotBuffers
from ..export import frozen_root, trained_fingerprints
from ..records import (BASELINE_KEY, CHECKPOINT_RECORD_KEY, FROZEN_ROOT_KEY, META_KEY,  # noqa: F401 - re-exported
                       build_callable_cfg)

from ..core.vocab import SIDECAR_SUFFIX

# trained fingerprints FingerprintHook computed at this iteration's checkpoint, handed to
# HFExportHook so the same tensors are not hashed twice; process-local (process_state)
CURRENT_TRAINED_KEY = "current_trained"
_FROZEN_NOW_KEY = "frozen_root_this_process"  # computed once per process


def process_state(runner) -> dict:
    """State the hooks share within this process only. Not message_hub: even a non-resumed key
    there is listed in every checkpoint, and mmengine warns about each such key on resume."""
    return runner.__dict__.setdefault("_sa2va_hooks_process_state", {})


def unwrapped_model(runner) -> nn.Module:
    """The user's model inside DDP, mmengine's DeepSpeed wrapper and the DeepSpeed engine. An FSDP
    root is returned as it is: the exporter treats its wrappers as transparent and gathers
    through its units."""
    model = runner.model
    for _ in range(4):
        if is_fsdp_module(model):  # kept: its units gather the shards (core/sharding.py)
            break
        if is_model_wrapper(model) or type(model).__name__ == "DeepSpeedEngine":
            model = getattr(model, "module", None) or model.model
        else:
            break
    return model


def config_sha256(runner) -> str | None:
    cfg = getattr(runner, "cfg", None)
    if cfg is None:
        return None
    filename = getattr(cfg, "filename", None)
    if filename and Path(filename).is_file():
        return hashlib.sha256(Path(filename).read_bytes()).hexdigest()
    return hashlib.sha256(cfg.pretty_text.encode()).hexdigest()


def _checkpoint_hook(runner) -> CheckpointHook | None:
    return next((h for h in runner.hooks if isinstance(h, CheckpointHook)), None)


def checkpoint_dir(runner) -> Path:
    """Where this run's CheckpointHook writes (its ``out_dir``, set in its ``before_train``, which
    runs before HFExportHook's), else the work dir."""
    hook = _checkpoint_hook(runner)
    out = getattr(hook, "out_dir", None) if hook is not None else None
    return Path(out) if isinstance(out, (str, Path)) else Path(runner.work_dir)


def max_keep_ckpts(runner) -> int | None:
    """CheckpointHook's ``max_keep_ckpts`` when it removes older checkpoints (> 0), else None."""
    hook = _checkpoint_hook(runner)
    n = getattr(hook, "max_keep_ckpts", None) if hook is not None else None
    return n if isinstance(n, int) and n > 0 else None


def snapshot_keep_last(runner, keep_last: int | None, at_checkpoints: bool) -> int | None:
    """How many snapshots HFExportHook keeps (``keep_last`` pruning, writer.remove_snapshot): the
    user's ``keep_last`` when set; else, when the snapshots are taken at the checkpoints and
    CheckpointHook keeps only its newest ``max_keep_ckpts``, that many, said once in the log (a
    snapshot is its checkpoint's HF form and goes with it); else None (keep all). Exports on an
    ``interval`` of their own are not tied to checkpoints and do not follow it."""
    if keep_last is not None or not at_checkpoints:
        return keep_last
    n = max_keep_ckpts(runner)
    if n is not None:
        runner.logger.info(f"[sa2va_hooks] keep_last follows CheckpointHook max_keep_ckpts={n}; pass keep_last=N to "
                           f"choose. HF snapshots older than the newest {n} are removed, as their checkpoints are.")
    return n




def orphan_sidecars(runner, ckpt_dir: Path) -> list[tuple[Path, str]]:
    """FingerprintHook's sidecars in ``ckpt_dir`` whose checkpoint CheckpointHook removed
    (``max_keep_ckpts``): (sidecar, checkpoint name). Only when CheckpointHook removes checkpoints at
    all, only names of CheckpointHook's own form plus our suffix (``iter_2.pth.fingerprints.json``),
    only when nothing exists under the checkpoint's name (a file or a DeepSpeed directory), and only
    files whose content says they are our sidecar of that checkpoint."""
    hook = _checkpoint_hook(runner)
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


def has_checkpoint_schedule(runner) -> bool:
    """CheckpointHook saves at all: a positive interval, or only the last checkpoint (save_last)."""
    hook = _checkpoint_hook(runner)
    return hook is not None and ((hook.interval or 0) > 0 or bool(hook.save_last))


def checkpoint_due(runner, stage: str) -> bool:
    """Whether CheckpointHook saves (or just saved) a checkpoint at this point of training:
    its own rule (``interval``, ``by_epoch``, ``save_begin``, ``save_last``), evaluated on every
    rank from the loop counters alone, so all ranks agree without talking. ``stage`` is "iter"
    (after_train_iter) or "epoch" (after_train_epoch). This does not depend on
    ``before_save_checkpoint``, which DeepSpeedStrategy never calls."""
    hook = _checkpoint_hook(runner)
    if hook is None:
        return False
    if stage == "iter":
        return not hook.by_epoch and (hook.every_n_train_iters(runner, hook.interval, hook.save_begin) or
                                      (hook.save_last and hook.is_last_train_iter(runner)))
    return bool(hook.by_epoch) and (hook.every_n_epochs(runner, hook.interval, hook.save_begin) or
                                    (hook.save_last and hook.is_last_train_epoch(runner)))


def checkpoint_point(runner, stage: str) -> tuple[int, int]:
    """(iter, epoch) as CheckpointHook writes them into the meta of a checkpoint saved here."""
    return (runner.iter + 1, runner.epoch) if stage == "iter" else (runner.iter, runner.epoch + 1)


def ensure_baseline(runner) -> tuple[dict[str, Fingerprint], str, str | None]:
    """Record, once per run (kept across resume by message_hub), what the trainable parameters
    were before training and the root digest of the frozen ones. Collective under ZeRO-3: every
    rank calls it from ``before_train``.

    Returns (baseline, frozen root now, frozen root recorded at the first start or None).
    """
    model = unwrapped_model(runner)
    hub = runner.message_hub
    local = process_state(runner)
    frozen_now = local.get(_FROZEN_NOW_KEY)
    if frozen_now is None:
        frozen_now = local[_FROZEN_NOW_KEY] = frozen_root(model)
    recorded_frozen = hub.get_info(FROZEN_ROOT_KEY)
    if recorded_frozen is None:
        hub.update_info(FROZEN_ROOT_KEY, frozen_now)
    stored = hub.get_info(BASELINE_KEY)
    if stored is None:
        baseline = trained_fingerprints(model).tensors
        hub.update_info(BASELINE_KEY, {k: v.to_json() for k, v in baseline.items()})
    else:
        baseline = {k: Fingerprint.from_json(v) for k, v in stored.items()}
    return baseline, frozen_now, recorded_frozen


class BackgroundExports:
    """This process's background-export state, shared by both hooks (``process_state``): the
    reused capture buffers, the capture FingerprintHook took at this checkpoint (HFExportHook
    exports that same capture, so the trainable tensors are copied once), the export in flight
    (one at most) and the gloo group the export threads talk over."""

    def __init__(self) -> None:
        self.enabled = False
        self.when_busy = "wait"
        self.buffers = SnapshotBuffers()
        self.capture: Capture | None = None
        self.capture_iter: int | None = None
        self.job = None  # ExportJob in flight or finished
        self.group: RankGroup | None = None
        self.timeout_s = DEFAULT_TIMEOUT_S  # the longest training waits for an export, and a rank for another

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.running

    def wait(self, runner, why: str, timeout: float | None = None) -> bool:
        """Wait for the export in flight, at most ``timeout`` seconds; True when none is running
        any more. The wait is logged when there was one."""
        if not self.busy:
            return True
        t0 = time.perf_counter()
        done = self.job.wait(timeout)
        waited = time.perf_counter() - t0
        if done:
            runner.logger.info(f"[sa2va_hooks] waited {waited:.2f}s for the background export to {self.job.out_dir} "
                               f"to finish ({why})")
        else:
            runner.logger.error(f"[sa2va_hooks] the background export to {self.job.out_dir} is still running after "
                                f"{waited:.0f}s ({why}); training does not wait longer for it")
        return done


def background_exports(runner) -> BackgroundExports:
    state = process_state(runner)
    if "background" not in state:
        state["background"] = BackgroundExports()
    return state["background"]
