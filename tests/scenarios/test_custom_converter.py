"""Registering a converter of one's own from a training config (custom_imports + CONVERTERS)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModel

from sa2va_hooks.core.manifest import ExportManifest
from sa2va_demo.runs import DEMO_CONFIG, train_tiny

USER_CONFIG = """
_base_ = [{base!r}]
custom_imports = dict(imports=["sa2va_hooks", "sa2va_demo.tiny_sa2va", "my_converter"],
                      allow_failed_imports=False)
custom_hooks = [dict(type="HFExportHook", converter=dict(type="my_sa2va", hf_code_dir={code!r}))]
"""
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_converter_registered_from_config_is_used_by_the_hook(tiny_base, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ASSETS))
    sys.modules.pop("my_converter", None)
    config = tmp_path / "user_config.py"
    code = tmp_path / "code"
    shutil.copytree(Path(DEMO_CONFIG).parents[1] / "sa2va_demo" / "hf_code", code,
                    ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    shutil.copy(ASSETS / "my_hf_code" / "modeling_my_sa2va.py", code)
    config.write_text(USER_CONFIG.format(base=str(DEMO_CONFIG), code=str(code)))
    runner = train_tiny(tmp_path / "work", tiny_base, max_iters=3, save_interval=3, config_file=config)
    assert runner.iter == 3
    m = ExportManifest.load(tmp_path / "work" / "hf" / "iter_3")
    assert m.converter == "my_sa2va"
    assert "seg_projector.0.weight" in m.tensors and not any(k.startswith("text_hidden_fcs") for k in m.tensors)
    assert m.tensors["seg_projector.0.weight"]["sources"] == ["text_hidden_fcs.0.weight"]
    # the in-house class loads it: the head under its own name, equal to the trained one
    hf = AutoModel.from_pretrained(tmp_path / "work" / "hf" / "iter_3", trust_remote_code=True,
                                   torch_dtype=torch.float32)
    assert type(hf).__name__ == "MySa2VAChatModel"
    live = runner.model.text_hidden_fcs[0].weight.detach()
    assert torch.equal(hf.seg_projector[0].weight, live.to(hf.seg_projector[0].weight.dtype))
