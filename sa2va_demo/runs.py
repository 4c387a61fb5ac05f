"""Run the tiny Sa2VA demo config with the real mmengine Runner (demo and tests share this)."""
from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from mmengine.config import Config
from mmengine.runner import Runner

from .tiny_sa2va import make_tiny_base

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_sa2va_demo.py"


def tiny_config(work_dir: str | Path, base_dir: str | Path, *, seed: int = 0, data_seed: int = 0,
                max_iters: int = 6, save_interval: int = 3, lr: float | None = None,
                resume_from: str | Path | None = None, hooks: list[dict] | None = None,
                config_file: str | Path = DEMO_CONFIG) -> Config:
    make_tiny_base(base_dir)
    cfg = Config.fromfile(str(config_file))
    cfg.work_dir = str(work_dir)
    # mmengine keys its logger by experiment name (to the second); two runs in one second would
    # otherwise share the first run's log file.
    cfg.experiment_name = f"tiny_sa2va_{uuid.uuid4().hex[:12]}"
    cfg.model.base_dir = str(base_dir)
    cfg.train_dataloader.dataset.base_dir = str(base_dir)
    cfg.train_dataloader.dataset.seed = data_seed
    cfg.randomness = dict(seed=seed, deterministic=False)
    cfg.train_cfg.max_iters = max_iters
    cfg.default_hooks.checkpoint.interval = save_interval
    if lr is not None:
        cfg.optim_wrapper.optimizer.lr = lr
    if resume_from is not None:
        cfg.resume = True
        cfg.load_from = str(resume_from)
    if hooks is not None:
        cfg.custom_hooks = [_with_tiny_converter(h) for h in hooks]
    return cfg


def _with_tiny_converter(hook: dict) -> dict:
    """The tiny model's converter ranks below every real one (so "auto" never picks it for a real
    model), so its exports name it, as the demo config does."""
    if str(getattr(hook.get("type"), "__name__", hook.get("type"))) == "HFExportHook" and "converter" not in hook:
        return {**hook, "converter": "tiny_sa2va"}
    return hook


class BannerToFileRunner(Runner):
    """mmengine's Runner, but its environment banner (hundreds of lines of build flags, then the
    whole config) goes to the run's log file only, not to the console: the demo's first lines on
    screen are then its own."""

    def _log_env(self, env_cfg: dict) -> None:
        console = [h for h in self.logger.handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        levels = [h.level for h in console]
        for h in console:
            h.setLevel(logging.WARNING)
        try:
            super()._log_env(env_cfg)
        finally:
            for h, level in zip(console, levels, strict=True):
                h.setLevel(level)


def train_tiny(work_dir: str | Path, base_dir: str | Path, **kwargs: Any) -> Runner:
    runner = BannerToFileRunner.from_cfg(tiny_config(work_dir, base_dir, **kwargs))
    runner.train()
    return runner
