"""Check a written snapshot against its manifest, and trained fingerprints against an export.

This module checks the snapshot as a whole (its files, index, config shapes and root digest);
reading one shard back (its header and tensor digests) is ``shard_check.py``. Every check appends
a one-line problem instead of raising, so one run reports everything that is wrong ("missing X",
"extra Y", "mismatch Z: expected A, got B").
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Mapping

from .errors import BadInputError, BadTypeError
from .fingerprint import Fingerprint, root_digest
from .manifest import (MANIFEST_FILE, ExportManifest, JSONFileError, ManifestError, file_kind,
                       is_regular_file, read_json_file, sha256_file)
# check_shard_data, hash_safetensors_file, header_sha256 and read_safetensors_header are imported from here
# by the export pipeline and the tests
from .shard_check import (check_shard_data, hash_safetensors_file, header_sha256,  # noqa: F401
                          read_safetensors_header, tensor_header_problems)
from .vocab import INDEX_FILE, SHARD_METADATA, SINGLE_FILE


class SnapshotInputError(BadInputError, ValueError):
    """What was given to verify is not a snapshot it can check (no directory, no manifest, a damaged
    manifest): bad input, exit 2, as opposed to a snapshot that differs from its manifest (exit 1)."""


def _walk_entries(root: Path) -> tuple[dict[str, os.stat_result], list[str]]:
    """Every entry under ``root`` (files, directories, symlinks, FIFOs...), relative path -> ``lstat``,
    without following a symlink; and a problem for each directory that cannot be listed."""
    entries: dict[str, os.stat_result] = {}
    problems: list[str] = []

    def unreadable(e: OSError) -> None:
        problems.append(f"unreadable directory {Path(e.filename).relative_to(root).as_posix() or '.'}: {e.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):  # never follows a symlinked dir
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                entries[p.relative_to(root).as_posix()] = os.lstat(p)
            except OSError as e:
                problems.append(f"unreadable entry {p.relative_to(root).as_posix()}: {e.strerror}")
    return entries, problems


def _check_files(root: Path, manifest: ExportManifest) -> list[str]:
    """The snapshot holds exactly the manifest's files (and the manifest), each a regular file of the
    recorded size and sha256, and the directories that hold them: nothing else. A symlink (it may lead
    outside the snapshot: ``rootlink -> /``), a FIFO, socket or device (never opened: reading a FIFO
    blocks forever) or an entry the manifest does not know, file or directory, empty or not, is a
    problem naming its path: a snapshot verified here is self-contained, whatever copies it next."""
    entries, problems = _walk_entries(root)
    known = set(manifest.files) | {MANIFEST_FILE}
    known_dirs = {p.as_posix() for rel in known for p in Path(rel).parents if p.as_posix() != "."}
    real_root = os.path.realpath(root)
    present = set()
    for rel, st in sorted(entries.items()):
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            target = os.readlink(root / rel)
            resolved = os.path.realpath(root / rel)
            where = ("leads outside the snapshot, to " + resolved
                     if os.path.commonpath([real_root, resolved]) != real_root else "inside the snapshot")
            problems.append(f"symlink {rel} -> {target} ({where}): a snapshot holds no symlinks; it was not followed")
        elif stat.S_ISDIR(mode):
            if rel not in known_dirs:
                problems.append(f"extra directory {rel}" + ("" if any(e.startswith(rel + "/") for e in entries)
                                                           else " (empty)"))
        elif not stat.S_ISREG(mode):
            problems.append(f"not a regular file {rel}: {file_kind(mode)}; a snapshot holds only regular files "
                            "(it was not opened)")
        elif rel not in known:
            problems.append(f"extra file {rel}")
        elif os.path.commonpath([real_root, os.path.realpath(root / rel)]) != real_root:
            problems.append(f"file {rel} resolves outside the snapshot, to {os.path.realpath(root / rel)}")
        else:
            present.add(rel)
    for rel in sorted(set(manifest.files) - set(entries)):
        problems.append(f"missing file {rel}")
    for rel in sorted(set(manifest.files) & present):
        entry = manifest.files[rel]
        size = entries[rel].st_size
        if size != entry["size"]:
            problems.append(f"mismatch size of {rel}: expected {entry['size']}, got {size}")
            continue
        if "sha256" not in entry:
            continue
        try:
            got = sha256_file(root / rel)
        except OSError as e:
            problems.append(f"unreadable file {rel}: {e}")
            continue
        if got != entry["sha256"]:
            problems.append(f"mismatch sha256 of {rel}: expected {entry['sha256']}, got {got}")
    return problems


def _json_of(root: Path, name: str) -> tuple[object, str | None]:
    """(parsed JSON, None) of a snapshot's ``name``, or (None, the problem): not a regular file (reported
    by _check_files, never opened), not JSON, nested too deeply, unreadable."""
    path = root / name
    if not is_regular_file(path):
        return None, None if os.path.lexists(path) else f"missing {name}"
    try:
        return read_json_file(path), None
    except (JSONFileError, OSError) as e:
        return None, f"corrupt {name}: {e}"


def _check_index(root: Path, manifest: ExportManifest) -> list[str]:
    expected_map = {name: t["file"] for name, t in manifest.tensors.items()}
    shard_files = sorted(set(expected_map.values()))
    if shard_files == [SINGLE_FILE]:
        return [f"extra file {INDEX_FILE} beside a single {SINGLE_FILE}"] if (root / INDEX_FILE).exists() else []
    if not os.path.lexists(root / INDEX_FILE):
        return [f"missing {INDEX_FILE} for {len(shard_files)} shards"]
    index, problem = _json_of(root, INDEX_FILE)
    if index is None:
        return [problem] if problem else []  # not a regular file: reported by _check_files
    try:
        weight_map, total = index["weight_map"], index["metadata"]["total_size"]
        if not isinstance(weight_map, dict):
            raise BadTypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
    except (KeyError, TypeError) as e:
        return [f"corrupt {INDEX_FILE}: {type(e).__name__}: {e}"]
    problems = [f"index maps {k} to {weight_map.get(k)}, manifest says {v}"
                for k, v in sorted(expected_map.items()) if weight_map.get(k) != v]
    problems += [f"extra index entry {k}" for k in sorted(set(weight_map) - set(expected_map))]
    expected_total = sum(_nbytes(t) for t in manifest.tensors.values())
    if total != expected_total:
        problems.append(f"mismatch index total_size: expected {expected_total}, got {total}")
    return problems


def _check_headers(root: Path, manifest: ExportManifest) -> list[str]:
    """Each shard's header against the manifest: the exact bytes (when recorded), the metadata, and
    per tensor the dtype, the shape and offsets that tile the data with no gap, overlap or tail."""
    problems = []
    for fname in sorted({t["file"] for t in manifest.tensors.values()}):
        path = root / fname
        if not is_regular_file(path):
            continue  # reported as a missing file, a symlink or not a regular file
        try:
            raw, header = read_safetensors_header(path)
        except (OSError, ValueError) as e:
            problems.append(f"corrupt header of {fname}: {e}")
            continue
        want = manifest.files.get(fname, {}).get("header_sha256")
        got = hashlib.sha256(raw).hexdigest()
        if want is not None and got != want:
            problems.append(f"mismatch header of {fname}: sha256 expected {want}, got {got}")
        meta = header.pop("__metadata__", None)
        if meta != SHARD_METADATA:
            problems.append(f"mismatch __metadata__ of {fname}: expected {SHARD_METADATA}, got {meta}")
        problems += tensor_header_problems(fname, header, manifest, path.stat().st_size - len(raw))
    return problems


def _nbytes(t: Mapping) -> int:
    return Fingerprint.from_json({**t, "name": ""}).nbytes


def _check_tensors(root: Path, manifest: ExportManifest) -> list[str]:
    files = sorted({t["file"] for t in manifest.tensors.values()})
    problems, got = check_shard_data(root, manifest.tensors, files)
    if not problems and root_digest(got) != manifest.root_digest:
        problems.append(f"mismatch root digest: expected {manifest.root_digest}, got {root_digest(got)}")
    return problems


_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "tok_embeddings.weight")


def _vocab_sizes(node, where: str = "") -> list[tuple[str, object]]:
    """Every ``vocab_size`` in a (nested) config.json, with where it sits. Walked with a stack, not
    recursion: a config nested as deep as the JSON parser allows must not raise RecursionError here."""
    out = []
    stack = [(node, where)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            for k, v in reversed(list(node.items())):
                path = f"{where}.{k}" if where else k
                if k == "vocab_size":
                    out.append((path, v))
                else:
                    stack.append((v, path))
    return sorted(out, key=lambda x: x[0])


def _check_shapes(root: Path, manifest: ExportManifest) -> list[str]:
    """An empty tensor or a zero vocabulary is never a trained model (it is what a ZeRO-3
    placeholder read outside a gather looks like), and the embedding rows must be a vocabulary
    size the config declares, or from_pretrained fails (or silently resizes)."""
    # a scalar (shape [], one element: a BatchNorm's num_batches_tracked) is not empty
    problems = [f"empty tensor {n}: shape {t.get('shape')} has no elements"
                for n, t in sorted(manifest.tensors.items()) if 0 in t.get("shape", [0])]
    cfg, problem = _json_of(root, "config.json") if os.path.lexists(root / "config.json") else ({}, None)
    if problem:
        return problems + [problem]
    vocab = _vocab_sizes(cfg)
    problems += [f"config.json {where} is {v!r}: a model with no vocabulary" for where, v in vocab
                 if not isinstance(v, int) or v <= 0]
    sizes = {v for _, v in vocab if isinstance(v, int)}
    if sizes:
        for n, t in sorted(manifest.tensors.items()):
            shape = t.get("shape") or []
            if n.endswith(_EMBEDDING_SUFFIXES) and shape and shape[0] not in sizes:
                problems.append(f"mismatch {n}: {shape[0]} rows, but config.json declares vocab_size "
                                f"{sorted(sizes)}")
    return problems


def verify_snapshot(snapshot_dir: str | Path, *, data: bool = True) -> list[str]:
    """All problems found in a snapshot; an empty list means it is exactly what was exported.
    ``data=False`` skips reading the tensors back (an export does that per rank, with
    :func:`check_shard_data`, before it calls this on the staged snapshot).

    Raises :class:`SnapshotInputError` when there is nothing it can check: ``snapshot_dir`` is not a
    directory, has no manifest (a plain HF folder, an empty folder), or its manifest is damaged."""
    root = Path(snapshot_dir)
    try:
        manifest = ExportManifest.load(root)
    except (FileNotFoundError, ManifestError) as e:
        raise SnapshotInputError(str(e)) from None
    if not manifest.tensors:
        return [f"{MANIFEST_FILE} lists no tensors: an empty export is never a trained model"]
    return (_check_files(root, manifest) + _check_index(root, manifest) + _check_shapes(root, manifest) +
            _check_headers(root, manifest) + (_check_tensors(root, manifest) if data else []))
