"""Plain HF causal LMs: a PreTrainedModel, a PeftModel around one, or xtuner's
SupervisedFinetune (which keeps the LM in ``.llm``)."""
from __future__ import annotations

import copy

from torch import nn

from .base import CONVERTERS, Converter, SnapshotContext
from ..core.sharding import logical_shape


def _peft_model_class() -> type | tuple:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return ()
    return PeftModel


def _is_hf_model(m: object) -> bool:
    from transformers import PreTrainedModel
    return isinstance(m, (PreTrainedModel, _peft_model_class()))


def unwrap_hf(model: nn.Module) -> nn.Module:
    """The PreTrainedModel inside a PeftModel (for its config and class), or the model itself."""
    peft_cls = _peft_model_class()
    return model.get_base_model() if peft_cls and isinstance(model, peft_cls) else model


def embedding_rows(model: nn.Module) -> int | None:
    """Rows of the input embedding, or None for models without one (vision, audio encoders)."""
    try:
        emb = unwrap_hf(model).get_input_embeddings()
    except NotImplementedError:
        return None
    if emb is None:
        return None
    # the logical shape: under ZeRO-3 the live weight is an empty placeholder, and reading it as
    # an attribute would gather it (a collective) on this rank alone; named_parameters does not.
    # A PEFT modules_to_save wrapper holds the weight in its copies, all of one shape.
    weight = next((p for n, p in emb.named_parameters() if n.rsplit(".", 1)[-1] == "weight"), None)
    return None if weight is None else int(logical_shape(weight)[0])


def causal_lm_config(hf_model: nn.Module, ctx: SnapshotContext, prefix: str = ""):
    """The live config with dtype, vocab size and tie flag made true to the exported tensors."""
    inner = unwrap_hf(hf_model)
    cfg = copy.deepcopy(inner.config)
    if ctx.dtype is not None:
        cfg.torch_dtype = ctx.dtype
    rows = embedding_rows(hf_model)
    if rows is not None:
        if getattr(cfg, "vocab_size", rows) != rows:
            ctx.notes.append(f"{prefix}vocab_size set from {cfg.vocab_size} to {rows}, the embedding rows")
        cfg.vocab_size = rows
    cfg.architectures = [type(inner).__name__]
    if getattr(cfg, "quantization_config", None) is not None:
        # the weights are written dequantized; a leftover quantization_config would make
        # from_pretrained treat them as pre-quantized
        del cfg.quantization_config
        ctx.notes.append(f"{prefix}quantization_config removed: the base was dequantized for the export")
    if hasattr(cfg, "_pre_quantization_dtype"):
        del cfg._pre_quantization_dtype
    tied_keys = getattr(inner, "_tied_weights_keys", None) or []
    exported_tied = [k for k in tied_keys if f"{prefix}{k}" in ctx.names]
    if getattr(cfg, "tie_word_embeddings", False) and exported_tied:
        cfg.tie_word_embeddings = False
        ctx.notes.append(f"{prefix}tie_word_embeddings set to False: training made {exported_tied} differ from "
                         "the input embeddings, so both are exported")
    return cfg


@CONVERTERS.register_module(name="causal_lm")
class CausalLMConverter(Converter):
    name = "causal_lm"
    priority = 0

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_hf_model(model) or _is_hf_model(getattr(model, "llm", None))

    def hf_root(self, model: nn.Module) -> nn.Module:
        return model if _is_hf_model(model) else model.llm

    def hf_config(self, model: nn.Module, ctx: SnapshotContext):
        return causal_lm_config(self.hf_root(model), ctx)

    def save_extras(self, model, out_dir, ctx) -> None:
        inner = unwrap_hf(self.hf_root(model))
        gen = getattr(inner, "generation_config", None)
        if gen is not None and inner.can_generate():
            gen.save_pretrained(str(out_dir))
        super().save_extras(model, out_dir, ctx)
