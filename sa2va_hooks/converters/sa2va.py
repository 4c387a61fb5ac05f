"""Sa2VA with an InternVL-style mllm, recognised by structure (Sa2VA is not a pip package).

Training tree -> HF tree:
- ``mllm.model.{vision_model,language_model,mlp1}.*`` -> ``{vision_model,language_model,mlp1}.*``
- ``grounding_encoder.*`` and ``text_hidden_fcs.*`` are kept;
- ``.gamma`` -> ``.g_weight``: SAM2's memory encoder has ``gamma`` layer scales, which
  transformers would silently rename to ``weight`` on load; Sa2VA's HF code names them
  ``g_weight``.
config.json is the base InternVL config (the live ``mllm.model.config``, which came from the
base model directory) with ``llm_config.vocab_size`` set to the embedding rows (Sa2VA adds
``[SEG]`` and friends), plus ``template``, ``auto_map`` and ``architectures``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .base import CONVERTERS, ConversionError, Converter, SnapshotContext, set_dtype
from .helpers import base_config_dict, copy_remote_code, embedding_rows, set_llm_vocab

OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
    "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
    "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
}


@CONVERTERS.register_module(name="sa2va")
class Sa2VAConverter(Converter):
    name = "sa2va"
    priority = 100
    key_rules = (
        (r"^mllm\.model\.(vision_model|language_model|mlp1)\.", r"\1."),
        (r"^(grounding_encoder|text_hidden_fcs)\.", r"\1."),
    )
    post_rules = ((r"\.gamma$", ".g_weight"),)
    # Sa2VA's config forces tie_word_embeddings=False and never ties the inner LLM again, so a tied
    # LLM's lm_head must be in the files, or it loads as uninitialised memory
    write_tied = (r"^language_model\.lm_head\.weight$",)
    template_table = "templates.PROMPT_TEMPLATE"  # Sa2VAChatModel.__init__ looks config.template up there
    required_tokens = ("[SEG]",)

    def __init__(self, *, hf_code_dir: str | None = None, template: str | None = None,
                 auto_map: dict | None = None, architectures: list[str] | None = None,
                 base_config: str | None = None, tokenizer: Any = None, model_type: str | None = "sa2va_chat") -> None:
        super().__init__(tokenizer=tokenizer)
        self.hf_code_dir = hf_code_dir
        self.template = template
        self.model_type = model_type
        self.auto_map = auto_map or OFFICIAL_AUTO_MAP
        self.architectures = architectures or [self.auto_map["AutoModel"].rsplit(".", 1)[-1]]
        self.base_config = base_config

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        inner = getattr(getattr(model, "mllm", None), "model", None)
        return (inner is not None and all(hasattr(inner, a) for a in ("vision_model", "language_model", "mlp1"))
                and hasattr(model, "grounding_encoder") and hasattr(model, "text_hidden_fcs"))

    def _base_config_dict(self, model: nn.Module) -> dict:
        cfg = getattr(model.mllm.model, "config", None)
        if cfg is None and not self.base_config:
            raise ConversionError("the Sa2VA mllm has no .config to build config.json from; pass "
                                  "converter=dict(type='sa2va', base_config='BASE_DIR/config.json').")
        return base_config_dict(cfg, self.base_config)

    def hf_config(self, model: nn.Module, ctx: SnapshotContext) -> dict:
        cfg = self._base_config_dict(model)
        if "llm_config" not in cfg:
            raise ConversionError("the base config has no 'llm_config'; an InternVL-style Sa2VA config is expected. "
                                  "Use converter 'sa2va_qwen' for Qwen-VL-style mllms.")
        set_llm_vocab(cfg, embedding_rows(model.mllm.model.language_model), ctx)
        self._set_identity(cfg, model)
        set_dtype(cfg, ctx, "llm_config")
        if cfg["llm_config"].get("tie_word_embeddings", True) and "language_model.lm_head.weight" in ctx.names:
            cfg["llm_config"]["tie_word_embeddings"] = False
            ctx.notes.append("llm_config.tie_word_embeddings set to False: Sa2VA's model does not tie the LLM "
                             "on load, so lm_head is written (as a copy of embed_tokens where they were tied)")
        return cfg

    def _set_identity(self, cfg: dict, model: nn.Module) -> None:
        """template (the run's; the base config's only as a last resort: load checks it against the
        remote code's table), auto_map, architectures, and the family's model_type."""
        template = self.template or getattr(model, "template", None) or cfg.get("template")
        cfg["template"] = template.get("name", template) if isinstance(template, dict) else template
        cfg["auto_map"] = dict(self.auto_map)
        cfg["architectures"] = list(self.architectures)
        if self.model_type:
            cfg["model_type"] = self.model_type

    def save_extras(self, model: nn.Module, out_dir: Path, ctx: SnapshotContext) -> None:
        if self.hf_code_dir:
            copy_remote_code(self.hf_code_dir, out_dir, ctx, required=True)
        missing = [v.split(".")[0] + ".py" for v in self.auto_map.values()
                   if not (out_dir / (v.split(".")[0] + ".py")).exists()]
        if missing:
            ctx.notes.append(f"remote code {sorted(set(missing))} named in auto_map is not in the snapshot; "
                             "pass hf_code_dir so that from_pretrained(trust_remote_code=True) can load it")
        super().save_extras(model, out_dir, ctx)


@CONVERTERS.register_module(name="sa2va_qwen")
class Sa2VAQwenConverter(Sa2VAConverter):
    """Sa2VA whose mllm is Qwen-VL-style (``mllm.model`` is a ``Qwen*VLForConditionalGeneration``,
    with ``visual``): keys drop ``mllm.``; the vocabulary size is set in ``text_config`` (and at
    the top level, where older Qwen-VL configs keep it); the processor is saved."""

    name = "sa2va_qwen"
    priority = 100
    write_tied = ()  # a Qwen-VL model ties (or not) from its own config
    template_table = None  # no official Qwen-VL Sa2VA remote code to follow; its template is not looked up
    key_rules = (
        (r"^mllm\.model\.", "model."),
        (r"^(grounding_encoder|text_hidden_fcs)\.", r"\1."),
    )

    def __init__(self, *, processor: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("model_type", None)  # the base Qwen-VL config's
        super().__init__(**kwargs)
        self.processor = processor

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        inner = getattr(getattr(model, "mllm", None), "model", None)
        return (inner is not None and hasattr(inner, "visual") and hasattr(model, "grounding_encoder")
                and hasattr(model, "text_hidden_fcs"))

    def hf_config(self, model: nn.Module, ctx: SnapshotContext) -> dict:
        cfg = self._base_config_dict(model)
        rows = embedding_rows(model.mllm.model)
        for where in ("text_config", None):
            sub = cfg.get(where) if where else cfg
            if isinstance(sub, dict) and ("vocab_size" in sub or where == "text_config"):
                if sub.get("vocab_size") != rows:
                    ctx.notes.append(f"{where + '.' if where else ''}vocab_size set from {sub.get('vocab_size')} "
                                     f"to {rows}, the embedding rows")
                sub["vocab_size"] = rows
        self._set_identity(cfg, model)
        set_dtype(cfg, ctx, "text_config")
        return cfg

    def save_extras(self, model: nn.Module, out_dir: Path, ctx: SnapshotContext) -> None:
        proc = self.processor if self.processor is not None else getattr(model, "processor", None)
        if isinstance(proc, (str, Path)):
            from transformers import AutoProcessor
            proc = AutoProcessor.from_pretrained(str(proc), trust_remote_code=True)
        if proc is not None:
            proc.save_pretrained(str(out_dir))
        elif self.resolve_tokenizer(model) is None:
            ctx.notes.append("no processor or tokenizer was given; the snapshot cannot tokenize or read images")
        super().save_extras(model, out_dir, ctx)
