"""The materializing half of the merge: what runs when a planned tensor is produced.

:mod:`.merge` plans (which tensors, under which names, from which sources); the functions here make
the data: a private fp32 stand-in of a PEFT tuner layer on which PEFT's own ``merge(safe_merge=True)``
runs (:class:`MergeGroup`), the dequantized values of a QLoRA base, the cast to the export dtype, the
finite checks and the delta norms. Nothing here touches the live module, its parameters or their
version counters (see :mod:`.merge` for why the merge is out of place).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .errors import BadInputError
from .snapshot import live, own_parameters
from .sharding import logical_shape as sharded_shape
from .vocab import CHUNK_ELEMENTS


class UnsupportedModuleError(BadInputError, TypeError):
    """A module holds trained state that this exporter cannot merge faithfully."""


class NonFiniteError(BadInputError, FloatingPointError):
    """A tensor of the export is NaN or Inf: in memory (training diverged) or after the cast to
    the export dtype (the values do not fit it). Nothing is published."""


def _chunks(t: torch.Tensor):
    """``t`` flat, in chunks; one chunk (nearly every tensor) is not sliced: every torch call of the
    export's thread is a GIL hand-over the training thread waits for (issue 18)."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n <= CHUNK_ELEMENTS:
        return (flat,) if n else ()
    return (flat[i:i + CHUNK_ELEMENTS] for i in range(0, n, CHUNK_ELEMENTS))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``, checked chunk by chunk: ``isfinite`` of a whole tensor makes an
    absolute-value copy and two masks of its size, 3.5x a 1 GiB embedding on the GPU."""
    return all(bool(torch.isfinite(c).all()) for c in _chunks(t))


def non_finite_names(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating tensors that hold a NaN or Inf. Tensors of one chunk on one device
    (a tuner layer's parameters) are checked together: one wait, not one per tensor (issue 18)."""
    floats = [(n, t) for n, t in named if t is not None and t.is_floating_point()]
    if floats and len({t.device for _, t in floats}) == 1 and all(t.numel() <= CHUNK_ELEMENTS for _, t in floats):
        finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).tolist()
        return [n for (n, _), ok in zip(floats, finite, strict=True) if not ok]
    return [n for n, t in floats if not all_finite(t)]


@dataclasses.dataclass
class MergedTensor:
    """One exported tensor, ready to write, plus what training did to it."""

    tensor: torch.Tensor
    role: str | None = None  # set when only the merge can tell (a frozen bias that a tuner changed)
    delta_rel_norm: float | None = None  # ||W_merged - W_base|| / ||W_base|| in fp32, LoRA only
    differs_from_base: bool | None = None  # after the cast to the export dtype; None = unknown


def cast_copy(t: torch.Tensor, dtype: torch.dtype, private: bool = False) -> torch.Tensor:
    """A private, contiguous copy in ``dtype`` on the tensor's own device (the GPU does the
    arithmetic; the exporter moves the result to the host once). ``private``: ``t`` is already a
    copy nobody else holds, so it is not copied again (one tensor less of GPU memory)."""
    # .to() of the same dtype returns the same storage: copy=True, so the writer never holds a view
    # of a live parameter that training may update mid-write. The copy is made contiguous in the same
    # pass: each torch call of the export's thread is a GIL hand-over the training thread waits for
    # (issue 18). .contiguous() returns at once, holding the GIL, unless .to() made no copy (private).
    return t.detach().to(dtype=dtype, copy=not private, memory_format=torch.contiguous_format).contiguous()


