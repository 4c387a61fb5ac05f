"""One safetensors shard, read back: its header (without loading a tensor), the digests of its
tensors, and both checked against the manifest's entries.

``verify_snapshot`` (``verify.py``) runs these on every shard of a snapshot; an export runs
:func:`check_shard_data` on each rank's own shards before publishing, so both read a shard the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open

from .errors import BadValueError
from .fingerprint import (DIGEST_ALGORITHM, DIGEST_V1, Fingerprint, compare_fingerprints, digest_tensor_as,
                          is_known_algorithm)
from .manifest import ExportManifest, NotRegularFileError, file_kind, is_regular_file, open_regular
from .workers import Workers
from .shards import _ST_DTYPES

_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_ST_BYTES = {name: dtype.itemsize for dtype, name in _ST_DTYPES.items()}  # derived from the writer's table


def read_safetensors_header(path: Path) -> tuple[bytes, dict]:
    """(the header's raw bytes with their 8-byte length prefix, the parsed JSON) of a safetensors file,
    read without loading any tensor. Raises ValueError for anything that is not such a header, and
    :class:`NotRegularFileError` (never opening it) for anything that is not a regular file."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise BadValueError(f"{size} bytes: shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, _MAX_HEADER):
            raise BadValueError(f"header length {n} does not fit the file's {size} bytes (not a safetensors file, "
                             "or a damaged one)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadValueError(f"header is not JSON ({e})") from e
    except RecursionError:
        raise BadValueError("header nests JSON too deeply to parse (damaged or hostile)") from None
    if not isinstance(header, dict):
        raise BadValueError("header is not a JSON object")
    return prefix + raw, header


def header_sha256(path: Path) -> str:
    """sha256 of a shard's header bytes: recorded at export, so that any byte of the header (metadata,
    dtypes, shapes, offsets, padding) is covered; the data bytes are covered by the tensor digests."""
    return hashlib.sha256(read_safetensors_header(path)[0]).hexdigest()


def hash_safetensors_file(path: Path, workers: int | None = None,
                          algorithms: Mapping[str, str] | None = None) -> dict[str, str]:
    """Digest of every tensor in one file, read back from disk through the safetensors library
    (which proves the format, not only the bytes). The digest covers name, dtype, shape and
    bytes, so the fp64 statistics are not recomputed here. The tensors are split between a few
    threads, each with its own handle: reading and xxhash both release the GIL, so a large shard
    is read back at disk speed rather than at one core's hashing speed. A path that is not a regular
    file (a symlink, a FIFO) raises :class:`NotRegularFileError` and is never opened.

    ``algorithms`` (name -> algorithm) hashes a tensor as its stored record names, so a v1 manifest is
    checked in v1; any other tensor is hashed with the current algorithm."""
    if not is_regular_file(path):
        raise NotRegularFileError(path, file_kind(os.lstat(path).st_mode))
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    algorithms = algorithms or {}
    workers = max(1, min(workers or min(4, os.cpu_count() or 1), len(names)))
    parts = [names[i::workers] for i in range(workers)]

    def hash_part(part: list[str]) -> dict[str, str]:
        with safe_open(str(path), framework="pt") as f:
            return {name: digest_tensor_as(algorithms.get(name, DIGEST_ALGORITHM), name, f.get_tensor(name))
                    for name in part}

    if workers == 1:
        return hash_part(names)
    out: dict[str, str] = {}
    with Workers(workers, "sa2va_hooks-verify") as pool:  # not an executor: works during interpreter shutdown
        for got in pool.map(hash_part, parts):
            out.update(got)
    return {n: out[n] for n in names}


def tensor_header_problems(fname: str, header: dict, manifest: ExportManifest, data_size: int) -> list[str]:
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
                problems.append(f"mismatch dtype of {name} in {fname}: manifest says {want}, "
                                f"header says {e.get('dtype')}")
            if e["shape"] != m["shape"]:
                problems.append(f"mismatch shape of {name} in {fname}: manifest says {m['shape']}, "
                                f"header says {e['shape']}")
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


def check_shard_data(root: Path, tensors: Mapping[str, Mapping], files: list[str]) -> tuple[list[str], dict[str, str]]:
    """Read ``files`` back through safetensors and compare every tensor with its manifest entry
    (``tensors``: name -> entry with file, dtype, shape, digest). Returns (problems, digests read).
    ``verify`` runs it on every shard; an export runs it on each rank's own shards, before publishing.
    Each tensor is recomputed with the digest algorithm its entry names (v1 when it names none); one
    this version does not know is reported, never compared."""
    expected = {name: Fingerprint.from_json({**t, "name": name}) for name, t in tensors.items() if t["file"] in files}
    problems = [f"unverifiable tensor {name}: its digest algorithm {fp.algorithm!r} is unknown to this "
                f"sa2va_hooks (written by a newer one?); upgrade to check it" for name, fp in sorted(expected.items())
                if not is_known_algorithm(fp.algorithm)]
    algorithms = {name: fp.algorithm if is_known_algorithm(fp.algorithm) else DIGEST_V1
                  for name, fp in expected.items()}
    got: dict[str, str] = {}
    for fname in files:
        path = root / fname
        if not is_regular_file(path):
            continue  # already reported as a missing file, a symlink or not a regular file
        try:
            file_fps = hash_safetensors_file(path, algorithms=algorithms)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            problems.append(f"unreadable shard {fname}: {e}")
            continue
        for name, fp in file_fps.items():
            if name in got:
                problems.append(f"duplicate tensor {name} in {fname}")
            if name in tensors and tensors[name]["file"] != fname:
                problems.append(f"misplaced tensor {name}: expected in {tensors[name]['file']}, got {fname}")
            got[name] = fp
    unread = {n for n in expected if not is_regular_file(root / tensors[n]["file"]) or
              any(p.startswith(f"unreadable shard {tensors[n]['file']}") for p in problems)}
    unknown = {n for n, fp in expected.items() if not is_known_algorithm(fp.algorithm)}
    problems += [_with_file(str(m), tensors.get(m.name))
                 for m in compare_fingerprints({n: fp for n, fp in expected.items() if n not in unknown},
                                               {n: d for n, d in got.items() if n not in unknown})
                 if not (m.kind == "missing" and m.name in unread)]
    return problems, got


def _with_file(problem: str, entry) -> str:
    """Name the file too: a file hard-linked into several snapshots fails in each of them."""
    return f"{problem} (in {entry['file']})" if isinstance(entry, dict) and "file" in entry else problem
