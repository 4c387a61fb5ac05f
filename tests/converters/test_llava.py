"""converters/llava.py on a structural stand-in of xtuner's ``LLaVAModel`` (an HF LLM, an HF CLIP
vision model, a two-layer projector) with fresh random weights: detection, the image token (never
invented), and a config transformers' own ``LlavaForConditionalGeneration`` builds from."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_qwen2
from sa2va_hooks.converters.base import ConversionError, SnapshotContext, detect_converter
from sa2va_hooks.converters.llava import IMAGE_TOKEN, LlavaConverter


class _Vocab:
    def __init__(self, *tokens):
        self.vocab = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self):
        return dict(self.vocab)


def _stand_in(vocab: int, seed: int) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    m = nn.Module()
    m.llm = tiny_qwen2(vocab=vocab, seed=seed)
    m.visual_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=8, patch_size=4))
    m.projector = nn.Module()
    m.projector.model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
    return m


def test_detected_before_the_causal_lm_inside_it():
    m = _stand_in(64, 0)
    assert detect_converter(m) is LlavaConverter
    m.projector.model = nn.Linear(2, 2)
    assert not LlavaConverter.matches(m)


def test_image_token_from_the_tokenizer_or_given_and_always_in_range():
    m = _stand_in(64, 1)
    assert LlavaConverter(tokenizer=_Vocab("a", "b", IMAGE_TOKEN))._image_token_index(m, 64) == 2
    assert LlavaConverter(image_token_index=63)._image_token_index(m, 64) == 63
    with pytest.raises(ConversionError, match=r"the tokenizer has no '<image>'.*image_token_index=ID"):
        LlavaConverter(tokenizer=_Vocab("a"))._image_token_index(m, 64)
    with pytest.raises(ConversionError, match=r"image_token_index 64 is outside the 64 embedding rows"):
        LlavaConverter(image_token_index=64)._image_token_index(m, 64)


def test_config_builds_transformers_llava_with_the_live_sizes():
    from transformers import LlavaForConditionalGeneration
    vocab = int(torch.randint(40, 130, (1,)))
    m = _stand_in(vocab, seed=vocab)
    ctx = SnapshotContext(model=m, dtype=None, names=set(), notes=[])
    cfg = LlavaConverter(image_token_index=vocab - 1).hf_config(m, ctx)
    assert cfg.architectures == ["LlavaForConditionalGeneration"] and cfg.image_token_index == vocab - 1
    assert cfg.vision_feature_select_strategy == "default" and cfg.vision_feature_layer == -2
    hf = LlavaForConditionalGeneration(cfg)
    assert hf.get_input_embeddings().weight.shape == m.llm.get_input_embeddings().weight.shape
    assert cfg.vision_config.hidden_size == m.visual_encoder.config.hidden_size


def test_every_mapped_name_is_a_parameter_of_transformers_llava():
    from transformers import LlavaForConditionalGeneration
    import transformers
    m = _stand_in(64, seed=2)
    if not hasattr(m.visual_encoder, "vision_model"):
        pytest.skip(f"transformers {transformers.__version__}'s CLIPVisionModel has no .vision_model: the layout of "
                    "xtuner's LLaVAModel that this converter's rules follow needs xtuner, which this stack lacks")
    cfg = LlavaConverter(image_token_index=63).hf_config(m, SnapshotContext(model=m, dtype=None, names=set(),
                                                                             notes=[]))
    names = set(dict(LlavaForConditionalGeneration(cfg).named_parameters()))
    mapped = LlavaConverter().map_keys([n for n, _ in m.named_parameters()])
    # every mapped name is a parameter of transformers' class, under some prefix it adds
    missing = [v for v in mapped.values() if not any(n.endswith(v.split(".", 1)[1]) for n in names)]
    assert missing == []
