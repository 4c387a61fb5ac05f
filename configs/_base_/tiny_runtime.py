# Runtime settings shared by the tiny demo configs (lazy-import style): 4 iterations on the CPU,
# a checkpoint every 2, AdamW at 2e-3.
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import OptimWrapper
from mmengine.runner import IterBasedTrainLoop
from torch.optim import AdamW

optim_wrapper = dict(type=OptimWrapper, optimizer=dict(type=AdamW, lr=2e-3, weight_decay=0.0))
train_cfg = dict(type=IterBasedTrainLoop, max_iters=4)
default_hooks = dict(timer=dict(type=IterTimerHook), logger=dict(type=LoggerHook, interval=1),
                     param_scheduler=dict(type=ParamSchedulerHook),
                     checkpoint=dict(type=CheckpointHook, interval=2, by_epoch=False))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo"))
launcher = "none"
randomness = dict(seed=0, deterministic=False)
log_level = "INFO"
load_from = None
resume = False
