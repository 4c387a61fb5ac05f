"""Config of the tiny Sa2VA model with a Qwen-VL-style mllm (remote code)."""
from transformers import Qwen2VLConfig


class TinySa2VAQwenConfig(Qwen2VLConfig):
    model_type = "tiny_sa2va_qwen"

    def __init__(self, template=None, sam_dim=16, **kwargs):
        self.template = template
        self.sam_dim = sam_dim
        super().__init__(**kwargs)
