"""The host half of an export in a process of its own: hashing, writing and reading back shards,
and on the rank that publishes, the load check and the verify of the staged snapshot.

Why (issue 18, item 3; decision 62): training loops on a GPU are launch-bound, and every torch op
releases and retakes the GIL. Any thread of ours that takes the GIL in between (a digest worker
handing back a chunk, the writer, the read-back) makes the training thread wait for it. Measured on
an H200 at 7.6B (docs/benchmarks.md): 8 s of the export's hashing and writing slowed the overlapping
iterations by 3.4 % as threads of the training process, and by nothing (-0.1 %) as a process of
its own doing the same work. So the export's thread keeps what needs the model (merging on the
GPU, the copies to the host, the collectives) and hands each tensor's bytes to this process
through one shared, memory-mapped buffer; the process hashes and writes them, fsyncs, links and
reads back, in the same code as in-process exports (:class:`~.writer.ShardWriter`,
:func:`~.fingerprint.digest_tensor`, :func:`~.finish.read_back`), so the files and digests are
the same byte for byte.

The process is started with ``python -m`` (not ``multiprocessing``: spawn would re-run the
training script's module), talks over a socket pair, and ends with its parent. If it dies, the
call in flight raises :class:`HostProcessError` (with its exit code) at once, the export fails
and is not published, and the next export starts a new one.
"""
from __future__ import annotations

import logging
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from .errors import ExportFailedError

_log = logging.getLogger("sa2va_hooks")
_POLL_S = 0.2  # how often a waiting call checks that the process is still alive


class HostProcessError(ExportFailedError, RuntimeError):
    """The export's host process died or could not be started."""


def _ring_dir(nbytes: int) -> str:
    """Shared memory when it has room (a container's /dev/shm is often 64 MB), else the temp dir."""
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 2 * nbytes:
            return "/dev/shm"
    except OSError:
        pass
    return tempfile.gettempdir()


