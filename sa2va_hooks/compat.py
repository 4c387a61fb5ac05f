"""Small, documented compatibility shims: every version-specific path outside the core lives here.

The tested matrix (README, "Install into an existing environment") runs Sa2VA's two stacks (`legacy`:
transformers 4.49, peft 0.11.1; `latest`: transformers 4.57, peft 0.17.1; both torch 2.14.1, xtuner
0.1.23) and the newest releases. What differs between the versions this module handles:
- numpy 1 keeps ``multiarray`` under ``numpy.core``: :func:`numpy_multiarray`.
- torch < 2.5 has no ``get_unsafe_globals_in_checkpoint`` and does not allow ``codecs.encode``:
  :func:`unsafe_globals_in_checkpoint`, :func:`mmengine_checkpoint_safe_globals`.
- transformers 5 writes a config's dtype as ``dtype``, earlier ones as ``torch_dtype``: :func:`config_dtype_keys`.
The PEFT shims the merge needs (PEFT < 0.12's single ``active_adapter``, PEFT < 0.15's missing
``AuxiliaryTrainingWrapper``) live in ``core/peft_compat.py``, so that the core imports nothing above it.
(numpy 1 and torch < 2.5 are below setup.py's ranges since issue 16 and no tested stack has them; the
paths stay for environments installed with ``--no-deps``.)

xtuner 0.2.0's ``SupervisedFinetune._prepare_for_flash_attn`` calls
``torch.cpu.is_bf16_supported()``, which torch 2.14 does not have, so xtuner 0.2.0 cannot even build
a model on a CPU-only machine (where users convert checkpoints). The shim defines it, returning
False, only when it is missing; it never replaces a real implementation. (Sa2VA's xtuner 0.1.23
asks ``torch.cuda`` only and does not need it.)

Lazy (xtuner-style) configs build the model before any hook is imported, so importing
``sa2va_hooks`` is too late for a training run: ``tools/train.py`` applies the shim in-process
and then runs xtuner's own train module.
"""
from __future__ import annotations

import enum
import importlib
import pickle

import torch
from .core.errors import BadInputError, BadTypeError, BadValueError
from .core.vocab import (CODECS_ENCODE_GLOBALS, DEEPSPEED_PICKLE_GLOBALS, GETATTR_GLOBAL, MMENGINE_PICKLE_GLOBALS,
                         MULTIARRAY_PICKLE_NAMES, NUMPY_PICKLE_GLOBALS, NUMPY_PICKLE_DTYPES)

def _cpu_bf16_unsupported() -> bool:
    """Stand-in for the missing torch.cpu.is_bf16_supported: report no bf16 so that xtuner
    picks fp32/fp16 paths on the CPU."""
    return False


def apply_torch_cpu_bf16_shim() -> bool:
    """Define torch.cpu.is_bf16_supported if missing. Returns True when the shim was applied."""
    if hasattr(torch.cpu, "is_bf16_supported"):
        return False
    torch.cpu.is_bf16_supported = _cpu_bf16_unsupported  # type: ignore[attr-defined]
    return True


def numpy_multiarray():
    """numpy's ``multiarray`` module: ``numpy._core.multiarray`` from numpy 2, ``numpy.core.multiarray``
    before (numpy 1.26 has a ``numpy._core`` stub without it)."""
    import numpy as np
    if int(np.__version__.split(".")[0]) >= 2:
        from numpy._core import multiarray
    else:
        from numpy.core import multiarray
    return multiarray


def config_dtype_keys(cfg: dict) -> list[str]:
    """The config.json keys that declare the dtype: the installed transformers' own (``dtype`` from 5,
    ``torch_dtype`` before) plus any the dict already carries."""
    import transformers
    own = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return [k for k in ("dtype", "torch_dtype") if k == own or k in cfg]


