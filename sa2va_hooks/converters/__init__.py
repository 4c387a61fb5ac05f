"""Registry of converters, one file per family."""
from .base import CONVERTERS, ConversionError, Converter, SnapshotContext, detect_converter, resolve_converter
from .causal_lm import CausalLMConverter
from .internvl import InternVLConverter
from .llava import LlavaConverter
from .sa2va import Sa2VAConverter, Sa2VAQwenConverter

__all__ = ["CONVERTERS", "ConversionError", "Converter", "SnapshotContext", "detect_converter",
           "resolve_converter", "CausalLMConverter", "InternVLConverter", "LlavaConverter", "Sa2VAConverter",
           "Sa2VAQwenConverter"]
