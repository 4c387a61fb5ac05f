"""Sa2VA v2's InternVL config, tiny (remote code): as the official ``Sa2VAChatConfig``, ``model_type``
'sa2va_chat', an ``llm_config`` (a Qwen2 LLM, as InternVL3's), a ``template``, and the tie flag forced off."""
from transformers import PretrainedConfig, Qwen2Config


class Sa2VAChatConfig(PretrainedConfig):
    model_type = "sa2va_chat"

    def __init__(self, vision_config=None, llm_config=None, template=None, downsample_ratio=1.0, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = dict(vision_config or {"hidden_size": 24, "patch_size": 4, "image_size": 16})
        llm_config = llm_config or {}
        self.llm_config = llm_config if isinstance(llm_config, Qwen2Config) else Qwen2Config(**llm_config)
        self.template = template
        self.downsample_ratio = downsample_ratio
        self.tie_word_embeddings = False

    def to_dict(self):
        out = super().to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        out["template"] = self.template
        return out
