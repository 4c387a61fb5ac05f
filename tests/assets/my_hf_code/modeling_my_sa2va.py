"""A (hypothetical) in-house HF class: the tiny Sa2VA model with its text head named
``seg_projector``. Remote code, copied into the snapshot beside the tiny model's own files."""
from .configuration_tiny_sa2va import TinySa2VAConfig  # noqa: F401
from .modeling_tiny_sa2va import TinySa2VAChatModel
# transformers copies only the direct relative imports of the auto_map module into its module cache
# (a local directory's), so the files modeling_tiny_sa2va imports are imported here too
from .templates import PROMPT_TEMPLATE  # noqa: F401


class MySa2VAChatModel(TinySa2VAChatModel):
    def __init__(self, config):
        super().__init__(config)
        self.seg_projector = self.text_hidden_fcs
        del self.text_hidden_fcs
