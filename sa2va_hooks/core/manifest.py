"""``export_manifest.json``: what a snapshot holds, where it came from, and what training did.

The manifest is written last, so its presence means the snapshot is complete. It holds a
digest per tensor (checked by ``verify``), the root digest over them, the fingerprints of the
trained parameters under their training-time names (checked against checkpoints), and a
training-effect summary that says, in numbers, whether training reached the export.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

MANIFEST_FILE = "export_manifest.json"
MANIFEST_FORMAT = "sa2va_hooks.export_manifest/v1"
_VERSIONED = ("sa2va_hooks", "torch", "transformers", "peft", "safetensors", "mmengine", "xtuner", "deepspeed")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@dataclasses.dataclass
class TrainingEffect:
    """Did training reach the export? Counted over the exported tensors that carry training."""

    trained_tensors: int = 0
    trained_differ_from_base: int = 0
    trained_identical_to_base: list[str] = dataclasses.field(default_factory=list)
    trained_unknown_base: list[str] = dataclasses.field(default_factory=list)
    frozen_tensors: int = 0
    lora_rel_delta: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def identical_to_base(self) -> bool:
        """True when there is training to show and none of it is visible in the export."""
        return self.trained_tensors > 0 and self.trained_differ_from_base == 0 and not self.trained_unknown_base

    def absorb(self, other: "TrainingEffect") -> None:
        """Add another rank's counts (each rank counts the tensors it wrote)."""
        self.trained_tensors += other.trained_tensors
        self.trained_differ_from_base += other.trained_differ_from_base
        self.trained_identical_to_base = sorted(self.trained_identical_to_base + other.trained_identical_to_base)
        self.trained_unknown_base = sorted(self.trained_unknown_base + other.trained_unknown_base)
        self.frozen_tensors += other.frozen_tensors
        self.lora_rel_delta = dict(sorted({**self.lora_rel_delta, **other.lora_rel_delta}.items()))

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        vals = list(self.lora_rel_delta.values())
        d["lora_targets"] = len(vals)
        d["lora_rel_delta_max"] = max(vals) if vals else None
        d["lora_rel_delta_mean"] = sum(vals) / len(vals) if vals else None
        d["identical_to_base"] = self.identical_to_base
        return d


@dataclasses.dataclass
class ExportManifest:
    converter: str
    dtype: str
    tensors: dict[str, dict]  # exported name -> {digest, dtype, shape, norm, sum, file, role, sources}
    root_digest: str
    files: dict[str, dict]  # relative path -> {size, sha256?}
    trained: dict  # FingerprintSet.to_json() of trainable parameters, training-time names
    training_effect: dict
    provenance: dict = dataclasses.field(default_factory=dict)
    tied: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    readback_verified: bool = False
    # bytes this export wrote, and bytes it hard-linked from the previous snapshot (file -> source)
    storage: dict = dataclasses.field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ExportManifest":
        if d.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {d.get('format')!r}; expected {MANIFEST_FORMAT!r}. "
                             "Was it written by a newer sa2va_hooks?")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def load(cls, snapshot_dir: str | Path) -> "ExportManifest":
        path = Path(snapshot_dir) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {snapshot_dir} is not a sa2va_hooks export, or it is "
                                    "incomplete. Re-export it, or use `diff` (which also reads plain HF directories).")
        with open(path) as f:
            return cls.from_json(json.load(f))
