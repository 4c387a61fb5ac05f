"""offline/load_plan.py: a trainable-only checkpoint applied to a freshly built PEFT model, strictly.
The reference is PEFT's own ``set_peft_model_state_dict`` on a second copy of the model: both must
hold the same tensors afterwards."""
from __future__ import annotations

import pytest
import torch

from conftest import peft_saved_form, tiny_qwen2, train_like
from sa2va_hooks.offline.load_plan import (FIX_DDP, FIX_PEFT, CheckpointMismatchError, apply_load_plan, full_state,
                                           plan_load)


def _peft(seed: int, save_head: bool = True):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(tiny_qwen2(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            modules_to_save=["lm_head"] if save_head else None))


def _trained_state(seed: int, save_head: bool = True) -> dict[str, torch.Tensor]:
    pm = _peft(seed, save_head)
    train_like(pm, seed=seed + 100)
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def test_exact_keys_load_with_no_fix_and_equal_the_trained_values():
    state = _trained_state(seed=int(torch.randint(0, 10 ** 6, (1,))))
    fresh = _peft(0)
    plan = plan_load(fresh, state)
    assert plan.mapping == {k: k for k in state} and plan.fixes == {}
    apply_load_plan(fresh, state, plan)
    live = full_state(fresh)
    assert all(torch.equal(live[k], v) for k, v in state.items())


def test_peft_saved_keys_and_ddp_prefix_are_mapped_and_reported_like_peft_loads_them():
    from peft import set_peft_model_state_dict
    seed = int(torch.randint(0, 10 ** 6, (1,)))
    state = _trained_state(seed, save_head=False)
    saved = peft_saved_form(state, prefix="")
    assert set(saved) != set(state)  # the adapter name really is dropped
    ddp = {"module." + k: v for k, v in saved.items()}
    ours, theirs = _peft(1, False), _peft(1, False)
    plan = plan_load(ours, ddp)
    apply_load_plan(ours, ddp, plan)
    assert sorted(plan.fixes[FIX_DDP]) == sorted(ddp)
    assert FIX_PEFT in plan.fixes and plan.fixes_summary()[FIX_DDP]["count"] == len(ddp)
    peft_form = peft_saved_form({"base_model.model." + k: v for k, v in state.items()}, prefix="base_model.model.")
    set_peft_model_state_dict(theirs, peft_form)
    a, b = full_state(ours), full_state(theirs)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == []
    assert any(not torch.equal(a[k], full_state(_peft(1, False))[k]) for k in state)  # something was loaded


def test_every_problem_is_reported_at_once_with_its_likely_cause():
    state = _trained_state(seed=3)
    lora_a = next(k for k in state if "lora_A" in k)
    state[lora_a] = torch.zeros(8, state[lora_a].shape[1])  # another rank
    state["model.unknown.weight"] = torch.zeros(1)
    missing = next(k for k in state if "lora_B" in k)
    del state[missing]
    with pytest.raises(CheckpointMismatchError) as e:
        plan_load(_peft(0), state)
    msg = str(e.value)
    assert "1 checkpoint key(s) match no model key: model.unknown.weight" in msg
    assert f"{lora_a}: checkpoint [8, " in msg and "a different LoRA rank" in msg
    assert f"are not in the checkpoint: {missing}" in msg


def test_a_prefixed_and_an_unprefixed_copy_are_duplicates():
    state = _trained_state(seed=4)
    k = next(iter(state))
    state["module." + k] = state[k].clone()
    with pytest.raises(CheckpointMismatchError, match=rf"several checkpoint keys land on the same model key: {k}"):
        plan_load(_peft(0), state)


def test_full_state_bypasses_a_state_dict_override():
    m = tiny_qwen2(seed=5)
    m.state_dict = lambda *a, **k: {}
    assert set(full_state(m)) == set(torch.nn.Module.state_dict(m)) and len(full_state(m)) > 0
