"""A tiny InternVL-style chat model (remote code): vision_model, mlp1, language_model."""
import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2ForCausalLM

from .configuration_tiny_internvl import TinyInternVLConfig


class TinyVision(nn.Module):
    def __init__(self, hidden_size, patch_size, image_size):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, hidden_size, patch_size, patch_size)
        self.norm = nn.LayerNorm(hidden_size)

    @property
    def dtype(self):
        return self.patch_embed.weight.dtype

    def forward(self, pixel_values):
        return self.norm(self.patch_embed(pixel_values).flatten(2).transpose(1, 2))


class TinyInternVLChatModel(PreTrainedModel):
    config_class = TinyInternVLConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        v = config.vision_config
        llm_cfg = config.llm_config
        llm_cfg._attn_implementation = "eager"  # the tiny model runs on CPUs without flash-attn
        self.vision_model = TinyVision(v["hidden_size"], v["patch_size"], v["image_size"])
        self.mlp1 = nn.Sequential(nn.LayerNorm(v["hidden_size"]), nn.Linear(v["hidden_size"], llm_cfg.hidden_size),
                                  nn.GELU(), nn.Linear(llm_cfg.hidden_size, llm_cfg.hidden_size))
        self.language_model = Qwen2ForCausalLM(llm_cfg)
        self.img_context_token_id = None
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()

    def extract_feature(self, pixel_values):
        """Image tokens in the LLM's width, as InternVL's extract_feature returns them."""
        return self.mlp1(self.vision_model(pixel_values))

    def forward(self, pixel_values, input_ids):
        img = self.mlp1(self.vision_model(pixel_values))
        txt = self.language_model.get_input_embeddings()(input_ids)
        return self.language_model(inputs_embeds=torch.cat([img, txt], dim=1))
