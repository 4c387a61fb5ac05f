"""A verified snapshot loads: the meta-device build of the written config (remote code included)
against the written tensors, before publishing; and Sa2VA's tied lm_head, template and model_type."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from conftest import snapshot_tensors, tiny_qwen2, train_like
from sa2va_hooks import export_hf
from sa2va_hooks.converters.base import ConversionError
from sa2va_hooks.core.loadcheck import SnapshotLoadError, check_snapshot_loads
from sa2va_hooks.core.manifest import ExportManifest
from sa2va_demo.tiny_sa2va import TinySa2VA, TinySa2VAConverter, make_tiny_base


def _tensors(snap) -> dict:
    return ExportManifest.load(snap).tensors


@pytest.fixture(scope="module")
def tied_sa2va(tmp_path_factory):
    """A Sa2VA whose LLM ties lm_head to embed_tokens and trains neither (LoRA only), as Sa2VA-1B
    (Qwen2.5-0.5B) does: the live model has one tensor where the HF class has two."""
    base = make_tiny_base(tmp_path_factory.mktemp("tied_base"), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = TinySa2VA(str(base), modules_to_save=None)
    train_like(model.mllm.model.language_model, scale=0.2)
    llm = model.mllm.model.language_model.get_base_model()
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    return model.eval()


def test_tied_sa2va_writes_lm_head_and_unties(tied_sa2va, tmp_path):
    m = export_hf(tied_sa2va, tmp_path / "out", converter="tiny_sa2va")
    files = snapshot_tensors(tmp_path / "out")
    assert torch.equal(files["language_model.lm_head.weight"], files["language_model.model.embed_tokens.weight"])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["llm_config"]["tie_word_embeddings"] is False and cfg["tie_word_embeddings"] is False
    assert "language_model.lm_head.weight" not in m.tied
    assert m.provenance["load_check"]["class"].endswith("TinySa2VAChatModel")
    hf, info = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True, torch_dtype=torch.float32,
                                         output_loading_info=True)
    assert not any(info.values()), info
    g = torch.Generator().manual_seed(0)
    pix, ids = torch.randn(2, 3, 16, 16, generator=g), torch.randint(4, 60, (2, 8), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(pix, ids).logits, tied_sa2va(pix, ids, mode="tensor"), atol=1e-5, rtol=0)


def test_tied_lm_head_left_out_agrees_with_from_pretrained(tied_sa2va, tmp_path, monkeypatch):
    """The snapshot the issue found: lm_head not written (copy switched off), the LLM config still
    tied. Whether that loads depends on transformers (4.x does not tie the inner LLM again through
    Sa2VA's untied outer config: lm_head stays uninitialised; 5.x ties submodules by their own
    configs). The check must say what from_pretrained does: refuse it, or pass it and then the
    reloaded model gives the live model's logits."""

    class NoCopy(TinySa2VAConverter):
        write_tied = ()

    try:
        export_hf(tied_sa2va, tmp_path / "out", converter=NoCopy())
    except SnapshotLoadError as e:
        assert re.search(r"language_model\.lm_head\.weight: the class has it, the snapshot does not, and loading "
                         r"does not tie it", str(e)), e
        assert not list(tmp_path.iterdir())  # nothing published
        # independent: the snapshot written without the check, loaded as Sa2VA's model card loads it
        # (low_cpu_mem_usage=True: fresh tensors for the loaded keys), has an lm_head that is not embed_tokens
        import sa2va_hooks.core.finish as ex
        monkeypatch.setattr(ex, "check_snapshot_loads", lambda *a, **k: {})
        export_hf(tied_sa2va, tmp_path / "unchecked", converter=NoCopy())
        hf = AutoModel.from_pretrained(tmp_path / "unchecked", trust_remote_code=True, torch_dtype=torch.float32,
                                       low_cpu_mem_usage=True)
        head, emb = hf.language_model.lm_head.weight, hf.language_model.model.embed_tokens.weight
        assert head.data_ptr() != emb.data_ptr()
        assert head.device.type == "meta" or not torch.equal(head, emb)
        return
    hf = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    pix, ids = torch.randn(2, 3, 16, 16, generator=g), torch.randint(4, 60, (2, 8), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(pix, ids).logits, tied_sa2va(pix, ids, mode="tensor"), atol=1e-5, rtol=0)


