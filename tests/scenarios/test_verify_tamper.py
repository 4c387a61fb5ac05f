"""`verify` cannot be fooled: a table of tampers, each applied to a fresh copy of a real snapshot.

Two real snapshots: the tiny Sa2VA run's in-loop export (remote code, tokenizer files, one shard)
and a sharded export of a tiny PEFT Qwen2 (index, several shards, generation config). Each case
changes one thing (a byte of a shard's length prefix, header, metadata or data; one file of each
kind; one manifest field) and states the exit code it must get and words the output must hold:
1 where the snapshot differs from its manifest, 2 where the input is not something verify can check.
The untouched copies must verify with 0, so a case that passes proves the tamper was caught.
"""
from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model

from conftest import tiny_qwen2, train_like
from sa2va_hooks import export_hf
from sa2va_hooks.cli import main as cli
from sa2va_hooks.core.verify import read_safetensors_header

MANIFEST = "export_manifest.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, trained_run):
    _, work = trained_run
    root = tmp_path_factory.mktemp("pristine")
    shutil.copytree(work / "hf" / "iter_6", root / "sa2va")
    pm = get_peft_model(tiny_qwen2(seed=11), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        modules_to_save=["lm_head"]))
    train_like(pm, seed=12)
    gen = pm.get_base_model().generation_config
    gen.do_sample, gen.top_k = True, 7  # a non-default generation_config.json is written
    export_hf(pm, root / "sharded", dtype="bf16", max_shard_size="12KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) >= 3
    # every tensor trained: one group, so one model.safetensors (a model with frozen tensors is at least
    # two files, the frozen ones apart, so the sa2va snapshot no longer is one)
    export_hf(tiny_qwen2(seed=13), root / "single", dtype="bf16")
    assert [p.name for p in (root / "single").glob("*.safetensors")] == ["model.safetensors"]
    return root


def _verify(path: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli(["verify", str(path)])
    return rc, out.getvalue() + err.getvalue()


# ---------------------------------------------------------------- tamper helpers

def _shard(d: Path) -> Path:
    return sorted(d.glob("*.safetensors"))[0]


def _flip(path: Path, offset: int, xor: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= xor
    path.write_bytes(bytes(data))


def _header_len(path: Path) -> int:
    return len(read_safetensors_header(path)[0])


def _replace_in_header(old: bytes, new: bytes, nth: int = 0):
    """Replace the nth occurrence of ``old`` inside the shard's JSON header, same length."""
    assert len(old) == len(new)

    def tamper(d: Path) -> None:
        p = _shard(d)
        data = bytearray(p.read_bytes())
        n = _header_len(p)
        at, start = -1, 8
        for _ in range(nth + 1):
            at = data.index(old, start, n)
            start = at + 1
        data[at:at + len(old)] = new
        p.write_bytes(bytes(data))
    return tamper


def _shape_digit(d: Path) -> None:
    """The first digit of the first shape in the shard's header, changed to another digit."""
    p = _shard(d)
    data = bytearray(p.read_bytes())
    at = data.index(b'"shape":[', 8, _header_len(p)) + len(b'"shape":[')
    data[at] = ord("3") if data[at] != ord("3") else ord("4")
    p.write_bytes(bytes(data))


def _data_byte(where: str):
    def tamper(d: Path) -> None:
        p = _shard(d)
        n, size = _header_len(p), p.stat().st_size
        _flip(p, {"first": n, "middle": (n + size) // 2, "last": size - 1}[where])
    return tamper


def _edit_json(rel: str, edit):
    def tamper(d: Path) -> None:
        p = d / rel
        obj = json.loads(p.read_text())
        edit(obj)
        p.write_text(json.dumps(obj, indent=2))
    return tamper


def _first_tensor(m: dict) -> str:
    return sorted(m["tensors"])[0]


def _manifest(edit):
    return _edit_json(MANIFEST, edit)


def _file_byte(rel: str):
    def tamper(d: Path) -> None:
        p = d / rel
        data = bytearray(p.read_bytes())
        i = data.index(b'"') + 1 if b'"' in data else len(data) // 2  # inside the first string: still valid text
        data[i] = ord("Z") if data[i] != ord("Z") else ord("Y")
        p.write_bytes(bytes(data))
    return tamper


def _delete(rel: str):
    return lambda d: (d / rel).unlink()


def _truncate(rel_or_shard: str, keep: int | None = None):
    def tamper(d: Path) -> None:
        p = _shard(d) if rel_or_shard == "shard" else d / rel_or_shard
        data = p.read_bytes()
        p.write_bytes(data[: (len(data) - 1) if keep is None else keep])
    return tamper


def _other_shard(m: dict) -> str:
    files = sorted({t["file"] for t in m["tensors"].values()})
    return files[1]


def _retarget_index(obj: dict) -> None:
    k = sorted(obj["weight_map"])[0]
    others = sorted(set(obj["weight_map"].values()) - {obj["weight_map"][k]})
    obj["weight_map"][k] = others[0]


def _shard_name(d: Path) -> str:
    return _shard(d).name


def _rename_shard(d: Path) -> None:
    p = _shard(d)
    p.rename(p.with_name("renamed.safetensors"))


def _set_tensor_file(m: dict) -> None:
    m["tensors"][_first_tensor(m)]["file"] = _other_shard(m)


def _header_sha(m: dict) -> None:
    f = sorted(k for k in m["files"] if k.endswith(".safetensors"))[0]
    m["files"][f]["header_sha256"] = "0" * 64


def _fake_tensor(m: dict) -> None:
    t = dict(m["tensors"][_first_tensor(m)])
    m["tensors"]["model.invented.weight"] = t


# case id -> (which snapshot, tamper, exit code, words the output must hold)
CASES = {
    # a shard, byte by byte region
    "shard_length_prefix_low_byte": ("sharded", lambda d: _flip(_shard(d), 0, 0x10), 1, "header of model-00001"),
    "shard_length_prefix_high_byte": ("sharded", lambda d: _flip(_shard(d), 7, 0x01), 1, "corrupt header"),
    "shard_metadata_value": ("sharded", _replace_in_header(b'"pt"', b'"pu"'), 1, "__metadata__"),
    "shard_metadata_key": ("sharded", _replace_in_header(b'"format"', b'"formax"'), 1, "__metadata__"),
    "shard_header_dtype": ("sharded", _replace_in_header(b'"BF16"', b'"F16"\x20'), 1, "model-00001"),
    "shard_header_shape": ("sharded", lambda d: _shape_digit(d), 1, "model-00001"),
    "shard_header_offset_digit": ("sharded", _replace_in_header(b'"data_offsets":[0,', b'"data_offsets":[1,'), 1,
                                  "model-00001"),
    "shard_header_tensor_name": ("sharded", _replace_in_header(b'weight"', b'weighx"'), 1,
                                 "model-00001"),
    "shard_header_padding": ("sharded", lambda d: _flip(_shard(d), _header_len(_shard(d)) - 1, 0x20 ^ 0x09), 1,
                             "model-00001"),
    "shard_data_first_byte": ("sharded", _data_byte("first"), 1, "model-00001"),
    "shard_data_middle_byte": ("sharded", _data_byte("middle"), 1, "model-00001"),
    "shard_data_last_byte": ("sharded", _data_byte("last"), 1, "model-00001"),
    "shard_truncated_by_one": ("sharded", _truncate("shard"), 1, "model-00001"),
    "shard_emptied": ("sharded", _truncate("shard", keep=0), 1, "model-00001"),
    "shard_byte_appended": ("sharded", lambda d: _shard(d).open("ab").write(b"\0"), 1, "model-00001"),
    "shard_deleted": ("sharded", lambda d: _shard(d).unlink(), 1, "missing file model-00001"),
    "shard_renamed": ("sharded", _rename_shard, 1, "extra file renamed.safetensors"),
    "single_shard_data_byte": ("single", _data_byte("middle"), 1, "model.safetensors"),
    "single_shard_metadata": ("single", _replace_in_header(b'"pt"', b'"tp"'), 1, "__metadata__ of model.safetensors"),
    "sa2va_frozen_shard_data_byte": ("sa2va", _data_byte("middle"), 1, "model-00001-of-00002.safetensors"),
    # the index
    "index_weight_map_retargeted": ("sharded", _edit_json("model.safetensors.index.json", _retarget_index), 1,
                                    "index maps"),
    "index_total_size": ("sharded", _edit_json("model.safetensors.index.json",
                                               lambda o: o["metadata"].update(total_size=1)), 1, "total_size"),
    "index_truncated": ("sharded", _truncate("model.safetensors.index.json", keep=10), 1, "index.json"),
    "index_deleted": ("sharded", _delete("model.safetensors.index.json"), 1, "index.json"),
    # every other kind of file
    "config_value": ("sharded", _edit_json("config.json", lambda o: o.update(vocab_size=o["vocab_size"] + 1)), 1,
                     "config.json"),
    "config_byte": ("sa2va", _file_byte("config.json"), 1, "config.json"),
    "config_deleted": ("sa2va", _delete("config.json"), 1, "missing file config.json"),
    "generation_config_byte": ("sharded", _file_byte("generation_config.json"), 1, "generation_config.json"),
    "tokenizer_json_byte": ("sa2va", _file_byte("tokenizer.json"), 1, "tokenizer.json"),
    "tokenizer_config_byte": ("sa2va", _file_byte("tokenizer_config.json"), 1, "tokenizer_config.json"),
    # transformers 5 writes no special_tokens_map.json: the tokenizer file that is there
    "tokenizer_file_deleted": ("sa2va", lambda d: next(d / n
                                                       for n in ("special_tokens_map.json", "tokenizer_config.json")
                                                       if (d / n).exists()).unlink(), 1, "missing file"),
    "remote_code_modeling_byte": ("sa2va", _file_byte("modeling_tiny_sa2va.py"), 1, "modeling_tiny_sa2va.py"),
    "remote_code_configuration_deleted": ("sa2va", _delete("configuration_tiny_sa2va.py"), 1,
                                          "configuration_tiny_sa2va.py"),
    "extra_file_added": ("sa2va", lambda d: (d / "notes.txt").write_text("x"), 1, "extra file notes.txt"),
    # each manifest field, changed to another well-formed value: a mismatch
    "manifest_tensor_digest": ("sharded", _manifest(lambda m: m["tensors"][_first_tensor(m)].update(
        digest="0" * 32)), 1, "mismatch"),
    "manifest_tensor_dtype": ("sharded", _manifest(lambda m: m["tensors"][_first_tensor(m)].update(dtype="float16")),
                              1, "mismatch dtype"),
    "manifest_tensor_shape": ("sharded", _manifest(lambda m: m["tensors"][_first_tensor(m)].update(
        shape=[1] + m["tensors"][_first_tensor(m)]["shape"])), 1, "mismatch shape"),
    "manifest_tensor_file": ("sharded", _manifest(_set_tensor_file), 1, "tensor"),
    "manifest_tensor_removed": ("sharded", _manifest(lambda m: m["tensors"].pop(_first_tensor(m))), 1, "extra"),
    "manifest_tensor_invented": ("sharded", _manifest(_fake_tensor), 1, "model.invented.weight"),
    "manifest_root_digest": ("sharded", _manifest(lambda m: m.update(root_digest="f" * 32)), 1, "root digest"),
    "manifest_file_size": ("sa2va", _manifest(lambda m: m["files"]["config.json"].update(size=1)), 1,
                           "size of config.json"),
    "manifest_file_sha256": ("sa2va", _manifest(lambda m: m["files"]["config.json"].update(sha256="a" * 64)), 1,
                             "sha256 of config.json"),
    "manifest_header_sha256": ("sharded", _manifest(_header_sha), 1, "mismatch header"),
    "manifest_file_dropped": ("sa2va", _manifest(lambda m: m["files"].pop("tokenizer.json")), 1,
                              "extra file tokenizer.json"),
    # a manifest that is not a manifest: bad input
    "manifest_truncated": ("sa2va", _truncate(MANIFEST, keep=100), 2, "export_manifest.json is not valid JSON"),
    "manifest_deleted": ("sa2va", _delete(MANIFEST), 2, "export_manifest.json does not exist"),
    "manifest_not_an_object": ("sa2va", lambda d: (d / MANIFEST).write_text("[1, 2]"), 2, "expected a JSON object"),
    "manifest_format": ("sa2va", _manifest(lambda m: m.update(format="something/v9")), 2, "format"),
    "manifest_tensor_file_missing": ("sa2va", _manifest(lambda m: m["tensors"][_first_tensor(m)].pop("file")), 2,
                                     ".file: missing"),
    "manifest_tensor_shape_string": ("sa2va", _manifest(lambda m: m["tensors"][_first_tensor(m)].update(shape="16")),
                                     2, ".shape: malformed"),
    "manifest_tensor_file_escapes": ("sa2va", _manifest(lambda m: m["tensors"][_first_tensor(m)].update(
        file="../model.safetensors")), 2, ".file: malformed"),
    "manifest_tensors_a_list": ("sa2va", _manifest(lambda m: m.update(tensors=[])), 2, "tensors: expected dict"),
    "manifest_file_size_negative": ("sa2va", _manifest(lambda m: m["files"]["config.json"].update(size=-5)), 2,
                                    "files.config.json.size: malformed"),
    "manifest_root_digest_missing": ("sa2va", _manifest(lambda m: m.pop("root_digest")), 2, "root_digest: missing"),
    "manifest_tensors_empty": ("sa2va", _manifest(lambda m: m.update(tensors={})), 1, "lists no tensors"),
}


def test_the_table_is_large_enough():
    assert len([c for c in CASES.values() if c[2] != 0]) >= 40


@pytest.mark.parametrize("which", ["sa2va", "sharded", "single"])
def test_untouched_snapshots_verify(pristine, which):
    rc, out = _verify(pristine / which)
    assert rc == 0 and out.startswith("OK:"), out


@pytest.mark.parametrize("case", sorted(CASES))
def test_tamper_is_caught_with_the_right_exit_code(pristine, tmp_path, case):
    which, tamper, want_rc, words = CASES[case]
    d = tmp_path / which
    shutil.copytree(pristine / which, d)
    tamper(d)
    rc, out = _verify(d)
    assert rc == want_rc, f"{case}: exit {rc}, wanted {want_rc}\n{out}"
    assert words in out, f"{case}: {words!r} not in\n{out}"


@pytest.mark.parametrize("what", ["plain_hf_folder", "empty_folder", "a_file", "nothing"])
def test_bad_input_is_exit_2_naming_the_path(tmp_path, what):
    target = tmp_path / what
    if what == "plain_hf_folder":
        tiny_qwen2().save_pretrained(target)
    elif what == "empty_folder":
        target.mkdir()
    elif what == "a_file":
        target.write_text("hello")
    rc, out = _verify(target)
    assert rc == 2, out
    assert str(target) in out and "error:" in out, out
