"""The public face: ``export_hf`` and its background forms as users call them (the converter, "auto", a name, a dict
or an instance, is resolved here; the pipeline is in ``core``), and every name ``hooks/`` uses: it imports no other."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from .converters.base import converter_for_run, resolve_converter  # noqa: F401 - for the hooks
from .core import pipeline as _pipeline
from .core.background import ExportJob, FrontFailedError  # noqa: F401
from .core.checkpoint_export import checkpoint_export_mode, on_every_rank, start_checkpoint_export  # noqa: F401
from .core.dist import DEFAULT_TIMEOUT_S, RankGroup  # noqa: F401
from .core.errors import BadInputError, BadValueError, ExportFailedError, MismatchError  # noqa: F401
from .core.finish import ExportVerificationError  # noqa: F401
from .core.fingerprint import Fingerprint, FingerprintSet
from .core.host_process import HostProcess, HostProcessError  # noqa: F401
from .core.manifest import MANIFEST_FILE, ExportManifest  # noqa: F401
from .core.observer import ExportObserver
from .core.pipeline import ExportTask  # noqa: F401
from .core.plan import parse_dtype, reserve_staging  # noqa: F401
from .core.partitions import PieceExchange, partition_support  # noqa: F401
from .core.produce import fingerprint_pieces, fingerprint_whole, frozen_root, trained_fingerprints  # noqa: F401
from .core.publish import clean_leftovers, remove_snapshot  # noqa: F401
from .core.shards import parse_size  # noqa: F401
from .core.snapshot import Capture, SnapshotBuffers, fingerprint_capture  # noqa: F401

def export_hf(model: nn.Module, out_dir: str | Path, *, converter: Any = "auto", dtype: Any = None,
              max_shard_size: int | str = "5GB", provenance: Mapping | None = None,
              baseline: Mapping[str, Fingerprint] | None = None, overwrite: bool = False, readback: bool = True,
              progress: bool = False, trained: FingerprintSet | None = None, group: RankGroup | None = None,
              link_from: str | Path | None = None, observer: ExportObserver | None = None) -> ExportManifest:
    """Merge, write, load-check and verify an HF snapshot of ``model``, unchanged; its manifest. Collective."""
    return _pipeline.run_export(model, out_dir, converter=resolve_converter(converter, model), dtype=dtype,
                               max_shard_size=max_shard_size, provenance=provenance, baseline=baseline,
                               overwrite=overwrite, readback=readback, progress=progress, trained=trained,
                               group=group, link_from=link_from, observer=observer)


def start_export(model: nn.Module, out_dir: str | Path, *, converter: Any = "auto", dtype: Any = None,
                 max_shard_size: int | str = "5GB", provenance: Mapping | None = None,
                 baseline: Mapping[str, Fingerprint] | None = None, overwrite: bool = False, readback: bool = True,
                 progress: bool = False, trained: FingerprintSet | None = None, group: RankGroup | None = None,
                 link_from: str | Path | None = None, observer: ExportObserver | None = None,
                 capture: Capture | None = None, buffers: SnapshotBuffers | None = None,
                 on_done: Callable[[ExportJob], None] | None = None, host: HostProcess | None = None) -> ExportJob:
    """The same export on a background thread, after a capture of what training changes next; with
    ``host``, its hashing, writing and read-back run in that process (``core/host_process.py``)."""
    return _pipeline.start_export(model, out_dir, converter=resolve_converter(converter, model), dtype=dtype,
                                  max_shard_size=max_shard_size, provenance=provenance, baseline=baseline,
                                  overwrite=overwrite, readback=readback, progress=progress, trained=trained,
                                  group=group, link_from=link_from, observer=observer, capture=capture,
                                  buffers=buffers, on_done=on_done, host=host)


def prepare_background_export(model: nn.Module, out_dir: str | Path, *, converter: Any = "auto", **kwargs: Any):
    return _pipeline.prepare_background_export(model, out_dir, converter=resolve_converter(converter, model), **kwargs)


def prepare_gathered_export(model: nn.Module, out_dir: str | Path, *, converter: Any = "auto", **kwargs: Any):
    return _pipeline.prepare_gathered_export(model, out_dir, converter=resolve_converter(converter, model), **kwargs)


export_hf.__doc__ += "\n\n" + (_pipeline.run_export.__doc__ or "")
