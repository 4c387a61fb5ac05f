# xtuner's InternVL_V1_5 (tiny InternVL-style remote code, LoRA on the LLM, trained mlp1) with the hooks;
# exports load with AutoModel(trust_remote_code=True). Run from any directory:
#   python tools/train.py configs/xtuner_tiny_internvl.py --work-dir W
# The tiny base directories are made under work_dirs/tiny_internvl on first use.
from mmengine.dataset import DefaultSampler
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import OptimWrapper
from mmengine.runner import IterBasedTrainLoop
from torch.optim import AdamW
from transformers import AutoTokenizer
from xtuner.dataset.collate_fns import default_collate_fn

from sa2va_hooks import FingerprintHook, HFExportHook
from sa2va_hooks.demo.families import TinyInternVLDataset, tiny_xtuner_internvl

root = "work_dirs/tiny_internvl"
model = dict(type=tiny_xtuner_internvl, root=root)
train_dataloader = dict(batch_size=2, num_workers=0, dataset=dict(type=TinyInternVLDataset, root=root, length=16, seed=0),
                        sampler=dict(type=DefaultSampler, shuffle=True), collate_fn=dict(type=default_collate_fn))
optim_wrapper = dict(type=OptimWrapper, optimizer=dict(type=AdamW, lr=2e-3, weight_decay=0.0))
train_cfg = dict(type=IterBasedTrainLoop, max_iters=4)
default_hooks = dict(timer=dict(type=IterTimerHook), logger=dict(type=LoggerHook, interval=1),
                     param_scheduler=dict(type=ParamSchedulerHook),
                     checkpoint=dict(type=CheckpointHook, interval=2, by_epoch=False))
custom_hooks = [
    dict(type=FingerprintHook),
    dict(type=HFExportHook, dtype="bf16",
         tokenizer=dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=root + "/internvl")),
]
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo"))
launcher = "none"
randomness = dict(seed=0, deterministic=False)
log_level = "INFO"
load_from = None
resume = False
