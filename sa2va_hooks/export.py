"""``export_hf`` and its background forms, as users and the hooks call them: the converter is
given as "auto" (detected by structure), a registered name, an mmengine-style dict or an instance,
resolved here, and the export runs through :mod:`sa2va_hooks.core.export`'s pipeline (see
``core.export.export_hf`` for every argument)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .converters.base import resolve_converter
from .core import pipeline as _pipeline
from .core.background import ExportJob, FrontFailedError
from .core.finish import ExportVerificationError
from .core.pipeline import ExportTask
from .core.plan import parse_dtype, reserve_staging
from .core.produce import fingerprint_whole, frozen_root, trained_fingerprints

__all__ = ["ExportJob", "ExportTask", "ExportVerificationError", "FrontFailedError", "export_hf",
           "fingerprint_whole", "frozen_root", "parse_dtype", "prepare_background_export", "prepare_gathered_export",
           "reserve_staging", "start_export", "trained_fingerprints"]


def export_hf(model: nn.Module, out_dir: str | Path, *, converter: Any = "auto", **kwargs: Any):
    """Merge, write, load-check and verify an HF snapshot of ``model`` without changing it;
    returns its manifest. Collective under ``torch.distributed``."""
    return _pipeline.run_export(model, out_dir, converter=resolve_converter(converter, model), **kwargs)


def start_export(model: nn.Module, out_dir: str | Path, *, converter: Any = "auto", **kwargs: Any) -> ExportJob:
    """The same export on a background thread, after a capture of what training changes next."""
    return _pipeline.start_export(model, out_dir, converter=resolve_converter(converter, model), **kwargs)


def prepare_background_export(model: nn.Module, out_dir: str | Path, *, converter: Any = "auto",
                              **kwargs: Any) -> ExportJob:
    return _pipeline.prepare_background_export(model, out_dir, converter=resolve_converter(converter, model),
                                               **kwargs)


def prepare_gathered_export(model: nn.Module, out_dir: str | Path, *, converter: Any = "auto",
                            **kwargs: Any) -> ExportJob:
    return _pipeline.prepare_gathered_export(model, out_dir, converter=resolve_converter(converter, model),
                                             **kwargs)


export_hf.__doc__ += "\n\n" + (_pipeline.run_export.__doc__ or "")
