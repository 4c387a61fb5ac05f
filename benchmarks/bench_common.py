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


_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
             "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
             "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def snapshot_roles(snapshot_dir) -> dict | None:
    """Bytes of the exported tensors by role ("frozen", "lora_merged", "modules_to_save",
    "trainable"), from a snapshot's manifest, and the frozen share of them: the share a later
    export can hard-link instead of writing. None when there is no manifest."""
    import json
    import math
    from pathlib import Path
    path = Path(snapshot_dir) / "export_manifest.json"
    if not path.is_file():
        return None
    by_role: dict[str, int] = {}
    for t in json.loads(path.read_text())["tensors"].values():
        n = math.prod(t["shape"]) * _ITEMSIZE.get(str(t["dtype"]).replace("torch.", ""), 2)
        by_role[t["role"]] = by_role.get(t["role"], 0) + n
    total = sum(by_role.values()) or 1
    return {"bytes_by_role": by_role, "frozen_pct": round(100 * by_role.get("frozen", 0) / total, 1)}


def second_export(exports: list[dict]) -> dict | None:
    """Bytes written and hard-linked by the second export (the first that can link), as counts and
    the written share; None with fewer than two exports."""
    if len(exports) < 2:
        return None
    e = exports[1]
    total = (e["written"] + e["linked"]) or 1
    return {"written": e["written"], "linked": e["linked"], "written_pct": round(100 * e["written"] / total, 1)}


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on the benchmark machines)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
