"""Reading training checkpoints safely, and what the hooks recorded in them.

Safe by default: a ``.pth`` file through ``torch.load(weights_only=True)`` with exactly the types
mmengine checkpoints need (see ``compat.mmengine_checkpoint_safe_globals``; its ``getattr`` is a
guarded one); a DeepSpeed directory through our own restricted unpickler (``restricted_pickle``)
and consolidation (``zero_checkpoint``). The two allowlists share one table of names
(``core/vocab.py``). A file that needs anything else is refused before any of it runs;
``allow_pickle=True`` is the explicit, logged opt-in. Only regular files are opened (a FIFO would
block forever), and nothing outside a DeepSpeed directory is followed from inside it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..compat import allow_mmengine_checkpoint_globals, unsafe_globals_in_checkpoint
from ..core.fingerprint import Fingerprint, FingerprintSet
from ..records import BASELINE_KEY, CHECKPOINT_RECORD_KEY, FROZEN_ROOT_ALGORITHM_KEY, FROZEN_ROOT_KEY, META_KEY
from .zero_checkpoint import (NotRegularFileError, UnsafeCheckpointError, ZeroCheckpointError,  # noqa: F401
                              consolidate, regular_file, resolve_tag_dir)
from ..core.errors import BadInputError, BadValueError, MissingFileError
from ..core.vocab import DIGEST_V1, SIDECAR_SUFFIX


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False,
                    log: Callable[[str], None] = print) -> dict:
    path = Path(path)
    if path.is_dir():
        return load_deepspeed_dir(path, allow_pickle=allow_pickle, log=log)
    if os.path.lexists(path):
        regular_file(path, what="checkpoint")  # a FIFO would block the first read forever
    if not path.is_file():
        sidecar = Path(str(path).rstrip("/") + SIDECAR_SUFFIX)
        if sidecar.is_file():
            raise MissingFileError(
                f"checkpoint {path} does not exist, but its fingerprint sidecar {sidecar} does: the checkpoint was "
                "removed (CheckpointHook removes older checkpoints when max_keep_ckpts is set) or moved. The sidecar "
                f"holds only fingerprints, no weights. {_what_instead(path, sidecar)}")
        raise MissingFileError(f"checkpoint {path} does not exist; pass the .pth file CheckpointHook wrote "
                                "(or a DeepSpeed checkpoint directory).")
    _refuse_sidecar(path)
    _check_checkpoint_file(path)
    if allow_pickle:
        log(f"WARNING: --allow-pickle: {path} is loaded with full pickle; code inside it can run. "
            "This is recorded in the export manifest.")
        return torch.load(path, map_location="cpu", weights_only=False)
    allow_mmengine_checkpoint_globals()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"checkpoint {path} needs types outside the safe list to load ({_unsafe_globals(path, e)}); nothing in it "
            "was run. If you trust the file, pass --allow-pickle (the bypass is recorded in the manifest).") from e


class NotACheckpointError(BadInputError, ValueError):
    """The file is not a torch checkpoint at all (empty, random bytes, another format)."""


class SidecarNotCheckpointError(NotACheckpointError):
    """The file is FingerprintHook's sidecar (``<checkpoint>.fingerprints.json``), not a checkpoint."""


def _sidecar_record(path: Path) -> dict | None:
    """The record of a file that is FingerprintHook's sidecar by name or by content, else None
    ({} when only the name says so)."""
    named = path.name.endswith(SIDECAR_SUFFIX)
    with open(path, "rb") as f:
        head = f.read(1)
    if not named and head != b"{":
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {} if named else None
    if isinstance(record, dict) and "trained" in record and "checkpoint" in record:
        return record
    return {} if named else None


def _refuse_sidecar(path: Path) -> None:
    record = _sidecar_record(path)
    if record is None:
        return
    name = (path.name[:-len(SIDECAR_SUFFIX)] if path.name.endswith(SIDECAR_SUFFIX)
            else Path(str(record["checkpoint"]).rstrip("/")).name)
    ckpt = path.with_name(name)
    at = f" (iteration {record['iter']})" if record.get("iter") is not None else ""
    if ckpt.exists():
        state = f"That checkpoint exists: pass {ckpt} instead."
    else:
        state = (f"That checkpoint no longer exists at {ckpt}: it was removed (CheckpointHook removes older "
                 f"checkpoints when max_keep_ckpts is set) or moved. {_what_instead(ckpt, path)}")
    raise SidecarNotCheckpointError(
        f"{path} is a fingerprint sidecar written by FingerprintHook, not a checkpoint: it records the trained "
        f"tensors' fingerprints of checkpoint {name}{at}, and holds no weights. {state}")


