"""Staging and publishing: where a snapshot is written before it exists, and how it comes to exist.

A snapshot is written into ``NAME.incomplete-<id>`` beside its final place and renamed only once
everything, the manifest last, is on disk and fsynced. A reader therefore either sees a complete
snapshot or none, and a crash leaves only an ``.incomplete-*`` directory behind (removed by
:func:`clean_leftovers` at the next start). Every rank writes into the one staging directory that
rank 0 opened (:func:`open_staging` proves they all see it); rank 0 alone removes it when the export
fails (:func:`removed_on_failure`) and renames it into place (:func:`publish`).

The previous snapshot of a run (:class:`_Previous`) is where frozen shards are hard-linked from.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .dist import RankFailedError, RankFailure, RankGroup, agree, describe
from .entry import TensorEntry
from .errors import OutputExistsError
from .fingerprint import DIGEST_ALGORITHM, DIGEST_V1
from .manifest import MANIFEST_FILE, ExportManifest, is_regular_file
from .shards import ShardPlan, safetensors_header
from .writer import check_free_space, exchange, fsync_path

_TOKEN = ".sa2va_hooks_rank_check"


@contextlib.contextmanager
def removed_on_failure(staging: Path, group: RankGroup) -> Iterator[Path]:
    """Rank 0 removes the staging directory when the block raises (whatever it raises, a
    KeyboardInterrupt included), then the error goes on. Only rank 0: it created the directory,
    and the other ranks may still be writing into it until they learn of the failure."""
    try:
        yield staging
    except BaseException:
        discard_staging(staging, group)
        raise


def discard_staging(staging: Path, group: RankGroup) -> None:
    """Rank 0 removes the staging directory of an export that will not be published."""
    if group.is_main:
        shutil.rmtree(staging, ignore_errors=True)


def open_staging(out_dir: Path, plan: ShardPlan, group: RankGroup, *, overwrite: bool = False) -> Path:
    """Rank 0 creates the staging directory with a token in it; every other rank must read the
    same token there, or the export directory is not on a filesystem all ranks share. Collective:
    every rank returns the directory, or every rank raises (and nothing is left behind). An output
    that exists without ``overwrite`` is refused here, before the first byte is written (publishing
    checks again, under its lock, for an export that got there in between)."""
    staging, token = _make_staging(out_dir, plan, group, overwrite)
    error = None if group.is_main else _token_error(staging, token)
    with removed_on_failure(staging, group):
        agree(group, error, f"export of {out_dir}")
    if group.is_main:
        (staging / _TOKEN).unlink()
    return staging


def _make_staging(out_dir: Path, plan: ShardPlan, group: RankGroup, overwrite: bool) -> tuple[Path, str]:
    """Rank 0 makes the directory (after checking the free space) and tells every rank where it
    is; a failure there is raised on every rank (one process: as it is)."""
    token = uuid.uuid4().hex
    made: tuple[str, str] | str | BaseException
    if group.is_main:
        try:
            if out_dir.exists() and not overwrite:
                raise _exists_error(out_dir)
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            check_free_space(out_dir.parent, plan.total_size)
            staging = staging_dir_for(out_dir)
            staging.mkdir()
            (staging / _TOKEN).write_text(token)
            made = (str(staging), token)
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, below
            made = e
    else:
        made = ""
    if isinstance(made, BaseException) and group.world == 1:
        raise made
    made = group.broadcast(describe(made) if isinstance(made, BaseException) else made)
    if isinstance(made, str):
        raise RankFailedError([RankFailure(0, made)], f"export of {out_dir}")
    return Path(made[0]), made[1]


def _token_error(staging: Path, token: str) -> str | None:
    try:
        seen = (staging / _TOKEN).read_text()
    except OSError as e:
        seen = f"unreadable ({e})"
    if seen == token:
        return None
    return (f"cannot see the staging directory {staging} that rank 0 created (token {seen!r}): the export "
            "directory is not on a filesystem shared by all ranks (multi-node without shared storage?). "
            "Set HFExportHook(out_dir=...) to a directory every node mounts. Nothing was published.")


def staging_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}.incomplete-{uuid.uuid4().hex[:12]}"


class _Previous:
    """The previous complete snapshot of this run: its manifest says which tensors each shard
    holds, with their digests; a shard is reused only when names, order, dtypes, shapes (the
    header, byte for byte) and every digest are equal, made with the current digest algorithm (a
    snapshot of an older digest version is never linked from: its shards are written afresh)."""

    def __init__(self, path: Path, manifest: ExportManifest) -> None:
        self.path, self.tensors = path, manifest.tensors

    @classmethod
    def load(cls, path: Path | None) -> "_Previous | None":
        if path is None or not (path / MANIFEST_FILE).is_file():
            return None
        try:
            return cls(path, ExportManifest.load(path))
        except (OSError, ValueError, TypeError, KeyError):
            return None  # unreadable: write everything, as with no previous snapshot

    def same_shard(self, fname: str, slots: Sequence[TensorEntry], digests: Mapping[str, str]) -> bool:
        prev = self.path / fname
        names = {n for n, t in self.tensors.items() if isinstance(t, dict) and t.get("file") == fname}
        if names != {s.name for s in slots} or not is_regular_file(prev):  # a symlink or FIFO: never opened
            return False
        if any(self.tensors[s.name].get("algorithm", DIGEST_V1) != DIGEST_ALGORITHM or
               self.tensors[s.name].get("digest") != digests[s.name] for s in slots):
            return False
        header = safetensors_header(slots)
        with open(prev, "rb") as f:
            if f.read(len(header)) != header:
                return False
        return prev.stat().st_size == len(header) + sum(s.nbytes for s in slots)


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


def _exists_error(out_dir: Path) -> OutputExistsError:
    return OutputExistsError(f"snapshot directory {out_dir} already exists (published by another export, or "
                             "earlier); pass overwrite=True (--overwrite) to replace it, or choose another "
                             "output directory.")


def _publish_locked(staging: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise _exists_error(out_dir)
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
