"""Sa2VA v2's families under xtuner's own DeepSpeed launch (ZeRO-2 and ZeRO-3, 2 gloo processes on
the CPU, ``tests/dist_launch.py`` -> ``xtuner.tools.train``): every in-loop snapshot verifies, loads
with the v2-shaped remote code with 0 missing / unexpected / mismatched keys, and holds exactly what
Sa2VA's own procedure (PEFT merge, its renames) gives for the checkpoint of the same iteration,
recomputed here on a model rebuilt from the config and loaded with that checkpoint.

Under ZeRO-3 the runs leave out v2's ``modules_to_save=['lm_head', 'embed_tokens']``: with them,
DeepSpeed 0.18.9's ZeRO-3 fails in the first forward of training itself ("'Linear' object has no
attribute 'ds_grads_remaining'", raised in its module hooks), with or without sa2va_hooks (checked
with ``custom_hooks=[]``); LoRA, the mask decoder and ``text_hidden_fcs`` still train there."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import xtuner_or_skip
from test_sa2va_v2 import FAMILIES, HF_CODE, family_or_skip, official_reference, written

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "sa2va_v2_tiny.py"
ASSETS = ROOT / "tests" / "assets"
_ports = itertools.count(29800 + os.getpid() % 150)


def _launch(work: Path, family: str, zero: str) -> str:
    extra = ["model.modules_to_save=None"] if zero == "zero3" else []
    from sa2va_demo.v2.training import make_base
    make_base(family, work / f"base_{family}")  # the downloaded base, there before the job starts (as a real one is)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(next(_ports)),
           str(ROOT / "tests" / "dist_launch.py"), str(CONFIG), "--launcher", "pytorch", "--work-dir", str(work / "wd"),
           "--deepspeed", str(ASSETS / f"ds_{zero}_cpu.json"), "--cfg-options", f"model.family={family}",
           f"model.root={work}", f"custom_hooks.1.converter.hf_code_dir={HF_CODE[family]}", *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (work / "launch.log").write_text(log)
    errors = [line for line in log.splitlines() if "Error" in line and "error_file" not in line]
    assert proc.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + log[-3000:]
    return log


def _rebuilt_with(checkpoint: Path, family: str, root: Path, zero: str):
    """The model as the run built it (its seed), with the checkpoint's tensors: every saved key must
    land, and only frozen parameters may be left to the build."""
    from mmengine.runner import set_random_seed

    from sa2va_demo.v2.training import Sa2VAModelV2
    from sa2va_hooks.offline import extract_state_dict, load_checkpoint
    state = extract_state_dict(load_checkpoint(checkpoint), checkpoint)
    set_random_seed(0)
    model = Sa2VAModelV2(family, str(root), **({"modules_to_save": None} if zero == "zero3" else {}))
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not result.unexpected_keys and not (trainable & set(result.missing_keys))
    return model


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_v2_family_under_xtuner_deepspeed_exports_what_its_checkpoints_hold(family, zero, tmp_path):
    from transformers import AutoModel

    from sa2va_hooks.core.verify import verify_snapshot
    family_or_skip(family)
    xtuner_or_skip("Qwen2ForCausalLM")
    log = _launch(tmp_path, family, zero)
    wd = tmp_path / "wd"
    assert "[sa2va_hooks] HFExportHook converter: sa2va" in log
    for it in (2, 4):
        snap = wd / "hf" / f"iter_{it}"
        assert verify_snapshot(snap) == [], f"iter_{it}"
    snap = wd / "hf" / "iter_4"
    _, expected = official_reference(_rebuilt_with(wd / "iter_4.pth", family, tmp_path, zero))
    got = written(snap)
    assert sorted(got) == sorted(expected)
    if zero == "zero3":
        # Without modules_to_save the resized embedding rows are frozen and initialised at build time,
        # under ZeRO-3 by partitioned random draws a one-process rebuild does not reproduce: compare the
        # base rows there (the added rows are covered by verify against the manifest, above).
        from sa2va_demo.v2.training import N_WORDS
        base_rows = 4 + N_WORDS
        for k in [k for k in expected if k.endswith(("embed_tokens.weight", "lm_head.weight"))]:
            got[k], expected[k] = got[k][:base_rows], expected[k][:base_rows]
    assert not [k for k in expected if not torch.equal(got[k], expected[k])]
    _, info = AutoModel.from_pretrained(str(snap), trust_remote_code=True, output_loading_info=True)
    assert [list(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")] == [[], [], []]
