"""Out-of-place LoRA merge, one tensor at a time, for whatever model is in memory.

The walker turns a live module tree (plain, PEFT-wrapped, or a training wrapper with PEFT
models somewhere inside it) into a list of :class:`SourceTensor` plans. Each plan knows its
exported name, shape and dtype before any data is produced, so a writer can lay out shards
first and then materialise tensors one by one: peak extra memory is about one shard.

Why out of place: PEFT's ``merge()``/``unmerge()`` on a live bf16 layer does not restore the
base weight exactly (2 % of elements changed in the anchor measurement), so merging during
training would corrupt it. Here the delta comes from PEFT's own ``get_delta_weight`` called on
a shallow proxy of the layer whose adapter weights are fp32 copies; the live module, its
parameters and their version counters are never touched.

Naming: PEFT wrappers (``PeftModel.base_model.model``, ``base_layer``, ``modules_to_save.<name>``)
are transparent, so names come out as the unwrapped HF model would have them. The training-time
parameter names that feed each tensor are kept in ``sources``.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Iterator

import torch
from torch import nn

try:  # PEFT is a dependency, but keep the walker usable on plain models if it is broken.
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper
except ImportError as _e:  # pragma: no cover - exercised only on broken installs
    PeftModel = LoraLayer = BaseTuner = BaseTunerLayer = ModulesToSaveWrapper = ()  # type: ignore
    _PEFT_IMPORT_ERROR: Exception | None = _e
else:
    _PEFT_IMPORT_ERROR = None

ROLE_FROZEN = "frozen"
ROLE_TRAINABLE = "trainable"  # a parameter trained directly (projector, head, mask decoder)
ROLE_LORA = "lora_merged"  # a base weight with one or more LoRA deltas added
ROLE_SAVED_COPY = "modules_to_save"  # PEFT's trained copy of a whole module
TRAINED_ROLES = (ROLE_TRAINABLE, ROLE_LORA, ROLE_SAVED_COPY)


class UnsupportedModuleError(TypeError):
    """A module holds trained state that this exporter cannot merge faithfully."""


@dataclasses.dataclass
class MergedTensor:
    """One exported tensor, ready to write, plus what training did to it."""

    tensor: torch.Tensor
    delta_rel_norm: float | None = None  # ||W_merged - W_base|| / ||W_base|| in fp32, LoRA only
    differs_from_base: bool | None = None  # after the cast to the export dtype; None = unknown


@dataclasses.dataclass
class SourceTensor:
    """A plan for one exported tensor: its name and layout now, its data on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the live source tensor
    role: str
    sources: tuple[str, ...]  # training-time names of the parameters that feed this tensor
    _produce: Callable[[torch.dtype | None], MergedTensor] = dataclasses.field(repr=False)

    def out_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        """Floating tensors take the export dtype; integer and bool buffers keep theirs."""
        if dtype is not None and self.dtype.is_floating_point:
            return dtype
        return self.dtype

    def materialize(self, dtype: torch.dtype | None) -> MergedTensor:
        """Produce the exported tensor on its source device, contiguous, in ``out_dtype(dtype)``."""
        return self._produce(self.out_dtype(dtype))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A private, contiguous copy in ``dtype`` on the tensor's own device (the GPU does the
    arithmetic; the exporter moves the result to the host once)."""
    # .to() of the same dtype returns the same storage; clone so the writer never holds a view
    # of a live parameter that training may update mid-write.
    out = t.detach().to(dtype=dtype)
    if out.data_ptr() == t.data_ptr():
        out = out.clone()
    return out.contiguous()


def _plain(name: str, t: torch.Tensor, role: str, source: str) -> SourceTensor:
    def produce(dtype: torch.dtype) -> MergedTensor:
        return MergedTensor(_cast(t, dtype))

    return SourceTensor(name, tuple(t.shape), t.dtype, role, (source,), produce)


def _fp32_leaf_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of an adapter leaf module whose parameters are detached fp32 copies."""
    proxy = copy.copy(module)
    proxy._parameters = {k: None if v is None else nn.Parameter(v.detach().float().clone(), requires_grad=False)
                         for k, v in module._parameters.items()}
    proxy._buffers = {k: None if v is None else v.detach().float().clone() if v.is_floating_point() else v
                      for k, v in module._buffers.items()}
    return proxy


