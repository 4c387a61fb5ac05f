"""The planning half of ``sa2va_hooks.core.merge``: which tensors a model exports, under which names,
with which role, before any data is produced. Tiny modules built here; nothing is merged or written
(every ``produce`` is left uncalled, except where a test says so).

Pinned, with expectations written by hand from the rules in the module:
- the role of a plain tensor: a parameter that requires grad is ``trainable``, one that does not and
  every persistent buffer are ``frozen`` (and ``static``: their bytes repeat from export to export);
  non-persistent buffers are not exported; names are the module paths, in registration order;
- a tied parameter is planned once, under its first name, and the other name is recorded as tied;
- PEFT wrappers are transparent: a LoRA layer's base weight is ``lora_merged`` under the unwrapped
  name, with the training-time names of the base and of its adapter weights as sources; a
  ``modules_to_save`` copy is ``modules_to_save``; an inactive adapter is reported, not merged;
- ``SourceTensor.out_dtype``: floating tensors take the export dtype, integer and bool keep theirs;
- ``all_finite`` / ``non_finite_names``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sa2va_hooks.core.merge import (ROLE_FROZEN, ROLE_LORA, ROLE_SAVED_COPY, ROLE_TRAINABLE, SourceTensor,
                                    all_finite, non_finite_names, plan_merged_tensors)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("cache", torch.zeros(2), persistent=False)
        self.register_buffer("table", torch.arange(3))
        self.lin.weight.requires_grad_(False)


def plan(module: nn.Module) -> dict[str, SourceTensor]:
    walk = plan_merged_tensors(module)
    return {st.name: st for st in walk.tensors}


def test_roles_names_and_order_of_plain_tensors():
    walk = plan_merged_tensors(Tiny())
    got = [(st.name, st.role, st.static, st.shape, st.dtype, st.sources) for st in walk.tensors]
    assert got == [
        ("table", ROLE_FROZEN, True, (3,), torch.int64, ("table",)),  # the module's own tensors first
        ("emb.weight", ROLE_TRAINABLE, False, (5, 4), torch.float32, ("emb.weight",)),
        ("lin.weight", ROLE_FROZEN, True, (3, 4), torch.float32, ("lin.weight",)),
        ("lin.bias", ROLE_TRAINABLE, False, (3,), torch.float32, ("lin.bias",)),
        ("norm.weight", ROLE_TRAINABLE, False, (3,), torch.float32, ("norm.weight",)),
        ("norm.bias", ROLE_TRAINABLE, False, (3,), torch.float32, ("norm.bias",)),
        ("norm.running_mean", ROLE_FROZEN, True, (3,), torch.float32, ("norm.running_mean",)),
        ("norm.running_var", ROLE_FROZEN, True, (3,), torch.float32, ("norm.running_var",)),
        ("norm.num_batches_tracked", ROLE_FROZEN, True, (), torch.int64, ("norm.num_batches_tracked",)),
    ]
    assert walk.tied == {"head.weight": "emb.weight"}  # planned once; "cache" is not persistent
    assert walk.inactive == {} and walk.dequantized == []


def test_freezing_changes_the_role():
    m = Tiny()
    m.emb.weight.requires_grad_(False)
    m.lin.weight.requires_grad_(True)
    p = plan(m)
    assert (p["emb.weight"].role, p["emb.weight"].static) == (ROLE_FROZEN, True)
    assert (p["lin.weight"].role, p["lin.weight"].static) == (ROLE_TRAINABLE, False)


def test_a_planned_tensor_materialises_as_its_source_in_the_export_dtype():
    m = Tiny()
    out = plan(m)["lin.weight"].materialize(torch.bfloat16).tensor
    assert out.dtype == torch.bfloat16 and torch.equal(out, m.lin.weight.detach().to(torch.bfloat16))
    assert out.data_ptr() != m.lin.weight.data_ptr()


@pytest.mark.parametrize("src, export, expected", [
    (torch.float32, torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, None, torch.float16), (torch.int64, torch.bfloat16, torch.int64),
    (torch.bool, torch.float16, torch.bool), (torch.uint8, None, torch.uint8),
])
def test_out_dtype(src, export, expected):
    st = SourceTensor("x", (1,), src, ROLE_FROZEN, ("x",), lambda d: None)
    assert st.out_dtype(export) is expected


def test_finite_checks():
    assert all_finite(torch.ones(3)) and all_finite(torch.empty(0))
    assert not all_finite(torch.tensor([1.0, float("nan")])) and not all_finite(torch.tensor([float("-inf")]))
    named = [("ok", torch.ones(2)), ("nan", torch.tensor([float("nan")])), ("ids", torch.arange(3)),
             ("none", None), ("inf", torch.tensor([1.0, float("inf")], dtype=torch.bfloat16))]
    assert non_finite_names(named) == ["nan", "inf"]


# -- PEFT wrappers ------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.v = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 2)


def peft_block(**kw):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    return get_peft_model(Block(), LoraConfig(r=2, lora_alpha=4, target_modules=["q"], **kw))


def test_lora_base_weight_is_merged_under_the_unwrapped_name():
    p = plan(peft_block())
    assert set(p) == {"q.weight", "q.bias", "v.weight", "v.bias", "proj.weight", "proj.bias"}
    q = p["q.weight"]
    assert q.role == ROLE_LORA and q.shape == (4, 4) and not q.static
    assert q.sources == ("base_model.model.q.base_layer.weight", "base_model.model.q.lora_A.default.weight",
                         "base_model.model.q.lora_B.default.weight")
    assert p["q.bias"].role == ROLE_FROZEN  # decided again at merge time: a tuner may change a bias
    assert p["v.weight"].role == ROLE_FROZEN and p["v.weight"].sources == ("base_model.model.v.weight",)


def test_modules_to_save_copy_has_its_own_role():
    p = plan(peft_block(modules_to_save=["proj"]))
    assert p["proj.weight"].role == ROLE_SAVED_COPY and p["proj.bias"].role == ROLE_SAVED_COPY
    assert p["proj.weight"].sources == ("base_model.model.proj.modules_to_save.default.weight",)


def test_an_inactive_adapter_is_reported_not_merged():
    from peft import LoraConfig
    model = peft_block()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q"]))  # added, never activated
    walk = plan_merged_tensors(model)
    assert walk.inactive == {"other": ["q"]}
    q = next(st for st in walk.tensors if st.name == "q.weight")
    assert not any(".other." in s for s in q.sources)
