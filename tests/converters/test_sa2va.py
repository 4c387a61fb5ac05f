"""converters/sa2va.py on a structural stand-in of Sa2VA (an ``mllm.model`` with ``vision_model``,
``language_model`` and ``mlp1``, a ``grounding_encoder``, ``text_hidden_fcs``), with fresh random
weights, and the v2-shaped remote code of ``sa2va_demo/v2/hf_internvl``. The reference for what
config.json names is that code imported for real: its classes, its ``model_type``, its templates."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from conftest import tiny_qwen2
from sa2va_demo.v2.training import HF_CODE
from sa2va_hooks.converters.base import ConversionError, SnapshotContext, converter_for_run
from sa2va_hooks.converters.internvl import InternVLConverter
from sa2va_hooks.converters.sa2va import Sa2VAConverter, Sa2VAQwenConverter

CODE = HF_CODE["internvl"]
PKG = "sa2va_demo.v2.hf_internvl"


class _Vocab:
    def __init__(self, *tokens):
        self.vocab = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self):
        return dict(self.vocab)

    def save_pretrained(self, d):
        pass


def _stand_in(vocab: int, seed: int, tokens=("[SEG]",)) -> nn.Module:
    from transformers import PretrainedConfig
    llm = tiny_qwen2(vocab=vocab, seed=seed)
    inner = nn.Module()
    inner.vision_model, inner.language_model, inner.mlp1 = nn.Linear(4, 4), llm, nn.Linear(4, 32)
    inner.config = PretrainedConfig(llm_config={"vocab_size": 7, "tie_word_embeddings": True},
                                    tie_word_embeddings=True)
    model = nn.Module()
    model.mllm = nn.Module()
    model.mllm.model = inner
    model.grounding_encoder, model.text_hidden_fcs = nn.Linear(2, 2), nn.Linear(32, 2)
    model.tokenizer = _Vocab(*tokens)
    return model


def test_matches_by_structure_only():
    m = _stand_in(64, 0)
    assert Sa2VAConverter.matches(m)
    assert not Sa2VAQwenConverter.matches(m)  # no Qwen-VL ``visual``
    assert not InternVLConverter.matches(m)
    del m.grounding_encoder
    assert not Sa2VAConverter.matches(m)


def test_config_names_the_imported_codes_classes_and_the_trained_vocab():
    vocab = int(torch.randint(40, 130, (1,)))
    m = _stand_in(vocab, seed=vocab)
    conv = converter_for_run(dict(type="sa2va", hf_code_dir=str(CODE)), m, template="qwen_chat")
    ctx = SnapshotContext(model=m, dtype=torch.bfloat16, names={"language_model.lm_head.weight"}, notes=[])
    cfg = conv.hf_config(m, ctx)
    config_cls = getattr(importlib.import_module(f"{PKG}.{cfg['auto_map']['AutoConfig'].split('.')[0]}"),
                         cfg["auto_map"]["AutoConfig"].split(".")[1])
    model_cls = getattr(importlib.import_module(f"{PKG}.{cfg['auto_map']['AutoModel'].split('.')[0]}"),
                        cfg["auto_map"]["AutoModel"].split(".")[1])
    assert model_cls.config_class is config_cls and cfg["model_type"] == config_cls.model_type
    assert cfg["architectures"] == [model_cls.__name__]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == cfg["auto_map"]["AutoModel"]
    templates = importlib.import_module(f"{PKG}.templates").PROMPT_TEMPLATE
    assert cfg["template"] == "qwen_chat" and cfg["template"] in templates
    assert cfg["llm_config"]["vocab_size"] == m.mllm.model.language_model.get_input_embeddings().weight.shape[0]
    assert cfg["tie_word_embeddings"] is False and cfg["llm_config"]["tie_word_embeddings"] is False
    assert any("language_model.lm_head.weight is written" in n for n in ctx.notes)
    from sa2va_hooks.compat import config_dtype_keys
    assert all(cfg["llm_config"][k] == "bfloat16" for k in config_dtype_keys(cfg["llm_config"]))


def test_every_problem_is_reported_before_anything_is_written():
    m = _stand_in(50, 1, tokens=("a",))
    with pytest.raises(ConversionError) as e:
        converter_for_run(dict(type="sa2va"), m)
    assert "no hf_code_dir was given" in str(e.value) and "projects/sa2va/hf/models" in str(e.value)
    assert "lacks ['[SEG]']" in str(e.value)
    templates = importlib.import_module(f"{PKG}.templates").PROMPT_TEMPLATE
    with pytest.raises(ConversionError) as e:
        converter_for_run(dict(type="sa2va", hf_code_dir=str(CODE), template="nope_chat"), m)
    assert "template 'nope_chat' is not one Sa2VA's HF code knows" in str(e.value)
    assert ", ".join(sorted(templates)) in str(e.value)


def test_save_extras_copies_the_remote_code(tmp_path):
    m = _stand_in(30, 2)
    conv = Sa2VAConverter(hf_code_dir=str(CODE), template="qwen_chat")
    conv.save_extras(m, tmp_path, SnapshotContext(model=m, dtype=None, names=set(), notes=[]))
    want = sorted(p.name for p in CODE.glob("*.py") if p.name != "__init__.py")
    assert sorted(p.name for p in tmp_path.iterdir()) == want
    assert all((tmp_path / n).read_bytes() == (CODE / n).read_bytes() for n in want)
