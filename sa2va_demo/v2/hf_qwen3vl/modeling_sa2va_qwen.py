"""Sa2VA v2's Qwen3-VL model, tiny (remote code): as the official ``Sa2VAChatModelQwen``, ``model`` is a
``Qwen3VLForConditionalGeneration`` built from the same config, beside ``grounding_encoder`` and
``text_hidden_fcs``; ``lm_head`` is a property; no template lookup (the processor's chat template is used)."""
from torch import nn
from transformers import PreTrainedModel, Qwen3VLForConditionalGeneration

from .configuration_sa2va_chat import Sa2VAChatConfigQwen
from .sam2 import SAM2, text_hidden_fcs


class Sa2VAChatModelQwen(PreTrainedModel):
    config_class = Sa2VAChatConfigQwen
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _no_split_modules = ["SAM2"]

    def __init__(self, config, model=None):
        super().__init__(config)
        self.model = model if model is not None else Qwen3VLForConditionalGeneration(config)
        self.grounding_encoder = SAM2()
        # transformers < 4.51 keeps the LLM's sizes at the top level of a Qwen2.5-VL config
        self.text_hidden_fcs = text_hidden_fcs(getattr(config, "text_config", config).hidden_size)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)

    @property
    def lm_head(self):
        return self.model.lm_head

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids):
        return self.model(input_ids=input_ids)
