"""The PEFT version shims the core's merge needs, kept inside the core so that the core imports
nothing of the package above it (``sa2va_hooks/compat.py`` keeps the shims of the hooks, the
offline loader and the CLI).

The tested matrix (README) runs PEFT 0.11.1 (``legacy``), 0.17.1 (``latest``) and the newest
release. What differs between them here:
- PEFT < 0.12's ``ModulesToSaveWrapper`` has one ``active_adapter``: :func:`active_saved_copies`.
- PEFT < 0.15 has no ``AuxiliaryTrainingWrapper`` (the base class of ``ModulesToSaveWrapper`` and
  the trainable-token wrappers added later): :data:`AuxiliaryTrainingWrapper` stands in for it.
"""
from __future__ import annotations

try:
    from peft.utils.other import AuxiliaryTrainingWrapper
except ImportError:  # peft < 0.15: ModulesToSaveWrapper was the only auxiliary wrapper
    class AuxiliaryTrainingWrapper:  # type: ignore[no-redef]
        """Stand-in: no module is an instance, so nothing is refused that PEFT < 0.15 can build."""


def active_saved_copies(wrapper) -> list[str]:
    """The active adapter names of a PEFT ``ModulesToSaveWrapper``: ``active_adapters`` from peft 0.12,
    a single ``active_adapter`` string before."""
    names = getattr(wrapper, "active_adapters", None)
    if names is None:
        names = wrapper.active_adapter
    return [names] if isinstance(names, str) else list(names)