def _what_instead(ckpt: Path, sidecar: Path) -> str:
    """What to pass when a checkpoint is gone but its sidecar is there."""
    folder = ckpt.parent
    others = sorted(p.name for p in folder.glob("*.pth") if p != ckpt) if folder.is_dir() else []
    there = (f"Checkpoints in {folder} now: {', '.join(others[:10])}{' ...' if len(others) > 10 else ''}. "
             if others else f"No checkpoint (*.pth) is left in {folder}. ")
    return (f"Pass a checkpoint that exists. {there}To compare the sidecar's record with a snapshot without "
            f"its checkpoint: `python -m sa2va_hooks fingerprint {sidecar}` prints its root, equal to the "
            "trained_root that `python -m sa2va_hooks fingerprint SNAPSHOT_DIR` prints for the snapshot of that "
            "checkpoint.")


def _check_checkpoint_file(path: Path) -> None:
    """A torch checkpoint is a zip archive (torch >= 1.6) or a legacy pickle (protocol 2+: 0x80). Say
    what the file is instead of calling random bytes 'unsafe' or an empty file an EOFError."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise NotACheckpointError(f"checkpoint {path} is empty (0 bytes): the save was interrupted or the copy "
                                  "failed. Use another checkpoint (CheckpointHook keeps the earlier ones).")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise NotACheckpointError(f"checkpoint {path} is not a torch checkpoint (it starts with bytes "
                                  f"{head.hex(' ')}, neither a zip archive nor a pickle): is it the right file?")


def _unsafe_globals(path: Path, error: Exception) -> str:
    """What made torch's weights_only loader refuse ``path``: the globals outside its list, or, when
    all are listed, the argument our ``getattr`` refused (torch puts it after 'WeightsUnpickler error:')."""
    try:
        names = unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError, pickle.UnpicklingError, OSError) as e:
        return f"could not list them: {e}"
    if names:
        return ", ".join(names)
    said = str(error).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    return said[0][:400] if said else "none listed"


def load_deepspeed_dir(path: Path, *, allow_pickle: bool = False, log: Callable[[str], None] = print) -> dict:
    """A DeepSpeed checkpoint directory as mmengine's DeepSpeedStrategy writes it (``iter_N.pth/``,
    saved with ``tag=iter_N.pth`` and no ``latest`` file) or as DeepSpeed does (``latest`` naming the
    tag directory), consolidated to fp32 by our own reader (``zero_checkpoint``: DeepSpeed's
    ``zero_to_fp32`` unpickles with full pickle), with mmengine's ``meta`` and ``message_hub`` from
    its rank-0 model-states file. DeepSpeed itself is not needed."""
    root = path.resolve()
    tag_dir = resolve_tag_dir(root)
    if allow_pickle:
        log(f"WARNING: --allow-pickle: the files of {tag_dir} are loaded with full pickle; code inside them can run. "
            "This is recorded in the export manifest.")
    state, extra = consolidate(tag_dir, allow_pickle=allow_pickle)
    out: dict[str, Any] = {"state_dict": state}
    out.update({k: extra[k] for k in ("meta", "message_hub") if k in extra})
    missing = [k for k in ("meta", "message_hub") if k not in extra]
    if missing:
        log(f"WARNING: the model-states file of {tag_dir} holds no {' or '.join(missing)}: this DeepSpeed checkpoint "
            "was not written by mmengine's DeepSpeedStrategy, so the run's seed and recorded fingerprints are unknown")
    return out


def extract_state_dict(ckpt: Mapping[str, Any], path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    for key in ("state_dict", "module", "model"):
        if isinstance(ckpt.get(key), Mapping):
            return dict(ckpt[key])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    raise BadValueError(f"{path} holds no state dict: its top-level keys are {sorted(ckpt)[:20]}; expected "
                     "'state_dict' (mmengine), 'module' (DeepSpeed) or a plain mapping of tensors.")


@dataclasses.dataclass
class Recorded:
    """What the hooks recorded about one checkpoint."""

    trained: FingerprintSet | None
    frozen_root: str | None
    baseline: dict[str, Fingerprint] | None
    source: str  # "checkpoint meta" | "sidecar FILE" | "none"
    iteration: int | None = None
    epoch: int | None = None
    frozen_root_algorithm: str = DIGEST_V1  # the tensor digests' version under frozen_root (v1 when unnamed)


def recorded_fingerprints(ckpt: Mapping[str, Any], path: str | Path) -> Recorded:
    """What the hooks recorded: the checkpoint's meta (classic Runner), else its message_hub runtime
    info (every runner, DeepSpeed included; only when it names this checkpoint's iteration), else
    the sidecar beside it."""
    meta = ckpt.get("meta") or {}
    info = ((ckpt.get("message_hub") or {}).get("runtime_info") or {})
    record, source = meta.get(META_KEY), "checkpoint meta"
    hub_record = info.get(CHECKPOINT_RECORD_KEY)
    if record is None and hub_record is not None and hub_record.get("iter") == meta.get("iter"):
        record, source = hub_record, "checkpoint message_hub"
    sidecar = Path(str(path).rstrip("/") + SIDECAR_SUFFIX)
    if record is None and os.path.lexists(sidecar):
        record, source = read_sidecar(sidecar), f"sidecar {sidecar}"
    baseline = info.get(BASELINE_KEY)
    baseline = {k: Fingerprint.from_json(v) for k, v in baseline.items()} if baseline else None
    hub_algorithm = info.get(FROZEN_ROOT_ALGORITHM_KEY) or DIGEST_V1
    if record is None:
        return Recorded(None, info.get(FROZEN_ROOT_KEY), baseline, "none", meta.get("iter"), meta.get("epoch"),
                        hub_algorithm)
    if record.get("frozen_root"):
        frozen, algorithm = record["frozen_root"], record.get("frozen_root_algorithm") or DIGEST_V1
    else:
        frozen, algorithm = info.get(FROZEN_ROOT_KEY), hub_algorithm
    return Recorded(FingerprintSet.from_json(record["trained"]), frozen, baseline, source,
                    record.get("iter", meta.get("iter")), record.get("epoch", meta.get("epoch")), algorithm)


class SidecarFormatError(BadInputError, ValueError):
    """A file given or found as a fingerprint sidecar is not one."""


def read_sidecar(path: str | Path) -> dict:
    """The record of FingerprintHook's sidecar ``<checkpoint>.fingerprints.json``: a JSON object with
    ``trained`` (``{"root", "count", "tensors"}``) and ``checkpoint``. A regular file only (a FIFO
    would block the read forever); an error names the file and what was expected, never its content."""
    path = Path(path)
    regular_file(path, what="fingerprint sidecar")
    expected = ("FingerprintHook writes a JSON object with 'checkpoint' and 'trained' (root, count and the tensors' "
                "fingerprints) beside each checkpoint, as <checkpoint>.fingerprints.json")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SidecarFormatError(f"{path} is not a fingerprint sidecar: it is not UTF-8 text. {expected}.") from e
    except RecursionError as e:
        raise SidecarFormatError(f"{path} is not a fingerprint sidecar: its JSON is nested too deeply to read. "
                                 f"{expected}.") from e
    except json.JSONDecodeError as e:
        raise SidecarFormatError(f"{path} is not a fingerprint sidecar: it is not valid JSON ({e.msg} at line "
                                 f"{e.lineno} column {e.colno}). {expected}. Was it truncated, or is it another "
                                 "file?") from e
    trained = record.get("trained") if isinstance(record, dict) else None
    if not (isinstance(trained, dict) and isinstance(trained.get("tensors"), dict) and "root" in trained):
        got = (f"a JSON object with keys {sorted(record)[:10]}" if isinstance(record, dict)
               else f"JSON of type {type(record).__name__}")
        raise SidecarFormatError(f"{path} is not a fingerprint sidecar: it holds {got}. {expected}.")
    return record
