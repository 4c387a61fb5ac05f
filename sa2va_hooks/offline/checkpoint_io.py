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

from ..compat import allow_mmengine_checkpoint_globals
from ..core.fingerprint import Fingerprint, FingerprintSet
from ..hooks.common import BASELINE_KEY, FROZEN_ROOT_KEY, META_KEY

SIDECAR_SUFFIX = ".fingerprints.json"
DEEPSPEED_PIN = "deepspeed==0.19.8"


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint needs arbitrary code to unpickle; it was not loaded."""


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False,
                    log: Callable[[str], None] = print) -> dict:
    path = Path(path)
    if path.is_dir():
        return load_deepspeed_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the .pth file CheckpointHook wrote "
                                "(or a DeepSpeed checkpoint directory).")
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


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError, pickle.UnpicklingError, OSError) as e:
        return f"could not list them: {e}"
    return ", ".join(names) or "none listed"


def load_deepspeed_dir(path: Path) -> dict:
    """A DeepSpeed checkpoint directory (as mmengine's DeepSpeedStrategy writes), consolidated to
    fp32 with DeepSpeed's own utility."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ImportError(f"{path} is a directory, i.e. a DeepSpeed checkpoint; consolidating it needs DeepSpeed's "
                          f"own zero_to_fp32 utility. Install it with `pip install {DEEPSPEED_PIN}` and run again.") \
            from e
    state = get_fp32_state_dict_from_zero_checkpoint(str(path))
    out: dict[str, Any] = {"state_dict": state}
    model_states = sorted(path.rglob("mp_rank_00_model_states.pt"))
    if model_states:
        allow_mmengine_checkpoint_globals()
        extra = torch.load(model_states[0], map_location="cpu", weights_only=True)
        out.update({k: extra[k] for k in ("meta", "message_hub") if k in extra})
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
    meta = ckpt.get("meta") or {}
    record, source = meta.get(META_KEY), "checkpoint meta"
    sidecar = Path(str(path) + SIDECAR_SUFFIX)
    if record is None and sidecar.is_file():
        record, source = json.loads(sidecar.read_text()), f"sidecar {sidecar}"
    info = ((ckpt.get("message_hub") or {}).get("runtime_info") or {})
    baseline = info.get(BASELINE_KEY)
    baseline = {k: Fingerprint.from_json(v) for k, v in baseline.items()} if baseline else None
    if record is None:
        return Recorded(None, info.get(FROZEN_ROOT_KEY), baseline, "none", meta.get("iter"), meta.get("epoch"))
    return Recorded(FingerprintSet.from_json(record["trained"]), record.get("frozen_root") or info.get(FROZEN_ROOT_KEY),
                    baseline, source, record.get("iter", meta.get("iter")), record.get("epoch", meta.get("epoch")))
