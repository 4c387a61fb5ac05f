"""The frozen shards of a second export are hard-linked from the first under every strategy, at
the default shard size: 2 gloo processes on the CPU (``torch.distributed.run``), one launch per
strategy, each exporting the same LoRA model twice with ``export_hf`` (the second with
``link_from`` the first).

- ``ddp``: whole weights on every rank (what DDP and ZeRO-2 give the exporter); the owner of a
  frozen shard links it on its own;
- ``zero2``: DeepSpeed ZeRO-2 (``DS_ACCELERATOR=cpu``), whole weights too;
- ``zero3``: DeepSpeed ZeRO-3, and ``fsdp``: torch FSDP (``use_orig_params=True``): producing a
  tensor is a collective gather, so the ranks link together (every rank runs the file's gathers
  once, the owner decides, the decision is broadcast; core/rank_writer.py).

Checked: the frozen tensors have files of their own although the model is far under 5GB, those
files (and only those) are linked (``storage.linked_from``, ``bytes_linked``, and the same inode as
the first snapshot's), both snapshots verify and have the same root digest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sa2va_hooks.core.verify import verify_snapshot

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, os, sys
sys.path.insert(0, os.environ["SA2VA_TESTS"])
from dist_launch import _cpu_workarounds
_cpu_workarounds()
import torch
import torch.distributed as dist
from conftest import lora_qwen2
from sa2va_hooks import export_hf

mode, out = sys.argv[1], sys.argv[2]
model = lora_qwen2()
if mode in ("zero2", "zero3"):
    import deepspeed
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": int(mode[-1]), "stage3_param_persistence_threshold": 0},
           "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=torch.optim.SGD(params, lr=0.1),
                                      config=cfg)
    model = engine.module
else:
    dist.init_process_group("gloo")
    if mode == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
        holder = torch.nn.Module()  # the model under FSDP as tests/fsdp_train.py has it: the LM as .llm
        holder.llm = model
        model = FullyShardedDataParallel(holder, device_id=torch.device("cpu"), use_orig_params=True,
                                         auto_wrap_policy=ModuleWrapPolicy({Qwen2DecoderLayer}))
conv = "causal_lm" if mode == "fsdp" else "auto"  # "auto" looks at the root's class, here FSDP's
first = export_hf(model, f"{out}/iter_1", converter=conv, dtype="bf16")
second = export_hf(model, f"{out}/iter_2", converter=conv, dtype="bf16", link_from=f"{out}/iter_1")
if dist.get_rank() == 0:
    with open(f"{out}/result.json", "w") as f:
        json.dump({"first": first.storage, "second": second.storage, "roots": [first.root_digest, second.root_digest],
                   "tensors": {n: [t["file"], t["role"]] for n, t in second.tensors.items()}}, f)
dist.barrier()
'''


def _launch(tmp_path: Path, mode: str) -> dict:
    if mode in ("zero2", "zero3"):
        pytest.importorskip("deepspeed", reason="the DeepSpeed cases need DeepSpeed")
    if mode == "fsdp" and tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 5):
        pytest.skip(f"torch {torch.__version__}: FSDP on this CPU/gloo setup is tested from torch 2.5 "
                    "(tests/scenarios/test_distributed.py)")
    script = tmp_path / "export_twice.py"
    script.write_text(SCRIPT)
    out = tmp_path / "hf"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SA2VA_TESTS": str(ROOT / "tests"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    port = 29000 + (os.getpid() + hash(mode)) % 900
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script), mode, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3", "fsdp"])
def test_the_frozen_shards_are_linked_under_each_strategy_at_the_default_shard_size(tmp_path, mode):
    result = _launch(tmp_path, mode)
    files = {}
    for fname, role in result["tensors"].values():
        files.setdefault(fname, set()).add(role == "frozen")
    # files of frozen tensors only; a frozen tensor that is not frozen-only (lm_head here: PEFT keeps a
    # trained copy of it) may share a file with the trained ones, as the plan says
    frozen = {f for f, kinds in files.items() if kinds == {True}}
    assert frozen and len(files) >= 2 and frozen != set(files), files
    assert result["first"]["bytes_linked"] == 0 and result["first"]["linked_from"] == {}
    assert set(result["second"]["linked_from"]) == frozen
    snaps = [tmp_path / "hf" / "iter_1", tmp_path / "hf" / "iter_2"]
    assert result["second"]["bytes_linked"] == sum((snaps[1] / f).stat().st_size for f in frozen) > 0
    for f in frozen:
        assert (snaps[1] / f).stat().st_ino == (snaps[0] / f).stat().st_ino, f
    for f in set(files) - frozen:
        assert (snaps[1] / f).stat().st_ino != (snaps[0] / f).stat().st_ino, f
    assert result["roots"][0] == result["roots"][1]
    assert verify_snapshot(snaps[0]) == [] and verify_snapshot(snaps[1]) == []
