"""Offline re-export from a config and a checkpoint (``tools/export.py``)."""
from .checkpoint_io import UnsafeCheckpointError, extract_state_dict, load_checkpoint, recorded_fingerprints
from .export_checkpoint import (FingerprintMismatchError, OfflineExportResult, PretrainedMostlyUnusedError,
                                export_checkpoint)
from .load_plan import CheckpointMismatchError, apply_load_plan, plan_load

__all__ = ["CheckpointMismatchError", "FingerprintMismatchError", "OfflineExportResult", "PretrainedMostlyUnusedError",
           "UnsafeCheckpointError", "apply_load_plan", "export_checkpoint", "extract_state_dict", "load_checkpoint",
           "plan_load", "recorded_fingerprints"]
