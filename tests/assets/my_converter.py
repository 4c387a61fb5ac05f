"""A user's own converter, registered from a training config through custom_imports (the README's
example, used by tests/scenarios/test_custom_converter.py): Sa2VA's layout, for an in-house HF class that names
the text head ``seg_projector``. Its remote code is the tiny model's files plus
``my_hf_code/modeling_my_sa2va.py`` (the test puts them in one directory)."""
from sa2va_hooks import CONVERTERS
from sa2va_hooks.converters.sa2va import Sa2VAConverter

MY_AUTO_MAP = {"AutoConfig": "configuration_tiny_sa2va.TinySa2VAConfig",
               "AutoModel": "modeling_my_sa2va.MySa2VAChatModel"}


@CONVERTERS.register_module(name="my_sa2va")
class MySa2VAConverter(Sa2VAConverter):
    name = "my_sa2va"
    key_rules = ((r"^text_hidden_fcs\.", "seg_projector."),) + Sa2VAConverter.key_rules

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("auto_map", MY_AUTO_MAP)
        super().__init__(**kwargs)