def resolve_global(name: str):
    """The object a pickle's global ``module.name`` names, imported the way the unpickler would."""
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def mmengine_checkpoint_safe_globals() -> list:
    """The non-tensor types inside a checkpoint written by mmengine's CheckpointHook, from the one
    table of names both our allowlists share (``core/vocab.py``, "pickle allowlists").

    torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.6's resume calls
    ``torch.load`` without ``weights_only``, so resuming fails on every mmengine checkpoint
    until these are allowed (``get_unsafe_globals_in_checkpoint`` lists exactly these):
    - ``HistoryBuffer`` (message_hub's logged scalars) and numpy's ``ndarray``/``dtype``/
      ``_reconstruct``/``scalar``, which its buffers hold;
    - ``builtins.getattr``, NOT the real one: HistoryBuffer pickles its statistics methods as
      ``getattr(HistoryBuffer, "min")`` (protocol 2 has no other way to name a method), so the
      name must resolve, but to :func:`checkpoint_getattr`, which only looks up those methods and
      members of known Enum classes. The real ``getattr`` reaches everything: ``getattr(getattr,
      "__self__")`` is the builtins module, whose ``eval`` torch's own allowlisted
      ``_rebuild_from_type_v2`` then calls with the file's arguments (issue 19: such a ``.pth``
      created a file through ``load_checkpoint``).
    Nothing here can run code from the file.
    """
    import numpy as np
    multiarray = numpy_multiarray()
    types = [resolve_global(n) for n in (*MMENGINE_PICKLE_GLOBALS, *NUMPY_PICKLE_GLOBALS)]
    types += [getattr(multiarray, n) for n in MULTIARRAY_PICKLE_NAMES]
    types.append((checkpoint_getattr, GETATTR_GLOBAL))
    # numpy scalars pickle their bytes through codecs.encode (a pure text-to-bytes function);
    # torch >= 2.5 allows it by default, torch 2.4 does not (both names are the one function)
    types += dict.fromkeys(resolve_global(n) for n in CODECS_ENCODE_GLOBALS)
    # numpy 2 pickles dtypes through their concrete classes (np.dtypes.Float64DType, ...)
    types += [type(np.dtype(t)) for t in NUMPY_PICKLE_DTYPES]
    return types + deepspeed_checkpoint_safe_globals()


class RefusedGetattrError(BadInputError, pickle.UnpicklingError):
    """A checkpoint's pickle asked ``getattr`` for something outside :func:`checkpoint_getattr`'s list."""


# Enum classes whose members a checkpoint may name through getattr (Python pickles an Enum member
# as ``getattr(EnumClass, "NAME")`` in some versions); filled by :func:`allow_checkpoint_enum`.
_CHECKPOINT_ENUMS: set = set()
# HistoryBuffer's own statistics methods, the ones mmengine registers in every buffer
_HISTORY_BUFFER_METHODS = ("min", "max", "current", "mean")


def allow_checkpoint_enum(cls) -> None:
    """Let :func:`checkpoint_getattr` resolve the members of the Enum class ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
        raise BadTypeError(f"{cls!r} is not an Enum class; only Enum members may be named through getattr")
    _CHECKPOINT_ENUMS.add(cls)


def checkpoint_getattr(obj, name):
    """What ``builtins.getattr`` means inside a checkpoint we load: a member of an allowed Enum
    class, or one of HistoryBuffer's statistics methods, looked up in the class's own dict (no
    descriptor, no ``__getattr__`` runs). Anything else raises :class:`RefusedGetattrError`:
    a generic getattr walks from any allowed object to ``__globals__``, ``__builtins__`` and
    ``eval``. The message names the type and attribute only, never the object's content."""
    if isinstance(obj, type) and isinstance(name, str):
        if obj in _CHECKPOINT_ENUMS and name in obj.__members__:
            return obj.__members__[name]
        if name in _HISTORY_BUFFER_METHODS:
            from mmengine.logging.history_buffer import HistoryBuffer
            if obj is HistoryBuffer:
                return vars(obj)[name]
    what = getattr(type(obj), "__qualname__", "?") if not isinstance(obj, type) else f"class {obj.__qualname__}"
    raise RefusedGetattrError(
        f"the pickle asks for attribute {str(name)[:60]!r} of a {what} through getattr; a checkpoint may only name "
        "members of known Enum classes and HistoryBuffer's statistics methods that way, so this file was refused "
        "(a generic getattr can reach any function, eval included)")


