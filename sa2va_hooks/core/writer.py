"""Streaming, sharded safetensors writing with HF index conventions and atomic publish.

Shards are planned from names, shapes and dtypes before any data exists, so the file names
(``model-00001-of-00003.safetensors``) and every file's safetensors header are final from the
start. Each tensor is then produced, fingerprinted while in memory, appended to its file and
dropped: peak extra host memory is one tensor, not one shard (``save_file`` needs the whole
shard as a dict). A background thread fsyncs as the file grows, so the disk writes while the
next tensors are merged and hashed. Every file is read back with the safetensors library
before the snapshot is published, which proves the format, not only the bytes.

A snapshot is written into ``NAME.incomplete-<id>`` beside its final place and renamed only
once everything, the manifest last, is on disk and fsynced. A reader therefore either sees a
complete snapshot or none, and a crash leaves only an ``.incomplete-*`` directory behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import struct
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import torch

from .entry import nbytes_of
from .fingerprint import tensor_bytes
from .manifest import NotRegularFileError, file_kind, is_regular_file  # noqa: F401 - is_regular_file for export
from .errors import BadTypeError, BadValueError, DiskSpaceError, InternalError, OutputExistsError
from .vocab import FLUSH_EVERY_BYTES, INDEX_FILE, SAFETENSORS_CODES, SHARD_METADATA, SINGLE_FILE  # noqa: F401 - re-exported

_ST_DTYPES = {getattr(torch, name): code for name, code in SAFETENSORS_CODES.items()}

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '2GiB' -> 2**31, exactly as transformers' ``max_shard_size`` reads it,
    including its one surprise: a lower-case final ``b`` means bits ('5Gb' and '5gb' are 5e9 / 8
    bytes), so that a size copied from a transformers call gives the same shards here."""
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]I?)?B)?\s*", size.upper()) if isinstance(size, str) else None
    if not m or float(m.group(1)) <= 0:
        raise BadValueError(f"max_shard_size {size!r} is not a size; use a positive int of bytes or e.g. '5GB', "
                            "'500MiB'.")
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or "B"])
    bits = m.group(2) is not None and "I" not in m.group(2) and m.group(2) != "B" and size.rstrip().endswith("b")
    return n // 8 if bits else n


class Slot(Protocol):
    """What the shard planning and writing read of a tensor: the export passes its
    :class:`~sa2va_hooks.core.entry.TensorEntry` objects, the writer's own tests
    :class:`TensorSlot`. The writer checks plan order by ``==``, identity for an entry."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def nbytes(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """The least a tensor needs to be planned into a shard (the writer's tests use it)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    files: list[tuple[str, list[Slot]]]  # in write order

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for _, slots in self.files for s in slots)

    @property
    def weight_map(self) -> dict[str, str]:
        return {s.name: f for f, slots in self.files for s in slots}


def plan_shards(slots: Sequence[Slot], max_shard_size: int | str) -> ShardPlan:
    """Greedy, order-preserving split, as transformers does: a tensor larger than the limit
    gets a shard of its own rather than being refused."""
    limit = parse_size(max_shard_size)
    groups: list[list[Slot]] = [[]]
    size = 0
    for s in slots:
        if groups[-1] and size + s.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    if len(groups) == 1:
        return ShardPlan([(SINGLE_FILE, groups[0])])
    n = len(groups)
    return ShardPlan([(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)])


