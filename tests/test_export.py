"""export_hf on plain and PEFT-wrapped causal LMs: real from_pretrained round trips, sharding,
atomic publish, converters' errors."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import tiny_qwen2, train_like
from sa2va_hooks import CONVERTERS, export_hf, verify_snapshot
from sa2va_hooks.converters.base import ConversionError, Converter
from sa2va_hooks.core.vocab import INDEX_FILE, SINGLE_FILE


def _peft_model():
    pm = get_peft_model(tiny_qwen2(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 modules_to_save=["embed_tokens", "lm_head"]))
    train_like(pm)
    return pm


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_roundtrip_from_pretrained_reproduces_logits(tmp_path, dtype, atol):
    pm = _peft_model().eval()
    export_hf(pm, tmp_path / "out", dtype=dtype)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = pm(input_ids=ids).logits, reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    # the tolerance is meaningful: the base model alone is far away
    with torch.no_grad():
        base = tiny_qwen2().eval()(input_ids=ids).logits
    assert (base - want).abs().max() > 10 * atol


def test_plain_pretrained_model_exports_like_save_pretrained(tmp_path):
    model = tiny_qwen2(tie=True)
    export_hf(model, tmp_path / "ours")
    model.save_pretrained(tmp_path / "hf")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for (k, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(ref.state_dict().items()), strict=True):
        assert torch.equal(a, b), k
    manifest = json.loads((tmp_path / "ours" / "export_manifest.json").read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_sharded_export_follows_hf_index_conventions(tmp_path):
    pm = _peft_model()
    m = export_hf(pm, tmp_path / "out", dtype="bf16", max_shard_size="10KB")
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    shards = sorted({v for v in index["weight_map"].values()})
    assert len(shards) > 2 and not (tmp_path / "out" / SINGLE_FILE).exists()
    on_disk = sum(t.numel() * t.element_size() for t in
                  AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.bfloat16)
                  .state_dict().values())
    assert index["metadata"]["total_size"] == on_disk
    assert set(index["weight_map"]) == set(m.tensors)
    assert verify_snapshot(tmp_path / "out") == []


def test_observer_sees_every_tensor_and_file_written_then_linked(tmp_path):
    from sa2va_hooks.core.observer import ExportObserver

    class Events(ExportObserver):
        def __init__(self):
            self.events = []

        def tensor_producing(self, entry):
            self.events.append(("start", entry.name))

        def tensor_produced(self, entry):
            self.events.append(("end", entry.name))

        def file_done(self, fname, nbytes, linked):
            self.events.append(("file", fname, nbytes, linked))

    pm = _peft_model()
    first = Events()
    m = export_hf(pm, tmp_path / "a", max_shard_size="12KB", observer=first)
    ends = [e[1] for e in first.events if e[0] == "end"]
    assert sorted(ends) == sorted(m.tensors) and len(ends) == len(set(ends))
    starts = [e for e in first.events if e[0] != "file"]
    assert starts[::2] == [("start", n) for n in ends] and starts[1::2] == [("end", n) for n in ends]
    files = {e[1]: (e[2], e[3]) for e in first.events if e[0] == "file"}
    assert files == {f: ((tmp_path / "a" / f).stat().st_size, False) for f in m.files if f.endswith(".safetensors")}
    second = Events()
    export_hf(pm, tmp_path / "b", max_shard_size="12KB", link_from=tmp_path / "a", observer=second)
    assert any(e[0] == "file" and e[3] for e in second.events)  # the frozen shards were linked


def test_failed_export_leaves_no_partial_snapshot_and_keeps_the_old_one(tmp_path):
    pm = _peft_model()
    export_hf(pm, tmp_path / "out")
    old = (tmp_path / "out" / "export_manifest.json").read_bytes()

    class Exploding(Converter):
        name = "exploding"

        @classmethod
        def matches(cls, model):
            return True

        def hf_root(self, model):
            return model

        def hf_config(self, model, ctx):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        export_hf(pm, tmp_path / "out", converter=Exploding(), overwrite=True)
    assert (tmp_path / "out" / "export_manifest.json").read_bytes() == old
    assert verify_snapshot(tmp_path / "out") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_snapshot_is_not_overwritten_by_default(tmp_path):
    pm = _peft_model()
    export_hf(pm, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(pm, tmp_path / "out")


def test_unknown_converter_lists_known_ones(tmp_path):
    with pytest.raises(KeyError, match=r"unknown converter 'nope'; known converters: .*causal_lm.*sa2va"):
        export_hf(tiny_qwen2(), tmp_path / "out", converter="nope")


def test_auto_detection_failure_names_the_class(tmp_path):
    with pytest.raises(ConversionError,
                       match=r"no converter matches a model of class torch\.nn\.modules\.linear\.Linear"):
        export_hf(torch.nn.Linear(2, 2), tmp_path / "out")


def test_gamma_key_is_refused_unless_a_rule_maps_it(tmp_path):
    model = tiny_qwen2()
    model.model.norm.gamma = torch.nn.Parameter(torch.ones(32))
    with pytest.raises(ConversionError, match=r"silently renames.*model\.norm\.gamma"):
        export_hf(model, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_unmapped_key_is_an_error_not_a_silent_drop(tmp_path):
    @CONVERTERS.register_module(name="test_partial", force=True)
    class Partial(Converter):
        name = "test_partial"
        key_rules = ((r"^model\.", "model."),)

        @classmethod
        def matches(cls, model):
            return False

    with pytest.raises(ConversionError, match=r"1 key\(s\) match no rule of converter 'test_partial': lm_head\.weight"):
        export_hf(tiny_qwen2(), tmp_path / "out", converter="test_partial")


def test_parameter_modified_during_export_blocks_publication(tmp_path, monkeypatch):
    """Simulates a training step on another thread while the export reads the model."""
    import sa2va_hooks.core.finish as ex
    from sa2va_hooks.core.snapshot import ModelChangedError
    pm = _peft_model()
    real = ex.write_index

    def write_then_train(*args, **kwargs):
        real(*args, **kwargs)
        with torch.no_grad():
            pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(1.0)

    monkeypatch.setattr(ex, "write_index", write_then_train)
    with pytest.raises(ModelChangedError, match=r"modified in place while the export was reading.*q_proj\.lora_B"):
        export_hf(pm, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_the_staged_snapshot_goes_through_verify_before_publishing(tmp_path, monkeypatch):
    """An index that disagrees with the shards (here: a wrong total_size written by a faulty
    writer) is found by verify's own checks on the staged snapshot, and nothing is published."""
    import sa2va_hooks.core.finish as ex
    from sa2va_hooks.core import writer
    real = writer.write_index

    def wrong_total(staging, plan):
        real(staging, plan)
        index = json.loads((staging / INDEX_FILE).read_text())
        index["metadata"]["total_size"] += 2
        (staging / INDEX_FILE).write_text(json.dumps(index))

    monkeypatch.setattr(ex, "write_index", wrong_total)
    with pytest.raises(ex.ExportVerificationError, match=r"fails verify before publishing .*\n"
                                                         r"mismatch index total_size: expected \d+, got \d+"):
        export_hf(_peft_model(), tmp_path / "out", max_shard_size="10KB")
    assert not list(tmp_path.iterdir())
