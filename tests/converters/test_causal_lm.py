"""converters/causal_lm.py: which models it takes, the module it walks, and what it writes beside the
weights. References: transformers' own ``GenerationConfig.from_pretrained`` and the model's config."""
from __future__ import annotations

import torch

from conftest import tiny_qwen2
from sa2va_hooks.converters.base import SnapshotContext
from sa2va_hooks.converters.causal_lm import CausalLMConverter


class _XtunerLike(torch.nn.Module):
    def __init__(self, llm):
        super().__init__()
        self.llm = llm


def _peft(model):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=2, target_modules=["v_proj"]))


def test_matches_hf_peft_and_an_llm_holder_only():
    m = tiny_qwen2(seed=1)
    pm = _peft(tiny_qwen2(seed=2))
    for model, root in ((m, m), (pm, pm), (_XtunerLike(pm), pm)):
        assert CausalLMConverter.matches(model)
        assert CausalLMConverter().hf_root(model) is root
    assert not CausalLMConverter.matches(torch.nn.Linear(2, 2))
    assert not CausalLMConverter.matches(_XtunerLike(torch.nn.Linear(2, 2)))


def test_hf_config_is_the_inner_models_config_made_true():
    vocab = int(torch.randint(70, 120, (1,)))
    holder = _XtunerLike(_peft(tiny_qwen2(vocab=vocab, seed=3)))
    ctx = SnapshotContext(model=holder, dtype=torch.float16, names=set(), notes=[])
    cfg = CausalLMConverter().hf_config(holder, ctx)
    live = holder.llm.get_base_model().config
    assert cfg is not live and cfg.vocab_size == vocab and cfg.architectures == ["Qwen2ForCausalLM"]
    assert cfg.hidden_size == live.hidden_size and cfg.num_hidden_layers == live.num_hidden_layers
    assert cfg.torch_dtype == torch.float16


def test_save_extras_writes_the_generation_config_as_transformers_reads_it(tmp_path):
    from transformers import GenerationConfig
    m = tiny_qwen2(seed=4)
    m.generation_config.max_new_tokens = int(torch.randint(5, 500, (1,)))
    m.generation_config.temperature = 0.25
    m.generation_config.do_sample = True
    CausalLMConverter().save_extras(_peft(m), tmp_path, SnapshotContext(model=m, dtype=None, names=set(), notes=[]))
    back = GenerationConfig.from_pretrained(tmp_path)
    assert back.max_new_tokens == m.generation_config.max_new_tokens and back.temperature == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generation_config.json"]  # no tokenizer: none known
