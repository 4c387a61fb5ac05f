"""Test-only training script: mmengine's FlexibleRunner with FSDPStrategy on 2 gloo CPU processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_train.py WORK_DIR LLM_DIR [--no-hooks]

A tiny Qwen2 from LLM_DIR with PEFT LoRA on every linear layer, wrapped by mmengine's
``MMFullyShardedDataParallel`` with one FSDP unit per decoder layer (``use_orig_params=True``, its
default), 6 iterations, a checkpoint every 3 (``state_dict_cfg='full'``: one file, written by rank
0), both hooks at their defaults but for a small shard size. xtuner's train entry point offers no
FSDP, so this is the plain mmengine path a user of FSDPStrategy takes.

CPU-only workarounds, none of them in the product's code path: ``torch.cuda.set_device`` made a
no-op (tests/dist_launch.py), and FSDP's ``device_id=torch.device('cpu')`` (mmengine passes the
local rank, i.e. a CUDA device). And the frozen slices of each unit are checked by content, as on a
GPU, instead of copied, as on the CPU (decision 63): so these launches cover the GPU's path. With
SA2VA_TEST_FSDP_COPY=1 they take the CPU's path (copied).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from dist_launch import _cpu_workarounds
    _cpu_workarounds()
    from mmengine.model import BaseModel
    from mmengine.runner import FlexibleRunner
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    import sa2va_hooks  # noqa: F401 - registers the hooks
    import sa2va_hooks.core.snapshot as snapshot
    if os.environ.get("SA2VA_TEST_FSDP_COPY") != "1":
        snapshot.checks_by_content = lambda piece: piece.shared  # the GPU's path (see above)
    from sa2va_demo.tiny_llm import TinyTokenDataset

    work, llm_dir = sys.argv[1], sys.argv[2]
    hooks = "--no-hooks" not in sys.argv

    class LoraLM(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            llm = AutoModelForCausalLM.from_pretrained(llm_dir, torch_dtype=torch.float32)
            self.llm = get_peft_model(llm, LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))

        def init_weights(self) -> None:
            """Loaded from LLM_DIR already; mmengine would otherwise re-run transformers' random init."""

        def forward(self, input_ids=None, labels=None, mode="loss", **kw):
            ids = torch.stack(input_ids) if isinstance(input_ids, (list, tuple)) else input_ids
            lab = torch.stack(labels) if isinstance(labels, (list, tuple)) else labels
            return {"loss": self.llm(input_ids=ids, labels=lab).loss}

    def collate(batch):
        return {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "labels")}

    torch.manual_seed(0)  # LoRA's random init: the model is built before the runner seeds anything
    model = LoraLM()
    runner = FlexibleRunner(
        model=model, work_dir=work, launcher="pytorch", env_cfg=dict(dist_cfg=dict(backend="gloo")),
        randomness=dict(seed=0),
        strategy=dict(type="FSDPStrategy", state_dict_cfg="full",
                      model_wrapper=dict(type="MMFullyShardedDataParallel", device_id=torch.device("cpu"),
                                         auto_wrap_policy=ModuleWrapPolicy({Qwen2DecoderLayer}))),
        train_dataloader=dict(dataset=TinyTokenDataset(length=32, seq_len=12, vocab_size=64, seed=0),
                              sampler=dict(type="DefaultSampler", shuffle=True), batch_size=2, num_workers=0,
                              collate_fn=collate),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=2e-3, weight_decay=0.0)),
        train_cfg=dict(by_epoch=False, max_iters=6),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=3, by_epoch=False),
                           logger=dict(type="LoggerHook", interval=1)),
        custom_hooks=[dict(type="FingerprintHook"), dict(type="HFExportHook", dtype="bf16", max_shard_size=20000)]
        if hooks else [],
    )
    runner.train()


if __name__ == "__main__":
    main()
