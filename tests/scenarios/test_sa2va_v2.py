"""Sa2VA codebase v2 (bytedance/Sa2VA ``projects/sa2va``), every family of its model zoo, on
v2-shaped stand-ins with fresh random weights (sa2va_demo/v2): InternVL (InternVL2.5/InternVL3),
Qwen2.5-VL and Qwen3-VL, the LoRA wrapping the whole VL model for the Qwen ones.

The reference is Sa2VA's own procedure (tools/convert_to_hf.py), recomputed here independently:
PEFT's ``merge_and_unload`` on a copy, ``nn.Module.state_dict``, the official renames
(``mllm.`` or ``mllm.model.`` dropped, ``.gamma`` -> ``.g_weight``). Each export must hold exactly
those tensors, load with ``from_pretrained`` with 0 missing / unexpected / mismatched keys, give the
same logits, and carry the config fields that procedure sets.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import train_like
from sa2va_hooks import export_hf
from sa2va_hooks.converters.base import ConversionError, converter_for_run
from sa2va_hooks.converters.helpers import MACHINE_SETTINGS
from sa2va_demo.v2.training import FAMILIES, HF_CODE, TEMPLATE, Sa2VAModelV2, qwen3_vl_available

CONVERTER = {"internvl": "sa2va", "qwen2_5_vl": "sa2va_qwen", "qwen3_vl": "sa2va_qwen"}
OFFICIAL_AUTO_MAP = {
    "internvl": {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
                 "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
                 "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel"},
    "qwen": {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
             "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
             "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen"},
}


def family_or_skip(family: str) -> None:
    import transformers
    if family == "qwen3_vl" and not qwen3_vl_available():
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL (Sa2VA trains it on `latest`, 4.57)")
    if family == "qwen2_5_vl" and not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen2.5-VL")


def build(family: str, root: Path) -> Sa2VAModelV2:
    family_or_skip(family)
    torch.manual_seed(0)
    model = Sa2VAModelV2(family, str(root))
    train_like(model, seed=3)
    return model


def official_reference(model: Sa2VAModelV2) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Sa2VA's convert_to_hf.py, step by step, on a copy: merge, full state dict, renames."""
    ref = copy.deepcopy(model)
    if ref.arch_type == "qwen":
        ref.mllm.model = ref.mllm.model.merge_and_unload()
        prefix = "mllm."
    else:
        ref.mllm.model.language_model = ref.mllm.model.language_model.merge_and_unload()
        prefix = "mllm.model."
    full = nn.Module.state_dict(ref)  # all_state_dict(): the override saves only trainable parts
    renamed = {k.replace(prefix, "", 1).replace(".gamma", ".g_weight"): v for k, v in full.items()}
    return ref, renamed


