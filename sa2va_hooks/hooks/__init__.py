"""Thin mmengine hooks; importing this module registers them in mmengine's HOOKS."""
from .fingerprint_hook import FingerprintHook
from .hf_export_hook import HFExportHook

__all__ = ["FingerprintHook", "HFExportHook"]
