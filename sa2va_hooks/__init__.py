"""sa2va_hooks: export exactly what was trained, from the model in memory, with proof.

Layout (the architecture):
- ``core/``: merge (out-of-place LoRA via PEFT's delta math), sharded safetensors writing with
  atomic publish, fingerprints, manifest, verification. No mmengine.
- ``converters/``: one file per model family, registered in ``CONVERTERS`` (an mmengine Registry).
- ``export.py``: ``export_hf``, the single path from a model to a verified snapshot,
  ``start_export``, the same path on a background thread after a millisecond capture, and
  ``start_checkpoint_export``, which chooses between them (and the gathered form for ZeRO-3 /
  FSDP) for an export taken during training. The hooks import only from here.
- ``hooks/``: thin mmengine hooks (``FingerprintHook``, ``HFExportHook``) that read runner state,
  decide timing and call the core.
- ``cli.py``: ``python -m sa2va_hooks verify|fingerprint``.

Importing this package registers the hooks in mmengine's ``HOOKS`` and the converters in
``CONVERTERS``; it does not import xtuner.
"""
import os as _os
import sys as _sys


def _drop_cwd_from_path() -> None:
    """``python -m sa2va_hooks verify .`` is run from inside snapshots, and Python puts the current
    directory first on ``sys.path`` for ``-m``: a snapshot's remote code (``modeling_x.py``) or a
    hostile ``json.py`` / ``safetensors.py`` would be imported in place of the real module. This package
    is imported before its ``__main__``, and imports json, torch and safetensors, so that entry is
    dropped here, first. Only while this package is the ``-m`` target (``sys.argv[0]`` is still
    ``"-m"`` during that import, and ``sys.orig_argv`` names it; under ``python -m pytest`` it is
    pytest's path by the time tests import us) and only ``sys.path[0]`` when it is the current
    directory. The package itself was already found; its submodules are found through ``__path__``."""
    if _sys.argv[:1] != ["-m"] or not _sys.path:
        return
    argv = list(getattr(_sys, "orig_argv", []))
    target = None
    for i, a in enumerate(argv[1:], 1):
        if a == "-m" and i + 1 < len(argv):
            target = argv[i + 1]
            break
        if a.startswith("-m") and len(a) > 2:
            target = a[2:]
            break
    if target is not None and target.split(".")[0] != __name__:
        return
    try:
        cwd = _os.getcwd()
    except OSError:  # the current directory was deleted: there is nothing there to import
        return
    if _sys.path[0] in ("", ".", cwd):
        del _sys.path[0]


_drop_cwd_from_path()

__version__ = "0.1.0"

from .environment import check_bitsandbytes  # noqa: E402

check_bitsandbytes()  # before PEFT is ever asked to build a model: say why it would fail, and the fix

from .compat import apply_torch_cpu_bf16_shim  # noqa: E402
from .converters import CONVERTERS, Converter
from .core.fingerprint import Fingerprint, FingerprintSet
from .core.manifest import ExportManifest
from .core.merge import NonFiniteError
from .core.snapshot import ModelChangedError, SnapshotBuffers
from .core.verify import verify_snapshot
from .core.checkpoint_export import ExportHandle
from .export import ExportJob, export_hf, start_checkpoint_export, start_export

try:
    from .hooks import FingerprintHook, HFExportHook
except ModuleNotFoundError as _e:  # the core, the converters, export_hf and the CLI work without mmengine
    if (_e.name or "").split(".")[0] != "mmengine":
        raise

    def __getattr__(name: str):
        if name in ("FingerprintHook", "HFExportHook"):
            raise ImportError(f"sa2va_hooks.{name} needs mmengine, which is not installed: "
                              "pip install 'mmengine>=0.10.6'")
        raise AttributeError(f"module 'sa2va_hooks' has no attribute {name!r}")

__all__ = ["CONVERTERS", "Converter", "ExportHandle", "ExportJob", "ExportManifest", "Fingerprint", "FingerprintSet",
           "FingerprintHook", "HFExportHook", "ModelChangedError", "NonFiniteError", "SnapshotBuffers",
           "apply_torch_cpu_bf16_shim", "export_hf", "start_checkpoint_export", "start_export", "verify_snapshot"]
