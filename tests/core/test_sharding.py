"""core/sharding.py on plain (unsharded) modules and on tensors dressed as DeepSpeed ZeRO-3 and FSDP
placeholders: logical shapes, the full-tensor check, names and the walk over whole parameters.
The reference is ``nn.Module.named_parameters`` on the same model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sa2va_hooks.core import sharding


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 3), nn.LayerNorm(3)))
    m[2][0].weight.requires_grad_(False)
    return m


@pytest.mark.parametrize("seed", [0, 1])
def test_walk_of_an_unsharded_model_is_named_parameters_filtered(seed):
    m = _model(seed)
    keep = lambda p: p.requires_grad  # noqa: E731
    got = list(sharding.iter_whole_parameters(m, keep))
    want = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(a is b for (_, a), (_, b) in zip(got, want, strict=True))
    assert not sharding.needs_gather(m)


def test_a_shared_parameter_is_walked_once_under_its_first_name():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    m = nn.ModuleDict({"a": a, "b": b})
    names = [n for n, _ in sharding.iter_whole_parameters(m, lambda p: True)]
    assert names == [n for n, _ in m.named_parameters()] == ["a.weight", "a.bias", "b.bias"]


def test_zero3_placeholder_has_its_logical_shape_and_is_refused():
    p = torch.empty(0)
    p.ds_id, p.ds_shape = 3, torch.Size([5, 7])
    assert sharding.is_zero3_partitioned(p) and sharding.is_partitioned(p)
    assert sharding.logical_shape(p) == (5, 7)
    with pytest.raises(sharding.ShardedTensorError, match=r"tensor 'x.w' has shape \[0\] but its logical shape is "
                                                          r"\[5, 7\]"):
        sharding.check_full("x.w", p)


def test_fsdp_marked_shard_uses_the_recorded_shape():
    p = torch.zeros(3)
    setattr(p, sharding._FSDP_SHAPE, (2, 4))
    setattr(p, sharding._FSDP_UNIT, object())
    assert sharding.is_fsdp_sharded(p) and sharding.logical_shape(p) == (2, 4)
    with pytest.raises(sharding.ShardedTensorError, match=r"'s' has shape \[3\]"):
        sharding.check_full("s", p)


def test_check_full_accepts_whole_and_refuses_empty_and_wrong_shape():
    t = torch.randn(2, 3)
    sharding.check_full("w", t)
    sharding.check_full("w", t, expected=(2, 3))
    with pytest.raises(sharding.ShardedTensorError, match=r"logical shape is \[3, 2\]"):
        sharding.check_full("w", t, expected=(3, 2))
    with pytest.raises(sharding.ShardedTensorError, match="'e' has no elements"):
        sharding.check_full("e", torch.empty(0, 4))


def test_clean_name_drops_every_fsdp_wrapper():
    w = sharding.FSDP_WRAPPED
    assert sharding.clean_name(f"{w}.layers.0.{w}.mlp.weight") == "layers.0.mlp.weight"
    assert sharding.clean_name("model.weight") == "model.weight"


def test_gathered_is_a_no_op_for_unpartitioned_params():
    ps = [torch.randn(2), None, torch.randn(3)]
    before = [p.clone() for p in ps if p is not None]
    with sharding.gathered(ps):
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, [p for p in ps if p is not None], strict=True))