def test_unknown_template_is_refused_listing_the_known_ones(tied_sa2va, tmp_path):
    """Refused before a byte is written (read from the remote code's table without running it), and
    the load check, run on a written snapshot whose config names it, refuses it too."""
    with pytest.raises(ConversionError,
                       match=r"nothing was written\):\n- template 'internvl2_5' is not one Sa2VA's HF "
                             r"code knows \(templates\.PROMPT_TEMPLATE in .*internlm2_chat, qwen_chat, "
                             r"tiny_chat\); set the config's top-level template"):
        export_hf(tied_sa2va, tmp_path / "out", converter=dict(type="tiny_sa2va", template="internvl2_5"))
    assert not list(tmp_path.iterdir())
    manifest = export_hf(tied_sa2va, tmp_path / "ok", converter="tiny_sa2va")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "template": "internvl2_5"}))
    with pytest.raises(SnapshotLoadError,
                       match=r"template 'internvl2_5' is not one the remote code knows "
                             r"\(templates\.PROMPT_TEMPLATE\): internlm2_chat, qwen_chat, tiny_chat"):
        check_snapshot_loads(tmp_path / "ok", manifest.tensors, template_table="templates.PROMPT_TEMPLATE")


def test_the_refused_template_really_does_not_load(tied_sa2va, tmp_path):
    """Independent of the check: the remote code itself fails on that config."""
    export_hf(tied_sa2va, tmp_path / "ok", converter="tiny_sa2va")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["template"] = "internvl2_5"
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    cls = get_class_from_dynamic_module(cfg["auto_map"]["AutoModel"], str(tmp_path / "ok"))
    with pytest.raises(KeyError, match="internvl2_5"):
        cls(AutoConfig.from_pretrained(tmp_path / "ok", trust_remote_code=True))


def test_model_type_follows_sa2va_convention(tied_sa2va, tmp_path):
    live = tied_sa2va.mllm.model.config.to_dict() | {"model_type": "internvl_chat"}
    (tmp_path / "base.json").write_text(json.dumps(live))
    export_hf(tied_sa2va, tmp_path / "out", converter=dict(type="tiny_sa2va", base_config=str(tmp_path / "base.json")))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "sa2va_chat"
    with pytest.raises(SnapshotLoadError, match=r"model_type is 'internvl_chat', but its config class "
                                                r"TinySa2VAConfig is 'sa2va_chat'"):
        export_hf(tied_sa2va, tmp_path / "bad", converter=dict(type="tiny_sa2va", model_type="internvl_chat"))


@pytest.fixture
def causal_snapshot(tmp_path):
    model = tiny_qwen2(vocab=96)
    train_like(model)
    export_hf(model, tmp_path / "snap")
    return tmp_path / "snap"


def _rewrite_config(snap, **changes):
    cfg = json.loads((snap / "config.json").read_text())
    cfg.update(changes)
    if "num_hidden_layers" in changes and isinstance(cfg.get("layer_types"), list):  # transformers 5 validates it
        cfg["layer_types"] = [cfg["layer_types"][0]] * changes["num_hidden_layers"]
    (snap / "config.json").write_text(json.dumps(cfg))


def test_good_snapshot_passes_and_names_its_class(causal_snapshot):
    got = check_snapshot_loads(causal_snapshot, _tensors(causal_snapshot))
    assert got == {"class": "modeling_qwen2.Qwen2ForCausalLM", "tensors": len(_tensors(causal_snapshot)),
                   "template_table": None, "required_tokens": []}


@pytest.mark.parametrize("changes,message", [
    ({"num_hidden_layers": 3}, r"model\.layers\.2\.[\w.]+: the class has it, the snapshot does not"),
    ({"num_hidden_layers": 1}, r"model\.layers\.1\.[\w.]+: the snapshot has it, but Qwen2ForCausalLM has no such"),
    ({"intermediate_size": 48}, r"mlp\.down_proj\.weight: written as \[\d+, \d+\], but the class expects"),
    ({"tie_word_embeddings": True}, r"lm_head\.weight: written apart from model\.embed_tokens\.weight, but the "
                                    r"config ties them, so loading would replace it"),
    ({"architectures": ["NoSuchModel"]}, r"neither auto_map nor architectures \('NoSuchModel'\)"),
    ({"model_type": "llama"}, r"model_type 'llama' makes AutoConfig read config.json as LlamaConfig, but "
                              r"Qwen2ForCausalLM takes a Qwen2Config"),
])
def test_broken_config_fails_the_load_check(causal_snapshot, changes, message):
    _rewrite_config(causal_snapshot, **changes)
    with pytest.raises(SnapshotLoadError, match=message):
        check_snapshot_loads(causal_snapshot, _tensors(causal_snapshot))


