"""Our restricted unpickler for DeepSpeed checkpoint files, which runs no code from them.

Why our own: DeepSpeed's ``zero_to_fp32`` unpickles every model-states and optimizer file with full
pickle, so a file whose only globals look harmless (``builtins.getattr`` and
``torch._utils._rebuild_tensor_v2``) walks ``__globals__`` -> ``__builtins__`` -> ``eval`` and runs
code (issue 19). Listing a pickle's globals beforehand cannot see that: ``getattr`` is needed by
real files (HistoryBuffer's methods) and reaches anything. So every file the consolidation
(``zero_checkpoint.py``) reads is

1. checked to be a regular file inside the checkpoint directory (``zero_checkpoint.regular_file``);
2. inspected without unpickling: every global it names must be in :func:`allowed_globals`
   (:func:`check_globals`);
3. unpickled by :class:`RestrictedUnpickler`, whose ``find_class`` returns only those names
   (a second line of defence, and the only one that sees the *arguments*: ``getattr`` resolves to
   a function that only returns members of an allowed Enum class).

What the allowed names resolve to: torch's tensor rebuilders, dtypes, ``Size`` and ``device``
(the same set torch's ``weights_only`` loader trusts); numpy's array and scalar rebuilders; and,
for DeepSpeed's and mmengine's bookkeeping classes (``LossScaler``, ``DynamicLossScaler``,
``fragment_address``, ``ConfigDict``, ``HistoryBuffer``), *placeholders* of our own: the
consolidation never needs their values, so their real classes are never imported, no
``__setstate__`` of theirs runs (HistoryBuffer's writes into a class-level registry) and DeepSpeed
need not be installed to convert a checkpoint. The one DeepSpeed value we need, the ZeRO stage, is
an ``IntEnum``; it resolves to :class:`ZeroStage`, a copy of its four members. The names of the
mmengine, DeepSpeed and numpy globals are the table ``core/vocab.py`` shares with the
``weights_only`` allowlist of ``compat.py`` (resume), so that the two cannot drift apart.
"""
from __future__ import annotations

import enum
import functools
import pickle
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..compat import RefusedGetattrError, _py3_global, checkpoint_globals, numpy_multiarray, resolve_global
from ..core.errors import BadInputError, UnsafePickleError
from ..core.vocab import (CODECS_ENCODE_GLOBALS, DEEPSPEED_PICKLE_GLOBALS, GETATTR_GLOBAL, MMENGINE_PICKLE_GLOBALS,
                          MULTIARRAY_MODULES, MULTIARRAY_PICKLE_NAMES, NUMPY_PICKLE_DTYPES, NUMPY_PICKLE_GLOBALS)


class UnsafeCheckpointError(BadInputError, RuntimeError):
    """The checkpoint needs arbitrary code to unpickle, or points outside itself; it was not loaded."""




class ZeroStage(enum.IntEnum):
    """DeepSpeed's ``deepspeed.runtime.zero.config.ZeroStageEnum``, member for member, so that the
    stage an optimizer file records can be read without importing DeepSpeed."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3
    max_stage = 3


class Placeholder:
    """Stands in for a bookkeeping class of DeepSpeed or mmengine whose value the consolidation
    does not need: it accepts any constructor arguments and state and keeps them as plain data,
    running none of the real class's code."""

    source = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.source}>"


class PlaceholderDict(dict):
    """A :class:`Placeholder` for a dict subclass (mmengine's ``ConfigDict``): its items load as a
    plain dict's."""

    source = "?"

    def __setstate__(self, state):
        self.state = state


# what the shared table's bookkeeping classes resolve to here: the ZeRO stage to our copy of its enum,
# mmengine's ConfigDict (a dict subclass) to a dict placeholder, every other one to a plain placeholder
_STAND_INS: dict[str, type] = {"deepspeed.runtime.zero.config.ZeroStageEnum": ZeroStage,
                               "mmengine.config.config.ConfigDict": PlaceholderDict}
# numpy dtype classes this unpickler allows beyond the shared table (torch's weights_only allowlist does
# not list them; adding them there would widen what resume loads)
_UNPICKLER_ONLY_DTYPES = ("int8", "uint8")


def _stand_in(name: str) -> type:
    base = _STAND_INS.get(name, Placeholder)
    return base if base is ZeroStage else _placeholder(name, base)


def _placeholder(name: str, base: type) -> type:
    return type(name.rsplit(".", 1)[1], (base,), {"source": name, "__module__": __name__})


_TENSOR_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                      "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
                      "_rebuild_meta_tensor_no_storage", "_rebuild_device_tensor_from_cpu_tensor")


