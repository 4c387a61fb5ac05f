"""Strict offline re-export (tools/export.py) and the verify/diff/fingerprint commands, each on a
real scenario built from real Runner trainings of the tiny Sa2VA-shaped model."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sa2va_hooks.cli import main as cli
from sa2va_hooks.compat import allow_mmengine_checkpoint_globals
from sa2va_hooks.core.manifest import ExportManifest
from sa2va_demo.runs import DEMO_CONFIG, train_tiny
from sa2va_hooks.offline import (CheckpointMismatchError, FingerprintMismatchError, PretrainedMostlyUnusedError,
                                 export_checkpoint)

ROOT = Path(__file__).resolve().parents[2]


def _opts(base: Path, **more) -> dict:
    return {"model.base_dir": str(base), "train_dataloader.dataset.base_dir": str(base), **more}


def _load(path: Path) -> dict:
    allow_mmengine_checkpoint_globals()
    return torch.load(path, map_location="cpu", weights_only=True)


def _offline(ckpt, out, base, **kw):
    return export_checkpoint(DEMO_CONFIG, ckpt, out, dtype="bf16", cfg_options=_opts(base, **kw.pop("opts", {})),
                             log=lambda m: None, **kw)


@pytest.mark.parametrize("it", [3, 6])
def test_offline_digest_equals_in_loop_digest(trained_run, tiny_base, tmp_path, it):
    _, work = trained_run
    res = _offline(work / f"iter_{it}.pth", tmp_path / "off", tiny_base)
    inloop = ExportManifest.load(work / "hf" / f"iter_{it}")
    assert res.manifest.root_digest == inloop.root_digest
    assert res.manifest.files == inloop.files  # config.json, remote code, tokenizer: byte for byte
    assert res.report["verification"]["checked"] is True
    # the offline manifest knows the baseline from the checkpoint's message_hub, as the hook did
    assert res.manifest.training_effect == inloop.training_effect
    assert cli(["verify", str(tmp_path / "off"), "--checkpoint", str(work / f"iter_{it}.pth")]) == 0


def test_field_case_two_trainings_with_pretrained_pth(trained_run, tiny_base, tmp_path, capsys):
    """Two trainings from the same pretrained_pth with different seeds and data: the offline
    exports differ exactly in the trained tensors and diff names them; frozen tensors agree."""
    _, work0 = trained_run
    pretrained = tmp_path / "stage1.pth"
    torch.save({"state_dict": _load(work0 / "iter_3.pth")["state_dict"]}, pretrained)
    exports = []
    for seed in (1, 2):
        work = tmp_path / f"run{seed}"
        runner = train_tiny(work, tiny_base, seed=seed, data_seed=seed, hooks=[dict(type="FingerprintHook")])
        assert runner.iter == 6
        res = _offline(work / "iter_6.pth", tmp_path / f"off{seed}", tiny_base,
                       opts={"model.pretrained_pth": str(pretrained)})
        assert res.report["pretrained_pth"]["loaded"] == 38 and res.report["pretrained_pth"]["unused"] == 0
        exports.append(res.manifest)
    a, b = exports
    trained = {n for n, t in a.tensors.items() if t["role"] != "frozen"}
    differ = {n for n in a.tensors if a.tensors[n]["digest"] != b.tensors[n]["digest"]}
    assert differ == trained and len(trained) == 24
    capsys.readouterr()
    rc = cli(["diff", str(tmp_path / "off1"), str(tmp_path / "off2"), "--png", str(tmp_path / "d.png")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "A and B differ in 24 of 24 trained tensors; 26 frozen tensors identical" in out
    for name in sorted(trained):
        assert re.search(rf"^differs\s+{re.escape(name)}:", out, re.M), name
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_peft_style_and_ddp_prefixed_keys_are_mapped_and_reported(trained_run, tiny_base, tmp_path):
    _, work = trained_run
    ckpt = _load(work / "iter_6.pth")
    renamed = {}
    for k, v in ckpt["state_dict"].items():
        k2 = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k).replace(".modules_to_save.default.", ".")
        renamed["module." + k2] = v
    assert set(renamed) != {"module." + k for k in ckpt["state_dict"]}
    ckpt["state_dict"] = renamed
    torch.save(ckpt, tmp_path / "peft_style.pth")
    res = _offline(tmp_path / "peft_style.pth", tmp_path / "off", tiny_base)
    assert res.manifest.root_digest == ExportManifest.load(work / "hf" / "iter_6").root_digest
    fixes = res.manifest.provenance["offline"]["key_fixes"]
    assert fixes["DDP 'module.' prefix removed"]["count"] == 38
    assert fixes["PEFT-style key without the adapter name mapped to the adapter's parameter"]["count"] == 30


def _broken_checkpoint(work: Path, tmp_path: Path, edit) -> Path:
    ckpt = _load(work / "iter_6.pth")
    edit(ckpt["state_dict"])
    path = tmp_path / "broken.pth"
    torch.save(ckpt, path)
    return path


def test_missing_trainable_parameter_is_an_error(trained_run, tiny_base, tmp_path):
    _, work = trained_run
    path = _broken_checkpoint(work, tmp_path, lambda sd: sd.pop("text_hidden_fcs.0.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"1 parameter\(s\) trainable in the built model are not in the "
                                                      r"checkpoint: text_hidden_fcs\.0\.weight"):
        _offline(path, tmp_path / "off", tiny_base)
    assert not (tmp_path / "off").exists()


def test_shape_mismatch_names_the_key_and_both_shapes(trained_run, tiny_base, tmp_path):
    _, work = trained_run
    path = _broken_checkpoint(work, tmp_path, lambda sd: sd.update({"text_hidden_fcs.2.weight": torch.randn(32, 32)}))
    with pytest.raises(CheckpointMismatchError, match=r"text_hidden_fcs\.2\.weight: checkpoint \[32, 32\] vs model "
                                                      r"\[16, 32\]"):
        _offline(path, tmp_path / "off", tiny_base)


def test_different_lora_rank_is_named_as_the_cause(trained_run, tiny_base, tmp_path):
    _, work = trained_run
    with pytest.raises(CheckpointMismatchError, match=r"(?s)lora_A\.default\.weight: checkpoint \[8, 32\] vs model "
                                                      r"\[4, 32\].*different LoRA rank"):
        _offline(work / "iter_6.pth", tmp_path / "off", tiny_base, opts={"model.lora_r": 4})


def test_unknown_keys_are_an_error_not_a_silent_drop(trained_run, tiny_base, tmp_path):
    _, work = trained_run
    path = _broken_checkpoint(work, tmp_path, lambda sd: sd.update(
        {"mllm.model.vision_model.fc.lora_A.default.weight": torch.zeros(8, 24)}))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)1 checkpoint key\(s\) match no model key: "
                                                      r"mllm\.model\.vision_model\.fc\.lora_A.*different LoRA targets"):
        _offline(path, tmp_path / "off", tiny_base)


def test_pretrained_pth_mostly_skipped_is_loud(trained_run, tiny_base, tmp_path):
    _, work = trained_run
    # written for a bigger model: trainable heads fit, everything else has other shapes or names
    state = {k: v for k, v in _load(work / "iter_3.pth")["state_dict"].items() if k.startswith("text_hidden_fcs")}
    state.update({f"mllm.model.language_model.base_model.model.model.layers.{i}.mlp.up_proj.base_layer.weight":
                  torch.zeros(128, 64) for i in range(2)})
    state.update({f"mllm.model.language_model.base_model.model.model.layers.{i}.mlp.up_proj.base_layer.weight_x":
                  torch.zeros(1) for i in range(2, 40)})
    bad = tmp_path / "bigger_model.pth"
    torch.save({"state_dict": state}, bad)
    logged: list[str] = []
    res = export_checkpoint(DEMO_CONFIG, work / "iter_6.pth", tmp_path / "off", dtype="bf16",
                            cfg_options=_opts(tiny_base, **{"model.pretrained_pth": str(bad)}), log=logged.append)
    rep = res.report["pretrained_pth"]
    assert (rep["total"], rep["loaded"], rep["skipped_for_shape"], rep["unused"]) == (44, 4, 2, 38)
    assert any("!!!" in m and "91% of its 44 keys did NOT load" in m for m in logged)
    assert ExportManifest.load(tmp_path / "off").provenance["offline"]["pretrained_pth"]["unused"] == 38
    with pytest.raises(PretrainedMostlyUnusedError, match="--strict-pretrained"):
        export_checkpoint(DEMO_CONFIG, work / "iter_6.pth", tmp_path / "off2", strict_pretrained=True,
                          cfg_options=_opts(tiny_base, **{"model.pretrained_pth": str(bad)}), log=logged.append)


def test_changed_base_directory_is_a_fingerprint_mismatch(trained_run, tiny_base, tmp_path):
    _, work = trained_run
    changed = tmp_path / "changed_base"
    shutil.copytree(tiny_base, changed)
    weights = load_file(changed / "model.safetensors")
    weights["vision_model.fc.weight"] = weights["vision_model.fc.weight"] + 1e-3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FingerprintMismatchError, match=r"(?s)mismatch frozen root digest.*base model directory"):
        _offline(work / "iter_6.pth", tmp_path / "off", changed)
    res = _offline(work / "iter_6.pth", tmp_path / "off", changed, verify=False)
    assert res.manifest.provenance["offline"]["verification"] == {"checked": False, "reason": "--no-verify given"}


def test_trained_tensor_mismatch_names_the_tensor(trained_run, tiny_base, tmp_path):
    _, work = trained_run
    path = _broken_checkpoint(work, tmp_path, lambda sd: sd["text_hidden_fcs.0.bias"].add_(1.0))
    with pytest.raises(FingerprintMismatchError, match=r"mismatch text_hidden_fcs\.0\.bias: expected [0-9a-f]{32}, "
                                                       r"got [0-9a-f]{32}"):
        _offline(path, tmp_path / "off", tiny_base)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pickle_that_runs_code_is_refused(trained_run, tiny_base, tmp_path):
    _, work = trained_run
    marker = tmp_path / "code_ran"
    ckpt = _load(work / "iter_6.pth")
    ckpt["payload"] = _Payload(str(marker))
    torch.save(ckpt, tmp_path / "evil.pth")
    cmd = [sys.executable, str(ROOT / "tools" / "export.py"), str(DEMO_CONFIG), str(tmp_path / "evil.pth"),
           "--out", str(tmp_path / "off"), "--cfg-options", f"model.base_dir={tiny_base}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "builtins.exec" in proc.stderr and "nothing in it was run" in proc.stderr and "--allow-pickle" in proc.stderr
    assert not marker.exists() and not (tmp_path / "off").exists()
    # the opt-in really loads it (and so the check above could have failed)
    proc = subprocess.run(cmd + ["--allow-pickle", "--json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.exists()
    assert json.loads(proc.stdout)["report"]["allow_pickle"] is True
    assert ExportManifest.load(tmp_path / "off").provenance["offline"]["allow_pickle"] is True


def test_verify_with_the_wrong_checkpoint_fails(trained_run, capsys):
    _, work = trained_run
    assert cli(["verify", str(work / "hf" / "iter_6"), "--checkpoint", str(work / "iter_3.pth")]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^mismatch text_hidden_fcs\.0\.weight: expected [0-9a-f]{32}, got [0-9a-f]{32}", out, re.M)


def test_fingerprint_command_on_checkpoint_sidecar_and_snapshot(trained_run, capsys):
    _, work = trained_run
    recorded = _load(work / "iter_6.pth")["meta"]["sa2va_hooks"]["trained"]["root"]
    outs = []
    for p in (work / "iter_6.pth", work / "iter_6.pth.fingerprints.json", work / "hf" / "iter_6"):
        assert cli(["fingerprint", str(p), "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    ckpt, sidecar, snap = outs
    assert ckpt["root"] == ckpt["recorded_root"] == sidecar["root"] == snap["trained_root"] == recorded
    assert ckpt["consistent"] and sidecar["consistent"] and snap["consistent"]
    assert snap["root"] == ExportManifest.load(work / "hf" / "iter_6").root_digest


def test_a_deepspeed_directory_without_its_files_says_what_it_lacks(tmp_path, monkeypatch):
    """Reading a DeepSpeed directory needs no DeepSpeed (issue 19: our own consolidation); an empty one
    is named, with what it should hold."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if DeepSpeed were absent
    (tmp_path / "iter_6.pth").mkdir()
    with pytest.raises(ValueError, match=r"iter_6\.pth holds no DeepSpeed optimizer files .*found no \*\.pt file.*"
                                         r"pass a complete ZeRO checkpoint directory"):
        export_checkpoint(DEMO_CONFIG, tmp_path / "iter_6.pth", tmp_path / "off", log=lambda m: None)
    assert not (tmp_path / "off").exists()