def written(snapshot: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(snapshot.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def all_keys(d: dict, where: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(where + k)
        if isinstance(v, dict):
            keys += all_keys(v, f"{where}{k}.")
    return keys


@pytest.mark.parametrize("family", FAMILIES)
def test_v2_family_export_equals_the_official_procedure_and_loads_0_0_0(family, tmp_path):
    from transformers import AutoModel, AutoTokenizer
    model = build(family, tmp_path)
    conv = converter_for_run(dict(type="auto", hf_code_dir=str(HF_CODE[family])), model, template=TEMPLATE)
    assert conv.name == CONVERTER[family]  # selected by structure, the family by the base config's model_type
    out = tmp_path / "hf"
    manifest = export_hf(model, out, converter=conv)

    ref, expected = official_reference(model)
    got = written(out)
    assert sorted(got) == sorted(expected)
    unequal = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not unequal, unequal[:10]

    hf, info = AutoModel.from_pretrained(str(out), trust_remote_code=True, output_loading_info=True)
    assert [list(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")] == [[], [], []]
    ids = torch.tensor([[5, 9, 14, 3, 64]])
    with torch.no_grad():
        if family == "internvl":
            live, loaded = ref.mllm.model.language_model(input_ids=ids).logits, hf.language_model(input_ids=ids).logits
        else:
            live, loaded = ref.mllm.model(input_ids=ids).logits, hf.model(input_ids=ids).logits
    torch.testing.assert_close(loaded, live, rtol=0, atol=1e-5)

    cfg = json.loads((out / "config.json").read_text())
    sub = cfg["llm_config"] if family == "internvl" else cfg.get("text_config", cfg)  # top level before 4.51
    assert cfg["model_type"] == "sa2va_chat"
    assert cfg["auto_map"] == OFFICIAL_AUTO_MAP["internvl" if family == "internvl" else "qwen"]
    assert cfg["template"] == TEMPLATE  # the run's, not the base config's internvl2_5
    embed = [v for k, v in got.items() if k.endswith("embed_tokens.weight")]
    assert len(embed) == 1 and sub["vocab_size"] == len(model.mllm.tokenizer) == embed[0].shape[0]
    assert cfg["tie_word_embeddings"] is False and sub["tie_word_embeddings"] is False
    assert not [k for k in all_keys(cfg) if k.rsplit(".", 1)[-1] in MACHINE_SETTINGS]
    declared = {cfg.get("dtype"), cfg.get("torch_dtype")} - {None}
    assert declared == {"float32"} and {t.dtype for t in got.values()} == {torch.float32}
    tok = AutoTokenizer.from_pretrained(str(out))
    assert "[SEG]" in tok.get_vocab()  # the model's tokenizer (mllm.tokenizer), not the base one
    if family != "internvl":
        assert (out / "preprocessor_config.json").is_file()  # the processor, as v2 saves it for Qwen
    tie_note = [n for n in manifest.notes if "tie_word_embeddings set to False" in n]
    assert bool(tie_note) == (family == "qwen2_5_vl")  # only the Qwen2.5-VL stand-in (like the 3B) was tied


def test_internvl_base_attention_setting_is_not_written(tmp_path):
    """InternVL's config carries the attention kernel of the machine it was saved on."""
    model = build("internvl", tmp_path)
    base = tmp_path / "base_internvl" / "config.json"
    cfg = json.loads(base.read_text())
    cfg["llm_config"]["attn_implementation"] = "flash_attention_2"
    base.write_text(json.dumps(cfg))
    manifest = export_hf(model, tmp_path / "hf", converter=dict(type="sa2va", hf_code_dir=str(HF_CODE["internvl"]),
                                                               template=TEMPLATE))
    written_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "attn_implementation" not in written_cfg["llm_config"]
    assert any("llm_config.attn_implementation='flash_attention_2'" in n for n in manifest.notes)


@pytest.mark.parametrize("family", FAMILIES)
def test_v2_without_hf_code_dir_is_refused_naming_the_family_folder(family, tmp_path):
    model = build(family, tmp_path)
    folder = {"internvl": "projects/sa2va/hf/models", "qwen2_5_vl": "projects/sa2va/hf/models_qwen2_5_vl",
              "qwen3_vl": "projects/sa2va/hf/models_qwen3vl"}[family]
    with pytest.raises(ConversionError, match=rf"nothing was written\):\n- converter '{CONVERTER[family]}' writes a "
                                              rf"config.json whose auto_map .* hf_code_dir='<your Sa2VA checkout>/"
                                              rf"{folder}'\)"):
        export_hf(model, tmp_path / "hf", converter=dict(type="auto", template=TEMPLATE))
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf*"))


def test_qwen_code_of_the_other_family_is_refused(tmp_path):
    family_or_skip("qwen3_vl")
    model = build("qwen3_vl", tmp_path)
    with pytest.raises(ConversionError, match=r"is the HF code of Qwen2\.5-VL \(configuration_sa2va_chat\."
                                              r"Sa2VAChatConfigQwen derives from Qwen2_5_VLConfig\), but the model is "
                                              r"Qwen3-VL \(model_type 'qwen3_vl'\); pass hf_code_dir='<your Sa2VA "
                                              r"checkout>/projects/sa2va/hf/models_qwen3vl'"):
        converter_for_run(dict(type="auto", hf_code_dir=str(HF_CODE["qwen2_5_vl"])), model, template=TEMPLATE)


def test_a_base_tokenizer_given_explicitly_is_refused_with_advice_naming_tokenizer(tmp_path):
    model = build("internvl", tmp_path)
    base_tok = str(tmp_path / "base_internvl")  # what every Sa2VA config's top-level `tokenizer` loads
    with pytest.raises(ConversionError, match=r"the tokenizer \(given\) lacks \['\[SEG\]'\], which the model's code "
                                              r"looks up; remove tokenizer= from HFExportHook so that the model's own "
                                              r"tokenizer is used"):
        converter_for_run(dict(type="auto", hf_code_dir=str(HF_CODE["internvl"]), tokenizer=base_tok), model,
                          template=TEMPLATE)


def test_the_models_tokenizer_wins_over_the_configs_top_level_one(tmp_path):
    from transformers import AutoTokenizer
    model = build("internvl", tmp_path)
    built = []

    def config_tokenizer():  # the config's top-level base tokenizer, built only if needed
        built.append(1)
        return AutoTokenizer.from_pretrained(str(tmp_path / "base_internvl"))

    conv = converter_for_run(dict(type="auto", hf_code_dir=str(HF_CODE["internvl"])), model, template=TEMPLATE,
                             tokenizer=config_tokenizer)
    tok, source = conv.find_tokenizer(model)
    assert source == "the model's" and tok is model.mllm.tokenizer and not built
    model.mllm.tokenizer = None  # a model without one: the config's is the last resort, and it lacks [SEG]
    with pytest.raises(ConversionError, match=r"the tokenizer \(the config's top-level\) lacks \['\[SEG\]'\].*pass "
                                              r"tokenizer="):
        converter_for_run(dict(type="auto", hf_code_dir=str(HF_CODE["internvl"])), model, template=TEMPLATE,
                          tokenizer=config_tokenizer)
    assert built


def test_v2_without_a_template_names_the_base_configs_and_the_option(tmp_path):
    """v2's Sa2VAModel.template is None; without the run's template the base config's internvl2_5 (which
    the remote code does not know) would be written: refused before any write, saying what to set."""
    model = build("internvl", tmp_path)
    with pytest.raises(ConversionError, match=r"template 'internvl2_5' is not one Sa2VA's HF code knows .*"
                                              r"set the config's top-level template"):
        export_hf(model, tmp_path / "hf", converter=dict(type="auto", hf_code_dir=str(HF_CODE["internvl"])))
    assert not (tmp_path / "hf").exists()


def test_dtype_none_declares_the_written_dtype_not_the_base_configs(tmp_path):
    family_or_skip("qwen2_5_vl")
    model = build("qwen2_5_vl", tmp_path)
    base_cfg = model.mllm.model.get_base_model().config
    base_cfg.torch_dtype = torch.bfloat16  # the hub's Qwen2.5-VL says bfloat16; v2 trains it in fp32
    base = tmp_path / "base_qwen2_5_vl" / "config.json"
    cfg = json.loads(base.read_text())
    cfg["torch_dtype"] = "bfloat16"
    if "text_config" in cfg:  # transformers >= 4.51
        cfg["text_config"]["torch_dtype"] = "bfloat16"
    base.write_text(json.dumps(cfg))
    export_hf(model, tmp_path / "hf", converter=dict(type="auto", hf_code_dir=str(HF_CODE["qwen2_5_vl"]),
                                                     template=TEMPLATE))
    out = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {t.dtype for t in written(tmp_path / "hf").values()} == {torch.float32}
    for where in (out, out.get("text_config", out)):
        assert {where.get("dtype"), where.get("torch_dtype")} - {None} == {"float32"}


V2_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sa2va_v2_tiny.py"


def v2_run_config(family: str, work: Path, *, hf_code_dir: str | None):
    """configs/sa2va_v2_tiny.py as a user's v2 config with the README's lines, for ``family``."""
    import uuid

    from mmengine.config import Config
    cfg = Config.fromfile(str(V2_CONFIG))
    cfg.work_dir = str(work / "wd")
    cfg.experiment_name = f"sa2va_v2_{uuid.uuid4().hex[:12]}"
    cfg.model.family, cfg.model.root = family, str(work)
    converter = {"type": "auto"} | ({"hf_code_dir": hf_code_dir} if hf_code_dir else {})
    cfg.custom_hooks[1]["converter"] = converter
    return cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_v2_in_loop_exports_verify_follow_max_keep_ckpts_and_equal_the_offline_export(family, tmp_path):
    """A real Runner over the v2 stand-in config (max_keep_ckpts=2, a top-level base tokenizer and
    template, the hook given only hf_code_dir), then tools/export.py on the last checkpoint."""
    from mmengine.runner import Runner

    from sa2va_hooks.core.manifest import ExportManifest
    from sa2va_hooks.core.verify import verify_snapshot
    from sa2va_hooks.offline import export_checkpoint
    family_or_skip(family)
    cfg = v2_run_config(family, tmp_path, hf_code_dir=str(HF_CODE[family]))
    cfg.train_cfg.max_iters = 6
    Runner.from_cfg(cfg).train()
    wd = tmp_path / "wd"
    assert sorted(p.name for p in (wd / "hf").iterdir()) == ["iter_4", "iter_6"]  # as max_keep_ckpts=2
    assert sorted(p.name for p in wd.glob("iter_*.pth*")) == [
        "iter_4.pth", "iter_4.pth.fingerprints.json", "iter_6.pth", "iter_6.pth.fingerprints.json"]
    for it in (4, 6):
        assert verify_snapshot(wd / "hf" / f"iter_{it}") == []
    in_loop = ExportManifest.load(wd / "hf" / "iter_6")
    assert in_loop.converter == CONVERTER[family]
    cfg_json = json.loads((wd / "hf" / "iter_6" / "config.json").read_text())
    assert cfg_json["template"] == TEMPLATE and cfg_json["model_type"] == "sa2va_chat"

    res = export_checkpoint(V2_CONFIG, wd / "iter_6.pth", tmp_path / "offline",
                            cfg_options={"model.family": family, "model.root": str(tmp_path)},
                            hf_code_dir=str(HF_CODE[family]), log=lambda m: None)
    assert res.manifest.root_digest == in_loop.root_digest
    assert res.manifest.converter == in_loop.converter


def test_v2_hook_without_hf_code_dir_stops_the_run_before_the_first_iteration(tmp_path):
    from mmengine.runner import Runner
    family_or_skip("qwen2_5_vl")
    runner = Runner.from_cfg(v2_run_config("qwen2_5_vl", tmp_path, hf_code_dir=None))
    with pytest.raises(ConversionError,
                       match=r"hf_code_dir='<your Sa2VA checkout>/projects/sa2va/hf/models_qwen2_5_vl'"):
        runner.train()
    assert runner.iter == 0 and not list((tmp_path / "wd").glob("iter_*")) and not (tmp_path / "wd" / "hf").exists()


def test_v2_offline_export_without_hf_code_dir_is_refused_before_anything_is_written(tmp_path):
    """The run's config names no hf_code_dir (the hook fell back to "auto"): tools/export.py refuses
    right after building the model, naming --hf-code-dir's value; --out is never created."""
    import shutil
    import subprocess
    import sys
    family_or_skip("qwen2_5_vl")
    from mmengine.runner import Runner
    cfg = v2_run_config("qwen2_5_vl", tmp_path, hf_code_dir=str(HF_CODE["qwen2_5_vl"]))
    cfg.train_cfg.max_iters = 2
    Runner.from_cfg(cfg).train()
    plain = tmp_path / "plain_config.py"
    text = V2_CONFIG.read_text().replace('converter=dict(type="auto", hf_code_dir=hf_code_dir)', 'converter="auto"')
    assert text != V2_CONFIG.read_text()
    plain.write_text(text)
    shutil.copytree(V2_CONFIG.parent / "_base_", tmp_path / "_base_")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "tools" / "export.py"), str(plain),
                           str(tmp_path / "wd" / "iter_2.pth"), "--out", str(tmp_path / "offline"), "--cfg-options",
                           "model.family=qwen2_5_vl", f"model.root={tmp_path}"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "hf_code_dir='<your Sa2VA checkout>/projects/sa2va/hf/models_qwen2_5_vl'" in proc.stderr, proc.stderr
    assert not (tmp_path / "offline").exists()


def test_the_converter_check_runs_once_per_model_not_at_every_export(tmp_path):
    """Checked in before_train (converter_for_run); later exports, which plan in the training thread,
    do not read the tokenizer and the remote code again."""
    model = build("internvl", tmp_path)
    conv = converter_for_run(dict(type="auto", hf_code_dir=str(HF_CODE["internvl"])), model, template=TEMPLATE)
    calls = []
    real = conv.check_ready
    conv.check_ready = lambda m: (calls.append(m), real(m))
    for it in (1, 2):
        export_hf(model, tmp_path / f"iter_{it}", converter=conv)
    assert calls == []
    other = build("internvl", tmp_path / "other")
    with pytest.raises(ConversionError, match=r"\[SEG\]"):  # another model is checked afresh
        other.mllm.tokenizer = None
        conv.tokenizer = str(tmp_path / "base_internvl")
        export_hf(other, tmp_path / "other_out", converter=conv)
    assert len(calls) == 1