def _fp32_adapter_proxy(layer: nn.Module, adapter: str) -> nn.Module:
    """A shallow copy of ``layer`` whose ``adapter`` weights are fp32 copies.

    PEFT's ``get_delta_weight`` reads the adapter weights from the layer and computes in their
    dtype (upcasting only on CPU for fp16/bf16, then casting back). Handing it fp32 copies makes
    it compute the delta exactly as ``merge_and_unload()`` does on an fp32 model, without touching
    the live layer or its parameters.
    """
    proxy = copy.copy(layer)
    proxy._modules = dict(layer._modules)
    proxy._parameters = dict(layer._parameters)
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is None or adapter not in container:
            continue
        if isinstance(container, nn.ParameterDict):
            proxy._modules[attr] = nn.ParameterDict(
                {adapter: nn.Parameter(container[adapter].detach().float().clone(), requires_grad=False)})
        else:
            proxy._modules[attr] = nn.ModuleDict({adapter: _fp32_leaf_copy(container[adapter])})
    return proxy


def _lora_variant_name(layer: nn.Module, adapter: str) -> str | None:
    if getattr(layer, "use_dora", {}).get(adapter, False):
        return "DoRA"
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None:
        return type(variant).__name__
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return "lora_bias"
    return None


def _lora_adapters_to_merge(layer: nn.Module, name: str) -> list[str]:
    """The adapters whose delta belongs in the export: active, present, and not merged yet."""
    if getattr(layer, "disable_adapters", False):
        raise UnsupportedModuleError(
            f"LoRA module '{name}' has its adapters disabled, so the model in memory computes with the base "
            "weights only. Re-enable the adapter (model.enable_adapter_layers()) or export the base on purpose.")
    already = set(getattr(layer, "merged_adapters", []))
    present = set(layer.lora_A.keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())
    return [a for a in layer.active_adapters if a in present and a not in already]


def _lora_target(name: str, layer: nn.Module, weight: torch.Tensor, source: str,
                 adapters: list[str]) -> SourceTensor:
    unsupported = {a: v for a in adapters if (v := _lora_variant_name(layer, a))}
    if unsupported:
        raise UnsupportedModuleError(
            f"LoRA module '{name}' uses {sorted(set(unsupported.values()))} for adapter(s) {sorted(unsupported)}, "
            "which this version of sa2va_hooks does not merge yet. Refusing to export without it; "
            "merge with PEFT offline or disable that option.")

    def produce(dtype: torch.dtype) -> MergedTensor:
        base32 = weight.detach().float()  # a copy unless already fp32; never written to
        merged32 = base32
        for adapter in adapters:
            delta = type(layer).get_delta_weight(_fp32_adapter_proxy(layer, adapter), adapter)
            merged32 = merged32 + delta.to(base32.device, torch.float32)
        if not torch.isfinite(merged32).all():
            raise FloatingPointError(f"merged weight of LoRA module '{name}' has NaN or Inf; the adapter weights "
                                     "are not finite. Check the training loss for divergence before exporting.")
        delta_norm = float(torch.linalg.vector_norm((merged32 - base32).double()))
        base_norm = float(torch.linalg.vector_norm(base32.double()))
        out = _cast(merged32, dtype)
        differs = not torch.equal(out, _cast(weight, dtype))
        return MergedTensor(out, delta_norm / base_norm if base_norm else float("inf") if delta_norm else 0.0,
                            differs)

    lora_sources = tuple(f"{source.rsplit('base_layer.', 1)[0]}{n}"
                         for a in adapters for n, _ in layer.named_parameters(recurse=True)
                         if f".{a}" in f".{n}" and not n.startswith("base_layer."))
    return SourceTensor(f"{name}.weight" if name else "weight", tuple(weight.shape), weight.dtype, ROLE_LORA,
                        (source,) + lora_sources, produce)


def _saved_copy(name: str, t: torch.Tensor, original: torch.Tensor | None, source: str) -> SourceTensor:
    def produce(dtype: torch.dtype) -> MergedTensor:
        out = _cast(t, dtype)
        differs = None if original is None else not torch.equal(out, _cast(original, dtype))
        return MergedTensor(out, None, differs)

    return SourceTensor(name, tuple(t.shape), t.dtype, ROLE_SAVED_COPY, (source,), produce)


@dataclasses.dataclass
class WalkResult:
    tensors: list[SourceTensor]
    tied: dict[str, str]  # name skipped because it shares storage with -> name exported


