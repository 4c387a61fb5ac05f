"""A DeepSpeed ZeRO checkpoint directory, consolidated to fp32 without running code from its files.

Why our own consolidation: DeepSpeed's ``zero_to_fp32`` unpickles every model-states and
optimizer file with full pickle, so a file whose only globals look harmless
(``builtins.getattr`` and ``torch._utils._rebuild_tensor_v2``) walks ``__globals__`` ->
``__builtins__`` -> ``eval`` and runs code (issue 19). Listing a pickle's globals beforehand cannot
see that: ``getattr`` is needed by real files (HistoryBuffer's methods) and reaches anything.
So every file here is

1. checked to be a regular file inside the checkpoint directory (no symlink out of it, no FIFO,
   which would block the reader forever, no device);
2. inspected without unpickling: every global it names must be in :data:`ALLOWED_GLOBALS`;
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
an ``IntEnum``; it resolves to :class:`ZeroStage`, a copy of its four members.

The format (read from DeepSpeed 0.18.9's ``deepspeed/utils/zero_to_fp32.py`` and checked against
its output by tests/test_hostile_checkpoints.py):

- one ``*_optim_states.pt`` per data-parallel rank; its ``optimizer_state_dict`` holds
  ``zero_stage``, ``partition_count`` and each rank's fp32 master partitions: ZeRO-1/2
  ``single_partition_of_fp32_groups`` (per param group one flat tensor; the group is the ranks'
  partitions concatenated, params laid out in ``param_shapes`` order, padded at the end so
  that its length is a multiple of 2 * world size), ZeRO-3 ``fp32_flat_groups`` (every param is
  split on its own into ``ceil(numel / world)`` elements per rank, the last rank's padded; the
  rank's groups concatenated are one vector of those slices in ``param_shapes`` order);
- model states: ZeRO-1/2 one ``mp_rank_00_model_states.pt``, ZeRO-3 one
  ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` per rank, holding ``param_shapes`` (per group,
  name -> shape), ``buffer_names`` with the buffers in ``module``, ``shared_params`` (name -> the
  name it shares storage with), and for parameters that were not trained
  ``frozen_param_shapes`` / ``frozen_param_fragments`` (ZeRO-1/2: the whole tensor on rank 0;
  ZeRO-3: each rank's ``ceil(numel / world)`` slice).
"""
from __future__ import annotations

import enum
import functools
import math
import os
import pickle
import re
import stat
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..compat import RefusedGetattrError, _py3_global, checkpoint_globals, numpy_multiarray
from ..core.errors import BadInputError, MissingFileError, NotRegularFileError, UnsafePickleError


class UnsafeCheckpointError(BadInputError, RuntimeError):
    """The checkpoint needs arbitrary code to unpickle, or points outside itself; it was not loaded."""


class ZeroCheckpointError(BadInputError, ValueError):
    """The DeepSpeed checkpoint directory is incomplete or inconsistent."""


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


_PLACEHOLDERS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": Placeholder,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": Placeholder,
    "deepspeed.utils.tensor_fragment.fragment_address": Placeholder,
    "mmengine.logging.history_buffer.HistoryBuffer": Placeholder,
    "mmengine.config.config.ConfigDict": PlaceholderDict,
}


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
    arguments the file supplies: it builds tensors, sizes, dtypes, arrays or plain containers."""
    import codecs

    import numpy as np
    out: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict, "builtins.set": set, "builtins.frozenset": frozenset,
        "builtins.bytearray": bytearray, "builtins.complex": complex, "builtins.slice": slice,
        "_codecs.encode": codecs.encode, "codecs.encode": codecs.encode,
        "torch.Size": torch.Size, "torch.Tensor": torch.Tensor, "torch.device": torch.device,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_checked,
        "builtins.getattr": _zero_getattr,
        "deepspeed.runtime.zero.config.ZeroStageEnum": ZeroStage,
        "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
    }
    for n in _TENSOR_REBUILDERS:
        if hasattr(torch._utils, n):
            out[f"torch._utils.{n}"] = getattr(torch._utils, n)
    for v in vars(torch).values():  # dtypes pickle as torch.float32 etc.
        if isinstance(v, torch.dtype):
            out[str(v)] = v
    for layout in (torch.strided, torch.sparse_coo, torch.sparse_csr):
        out[str(layout)] = layout
    multiarray = numpy_multiarray()
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2 and 1 names, either may load
        out[f"{module}._reconstruct"] = multiarray._reconstruct
        out[f"{module}.scalar"] = multiarray.scalar
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_):
        cls = type(np.dtype(t))
        if cls is not np.dtype:  # numpy 2's concrete dtype classes
            out[f"numpy.dtypes.{cls.__name__}"] = cls
    for name, base in _PLACEHOLDERS.items():
        out[name] = _placeholder(name, base)
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


_RESTRICTED = _pickle_module()


# --------------------------------------------------------------------------------------------- files

def regular_file(path: Path, inside: Path | None = None, what: str = "file") -> Path:
    """``path`` if it is a regular file (after following a symlink, which must then resolve inside
    ``inside`` when given), else an error naming it. Checked with ``stat`` before any ``open``: a
    FIFO would block the reader forever, a device or directory is no checkpoint."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise MissingFileError(f"{what} {path} does not exist (or is a symlink to nothing).") from e
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise NotRegularFileError(path, kind, "; it was not opened (reading a FIFO waits forever for a writer). Pass "
                                  "the path of a regular file.", what=what)
    if inside is not None and path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(inside.resolve()):
            raise UnsafeCheckpointError(
                f"{what} {path} is a symlink to a file outside the checkpoint directory {inside}; it was not opened. "
                "Copy the real file into the checkpoint directory if it belongs there.")
    return path


