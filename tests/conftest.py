"""Shared fixtures: tiny models with fresh random weights, and one trained tiny Sa2VA run."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_qwen2(vocab: int = 96, tie: bool = False, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg)


def train_like(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Give every trainable parameter (LoRA B included, which PEFT zero-inits) non-zero updates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def snapshot_params(model: torch.nn.Module) -> dict:
    return {n: (p.detach().clone(), p._version) for n, p in model.named_parameters()}


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    changed = [n for n, p in model.named_parameters()
               if not torch.equal(p.detach(), before[n][0]) or p._version != before[n][1]]
    assert not changed, f"export changed live parameters: {changed[:5]}"


def peft_reference(model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """PEFT's own merge on a deep copy in fp32, then cast: the independent reference."""
    merged = copy.deepcopy(model).float().merge_and_unload()
    sd = merged.state_dict()
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    from sa2va_hooks.demo.tiny_sa2va import make_tiny_base
    return make_tiny_base(tmp_path_factory.mktemp("tiny_base") / "base")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_base):
    """One real Runner training (seed 0, 6 iterations, checkpoints and exports at 3 and 6)."""
    from sa2va_hooks.demo.runs import train_tiny
    work = tmp_path_factory.mktemp("run_seed0")
    runner = train_tiny(work, tiny_base, seed=0, data_seed=0)
    return runner, work
