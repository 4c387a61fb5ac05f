"""Streaming safetensors writing with HF index conventions: the byte-writing half of the writer.

Shards are planned from names, shapes and dtypes before any data exists (:mod:`.shards`), so the
file names (``model-00001-of-00003.safetensors``) and every file's safetensors header are final from
the start. Each tensor is then produced, fingerprinted while in memory, appended to its file and
dropped: peak extra host memory is one tensor, not one shard (``save_file`` needs the whole
shard as a dict). A background thread fsyncs as the file grows, so the disk writes while the
next tensors are merged and hashed. Every file is read back with the safetensors library
before the snapshot is published, which proves the format, not only the bytes.

Everything here writes into a staging directory; putting it in place atomically is
:mod:`.publish`'s part.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .fingerprint import tensor_bytes
from .manifest import NotRegularFileError, file_kind
from .errors import DiskSpaceError, InternalError
from .shards import ShardPlan, Slot, TensorSlot, safetensors_header
from .vocab import FLUSH_EVERY_BYTES, INDEX_FILE


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


def file_entries(directory: Path, exclude: Iterable[str] = ()) -> dict[str, int]:
    """Relative path -> size of every regular file under directory."""
    skip = set(exclude)
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = p.stat().st_size
    return out