def same_after_cast(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    """``out`` equals ``ref`` cast to ``dtype``, compared chunk by chunk (no full-size copy or
    mask)."""
    if out.shape != ref.shape:
        return False
    if out.numel() <= CHUNK_ELEMENTS:  # one chunk: 2 calls, not 8 (GIL hand-overs, issue 18)
        return torch.equal(out.detach(), ref.detach().to(dtype=dtype))
    return all(torch.equal(a, b.to(dtype=dtype)) for a, b in zip(_chunks(out), _chunks(ref), strict=True))


def delta_norms(merged: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """||merged - base|| and ||base|| in fp64, chunk by chunk (no full-size fp64 copies)."""
    m, b = merged.detach().reshape(-1), base.detach().reshape(-1)
    if m.numel() <= CHUNK_ELEMENTS:  # the loop below for one chunk, value for value (0 + x is x), one sync
        bc = b.to(torch.float64)
        dc = m.to(torch.float64) - bc
        delta, norm = torch.stack((torch.dot(dc, dc), torch.dot(bc, bc))).sqrt().tolist()
        return delta, norm
    delta = torch.zeros((), dtype=torch.float64, device=m.device)
    norm = torch.zeros((), dtype=torch.float64, device=m.device)
    for start in range(0, m.numel(), CHUNK_ELEMENTS):
        bc = b[start:start + CHUNK_ELEMENTS].to(torch.float64)
        dc = m[start:start + CHUNK_ELEMENTS].to(torch.float64) - bc
        delta += torch.dot(dc, dc)
        norm += torch.dot(bc, bc)
    return float(delta.sqrt()), float(norm.sqrt())


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


def unpacked_weight_shape(module: nn.Module, pname: str, p: torch.Tensor) -> tuple[int, ...]:
    """The shape of the weight's values: a packed 4-bit weight is stored as [n, 1] bytes, its values are
    [out, in]; anything else as :func:`.sharding.logical_shape` (whole, even when ZeRO-3/FSDP holds a part)."""
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


def _fp32_param(p: torch.Tensor | None, requires_grad: bool = False):
    if p is None or not p.is_floating_point():
        return p
    # one copy, not two (.float() of a bf16 tensor already copies; .clone() copied again)
    return nn.Parameter(live(p).detach().to(torch.float32, copy=True), requires_grad=requires_grad)


def _private_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose own parameters and floating buffers are private fp32
    copies. Nested ``base_layer``s (a tuner layer around a tuner layer) are privatised too."""
    proxy = copy.copy(module)
    proxy._parameters = {k: _fp32_param(v) for k, v in own_parameters(module).items()}
    for k in proxy._parameters:  # a plain tensor FSDP set in the parameter's place mid-forward
        proxy.__dict__.pop(k, None)
    proxy._buffers = {k: None if v is None else live(v).detach().float().clone() if v.is_floating_point() else v
                      for k, v in module._buffers.items()}
    proxy._modules = dict(module._modules)
    if isinstance(proxy._modules.get("base_layer"), nn.Module):
        proxy._modules["base_layer"] = _private_copy(module._modules["base_layer"])
    return proxy


def _private_adapter_container(container: nn.Module) -> nn.Module:
    if isinstance(container, nn.ParameterDict):
        return nn.ParameterDict({k: _fp32_param(v) for k, v in own_parameters(container).items()})
    if isinstance(container, nn.ModuleDict):
        return nn.ModuleDict({k: _private_copy(v) for k, v in container.items()})
    return container


def _weight(module: nn.Module) -> torch.Tensor:
    """The module's ``weight`` parameter, read from its own parameters (as held at the capture, see
    :func:`.snapshot.own_parameters`), never through ``getattr``: DeepSpeed ZeRO-3 gathers a parameter
    that is read through the module while a forward runs (collective: from an export's thread that
    deadlocks with the training thread; seen on 2 H200s)."""
    w = own_parameters(module).get("weight")
    return torch.empty(0) if w is None else w


def _merge_proxy(layer: nn.Module) -> nn.Module:
    """A private fp32 stand-in for a PEFT tuner layer, on which PEFT's own ``merge`` can run.

    Everything ``merge`` reads or writes is private: the base layer's weights (fp32 clones), the
    adapter weights (fp32 copies), the merged-adapter list and the cache DoRA stores its weight
    norm in. PEFT's safe merge on this stand-in is, operation for operation, what
    ``merge_and_unload()`` does on an fp32 copy of the model; the live layer is never touched.
    """
    proxy = _private_copy(layer)
    base = layer._modules.get("base_layer")
    if isinstance(base, nn.Module) and quantization_of(_weight(base)):
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


class MergeGroup:
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
    if isinstance(base, nn.Module) and quantization_of(_weight(base)):
        from peft.tuners.lora.layer import Linear as LoraLinear
        if hasattr(layer, "lora_A"):
            return LoraLinear.merge
        raise UnsupportedModuleError(f"{type(layer).__name__} over a quantized base is not supported; only LoRA "
                                     "(QLoRA) is. Refusing to export without its trained weights.")
    return None
