"""Sa2VA v2's InternVL model, tiny (remote code): ``vision_model``, ``mlp1``, ``language_model``,
``grounding_encoder``, ``text_hidden_fcs``; as the official one, it looks ``config.template`` up in
``PROMPT_TEMPLATE`` when it is built (an unknown template is a KeyError in from_pretrained) and never
ties the LLM (its config forces the flag off)."""
import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2ForCausalLM

from .configuration_sa2va_chat import Sa2VAChatConfig
from .sam2 import SAM2, text_hidden_fcs
from .templates import PROMPT_TEMPLATE


class TinyVision(nn.Module):
    def __init__(self, hidden_size, patch_size, image_size):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, hidden_size, patch_size, patch_size)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, pixel_values):
        return self.norm(self.patch_embed(pixel_values).flatten(2).transpose(1, 2))


class Sa2VAChatModel(PreTrainedModel):
    config_class = Sa2VAChatConfig
    base_model_prefix = "language_model"
    _no_split_modules = ["Qwen2DecoderLayer", "SAM2"]

    def __init__(self, config, vision_model=None, language_model=None):
        super().__init__(config)
        self.template = config.template.replace("-", "_")
        self.conv_template = PROMPT_TEMPLATE[self.template]
        v, llm = config.vision_config, config.llm_config
        self.vision_model = vision_model or TinyVision(v["hidden_size"], v["patch_size"], v["image_size"])
        self.mlp1 = nn.Sequential(nn.LayerNorm(v["hidden_size"]), nn.Linear(v["hidden_size"], llm.hidden_size),
                                  nn.GELU(), nn.Linear(llm.hidden_size, llm.hidden_size))
        self.language_model = language_model or Qwen2ForCausalLM(llm)
        self.grounding_encoder = SAM2()
        self.text_hidden_fcs = text_hidden_fcs(llm.hidden_size)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)

    def forward(self, pixel_values, input_ids):
        img = self.mlp1(self.vision_model(pixel_values))
        txt = self.language_model.get_input_embeddings()(input_ids)
        return self.language_model(inputs_embeds=torch.cat([img, txt], dim=1))
