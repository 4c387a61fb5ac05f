"""verify_snapshot on a fresh export of a tiny random Qwen2: clean, then one change at a time, each
reported naming the file it concerns."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import xxhash
from safetensors import safe_open

from conftest import smallest_qwen2
from sa2va_hooks import export_hf
from sa2va_hooks.core.shard_check import read_safetensors_header
from sa2va_hooks.core.verify import SnapshotInputError, verify_snapshot


def _tiny(seed: int):
    return smallest_qwen2(seed)


@pytest.fixture(scope="module")
def snapshot_factory(tmp_path_factory):
    src = tmp_path_factory.mktemp("verify_src") / "snap"
    export_hf(_tiny(seed=21), src, max_shard_size="4KB")
    n = [0]

    def fresh(tmp_path):
        n[0] += 1
        dst = tmp_path / f"copy{n[0]}"
        shutil.copytree(src, dst)
        return dst
    return fresh


def _shards(d):
    return sorted(d.glob("*.safetensors"))


def test_fresh_export_verifies_clean(snapshot_factory, tmp_path):
    snap = snapshot_factory(tmp_path)
    assert len(_shards(snap)) >= 2  # the index and several shards are checked too
    assert verify_snapshot(snap) == []


def test_one_changed_data_byte_names_the_tensor_and_file(snapshot_factory, tmp_path):
    snap = snapshot_factory(tmp_path)
    shard = _shards(snap)[0]
    raw, header = read_safetensors_header(shard)
    header.pop("__metadata__", None)
    name, entry = max(header.items(), key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    data = bytearray(shard.read_bytes())
    data[len(raw) + entry["data_offsets"][0] + 1] ^= 0x40  # a byte inside that tensor, size unchanged
    shard.write_bytes(bytes(data))
    with safe_open(str(shard), framework="pt") as f:  # safetensors' own reader sees the change
        assert f.get_tensor(name).numel() > 0
    problems = verify_snapshot(snap)
    assert problems and all(shard.name in p for p in problems), problems
    assert any(name in p for p in problems), problems
    # header-only verification does not read the data, and the file records hold only the header's digest
    assert verify_snapshot(snap, data=False) == []


def test_missing_shard_is_named(snapshot_factory, tmp_path):
    snap = snapshot_factory(tmp_path)
    gone = _shards(snap)[-1]
    gone.unlink()
    problems = verify_snapshot(snap)
    assert f"missing file {gone.name}" in problems, problems


def test_extra_file_is_named(snapshot_factory, tmp_path):
    snap = snapshot_factory(tmp_path)
    (snap / "notes.txt").write_text("not exported")
    assert verify_snapshot(snap) == ["extra file notes.txt"]


def test_changed_config_is_named_and_no_manifest_is_bad_input(snapshot_factory, tmp_path):
    snap = snapshot_factory(tmp_path)
    cfg = json.loads((snap / "config.json").read_text())
    cfg["vocab_size"] = 33
    (snap / "config.json").write_text(json.dumps(cfg))
    problems = verify_snapshot(snap)
    assert any(p.startswith("mismatch size of config.json") for p in problems), problems
    assert any("vocab_size" in p for p in problems), problems
    (snap / "export_manifest.json").unlink()
    with pytest.raises(SnapshotInputError):
        verify_snapshot(snap)


# -- digest versions: a snapshot whose manifest holds v1 digests (written before digest v2) --------------
V1 = "xxh3_128(name,dtype,shape,bytes);v1"


def _v1_digest(name, t) -> str:
    """v1, written here with xxhash directly: one xxh3-128 stream over [name, dtype, shape] and the bytes."""
    header = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()
    return xxhash.xxh3_128(header + t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _as_v1_snapshot(snap) -> None:
    """Rewrite the manifest as a v1 export wrote it: v1 digests (computed independently), v1 root, v1 format."""
    manifest = json.loads((snap / "export_manifest.json").read_text())
    assert manifest["format"] == "sa2va_hooks.export_manifest/v2"
    for name, entry in manifest["tensors"].items():
        assert entry["algorithm"] == manifest["digest_algorithm"] != V1
        with safe_open(str(snap / entry["file"]), framework="pt") as f:
            entry["digest"] = _v1_digest(name, f.get_tensor(name))
        entry["algorithm"] = V1
    lines = sorted(f"{n}={e['digest']}" for n, e in manifest["tensors"].items())
    manifest["root_digest"] = xxhash.xxh3_128("\n".join(lines).encode()).hexdigest()
    manifest["format"] = "sa2va_hooks.export_manifest/v1"
    del manifest["digest_algorithm"]
    (snap / "export_manifest.json").write_text(json.dumps(manifest))


def _flip_a_data_byte(snap) -> str:
    shard = _shards(snap)[0]
    raw, header = read_safetensors_header(shard)
    header.pop("__metadata__", None)
    name, entry = max(header.items(), key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    data = bytearray(shard.read_bytes())
    data[len(raw) + entry["data_offsets"][0]] ^= 0x01
    shard.write_bytes(bytes(data))
    return name


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_flipped_byte_fails_and_an_intact_snapshot_passes_in_either_digest_version(snapshot_factory, tmp_path,
                                                                                       version):
    snap = snapshot_factory(tmp_path)
    if version == "v1":
        _as_v1_snapshot(snap)
    assert verify_snapshot(snap) == []
    name = _flip_a_data_byte(snap)
    problems = verify_snapshot(snap)
    assert any(p.startswith(f"mismatch {name}: expected ") for p in problems), problems


def test_a_digest_algorithm_this_version_does_not_know_is_reported_not_compared(snapshot_factory, tmp_path):
    snap = snapshot_factory(tmp_path)
    manifest = json.loads((snap / "export_manifest.json").read_text())
    name = sorted(manifest["tensors"])[0]
    manifest["tensors"][name]["algorithm"] = "blake3(name,dtype,shape,bytes);v9"
    (snap / "export_manifest.json").write_text(json.dumps(manifest))
    problems = verify_snapshot(snap)
    assert problems == [f"unverifiable tensor {name}: its digest algorithm 'blake3(name,dtype,shape,bytes);v9' is "
                        f"unknown to this sa2va_hooks (written by a newer one?); upgrade to check it"], problems


def test_cli_fingerprint_of_a_v1_snapshot_is_consistent_and_a_v1_previous_snapshot_is_never_linked(
        snapshot_factory, tmp_path, capsys):
    from sa2va_hooks.cli import main
    from sa2va_hooks.core.manifest import ExportManifest
    from sa2va_hooks.core.publish import _Previous
    snap = snapshot_factory(tmp_path)
    v2_entries = dict(ExportManifest.load(snap).tensors)
    _as_v1_snapshot(snap)
    assert main(["fingerprint", str(snap)]) == 0
    assert "consistent: True" in capsys.readouterr().out
    previous = _Previous(snap, ExportManifest.load(snap))
    fname = sorted({e["file"] for e in v2_entries.values()})[0]
    slots = [type("Slot", (), {"name": n})() for n, e in v2_entries.items() if e["file"] == fname]
    # even equal digest strings are not linked when the previous record names another algorithm: write instead
    previous.tensors = {n: {**e, "algorithm": V1} for n, e in v2_entries.items()}
    assert previous.same_shard(fname, slots, {n: e["digest"] for n, e in v2_entries.items()}) is False