def plan_shard_groups(groups: Sequence[Sequence[Slot]], max_shard_size: int | str) -> ShardPlan:
    """Shards that never mix groups: each group is split on its own, in its own order, and the
    files are numbered group after group. Exported with the frozen tensors as the first group,
    the frozen shards hold the same tensors in the same order at every export, so their bytes
    repeat and a later export can hard-link them. A model that fits one file stays one file."""
    groups = [list(g) for g in groups if g]
    flat = [s for g in groups for s in g]
    if len(groups) <= 1 or sum(s.nbytes for s in flat) <= parse_size(max_shard_size):
        return plan_shards(flat, max_shard_size)
    parts = [slots for g in groups for _, slots in plan_shards(g, max_shard_size).files]
    n = len(parts)
    return ShardPlan([(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(parts)])


def link_shard(src: Path, dst: Path) -> None:
    """Hard-link the previous snapshot's shard ``src`` to ``dst``. Raises :class:`OSError` (with the
    errno and the file) whenever that cannot be done, whatever the reason: no link support (EXDEV,
    ENOSYS on FUSE, EPERM), a file we may not read or that was deleted meanwhile, or ``src`` not a
    regular file. The caller then writes the shard from the model instead: a failed link must never
    fail an export, and copying a file we could not link may fail the same way (or the file is gone).

    A symlink is never linked: ``link()`` would put the symlink itself into the new snapshot, pointing
    outside it. ``src`` is checked with ``lstat`` before, and what was linked is checked after (a
    swap between the two is caught too)."""
    mode = os.lstat(src).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(src, file_kind(mode), ": never hard-linked")
    os.link(src, dst, follow_symlinks=False)
    mode = os.lstat(dst).st_mode
    if not stat.S_ISREG(mode):
        os.unlink(dst)
        raise NotRegularFileError(src, f"now {file_kind(mode)} (swapped while it was linked)", ": never hard-linked")


def os_error_words(e: OSError) -> str:
    """``ENOSYS (Function not implemented)``: the errno's name and its text, for a log line."""
    if e.errno is None:
        return str(e)
    return f"{errno.errorcode.get(e.errno, f'errno {e.errno}')} ({e.strerror or e})"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory, so a rename that follows cannot outrun the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: object) -> None:
    try:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk's ENOSPC from write() names no file
        raise with_path(e, path) from None


