"""What one rank's writing of an export tells an observer, tensor by tensor and file by file.

Why: measurements (the training-stall benchmark's GPU peak per tensor, a progress display) need to
see the write path from inside, and patching the pipeline's private methods breaks with every
refactor of it. ``export_hf(..., observer=...)`` takes one; every method is a no-op here, so a
subclass overrides only what it needs. The calls come from the thread that does the work (the
training thread produces under ZeRO-3 and FSDP, the export thread writes). An observer that raises
fails the export like any other error of that rank (taken to the agreement, nothing published).
"""
from __future__ import annotations

from .entry import TensorEntry


class ExportObserver:
    def tensor_producing(self, entry: TensorEntry) -> None:
        """``entry`` is about to be merged, checked and staged to the host (its parameters are
        gathered already, under ZeRO-3)."""

    def tensor_produced(self, entry: TensorEntry) -> None:
        """``entry``'s bytes are on the host, or producing them failed (called either way, so a
        measurement started by :meth:`tensor_producing` always ends)."""

    def file_done(self, fname: str, nbytes: int, linked: bool) -> None:
        """This rank's shard ``fname`` is complete in the staging directory: written and fsynced,
        or hard-linked from the previous snapshot (``linked``)."""


NO_OBSERVER = ExportObserver()
