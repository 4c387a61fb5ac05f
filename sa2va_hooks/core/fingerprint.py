"""Tensor fingerprints: a content digest plus dtype-tolerant statistics.

A digest answers "is this exactly the tensor that was trained?"; the fp64 norm and
sum answer "is it numerically the same tensor after a dtype change?". Both are
needed: an export is usually cast (fp32 training -> bf16 snapshot), so the bytes
change while the values should not move by more than the cast allows.

The digest covers name, dtype, shape and bytes, so a renamed, reshaped or recast
tensor never collides with the original. The algorithm string records every
setting that changes the output, so two fingerprints are only ever compared when
they were made the same way.

Two digest versions exist; new code writes only v2 (decision 59):

- v1, ``xxh3_128(name,dtype,shape,bytes)``: one serial xxh3 stream per tensor. A 1.1 GB
  embedding hashes on one core however many there are, while training waits.
- v2, the same header, then the 16-byte xxh3_128 of each consecutive :data:`CHUNK_BYTES`
  chunk of the raw bytes: the chunks hash in parallel (xxhash releases the GIL), and a rank
  that holds only a contiguous element range of a flattened tensor (ZeRO-3, FSDP) hashes its
  whole chunks itself, exchanging only the boundary chunks' bytes. :func:`chunk_digest` and
  :func:`digest_from_chunks` are the pieces such a caller reuses.

Every stored digest names its algorithm (``Fingerprint.algorithm``, a manifest entry's
``algorithm``; a record without one is v1), and a stored digest is always recomputed with the
algorithm it names (:func:`digest_tensor_as`), so v1 snapshots and checkpoints keep verifying.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from typing import Iterable, Mapping, Sequence

import torch
import xxhash

from .errors import BadValueError
from .vocab import CHUNK_ELEMENTS, DIGEST_V1
from .workers import Workers
# 16 MiB: a 1.1 GB embedding is ~70 chunks, enough to keep 8 threads busy, while a chunk is large
# enough that its 16-byte digest and the per-chunk call cost nothing (< 0.01% of the hashing)
CHUNK_BYTES = 16 << 20
MAX_DIGEST_THREADS = 8  # the default pool never has more threads than min(this, cpu_count)
ROOT_ALGORITHM = "xxh3_128(sorted name=digest lines);v1"
_V2 = re.compile(r"xxh3_128\(name,dtype,shape,xxh3_128 per (\d+)(B|KiB|MiB|GiB) chunk\);v2")
_UNITS = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10, "B": 1}


def digest_algorithm(chunk_bytes: int = CHUNK_BYTES) -> str:
    """The v2 algorithm string for a chunk size: the size is part of it, because it changes the digest."""
    if chunk_bytes <= 0:
        raise BadValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    unit = next(u for u, n in _UNITS.items() if chunk_bytes % n == 0)
    return f"xxh3_128(name,dtype,shape,xxh3_128 per {chunk_bytes // _UNITS[unit]}{unit} chunk);v2"


DIGEST_V2 = digest_algorithm(CHUNK_BYTES)
DIGEST_ALGORITHM = DIGEST_V2  # the one new digests are made with


class UnknownDigestAlgorithmError(BadValueError):
    """A stored digest names an algorithm this version cannot compute (written by a newer one)."""


def chunk_bytes_of(algorithm: str) -> int | None:
    """The chunk size a v2 algorithm string records; None for v1. Raises
    :class:`UnknownDigestAlgorithmError` for any other string."""
    if algorithm == DIGEST_V1:
        return None
    m = _V2.fullmatch(algorithm)
    if m is None or int(m.group(1)) <= 0:
        raise UnknownDigestAlgorithmError(
            f"unknown digest algorithm {algorithm!r}: this sa2va_hooks computes {DIGEST_V1!r} and "
            f"{DIGEST_V2!r} (any chunk size); a newer sa2va_hooks wrote it, upgrade to check it")
    return int(m.group(1)) * _UNITS[m.group(2)]


def is_known_algorithm(algorithm: str) -> bool:
    try:
        chunk_bytes_of(algorithm)
    except UnknownDigestAlgorithmError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What one tensor was, in a form that survives JSON."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    norm: float
    sum: float
    algorithm: str = DIGEST_ALGORITHM

    def to_json(self) -> dict:
        # every field is a str, a float or the shape: no deep copy needed (asdict's recursion, per
        # tensor, held the GIL in the export's thread, issue 18)
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "Fingerprint":
        # a record that names no algorithm predates digest v2
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]), digest=d["digest"],
                   norm=float(d["norm"]), sum=float(d["sum"]), algorithm=d.get("algorithm", DIGEST_V1))

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * getattr(torch, self.dtype).itemsize


def tensor_bytes(t: torch.Tensor):
    """The raw little-endian bytes of `t` as a numpy uint8 array, without a dtype round trip.

    Viewing as uint8 works for every dtype numpy lacks (bfloat16, float8), and it hashes what
    safetensors writes, byte for byte.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")




