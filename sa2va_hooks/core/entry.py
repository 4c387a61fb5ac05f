"""One tensor on its way from the model to a shard and the manifest, in three frozen forms.

    TensorEntry      planned: everything known before a byte is produced (HF name, how to
                     produce it, shape and dtype in the file, role, frozen-only, file, bytes)
    ProducedTensor   produced: the host bytes, their statistics and the digest being computed,
                     plus what only the merge could tell (a tuner changed a frozen bias)
    TensorRecord     recorded: what the manifest says about it, byte for byte as before

Why three and not one mutable object: an entry is shared by every rank and thread (the plan, the
shard writer, the training thread that gathers, the writer thread that writes), so it must not
change once planned; what production adds belongs to one rank's one export and travels with the
bytes (through the byte queue, to the hasher); the record is what crosses ranks and goes to disk.
Each fact is decided once, where it is known: shape, file dtype, bytes and file at planning, the
final role when the tensor is produced (:meth:`ProducedTensor.of`), the digest after hashing.
"""
from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from .fingerprint import DIGEST_ALGORITHM, dtype_name

if TYPE_CHECKING:
    from .merge import MergedTensor, SourceTensor


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype`` in a safetensors file (no padding: the
    format packs tensors back to back). The one place a planned size is computed."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclasses.dataclass(frozen=True, eq=False)
class TensorEntry:
    """One tensor of the export, as planned. ``eq=False``: two entries are the same entry only
    if they are the same object (the shard writer checks plan order by identity), and an entry
    holds live tensors (``source.gather``) that must never be compared element-wise."""

    name: str  # the HF name, in the files and the manifest
    source: SourceTensor  # how to produce it, which parameters it reads, which must be gathered
    shape: tuple[int, ...]
    dtype: torch.dtype  # in the file: the export dtype for floating tensors, else the source's
    role: str  # as planned; only the merge may refine it (see ProducedTensor.of)
    frozen_only: bool  # computed from frozen tensors only: its shard may be hard-linked next time
    nbytes: int
    file: str = ""  # the shard it goes into; set once the shards are planned

    @classmethod
    def plan(cls, name: str, st: SourceTensor, export_dtype: torch.dtype | None) -> TensorEntry:
        dtype = st.out_dtype(export_dtype)
        return cls(name=name, source=st, shape=tuple(st.shape), dtype=dtype, role=st.role, frozen_only=st.static,
                   nbytes=nbytes_of(tuple(st.shape), dtype))

    def in_file(self, fname: str) -> TensorEntry:
        return dataclasses.replace(self, file=fname)

    @property
    def sources(self) -> tuple[str, ...]:
        """The training-time names of the parameters that feed this tensor."""
        return self.source.sources

    @property
    def gather(self) -> tuple[torch.Tensor, ...]:
        """The parameters that must be whole while it is produced (ZeRO-3 gathers them)."""
        return self.source.gather

    def materialize(self) -> MergedTensor:
        """The tensor as it goes into the file (merged, cast), on its source's device."""
        return self.source.materialize(self.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class ProducedTensor:
    """One entry's bytes on the host, ready to write, and what producing them found out. The
    statistics are computed where the tensor was made (on its device, in fp64); ``digest`` is the
    hash being computed on a helper thread while the bytes are written, ``None`` until then."""

    entry: TensorEntry
    host: torch.Tensor
    norm: float
    sum: float
    role: str  # final
    delta_rel_norm: float | None  # LoRA only: ||W_merged - W_base|| / ||W_base||
    differs_from_base: bool | None  # after the cast to the file dtype; None = unknown
    digest: Future | None = None

    @classmethod
    def of(cls, entry: TensorEntry, merged: MergedTensor, host: torch.Tensor, norm: float, total: float,
           digest: Future | None = None) -> ProducedTensor:
        """The role is final here: the planned one, unless the merge found out what planning could
        not (a frozen bias that a tuner such as lora_bias or IA3 actually changed is ``lora_merged``;
        one it left equal stays ``frozen``)."""
        return cls(entry=entry, host=host, norm=norm, sum=total, role=merged.role or entry.role,
                   delta_rel_norm=merged.delta_rel_norm, differs_from_base=merged.differs_from_base, digest=digest)

    def record(self, digest: str) -> TensorRecord:
        """The manifest's record of these bytes (dtype and shape as produced: what was hashed)."""
        return TensorRecord(name=self.entry.name, dtype=dtype_name(self.host.dtype),
                            shape=tuple(int(s) for s in self.host.shape), digest=digest, norm=self.norm,
                            sum=self.sum, file=self.entry.file, role=self.role, sources=tuple(self.entry.sources))


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """One tensor as the manifest describes it; crosses ranks (pickled) and goes to disk."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    norm: float
    sum: float
    file: str
    role: str
    sources: tuple[str, ...]
    algorithm: str = DIGEST_ALGORITHM

    def to_json(self) -> dict:
        """The manifest's entry, keys in the order manifests have always had them (the golden test
        compares the manifest's bytes); the name is the key it is stored under."""
        return {"dtype": self.dtype, "shape": list(self.shape), "digest": self.digest, "norm": self.norm,
                "sum": self.sum, "algorithm": self.algorithm, "file": self.file, "role": self.role,
                "sources": list(self.sources)}