_TAG = re.compile(r"[^/\\\x00]{1,255}")


def resolve_tag_dir(root: Path) -> Path:
    """The directory holding the rank files: ``root`` itself (mmengine writes ``iter_N.pth/`` with
    ``tag=iter_N.pth`` and no ``latest``), or, in DeepSpeed's own layout, the tag that ``root/latest``
    names. ``latest`` must be a regular file (not a symlink) holding a plain directory name, and
    that directory must be inside ``root``: a tag like ``../..`` or ``/etc`` would make us read a
    checkpoint elsewhere. The error never shows the file's content."""
    latest = root / "latest"
    try:
        st = os.lstat(latest)
    except FileNotFoundError:
        return root
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise UnsafeCheckpointError(
            f"{latest} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a regular file'}; DeepSpeed writes it as "
            "a small regular file naming the checkpoint's tag directory. It was not read. Replace it with a regular "
            f"file holding the tag (e.g. `echo global_step100 > {latest}`), or pass the tag directory itself.")
    if st.st_size > 1024:
        raise ZeroCheckpointError(f"{latest} is {st.st_size} bytes; DeepSpeed's 'latest' holds one tag name (a few "
                                  "bytes). Is it the right file? Pass the tag directory itself instead.")
    with open(latest, "rb") as f:
        raw = f.read(1025)
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = ""
    if not (_TAG.fullmatch(tag) and tag.isprintable() and ".." not in tag and tag != "."):
        raise UnsafeCheckpointError(
            f"{latest} does not hold a plain tag name (one directory name inside {root}: no '/', no '..', printable, "
            "at most 255 characters), so it was not followed. Write the tag of the checkpoint to load into it, or "
            "pass the tag directory itself.")
    tag_dir = root / tag
    if not tag_dir.resolve().is_relative_to(root.resolve()):
        raise UnsafeCheckpointError(f"{latest} names tag directory {tag_dir}, which resolves outside {root} "
                                    "(a symlink); it was not followed. Pass the tag directory itself if you trust it.")
    if not tag_dir.is_dir():
        raise MissingFileError(f"{latest} names tag {tag!r}, but {tag_dir} is not a directory: the checkpoint was "
                                "removed or not completely copied. Pass an existing tag directory.")
    return tag_dir


_RANK = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_(optim|model)_states\.pt")


def _rank_files(tag_dir: Path, kind: str) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for p in tag_dir.iterdir():
        m = _RANK.fullmatch(p.name)
        if m and m.group(2) == kind:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------- loading

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


def load_pt(path: Path, *, allow_pickle: bool = False) -> dict:
    """One DeepSpeed file: restricted (see the module docstring) unless ``allow_pickle``; memory-mapped,
    so that the optimizer's moment tensors, which we never read, are never read from disk."""
    try:
        if allow_pickle:
            obj = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True, pickle_module=_RESTRICTED)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path} was refused while loading: {e}. Nothing in it was run. If you trust the "
                                    "directory, pass --allow-pickle (the bypass is recorded in the manifest).") from e
    except (RuntimeError, EOFError) as e:  # a truncated archive, a missing record
        raise ZeroCheckpointError(f"cannot read {path}: {type(e).__name__}: {e}. The file is damaged or was not "
                                  "completely written; use another checkpoint.") from e
    if not isinstance(obj, dict):
        raise ZeroCheckpointError(f"{path} holds a {type(obj).__name__}, not the dict DeepSpeed saves; is it the "
                                  "right file?")
    return obj


