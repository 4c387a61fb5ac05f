"""Tensor fingerprints: a content digest plus dtype-tolerant statistics.

A digest answers "is this exactly the tensor that was trained?"; the fp64 norm and
sum answer "is it numerically the same tensor after a dtype change?". Both are
needed: an export is usually cast (fp32 training -> bf16 snapshot), so the bytes
change while the values should not move by more than the cast allows.

The digest covers name, dtype, shape and bytes, so a renamed, reshaped or recast
tensor never collides with the original. The algorithm string records every
setting that changes the output, so two fingerprints are only ever compared when
they were made the same way.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Mapping

import torch
import xxhash

from .vocab import CHUNK_ELEMENTS

DIGEST_ALGORITHM = "xxh3_128(name,dtype,shape,bytes);v1"
ROOT_ALGORITHM = "xxh3_128(sorted name=digest lines);v1"


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
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "Fingerprint":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]), digest=d["digest"],
                   norm=float(d["norm"]), sum=float(d["sum"]), algorithm=d.get("algorithm", DIGEST_ALGORITHM))

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


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
    squares = torch.zeros((), dtype=torch.float64, device=flat.device)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    if flat.dtype == torch.bool:
        n = flat.sum(dtype=torch.float64)
        return squares + n, total + n
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        c = flat[start:start + CHUNK_ELEMENTS]
        c = (c.abs() if c.is_complex() else c).to(torch.float64)
        squares += torch.dot(c, c)
        total += c.sum()
    return squares, total


def stats_values(pending: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    squares, total = pending
    return float(squares.sqrt()), float(total)


def tensor_stats(t: torch.Tensor) -> tuple[float, float]:
    """fp64 L2 norm and sum, computed where the tensor lives (the GPU is far faster at this)."""
    return stats_values(tensor_stats_pending(t))


def digest_tensor(name: str, host: torch.Tensor) -> str:
    """xxh3-128 over name, dtype, shape and the raw bytes of a host tensor."""
    h = xxhash.xxh3_128()
    h.update(json.dumps([name, dtype_name(host.dtype), [int(s) for s in host.shape]]).encode())
    h.update(tensor_bytes(host))
    return h.hexdigest()


def fingerprint_tensor(name: str, t: torch.Tensor, host: torch.Tensor | None = None) -> Fingerprint:
    """Digest and fp64 statistics of one tensor. ``host`` is a CPU copy of ``t`` when the caller
    already made one (the exporter does), so the bytes cross the bus only once."""
    norm, total = tensor_stats(t)
    if host is None:
        host = t.detach().cpu() if t.device.type != "cpu" else t.detach()
    return Fingerprint(name=name, dtype=dtype_name(t.dtype), shape=tuple(int(s) for s in t.shape),
                       digest=digest_tensor(name, host), norm=norm, sum=total)


def _digest(x: "Fingerprint | str") -> str:
    return x.digest if isinstance(x, Fingerprint) else x


def root_digest(fingerprints: Mapping[str, "Fingerprint | str"]) -> str:
    """One digest over a set of tensors (name -> Fingerprint or digest), independent of order."""
    lines = sorted(f"{name}={_digest(fp)}" for name, fp in fingerprints.items())
    return xxhash.xxh3_128("\n".join(lines).encode()).hexdigest()


def fingerprint_state(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Fingerprint]:
    """Fingerprints of many tensors, keyed by name. GPU tensors reach the host through one reused
    pinned buffer (a plain .cpu() goes through pageable memory at about 1.3 GiB/s)."""
    from .host import HostStager
    with HostStager() as stager:
        return {name: fingerprint_tensor(name, t, host=stager.to_host(t.detach())) for name, t in named_tensors}


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
    kind: str  # "missing" | "extra" | "mismatch"
    name: str
    expected: str | None = None
    got: str | None = None

    def __str__(self) -> str:
        if self.kind == "mismatch":
            return f"mismatch {self.name}: expected {self.expected}, got {self.got}"
        return f"{self.kind} {self.name}"


def compare_fingerprints(expected: Mapping[str, "Fingerprint | str"],
                         got: Mapping[str, "Fingerprint | str"]) -> list[FingerprintMismatch]:
    """Every difference between two maps of name -> Fingerprint (or bare digest), one per tensor."""
    problems = [FingerprintMismatch("missing", k) for k in sorted(set(expected) - set(got))]
    problems += [FingerprintMismatch("extra", k) for k in sorted(set(got) - set(expected))]
    for k in sorted(set(expected) & set(got)):
        if _digest(expected[k]) != _digest(got[k]):
            problems.append(FingerprintMismatch("mismatch", k, _digest(expected[k]), _digest(got[k])))
    return problems
