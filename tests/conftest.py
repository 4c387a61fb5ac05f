"""Shared fixtures: tiny models with fresh random weights, and one trained tiny Sa2VA run."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_qwen2(vocab: int = 96, tie: bool = False, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg)


def smallest_qwen2(seed: int):
    """The smallest Qwen2 the unit tests export (1 layer, hidden 16, untied), fresh random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                        max_position_embeddings=32, tie_word_embeddings=False))


# The newest stack's PEFT (requirements/newest.txt). On it every PEFT feature must build; an older PEFT
# (Sa2VA's `legacy` stack, 0.11.1; `latest` has 0.17.1) may lack some, and those cases skip with PEFT's own
# error as the reason.
NEWEST_TESTED_PEFT = "0.21"


def build_or_skip_on_old_peft(build, what: str):
    """``build()``, or a skip naming PEFT's version when an older PEFT cannot construct ``what``."""
    import peft
    from packaging.version import Version
    try:
        return build()
    except (TypeError, ValueError, AttributeError, ImportError, NotImplementedError) as e:
        if Version(peft.__version__) >= Version(NEWEST_TESTED_PEFT):
            raise
        pytest.skip(f"peft {peft.__version__} cannot build {what}: {type(e).__name__}: {e}")


def xtuner_or_skip(llm_class: str = "Qwen2ForCausalLM") -> None:
    """Skip, naming the reason, where this stack cannot run xtuner's model classes over ``llm_class``:
    xtuner is absent (the `newest` stack: xtuner 0.1.23, Sa2VA's, and 0.2.0 both fail to import with
    transformers 5), or xtuner's own ``dispatch_modules`` asserts a newer
    transformers for that LLM class (0.1.23 wants 4.39 for Qwen2; both Sa2VA stacks are above it)."""
    import importlib.util
    if importlib.util.find_spec("xtuner") is None:
        import transformers
        pytest.skip(f"xtuner is not installed in this stack (transformers {transformers.__version__}; xtuner 0.1.23 "
                    f"and 0.2.0 fail to import with transformers 5: no 'is_safetensors_available')")
    import transformers
    from mmengine.utils import digit_version
    from xtuner.model.modules.dispatch import LOWEST_TRANSFORMERS_VERSION
    need = LOWEST_TRANSFORMERS_VERSION.get(llm_class)
    if need is not None and digit_version(transformers.__version__) < need:
        import xtuner
        pytest.skip(f"xtuner {xtuner.__version__} refuses {llm_class} below transformers "
                    f"{'.'.join(map(str, need[:2]))} (its dispatch_modules check); this stack has "
                    f"{transformers.__version__}")


def peft_saved_form(state: dict, prefix: str = "llm.", adapter: str = "default") -> dict:
    """The LoRA tensors of a training checkpoint in the form PEFT saves them, which is what
    ``set_peft_model_state_dict`` takes: ``prefix`` removed and the adapter name dropped.
    xtuner 0.1.23's ``state_dict`` keeps the adapter name (``lora_A.default.weight``, the live
    parameter's name; its own ``get_peft_model_state_dict`` never drops it); PEFT drops it. Keys
    already without it are left as they are. Given the name kept, PEFT would insert
    it a second time (``lora_A.default.default.weight``) and load nothing."""
    import re
    drop = re.compile(rf"\.(lora_[A-Za-z_]+)\.{re.escape(adapter)}(\.|$)")
    return {drop.sub(r".\1\2", k.removeprefix(prefix)): v for k, v in state.items() if "lora_" in k}


def transformers_class_or_skip(name: str):
    """``transformers.<name>``, or a skip naming the installed version that lacks it."""
    import transformers
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def config_dtype(cfg: dict) -> str | None:
    """The dtype a written config.json declares: ``dtype`` from transformers 5, ``torch_dtype`` before."""
    return cfg.get("dtype", cfg.get("torch_dtype"))


def train_like(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Give every trainable parameter (LoRA B included, which PEFT zero-inits) non-zero updates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def lora_qwen2():
    """The tiny Qwen2 with LoRA on q/v/up and a saved copy of lm_head, trained-like (seeds 3 and 5): the
    model the collective and rank-fault tests export on every rank and in one process."""
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], modules_to_save=["lm_head"])
    pm = get_peft_model(tiny_qwen2(seed=3), lora)
    train_like(pm, seed=5)
    return pm


def snapshot_tensors(snapshot: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a snapshot, whatever its shards (a model with frozen and trained tensors is
    at least two files: the frozen ones get files of their own, to be hard-linked next time)."""
    from safetensors.torch import load_file
    shards = sorted(Path(snapshot).glob("*.safetensors"))
    assert shards, f"no .safetensors file in {snapshot}"
    out: dict[str, torch.Tensor] = {}
    for f in shards:
        part = load_file(f)
        assert not set(part) & set(out), f"{f.name} repeats tensors of another shard"
        out.update(part)
    return out


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


@pytest.fixture(autouse=True)
def _bnb_cpu_4bit_generic_path(monkeypatch):
    """CPU-only workaround (tests/core/test_merge_qlora.py): on a CPU with AVX512-BF16, bitsandbytes 0.49 (every
    lock) runs an eval-mode ``Linear4bit`` forward through a packed kernel that first repacks the weight in place and
    needs ``in_features`` to be a multiple of the quantization block (64); the tiny models here have 32,
    so PEFT's own forward (the tests' reference logits) fails inside bitsandbytes
    (``shape '[32, 0]' is invalid``). Layers built while this is on take bitsandbytes' generic CPU path,
    the one a CPU without AVX512-BF16 (and every GPU run) takes. Only a no-op where bitsandbytes is not
    imported."""
    modules = sys.modules.get("bitsandbytes.nn.modules")
    if modules is not None and hasattr(modules, "has_avx512bf16"):
        monkeypatch.setattr(modules, "has_avx512bf16", lambda: False)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    from sa2va_demo.tiny_sa2va import make_tiny_base
    return make_tiny_base(tmp_path_factory.mktemp("tiny_base") / "base")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_base):
    """One real Runner training (seed 0, 6 iterations, checkpoints and exports at 3 and 6)."""
    from sa2va_demo.runs import train_tiny
    work = tmp_path_factory.mktemp("run_seed0")
    runner = train_tiny(work, tiny_base, seed=0, data_seed=0)
    return runner, work


def imported_modules(path: Path, package_root: Path, with_names: bool = False) -> set[str]:
    """Absolute module names a file imports, relative imports resolved against its package
    (``package_root`` is the directory holding ``sa2va_hooks``); with ``with_names``, also
    ``module.name`` for every name a ``from`` import takes (a name may be a submodule)."""
    import ast
    pkg = ".".join(path.relative_to(package_root).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            out.add(mod)
            if with_names:
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out
