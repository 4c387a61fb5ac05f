# A tiny stand-in for a Sa2VA codebase-v2 config (projects/sa2va/configs/...), trained on the CPU with
# the hooks added the way the README's Sa2VA section says. Every v2 config has a top-level `template`
# and `tokenizer` (the *base* tokenizer, without [SEG]) and max_keep_ckpts=2; so does this one.
#   family: internvl (InternVL2.5/3), qwen2_5_vl, qwen3_vl  (--cfg-options model.family=... hf_code_dir=...)
from mmengine.config import read_base
from mmengine.dataset import DefaultSampler, default_collate
from mmengine.hooks import CheckpointHook
from transformers import AutoTokenizer

from sa2va_hooks import FingerprintHook, HFExportHook
from sa2va_demo.v2.training import Sa2VAModelV2, V2SegDataset

with read_base():
    from ._base_.tiny_runtime import *  # noqa: F401,F403

root = "work_dirs/sa2va_v2"
template = "qwen_chat"
tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=root + "/base_qwen2_5_vl",
                 trust_remote_code=True, padding_side="right")
model = dict(type=Sa2VAModelV2, family="qwen2_5_vl", root=root)
train_dataloader = dict(batch_size=2, num_workers=0, dataset=dict(type=V2SegDataset, length=16, seed=0),
                        sampler=dict(type=DefaultSampler, shuffle=True), collate_fn=dict(type=default_collate))
default_hooks.update(checkpoint=dict(type=CheckpointHook, interval=2, by_epoch=False, max_keep_ckpts=2))
# The README's lines for Sa2VA: hf_code_dir is the family's folder of Sa2VA's HF code
# (<Sa2VA>/projects/sa2va/hf/models, models_qwen2_5_vl or models_qwen3vl); template and tokenizer
# come from this config and the model.
hf_code_dir = "sa2va_demo/v2/hf_qwen2_5_vl"
custom_hooks = [dict(type=FingerprintHook),
                dict(type=HFExportHook, converter=dict(type="auto", hf_code_dir=hf_code_dir))]