def test_tokenizer_larger_than_the_embedding_fails(causal_snapshot, tmp_path):
    from sa2va_demo.tiny_sa2va import _tiny_tokenizer
    _tiny_tokenizer(200).save_pretrained(str(causal_snapshot))
    with pytest.raises(SnapshotLoadError, match=r"the tokenizer has 204 tokens but the input embedding has 96 rows"):
        check_snapshot_loads(causal_snapshot, _tensors(causal_snapshot))


def test_missing_remote_code_fails(tied_sa2va, tmp_path):
    export_hf(tied_sa2va, tmp_path / "ok", converter="tiny_sa2va")
    (tmp_path / "ok" / "modeling_tiny_sa2va.py").unlink()
    with pytest.raises(SnapshotLoadError, match=r"auto_map names modeling_tiny_sa2va\.TinySa2VAChatModel, which does "
                                                r"not import"):
        check_snapshot_loads(tmp_path / "ok", _tensors(tmp_path / "ok"))


def test_required_token_missing_fails(tied_sa2va, tmp_path):
    export_hf(tied_sa2va, tmp_path / "ok", converter="tiny_sa2va")
    shutil.copy(tmp_path / "ok" / "tokenizer.json", tmp_path / "tok.json")
    from sa2va_demo.tiny_sa2va import _tiny_tokenizer
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "ok" / f).unlink(missing_ok=True)
    _tiny_tokenizer(60).save_pretrained(str(tmp_path / "ok"))
    with pytest.raises(SnapshotLoadError, match=r"the tokenizer lacks \['\[SEG\]'\]"):
        check_snapshot_loads(tmp_path / "ok", _tensors(tmp_path / "ok"), required_tokens=("[SEG]",))


def test_unexpected_tensor_in_the_files_fails(causal_snapshot):
    shapes = _tensors(causal_snapshot) | {"model.extra.weight": {"shape": [2, 2], "digest": "x"}}
    with pytest.raises(SnapshotLoadError, match=r"model\.extra\.weight: the snapshot has it, but Qwen2ForCausalLM "
                                                r"has no such parameter"):
        check_snapshot_loads(causal_snapshot, shapes)


def test_the_meta_build_leaves_other_threads_parameters_alone():
    """The check runs in the export thread while training registers parameters in its own (FSDP
    writes its flat parameters back as it goes): only the checking thread's go to meta."""
    import threading

    from sa2va_hooks.core.loadcheck import _parameters_on_meta
    inside, started, release = {}, threading.Event(), threading.Event()

    def check_thread():
        with _parameters_on_meta():
            started.set()
            inside["mine"] = torch.nn.Linear(2, 2).weight.device.type
            release.wait(5)

    t = threading.Thread(target=check_thread)
    t.start()
    started.wait(5)
    other = torch.nn.Linear(2, 2).weight.device.type  # built while the other thread is inside
    release.set()
    t.join()
    assert inside["mine"] == "meta" and other == "cpu"
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_verify_load_reruns_the_check_with_the_recorded_table(tied_sa2va, tmp_path, capsys):
    from sa2va_hooks.cli import main
    export_hf(tied_sa2va, tmp_path / "ok", converter="tiny_sa2va")
    assert main(["verify", str(tmp_path / "ok"), "--load"]) == 0
    assert "it loads as modeling_tiny_sa2va.TinySa2VAChatModel" in capsys.readouterr().out
    # a template edit keeps every file check (config.json's sha256 aside) honest: make verify's
    # manifest agree, so that only the load check can see it
    cfg_path = tmp_path / "ok" / "config.json"
    cfg = json.loads(cfg_path.read_text()) | {"template": "internvl2_5"}
    cfg_path.write_text(json.dumps(cfg))
    assert main(["verify", str(tmp_path / "ok")]) == 1  # the file check sees the edit
    manifest = json.loads((tmp_path / "ok" / "export_manifest.json").read_text())
    from sa2va_hooks.core.manifest import sha256_file
    manifest["files"]["config.json"] = {"size": cfg_path.stat().st_size, "sha256": sha256_file(cfg_path)}
    (tmp_path / "ok" / "export_manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "ok"), "--load"]) == 1
    out = capsys.readouterr().out
    assert "template 'internvl2_5' is not one the remote code knows" in out and "FAILED" in out
