"""Small, documented compatibility shims for the pinned training stack.

xtuner 0.2.0's ``SupervisedFinetune._prepare_for_flash_attn`` calls
``torch.cpu.is_bf16_supported()``, which torch 2.14 does not have, so xtuner cannot even build
a model on a CPU-only machine (where users convert checkpoints). The shim defines it, returning
False, only when it is missing; it never replaces a real implementation.

Lazy (xtuner-style) configs build the model before any hook is imported, so importing
``sa2va_hooks`` is too late for a training run: ``tools/train.py`` applies the shim in-process
and then runs xtuner's own train module.
"""
from __future__ import annotations

import torch


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


def mmengine_checkpoint_safe_globals() -> list:
    """The non-tensor types inside a checkpoint written by mmengine's CheckpointHook.

    torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.6's resume calls
    ``torch.load`` without ``weights_only``, so resuming fails on every mmengine checkpoint
    until these are allowed (``get_unsafe_globals_in_checkpoint`` lists exactly these):
    - ``HistoryBuffer`` (message_hub's logged scalars) and numpy's ``ndarray``/``dtype``/
      ``_reconstruct``/``scalar``, which its buffers hold;
    - ``builtins.getattr``: HistoryBuffer pickles its statistics methods as
      ``getattr(buffer, "min")``. Allowing it is safe in the weights_only unpickler because
      REDUCE only ever calls allowlisted callables: getattr can fetch an attribute of an object
      the unpickler was already allowed to build, but what it fetches can never be called.
    Nothing here can run code from the file.
    """
    import builtins

    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    types = [HistoryBuffer, np.ndarray, np.dtype, multiarray.multiarray._reconstruct,
             multiarray.multiarray.scalar, builtins.getattr]
    # numpy 2 pickles dtypes through their concrete classes (np.dtypes.Float64DType, ...)
    types += [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return types + deepspeed_checkpoint_safe_globals()


def deepspeed_checkpoint_safe_globals() -> list:
    """What mmengine + DeepSpeed checkpoint directories (``iter_N.pth/``) add: the model-states
    file's client state holds mmengine's ``ConfigDict`` (the DeepSpeed config), and the optimizer
    files DeepSpeed's loss scaler, ZeRO stage enum and fragment addresses. Without them, resuming
    such a run through xtuner (``get_seed_from_checkpoint`` loads the model states with torch's
    ``weights_only`` default) fails before training starts. All are plain data holders."""
    from mmengine.config.config import ConfigDict
    types: list = [ConfigDict]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # DeepSpeed is optional
        return types
    return types + [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def allow_mmengine_checkpoint_globals() -> None:
    """Let ``torch.load(weights_only=True)`` (torch's default) read mmengine checkpoints, so that
    resume works; see :func:`mmengine_checkpoint_safe_globals` for why each type is safe."""
    torch.serialization.add_safe_globals(mmengine_checkpoint_safe_globals())
