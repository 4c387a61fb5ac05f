"""Plain HF causal LMs: a PreTrainedModel, a PeftModel around one, or xtuner's
SupervisedFinetune (which keeps the LM in ``.llm``)."""
from __future__ import annotations

from torch import nn

from .base import CONVERTERS, Converter, SnapshotContext
from .helpers import causal_lm_config, is_hf_model, unwrap_hf


@CONVERTERS.register_module(name="causal_lm")
class CausalLMConverter(Converter):
    name = "causal_lm"
    priority = 0

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_hf_model(model) or is_hf_model(getattr(model, "llm", None))

    def hf_root(self, model: nn.Module) -> nn.Module:
        return model if is_hf_model(model) else model.llm

    def hf_config(self, model: nn.Module, ctx: SnapshotContext):
        return causal_lm_config(self.hf_root(model), ctx)

    def save_extras(self, model, out_dir, ctx) -> None:
        inner = unwrap_hf(self.hf_root(model))
        gen = getattr(inner, "generation_config", None)
        if gen is not None and inner.can_generate():
            gen.save_pretrained(str(out_dir))
        super().save_extras(model, out_dir, ctx)
