"""xtuner ``LLaVAModel`` -> transformers' LLaVA format (``LlavaForConditionalGeneration``).

Recognised by structure: ``llm`` (an HF causal LM, maybe PEFT-wrapped), ``visual_encoder`` (an
HF CLIP-style vision model, maybe PEFT-wrapped) and a two-layer ``projector.model``.

Unlike xtuner's own ``to_huggingface_llava``, this converter never adds tokens: that path
appends ``<image>`` and ``<pad>`` with randomly sampled embedding rows, i.e. weights nobody
trained. The image token must already be in the tokenizer (and so have a trained or base row),
or be given as ``image_token_index``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .base import CONVERTERS, ConversionError, Converter, SnapshotContext
from .helpers import causal_lm_config, is_hf_model, unwrap_hf

IMAGE_TOKEN = "<image>"


@CONVERTERS.register_module(name="llava")
class LlavaConverter(Converter):
    name = "llava"
    priority = 50  # before causal_lm, which would also match the .llm inside
    key_rules = (
        (r"^llm\.model\.", "language_model.model."),
        (r"^llm\.lm_head\.", "language_model.lm_head."),
        (r"^visual_encoder\.vision_model\.", "vision_tower.vision_model."),
        (r"^projector\.model\.0\.", "multi_modal_projector.linear_1."),
        (r"^projector\.model\.2\.", "multi_modal_projector.linear_2."),
    )

    def __init__(self, *, tokenizer: Any = None, image_processor: Any = None, image_token_index: int | None = None,
                 vision_feature_select_strategy: str = "default") -> None:
        super().__init__(tokenizer=tokenizer)
        self.image_processor = image_processor
        self.image_token_index = image_token_index
        self.select_strategy = vision_feature_select_strategy

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (is_hf_model(getattr(model, "llm", None)) and is_hf_model(getattr(model, "visual_encoder", None))
                and isinstance(getattr(getattr(model, "projector", None), "model", None), nn.Sequential))

    def _image_token_index(self, model: nn.Module, rows: int) -> int:
        index = self.image_token_index
        if index is None:
            tok = self.resolve_tokenizer(model)
            vocab = tok.get_vocab() if tok is not None else {}
            if IMAGE_TOKEN not in vocab:
                raise ConversionError(
                    f"the LLaVA format needs an image token, and the tokenizer has no '{IMAGE_TOKEN}'. "
                    "sa2va_hooks does not add it with an invented embedding row (as xtuner's to_huggingface_llava "
                    "does); add the token before training, or pass converter=dict(type='llava', "
                    "image_token_index=ID) with an existing id.")
            index = vocab[IMAGE_TOKEN]
        if not 0 <= index < rows:
            raise ConversionError(f"image_token_index {index} is outside the {rows} embedding rows of the LLM; pass "
                                  f"converter=dict(type='llava', image_token_index=ID) with 0 <= ID < {rows}.")
        return index

    def hf_config(self, model: nn.Module, ctx: SnapshotContext):
        from transformers import LlavaConfig
        text = causal_lm_config(model.llm, ctx, prefix="language_model.")
        vision = unwrap_hf(model.visual_encoder).config
        cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          image_token_index=self._image_token_index(model, text.vocab_size),
                          projector_hidden_act="gelu",
                          vision_feature_layer=int(getattr(model, "visual_select_layer", -2)),
                          vision_feature_select_strategy=self.select_strategy,
                          tie_word_embeddings=text.tie_word_embeddings)
        if ctx.dtype is not None:
            cfg.torch_dtype = ctx.dtype
        cfg.architectures = ["LlavaForConditionalGeneration"]
        return cfg

    def save_extras(self, model: nn.Module, out_dir: Path, ctx: SnapshotContext) -> None:
        proc = self.image_processor
        if isinstance(proc, (str, Path)):
            from transformers import AutoImageProcessor
            proc = AutoImageProcessor.from_pretrained(str(proc))
        if proc is not None:
            proc.save_pretrained(str(out_dir))
        super().save_extras(model, out_dir, ctx)
