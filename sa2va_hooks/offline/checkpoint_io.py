"""Reading training checkpoints safely, and what the hooks recorded in them.

Safe by default: ``torch.load(weights_only=True)`` with exactly the types mmengine checkpoints
need (see ``compat.mmengine_checkpoint_safe_globals``). A file that needs anything else is
refused before any of it runs; ``allow_pickle=True`` is the explicit, logged opt-in.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..compat import allow_mmengine_checkpoint_globals, unsafe_globals_in_checkpoint
from ..core.fingerprint import Fingerprint, FingerprintSet
from ..records import BASELINE_KEY, CHECKPOINT_RECORD_KEY, FROZEN_ROOT_KEY, META_KEY

SIDECAR_SUFFIX = ".fingerprints.json"
# 0.19 removed deepspeed.runtime.fp16.onebit, which mmengine 0.10.x imports: training breaks
DEEPSPEED_REQUIREMENT = "deepspeed>=0.18.9,<0.19"


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint needs arbitrary code to unpickle; it was not loaded."""


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False,
                    log: Callable[[str], None] = print) -> dict:
    path = Path(path)
    if path.is_dir():
        return load_deepspeed_dir(path, allow_pickle=allow_pickle, log=log)
    if not path.is_file():
        sidecar = Path(str(path).rstrip("/") + SIDECAR_SUFFIX)
        if sidecar.is_file():
            raise FileNotFoundError(
                f"checkpoint {path} does not exist, but its fingerprint sidecar {sidecar} does: the checkpoint was "
                "removed (CheckpointHook removes older checkpoints when max_keep_ckpts is set) or moved. The sidecar "
                f"holds only fingerprints, no weights. {_what_instead(path, sidecar)}")
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the .pth file CheckpointHook wrote "
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
            f"checkpoint {path} needs types outside the safe list to load ({_unsafe_globals(path)}); nothing in it "
            "was run. If you trust the file, pass --allow-pickle (the bypass is recorded in the manifest).") from e


class NotACheckpointError(ValueError):
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


def _unsafe_globals(path: Path) -> str:
    try:
        names = unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError, pickle.UnpicklingError, OSError) as e:
        return f"could not list them: {e}"
    return ", ".join(names) or "none listed"


# What the pickles of an mmengine + DeepSpeed checkpoint directory may reference (besides torch's
# own tensor rebuilders): mmengine's message_hub and config types, numpy arrays and DeepSpeed's
# own optimizer bookkeeping. DeepSpeed's consolidation unpickles these files fully, so every
# file is checked against this list first, without running anything from it.
_DEEPSPEED_DIR_GLOBALS = {
    "mmengine.logging.history_buffer.HistoryBuffer", "mmengine.config.config.ConfigDict",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar", "numpy.dtype", "numpy.ndarray", "builtins.getattr", "builtins.set",
    "collections.OrderedDict", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def _check_pickles(tag_dir: Path, allow_pickle: bool, log: Callable[[str], None]) -> None:
    """Refuse a DeepSpeed directory whose files reference anything outside the known list, before
    DeepSpeed's own loader (which uses full pickle) touches them."""
    if allow_pickle:
        log(f"WARNING: --allow-pickle: the files of {tag_dir} are loaded with full pickle; code inside them can run. "
            "This is recorded in the export manifest.")
        return
    for f in sorted(tag_dir.glob("*.pt")):
        try:
            names = unsafe_globals_in_checkpoint(str(f))
        except (RuntimeError, ValueError, pickle.UnpicklingError, OSError) as e:
            raise UnsafeCheckpointError(f"cannot inspect {f} before loading it ({e}); it is not a readable torch "
                                        "checkpoint file. Nothing in it was run.") from e
        unknown = sorted(set(names) - _DEEPSPEED_DIR_GLOBALS)
        if unknown:
            raise UnsafeCheckpointError(
                f"{f} needs types outside the safe list to load ({', '.join(unknown)}); nothing in it was run. If you "
                "trust the directory, pass --allow-pickle (the bypass is recorded in the manifest).")


def _model_states_file(tag_dir: Path) -> Path:
    """ZeRO-1/2 write ``mp_rank_00_model_states.pt``; ZeRO-3 one ``zero_pp_rank_{r}_mp_rank_00_model_states.pt``
    per rank, each holding the same client state (mmengine's meta and message_hub)."""
    for pattern in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / pattern).is_file():
            return tag_dir / pattern
    found = sorted(p.name for p in tag_dir.glob("*model_states.pt"))
    raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model-states file (mp_rank_00_model_states.pt or "
                            f"zero_pp_rank_0_mp_rank_00_model_states.pt); found {found or 'none'}. Pass the iter_N.pth "
                            "directory that mmengine + DeepSpeed wrote.")


def load_deepspeed_dir(path: Path, *, allow_pickle: bool = False, log: Callable[[str], None] = print) -> dict:
    """A DeepSpeed checkpoint directory as mmengine's DeepSpeedStrategy writes it (``iter_N.pth/``,
    saved with ``tag=iter_N.pth`` and no ``latest`` file), consolidated to fp32 by DeepSpeed's own
    utility, with mmengine's ``meta`` and ``message_hub`` from its model-states file."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ImportError(f"{path} is a directory, i.e. a DeepSpeed checkpoint; consolidating it needs DeepSpeed's "
                          f"own zero_to_fp32 utility. Install it with `pip install '{DEEPSPEED_REQUIREMENT}'` (or "
                          "`pip install -e .[deepspeed]`) and run again.") from e
    path = path.resolve()
    if (path / "latest").is_file():  # DeepSpeed's own layout: a parent dir with 'latest' naming the tag
        tag_dir = path / (path / "latest").read_text().strip()
    else:  # mmengine's layout: the directory is the tag
        tag_dir = path
    states = _model_states_file(tag_dir)
    _check_pickles(tag_dir, allow_pickle, log)
    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    extra = torch.load(states, map_location="cpu", weights_only=False)  # its globals were checked above
    out: dict[str, Any] = {"state_dict": state}
    out.update({k: extra[k] for k in ("meta", "message_hub") if k in extra})
    missing = [k for k in ("meta", "message_hub") if k not in extra]
    if missing:
        log(f"WARNING: {states.name} holds no {' or '.join(missing)}: this DeepSpeed checkpoint was not written by "
            "mmengine's DeepSpeedStrategy, so the run's seed and recorded fingerprints are unknown")
    return out


def extract_state_dict(ckpt: Mapping[str, Any], path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    for key in ("state_dict", "module", "model"):
        if isinstance(ckpt.get(key), Mapping):
            return dict(ckpt[key])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    raise ValueError(f"{path} holds no state dict: its top-level keys are {sorted(ckpt)[:20]}; expected "
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
    if record is None and sidecar.is_file():
        record, source = json.loads(sidecar.read_text()), f"sidecar {sidecar}"
    baseline = info.get(BASELINE_KEY)
    baseline = {k: Fingerprint.from_json(v) for k, v in baseline.items()} if baseline else None
    if record is None:
        return Recorded(None, info.get(FROZEN_ROOT_KEY), baseline, "none", meta.get("iter"), meta.get("epoch"))
    return Recorded(FingerprintSet.from_json(record["trained"]), record.get("frozen_root") or info.get(FROZEN_ROOT_KEY),
                    baseline, source, record.get("iter", meta.get("iter")), record.get("epoch", meta.get("epoch")))
