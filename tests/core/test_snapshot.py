"""core/snapshot.py on a small model with fresh random weights, a trainable part, a frozen part and a
BatchNorm's running statistics: what a capture copies, that later training does not reach the copy,
that an in-place write to an uncaptured tensor is caught, and that fingerprints of the capture equal
``core.fingerprint`` on the live tensors at the moment of the capture."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sa2va_hooks.core.fingerprint import fingerprint_tensor
from sa2va_hooks.core.snapshot import (Capture, ModelChangedError, SnapshotBuffers, fingerprint_capture, live, read,
                                       substituted)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    m[0].requires_grad_(False)  # frozen
    m(torch.randn(4, 6))  # running statistics differ from their initial values
    return m


def _step(m: nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(1.0)
    m(torch.randn(4, 6))


def test_capture_copies_trainable_params_and_buffers_and_versions_the_rest():
    m = _model(int(torch.randint(0, 10 ** 6, (1,))))
    before = {n: t.detach().clone() for n, t in [*m.named_parameters(), *m.named_buffers()]}
    cap = SnapshotBuffers().capture(m, stats=True)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert sorted(cap.trainable) == sorted(trainable)
    assert set(cap.by_name) == set(trainable) | {n for n, _ in m.named_buffers()}
    assert set(cap.versions) == {n for n, p in m.named_parameters() if not p.requires_grad}
    assert cap.background and cap.nbytes == sum(b.numel() * b.element_size() for b in cap.by_name.values())
    _step(m)  # training goes on: the captured copies keep the moment of the capture
    for n, buf in cap.by_name.items():
        assert torch.equal(buf, before[n]) and not torch.equal(buf, dict([*m.named_parameters(),
                                                                          *m.named_buffers()])[n]), n
    for n, (norm, total) in cap.stats.items():
        ref = before[n].double()
        assert norm == pytest.approx(float(ref.norm()), rel=1e-12) and total == pytest.approx(float(ref.sum()),
                                                                                             rel=1e-9, abs=1e-12)


def test_live_and_read_see_the_capture_only_while_substituted():
    m = _model(1)
    w = m[2].weight
    cap = SnapshotBuffers().capture(m)
    _step(m)
    assert live(w) is w
    with substituted(cap):
        assert torch.equal(live(w), cap.by_name["2.weight"]) and not torch.equal(live(w), w)
        t, private = read(w)
        assert t is cap.by_name["2.weight"] and private is False
        frozen = m[0].weight
        assert live(frozen) is frozen and read(frozen) == (frozen, False)
    assert live(w) is w
    with substituted(None):
        assert live(w) is w


def test_an_in_place_write_to_an_uncaptured_tensor_is_caught():
    m = _model(2)
    cap = SnapshotBuffers().capture(m)
    cap.check_unchanged("the test")
    with torch.no_grad():
        m[0].weight.mul_(1.0)  # the value is the same, but the tensor was written
    with pytest.raises(ModelChangedError, match=r"1 parameter\(s\) were modified in place while the test was reading "
                                                r"the model, e.g. \['0.weight'\].*make them trainable"):
        cap.check_unchanged("the test")
    sync = Capture.nothing(m)
    with torch.no_grad():
        m[2].bias.add_(1)
    with pytest.raises(ModelChangedError, match=r"\['2.bias'\].*export when no optimizer step can run"):
        sync.check_unchanged("export")


def test_buffers_are_allocated_once_and_reused():
    m = _model(3)
    bufs = SnapshotBuffers()
    nbytes = bufs.prepare(m)
    first = bufs.capture(m)
    _step(m)
    second = bufs.capture(m)
    assert nbytes == bufs.nbytes == first.nbytes
    assert all(first.by_name[n] is second.by_name[n] for n in first.by_name)


@pytest.mark.parametrize("stats", [False, True])
def test_fingerprints_of_the_capture_equal_those_of_the_live_tensors_then(stats):
    m = _model(int(torch.randint(0, 10 ** 6, (1,))))
    ref = {n: fingerprint_tensor(n, p.detach()) for n, p in m.named_parameters() if p.requires_grad}
    cap = SnapshotBuffers().capture(m, stats=stats)
    _step(m)
    got = fingerprint_capture(cap, workers=2)
    assert got.keys() == ref.keys()
    for n in ref:
        assert (got[n].digest, got[n].dtype, got[n].shape) == (ref[n].digest, ref[n].dtype, ref[n].shape)
        assert got[n].norm == pytest.approx(ref[n].norm, rel=1e-12)
        assert got[n].sum == pytest.approx(ref[n].sum, rel=1e-9, abs=1e-12)


def test_a_background_reader_merges_from_the_parameters_a_module_held_at_the_capture():
    """FSDP (use_orig_params) replaces a module's parameters by plain tensors while its forward runs; an
    export reading the module then must use what the module held at the capture, not the live
    attribute (seen on 2 H200s: KeyError 'weight', then 'data is not allocated yet'). Reference: PEFT's
    own merge_and_unload of an untouched copy."""
    import copy

    from conftest import lora_qwen2
    from sa2va_hooks.core.materialize import MergeGroup
    from sa2va_hooks.core.snapshot import substituted

    pm = lora_qwen2()
    want = copy.deepcopy(pm).merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    capture = Capture({}, {}, {}, 0, partitioned=True, module_params={id(m): dict(m._parameters) for m in pm.modules()})
    base = layer.base_layer
    del base._parameters["weight"]  # as FSDP does mid-forward: a plain tensor, its storage freed
    base.weight = torch.empty(0)
    with substituted(capture):
        got = MergeGroup(layer, "q_proj", ["default"]).take("weight")
    assert torch.equal(got, want)
    from sa2va_hooks.core.materialize import UnsupportedModuleError
    with pytest.raises(UnsupportedModuleError, match="must match the size"):  # the live module, without it
        MergeGroup(layer, "q_proj", ["default"]).take("weight")


def _mixed_unit():
    """An FSDP unit with frozen and trainable parameters: one local shard (one version counter, which
    every optimizer step bumps), [0, 24) frozen "a.weight", [24, 40) trainable "b.weight"."""
    from sa2va_hooks.core.partitions import Piece
    torch.manual_seed(3)
    shard = torch.randn(40)
    frozen, trained = nn.Parameter(torch.empty(0), requires_grad=False), nn.Parameter(torch.empty(0))
    a = Piece("a.weight", (4, 6), shard.dtype, 0, 24, shard, 0, True)
    b = Piece("b.weight", (4, 4), shard.dtype, 0, 16, shard, 24, False)
    return shard, frozen, trained, a, b


def test_a_frozen_slice_sharing_storage_with_a_trained_one_is_read_live_and_checked_by_content(monkeypatch):
    """On a GPU (forced here: the check is the same on any device) the frozen slice is not copied; a
    write to the trained slice is training (no error), a write to the frozen slice is caught by
    content, naming it."""
    import sa2va_hooks.core.snapshot as snapshot
    monkeypatch.setattr(snapshot, "checks_by_content", lambda piece: piece.shared)
    shard, frozen, trained, a, b = _mixed_unit()
    at_capture = shard.clone()
    cap = SnapshotBuffers()._capture_pieces(nn.Module(), [(frozen, a), (trained, b)])
    assert list(cap.live_pieces.values()) == [a] and [p.name for p, _ in cap.pieces.values()] == ["b.weight"]
    assert cap.nbytes == 16 * 4 and cap.versions == {}  # only the trained slice was copied
    assert torch.equal(cap.pieces[id(trained)][1], at_capture[24:])
    shard[24:].add_(1.0)  # an optimizer step: the shared version counter moves, the frozen bytes do not
    cap.check_unchanged("the test")
    shard[5] = shard[5] * 2 + 1  # a write to the frozen slice
    with pytest.raises(ModelChangedError, match=r"1 parameter\(s\) were modified in place .*\['a.weight'\]"):
        cap.check_unchanged("the test")


def test_on_the_cpu_a_frozen_slice_sharing_storage_is_copied_at_the_capture():
    """On the CPU the statistics would cost far more than the copy (decision 63): both slices are
    copied, so a later write to either leaves the capture as it was."""
    shard, frozen, trained, a, b = _mixed_unit()
    at_capture = shard.clone()
    cap = SnapshotBuffers()._capture_pieces(nn.Module(), [(frozen, a), (trained, b)])
    assert cap.live_pieces == {} and cap.checked == [] and cap.nbytes == 40 * 4
    shard.add_(1.0)
    cap.check_unchanged("the test")
    assert torch.equal(cap.pieces[id(frozen)][1], at_capture[:24])
    assert torch.equal(cap.pieces[id(trained)][1], at_capture[24:])
