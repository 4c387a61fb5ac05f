# Tiny Sa2VA-shaped model trained on the CPU with both sa2va_hooks hooks.
# The base directory is made by `python tools/demo.py` (or sa2va_demo.tiny_sa2va.make_tiny_base).
custom_imports = dict(imports=["sa2va_hooks", "sa2va_demo.tiny_sa2va"], allow_failed_imports=False)

base_dir = "{{$SA2VA_TINY_BASE:work_dirs/tiny_sa2va_base}}"
data_seed = 0
max_iters = 6
save_interval = 3

model = dict(type="TinySa2VA", base_dir=base_dir, lora_r=8, lora_alpha=16)
train_dataloader = dict(
    batch_size=4, num_workers=0,
    dataset=dict(type="TinySegDataset", base_dir=base_dir, length=32, seed=data_seed),
    sampler=dict(type="DefaultSampler", shuffle=True),
    collate_fn=dict(type="default_collate"))
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters)
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=2e-3, weight_decay=0.0))
default_hooks = dict(
    checkpoint=dict(type="CheckpointHook", interval=save_interval, by_epoch=False),
    logger=dict(type="LoggerHook", interval=1))
custom_hooks = [
    dict(type="FingerprintHook"),
    dict(type="HFExportHook", converter="tiny_sa2va", dtype="bf16", keep_last=None),
]
randomness = dict(seed=0, deterministic=False)
env_cfg = dict(dist_cfg=dict(backend="gloo"))
log_level = "INFO"