class _Ring:
    """One memory-mapped file both processes map: the bytes of the tensor being handed over."""

    def __init__(self, nbytes: int, path: str | None = None) -> None:
        self.nbytes = max(nbytes, mmap.PAGESIZE)
        self.owner = path is None
        if self.owner:
            fd, path = tempfile.mkstemp(prefix="sa2va_hooks-ring-", dir=_ring_dir(self.nbytes))
            os.ftruncate(fd, self.nbytes)
        else:
            fd = os.open(path, os.O_RDWR)
        self.path = path
        try:
            self._map = mmap.mmap(fd, self.nbytes)
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)

    def view(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.tensor[:nbytes].view(dtype).view(shape)

    def unlink(self) -> None:
        """The owner removes the name once the other side has mapped it (the memory stays mapped)."""
        if self.owner and self.path:
            Path(self.path).unlink(missing_ok=True)
            self.path = None

    def close(self) -> None:
        self.tensor = None
        self._map.close()
        self.unlink()


class HostProcess:
    """This rank's host process, shared by its exports one at a time (``session``). Started on
    first use; ``close`` ends it."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._ring: _Ring | None = None
        self._starting = False  # its first answer (to "ping": the imports done) is still to be read
        self.lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the process if none runs (again after one died). Does not wait for it to be ready
        (its imports take seconds): the first call does."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._drop()
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "sa2va_hooks.core.host_main", str(theirs.fileno())],
                                          pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as e:
            ours.close()
            raise HostProcessError(f"could not start the export's host process ({sys.executable} -m "
                                   f"sa2va_hooks.core.host_main): {e}") from e
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(("ping", ()))
        self._starting = True

    def ensure_ring(self, nbytes: int) -> None:
        """A running process (a new one if the last died) and a shared buffer of at least ``nbytes``
        (the export's largest tensor). Called once, as an export begins."""
        self.start()
        self._fit_ring(nbytes)

    def _fit_ring(self, nbytes: int) -> None:
        if self._ring is not None and self._ring.nbytes >= nbytes:
            return
        if self._ring is not None:
            self._ring.close()
        self._ring = _Ring(nbytes)
        try:
            self.call("attach", self._ring.path, self._ring.nbytes)
        finally:
            self._ring.unlink()

    def put(self, t: torch.Tensor) -> tuple[int, torch.dtype, tuple[int, ...]]:
        """Copy a host tensor's bytes into the shared buffer (a torch copy: the GIL is released)."""
        flat = t.contiguous().view(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
        self._alive()
        self._fit_ring(flat.numel())
        self._ring.tensor[:flat.numel()].copy_(flat)
        return flat.numel(), t.dtype, tuple(t.shape)

    def _alive(self) -> None:
        """Mid-export, a dead process fails the export; it is never replaced there: a new one
        would hold none of the export's state (its open shard), so the next answer would be a
        misleading error, or a wrong one."""
        if self._proc is None or self._proc.poll() is not None:
            raise HostProcessError(self._died())

    def send(self, op: str, *args: Any) -> None:
        self._alive()
        if self._starting:
            self._starting = False
            self.reply()
        try:
            self._conn.send((op, args))
        except OSError as e:
            raise HostProcessError(self._died()) from e

    def reply(self) -> Any:
        """The answer to the oldest call sent; raises the process's error, or HostProcessError when
        it died meanwhile."""
        while not self._conn.poll(_POLL_S):
            if self._proc.poll() is not None:
                raise HostProcessError(self._died())
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError) as e:
            self._proc.wait()
            raise HostProcessError(self._died()) from e
        if status == "error":
            raise value
        return value

    def call(self, op: str, *args: Any) -> Any:
        self.send(op, *args)
        return self.reply()

    def _died(self) -> str:
        code = self._proc.poll() if self._proc is not None else None
        return (f"the export's host process (pid {self.pid}) ended unexpectedly (exit code {code}) while it hashed, "
                "wrote or read back a shard; this export fails and publishes nothing, the next one starts a new "
                "process. If the system log shows it was killed for memory, or this repeats, set "
                "HFExportHook(background='thread') to do that work in threads of the training process")

    def _drop(self) -> None:
        for close in (self._conn.close if self._conn else None, self._ring.close if self._ring else None):
            if close is not None:
                try:
                    close()
                except (OSError, BufferError, ValueError):
                    pass
        self._conn = self._ring = None
        self._starting = False

    def close(self) -> None:
        """End the process (after the exports using it have ended)."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._conn.send(("stop", ()))
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._drop()
        self._proc = None


def slot_of(entry) -> Any:
    """What the process's ShardWriter needs of a planned entry (an entry holds live tensors)."""
    from .shards import TensorSlot
    return TensorSlot(entry.name, tuple(entry.shape), entry.dtype)


class HostShard:
    """A shard the host process writes, one tensor in flight: ``append`` copies the tensor into
    the shared buffer and returns without waiting, so the next tensor is merged and copied to the
    host while this one is hashed and written; its digest comes back at the next ``append`` (or
    ``close``), handed to ``done(key, digest)``."""

    def __init__(self, host: HostProcess, path: Path, entries: list, done) -> None:
        self.host, self.done = host, done
        self._pending: tuple[Any, bool] | None = None
        host.call("open", str(path), [slot_of(e) for e in entries])

    def append(self, entry, t: torch.Tensor, key: Any, digest: bool) -> None:
        self.settle()  # the buffer is free again once the previous tensor is written
        nbytes, dtype, shape = self.host.put(t)
        self.host.send("append", slot_of(entry), nbytes, dtype, shape, digest)
        self._pending = (key, digest)

    def settle(self) -> None:
        if self._pending is not None:
            (key, digest), self._pending = self._pending, None
            value = self.host.reply()
            if digest:
                self.done(key, value)

    def close(self) -> int:
        self.settle()
        return self.host.call("close")

    def abort(self) -> None:
        """Stop writing; never raises (as ShardWriter.abort: the agreement that follows must run)."""
        try:
            if self._pending is not None:
                self._pending = None
                self.host.reply()
            self.host.call("abort")
        except Exception:  # noqa: BLE001 - the export's first error is what gets reported
            _log.debug("aborting a shard in the host process failed", exc_info=True)


# -- the process's side ----------------------------------------------------------------------
class _Server:
    """What the host process does for its parent: one shard being written at a time; the load
    check and the staged snapshot's verify (pure Python that held the GIL in the export's thread)."""

    def __init__(self) -> None:
        from .workers import Workers
        self.ring: _Ring | None = None
        self.writer = None
        self.hasher = Workers(1, "sa2va_hooks-hash")

    def ping(self) -> int:
        return os.getpid()

    def attach(self, path: str, nbytes: int) -> None:
        if self.ring is not None:
            self.ring.close()
        self.ring = _Ring(nbytes, path)

    def open(self, path: str, slots: list) -> None:
        from .writer import ShardWriter
        self.writer = ShardWriter(Path(path), slots)

    def append(self, slot, nbytes: int, dtype: torch.dtype, shape: tuple, digest: bool) -> str | None:
        """Write the buffer's tensor into the open shard; its digest is computed meanwhile."""
        from .fingerprint import digest_tensor
        t = self.ring.view(nbytes, dtype, shape)
        pending = self.hasher.submit(digest_tensor, slot.name, t) if digest else None
        try:
            self.writer.append(slot, t)
        except BaseException:
            if pending is not None:
                pending.exception()  # wait: the parent reuses the buffer once answered; the write's error wins
            raise
        return pending.result() if pending is not None else None

    def digest(self, name: str, nbytes: int, dtype: torch.dtype, shape: tuple) -> str:
        from .fingerprint import digest_tensor
        return digest_tensor(name, self.ring.view(nbytes, dtype, shape))

    def close(self) -> int:
        writer, self.writer = self.writer, None
        return writer.close()

    def abort(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.abort()

    def read_back(self, staging: str, files: list, expected: dict) -> None:
        from .finish import read_back
        read_back(Path(staging), files, expected)

    def load_check(self, staging: str, tensors: dict, template_table: str | None, required_tokens: list,
                   label: Path) -> dict:
        from .loadcheck import check_snapshot_loads
        return check_snapshot_loads(Path(staging), tensors, template_table=template_table,
                                    required_tokens=required_tokens, label=label)

    def verify_staged(self, staging: str) -> list[str]:
        from .verify import verify_snapshot
        return verify_snapshot(Path(staging), data=False)

    def holds(self, path: str, digests: dict) -> bool:
        from .rank_writer import _holds
        return _holds(Path(path), digests)


def _answer(conn: Connection, server: _Server, op: str, args: tuple) -> None:
    try:
        conn.send(("ok", getattr(server, op)(*args)))
    except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it in the export
        try:
            conn.send(("error", e))
        except Exception:  # noqa: BLE001 - an error that does not pickle: its text instead
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))


def serve(fd: int) -> None:
    conn = Connection(fd)
    server = _Server()
    while True:
        try:
            op, args = conn.recv()
        except EOFError:  # the parent is gone
            break
        if op == "stop":
            break
        _answer(conn, server, op, args)
    server.abort()

