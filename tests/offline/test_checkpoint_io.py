"""offline/checkpoint_io.py on small files written here: the safe loader, state-dict extraction, the
hooks' records found in a checkpoint or its sidecar, and sidecar validation. References: the tensors
saved with ``torch.save``, and fingerprints recomputed with ``core.fingerprint``."""
from __future__ import annotations

import json

import pytest
import torch

from sa2va_hooks.core.fingerprint import FingerprintSet, fingerprint_state
from sa2va_hooks.core.vocab import SIDECAR_SUFFIX
from sa2va_hooks.offline.checkpoint_io import (SidecarFormatError, SidecarNotCheckpointError, extract_state_dict,
                                               load_checkpoint, read_sidecar, recorded_fingerprints)
from sa2va_hooks.records import BASELINE_KEY, CHECKPOINT_RECORD_KEY, FROZEN_ROOT_KEY, META_KEY


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(5, generator=g).half()}


def _record(tensors, iteration: int, checkpoint: str = "iter_3.pth") -> dict:
    return {"checkpoint": checkpoint, "iter": iteration, "frozen_root": "f" * 64,
            "trained": FingerprintSet.of(fingerprint_state(tensors.items())).to_json()}


def test_safe_load_returns_the_saved_tensors(tmp_path):
    sd = _tensors(int(torch.randint(0, 10 ** 6, (1,))))
    torch.save({"state_dict": sd, "meta": {"iter": 3}}, tmp_path / "iter_3.pth")
    ckpt = load_checkpoint(tmp_path / "iter_3.pth", log=lambda s: None)
    got = extract_state_dict(ckpt)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd)


def test_a_pickled_object_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "iter_1.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": _Custom()}, path)
    with pytest.raises(Exception, match=r"needs types outside the safe list.*_Custom.*--allow-pickle"):
        load_checkpoint(path, log=lambda s: None)
    said = []
    assert isinstance(load_checkpoint(path, allow_pickle=True, log=said.append)["extra"], _Custom)
    assert said and "--allow-pickle" in said[0]


class _Custom:
    pass


@pytest.mark.parametrize("key", ["state_dict", "module", "model"])
def test_extract_state_dict_finds_each_layout(key):
    sd = _tensors(1)
    assert extract_state_dict({key: sd, "meta": {}}) == sd
    assert extract_state_dict(dict(sd)) == sd


def test_extract_state_dict_without_one_names_the_keys():
    with pytest.raises(ValueError, match=r"ckpt.pth holds no state dict: its top-level keys are \['meta', 'x'\]"):
        extract_state_dict({"meta": {}, "x": 1}, "ckpt.pth")


def test_recorded_fingerprints_from_meta_then_message_hub_then_sidecar(tmp_path):
    sd = _tensors(2)
    expected = FingerprintSet.of(fingerprint_state(sd.items()))
    path = tmp_path / "iter_3.pth"
    meta = recorded_fingerprints({"meta": {"iter": 3, META_KEY: _record(sd, 3)}}, path)
    assert meta.source == "checkpoint meta" and meta.trained.root == expected.root and meta.iteration == 3
    hub = {"meta": {"iter": 3}, "message_hub": {"runtime_info": {CHECKPOINT_RECORD_KEY: _record(sd, 3),
                                                                FROZEN_ROOT_KEY: "r" * 64}}}
    got = recorded_fingerprints(hub, path)
    assert got.source == "checkpoint message_hub" and got.trained.root == expected.root
    # a hub record of another iteration is not this checkpoint's; the sidecar beside it is used instead
    stale = {"meta": {"iter": 6}, "message_hub": {"runtime_info": {CHECKPOINT_RECORD_KEY: _record(sd, 3)}}}
    assert recorded_fingerprints(stale, path).source == "none"
    sidecar = tmp_path / ("iter_3.pth" + SIDECAR_SUFFIX)
    sidecar.write_text(json.dumps(_record(sd, 6)))
    side = recorded_fingerprints(stale, path)
    assert side.source == f"sidecar {sidecar}" and side.trained.root == expected.root and side.iteration == 6


def test_recorded_baseline_is_read_back_as_fingerprints():
    sd = _tensors(3)
    fps = fingerprint_state(sd.items())
    ckpt = {"meta": {}, "message_hub": {"runtime_info": {BASELINE_KEY: {k: v.to_json() for k, v in fps.items()}}}}
    got = recorded_fingerprints(ckpt, "x.pth")
    assert got.trained is None and got.baseline == fps


def test_a_sidecar_passed_as_checkpoint_is_called_a_sidecar(tmp_path):
    sd = _tensors(4)
    (tmp_path / "iter_3.pth").write_bytes(b"")
    sidecar = tmp_path / ("iter_3.pth" + SIDECAR_SUFFIX)
    sidecar.write_text(json.dumps(_record(sd, 3)))
    with pytest.raises(SidecarNotCheckpointError, match=r"is a fingerprint sidecar .* pass .*iter_3.pth instead"):
        load_checkpoint(sidecar)


@pytest.mark.parametrize("content,words", [
    (b"\xff\xfe", "it is not UTF-8 text"),
    (b'{"trained": ', "it is not valid JSON"),
    (b"[1, 2]", "it holds JSON of type list"),
    (b'{"checkpoint": "x", "trained": {"root": "r"}}', "it holds a JSON object with keys ['checkpoint', 'trained']"),
])
def test_read_sidecar_names_what_the_file_is(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(SidecarFormatError) as e:
        read_sidecar(path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_read_sidecar_returns_a_valid_record(tmp_path):
    rec = _record(_tensors(5), 9)
    (tmp_path / "s.json").write_text(json.dumps(rec))
    assert read_sidecar(tmp_path / "s.json") == rec
