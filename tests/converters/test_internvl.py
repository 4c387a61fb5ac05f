"""converters/internvl.py on a structural stand-in of xtuner's ``InternVL_V1_5`` (``model.model`` with
``vision_model``, ``language_model`` and ``mlp1``) with fresh random weights: what it matches, and the
config.json it writes from the base directory's own config.json."""
from __future__ import annotations

import json

import torch
from torch import nn

from conftest import tiny_qwen2
from sa2va_hooks.converters.base import SnapshotContext
from sa2va_hooks.converters.internvl import InternVLConverter


def _stand_in(tmp_path, vocab: int, seed: int) -> nn.Module:
    from transformers import PretrainedConfig
    base = tmp_path / "base"
    base.mkdir()
    # the base directory's config.json wins over the live config (xtuner edits the live one)
    (base / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "llm_config": {"vocab_size": 5},
                                                  "vision_config": {"hidden_size": 4}, "marker": seed}))
    (base / "modeling_internvl_chat.py").write_text("class InternVLChatModel: pass\n")
    inner = nn.Module()
    inner.vision_model, inner.language_model, inner.mlp1 = nn.Linear(2, 2), tiny_qwen2(vocab=vocab, seed=seed), \
        nn.Linear(2, 2)
    inner.config = PretrainedConfig(llm_config={"vocab_size": 5}, use_flash_attn=True)
    inner.config._name_or_path = str(base)
    m = nn.Module()
    m.model = inner
    return m


def test_matches_the_structure_but_not_sa2va(tmp_path):
    m = _stand_in(tmp_path, 40, 0)
    assert InternVLConverter.matches(m)
    m.grounding_encoder = nn.Linear(1, 1)
    assert not InternVLConverter.matches(m)
    assert not InternVLConverter.matches(tiny_qwen2())


def test_config_is_the_base_directorys_with_vocab_dtype_and_template(tmp_path):
    vocab = int(torch.randint(40, 130, (1,)))
    m = _stand_in(tmp_path, vocab, seed=vocab)
    ctx = SnapshotContext(model=m, dtype=torch.float16, names=set(), notes=[])
    cfg = InternVLConverter(template="internlm2-chat").hf_config(m, ctx)
    base = json.loads((tmp_path / "base" / "config.json").read_text())
    assert cfg["marker"] == base["marker"] == vocab and "use_flash_attn" not in cfg
    assert cfg["llm_config"]["vocab_size"] == m.model.language_model.get_input_embeddings().weight.shape[0] == vocab
    assert ctx.notes == [f"llm_config.vocab_size set from 5 to {vocab}, the embedding rows"]
    assert cfg["template"] == "internlm2-chat"
    from sa2va_hooks.compat import config_dtype_keys
    for d in (cfg, cfg["llm_config"], cfg["vision_config"]):
        assert all(d[k] == "float16" for k in config_dtype_keys(d))


def test_save_extras_carries_the_base_directorys_code(tmp_path):
    m = _stand_in(tmp_path, 40, 1)
    m.tokenizer = None
    out = tmp_path / "out"
    out.mkdir()
    conv = InternVLConverter()
    conv.resolve_tokenizer = lambda model: None  # no tokenizer files in this stand-in's base directory
    conv.save_extras(m, out, SnapshotContext(model=m, dtype=None, names=set(), notes=[]))
    assert (out / "modeling_internvl_chat.py").read_bytes() == (tmp_path / "base" / "modeling_internvl_chat.py"
                                                                ).read_bytes()
    assert conv.tokenizer == str(tmp_path / "base")  # the base directory is where the tokenizer is looked for
