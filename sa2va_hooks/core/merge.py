"""Out-of-place LoRA merge, one tensor at a time, for whatever model is in memory.

The walker turns a live module tree (plain, PEFT-wrapped, or a training wrapper with PEFT
models somewhere inside it) into a list of :class:`SourceTensor` plans. Each plan knows its
exported name, shape and dtype before any data is produced, so a writer can lay out shards
first and then materialise tensors one by one: peak extra memory is about one shard.

Why out of place: PEFT's ``merge()``/``unmerge()`` on a live bf16 layer does not restore the
base weight exactly (2 % of elements changed in the anchor measurement), so merging during
training would corrupt it. Here PEFT's own ``merge(safe_merge=True)`` runs on a private fp32
stand-in of each tuner layer (base weights, adapter weights, caches all private copies), so
every variant PEFT can merge (LoRA, rsLoRA, DoRA, lora_bias, AdaLoRA, LoHa, LoKr, IA3, ...) is
merged by PEFT's own math; the live module, its parameters and their version counters are
never touched.

Naming: PEFT wrappers (``PeftModel.base_model.model``, ``base_layer``, ``modules_to_save.<name>``)
are transparent, so names come out as the unwrapped HF model would have them. The training-time
parameter names that feed each tensor are kept in ``sources``.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
from torch import nn

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper

from ..compat import AuxiliaryTrainingWrapper, active_saved_copies
from .sharding import is_fsdp_module
from .sharding import logical_shape as sharded_shape
from .snapshot import live, read
from .errors import BadInputError
from .vocab import CHUNK_ELEMENTS

ROLE_FROZEN = "frozen"
ROLE_TRAINABLE = "trainable"  # a parameter trained directly (projector, head, mask decoder)
ROLE_LORA = "lora_merged"  # a base weight with one or more LoRA deltas added
ROLE_SAVED_COPY = "modules_to_save"  # PEFT's trained copy of a whole module


class UnsupportedModuleError(BadInputError, TypeError):
    """A module holds trained state that this exporter cannot merge faithfully."""


class NonFiniteError(BadInputError, FloatingPointError):
    """A tensor of the export is NaN or Inf: in memory (training diverged) or after the cast to
    the export dtype (the values do not fit it). Nothing is published."""




def _chunks(t: torch.Tensor):
    flat = t.detach().reshape(-1)
    return (flat[i:i + CHUNK_ELEMENTS] for i in range(0, flat.numel(), CHUNK_ELEMENTS))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``, checked chunk by chunk: ``isfinite`` of a whole tensor makes an
    absolute-value copy and two masks of its size, 3.5x a 1 GiB embedding on the GPU."""
    return all(bool(torch.isfinite(c).all()) for c in _chunks(t))