def zero_files(tag_dir: Path) -> tuple[list[Path], list[Path]]:
    """The optimizer files (rank order) and the model-states files (rank order; ZeRO-1/2 has one)
    that consolidation reads, each a regular file inside ``tag_dir``. Nothing else is opened."""
    optim = _rank_files(tag_dir, "optim")
    if not optim:
        found = sorted(p.name for p in tag_dir.glob("*.pt"))[:10]
        raise ZeroCheckpointError(f"{tag_dir} holds no DeepSpeed optimizer files (zero_pp_rank_R_mp_rank_00_optim_"
                                  f"states.pt); found {found or 'no *.pt file'}. The fp32 weights are in those files: "
                                  "pass a complete ZeRO checkpoint directory.")
    if list(optim) != list(range(len(optim))):
        raise ZeroCheckpointError(f"{tag_dir} holds optimizer files of ranks {list(optim)}, not 0..{len(optim) - 1}: "
                                  "a rank's file is missing; the checkpoint is incomplete.")
    model = _rank_files(tag_dir, "model")
    if (tag_dir / "mp_rank_00_model_states.pt").exists() or (tag_dir / "mp_rank_00_model_states.pt").is_symlink():
        models = [tag_dir / "mp_rank_00_model_states.pt"]  # ZeRO-1/2
    else:
        models = list(model.values())
        if not models or list(model) != list(range(len(model))):
            raise ZeroCheckpointError(
                f"{tag_dir} holds no complete set of DeepSpeed model-states files (mp_rank_00_model_states.pt, or "
                f"zero_pp_rank_R_mp_rank_00_model_states.pt for ranks 0..N-1; found ranks {list(model)}). Pass the "
                "iter_N.pth directory that mmengine + DeepSpeed wrote.")
    for p in [*optim.values(), *models]:
        regular_file(p, inside=tag_dir, what="DeepSpeed checkpoint file")
    return list(optim.values()), models


def consolidate(tag_dir: Path, *, allow_pickle: bool = False) -> tuple[OrderedDict, dict]:
    """The fp32 state dict of a ZeRO-1/2/3 checkpoint, and the rank-0 model-states dict (whose
    client state holds mmengine's ``meta`` and ``message_hub``). Every file is checked (regular,
    inside, allowed globals) before the first one is unpickled."""
    optim_files, model_files = zero_files(tag_dir)
    if not allow_pickle:
        for p in [*model_files, *optim_files]:
            check_globals(p)
    models = [load_pt(p, allow_pickle=allow_pickle) for p in model_files]
    partitions, stage = [], None
    for p in optim_files:
        osd = load_pt(p, allow_pickle=allow_pickle).get("optimizer_state_dict")
        if not isinstance(osd, dict) or "zero_stage" not in osd:
            raise ZeroCheckpointError(f"{p} holds no ZeRO optimizer state (optimizer_state_dict.zero_stage); it is "
                                      "not a DeepSpeed ZeRO checkpoint file.")
        stage = int(osd["zero_stage"])
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        world = osd.get("partition_count")
        world = max(world) if isinstance(world, (list, tuple)) else world
        if world != len(optim_files):
            raise ZeroCheckpointError(f"{p} was written by {world} ranks, but {tag_dir} holds {len(optim_files)} "
                                      "optimizer files: a rank's file is missing or left over from another run.")
        groups = osd.get(key)
        if not isinstance(groups, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in groups):
            raise ZeroCheckpointError(f"{p} (ZeRO stage {stage}) holds no fp32 partitions under {key}.")
        partitions.append([t.detach().reshape(-1) for t in groups])
    if stage not in (1, 2, 3):
        raise ZeroCheckpointError(f"{optim_files[0]} records ZeRO stage {stage}; only stages 1, 2 and 3 hold "
                                  "partitioned fp32 weights.")
    for p, m in zip(model_files, models, strict=True):
        if "param_shapes" not in m or "buffer_names" not in m:
            raise ZeroCheckpointError(f"{p} holds no param_shapes/buffer_names: it is not a DeepSpeed model-states "
                                      "file.")
    if stage == 3 and len(models) != len(optim_files):
        raise ZeroCheckpointError(f"{tag_dir}: ZeRO-3 needs one model-states file per rank ({len(optim_files)}), "
                                  f"found {len(models)}.")
    state: OrderedDict = OrderedDict()
    first = models[0]
    module = first.get("module") or {}
    state.update((k, v.float()) for k, v in module.items() if k in set(first["buffer_names"]))
    if stage == 3:
        _zero3(state, partitions, models, model_files)
    else:
        _zero12(state, partitions, first, model_files[0])
    for name, source in (first.get("shared_params") or {}).items():
        if source in state:
            state[name] = state[source]
    return state, first


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def _zero12(state: OrderedDict, partitions: list[list[torch.Tensor]], model: dict, model_file: Path) -> None:
    """ZeRO-1/2: each param group's flat fp32 vector is the ranks' partitions one after the other."""
    world = len(partitions)
    frozen = model.get("frozen_param_shapes") or {}
    fragments = model.get("frozen_param_fragments") or {}
    for name, shape in frozen.items():
        if name not in fragments:
            raise ZeroCheckpointError(f"{model_file} lists frozen parameter {name} but holds no fragment of it.")
        state[name] = fragments[name].reshape(torch.Size(shape))
    shapes = model["param_shapes"]
    if len(shapes) != len(partitions[0]) or any(len(p) != len(partitions[0]) for p in partitions):
        raise ZeroCheckpointError(f"{model_file} lists {len(shapes)} param groups, the optimizer files hold "
                                  f"{[len(p) for p in partitions]}: the files are from different checkpoints.")
    align = 2 * world
    for g, group_shapes in enumerate(shapes):
        flat = torch.cat([partitions[r][g] for r in range(world)])
        offset = 0
        for name, shape in group_shapes.items():
            n = _numel(shape)
            if offset + n > flat.numel():
                raise ZeroCheckpointError(f"param group {g} holds {flat.numel()} fp32 values, fewer than its "
                                          f"parameters need (at {name}): the files are from different checkpoints.")
            state[name] = flat[offset:offset + n].view(torch.Size(shape))
            offset += n
        if math.ceil(offset / align) * align != math.ceil(flat.numel() / align) * align:
            raise ZeroCheckpointError(f"param group {g}: its parameters take {offset} values, the partitions hold "
                                      f"{flat.numel()} (more than the alignment padding): the files are from "
                                      "different checkpoints.")