def safetensors_header(slots: Sequence[Slot]) -> bytes:
    """The length-prefixed JSON header of a safetensors file holding ``slots`` in this order."""
    header: dict = {"__metadata__": dict(SHARD_METADATA)}
    offset = 0
    for s in slots:
        if s.dtype not in _ST_DTYPES:
            raise BadTypeError(f"tensor '{s.name}' has dtype {s.dtype}, which safetensors cannot store")
        header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class _BackgroundFsync:
    """fsync a growing file from another thread, so the disk works while tensors are produced."""

    def __init__(self, fd: int) -> None:
        self.fd, self.error = fd, None
        self._wake, self._stop = threading.Event(), False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            try:
                os.fsync(self.fd)
            except OSError as e:
                self.error = e
                return

    def poke(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join()
        if self.error is not None:
            raise self.error


def _write_bytes(f, data) -> None:
    try:
        f.write(data)
    except OSError as e:
        raise with_path(e, f.name) from None


def with_path(e: OSError, path) -> OSError:
    """The same error, naming the file it happened on (a bare ENOSPC from write() names none)."""
    if e.filename is not None or e.errno is None:
        return e
    return type(e)(e.errno, e.strerror or str(e), str(path))


class ShardWriter:
    """One safetensors file, written tensor by tensor in planned order. The header comes from the
    plan, so nothing but the tensor being appended is held in memory."""

    def __init__(self, path: Path, slots: Sequence[Slot]) -> None:
        self.path, self.slots = path, list(slots)
        self._next = 0
        self._pending = 0
        self._f = open(path, "wb")
        self._flusher = _BackgroundFsync(self._f.fileno())
        try:
            _write_bytes(self._f, safetensors_header(self.slots))
        except BaseException:
            self.abort()
            raise

    def append(self, slot: Slot, t: torch.Tensor) -> None:
        want = self.slots[self._next]
        if slot != want:
            raise InternalError(f"tensor '{slot.name}' written out of plan order into {self.path.name} (expected "
                               f"'{want.name}'); this is a bug in sa2va_hooks, please report it.")
        if tuple(t.shape) != slot.shape or t.dtype != slot.dtype:
            raise InternalError(f"tensor '{slot.name}' came out as {t.dtype}{list(t.shape)} but was planned "
                               f"as {slot.dtype}{list(slot.shape)}; this is a converter bug, please report it.")
        _write_bytes(self._f, tensor_bytes(t))
        self._next += 1
        self._pending += slot.nbytes
        if self._pending >= FLUSH_EVERY_BYTES:
            self._f.flush()
            self._flusher.poke()
            self._pending = 0

    def close(self) -> int:
        """Flush and fsync; returns the file size. Every planned tensor must have been appended."""
        if self._next != len(self.slots):
            self.abort()
            raise InternalError(f"{self.path.name} closed after {self._next} of {len(self.slots)} planned tensors")
        try:
            self._f.flush()
            self._flusher.close()
            os.fsync(self._f.fileno())
            return self._f.tell()
        except OSError as e:
            raise with_path(e, self.path) from None
        finally:
            self._f.close()

    def abort(self) -> None:
        """Stop writing (the staging directory is removed by the caller); never raises. Closing
        flushes Python's write buffer first, and on a full disk (ENOSPC) or past a file-size limit
        (EFBIG) that flush fails again: the error is already being reported, and the descriptor is
        closed anyway (``BufferedWriter.close`` closes the raw file after a failed flush). Raising
        here would skip the caller's agreement with the other ranks and leave them waiting."""
        for close in (self._flusher.close, self._f.close):
            try:
                close()
            except (OSError, ValueError):
                pass


def write_shard(path: Path, slots: Sequence[TensorSlot], produce: Callable[[TensorSlot], torch.Tensor]) -> int:
    """Write one safetensors file tensor by tensor; returns its size in bytes."""
    writer = ShardWriter(path, slots)
    try:
        for slot in slots:
            writer.append(slot, produce(slot))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def write_index(staging: Path, plan: "ShardPlan") -> None:
    """``model.safetensors.index.json`` for a sharded plan (HF's convention: byte total_size)."""
    if len(plan.files) > 1:
        write_json(staging / INDEX_FILE, {"metadata": {"total_size": plan.total_size},
                                          "weight_map": dict(sorted(plan.weight_map.items()))})


def write_shards(staging: Path, plan: ShardPlan, produce: Callable[[TensorSlot], torch.Tensor],
                 *, on_shard_done: Callable[[str, int], None] | None = None) -> None:
    """Produce and write each shard in turn; one tensor at a time is alive on the host."""
    for fname, slots in plan.files:
        size = write_shard(staging / fname, slots, produce)
        if on_shard_done:
            on_shard_done(fname, size)
    write_index(staging, plan)


def assign_shards(plan: ShardPlan, world: int) -> dict[str, int]:
    """Which rank writes which file: the largest files first, each to the least loaded rank
    (ties to the lowest rank). Deterministic, so every rank computes the same assignment."""
    load = [0] * world
    owner: dict[str, int] = {}
    sizes = {f: sum(s.nbytes for s in slots) for f, slots in plan.files}
    for fname in sorted(sizes, key=lambda f: (-sizes[f], f)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[fname] = r
        load[r] += sizes[fname]
    return owner


def staging_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}.incomplete-{uuid.uuid4().hex[:12]}"


def free_space_margin(nbytes: int) -> int:
    """What an export needs beyond its tensor bytes (headers, config, tokenizer, manifest, filesystem
    blocks): 2 % of the size plus 256 KiB, so a tiny export is not refused on a small disk and a large
    one keeps a proportional reserve."""
    return int(nbytes * 0.02) + (256 << 10)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def check_free_space(directory: Path, need_bytes: int,
                     advice: str = "Free some space, choose another output directory, "
                                   "or (in training) lower HFExportHook's keep_last.") -> None:
    """Refuse before writing a byte, rather than fail halfway with a half-written snapshot."""
    need = need_bytes + free_space_margin(need_bytes)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise DiskSpaceError(errno.ENOSPC, f"not enough free space in {directory}: the export needs {_mib(need)} "
                                    f"({_mib(need_bytes)} of tensors and a {_mib(need - need_bytes)} margin) and "
                                    f"{_mib(free)} are free. {advice}", str(directory))


LEFTOVER = re.compile(r"^(?P<name>.+)\.(?P<kind>incomplete|old|trash)-[0-9a-f]{12}$")


def remove_snapshot(path: Path) -> None:
    """Delete a published snapshot without ever leaving a half-deleted one under its name: it is
    renamed to a private trash name first (one atomic step), then deleted."""
    trash = path.parent / f"{path.name}.trash-{uuid.uuid4().hex[:12]}"
    os.rename(path, trash)
    fsync_path(path.parent)
    shutil.rmtree(trash)


def clean_leftovers(parent: Path, owns=lambda name: True, log=print) -> list[str]:
    """Our own leftovers beside the snapshots in ``parent``, after a crash: ``NAME.incomplete-*`` (an
    export that never finished) and ``NAME.trash-*`` (a deletion that never finished) are removed;
    ``NAME.old-*`` (a replace interrupted between its two renames) is put back under ``NAME`` when
    nothing is there, else removed. Only names of that exact form whose ``NAME`` ``owns`` accepts are
    touched; each action is logged and returned."""
    if not parent.is_dir():
        return []
    found = sorted((m.group("kind") != "old", p.name, m.group("name"), p) for p in parent.iterdir()
                   if (m := LEFTOVER.match(p.name)) and owns(m.group("name")))
    done = []
    for _, _, name, p in found:  # the .old-* first, so that a restore happens before anything is removed
        final = parent / name
        if p.name.startswith(f"{name}.old-") and not final.exists():
            os.rename(p, final)
            fsync_path(parent)
            done.append(f"restored {final} from {p.name}: a replace was interrupted between its two renames")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p}: left behind by an interrupted export, replace or deletion")
        log(done[-1])
    return done


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory bottom-up, ``root`` last: whatever wrote
    them (our writer, ``save_pretrained``, a tokenizer, a copied ``.py``), their bytes and names are
    on disk before the rename that publishes them."""
    dirs = []
    for dirpath, _, filenames in os.walk(root):
        dirs.append(Path(dirpath))
        for name in filenames:
            fsync_path(Path(dirpath) / name)
    for d in reversed(dirs):
        fsync_path(d)


RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``). False
    where the kernel, the C library or the filesystem cannot (the caller then falls back)."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def publish(staging: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Put a complete staging directory in place. Everything in it is fsynced first. A previous
    snapshot under ``out_dir`` is swapped out in one atomic step (``renameat2(RENAME_EXCHANGE)``), so
    ``out_dir`` always names a complete snapshot, old or new; the old one then sits under the staging
    name and is deleted. Where the swap is not available (not Linux, or a filesystem without it), the
    old one is renamed aside first (``NAME.old-*``, restored if the second rename fails); a crash
    between the two renames leaves it there, and the hook and tools/export.py restore it on their next
    start (:func:`clean_leftovers`)."""
    fsync_tree(staging)
    with _publishing_lock(out_dir.parent):
        _publish_locked(staging, out_dir, overwrite)