def non_finite_names(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    return [n for n, t in named if t is not None and t.is_floating_point() and not all_finite(t)]


@dataclasses.dataclass
class MergedTensor:
    """One exported tensor, ready to write, plus what training did to it."""

    tensor: torch.Tensor
    role: str | None = None  # set when only the merge can tell (a frozen bias that a tuner changed)
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
    # parameters that must be whole while this tensor is produced (ZeRO-3 gathers them; a no-op
    # for parameters that are not partitioned)
    gather: tuple[torch.Tensor, ...] = dataclasses.field(default=(), repr=False)
    # computed from frozen tensors only: expected byte-identical from one export to the next, so
    # it goes into a shard of frozen tensors that a later export can hard-link
    static: bool = False

    def out_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        """Floating tensors take the export dtype; integer and bool buffers keep theirs."""
        if dtype is not None and self.dtype.is_floating_point:
            return dtype
        return self.dtype

    def materialize(self, dtype: torch.dtype | None) -> MergedTensor:
        """Produce the exported tensor on its source device, contiguous, in ``out_dtype(dtype)``."""
        return self._produce(self.out_dtype(dtype))


def _cast(t: torch.Tensor, dtype: torch.dtype, private: bool = False) -> torch.Tensor:
    """A private, contiguous copy in ``dtype`` on the tensor's own device (the GPU does the
    arithmetic; the exporter moves the result to the host once). ``private``: ``t`` is already a
    copy nobody else holds, so it is not copied again (one tensor less of GPU memory)."""
    # .to() of the same dtype returns the same storage; clone so the writer never holds a view
    # of a live parameter that training may update mid-write.
    out = t.detach().to(dtype=dtype)
    if out.data_ptr() == t.data_ptr() and not private:
        out = out.clone()
    return out.contiguous()


def _same_after_cast(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    """``out`` equals ``ref`` cast to ``dtype``, compared chunk by chunk (no full-size copy or
    mask)."""
    if out.shape != ref.shape:
        return False
    return all(torch.equal(a, b.to(dtype=dtype)) for a, b in zip(_chunks(out), _chunks(ref), strict=True))


def _plain(name: str, t: torch.Tensor, role: str, source: str) -> SourceTensor:
    def produce(dtype: torch.dtype) -> MergedTensor:
        src, private = read(t)
        return MergedTensor(_cast(src, dtype, private))

    gather = (t,) if isinstance(t, nn.Parameter) else ()
    static = not getattr(t, "requires_grad", False)
    return SourceTensor(name, sharded_shape(t), t.dtype, role, (source,), produce, gather, static)


def _fp32_param(p: torch.Tensor | None, requires_grad: bool = False):
    if p is None or not p.is_floating_point():
        return p
    return nn.Parameter(live(p).detach().float().clone(), requires_grad=requires_grad)


def _private_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose own parameters and floating buffers are private fp32
    copies. Nested ``base_layer``s (a tuner layer around a tuner layer) are privatised too."""
    proxy = copy.copy(module)
    proxy._parameters = {k: _fp32_param(v) for k, v in module._parameters.items()}
    proxy._buffers = {k: None if v is None else live(v).detach().float().clone() if v.is_floating_point() else v
                      for k, v in module._buffers.items()}
    proxy._modules = dict(module._modules)
    if isinstance(proxy._modules.get("base_layer"), nn.Module):
        proxy._modules["base_layer"] = _private_copy(module._modules["base_layer"])
    return proxy


_BNB_WEIGHTS = {"Params4bit": "bitsandbytes 4-bit", "Int8Params": "bitsandbytes 8-bit"}


def quantization_of(p: torch.Tensor) -> str | None:
    """Which quantized storage a parameter is (QLoRA bases), or None for a plain tensor."""
    return _BNB_WEIGHTS.get(type(p).__name__)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 values of a bitsandbytes layer's weight, as PEFT's own helper computes them."""
    from peft.utils.integrations import dequantize_bnb_weight
    w = module.weight
    refuse_cpu_packed_4bit(module)  # packed after the plan was made (training went on meanwhile)
    if type(w).__name__ == "Params4bit":
        return dequantize_bnb_weight(w, state=w.quant_state).float()
    # PEFT's helper fills state.SCB from the weight; hand it a copy so the live layer's state object
    # is left exactly as it was
    return dequantize_bnb_weight(w, state=copy.copy(module.state)).float()


def logical_shape(module: nn.Module, pname: str, p: torch.Tensor) -> tuple[int, ...]:
    """A packed 4-bit weight is stored as [n, 1] bytes; its values are [out, in]."""
    if pname == "weight" and quantization_of(p):
        return (int(module.out_features), int(module.in_features))
    return sharded_shape(p)


def _plain_linear(module: nn.Module) -> nn.Module:
    """A private fp32 nn.Linear holding a quantized layer's dequantized values."""
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    plain.weight = nn.Parameter(dequantized_weight(module), requires_grad=False)
    if module.bias is not None:
        plain.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
    return plain


def _private_adapter_container(container: nn.Module) -> nn.Module:
    if isinstance(container, nn.ParameterDict):
        return nn.ParameterDict({k: _fp32_param(v) for k, v in container.items()})
    if isinstance(container, nn.ModuleDict):
        return nn.ModuleDict({k: _private_copy(v) for k, v in container.items()})
    return container


def _merge_proxy(layer: nn.Module) -> nn.Module:
    """A private fp32 stand-in for a PEFT tuner layer, on which PEFT's own ``merge`` can run.

    Everything ``merge`` reads or writes is private: the base layer's weights (fp32 clones), the
    adapter weights (fp32 copies), the merged-adapter list and the cache DoRA stores its weight
    norm in. PEFT's safe merge on this stand-in is, operation for operation, what
    ``merge_and_unload()`` does on an fp32 copy of the model; the live layer is never touched.
    """
    proxy = _private_copy(layer)
    base = layer._modules.get("base_layer")
    if isinstance(base, nn.Module) and quantization_of(getattr(base, "weight", torch.empty(0))):
        # QLoRA: merge into the dequantized base in fp32 instead of re-quantizing, as PEFT's
        # bnb layers would; the export is written in the export dtype.
        proxy._modules["base_layer"] = _plain_linear(base)
    for attr in getattr(layer, "adapter_layer_names", ()):
        container = layer._modules.get(attr)
        if container is not None:
            proxy._modules[attr] = _private_adapter_container(container)
    proxy.merged_adapters = list(getattr(layer, "merged_adapters", []))
    if hasattr(layer, "_caches"):
        proxy._caches = {}
    return proxy


class _MergeGroup:
    """The merged parameters of one tuner layer's base (weight and, e.g. with lora_bias or IA3,
    bias), computed once and handed out one tensor at a time."""

    def __init__(self, layer: nn.Module, name: str, adapters: list[str]) -> None:
        self.layer, self.name, self.adapters = layer, name, adapters
        self._ready: dict[str, torch.Tensor] = {}

    def _compute(self) -> dict[str, torch.Tensor]:
        proxy = _merge_proxy(self.layer)
        bad = non_finite_names(list(proxy.named_parameters()))
        if bad:  # before PEFT's safe merge, which would call it a broken adapter
            raise NonFiniteError(f"module '{self.name}' holds NaN or Inf in memory, in {bad[:5]}: training diverged "
                                 "(check the loss and the learning rate); nothing was exported from this state.")
        merge = _plain_merge_for(self.layer) or type(proxy).merge
        try:
            with torch.no_grad():
                merge(proxy, safe_merge=True, adapter_names=list(self.adapters))
        except (ValueError, RuntimeError, NotImplementedError, TypeError, AttributeError) as e:
            raise UnsupportedModuleError(
                f"PEFT could not merge {type(self.layer).__module__}.{type(self.layer).__name__} module "
                f"'{self.name}' (adapters {self.adapters}): {e}. Refusing to export without its trained weights.") \
                from e
        base = proxy.get_base_layer()
        return {k: v.detach() for k, v in base._parameters.items() if v is not None}

    def take(self, pname: str) -> torch.Tensor:
        if pname not in self._ready:
            self._ready = self._compute()
        return self._ready.pop(pname)


def _plain_merge_for(layer: nn.Module):
    """For a LoRA layer over a bitsandbytes base, the merge of PEFT's plain LoRA Linear (which
    adds in place), instead of the bnb layer's (which re-quantizes the result)."""
    base = layer._modules.get("base_layer")
    if isinstance(base, nn.Module) and quantization_of(getattr(base, "weight", torch.empty(0))):
        from peft.tuners.lora.layer import Linear as LoraLinear
        if hasattr(layer, "lora_A"):
            return LoraLinear.merge
        raise UnsupportedModuleError(f"{type(layer).__name__} over a quantized base is not supported; only LoRA "
                                     "(QLoRA) is. Refusing to export without its trained weights.")
    return None


def _tuner_adapters(layer: nn.Module) -> set[str]:
    present: set[str] = set()
    for attr in getattr(layer, "adapter_layer_names", ()):
        container = layer._modules.get(attr)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            present.update(container.keys())
    return present


def _adapters_to_merge(layer: nn.Module, name: str) -> tuple[list[str], list[str]]:
    """(adapters whose effect belongs in the export: active, present, not merged yet; inactive ones)."""
    if getattr(layer, "disable_adapters", False):
        raise UnsupportedModuleError(
            f"PEFT module '{name}' has its adapters disabled, so the model in memory computes with the base "
            "weights only. Re-enable the adapter (model.enable_adapter_layers()) or export the base on purpose.")
    present = _tuner_adapters(layer)
    active = [a for a in layer.active_adapters if a in present]
    already = set(getattr(layer, "merged_adapters", []))
    return [a for a in active if a not in already], sorted(present - set(active))


def _merged_base_tensor(name: str, pname: str, original: torch.Tensor, group: _MergeGroup, role: str,
                        sources: tuple[str, ...], base: nn.Module) -> SourceTensor:
    quantized = quantization_of(original) is not None
    shape = logical_shape(base, pname, original)
    dtype0 = torch.float32 if quantized else original.dtype

    def produce(dtype: torch.dtype) -> MergedTensor:
        merged32 = group.take(pname)
        ref = dequantized_weight(base) if quantized else live(original)
        if merged32.is_floating_point() and not all_finite(merged32):
            raise NonFiniteError(f"merged '{_join(name, pname)}' has NaN or Inf: the adapter weights are not "
                                     "finite. Check the training loss for divergence before exporting.")
        delta, base_norm = _delta_norms(merged32, ref)
        out = _cast(merged32, dtype)
        rel = delta / base_norm if base_norm else (float("inf") if delta else 0.0)
        # a frozen base parameter other than the weight (a bias) is "merged" only if the tuner
        # changed it (lora_bias, IA3); otherwise it is an ordinary frozen tensor
        final_role = ROLE_FROZEN if role == ROLE_FROZEN and delta == 0.0 else \
            ROLE_LORA if role == ROLE_FROZEN else role
        # a directly trained parameter's base is its value before training, which only a
        # baseline (recorded by the hooks) knows; the live value is not it
        differs = None if final_role == ROLE_TRAINABLE else not _same_after_cast(out, ref, dtype)
        return MergedTensor(out, final_role, rel if final_role == ROLE_LORA else None, differs)

    return SourceTensor(_join(name, pname), shape, dtype0, role, sources, produce, tuple(group.layer.parameters()))




def _delta_norms(merged: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """||merged - base|| and ||base|| in fp64, chunk by chunk (no full-size fp64 copies)."""
    m, b = merged.detach().reshape(-1), base.detach().reshape(-1)
    delta = torch.zeros((), dtype=torch.float64, device=m.device)
    norm = torch.zeros((), dtype=torch.float64, device=m.device)
    for start in range(0, m.numel(), CHUNK_ELEMENTS):
        bc = b[start:start + CHUNK_ELEMENTS].to(torch.float64)
        dc = m[start:start + CHUNK_ELEMENTS].to(torch.float64) - bc
        delta += torch.dot(dc, dc)
        norm += torch.dot(bc, bc)
    return float(delta.sqrt()), float(norm.sqrt())


def _dequantized(name: str, module: nn.Module, source: str) -> SourceTensor:
    def produce(dtype: torch.dtype) -> MergedTensor:
        return MergedTensor(_cast(dequantized_weight(module), dtype))

    shape = (int(module.out_features), int(module.in_features))
    return SourceTensor(name, shape, torch.float32, ROLE_FROZEN, (source,), produce, tuple(module.parameters()),
                        static=True)


def _saved_copy(name: str, t: torch.Tensor, original: torch.Tensor | None, source: str) -> SourceTensor:
    def produce(dtype: torch.dtype) -> MergedTensor:
        src, private = read(t)
        out = _cast(src, dtype, private)
        differs = None if original is None else not _same_after_cast(out, live(original), dtype)
        return MergedTensor(out, None, None, differs)

    gather = (t,) if original is None else (t, original)
    return SourceTensor(name, sharded_shape(t), t.dtype, ROLE_SAVED_COPY, (source,), produce, gather)


@dataclasses.dataclass
class WalkResult:
    tensors: list[SourceTensor]
    tied: dict[str, str]  # name skipped because it shares storage with -> name exported
    inactive: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # adapter -> modules, not merged
    dequantized: list[str] = dataclasses.field(default_factory=list)  # quantized bases written dequantized


class _Walker:
    """Depth-first walk that strips PEFT wrappers and plans every exported tensor."""

    def __init__(self) -> None:
        self.out: list[SourceTensor] = []
        self.tied: dict[str, str] = {}
        self._seen: dict[int, str] = {}
        self.inactive: dict[str, list[str]] = {}  # adapter -> modules where it exists but is not active
        self.dequantized: list[str] = []  # modules whose quantized base was dequantized for the export

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
            if pname == "weight" and quantization_of(p):
                self.dequantized.append(name)
                self._emit(_dequantized(_join(name, pname), module, tprefix + pname), p)
                continue
            role = ROLE_TRAINABLE if p.requires_grad else ROLE_FROZEN
            self._emit(_plain(_join(name, pname), p, role, tprefix + pname), p)
        for bname, b in module._buffers.items():
            if b is None or bname in module._non_persistent_buffers_set or bname in skip:
                continue
            self._emit(_plain(_join(name, bname), b, ROLE_FROZEN, tprefix + bname), b)

    def walk(self, module: nn.Module, name: str = "", tprefix: str = "") -> None:
        if is_fsdp_module(module):  # transparent, as in FSDP's own state dicts
            return self.walk(module._fsdp_wrapped_module, name, tprefix)
        if isinstance(module, PeftModel):
            cfg = module.peft_config.get(module.active_adapter)
            if cfg is not None and getattr(cfg, "is_prompt_learning", False):
                raise UnsupportedModuleError(
                    f"PeftModel '{name or 'model'}' uses {cfg.peft_type} (prompt learning): its trained virtual tokens "
                    "live outside the weights and cannot be merged into an HF snapshot. Refusing to export the "
                    "untrained base; save the adapter with save_pretrained() instead.")
            return self.walk(module.base_model, name, tprefix + "base_model.")
        if isinstance(module, BaseTuner):
            return self.walk(module.model, name, tprefix + "model.")
        if isinstance(module, ModulesToSaveWrapper):
            return self._walk_saved_copy(module, name, tprefix)
        if isinstance(module, AuxiliaryTrainingWrapper):
            raise UnsupportedModuleError(
                f"module '{name}' is a PEFT {type(module).__name__}, which sa2va_hooks does not export yet. Refusing "
                "to export without its trained weights; merge it with PEFT offline instead.")
        if isinstance(module, BaseTunerLayer):
            return self._walk_tuner_layer(module, name, tprefix)
        self._own_tensors(module, name, tprefix)
        for cname, child in module._modules.items():
            if child is not None:
                self.walk(child, _join(name, cname), f"{tprefix}{cname}.")

    def _walk_tuner_layer(self, layer: nn.Module, name: str, tprefix: str) -> None:
        adapters, inactive = _adapters_to_merge(layer, name)
        for a in inactive:
            self.inactive.setdefault(a, []).append(name)
        base = layer.get_base_layer()
        depth = 0
        inner = layer
        while inner is not base:
            inner, depth = inner.base_layer, depth + 1
        bprefix = tprefix + "base_layer." * depth
        if not adapters:
            self._own_tensors(base, name, bprefix)
        else:
            group = _MergeGroup(layer, name, adapters)
            adapter_sources = tuple(f"{tprefix}{n}" for n, _ in layer.named_parameters()
                                    if not n.startswith("base_layer.") and any(f".{a}." in f".{n}." for a in adapters))
            for pname, p in base._parameters.items():
                if p is None:
                    continue
                role = ROLE_LORA if pname == "weight" else ROLE_TRAINABLE if p.requires_grad else ROLE_FROZEN
                self._emit(_merged_base_tensor(name, pname, p, group, role, (bprefix + pname,) + adapter_sources,
                                               base), p)
            if quantization_of(getattr(base, "weight", torch.empty(0))):
                self.dequantized.append(name)
            for bname, b in base._buffers.items():
                if b is not None and bname not in base._non_persistent_buffers_set:
                    self._emit(_plain(_join(name, bname), b, ROLE_FROZEN, bprefix + bname), b)
        for cname, child in base._modules.items():
            if child is not None:
                self.walk(child, _join(name, cname), f"{bprefix}{cname}.")

    def _walk_saved_copy(self, wrapper: nn.Module, name: str, tprefix: str) -> None:
        if getattr(wrapper, "disable_adapters", False):
            raise UnsupportedModuleError(
                f"modules_to_save wrapper '{name}' has its adapters disabled, so the model uses the original module. "
                "Re-enable the adapter before exporting.")
        active = active_saved_copies(wrapper)
        adapter = active[0] if active else None
        if adapter not in wrapper.modules_to_save:
            raise UnsupportedModuleError(
                f"modules_to_save wrapper '{name}' has no copy for active adapter '{adapter}' "
                f"(has {sorted(wrapper.modules_to_save)}).")
        for other in sorted(set(wrapper.modules_to_save) - {adapter}):
            self.inactive.setdefault(other, []).append(name)
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


def refuse_cpu_packed_4bit(module: nn.Module) -> None:
    """bitsandbytes >= 0.48, on a CPU with AVX512-BF16, repacks a 4-bit layer for its CPU kernel at the
    first eval-mode forward, in place: the bytes are reordered and the block scales (absmax) rounded to
    bf16 (``quant_state.packing_format_for_cpu``). Dequantized as a plain 4-bit weight those bytes give
    values uncorrelated with the base, with no error; and the exact base values can no longer be
    recovered from the layer. So such a layer is refused, before anything is written."""
    packed = [name for name, m in module.named_modules()
              if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    if packed:
        shown = ", ".join(packed[:10]) + (f" ... and {len(packed) - 10} more" if len(packed) > 10 else "")
        raise UnsupportedModuleError(
            f"{len(packed)} 4-bit layer(s) were repacked in place by bitsandbytes for its CPU kernel "
            f"(quant_state.packing_format_for_cpu, after an eval-mode forward on a CPU with AVX512-BF16): {shown}. "
            "Their bytes no longer decode as the quantized base and their scales were rounded to bf16, so "
            "nothing is exported. Export before running the model in eval mode on this CPU, or on a GPU "
            "(moving the layer with .cuda() unpacks it).")


def plan_merged_tensors(module: nn.Module) -> WalkResult:
    """Plan every tensor of the merged, unwrapped model, without producing any data."""
    refuse_cpu_packed_4bit(module)
    walker = _Walker()
    walker.walk(module)
    return WalkResult(walker.out, walker.tied, walker.inactive, walker.dequantized)
