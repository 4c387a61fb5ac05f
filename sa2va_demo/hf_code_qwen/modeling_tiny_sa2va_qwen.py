"""Tiny Sa2VA with a Qwen-VL-style mllm (remote code): ``model`` is a Qwen2-VL
conditional-generation model; ``grounding_encoder`` and ``text_hidden_fcs`` as in Sa2VA."""
import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2VLForConditionalGeneration

from .configuration_tiny_sa2va_qwen import TinySa2VAQwenConfig


class TinyLayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.g_weight = nn.Parameter(torch.full((dim,), 0.5))


class TinyGrounding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.sam2_model = nn.Module()
        self.sam2_model.image_encoder = nn.Conv2d(3, dim, 4, 4)
        self.sam2_model.memory_encoder = nn.Module()
        self.sam2_model.memory_encoder.fuser = nn.Module()
        self.sam2_model.memory_encoder.fuser.layers = nn.ModuleList([TinyLayerScale(dim)])
        self.sam2_model.sam_mask_decoder = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


class TinySa2VAQwenChatModel(PreTrainedModel):
    config_class = TinySa2VAQwenConfig
    base_model_prefix = ""
    _no_split_modules = ["Qwen2VLDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2VLForConditionalGeneration(config)
        self.grounding_encoder = TinyGrounding(config.sam_dim)
        # transformers >= 5 keeps the LLM's sizes in config.text_config; before, at the top level
        hidden = getattr(getattr(config, "text_config", None), "hidden_size", None) or config.hidden_size
        self.text_hidden_fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(),
                                             nn.Linear(hidden, config.sam_dim), nn.Dropout(0.0))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids)
