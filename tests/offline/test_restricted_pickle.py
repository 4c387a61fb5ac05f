"""``sa2va_hooks/offline/restricted_pickle.py`` and the one table of pickle global names it shares with
``compat.py`` (``core/vocab.py``): both allowlists take every name of the table, and resolve the
bookkeeping classes differently on purpose (the real class for resume, a placeholder for conversion)."""
from __future__ import annotations

import pickle

import pytest

from sa2va_hooks import compat
from sa2va_hooks.core import vocab
from sa2va_hooks.offline.restricted_pickle import (Placeholder, PlaceholderDict, RestrictedUnpickler, ZeroStage,
                                                   allowed_globals)


def _torch_name(obj) -> str:
    obj = obj[0] if isinstance(obj, tuple) else obj
    return f"{obj.__module__}.{obj.__qualname__}"


def test_the_unpickler_allows_every_name_of_the_shared_table():
    allowed = allowed_globals()
    shared = [*vocab.MMENGINE_PICKLE_GLOBALS, *vocab.DEEPSPEED_PICKLE_GLOBALS, *vocab.NUMPY_PICKLE_GLOBALS,
              *vocab.CODECS_ENCODE_GLOBALS, vocab.GETATTR_GLOBAL]
    shared += [f"{m}.{n}" for m in vocab.MULTIARRAY_MODULES for n in vocab.MULTIARRAY_PICKLE_NAMES]
    assert [n for n in shared if n not in allowed] == []


def test_bookkeeping_classes_resolve_to_placeholders_and_the_stage_to_our_enum():
    allowed = allowed_globals()
    for name in (*vocab.MMENGINE_PICKLE_GLOBALS, *vocab.DEEPSPEED_PICKLE_GLOBALS):
        got = allowed[name]
        assert got is ZeroStage or issubclass(got, (Placeholder, PlaceholderDict)), name
    assert issubclass(allowed["mmengine.config.config.ConfigDict"], dict)


def test_weights_only_allowlist_resolves_the_same_names_to_the_real_classes():
    pytest.importorskip("mmengine")
    names = {_torch_name(t) for t in compat.mmengine_checkpoint_safe_globals() if not isinstance(t, tuple)}
    assert set(vocab.MMENGINE_PICKLE_GLOBALS) <= names
    getattr_entry = [t for t in compat.mmengine_checkpoint_safe_globals() if isinstance(t, tuple)]
    assert getattr_entry == [(compat.checkpoint_getattr, vocab.GETATTR_GLOBAL)]  # never the builtin


def test_restricted_unpickler_refuses_a_name_off_the_list():
    data = pickle.dumps(print, protocol=2)  # builtins.print
    import io
    with pytest.raises(pickle.UnpicklingError, match="not on the list"):
        RestrictedUnpickler(io.BytesIO(data)).load()
