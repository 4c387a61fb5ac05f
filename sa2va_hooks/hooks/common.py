"""Runner-state helpers shared by the hooks (the only place that knows mmengine's internals), and
the snapshot-folder rules both hooks follow (names, retention, leftovers)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.model import is_model_wrapper
from torch import nn

from ..compat import allow_mmengine_checkpoint_globals  # noqa: F401 - re-exported for the hooks
from ..core.dist import DEFAULT_TIMEOUT_S, RankGroup
from ..core.errors import BadValueError
from ..core.sharding import is_fsdp_module
from ..core.vocab import SIDECAR_SUFFIX  # noqa: F401 - re-exported
from ..core.checkpoint_export import ExportHandle
from ..export import (MANIFEST_FILE, Capture, Fingerprint, HostProcess, PieceExchange, SnapshotBuffers,
                      checkpoint_export_mode,
                      clean_leftovers, frozen_root, partition_support, remove_snapshot, trained_fingerprints)
from ..core.fingerprint import DIGEST_ALGORITHM
from ..core.vocab import DIGEST_V1
from ..records import (BASELINE_KEY, CHECKPOINT_RECORD_KEY, FROZEN_ROOT_ALGORITHM_KEY,  # noqa: F401 - re-exported
                       FROZEN_ROOT_KEY, META_KEY, build_callable_cfg)

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


def checkpoint_hook(runner) -> CheckpointHook | None:
    return next((h for h in runner.hooks if isinstance(h, CheckpointHook)), None)


def checkpoint_dir(runner) -> Path:
    """Where this run's CheckpointHook writes (its ``out_dir``, set in its ``before_train``, which
    runs before HFExportHook's), else the work dir."""
    hook = checkpoint_hook(runner)
    out = getattr(hook, "out_dir", None) if hook is not None else None
    return Path(out) if isinstance(out, (str, Path)) else Path(runner.work_dir)


def max_keep_ckpts(runner) -> int | None:
    """CheckpointHook's ``max_keep_ckpts`` when it removes older checkpoints (> 0), else None."""
    hook = checkpoint_hook(runner)
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


def has_checkpoint_schedule(runner) -> bool:
    """CheckpointHook saves at all: a positive interval, or only the last checkpoint (save_last)."""
    hook = checkpoint_hook(runner)
    return hook is not None and ((hook.interval or 0) > 0 or bool(hook.save_last))


def checkpoint_due(runner, stage: str) -> bool:
    """Whether CheckpointHook saves (or just saved) a checkpoint at this point of training:
    its own rule (``interval``, ``by_epoch``, ``save_begin``, ``save_last``), evaluated on every
    rank from the loop counters alone, so all ranks agree without talking. ``stage`` is "iter"
    (after_train_iter) or "epoch" (after_train_epoch). This does not depend on
    ``before_save_checkpoint``, which DeepSpeedStrategy never calls."""
    hook = checkpoint_hook(runner)
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

    Returns (baseline, frozen root now, frozen root recorded at the first start or None). When the
    recorded root was made with an older digest algorithm (a run started before digest v2, resumed),
    "now" is recomputed in that algorithm too, so the two are comparable.
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
        hub.update_info(FROZEN_ROOT_ALGORITHM_KEY, DIGEST_ALGORITHM)
    else:
        if hub.get_info(FROZEN_ROOT_ALGORITHM_KEY) is None:  # recorded before digest v2 named it
            hub.update_info(FROZEN_ROOT_ALGORITHM_KEY, DIGEST_V1)
        if hub.get_info(FROZEN_ROOT_ALGORITHM_KEY) != DIGEST_ALGORITHM:
            frozen_now = frozen_root(model, algorithm=hub.get_info(FROZEN_ROOT_ALGORITHM_KEY))
    stored = hub.get_info(BASELINE_KEY)
    if stored is None:
        baseline = trained_fingerprints(model).tensors
        hub.update_info(BASELINE_KEY, {k: v.to_json() for k, v in baseline.items()})
    else:
        baseline = {k: Fingerprint.from_json(v) for k, v in stored.items()}
    return baseline, frozen_now, recorded_frozen


WHEN_BUSY = ("queue", "wait", "skip")
BACKGROUND = (True, False, "process", "thread")


def background_choice(value) -> bool | str:
    """HFExportHook's ``background``: True (a process of its own hashes, writes and reads back when the
    model is on a GPU, threads otherwise), "process", "thread", or False (synchronous)."""
    if not (value is True or value is False or (isinstance(value, str) and value in BACKGROUND)):
        raise BadValueError(f"HFExportHook background must be True, False, 'process' or 'thread', got {value!r}")
    return value