def deepspeed_checkpoint_safe_globals() -> list:
    """What mmengine + DeepSpeed checkpoint directories (``iter_N.pth/``) add: the model-states
    file's client state holds mmengine's ``ConfigDict`` (the DeepSpeed config, listed by
    :func:`mmengine_checkpoint_safe_globals`), and the optimizer files DeepSpeed's loss scaler, ZeRO
    stage enum and fragment addresses. Without them, resuming such a run through xtuner
    (``get_seed_from_checkpoint`` loads the model states with torch's ``weights_only`` default) fails
    before training starts. All are plain data holders."""
    try:
        types = [resolve_global(n) for n in DEEPSPEED_PICKLE_GLOBALS]
    except ImportError:  # DeepSpeed is optional
        return []
    for cls in types:
        if isinstance(cls, type) and issubclass(cls, enum.Enum):  # the ZeRO stage: named through getattr
            allow_checkpoint_enum(cls)
    return types


def allow_mmengine_checkpoint_globals() -> None:
    """Let ``torch.load(weights_only=True)`` (torch's default) read mmengine checkpoints, so that
    resume works; see :func:`mmengine_checkpoint_safe_globals` for why each type is safe."""
    torch.serialization.add_safe_globals(mmengine_checkpoint_safe_globals())


def _py3_global(module: str, name: str) -> str:
    """Protocol-2 pickles name globals the Python 2 way (``__builtin__.exec``); pickle maps them back."""
    import _compat_pickle
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def unsafe_globals_in_checkpoint(path: str) -> list[str]:
    """The globals a torch checkpoint file references beyond what ``torch.load(weights_only=True)``
    allows, listed without running anything from it. torch >= 2.5 has this as
    ``torch.serialization.get_unsafe_globals_in_checkpoint``; for torch 2.4 the pickle's opcodes
    are read here the same way (:func:`checkpoint_globals`).
    Raises ``ValueError`` for a file that is not a torch zip checkpoint."""
    own = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if own is not None:
        return own(path)
    from torch import _weights_only_unpickler as wu
    allowed = set(wu._get_allowed_globals()) | set(wu._get_user_allowed_globals())
    return sorted(g for g in checkpoint_globals(path) if g not in allowed)


def checkpoint_globals(path: str) -> set[str]:
    """Every global (``module.name``) the pickle of a torch zip checkpoint references, read from its
    opcodes (GLOBAL, and STACK_GLOBAL with its two strings from the stack or memo) without
    unpickling anything; one that this reader cannot name is listed as
    ``<a global this reader cannot name>``. Only the archive's ``data.pkl`` is read, not its tensors.
    Raises ``ValueError`` for a file that is not a torch zip checkpoint."""
    import pickletools
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            data = z.read(pkl)
    except (zipfile.BadZipFile, StopIteration) as e:
        raise BadValueError(f"{path} is not a torch zip checkpoint ({e})") from e
    found, pushed, memo = set(), [], {}  # pushed: the values of the last push ops (None: not a string)
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                pushed.append(arg)
            elif op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif op.name == "GLOBAL":
                found.add(_py3_global(*arg.split(" ", 1)))
                pushed.append(None)
            elif op.name == "STACK_GLOBAL":
                if len(pushed) >= 2 and isinstance(pushed[-2], str) and isinstance(pushed[-1], str):
                    found.add(_py3_global(pushed[-2], pushed[-1]))
                else:
                    found.add("<a global this reader cannot name>")
                pushed.append(None)
            elif op.name in ("EXT1", "EXT2", "EXT4", "INST", "OBJ"):  # names a class another way
                found.add(f"<a class named by opcode {op.name}>")
                pushed.append(None)
            else:
                pushed.append(None)
            del pushed[:-2]
    except ValueError as e:  # pickletools: a truncated or malformed opcode stream
        raise BadValueError(f"{path} holds a malformed pickle ({e})") from e
    return found
