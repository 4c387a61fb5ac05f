"""Tiny Sa2VA-shaped HF model (remote code: copied into every snapshot).

``TinyInternVLChatModel`` is the base mllm (vision_model, mlp1, language_model), like
InternVL's chat model. ``TinySa2VAChatModel`` adds a SAM2-like ``grounding_encoder`` and
``text_hidden_fcs``, like Sa2VA's HF model. SAM2's memory-encoder layer scale is named
``g_weight`` here, as in Sa2VA's HF code, because transformers renames any key containing
``gamma`` on load.
"""
import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from .configuration_tiny_sa2va import TinySa2VAConfig
from .templates import PROMPT_TEMPLATE


class TinyVisionModel(nn.Module):
    def __init__(self, hidden_size, patch_size, image_size):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, hidden_size, patch_size, patch_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.fc = nn.Linear(hidden_size, hidden_size)

    def forward(self, pixel_values):
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        return self.fc(self.norm(x))


class TinyLayerScale(nn.Module):
    """SAM2's layer scale; HF name of the parameter: g_weight."""

    def __init__(self, dim):
        super().__init__()
        self.g_weight = nn.Parameter(torch.full((dim,), 0.5))

    def scale(self):
        return self.g_weight


class TinyFuser(nn.Module):
    def __init__(self, dim, layer_scale_cls):
        super().__init__()
        self.layers = nn.ModuleList([layer_scale_cls(dim)])


class TinyMemoryEncoder(nn.Module):
    def __init__(self, dim, layer_scale_cls):
        super().__init__()
        self.fuser = TinyFuser(dim, layer_scale_cls)


class TinySam2(nn.Module):
    def __init__(self, dim, patch, layer_scale_cls):
        super().__init__()
        self.image_encoder = nn.Conv2d(3, dim, patch, patch)
        self.memory_encoder = TinyMemoryEncoder(dim, layer_scale_cls)
        self.sam_mask_decoder = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def mask_logits(self, pixel_values, query):
        feats = self.image_encoder(pixel_values)  # B, D, h, w
        feats = feats * self.memory_encoder.fuser.layers[0].scale().view(1, -1, 1, 1)
        q = self.sam_mask_decoder(query)  # B, D
        return torch.einsum("bdhw,bd->bhw", feats, q)


class TinyGroundingEncoder(nn.Module):
    def __init__(self, dim, patch, layer_scale_cls=TinyLayerScale):
        super().__init__()
        self.sam2_model = TinySam2(dim, patch, layer_scale_cls)


def build_mlp1(vision_hidden, llm_hidden):
    return nn.Sequential(nn.LayerNorm(vision_hidden), nn.Linear(vision_hidden, llm_hidden), nn.GELU(),
                         nn.Linear(llm_hidden, llm_hidden))


def build_text_hidden_fcs(llm_hidden, sam_dim):
    return nn.Sequential(nn.Linear(llm_hidden, llm_hidden), nn.ReLU(), nn.Linear(llm_hidden, sam_dim), nn.Dropout(0.0))


def multimodal_logits(vision_model, mlp1, language_model, pixel_values, input_ids, output_hidden_states=False):
    """Image tokens first, then text; the same computation at training time and after export."""
    img = mlp1(vision_model(pixel_values))
    txt = language_model.get_input_embeddings()(input_ids)
    out = language_model(inputs_embeds=torch.cat([img, txt], dim=1), output_hidden_states=output_hidden_states)
    return out, img.shape[1]


class TinyInternVLChatModel(PreTrainedModel):
    config_class = TinySa2VAConfig
    base_model_prefix = ""
    _no_split_modules = ["Qwen2DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        v = config.vision_config
        llm_cfg = Qwen2Config(**config.llm_config)
        self.vision_model = TinyVisionModel(v["hidden_size"], v["patch_size"], v["image_size"])
        self.mlp1 = build_mlp1(v["hidden_size"], llm_cfg.hidden_size)
        self.language_model = Qwen2ForCausalLM(llm_cfg)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()

    def forward(self, pixel_values, input_ids):
        return multimodal_logits(self.vision_model, self.mlp1, self.language_model, pixel_values, input_ids)[0]


class TinySa2VAChatModel(TinyInternVLChatModel):
    """As Sa2VA's: the template is looked up when the model is built (an unknown one is a KeyError
    in from_pretrained), and the inner LLM is never tied again (the config unties it)."""

    def __init__(self, config):
        super().__init__(config)
        self.template = PROMPT_TEMPLATE[config.template.replace("-", "_")]
        llm_hidden = Qwen2Config(**config.llm_config).hidden_size
        self.grounding_encoder = TinyGroundingEncoder(config.sam_dim, config.vision_config["patch_size"])
        self.text_hidden_fcs = build_text_hidden_fcs(llm_hidden, config.sam_dim)
        self.post_init()