def wants_host_process(background, model: nn.Module) -> bool:
    """Where the export's host work goes (decision 62): a process of its own for a model on a GPU,
    whose launch-bound training loop would wait for the GIL; threads on the CPU (no GPU to feed)."""
    if background in ("process", "thread"):
        return background == "process"
    forced = os.environ.get("SA2VA_HOOKS_HOST_PROCESS")  # "1" or "0": for background=True, whatever the device
    if forced in ("0", "1"):
        return forced == "1"
    return any(p.device.type == "cuda" for p in model.parameters())


@dataclasses.dataclass
class _Held:
    """An export that was started, and the buffer set its capture lives in until its thread ends."""

    handle: ExportHandle
    buffers: SnapshotBuffers | None
    it: int


class _Behind:
    """What a queued export's thread waits for: the export started before it, however that one
    ends. When the wait is over it says so in the log, from the queued export's own thread."""

    def __init__(self, runner, previous: _Held, it: int) -> None:
        self.runner, self.previous, self.it = runner, previous, it

    def wait(self, timeout: float | None = None) -> bool:
        t0 = time.perf_counter()
        done = self.previous.handle.wait(timeout)
        self.runner.logger.info(f"[sa2va_hooks] the queued export of iter {self.it} starts now: the export of iter "
                                f"{self.previous.it} ended ({'failed' if self.previous.handle.error else 'published'})"
                                f" after {time.perf_counter() - t0:.2f}s in the queue")
        return done


