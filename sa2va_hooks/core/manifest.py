"""``export_manifest.json``: what a snapshot holds, where it came from, and what training did.

The manifest is written last, so its presence means the snapshot is complete. It holds a
digest per tensor (checked by ``verify``), the root digest over them, the fingerprints of the
trained parameters under their training-time names (checked against checkpoints), and a
training-effect summary that says, in numbers, whether training reached the export.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import stat
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping
from .errors import BadInputError, MissingFileError, NotRegularFileError  # noqa: F401 - NotRegularFileError re-exported
from .vocab import DIGEST_V1, MANIFEST_FILE, STORABLE_DTYPES  # noqa: F401 - re-exported

# v2: tensor digests are v2 (chunked, decision 59) and the top-level ``digest_algorithm`` says so. A
# v1 manifest (v1 digests, no such field) is still read and verified; each tensor entry's own
# ``algorithm`` decides how its digest is recomputed.
MANIFEST_FORMAT = "sa2va_hooks.export_manifest/v2"
READABLE_FORMATS = ("sa2va_hooks.export_manifest/v1", MANIFEST_FORMAT)
_VERSIONED = ("sa2va_hooks", "torch", "transformers", "peft", "safetensors", "mmengine", "xtuner", "deepspeed")


def package_versions() -> dict[str, str]:
    """The versions of the packages that made an export, a fresh dict each call. Read from disk
    once per process: each lookup scans sys.path and parses a METADATA file, 6.5 ms per export
    for the eight of them in the export's thread, holding the GIL the training thread waits for
    (issue 18); and the code an export runs is what was imported, not what a later pip install
    put on disk."""
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def file_kind(mode: int) -> str:
    """What ``lstat`` says a path is, in words (for messages)."""
    for test, kind in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return kind
    return "of an unknown file type"


def is_regular_file(path: str | Path) -> bool:
    """True when ``path`` itself (a symlink is not followed) is a regular file; False when it is anything
    else, is absent or cannot be examined. Checked before a file that came from elsewhere is opened."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def open_regular(path: str | Path, *, follow_symlinks: bool = False):
    """Open ``path`` for binary reading only if it is a regular file (with ``follow_symlinks``, one a
    symlink leads to: an HF cache directory is all symlinks), else raise :class:`NotRegularFileError`
    naming it. Checked with ``lstat`` before the open, which is non-blocking (a FIFO swapped in between
    cannot block it) and checked again with ``fstat`` on what was opened."""
    mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(path, file_kind(mode))
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags if follow_symlinks else flags | getattr(os, "O_NOFOLLOW", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, file_kind(mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class JSONFileError(BadInputError, ValueError):
    """A JSON file from a snapshot (manifest, index, config) that cannot be parsed: bad input."""


def read_json_file(path: str | Path, *, follow_symlinks: bool = False) -> Any:
    """Parse an untrusted JSON file (it came with a snapshot). Every way it can fail is a
    :class:`JSONFileError` or :class:`OSError` naming the file: not a regular file, not UTF-8, not
    JSON, or nested too deeply for the parser (``[[[[...]]]]`` 100000 deep raises ``RecursionError``,
    which no caller expects from reading a file)."""
    with open_regular(path, follow_symlinks=follow_symlinks) as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JSONFileError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise JSONFileError(f"{path} nests JSON arrays or objects too deeply to parse (deeper than Python's "
                            f"recursion limit); it is damaged or hostile") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a regular file's bytes (a symlink, a FIFO or a device is refused, never opened)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
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


class ManifestError(BadInputError, ValueError):
    """A manifest that cannot be read or does not follow the format: bad input, not a mismatch."""


_HEX = set("0123456789abcdef")


def _is_hex(v: object, n: int | None = None) -> bool:
    return isinstance(v, str) and bool(v) and set(v) <= _HEX and (n is None or len(v) == n)


def _is_rel_file(v: object) -> bool:
    return isinstance(v, str) and bool(v) and not v.startswith("/") and ".." not in Path(v).parts


def _shape_ok(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _size_ok(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# top-level field -> (type, required); then per-entry checks of tensors and files
_TOP = {"format": (str, True), "converter": (str, True), "dtype": (str, True), "tensors": (dict, True),
        "root_digest": (str, True), "files": (dict, True), "trained": (dict, True), "training_effect": (dict, True),
        "provenance": (dict, False), "tied": (dict, False), "dropped": (dict, False), "renamed": (dict, False),
        "notes": (list, False), "readback_verified": (bool, False), "storage": (dict, False),
        "digest_algorithm": (str, False)}
_TENSOR = {"file": _is_rel_file, "digest": _is_hex, "dtype": lambda v: isinstance(v, str) and v in STORABLE_DTYPES,
           "shape": _shape_ok}
_FILE = {"size": _size_ok}
_FILE_OPTIONAL = {"sha256": lambda v: _is_hex(v, 64), "header_sha256": lambda v: _is_hex(v, 64)}


def manifest_problems(d: object) -> list[str]:
    """Every way ``d`` departs from the manifest format, as ``field: problem`` (empty when valid)."""
    if not isinstance(d, dict):
        return [f"(top level): expected a JSON object, got {type(d).__name__}"]
    out = []
    for key, (typ, required) in _TOP.items():
        if key not in d:
            if required:
                out.append(f"{key}: missing")
        elif not isinstance(d[key], typ):
            out.append(f"{key}: expected {typ.__name__}, got {type(d[key]).__name__}")
    if "format" in d and d["format"] not in READABLE_FORMATS:
        out.append(f"format: {d['format']!r} is not one of {', '.join(map(repr, READABLE_FORMATS))} "
                   "(written by a newer version?)")
    if isinstance(d.get("root_digest"), str) and not _is_hex(d["root_digest"]):
        out.append(f"root_digest: {d['root_digest']!r} is not a hex digest")
    out += _entry_problems(d.get("tensors"), "tensors", _TENSOR, {})
    out += _entry_problems(d.get("files"), "files", _FILE, _FILE_OPTIONAL)
    if isinstance(d.get("tensors"), dict) and isinstance(d.get("files"), dict):
        out += [f"tensors.{n}.file: {e['file']!r} is not among the manifest's files" for n, e in d["tensors"].items()
                if isinstance(e, dict) and _is_rel_file(e.get("file")) and e["file"] not in d["files"]]
    for key in ("tied", "dropped", "renamed"):
        if isinstance(d.get(key), dict):
            out += [f"{key}.{k}: expected a string, got {type(v).__name__}" for k, v in d[key].items()
                    if not isinstance(v, str)]
    return out


def _entry_problems(entries: object, where: str, required: dict, optional: dict) -> list[str]:
    if not isinstance(entries, dict):
        return []
    out = []
    for name, e in entries.items():
        if not isinstance(e, dict):
            out.append(f"{where}.{name}: expected an object, got {type(e).__name__}")
            continue
        for field, ok in required.items():
            if field not in e:
                out.append(f"{where}.{name}.{field}: missing")
            elif not ok(e[field]):
                hint = f" (not one of {', '.join(sorted(STORABLE_DTYPES))})" if field == "dtype" else ""
                out.append(f"{where}.{name}.{field}: malformed value {e[field]!r}{hint}")
        out += [f"{where}.{name}.{field}: malformed value {e[field]!r}" for field, ok in optional.items()
                if field in e and not ok(e[field])]
    return out


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
    # the digest algorithm of the tensors (each entry names its own too); a v1 manifest has none: v1
    digest_algorithm: str = DIGEST_V1
    format: str = MANIFEST_FORMAT

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = "manifest") -> "ExportManifest":
        """Validated against the format first: a missing or malformed field is a :class:`ManifestError`
        naming ``source`` and the field, never a KeyError later."""
        problems = manifest_problems(d)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ManifestError(f"{source} is not a valid sa2va_hooks manifest: {shown}. It was damaged or not "
                                "written by this version of sa2va_hooks; re-export the snapshot.")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def load(cls, snapshot_dir: str | Path) -> "ExportManifest":
        path = Path(snapshot_dir) / MANIFEST_FILE
        if not Path(snapshot_dir).is_dir():
            raise MissingFileError(f"{snapshot_dir} is not a directory: give the snapshot directory "
                                    f"(the one holding {MANIFEST_FILE}).")
        if not os.path.lexists(path):
            raise MissingFileError(f"{path} does not exist: {snapshot_dir} is not a sa2va_hooks export, or it is "
                                    "incomplete. Re-export it, or use `diff` (which also reads plain HF directories).")
        try:
            d = read_json_file(path)
        except JSONFileError as e:
            raise ManifestError(f"{e}: the manifest is truncated or damaged; re-export the snapshot.") from None
        except NotRegularFileError as e:
            raise ManifestError(f"{e}: a snapshot's manifest is a plain file, never followed or opened otherwise; "
                                "re-export the snapshot.") from None
        return cls.from_json(d, source=str(path))
