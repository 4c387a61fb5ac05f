"""Runner-state helpers shared by the hooks (the only place that knows mmengine's internals)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from mmengine.model import is_model_wrapper
from torch import nn

from ..core.fingerprint import Fingerprint, fingerprint_state
from ..core.merge import trainable_parameters
from ..export import frozen_root

BASELINE_KEY = "sa2va_hooks/baseline"  # trainable fingerprints before training (resumed with the run)
FROZEN_ROOT_KEY = "sa2va_hooks/frozen_root"  # root digest of the frozen parameters at the first start
META_KEY = "sa2va_hooks"  # key inside checkpoint["meta"]
# trained fingerprints FingerprintHook computed at this iteration's checkpoint; not resumed (not
# saved into checkpoints), only handed to HFExportHook so the same tensors are not hashed twice
CURRENT_TRAINED_KEY = "sa2va_hooks/current_trained"


def unwrapped_model(runner) -> nn.Module:
    model = runner.model
    return model.module if is_model_wrapper(model) else model


def config_sha256(runner) -> str | None:
    cfg = getattr(runner, "cfg", None)
    if cfg is None:
        return None
    filename = getattr(cfg, "filename", None)
    if filename and Path(filename).is_file():
        return hashlib.sha256(Path(filename).read_bytes()).hexdigest()
    return hashlib.sha256(cfg.pretty_text.encode()).hexdigest()


def ensure_baseline(runner) -> tuple[dict[str, Fingerprint], str, str | None]:
    """Record, once per run (kept across resume by message_hub), what the trainable parameters
    were before training and the root digest of the frozen ones.

    Returns (baseline, frozen root now, frozen root recorded at the first start or None).
    """
    model = unwrapped_model(runner)
    hub = runner.message_hub
    frozen_now = frozen_root(model)
    recorded_frozen = hub.get_info(FROZEN_ROOT_KEY)
    if recorded_frozen is None:
        hub.update_info(FROZEN_ROOT_KEY, frozen_now)
    stored = hub.get_info(BASELINE_KEY)
    if stored is None:
        baseline = fingerprint_state(trainable_parameters(model))
        hub.update_info(BASELINE_KEY, {k: v.to_json() for k, v in baseline.items()})
    else:
        baseline = {k: Fingerprint.from_json(v) for k, v in stored.items()}
    return baseline, frozen_now, recorded_frozen


def build_callable_cfg(cfg: dict):
    """Build an xtuner-style ``dict(type=callable, **kwargs)`` (e.g. a tokenizer config)."""
    kwargs = dict(cfg)
    factory = kwargs.pop("type")
    if hasattr(factory, "build"):  # mmengine LazyObject from a lazy-import config
        factory = factory.build()
    if not callable(factory):
        raise TypeError(f"cannot build {cfg!r}: its 'type' must be a class or function (e.g. "
                        f"AutoTokenizer.from_pretrained), got {factory!r}")
    return factory(**kwargs)