class BackgroundExports:
    """This process's background-export state, shared by both hooks (``process_state``): the
    reused capture buffers, the capture FingerprintHook took at this checkpoint (HFExportHook
    exports that same capture, so the trainable tensors are copied once), the exports in flight
    and the store group the export threads talk over.

    With ``when_busy="queue"`` at most two exports are in flight, the running one and one queued
    behind it, so there are two buffer sets (double buffering): each export holds the set its
    capture lives in until its thread ends, and a capture goes into the set no export holds. The
    other modes keep one set and one export in flight (decisions 31, 58)."""

    def __init__(self) -> None:
        self.enabled = False
        self.when_busy = "queue"
        self.buffer_sets = [SnapshotBuffers()]
        self.capture: Capture | None = None
        self.capture_iter: int | None = None
        self._capture_buffers: SnapshotBuffers | None = None
        self.job: ExportHandle | None = None  # the newest export (in flight or finished)
        self._held: list[_Held] = []  # the exports started and not known to have ended, oldest first
        self._room: tuple[int, list[int]] | None = None  # (iteration, busy ranks): agreed at this checkpoint
        self._slot: tuple[SnapshotBuffers | None, int] | None = None  # what the export being started holds
        self.group: RankGroup | None = None
        self.exchange: PieceExchange | None = None  # partitioned models: the gloo group exports assemble over
        self.fp_exchange: PieceExchange | None = None  # ... and the one the training thread's fingerprints use
        self.host: HostProcess | None = None  # hashes, writes and reads back (decision 62); None: threads do
        self.timeout_s = DEFAULT_TIMEOUT_S  # the longest training waits for an export, and a rank for another

    def prepare(self, runner, model: nn.Module, enabled: bool | str, when_busy: str, timeout_s: float) -> None:
        """HFExportHook's options, from its ``before_train`` (every rank). Prepays what the first
        export would otherwise pay: the capture buffers (two sets under "queue"), allocated and
        touched once (pinned on a GPU). The store group is made once per process and kept (not
        collective). A partitioned model is exported by gathers in the training thread, which
        cannot run behind another export: there "queue" waits, as "wait" does (said here)."""
        self.enabled, self.when_busy, self.timeout_s = bool(enabled), when_busy, timeout_s
        if not enabled:
            return
        if wants_host_process(enabled, model) and self.host is None:
            self.host = HostProcess()
            self.host.start()  # its imports go on while training starts; the first export waits for them
            runner.logger.info(f"[sa2va_hooks] background exports hash, write and read back in a process of their "
                               f"own (pid {self.host.pid})")
        if self.group is None:
            self.group = RankGroup.background(timeout_s)
        mode = checkpoint_export_mode(model)
        if mode == "partitioned" and self.exchange is None:  # collective: every rank's before_train
            # two gloo groups: the exports' threads assemble over one, the training thread's
            # fingerprints go over the other (a queued capture is fingerprinted while an export runs)
            self.exchange, self.fp_exchange = PieceExchange.create(timeout_s), PieceExchange.create(timeout_s)
        if mode == "gathered":
            self.when_busy = "wait" if when_busy == "queue" else when_busy
            runner.logger.warning("[sa2va_hooks] parameters are partitioned (DeepSpeed ZeRO-3 or FSDP) in a way whose "
                               f"pieces cannot be copied as they are ({partition_support(model)}): at each export "
                               "the training thread gathers them (collective) and copies them to the host; the "
                               "writing, read-back and publishing run in the background. When an export is still "
                               f"running at the next checkpoint: {self.when_busy}"
                               + (" (a gathered export cannot be queued)" if when_busy == "queue" else ""))
            return
        t0 = time.perf_counter()
        what = "this rank's partitions of the trainable tensors" if mode == "partitioned" else "the trainable tensors"
        while len(self.buffer_sets) < (2 if when_busy == "queue" else 1):
            self.buffer_sets.append(SnapshotBuffers())
        allocated = sum(b.prepare(model) for b in self.buffer_sets)
        sets = ("two sets (one export may be queued behind the running one)" if len(self.buffer_sets) == 2
                else "one set")
        runner.logger.info(f"[sa2va_hooks] background export: {allocated} bytes of capture buffers for {what}, "
                           f"{sets}, allocated in {time.perf_counter() - t0:.2f}s; when an export is still "
                           f"running at the next checkpoint: {when_busy}")

    def finish(self, runner) -> None:
        """After the last iteration: wait for the exports in flight (the newest, which a queued one
        waits for its predecessor in), so the run ends with their snapshots published (or their
        failures logged), and no thread outlives the run."""
        if not self.wait(runner, "training ended", self.timeout_s):
            runner.logger.error(f"[sa2va_hooks] the process waits for the export to {self.job.out_dir} at exit (it is "
                                "not a daemon thread); if it is stopped first, that checkpoint has no snapshot: "
                                "export it with tools/export.py")
        elif self.host is not None:  # no export uses it any more
            self.host.close()
            self.host = None
        self.capture, self.capture_iter, self._capture_buffers, self._room = None, None, None, None

    # -- which buffers a capture goes into ------------------------------------------------------
    def in_flight(self) -> list[_Held]:
        self._held = [h for h in self._held if h.handle.running]
        return list(self._held)

    def free_buffers(self) -> SnapshotBuffers | None:
        """A buffer set no export in flight holds (None when all are held): the one FingerprintHook's
        capture is in when that one is free, so the export uses that capture as it is."""
        held = {id(h.buffers) for h in self.in_flight()}
        free = [b for b in self.buffer_sets if id(b) not in held]
        return next((b for b in free if b is self._capture_buffers), free[0] if free else None)

    def capture_into(self, buffers: SnapshotBuffers, model: nn.Module, it: int) -> Capture:
        """FingerprintHook's capture of iteration ``it``, into ``buffers`` (a free set)."""
        self.capture, self.capture_iter, self._capture_buffers = None, None, None
        capture = buffers.capture(model, stats=True)
        self.capture, self.capture_iter, self._capture_buffers = capture, it, buffers
        return capture

    def take_capture(self, it: int, buffers: SnapshotBuffers | None = None) -> Capture | None:
        """FingerprintHook's capture when it is of iteration ``it`` (and in ``buffers``, when
        given), then used once; else None."""
        ok = self.capture_iter == it and (buffers is None or self._capture_buffers is buffers)
        capture = self.capture if ok else None
        self.capture, self.capture_iter, self._capture_buffers = None, None, None
        return capture

    # -- the decision at a checkpoint: the same on every rank -----------------------------------
    def room(self, runner, it: int) -> list[int]:
        """"queue": whether the export of iteration ``it`` may be queued, agreed by every rank
        (collective), once per checkpoint (FingerprintHook asks first, to capture; HFExportHook
        gets the same answer). Returns the ranks that still have two exports in flight (every
        rank skips this export when not empty). When some rank has two (one running, one queued),
        every rank first waits, at most ``timeout_s``, until it has one at most: that frees a
        buffer set and bounds training's wait and the memory."""
        if self._room is not None and self._room[0] == it:
            return self._room[1]
        group = RankGroup.current()
        counts = group.all_gather(len(self.in_flight()))
        if max(counts) >= 2:
            held = self.in_flight()
            if len(held) >= 2:
                self._wait_for(runner, held[0].handle, f"the export of iter {held[1].it} is queued behind it; "
                               f"iteration {it} is due", self.timeout_s)
            counts = group.all_gather(len(self.in_flight()))
        self._room = (it, [r for r, n in enumerate(counts) if n >= 2])
        return self._room[1]

    def admit(self, runner, it: int) -> list[int]:
        """HFExportHook's question before the export of iteration ``it`` (every rank, collective):
        the ranks that are busy, by ``when_busy``'s rule; every rank skips it when not empty."""
        if self.when_busy == "queue":
            return self.room(runner, it)
        if self.when_busy == "wait":
            self.wait(runner, f"one export at a time; iteration {it} is due", self.timeout_s)
        return self.busy_ranks()

    def start_options(self, runner, it: int) -> dict:
        """``start_checkpoint_export``'s options from here, for the export of iteration ``it`` that
        ``admit`` let through: the store group, a free buffer set and the capture in it, and under
        "queue" with an export still running, ``after`` it (its frozen shards are linked from that
        one's snapshot: it is the newest once this one runs)."""
        buffers = self.free_buffers()
        options = dict(group=self.group, buffers=buffers, capture=self.take_capture(it, buffers),
                       exchange=self.exchange, host=self.host)
        held = self.in_flight()
        if held:
            options.update(after=_Behind(runner, held[-1], it), link_from=held[-1].handle.out_dir)
        self._slot = (buffers, it)
        return options

    def started(self, handle: ExportHandle) -> _Held | None:
        """Record the export just started (it holds its buffer set until its thread ends); returns
        the export it is queued behind, if that one still runs."""
        buffers, it = self._slot or (None, -1)
        ahead = self.in_flight()
        self.job, self._slot = handle, None
        self._held.append(_Held(handle, buffers, it))
        return ahead[-1] if ahead else None

    def running(self) -> ExportHandle | None:
        """The oldest export still running (the one a checkpoint waits for), else None."""
        held = self.in_flight()
        return held[0].handle if held else self.job if self.busy else None

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.running

    def busy_ranks(self) -> list[int]:
        """The ranks whose export is still running. Collective (every rank calls it at the same
        point and gets the same list): all ranks skip an export, or none."""
        return [r for r, b in enumerate(RankGroup.current().all_gather(self.busy)) if b]

    def wait(self, runner, why: str, timeout: float | None = None) -> bool:
        """Wait for the exports in flight, at most ``timeout`` seconds; True when none is running
        any more. The wait is logged when there was one."""
        return not self.busy or self._wait_for(runner, self.job, why, timeout)

    @staticmethod
    def _wait_for(runner, handle: ExportHandle, why: str, timeout: float | None) -> bool:
        t0 = time.perf_counter()
        done = handle.wait(timeout)
        waited = time.perf_counter() - t0
        if done:
            runner.logger.info(f"[sa2va_hooks] waited {waited:.2f}s for the background export to {handle.out_dir} "
                               f"to finish ({why})")
        else:
            runner.logger.error(f"[sa2va_hooks] the background export to {handle.out_dir} is still running after "
                                f"{waited:.0f}s ({why}); training does not wait longer for it")
        return done


