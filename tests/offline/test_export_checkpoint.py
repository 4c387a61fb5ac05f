"""offline/export_checkpoint.py, its pieces that need no training run (the whole offline export from
real trainings is tests/scenarios/test_offline.py): the pretrained_pth report against a model with
fresh random weights, the HFExportHook settings taken from a config, and the run's defaults.
References: the file's tensors as ``torch.save`` wrote them, counted here by hand."""
from __future__ import annotations

import pytest
import torch
from mmengine.config import Config

from conftest import tiny_qwen2
from sa2va_hooks.offline.export_checkpoint import (PretrainedReport, _hook_settings, _resolve_settings,
                                                   pretrained_report, run_defaults)


def test_pretrained_report_accounts_for_every_key(tmp_path):
    seed = int(torch.randint(0, 10 ** 6, (1,)))
    model = tiny_qwen2(seed=seed)
    own = {k: v.detach().clone() for k, v in torch.nn.Module.state_dict(model).items()}
    names = sorted(own)
    state = {names[0]: own[names[0]],                          # fits and is held
             names[1]: own[names[1]] + 1,                      # fits, but the model holds other values
             names[2]: torch.zeros(3, 3),                      # wrong shape
             "not.in.the.model": torch.zeros(2)}               # absent
    torch.save({"state_dict": state}, tmp_path / "pre.pth")
    rep = pretrained_report(model, str(tmp_path / "pre.pth"), allow_pickle=False)
    assert (rep.total, rep.loaded) == (4, 2)
    assert rep.skipped_for_shape == [(names[2], [3, 3], list(own[names[2]].shape))]
    assert rep.unused == ["not.in.the.model"] and rep.not_applied == [names[1]]
    assert rep.unusable_fraction == 0.5
    js = rep.to_json()
    assert (js["skipped_for_shape"], js["unused"], js["not_applied"], js["unusable_fraction"]) == (1, 1, 1, 0.5)
    text = "\n".join(rep.lines())
    assert "4 keys: 2 loaded, 1 skipped for shape, 1 absent from the model" in text
    assert f"skipped for shape: {names[2]} file [3, 3]" in text and "absent from the model: not.in.the.model" in text
    assert f"1 fitting key(s) do not hold the file's values in the built model: ['{names[1]}']" in text


def test_an_empty_report_has_no_unusable_fraction():
    assert PretrainedReport("p", 0, 0, [], [], []).unusable_fraction == 0.0


def _cfg(**kw) -> Config:
    return Config(dict(custom_hooks=[dict(type="FingerprintHook"),
                                     dict(type="sa2va_hooks.HFExportHook", converter="sa2va", dtype="bf16",
                                          max_shard_size="1GB", keep_last=2, **kw)], **{}))


def test_the_hooks_settings_are_taken_from_the_config():
    assert _hook_settings(_cfg()) == {"converter": "sa2va", "dtype": "bf16", "max_shard_size": "1GB"}
    assert _hook_settings(Config(dict(custom_hooks=[dict(type="FingerprintHook")]))) == {}
    conv, dtype, size = _resolve_settings(_cfg(), None, None, None)
    assert (conv, dtype, size) == ("sa2va", "bf16", "1GB")
    conv, dtype, size = _resolve_settings(_cfg(), "causal_lm", "fp32", "2GB")  # what the command says wins
    assert (conv, dtype, size) == ("causal_lm", "fp32", "2GB")
    assert _resolve_settings(Config(dict()), None, None, None) == ("auto", None, "5GB")


def test_hf_code_dir_and_the_hooks_tokenizer_are_passed_to_the_converter():
    built = []

    def make_tok(name):
        built.append(name)
        return f"tokenizer {name}"
    conv, _, _ = _resolve_settings(_cfg(tokenizer=dict(type=make_tok, name="t")), None, None, None, hf_code_dir="/c")
    assert conv == {"type": "sa2va", "tokenizer": "tokenizer t", "hf_code_dir": "/c"} and built == ["t"]


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_run_defaults_build_the_configs_tokenizer_only_when_asked(with_tokenizer):
    built = []
    extra = dict(tokenizer=dict(type=lambda: built.append(1) or "tok")) if with_tokenizer else {}
    d = run_defaults(Config(dict(template="qwen_chat", **extra)))
    assert d["template"] == "qwen_chat" and built == []
    if with_tokenizer:
        assert d["tokenizer"]() == "tok" and built == [1]
    else:
        assert d["tokenizer"] is None
