"""xtuner ``InternVL_V1_5`` -> an InternVL chat snapshot, recognised by structure.

Training tree: ``model.{vision_model,language_model,mlp1}`` (the InternVL chat model loaded
with remote code, LoRA inside). HF tree: the same without ``model.``. config.json is the base
model directory's own config.json (not the in-memory config, which xtuner edits, e.g. to ask for
flash attention) with ``llm_config.vocab_size`` set to the embedding rows; the base directory's
remote code and tokenizer are carried over.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .base import CONVERTERS, Converter, SnapshotContext, set_dtype
from .helpers import base_config_dict, copy_remote_code, embedding_rows, set_llm_vocab

PARTS = ("vision_model", "language_model", "mlp1")


@CONVERTERS.register_module(name="internvl")
class InternVLConverter(Converter):
    name = "internvl"
    priority = 60
    key_rules = ((r"^model\.(vision_model|language_model|mlp1)\.", r"\1."),)

    def __init__(self, *, tokenizer: Any = None, hf_code_dir: str | None = None, base_config: str | None = None,
                 template: str | None = None) -> None:
        super().__init__(tokenizer=tokenizer)
        self.hf_code_dir, self.base_config, self.template = hf_code_dir, base_config, template

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        return (inner is not None and all(hasattr(inner, p) for p in PARTS)
                and not hasattr(model, "grounding_encoder"))

    def _base_dir(self, model: nn.Module) -> Path | None:
        name = str(getattr(model.model.config, "_name_or_path", "") or "")
        return Path(name) if name and Path(name).is_dir() else None

    def hf_config(self, model: nn.Module, ctx: SnapshotContext) -> dict:
        cfg = base_config_dict(model.model.config, self.base_config)
        set_llm_vocab(cfg, embedding_rows(model.model.language_model), ctx)
        set_dtype(cfg, ctx, "llm_config", "vision_config")
        if self.template:
            cfg["template"] = self.template
        return cfg

    def save_extras(self, model: nn.Module, out_dir: Path, ctx: SnapshotContext) -> None:
        copy_remote_code(self.hf_code_dir or self._base_dir(model), out_dir, ctx, required=bool(self.hf_code_dir))
        if self.tokenizer is None and getattr(model, "tokenizer", None) is None and self._base_dir(model):
            self.tokenizer = str(self._base_dir(model))
        super().save_extras(model, out_dir, ctx)