def _rebuild_from_type_checked(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type_v2`` calls ``func(*args)`` with whatever the pickle passes:
    here ``func`` must be one of torch's tensor rebuilders, the type a plain Tensor or Parameter,
    and the state plain attributes (ZeRO-3 pickles its ``ds_id`` this way)."""
    rebuilders = {getattr(torch._utils, n, None) for n in _TENSOR_REBUILDERS} - {None}
    if func not in rebuilders or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafePickleError(
            f"the pickle rebuilds a tensor through {getattr(func, '__qualname__', type(func).__qualname__)!s:.60} as "
            f"{getattr(new_type, '__qualname__', '?')!s:.60}; only torch's own tensor rebuilders and plain "
            "Tensor/Parameter are allowed")
    if state is not None and not (isinstance(state, dict) and all(
            isinstance(k, str) and k.isidentifier() and not k.startswith("_") for k in state)):
        raise UnsafePickleError("the pickle sets tensor attributes other than plain public names")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _zero_getattr(obj, name):
    """``builtins.getattr`` as our unpickler resolves it: a member of :class:`ZeroStage` or a
    placeholder's attribute (HistoryBuffer pickles ``getattr(HistoryBuffer, "min")``; the
    placeholder's stands in as a string). Anything else is refused (see the module docstring)."""
    if obj is ZeroStage and isinstance(name, str) and name in ZeroStage.__members__:
        return ZeroStage.__members__[name]
    if (isinstance(obj, type) and issubclass(obj, (Placeholder, PlaceholderDict)) and isinstance(name, str)
            and name.isidentifier() and not name.startswith("_")):
        return f"<{obj.source}.{name}>"
    what = f"class {obj.__qualname__}" if isinstance(obj, type) else getattr(type(obj), "__qualname__", "?")
    raise RefusedGetattrError(
        f"the pickle asks for attribute {str(name)[:60]!r} of a {what} through getattr; only members of DeepSpeed's "
        "ZeroStageEnum and attributes of its bookkeeping classes may be named that way (a generic getattr reaches "
        "any function, eval included)")


@functools.lru_cache(maxsize=1)
def allowed_globals() -> dict[str, Any]:
    """``module.name`` -> what our unpickler returns for it. Each of these is safe to call with any
    arguments the file supplies: it builds tensors, sizes, dtypes, arrays or plain containers. The
    mmengine, DeepSpeed and numpy names come from the table shared with ``compat.py``
    (``core/vocab.py``)."""
    import numpy as np
    out: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict, "builtins.set": set, "builtins.frozenset": frozenset,
        "builtins.bytearray": bytearray, "builtins.complex": complex, "builtins.slice": slice,
        "torch.Size": torch.Size, "torch.Tensor": torch.Tensor, "torch.device": torch.device,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_checked,
        GETATTR_GLOBAL: _zero_getattr,
    }
    out.update((n, resolve_global(n)) for n in (*CODECS_ENCODE_GLOBALS, *NUMPY_PICKLE_GLOBALS))
    for n in _TENSOR_REBUILDERS:
        if hasattr(torch._utils, n):
            out[f"torch._utils.{n}"] = getattr(torch._utils, n)
    for v in vars(torch).values():  # dtypes pickle as torch.float32 etc.
        if isinstance(v, torch.dtype):
            out[str(v)] = v
    for layout in (torch.strided, torch.sparse_coo, torch.sparse_csr):
        out[str(layout)] = layout
    multiarray = numpy_multiarray()
    for module in MULTIARRAY_MODULES:  # numpy 2 and 1 names, either may load
        for n in MULTIARRAY_PICKLE_NAMES:
            out[f"{module}.{n}"] = getattr(multiarray, n)
    for t in (*NUMPY_PICKLE_DTYPES, *_UNPICKLER_ONLY_DTYPES):
        cls = type(np.dtype(t))
        if cls is not np.dtype:  # numpy 2's concrete dtype classes
            out[f"numpy.dtypes.{cls.__name__}"] = cls
    for name in (*MMENGINE_PICKLE_GLOBALS, *DEEPSPEED_PICKLE_GLOBALS):
        out[name] = _stand_in(name)
    return out


def _is_storage_name(name: str) -> bool:
    """torch's own loader resolves ``torch.FloatStorage`` & co. itself before asking ours."""
    module, _, cls = name.rpartition(".")
    return module == "torch" and cls.endswith("Storage") and isinstance(getattr(torch, cls, None), type)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only build what :func:`allowed_globals` names. ``torch.load``
    subclasses it (its ``UnpicklerWrapper`` maps storage names, then calls this ``find_class``)."""

    def find_class(self, module: str, name: str):
        full = _py3_global(module, name)
        allowed = allowed_globals()
        if full in allowed:
            return allowed[full]
        raise UnsafePickleError(f"the pickle names {full[:120]!r}, which is not on the list of types a DeepSpeed "
                                     "checkpoint may contain")


def _pickle_module() -> types.ModuleType:
    module = types.ModuleType("sa2va_hooks_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.UnpicklingError = pickle.UnpicklingError

    def load(*args, **kwargs):  # torch's loader for pre-1.6 files; those are refused before loading
        raise UnsafePickleError("legacy (non-zip) torch files are not read from DeepSpeed checkpoints")
    module.load = load
    return module


RESTRICTED = _pickle_module()  # the ``pickle_module`` torch.load gets for a DeepSpeed file


def check_globals(path: Path) -> None:
    """Refuse ``path`` when its pickle names anything outside :func:`allowed_globals`, before any of it
    is unpickled."""
    try:
        names = checkpoint_globals(str(path))
    except (ValueError, OSError) as e:
        raise UnsafeCheckpointError(f"cannot inspect {path} before loading it ({e}); it is not a readable torch "
                                    "checkpoint file. Nothing in it was run.") from e
    allowed = allowed_globals()
    unknown = sorted(n for n in names if n not in allowed and not _is_storage_name(n))
    if unknown:
        raise UnsafeCheckpointError(
            f"{path} needs types outside the safe list to load ({', '.join(u[:120] for u in unknown[:20])}); "
            "nothing in it was run. If you trust the directory, pass --allow-pickle "
            "(the bypass is recorded in the manifest).")