@contextlib.contextmanager
def _publishing_lock(parent: Path):
    """Publishers into one directory take turns (``flock`` on the directory itself: nothing is
    created for it, and it is released when the process dies). Within a turn, the name is checked
    and renamed with no other exporter in between: a losing concurrent writer is told the name
    exists, and the swap or the fallback's renames never interleave with another's."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _publish_locked(staging: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"snapshot directory {out_dir} already exists (published by another export, or "
                              "earlier); pass overwrite=True (--overwrite) to replace it, or choose another "
                              "output directory.")
    if out_dir.exists():
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise OutputExistsError(f"{out_dir} exists and is not a snapshot directory; refusing to replace it. "
                                  "Remove it or choose another output directory.")
        if exchange(staging, out_dir):
            fsync_path(out_dir.parent)
            shutil.rmtree(staging)  # now the old snapshot
            return
        old = out_dir.parent / f"{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out_dir, old)
        try:
            os.rename(staging, out_dir)
        except OSError:
            os.rename(old, out_dir)
            raise
        fsync_path(out_dir.parent)
        shutil.rmtree(old)
        return
    os.rename(staging, out_dir)
    fsync_path(out_dir.parent)


def file_entries(directory: Path, exclude: Iterable[str] = ()) -> dict[str, int]:
    """Relative path -> size of every regular file under directory."""
    skip = set(exclude)
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = p.stat().st_size
    return out
