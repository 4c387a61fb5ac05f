"""Step 3 of an export, write: one rank's share of the shards, in every mode.

:class:`RankWriter` writes the files :func:`~.shards.assign_shards` gave this rank, in plan order,
from whichever producer feeds it (:mod:`.produce`: the writer's own thread, or the queue the
training thread fills under ZeRO-3 / FSDP); the mode is only the producer. Each tensor is hashed
on a helper thread while its bytes are written, then recorded (digest, statistics, what training
did to it). The rank's files are then read back against those digests.

Errors follow the collective-failure discipline (:mod:`.latch`): the first one is latched, the
later steps skip their work but the producer still enters every gather, and :meth:`RankWriter.write`
returns the error for the agreement instead of raising.

A shard of frozen tensors is first hashed, tensor by tensor; when every digest equals the same
shard's in the previous snapshot, that file is hard-linked and read back instead of written.
Otherwise (or if the linked file does not read back right) it is written.

When producing a tensor is collective (ZeRO-3, FSDP: every rank enters its gather, in one order),
the owner alone cannot hash a shard and then, if the link fails, produce it again: it would enter
gathers the others do not. So a frozen shard is then linked in steps every rank takes alike
(:meth:`RankWriter._link_together`): every rank runs the producer over the file once (the owner
hashes, the others only enter the gathers), the owner's decision is broadcast, and if it did not
link, every rank produces the file again to write it. Whether a file goes through those steps is
agreed once per export, before any rank can diverge (:meth:`RankWriter._agree_linking`). This
needs a producer that can produce a file twice (``Producer.repeatable``); the queue the training
thread fills once (gathered exports) cannot, so those exports write every file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from safetensors import SafetensorError

from .dist import RankGroup, StoreGroup
from .entry import ProducedTensor, TensorEntry, TensorRecord
from .finish import read_back
from .fingerprint import Fingerprint, FingerprintSet, digest_tensor
from .host_process import HostProcess, HostShard
from .latch import _Latch
from .manifest import TrainingEffect
from .merge import ROLE_FROZEN, ROLE_LORA, ROLE_TRAINABLE
from .observer import NO_OBSERVER, ExportObserver
from .produce import Producer
from .publish import _Previous
from .shards import ShardPlan, assign_shards
from .verify import hash_safetensors_file
from .workers import Workers
from .writer import ShardWriter, link_shard, os_error_words

_log = logging.getLogger("sa2va_hooks")


class RankWriter:
    """This rank's writing of one export. ``previous`` (a complete earlier snapshot) is used for
    hard links of frozen-only shards. Without gathers the owner links on its own; with them
    (``collective``) the ranks link together over ``group`` (the export's ranks), and without a
    ``group`` a collective export links nothing."""

    def __init__(self, plan: ShardPlan, rank: int, world: int, *, trained: FingerprintSet,
                 baseline: Mapping[str, Fingerprint] | None, progress: bool, collective: bool,
                 previous: _Previous | None = None, group: RankGroup | StoreGroup | None = None,
                 observer: ExportObserver = NO_OBSERVER, host: HostProcess | None = None) -> None:
        self.plan, self.rank, self.observer = plan, rank, observer  # plan: of TensorEntry
        self.host = host  # hashes, writes and reads back in a process of its own (decision 62)
        self.trained, self.baseline = trained, baseline
        self.previous, self.collective, self.group = previous, collective, group
        self.owners = assign_shards(plan, world)
        self.tensors: dict[str, TensorRecord] = {}
        self.effect = TrainingEffect()
        self.bar = _progress(plan.total_size, progress and rank == 0)
        self.written = self.linked = 0
        self.linked_from: dict[str, str] = {}
        self._link_errors: set = set()  # errnos already logged by _link_failed
        self._hasher = Workers(1, "sa2va_hooks-hash")

    def storage(self) -> dict:
        return {"bytes_written": self.written, "bytes_linked": self.linked, "linked_from": dict(self.linked_from)}

    def write(self, staging: Path, producer: Producer, readback: bool) -> BaseException | None:
        """Write (or link) this rank's files, then read them back; returns the first error. With a
        host process, that process is this export's alone meanwhile."""
        if self.host is None:
            return self._write(staging, producer, readback)
        with self.host.lock:
            latch = _Latch()
            latch.call(self.host.ensure_ring, max((e.nbytes for _, es in self.plan.files for e in es), default=0))
            if latch.failed:  # nothing is written; the producer still runs, so every gather is entered
                self.host = None
            return self._write(staging, producer, readback, latch)

    def _write(self, staging: Path, producer: Producer, readback: bool,
               latch: _Latch | None = None) -> BaseException | None:
        latch, mine = latch or _Latch(), []
        try:
            together = self._agree_linking(producer, latch)
            for fname, entries in self.plan.files:
                own = self.owners[fname] == self.rank
                frozen = all(e.frozen_only for e in entries)
                if together and frozen:
                    if self._link_together(staging, fname, entries, own, producer, latch):
                        continue
                elif own and frozen and not self.collective and self._can_link(producer) and not latch.failed:
                    if latch.call(self._link, staging, fname, entries, producer, latch) or latch.failed:
                        continue
                self._write_file(staging, fname, entries, own, producer, latch)
                if own and not latch.failed:
                    mine.append(fname)
            producer.finish(latch)
        finally:
            self.close(producer)
        if not latch.failed and readback:
            expected = {n: r.to_json() for n, r in self.tensors.items() if r.file in mine}
            if self.host is not None:
                latch.call(self.host.call, "read_back", str(staging), mine, expected)
            else:
                latch.call(read_back, staging, mine, expected)
        return latch.error

    def close(self, producer: Producer | None = None) -> None:
        """Release the helper thread, the progress bar and the staging buffer; never raises (cleanup
        must not keep a rank from the agreement that follows)."""
        self._hasher.shutdown()
        for close in (self.bar.close, producer.close if producer is not None else None):
            try:
                if close is not None:
                    close()
            except Exception:  # noqa: BLE001 - see above; the export's own error is what gets reported
                _log.debug("cleanup after an export failed", exc_info=True)

    # -- writing --------------------------------------------------------------------------------
    def _write_file(self, staging: Path, fname: str, entries: list[TensorEntry], own: bool, producer: Producer,
                    latch: _Latch) -> None:
        """Write one shard (or, under ZeRO-3, take part in its gathers only). After a failure the
        producer's tensors are still taken (its gathers entered, its queue emptied), not written."""
        record = not any(e.name in self.tensors for e in entries)  # hashed already by a failed _link
        writer = latch.call(self._open, staging / fname, entries) if own and not latch.failed else None
        for produced in producer.produce(entries, own, latch):
            if writer is not None and not latch.failed:
                latch.call(self._append, writer, produced, record)
        if writer is not None:
            if latch.failed:
                writer.abort()
            else:
                latch.call(self._close_file, writer, fname)

    def _open(self, path: Path, entries: list[TensorEntry]) -> ShardWriter | HostShard:
        if self.host is not None:
            return HostShard(self.host, path, entries, self._record)
        return ShardWriter(path, entries)

    def _append(self, writer: ShardWriter | HostShard, produced: ProducedTensor, record: bool) -> None:
        """Append one tensor; its digest is computed on the helper thread meanwhile (both only
        read the staged bytes), then recorded. In the host process: handed over, recorded once
        that process has hashed and written it."""
        if isinstance(writer, HostShard):
            writer.append(produced.entry, produced.host, produced, record)
            return
        if not record:
            writer.append(produced.entry, produced.host)
            return
        digest = self._hasher.submit(digest_tensor, produced.entry.name, produced.host)
        try:
            writer.append(produced.entry, produced.host)
        except BaseException:
            digest.exception()  # wait: the next tensor is staged over these bytes, or they are freed
            raise
        self._record(produced, digest.result())

    def _close_file(self, writer: ShardWriter | HostShard, fname: str) -> None:
        size = writer.close()
        self.written += size
        self.observer.file_done(fname, size, linked=False)

    def _record(self, produced: ProducedTensor, digest: str) -> None:
        self.tensors[produced.entry.name] = produced.record(digest)
        _count_effect(self.effect, produced, self.trained, self.baseline)
        self.bar.update(produced.entry.nbytes)

    # -- hard links from the previous snapshot --------------------------------------------------
    def _can_link(self, producer: Producer) -> bool:
        """A link that fails falls back to producing the file again: the producer must allow it."""
        return self.previous is not None and producer.repeatable

    def _agree_linking(self, producer: Producer, latch: _Latch) -> bool:
        """Collective exports: whether the frozen-only files go through :meth:`_link_together`, the
        same answer on every rank. Asked once, before the first file, by every rank alike (the
        conditions are the same everywhere: the mode, the producer's kind, the plan); the answer is
        whether any rank has a previous snapshot, so a rank that could not load it (it decides "not
        linked" for its files) never takes the others out of step."""
        if not (self.collective and self.group is not None and producer.repeatable
                and any(all(e.frozen_only for e in entries) for _, entries in self.plan.files)):
            return False
        answers = latch.call(self.group.all_gather, self.previous is not None)
        return bool(answers) and any(answers)

    def _link_together(self, staging: Path, fname: str, entries: list[TensorEntry], own: bool, producer: Producer,
                       latch: _Latch) -> bool:
        """One frozen-only file of a collective export, on every rank: the producer runs over the file
        once (the owner hashes and tries the link, the others enter the gathers only), then the
        owner's decision is broadcast. True (nothing more to do) when it linked, or when the owner
        has failed (its error is latched; a second pass would write nothing). False: every rank
        produces the file again, so the gathers stay in one order on every rank. A rank whose
        broadcast fails latches it and takes the second pass, as the owner does unless it linked."""
        if own:
            done = bool(latch.call(self._link, staging, fname, entries, producer, latch)) or latch.failed
        else:
            for _ in producer.produce(entries, False, latch):
                pass  # nothing is yielded to a rank that does not write the file; its gathers are entered
            done = None
        return bool(latch.call(self.group.broadcast, done, self.owners[fname]))

    def _link(self, staging: Path, fname: str, entries: list[TensorEntry], producer: Producer,
              latch: _Latch) -> bool:
        """Hash the shard's tensors; link the previous snapshot's file when they are equal."""
        for produced in producer.produce(entries, True, latch):
            self._record(produced, self._digest(produced))
        if latch.failed or self.previous is None:  # no previous here: hashed for the gathers' sake only
            return False
        digests = {e.name: self.tensors[e.name].digest for e in entries}
        src, dst = self.previous.path / fname, staging / fname
        try:
            if not self.previous.same_shard(fname, entries, digests):
                return False
            link_shard(src, dst)
            same = self.host.call("holds", str(dst), digests) if self.host is not None else _holds(dst, digests)
        except OSError as e:  # whatever the errno: the shard is written from the model instead
            dst.unlink(missing_ok=True)
            self._link_failed(src, fname, e)
            return False
        if not same:  # the older file was changed after it was published
            dst.unlink()
            _log.warning(f"{src} no longer holds what its manifest says (edited or damaged after it was published; "
                         f"`verify {self.previous.path}` will say so); writing {fname} afresh instead")
            return False
        size = dst.stat().st_size
        self.linked += size
        self.observer.file_done(fname, size, linked=True)
        self.linked_from[fname] = f"{self.previous.path.name}/{fname} (linked)"
        return True

    def _digest(self, produced: ProducedTensor) -> str:
        if self.host is not None:
            nbytes, dtype, shape = self.host.put(produced.host)
            return self.host.call("digest", produced.entry.name, nbytes, dtype, shape)
        return self._hasher.submit(digest_tensor, produced.entry.name, produced.host).result()

    def _link_failed(self, src: Path, fname: str, e: OSError) -> None:
        """A link that failed is a write, never a failed export: no link support (EXDEV, ENOSYS on a
        FUSE mount, EPERM), a file we may not read, one deleted meanwhile, a symlink. The caller writes
        the shard from the model, the source of truth (copying the file we could not link may fail the
        same way). Logged once per export and errno: a filesystem without links fails every shard."""
        key = e.errno if e.errno is not None else type(e).__name__
        level = logging.DEBUG if key in self._link_errors else logging.WARNING
        self._link_errors.add(key)
        _log.log(level, f"could not hard-link {e.filename or src}: {os_error_words(e)}; writing {fname} from the "
                        f"model instead (the export goes on; other shards that fail the same way are written too, "
                        f"logged at DEBUG)")


def _holds(path: Path, digests: Mapping[str, str]) -> bool:
    """Whether the linked file holds exactly these tensors, read back (not even a safetensors file
    any more counts as changed)."""
    try:
        return hash_safetensors_file(path) == digests
    except (SafetensorError, ValueError, RuntimeError):
        return False


def _count_effect(effect: TrainingEffect, produced: ProducedTensor, trained: FingerprintSet,
                  baseline: Mapping[str, Fingerprint] | None) -> None:
    """Count one written tensor into what training did, by its final role."""
    name, role = produced.entry.name, produced.role
    if role == ROLE_FROZEN:
        effect.frozen_tensors += 1
        return
    effect.trained_tensors += 1
    differs = produced.differs_from_base
    if role == ROLE_TRAINABLE and baseline is not None:
        src = produced.entry.sources[0]
        if src in baseline and src in trained.tensors and baseline[src].algorithm == trained.tensors[src].algorithm:
            # a baseline of another digest version (a run resumed across v1 -> v2) cannot say; merge's answer stands
            differs = baseline[src].digest != trained.tensors[src].digest
    if role == ROLE_LORA and produced.delta_rel_norm is not None:
        effect.lora_rel_delta[name] = produced.delta_rel_norm
    if differs is None:
        effect.trained_unknown_base.append(name)
    elif differs:
        effect.trained_differ_from_base += 1
    else:
        effect.trained_identical_to_base.append(name)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not enabled)
