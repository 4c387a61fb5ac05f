"""A user's own converter, registered from a training config through custom_imports (the README's
example, used by tests/test_custom_converter.py)."""
from sa2va_hooks import CONVERTERS
from sa2va_hooks.converters.sa2va import Sa2VAConverter


@CONVERTERS.register_module(name="my_sa2va")
class MySa2VAConverter(Sa2VAConverter):
    """Sa2VA's layout, with the text head renamed the way a (hypothetical) in-house HF class wants."""

    name = "my_sa2va"
    key_rules = ((r"^text_hidden_fcs\.", "seg_projector."),) + Sa2VAConverter.key_rules
