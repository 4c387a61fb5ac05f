"""converters/base.py beyond the key tables (tests/converters/test_key_rules.py): the registry,
resolving a converter from each spelling, detection by structure, the dtype a config declares and the
tokenizer a converter finds. Models are tiny Qwen2s with fresh random weights."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_qwen2
from sa2va_hooks.converters.base import (CONVERTERS, ConversionError, Converter, SnapshotContext, _NameRegistry,
                                         converter_for_run, detect_converter, resolve_converter, set_dtype,
                                         written_dtype)
from sa2va_hooks.converters.causal_lm import CausalLMConverter
from sa2va_hooks.core.errors import DuplicateRegistrationError, UnknownConverterError


class _Vocab:
    def __init__(self, *tokens):
        self.vocab = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self):
        return dict(self.vocab)


class _NeedsSeg(Converter):
    name = "needs_seg"
    required_tokens = ("[SEG]",)


def test_name_registry_registers_refuses_duplicates_and_forces():
    reg = _NameRegistry("test")

    @reg.register_module(name="a")
    class A:
        pass
    assert reg.get("a") is A and reg.get("b") is None
    with pytest.raises(DuplicateRegistrationError, match="a is already registered in test"):
        reg.register_module(name="a", module=int)
    reg.register_module(name="a", module=int, force=True)
    assert reg.get("a") is int


def test_resolve_converter_from_each_spelling():
    m = tiny_qwen2(seed=int(torch.randint(0, 1000, (1,))))
    inst = CausalLMConverter()
    assert resolve_converter(inst, m) is inst
    for spec in ("auto", "causal_lm", CausalLMConverter, dict(type="causal_lm"), dict(type="auto")):
        assert type(resolve_converter(spec, m)) is CausalLMConverter, spec
    tok = _Vocab("a")
    assert resolve_converter(dict(type="causal_lm", tokenizer=tok), m).tokenizer is tok


def test_an_unknown_name_lists_every_known_converter():
    with pytest.raises(UnknownConverterError) as e:
        resolve_converter("nope", tiny_qwen2())
    for name in CONVERTERS.module_dict:
        assert name in str(e.value)
    assert "'nope'" in str(e.value)


def test_detection_follows_priority_and_refuses_what_nothing_matches():
    ranked = sorted(CONVERTERS.module_dict.values(), key=lambda c: -c.priority)
    m = tiny_qwen2()
    assert detect_converter(m) is next(c for c in ranked if c.matches(m)) is CausalLMConverter
    with pytest.raises(ConversionError, match=r"no converter matches a model of class torch.nn.modules.linear.Linear"):
        detect_converter(torch.nn.Linear(2, 2))


def _ctx(dtype, file_dtypes):
    return SnapshotContext(model=None, dtype=dtype, names=set(file_dtypes), notes=[], file_dtypes=file_dtypes)


def test_written_dtype_is_the_export_dtype_else_the_widest_kept_one():
    assert written_dtype(_ctx(torch.float16, {"a": torch.float32})) == torch.float16
    mixed = _ctx(None, {"a": torch.bfloat16, "b": torch.float32, "c": torch.int64})
    assert written_dtype(mixed) == torch.float32
    assert mixed.notes == ["the tensors are kept as in memory, in ['bfloat16', 'float32']; config.json declares "
                           "the widest"]
    assert written_dtype(_ctx(None, {"i": torch.int64})) is None


def test_set_dtype_writes_every_dtype_key_of_the_config_and_its_subconfigs():
    from sa2va_hooks.compat import config_dtype_keys
    cfg = {"torch_dtype": "bfloat16", "llm_config": {"dtype": "bfloat16"}, "vision_config": {}, "other": {}}
    set_dtype(cfg, _ctx(torch.float32, {}), "llm_config", "vision_config")
    for d in (cfg, cfg["llm_config"], cfg["vision_config"]):
        keys = config_dtype_keys(d)
        assert keys and all(d[k] == "float32" for k in keys)
    assert cfg["other"] == {}


def test_tokenizer_precedence_given_then_models_then_configs():
    given, own, run = _Vocab("g"), _Vocab("m"), _Vocab("r")
    m = torch.nn.Linear(1, 1)
    conv = Converter()
    conv.use_run_config(tokenizer=run, template="chat")
    assert conv.find_tokenizer(m) == (run, "the config's top-level") and conv.run_template == "chat"
    m.tokenizer = own
    assert conv.find_tokenizer(m) == (own, "the model's")
    assert Converter(tokenizer=given).find_tokenizer(m) == (given, "given")
    built = []
    lazy = Converter(tokenizer=lambda: built.append(1) or given)
    assert lazy.find_tokenizer(m)[0] is given and lazy.find_tokenizer(m)[0] is given and built == [1]


def test_required_tokens_are_checked_once_per_model():
    m = torch.nn.Linear(1, 1)
    with pytest.raises(ConversionError, match=r"needs a tokenizer holding \['\[SEG\]'\], and none was found"):
        _NeedsSeg().check_ready(m)
    m.tokenizer = _Vocab("a", "b")
    with pytest.raises(ConversionError, match=r"the tokenizer \(the model's\) lacks \['\[SEG\]'\]"):
        converter_for_run(_NeedsSeg(), m)
    m.tokenizer = _Vocab("a", "[SEG]")
    conv = converter_for_run(_NeedsSeg(), m)
    m.tokenizer = _Vocab("a")  # not looked at again for the same model
    conv.ensure_ready(m)
    with pytest.raises(ConversionError):
        conv.ensure_ready(torch.nn.Linear(1, 1))
