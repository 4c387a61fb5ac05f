"""Where sa2va_hooks' records live inside a training checkpoint, and small config helpers: shared by
the hooks (which write them) and the offline tools (which read them), with no mmengine import, so
``sa2va_hooks.offline`` never depends on ``sa2va_hooks.hooks``."""
from __future__ import annotations

from .core.errors import BadTypeError

BASELINE_KEY = "sa2va_hooks/baseline"  # trainable fingerprints before training (resumed with the run)
FROZEN_ROOT_KEY = "sa2va_hooks/frozen_root"  # root digest of the frozen parameters at the first start
# the tensor digest algorithm that root was made with; absent (a run started before digest v2): v1
FROZEN_ROOT_ALGORITHM_KEY = "sa2va_hooks/frozen_root_algorithm"
META_KEY = "sa2va_hooks"  # key inside checkpoint["meta"] (classic Runner, which calls before_save_checkpoint)
# the record of the checkpoint being saved: message_hub runtime info is saved into every checkpoint
# by every runner and strategy (DeepSpeed included), so this is where the fingerprints travel
CHECKPOINT_RECORD_KEY = "sa2va_hooks/checkpoint"


def build_callable_cfg(cfg: dict):
    """Build an xtuner-style ``dict(type=callable, **kwargs)`` (e.g. a tokenizer config)."""
    kwargs = dict(cfg)
    factory = kwargs.pop("type")
    if hasattr(factory, "build"):  # mmengine LazyObject from a lazy-import config
        factory = factory.build()
    if not callable(factory):
        raise BadTypeError(f"cannot build {cfg!r}: its 'type' must be a class or function (e.g. "
                        f"AutoTokenizer.from_pretrained), got {factory!r}")
    return factory(**kwargs)
