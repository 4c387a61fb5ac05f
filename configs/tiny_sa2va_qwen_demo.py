# A tiny Sa2VA with a Qwen-VL-style mllm (LoRA on the language layers, trained lm_head, mask
# decoder and text_hidden_fcs) with the hooks; exports load with AutoModel(trust_remote_code=True).
#   python tools/train.py configs/tiny_sa2va_qwen_demo.py --work-dir W
from mmengine.dataset import DefaultSampler, default_collate
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import OptimWrapper
from mmengine.runner import IterBasedTrainLoop
from torch.optim import AdamW

from sa2va_hooks import FingerprintHook, HFExportHook
from sa2va_hooks.demo.families import TinyQwenSegDataset, TinySa2VAQwen

model = dict(type=TinySa2VAQwen)
train_dataloader = dict(batch_size=2, num_workers=0, dataset=dict(type=TinyQwenSegDataset, length=16, seed=0),
                        sampler=dict(type=DefaultSampler, shuffle=True), collate_fn=dict(type=default_collate))
optim_wrapper = dict(type=OptimWrapper, optimizer=dict(type=AdamW, lr=2e-3, weight_decay=0.0))
train_cfg = dict(type=IterBasedTrainLoop, max_iters=4)
default_hooks = dict(timer=dict(type=IterTimerHook), logger=dict(type=LoggerHook, interval=1),
                     param_scheduler=dict(type=ParamSchedulerHook),
                     checkpoint=dict(type=CheckpointHook, interval=2, by_epoch=False))
custom_hooks = [dict(type=FingerprintHook), dict(type=HFExportHook, dtype="bf16")]
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo"))
launcher = "none"
randomness = dict(seed=0, deterministic=False)
log_level = "INFO"
load_from = None
resume = False
