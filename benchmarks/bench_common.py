"""Helpers the benchmarks share: peak resident memory, and the Qwen2 shapes they measure."""
from __future__ import annotations

import threading
import time

import psutil

QWEN2_SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192),
}


def qwen2_config(size: str):
    from transformers import Qwen2Config
    return Qwen2Config(**QWEN2_SHAPES[size], tie_word_embeddings=False)


class PeakRSS:
    """Peak resident memory of this process above its level at entry, sampled every 20 ms."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = False
        self.th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self):
        self.th.start()
        return self

    def __exit__(self, *a) -> None:
        self.stop = True
        self.th.join()

    @property
    def extra_gib(self) -> float:
        return round((self.peak - self.base) / 2**30, 3)
