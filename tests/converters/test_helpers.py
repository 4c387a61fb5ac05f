"""converters/helpers.py on tiny HF models with fresh random weights: embedding rows against the
model's own ``get_input_embeddings()``, the config made true to the exported tensors, the base
directory's config.json, remote code copying and the machine settings left out."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_qwen2
from sa2va_hooks.converters.base import ConversionError, SnapshotContext
from sa2va_hooks.converters.helpers import (MACHINE_SETTINGS, base_config_dict, causal_lm_config, copy_remote_code,
                                            embedding_rows, is_hf_model, set_llm_vocab, strip_machine_settings,
                                            unwrap_hf)


def _ctx(model, dtype=None, names=()):
    return SnapshotContext(model=model, dtype=dtype, names=set(names), notes=[])


def _peft(model, save_embed: bool):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"],
                                            modules_to_save=["embed_tokens"] if save_embed else None))


@pytest.mark.parametrize("vocab", [64, 97])
@pytest.mark.parametrize("save_embed", [False, True])
def test_embedding_rows_and_unwrap_through_peft(vocab, save_embed):
    base = tiny_qwen2(vocab=vocab, seed=vocab)
    pm = _peft(base, save_embed)
    assert embedding_rows(pm) == embedding_rows(base) == base.get_input_embeddings().weight.shape[0] == vocab
    assert unwrap_hf(pm) is base and unwrap_hf(base) is base
    assert is_hf_model(pm) and is_hf_model(base) and not is_hf_model(torch.nn.Linear(2, 2))


def test_embedding_rows_without_an_embedding_is_none():
    class NoEmbed(torch.nn.Module):
        def get_input_embeddings(self):
            raise NotImplementedError
    assert embedding_rows(NoEmbed()) is None


def test_causal_lm_config_follows_the_resized_embedding_and_untie():
    m = tiny_qwen2(vocab=96, tie=True, seed=4)
    m.resize_token_embeddings(100)
    m.config.vocab_size = 96  # stale, as a run that added tokens may leave it
    ctx = _ctx(m, torch.bfloat16, names={"lm_head.weight"})
    cfg = causal_lm_config(m, ctx)
    assert cfg.vocab_size == m.get_input_embeddings().weight.shape[0] == 100
    assert cfg.architectures == ["Qwen2ForCausalLM"] and cfg.torch_dtype == torch.bfloat16
    assert cfg.tie_word_embeddings is False and m.config.tie_word_embeddings is True  # a copy was changed
    assert any("vocab_size set from 96 to 100" in n for n in ctx.notes)
    assert any("tie_word_embeddings set to False" in n for n in ctx.notes)


def test_causal_lm_config_keeps_a_tie_whose_head_is_not_exported():
    m = tiny_qwen2(tie=True, seed=5)
    ctx = _ctx(m)
    cfg = causal_lm_config(m, ctx)
    assert cfg.tie_word_embeddings is True and ctx.notes == []


def test_base_config_dict_reads_the_base_directory_else_the_live_config(tmp_path):
    m = tiny_qwen2(seed=6)
    m.config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written["marker"] = 7
    (tmp_path / "config.json").write_text(json.dumps(written))
    m.config._name_or_path = str(tmp_path)
    assert base_config_dict(m.config)["marker"] == 7
    m.config._name_or_path = str(tmp_path / "gone")
    assert base_config_dict(m.config) == m.config.to_dict()
    assert base_config_dict(m.config, str(tmp_path / "config.json"))["marker"] == 7
    with pytest.raises(ConversionError, match=r"base config .*nope.json does not exist"):
        base_config_dict(m.config, str(tmp_path / "nope.json"))


def test_set_llm_vocab_sets_and_notes_only_a_change():
    ctx = _ctx(None)
    cfg = {"llm_config": {"vocab_size": 10}}
    set_llm_vocab(cfg, 10, ctx)
    assert ctx.notes == []
    set_llm_vocab(cfg, 12, ctx)
    assert cfg["llm_config"]["vocab_size"] == 12 and ctx.notes == ["llm_config.vocab_size set from 10 to 12, the "
                                                                   "embedding rows"]
    set_llm_vocab(cfg, None, ctx)
    assert cfg["llm_config"]["vocab_size"] == 12


def test_copy_remote_code_copies_the_py_files_but_init(tmp_path):
    code, out = tmp_path / "code", tmp_path / "out"
    code.mkdir()
    out.mkdir()
    for name in ("modeling_a.py", "configuration_a.py", "__init__.py", "README.md"):
        (code / name).write_text(f"# {name}\n")
    copy_remote_code(code, out, _ctx(None), required=True)
    assert sorted(p.name for p in out.iterdir()) == ["configuration_a.py", "modeling_a.py"]
    assert (out / "modeling_a.py").read_bytes() == (code / "modeling_a.py").read_bytes()
    copy_remote_code(tmp_path / "absent", out, _ctx(None))  # best effort: nothing, no error
    with pytest.raises(ConversionError, match=r"hf_code_dir .*absent does not exist"):
        copy_remote_code(tmp_path / "absent", out, _ctx(None), required=True)
    (tmp_path / "no_code").mkdir()
    (tmp_path / "no_code" / "__init__.py").write_text("")
    with pytest.raises(ConversionError, match=r"hf_code_dir .*no_code has no .py files"):
        copy_remote_code(tmp_path / "no_code", out, _ctx(None), required=True)


def test_strip_machine_settings_removes_them_at_every_depth():
    ctx = _ctx(None)
    cfg = {"attn_implementation": "flash_attention_2", "hidden": 4,
           "llm_config": {"_attn_implementation": "eager", "_attn_implementation_autoset": True,
                          "vision": {"attn_implementation": None, "keep": 1}}}
    strip_machine_settings(cfg, ctx)
    flat = json.dumps(cfg)
    assert not any(f'"{k}"' in flat for k in MACHINE_SETTINGS)
    assert cfg == {"hidden": 4, "llm_config": {"vision": {"keep": 1}}}
    assert ctx.notes == ["attn_implementation='flash_attention_2' (a setting of the training machine) not written",
                         "llm_config._attn_implementation='eager' (a setting of the training machine) not written"]
