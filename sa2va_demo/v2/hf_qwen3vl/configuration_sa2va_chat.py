"""Sa2VA v2's Qwen3-VL config, tiny (remote code): as the official ``Sa2VAChatConfigQwen``, a subclass of
transformers' ``Qwen3VLConfig`` with ``model_type`` 'sa2va_chat' and a ``template``; the tie flags are
whatever config.json says (the converter writes them off at both levels)."""
from transformers import Qwen3VLConfig


class Sa2VAChatConfigQwen(Qwen3VLConfig):
    model_type = "sa2va_chat"

    def __init__(self, template=None, **kwargs):
        super().__init__(**kwargs)
        self.template = template

    def to_dict(self):
        output = super().to_dict()
        output["template"] = self.template
        return output
