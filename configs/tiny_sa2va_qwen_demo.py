# A tiny Sa2VA with a Qwen-VL-style mllm (LoRA on the language layers, trained lm_head, mask
# decoder and text_hidden_fcs) with the hooks; exports load with AutoModel(trust_remote_code=True).
#   python tools/train.py configs/tiny_sa2va_qwen_demo.py --work-dir W
from mmengine.config import read_base
from mmengine.dataset import DefaultSampler, default_collate

from sa2va_hooks import FingerprintHook, HFExportHook
from sa2va_demo.families import TinyQwenSegDataset, TinySa2VAQwen

with read_base():
    from ._base_.tiny_runtime import *  # noqa: F401,F403

model = dict(type=TinySa2VAQwen)
train_dataloader = dict(batch_size=2, num_workers=0, dataset=dict(type=TinyQwenSegDataset, length=16, seed=0),
                        sampler=dict(type=DefaultSampler, shuffle=True), collate_fn=dict(type=default_collate))
custom_hooks = [dict(type=FingerprintHook), dict(type=HFExportHook, converter="tiny_sa2va_qwen", dtype="bf16")]
