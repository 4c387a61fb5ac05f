"""run_export end to end on a tiny random Qwen2: the snapshot reloads with ``from_pretrained`` and
gives the same logits; an existing out_dir is refused and left as it was; a model changed in place
under a capture is reported and nothing is published."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from sa2va_hooks.converters.base import resolve_converter
from sa2va_hooks.core.dist import RankGroup
from sa2va_hooks.core.errors import OutputExistsError
from sa2va_hooks.core.observer import ExportObserver
from sa2va_hooks.core.pipeline import prepare_background_export, run_export
from sa2va_hooks.core.snapshot import ModelChangedError


def _tiny(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                        max_position_embeddings=32, tie_word_embeddings=False)).eval()


def _export(model, out, **kw):
    return run_export(model, out, converter=resolve_converter("auto", model), group=RankGroup(0, 1), **kw)


def test_export_reloads_with_equal_logits(tmp_path):
    model = _tiny(seed=61)
    manifest = _export(model, tmp_path / "snap", max_shard_size="12KB")
    assert manifest.readback_verified
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "snap", torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    # the weights are bit-equal; the logits within float rounding (transformers 4.4x may pick another attention
    # kernel for a loaded model than for one built from a config)
    sd = loaded.state_dict()
    assert sorted(sd) == sorted(model.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_export_holds_the_cast_weights(tmp_path):
    model = _tiny(seed=62)
    _export(model, tmp_path / "snap", dtype="bf16")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "snap", torch_dtype=torch.bfloat16)
    got = loaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v.to(torch.bfloat16)), k


class _Events(ExportObserver):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def tensor_producing(self, entry) -> None:
        self.seen.append(entry.name)

    def file_done(self, fname: str, nbytes: int, linked: bool) -> None:
        self.seen.append(fname)


def test_existing_out_dir_is_refused_before_the_first_byte_and_left_as_it_was(tmp_path):
    out = tmp_path / "snap"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    events = _Events()
    with pytest.raises(OutputExistsError, match="already exists") as e:
        _export(_tiny(seed=63), out, observer=events)
    assert "overwrite" in str(e.value)
    assert events.seen == []  # refused before any tensor was produced or any file written
    assert os.listdir(out) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["snap"]  # no staging directory left beside it


def test_model_changed_under_a_capture_is_reported(tmp_path):
    model = _tiny(seed=64)
    frozen = model.model.layers[0].mlp.down_proj.weight
    frozen.requires_grad_(False)  # not captured: read live, so its version is checked at the end
    job = prepare_background_export(model, tmp_path / "snap", converter=resolve_converter("auto", model))
    with torch.no_grad():
        frozen.mul_(1.01)
    with pytest.raises(ModelChangedError, match=r"layers\.0\.mlp\.down_proj\.weight"):
        job.start().result()
    assert not (tmp_path / "snap").exists()
    assert os.listdir(tmp_path) == []
