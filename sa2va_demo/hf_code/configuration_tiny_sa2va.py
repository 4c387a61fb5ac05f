"""Config of the tiny Sa2VA-shaped model (remote code: copied into every snapshot).

Mirrors Sa2VA's InternVL-style config: a vision part, an ``llm_config`` dict for a Qwen2 LLM,
and a ``template`` name.
"""
from transformers import PretrainedConfig


class TinySa2VAConfig(PretrainedConfig):
    model_type = "sa2va_chat"

    def __init__(self, vision_config=None, llm_config=None, mask_dim=16, sam_dim=16, template="tiny_chat",
                 **kwargs):
        self.vision_config = dict(vision_config or {"hidden_size": 24, "patch_size": 4, "image_size": 16})
        self.llm_config = dict(llm_config or {})
        self.mask_dim = mask_dim
        self.sam_dim = sam_dim
        self.template = template
        super().__init__(**kwargs)
        self.tie_word_embeddings = False  # as Sa2VA's config: forced, whatever the LLM's own flag says
