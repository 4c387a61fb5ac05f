"""Config of a tiny InternVL-style chat model (remote code), shaped like InternVL's: an
``llm_config`` sub-config object and a ``vision_config`` dict."""
from transformers import PretrainedConfig, Qwen2Config


class TinyInternVLConfig(PretrainedConfig):
    model_type = "tiny_internvl"

    def __init__(self, vision_config=None, llm_config=None, template="tiny_chat", downsample_ratio=1.0, **kwargs):
        self.vision_config = dict(vision_config or {"hidden_size": 24, "patch_size": 4, "image_size": 16})
        llm_config = llm_config or {}
        self.llm_config = llm_config if isinstance(llm_config, Qwen2Config) else Qwen2Config(**llm_config)
        self.template = template
        self.downsample_ratio = downsample_ratio
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        return out
