"""A DeepSpeed ZeRO checkpoint directory, consolidated to fp32 without running code from its files.

Why our own consolidation: DeepSpeed's ``zero_to_fp32`` unpickles every file with full pickle, which
runs code from a hostile file (issue 19). Here every file is checked to be a regular file inside the
checkpoint directory (no symlink out of it, no FIFO, which would block the reader forever, no
device), its globals are checked against the allowlist and it is unpickled by our restricted
unpickler (``restricted_pickle.py``, which says why each allowed name is safe).

The format (read from DeepSpeed 0.18.9's ``deepspeed/utils/zero_to_fp32.py`` and checked against
its output by tests/scenarios/test_hostile_checkpoints.py):

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

import math
import os
import pickle
import re
import stat
from collections import OrderedDict
from pathlib import Path

import torch

from ..core.errors import BadInputError, MissingFileError, NotRegularFileError
from .restricted_pickle import RESTRICTED, UnsafeCheckpointError, check_globals


class ZeroCheckpointError(BadInputError, ValueError):
    """The DeepSpeed checkpoint directory is incomplete or inconsistent."""


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

def load_pt(path: Path, *, allow_pickle: bool = False) -> dict:
    """One DeepSpeed file: restricted (see the module docstring) unless ``allow_pickle``; memory-mapped,
    so that the optimizer's moment tensors, which we never read, are never read from disk."""
    try:
        if allow_pickle:
            obj = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True, pickle_module=RESTRICTED)
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
