# xtuner's InternVL_V1_5 (tiny InternVL-style remote code, LoRA on the LLM, trained mlp1) with the
# hooks; exports load with AutoModel(trust_remote_code=True). Run from any directory:
#   python tools/train.py configs/xtuner_tiny_internvl.py --work-dir W
# The tiny base directory is made under work_dirs/tiny_internvl on first use.
from mmengine.config import read_base
from mmengine.dataset import DefaultSampler
from transformers import AutoTokenizer
from xtuner.dataset.collate_fns import default_collate_fn

from sa2va_hooks import FingerprintHook, HFExportHook
from sa2va_demo.families import TinyInternVLDataset, tiny_xtuner_internvl

with read_base():
    from ._base_.tiny_runtime import *  # noqa: F401,F403

root = "work_dirs/tiny_internvl"
model = dict(type=tiny_xtuner_internvl, root=root)
train_dataloader = dict(batch_size=2, num_workers=0,
                        dataset=dict(type=TinyInternVLDataset, root=root, length=16, seed=0),
                        sampler=dict(type=DefaultSampler, shuffle=True), collate_fn=dict(type=default_collate_fn))
custom_hooks = [
    dict(type=FingerprintHook),
    dict(type=HFExportHook, dtype="bf16",
         tokenizer=dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=root + "/internvl")),
]
