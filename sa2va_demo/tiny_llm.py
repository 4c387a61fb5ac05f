"""A tiny Qwen2 causal LM directory and a synthetic token data set, for xtuner runs on the CPU."""
from __future__ import annotations

from pathlib import Path

import torch
from .tiny_sa2va import SeededSamples, _tiny_tokenizer


def make_tiny_llm(model_dir: str | Path, seed: int = 4321) -> Path:
    """An HF model directory (config, weights, tokenizer) for a 2-layer Qwen2. Idempotent."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    model_dir = Path(model_dir)
    if (model_dir / "config.json").is_file():
        return model_dir
    tok = _tiny_tokenizer(60)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64,
                      tie_word_embeddings=False, torch_dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    return model_dir


class TinyTokenDataset(SeededSamples):
    """Random token sequences in xtuner's format (``input_ids`` and ``labels`` lists)."""

    def __init__(self, length: int = 32, seq_len: int = 12, vocab_size: int = 64, seed: int = 0) -> None:
        super().__init__(length, seq_len, seed)
        self.vocab_size = vocab_size

    def __getitem__(self, idx: int) -> dict:
        g = self.generator(idx)
        ids = torch.randint(4, self.vocab_size, (self.seq_len,), generator=g).tolist()
        return {"input_ids": ids, "labels": ids}