def background_exports(runner) -> BackgroundExports:
    state = process_state(runner)
    if "background" not in state:
        state["background"] = BackgroundExports()
    return state["background"]


# -- the snapshot folder: ``iter_N`` per export, complete once it holds its manifest -------------
ITER_DIR = re.compile(r"^iter_(\d+)$")


def export_root(runner, out_dir: str | None) -> Path:
    """Where HFExportHook's snapshots go: ``out_dir``, else ``{work_dir}/hf``."""
    return Path(out_dir) if out_dir else Path(runner.work_dir) / "hf"


def complete_snapshots(root: Path, but: Path | None = None) -> list[tuple[int, Path]]:
    """(N, path) of the complete ``iter_N`` snapshots in ``root`` (a manifest is written last), but
    ``but``, oldest first."""
    return sorted((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ())
                  if (m := ITER_DIR.match(p.name)) and p != but and (p / MANIFEST_FILE).is_file())


def prune_snapshots(root: Path, keep_last: int | None, keep: Path) -> None:
    """Remove all but the newest ``keep_last`` complete snapshots (never ``keep``, the one just
    published); None keeps all."""
    if keep_last is None:
        return
    for _, p in complete_snapshots(root)[:-keep_last]:
        if p != keep:
            remove_snapshot(p)


def remove_stale_staging(root: Path, log) -> None:
    """A process killed mid-export, mid-replace or mid-prune leaves ``iter_N.incomplete-*``,
    ``iter_N.old-*`` or ``iter_N.trash-*``; those are ours by name. An interrupted replace is
    undone and the rest removed, each said through ``log``. Rank 0 only (the caller)."""
    clean_leftovers(root, owns=lambda name: bool(ITER_DIR.match(name)), log=log)


