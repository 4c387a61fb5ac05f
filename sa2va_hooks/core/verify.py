"""Check a written snapshot against its manifest, and trained fingerprints against an export.

Every check appends a one-line problem instead of raising, so one run reports everything that
is wrong ("missing X", "extra Y", "mismatch Z: expected A, got B").
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open

from .fingerprint import Fingerprint, compare_fingerprints, digest_tensor, root_digest
from .manifest import MANIFEST_FILE, ExportManifest, ManifestError, sha256_file
from .writer import _ST_DTYPES, INDEX_FILE, SINGLE_FILE

_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
# what sa2va_hooks writes into every shard's __metadata__ (and transformers needs to load it)
SHARD_METADATA = {"format": "pt"}
_ST_BYTES = {name: dtype.itemsize for dtype, name in _ST_DTYPES.items()}  # derived from the writer's table


class SnapshotInputError(ValueError):
    """What was given to verify is not a snapshot it can check (no directory, no manifest, a damaged
    manifest): bad input, exit 2, as opposed to a snapshot that differs from its manifest (exit 1)."""


def read_safetensors_header(path: Path) -> tuple[bytes, dict]:
    """(the header's raw bytes with their 8-byte length prefix, the parsed JSON) of a safetensors file,
    read without loading any tensor. Raises ValueError for anything that is not such a header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes: shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"header length {n} does not fit the file's {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return prefix + raw, header


def header_sha256(path: Path) -> str:
    """sha256 of a shard's header bytes: recorded at export, so that any byte of the header (metadata,
    dtypes, shapes, offsets, padding) is covered; the data bytes are covered by the tensor digests."""
    return hashlib.sha256(read_safetensors_header(path)[0]).hexdigest()


def hash_safetensors_file(path: Path, workers: int | None = None) -> dict[str, str]:
    """Digest of every tensor in one file, read back from disk through the safetensors library
    (which proves the format, not only the bytes). The digest covers name, dtype, shape and
    bytes, so the fp64 statistics are not recomputed here. The tensors are split between a few
    threads, each with its own handle: reading and xxhash both release the GIL, so a large shard
    is read back at disk speed rather than at one core's hashing speed."""
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    workers = max(1, min(workers or min(4, os.cpu_count() or 1), len(names)))
    parts = [names[i::workers] for i in range(workers)]

    def hash_part(part: list[str]) -> dict[str, str]:
        with safe_open(str(path), framework="pt") as f:
            return {name: digest_tensor(name, f.get_tensor(name)) for name in part}

    if workers == 1:
        return hash_part(names)
    out: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for got in pool.map(hash_part, parts):
            out.update(got)
    return {n: out[n] for n in names}


def _check_files(root: Path, manifest: ExportManifest) -> list[str]:
    problems = []
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    for rel in sorted(set(manifest.files) - present):
        problems.append(f"missing file {rel}")
    for rel in sorted(present - set(manifest.files)):
        problems.append(f"extra file {rel}")
    for rel in sorted(set(manifest.files) & present):
        entry = manifest.files[rel]
        size = (root / rel).stat().st_size
        if size != entry["size"]:
            problems.append(f"mismatch size of {rel}: expected {entry['size']}, got {size}")
        elif "sha256" in entry and sha256_file(root / rel) != entry["sha256"]:
            problems.append(f"mismatch sha256 of {rel}: expected {entry['sha256']}, got {sha256_file(root / rel)}")
    return problems


def _check_index(root: Path, manifest: ExportManifest) -> list[str]:
    expected_map = {name: t["file"] for name, t in manifest.tensors.items()}
    shard_files = sorted(set(expected_map.values()))
    if shard_files == [SINGLE_FILE]:
        return [f"extra file {INDEX_FILE} beside a single {SINGLE_FILE}"] if (root / INDEX_FILE).exists() else []
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        return [f"missing {INDEX_FILE} for {len(shard_files)} shards"]
    try:
        index = json.loads(index_path.read_text())
        weight_map, total = index["weight_map"], index["metadata"]["total_size"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return [f"corrupt {INDEX_FILE}: {e}"]
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
        if not path.is_file():
            continue  # reported as a missing file
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
        problems += _tensor_headers(fname, header, manifest, path.stat().st_size - len(raw))
    return problems


def _tensor_headers(fname: str, header: dict, manifest: ExportManifest, data_size: int) -> list[str]:
    problems, spans = [], []
    for name, e in header.items():
        if not (isinstance(e, dict) and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                and all(isinstance(x, int) for x in e["data_offsets"]) and isinstance(e.get("shape"), list)):
            problems.append(f"corrupt header entry {name} in {fname}: {e!r}")
            continue
        m = manifest.tensors.get(name)
        if m is not None and m["file"] == fname:
            want = _ST_DTYPES.get(getattr(torch, m["dtype"], None), f"unknown dtype {m['dtype']!r}")
            if e.get("dtype") != want:
                problems.append(f"mismatch dtype of {name} in {fname}: manifest says {want}, header says {e.get('dtype')}")
            if e["shape"] != m["shape"]:
                problems.append(f"mismatch shape of {name} in {fname}: manifest says {m['shape']}, header says {e['shape']}")
        start, end = e["data_offsets"]
        count = 1
        for d in e["shape"]:
            count *= d if isinstance(d, int) else 0
        if end - start != count * _ST_BYTES.get(e.get("dtype"), -1):
            problems.append(f"corrupt header entry {name} in {fname}: offsets {e['data_offsets']} do not hold "
                            f"{e.get('dtype')} {e['shape']}")
        spans.append((start, end, name))
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            problems.append(f"corrupt header of {fname}: {name} starts at {start}, expected {at} (a gap or overlap)")
        at = max(at, end)
    if spans and at != data_size:
        problems.append(f"corrupt header of {fname}: the tensors end at byte {at} of {data_size} data bytes")
    return problems


def _nbytes(t: Mapping) -> int:
    return Fingerprint.from_json({**t, "name": ""}).nbytes


def _check_tensors(root: Path, manifest: ExportManifest) -> list[str]:
    files = sorted({t["file"] for t in manifest.tensors.values()})
    problems, got = check_shard_data(root, manifest.tensors, files)
    if not problems and root_digest(got) != manifest.root_digest:
        problems.append(f"mismatch root digest: expected {manifest.root_digest}, got {root_digest(got)}")
    return problems


def check_shard_data(root: Path, tensors: Mapping[str, Mapping], files: list[str]) -> tuple[list[str], dict[str, str]]:
    """Read ``files`` back through safetensors and compare every tensor with its manifest entry
    (``tensors``: name -> entry with file, dtype, shape, digest). Returns (problems, digests read).
    ``verify`` runs it on every shard; an export runs it on each rank's own shards, before publishing."""
    expected = {name: Fingerprint.from_json({**t, "name": name}) for name, t in tensors.items() if t["file"] in files}
    got: dict[str, str] = {}
    problems = []
    for fname in files:
        path = root / fname
        if not path.is_file():
            continue  # already reported as a missing file
        try:
            file_fps = hash_safetensors_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            problems.append(f"unreadable shard {fname}: {e}")
            continue
        for name, fp in file_fps.items():
            if name in got:
                problems.append(f"duplicate tensor {name} in {fname}")
            if name in tensors and tensors[name]["file"] != fname:
                problems.append(f"misplaced tensor {name}: expected in {tensors[name]['file']}, got {fname}")
            got[name] = fp
    unread = {n for n in expected if not (root / tensors[n]["file"]).is_file() or
              any(p.startswith(f"unreadable shard {tensors[n]['file']}") for p in problems)}
    problems += [_with_file(str(m), tensors.get(m.name)) for m in compare_fingerprints(expected, got)
                 if not (m.kind == "missing" and m.name in unread)]
    return problems, got


def _with_file(problem: str, entry) -> str:
    """Name the file too: a file hard-linked into several snapshots fails in each of them."""
    return f"{problem} (in {entry['file']})" if isinstance(entry, dict) and "file" in entry else problem


_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "tok_embeddings.weight")


def _vocab_sizes(node, where: str = "") -> list[tuple[str, object]]:
    """Every ``vocab_size`` in a (nested) config.json, with where it sits."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{where}.{k}" if where else k
            if k == "vocab_size":
                out.append((path, v))
            else:
                out += _vocab_sizes(v, path)
    return out


def _check_shapes(root: Path, manifest: ExportManifest) -> list[str]:
    """An empty tensor or a zero vocabulary is never a trained model (it is what a ZeRO-3
    placeholder read outside a gather looks like), and the embedding rows must be a vocabulary
    size the config declares, or from_pretrained fails (or silently resizes)."""
    # a scalar (shape [], one element: a BatchNorm's num_batches_tracked) is not empty
    problems = [f"empty tensor {n}: shape {t.get('shape')} has no elements"
                for n, t in sorted(manifest.tensors.items()) if 0 in t.get("shape", [0])]
    cfg_path = root / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except json.JSONDecodeError as e:
        return problems + [f"corrupt config.json: {e}"]
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