def tensor_stats_pending(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 sum of squares and sum of ``t`` as 0-d tensors where ``t`` lives, not yet read: on a
    GPU the kernels are queued and nothing waits, so many tensors cost one synchronisation
    (:func:`stats_values`). Computed in chunks, so a 150k-row embedding needs no full fp64 copy."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        n = flat.sum(dtype=torch.float64)
        return n + 0.0, n + 0.0
    if flat.numel() <= CHUNK_ELEMENTS:  # one chunk (nearly every tensor): 4 calls, not 11 (see _one_chunk)
        return _one_chunk(flat)
    squares = torch.zeros((), dtype=torch.float64, device=flat.device)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        c = flat[start:start + CHUNK_ELEMENTS]
        c = (c.abs() if c.is_complex() else c).to(torch.float64)
        squares += torch.dot(c, c)
        total += c.sum()
    return squares, total


def _one_chunk(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop above for one chunk, value for value: ``0 + x`` is ``x`` for the sum of squares
    (never -0.0), and the sum gets the same ``+ 0.0`` (it turns a -0.0 sum into 0.0, as the loop
    does). Why it matters: every torch call of the export's thread is a GIL hand-over that the
    training thread waits for (issue 18, docs/benchmarks.md)."""
    c = (flat.abs() if flat.dtype.is_complex else flat).to(torch.float64)
    return torch.dot(c, c), c.sum() + 0.0


def stats_values(pending: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    squares, total = pending
    return float(squares.sqrt()), float(total)


def tensor_stats(t: torch.Tensor) -> tuple[float, float]:
    """fp64 L2 norm and sum, computed where the tensor lives (the GPU is far faster at this)."""
    return stats_values(tensor_stats_pending(t))


def _header(name: str, dtype: "torch.dtype | str", shape: Sequence[int]) -> bytes:
    """What both versions hash first: name, dtype and shape as JSON (so a rename, recast or reshape
    never collides with the original)."""
    dtype = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
    return json.dumps([name, dtype, [int(s) for s in shape]]).encode()


def digest_tensor_v1(name: str, host: torch.Tensor) -> str:
    """v1: xxh3-128 over name, dtype, shape and the raw bytes, one serial stream. Only to check v1 records."""
    h = xxhash.xxh3_128()
    h.update(_header(name, host.dtype, host.shape))
    h.update(tensor_bytes(host))
    return h.hexdigest()


def chunk_digest(data) -> bytes:
    """The 16-byte xxh3-128 digest (canonical, big-endian) of one chunk: any bytes-like object
    (bytes, memoryview, a uint8 numpy array). v2 hashes each ``CHUNK_BYTES`` chunk with this.
    Through the hasher object on purpose: its constructor and ``update`` release the GIL while
    hashing, the one-shot ``xxhash.xxh3_128_digest`` does not (python-xxhash 3.x), and the chunks
    of a tensor hash on several threads."""
    return xxhash.xxh3_128(data).digest()


def digest_from_chunks(name: str, dtype: "torch.dtype | str", shape: Sequence[int],
                       chunk_digests: Sequence[bytes]) -> str:
    """v2 digest from the header and the chunk digests, in order (an empty tensor has none). A
    distributed caller computes the chunk digests wherever the bytes are and calls this once."""
    h = xxhash.xxh3_128()
    h.update(_header(name, dtype, shape))
    for d in chunk_digests:
        if len(d) != 16:
            raise BadValueError(f"chunk digest of {name} is {len(d)} bytes, expected 16 (use chunk_digest)")
        h.update(d)
    return h.hexdigest()


_default_pool: Workers | None = None
_default_lock = threading.Lock()


def default_digest_workers() -> Workers:
    """The process-wide pool that hashes chunks: min(8, cpu_count) threads, made at first use and
    kept (a pool per call would start threads at every checkpoint)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = Workers(min(MAX_DIGEST_THREADS, os.cpu_count() or 1), "sa2va_hooks-digest")
        return _default_pool


def digest_tensor(name: str, host: torch.Tensor, workers: Workers | None = None, *,
                  chunk_bytes: int = CHUNK_BYTES) -> str:
    """v2 digest of a host tensor (the current algorithm, :data:`DIGEST_ALGORITHM` for the default
    ``chunk_bytes``). A tensor of two chunks or more hashes its chunks on ``workers`` (the
    process-wide pool by default); a smaller one, or a call from one of the pool's own threads,
    hashes serially. The result does not depend on the threads."""
    if chunk_bytes <= 0:
        raise BadValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    data = tensor_bytes(host)
    spans = [(i, min(i + chunk_bytes, len(data))) for i in range(0, len(data), chunk_bytes)]
    pool = workers if workers is not None else (default_digest_workers() if len(spans) > 1 else None)
    if pool is None or len(spans) < 2 or pool.owns_current_thread():
        digests = [chunk_digest(data[a:b]) for a, b in spans]
    else:
        digests = pool.map(lambda span: chunk_digest(data[span[0]:span[1]]), spans)
    return digest_from_chunks(name, host.dtype, host.shape, digests)


def digest_tensor_as(algorithm: str, name: str, host: torch.Tensor, workers: Workers | None = None) -> str:
    """The digest of ``host`` made with ``algorithm``, the one a stored record names: how a stored
    digest is checked, so v1 records keep verifying. Raises :class:`UnknownDigestAlgorithmError`."""
    chunk = chunk_bytes_of(algorithm)
    if chunk is None:
        return digest_tensor_v1(name, host)
    return digest_tensor(name, host, workers, chunk_bytes=chunk)


def fingerprint_tensor(name: str, t: torch.Tensor, host: torch.Tensor | None = None, *,
                       algorithm: str = DIGEST_ALGORITHM) -> Fingerprint:
    """Digest and fp64 statistics of one tensor. ``host`` is a CPU copy of ``t`` when the caller
    already made one (the exporter does), so the bytes cross the bus only once. ``algorithm`` is
    another version only to check a stored record against."""
    norm, total = tensor_stats(t)
    if host is None:
        host = t.detach().cpu() if t.device.type != "cpu" else t.detach()
    digest = digest_tensor(name, host) if algorithm == DIGEST_ALGORITHM else digest_tensor_as(algorithm, name, host)
    return Fingerprint(name=name, dtype=dtype_name(t.dtype), shape=tuple(int(s) for s in t.shape),
                       digest=digest, norm=norm, sum=total, algorithm=algorithm)


def _digest(x: "Fingerprint | str") -> str:
    return x.digest if isinstance(x, Fingerprint) else x


def root_digest(fingerprints: Mapping[str, "Fingerprint | str"]) -> str:
    """One digest over a set of tensors (name -> Fingerprint or digest), independent of order."""
    lines = sorted(f"{name}={_digest(fp)}" for name, fp in fingerprints.items())
    return xxhash.xxh3_128("\n".join(lines).encode()).hexdigest()


def fingerprint_state(named_tensors: Iterable[tuple[str, torch.Tensor]],
                      algorithms: Mapping[str, str] | None = None) -> dict[str, Fingerprint]:
    """Fingerprints of many tensors, keyed by name. GPU tensors reach the host through one reused
    pinned buffer (a plain .cpu() goes through pageable memory at about 1.3 GiB/s). ``algorithms``
    (name -> algorithm) recomputes the named ones as a stored record made them, to compare with it."""
    from .host import HostStager
    algorithms = algorithms or {}
    with HostStager() as stager:
        return {name: fingerprint_tensor(name, t, host=stager.to_host(t.detach()),
                                         algorithm=algorithms.get(name, DIGEST_ALGORITHM))
                for name, t in named_tensors}


@dataclasses.dataclass(frozen=True)
class FingerprintSet:
    """The trained (or frozen) tensors of a model at one moment, and their root digest."""

    tensors: dict[str, Fingerprint]
    root: str
    algorithm: str = ROOT_ALGORITHM

    @classmethod
    def of(cls, fps: Mapping[str, Fingerprint]) -> "FingerprintSet":
        return cls(tensors=dict(fps), root=root_digest(fps))

    @property
    def nbytes(self) -> int:
        return sum(fp.nbytes for fp in self.tensors.values())

    def to_json(self) -> dict:
        return {"algorithm": self.algorithm, "root": self.root, "count": len(self.tensors),
                "bytes": self.nbytes, "tensors": {k: v.to_json() for k, v in sorted(self.tensors.items())}}

    @classmethod
    def from_json(cls, d: Mapping) -> "FingerprintSet":
        fps = {k: Fingerprint.from_json(v) for k, v in d["tensors"].items()}
        return cls(tensors=fps, root=d["root"], algorithm=d.get("algorithm", ROOT_ALGORITHM))


@dataclasses.dataclass(frozen=True)
class FingerprintMismatch:
    kind: str  # "missing" | "extra" | "mismatch" | "incomparable"
    name: str
    expected: str | None = None
    got: str | None = None

    def __str__(self) -> str:
        if self.kind == "mismatch":
            return f"mismatch {self.name}: expected {self.expected}, got {self.got}"
        if self.kind == "incomparable":
            return (f"incomparable {self.name}: expected a digest made with {self.expected}, got one made with "
                    f"{self.got}; recompute it with the recorded algorithm (no verdict on its bytes)")
        return f"{self.kind} {self.name}"


def compare_fingerprints(expected: Mapping[str, "Fingerprint | str"],
                         got: Mapping[str, "Fingerprint | str"]) -> list[FingerprintMismatch]:
    """Every difference between two maps of name -> Fingerprint (or bare digest), one per tensor.
    Two Fingerprints made with different algorithms are "incomparable", never a mismatch: their
    digests differ whatever the bytes (a bare digest is taken to be made as its counterpart was)."""
    problems = [FingerprintMismatch("missing", k) for k in sorted(set(expected) - set(got))]
    problems += [FingerprintMismatch("extra", k) for k in sorted(set(got) - set(expected))]
    for k in sorted(set(expected) & set(got)):
        a, b = expected[k], got[k]
        if isinstance(a, Fingerprint) and isinstance(b, Fingerprint) and a.algorithm != b.algorithm:
            problems.append(FingerprintMismatch("incomparable", k, a.algorithm, b.algorithm))
        elif _digest(a) != _digest(b):
            problems.append(FingerprintMismatch("mismatch", k, _digest(expected[k]), _digest(got[k])))
    return problems