def catch_up_after_resume(runner, root: Path, export: Callable[[], None]) -> None:
    """A run stopped while an export was in flight (killed, crashed, preempted) left that
    checkpoint without a snapshot in ``root``. On resume the model holds exactly the resumed
    checkpoint's weights: when that checkpoint has none, that is said and ``export()`` (every rank
    is here) exports it now. An earlier checkpoint without one is named in the log with the command that exports
    it. Only for checkpoints of this run's own checkpoint directory: a run started from another
    run's checkpoint did not miss its export."""
    ckpt_dir = checkpoint_dir(runner)
    if runner.iter <= 0 or not (ckpt_dir / f"iter_{runner.iter}.pth").exists():
        return
    have = {n for n, _ in complete_snapshots(root)}
    if runner.iter not in have:
        runner.logger.warning(f"[sa2va_hooks] resumed at iteration {runner.iter}, whose checkpoint has no "
                              f"snapshot in {root} (its export did not finish before the run stopped): "
                              "exporting it now, from the resumed weights")
        export()
    for ckpt in _checkpoints_between(ckpt_dir, max(have, default=-1), runner.iter):
        runner.logger.warning(
            f"[sa2va_hooks] checkpoint {ckpt} has no snapshot in {root} (the run stopped before its export "
            f"finished). Export it with: python tools/export.py CONFIG {ckpt} --out {root / ckpt.stem}")


def _checkpoints_between(folder: Path, after: int, before: int) -> list[Path]:
    """mmengine's ``iter_N.pth`` (a file, or a DeepSpeed directory) in ``folder`` with
    ``after < N < before``."""
    found = []
    for p in (folder.iterdir() if folder.is_dir() else ()):
        m = re.match(r"^iter_(\d+)\.pth$", p.name)
        if m and after < int(m.group(1)) < before:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def training_state() -> str:
    """What training is doing while an export's outcome is logged: an export thread can outlive
    a crashed or interrupted training loop (it is finished before the process exits)."""
    if threading.main_thread().is_alive():
        return "training continues"
    return "training has already ended (its main thread exited: an exception or an interrupt)"


# -- HFExportHook's log lines (tests and users grep them: keep the wording) ----------------------
def log_failed(runner, it: int, out: Path, e: BaseException) -> None:
    runner.logger.error(f"[sa2va_hooks] HF export of iteration {it} to {out} FAILED; "
                        f"{training_state()} and earlier snapshots are untouched. Cause: {type(e).__name__}: {e}")
    runner.logger.debug("".join(traceback.format_exception(e)))


def log_skipped(runner, it: int, busy: list[int], running: ExportHandle | None, when_busy: str,
                timeout_s: float) -> None:
    where = f"the export to {running.out_dir}" if running is not None and running.running else "an earlier export"
    where += ", with another queued behind it," if when_busy == "queue" else ""
    ranks = ", ".join(map(str, busy))
    if when_busy == "skip":
        runner.logger.warning(f"[sa2va_hooks] HF export of iteration {it} SKIPPED: {where} is still "
                              f"running on rank(s) {ranks} (HFExportHook(when_busy='skip')).")
    else:
        runner.logger.error(f"[sa2va_hooks] HF export of iteration {it} SKIPPED: {where} is still "
                            f"running on rank(s) {ranks} after {timeout_s:g}s (HFExportHook(timeout_s=...)); "
                            "training does not wait longer. Export this checkpoint later with tools/export.py.")


def describe_start(mode: str, ahead: _Held | None, paused: float) -> str:
    """How a background export started, for its log line: what training paused for, and whether it
    runs now or is queued behind ``ahead``."""
    if mode == "gathered":
        return f": gathered in {paused:.3f}s (training paused); writing in the background"
    if ahead is not None:
        return (f" queued: the export of iter {ahead.it} is still running; it starts when that one ends (training "
                f"paused {paused:.3f}s for the capture)")
    return f" started in the background; training paused {paused:.3f}s for it"


def report_export(runner, out: Path, point: dict, manifest, how: str, keep_last: int | None) -> None:
    """The published snapshot's log line (and notes, and the error when training did not reach
    it), then retention on rank 0 (``prune_snapshots``)."""
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
        prune_snapshots(out.parent, keep_last, keep=out)