def _slice(groups: list[torch.Tensor], starts: list[int], begin: int, length: int) -> torch.Tensor:
    """``length`` values from ``begin`` of the concatenation of ``groups`` (without concatenating them)."""
    parts, end = [], begin + length
    for g, s in zip(groups, starts, strict=True):
        lo, hi = max(begin, s), min(end, s + g.numel())
        if lo < hi:
            parts.append(g[lo - s:hi - s])
    return torch.cat(parts) if len(parts) != 1 else parts[0]


def _zero3(state: OrderedDict, partitions: list[list[torch.Tensor]], models: list[dict],
           model_files: list[Path]) -> None:
    """ZeRO-3: each parameter is split on its own; rank r holds values [r*k, (r+1)*k) of it, k =
    ceil(numel / world), at the same offset in each rank's (concatenated) groups."""
    world = len(partitions)
    frozen = models[0].get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        try:
            frags = [m["frozen_param_fragments"][name].reshape(-1) for m in models]
        except (KeyError, TypeError) as e:
            raise ZeroCheckpointError(f"frozen parameter {name}: a model-states file of {model_files[0].parent} holds "
                                      "no fragment of it; the checkpoint is incomplete.") from e
        state[name] = torch.cat(frags)[:_numel(shape)].view(torch.Size(shape))
    sizes = [sum(g.numel() for g in rank) for rank in partitions]
    if len(set(sizes)) != 1:
        raise ZeroCheckpointError(f"the ranks hold different numbers of fp32 values ({sizes}): the optimizer files "
                                  "are from different checkpoints.")
    starts = [[sum(g.numel() for g in rank[:i]) for i in range(len(rank))] for rank in partitions]
    offset = 0
    for group_shapes in models[0]["param_shapes"]:
        for name, shape in group_shapes.items():
            n = _numel(shape)
            k = math.ceil(n / world)
            if offset + k > sizes[0]:
                raise ZeroCheckpointError(f"the fp32 partitions end before parameter {name}: the model-states and "
                                          "optimizer files are from different checkpoints.")
            full = torch.cat([_slice(partitions[r], starts[r], offset, k) for r in range(world)])
            state[name] = full[:n].view(torch.Size(shape)).clone()
            offset += k
    if offset != sizes[0]:
        raise ZeroCheckpointError(f"the parameters take {offset} fp32 values per rank, the partitions hold {sizes[0]}: "
                                  "the model-states and optimizer files are from different checkpoints.")