class _Walker:
    """Depth-first walk that strips PEFT wrappers and plans every exported tensor."""

    def __init__(self) -> None:
        self.out: list[SourceTensor] = []
        self.tied: dict[str, str] = {}
        self._seen: dict[int, str] = {}

    def _emit(self, st: SourceTensor, key: torch.Tensor) -> None:
        # Tied parameters (e.g. lm_head tied to embed_tokens) are exported once, like
        # save_pretrained does; from_pretrained ties them again from the config.
        first = self._seen.get(id(key))
        if first is not None:
            self.tied[st.name] = first
            return
        self._seen[id(key)] = st.name
        self.out.append(st)

    def _own_tensors(self, module: nn.Module, name: str, tprefix: str, skip: set[str] = frozenset()) -> None:
        for pname, p in module._parameters.items():
            if p is None or pname in skip:
                continue
            role = ROLE_TRAINABLE if p.requires_grad else ROLE_FROZEN
            self._emit(_plain(_join(name, pname), p, role, tprefix + pname), p)
        for bname, b in module._buffers.items():
            if b is None or bname in module._non_persistent_buffers_set or bname in skip:
                continue
            self._emit(_plain(_join(name, bname), b, ROLE_FROZEN, tprefix + bname), b)

    def walk(self, module: nn.Module, name: str = "", tprefix: str = "") -> None:
        if PeftModel and isinstance(module, PeftModel):
            return self.walk(module.base_model, name, tprefix + "base_model.")
        if BaseTuner and isinstance(module, BaseTuner):
            return self.walk(module.model, name, tprefix + "model.")
        if ModulesToSaveWrapper and isinstance(module, ModulesToSaveWrapper):
            return self._walk_saved_copy(module, name, tprefix)
        if LoraLayer and isinstance(module, LoraLayer):
            return self._walk_lora(module, name, tprefix)
        if BaseTunerLayer and isinstance(module, BaseTunerLayer):
            raise UnsupportedModuleError(
                f"module '{name}' is a PEFT {type(module).__name__}; sa2va_hooks merges LoRA layers only in this "
                "version. Refusing to export without its trained weights; merge it with PEFT offline instead.")
        self._own_tensors(module, name, tprefix)
        for cname, child in module._modules.items():
            if child is not None:
                self.walk(child, _join(name, cname), f"{tprefix}{cname}.")

    def _walk_lora(self, layer: nn.Module, name: str, tprefix: str) -> None:
        base = layer.get_base_layer()
        adapters = _lora_adapters_to_merge(layer, name)
        weight = getattr(base, "weight", None)
        bprefix = f"{tprefix}base_layer."
        if adapters and weight is not None:
            self._emit(_lora_target(name, layer, weight, bprefix + "weight", adapters), weight)
            self._own_tensors(base, name, bprefix, skip={"weight"})
        else:
            self._own_tensors(base, name, bprefix)
        for cname, child in base._modules.items():
            if child is not None:
                self.walk(child, _join(name, cname), f"{bprefix}{cname}.")

    def _walk_saved_copy(self, wrapper: nn.Module, name: str, tprefix: str) -> None:
        if getattr(wrapper, "disable_adapters", False):
            raise UnsupportedModuleError(
                f"modules_to_save wrapper '{name}' has its adapters disabled, so the model uses the original module. "
                "Re-enable the adapter before exporting.")
        active = list(wrapper.active_adapters)
        adapter = active[0] if active else None
        if adapter not in wrapper.modules_to_save:
            raise UnsupportedModuleError(
                f"modules_to_save wrapper '{name}' has no copy for active adapter '{adapter}' "
                f"(has {sorted(wrapper.modules_to_save)}).")
        trained = wrapper.modules_to_save[adapter]
        originals = dict(wrapper.original_module.named_parameters())
        for pname, p in trained.named_parameters():
            st = _saved_copy(_join(name, pname), p, originals.get(pname),
                             f"{tprefix}modules_to_save.{adapter}.{pname}")
            self._emit(st, p)
        for bname, b in trained.named_buffers():
            self._emit(_plain(_join(name, bname), b, ROLE_FROZEN, f"{tprefix}modules_to_save.{adapter}.{bname}"), b)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def plan_merged_tensors(module: nn.Module) -> WalkResult:
    """Plan every tensor of the merged, unwrapped model, without producing any data."""
    walker = _Walker()
    walker.walk(module)
    return WalkResult(walker.out, walker.tied)


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Trainable parameters under their training-time names (the checkpoint's names)."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name, p


def frozen_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in model.named_parameters():
        if not p.requires_grad:
            yield name, p
