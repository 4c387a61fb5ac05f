"""Reading ``export_manifest.json`` (``sa2va_hooks.core.manifest``): ``ExportManifest.from_json``,
``ExportManifest.load`` and ``manifest_problems``, on hand-written dicts and files; no export.

A manifest comes with a snapshot from elsewhere, so it is untrusted input. Pinned here:
- a valid minimal manifest (only the required fields) round-trips: ``from_json`` fills the optional
  fields with the defaults written out below, and ``to_json``/``load`` give it back unchanged;
- each malformed field, one at a time, is reported as a ``ManifestError`` whose message names the
  source (the file) and the field's dotted path (``tensors.NAME.shape``), and only that field is
  reported (no follow-on KeyError, no noise about fields that are fine);
- ``load``: a missing directory or manifest is FileNotFoundError naming the path; a manifest that is
  not JSON, nested too deeply, a symlink or a directory is a ``ManifestError`` naming the file.
"""
from __future__ import annotations

import copy
import json
import os

import pytest

from sa2va_hooks.core.manifest import (MANIFEST_FILE, MANIFEST_FORMAT, ExportManifest, ManifestError,
                                       manifest_problems)

T = "lm_head.weight"  # a tensor name with a dot, as they all have
F = "model.safetensors"
VALID = {
    "format": MANIFEST_FORMAT,
    "converter": "causal_lm",
    "dtype": "bfloat16",
    "tensors": {T: {"file": F, "digest": "0123abcd", "dtype": "bfloat16", "shape": [4, 8]},
                "scale": {"file": F, "digest": "ff", "dtype": "float32", "shape": []}},
    "root_digest": "ab" * 32,
    "files": {F: {"size": 1234, "sha256": "0" * 64, "header_sha256": "f" * 64}, "config.json": {"size": 0}},
    "trained": {},
    "training_effect": {},
}
DEFAULTS = {"provenance": {}, "tied": {}, "dropped": {}, "renamed": {}, "notes": [], "readback_verified": False,
            "storage": {}, "digest_algorithm": "xxh3_128(name,dtype,shape,bytes);v1"}  # naming none: v1


def valid() -> dict:
    return copy.deepcopy(VALID)


def test_a_valid_minimal_manifest_round_trips():
    assert manifest_problems(valid()) == []
    m = ExportManifest.from_json(valid())
    assert m.to_json() == {**VALID, **DEFAULTS}
    assert ExportManifest.from_json(m.to_json()) == m
    assert ExportManifest.from_json(json.loads(json.dumps(m.to_json()))) == m


def test_optional_fields_are_kept_and_unknown_keys_ignored():
    d = {**valid(), "tied": {"lm_head.weight": "embed.weight"}, "dropped": {"x": "rotary cache"},
         "renamed": {"a.gamma": "a.g_weight"}, "notes": ["n"], "readback_verified": True,
         "provenance": {"step": 3}, "storage": {"written": 1}, "written_by_a_newer_version": 1}
    m = ExportManifest.from_json(d)
    assert m.tied == {"lm_head.weight": "embed.weight"} and m.readback_verified is True and m.notes == ["n"]
    assert "written_by_a_newer_version" not in m.to_json()


def test_load_reads_the_manifest_of_a_snapshot_directory(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(valid()))
    assert ExportManifest.load(tmp_path) == ExportManifest.from_json(valid())
    assert ExportManifest.load(str(tmp_path)).to_json() == {**VALID, **DEFAULTS}


def _set(path: list, value):
    def mutate(d):
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return mutate


def _del(path: list):
    def mutate(d):
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return mutate


REQUIRED = ["format", "converter", "dtype", "tensors", "root_digest", "files", "trained", "training_effect"]
WRONG_TYPE = {"format": 1, "converter": None, "dtype": ["bf16"], "tensors": [], "root_digest": 12,
              "files": "model.safetensors", "trained": [], "training_effect": 0, "provenance": [], "tied": [],
              "dropped": "x", "renamed": 1, "notes": "a note", "readback_verified": "yes", "storage": []}

MALFORMED = [  # (id, mutation, the field path the report must name)
    *[(f"missing-{k}", _del([k]), f"{k}: missing") for k in REQUIRED],
    *[(f"type-{k}", _set([k], v), f"{k}: expected ") for k, v in WRONG_TYPE.items()],
    ("format-other", _set(["format"], "sa2va_hooks.export_manifest/v0"),
     "format: 'sa2va_hooks.export_manifest/v0' is not"),
    ("root-not-hex", _set(["root_digest"], "xyz"), "root_digest: 'xyz' is not a hex digest"),
    ("root-upper", _set(["root_digest"], "AB" * 32), f"root_digest: {'AB' * 32!r} is not a hex digest"),
    ("root-empty", _set(["root_digest"], ""), "root_digest: '' is not a hex digest"),
    ("tensor-not-object", _set(["tensors", T], [1, 2]), f"tensors.{T}: expected an object, got list"),
    ("tensor-file-missing", _del(["tensors", T, "file"]), f"tensors.{T}.file: missing"),
    ("tensor-file-absolute", _set(["tensors", T, "file"], "/etc/passwd"), f"tensors.{T}.file: malformed value"),
    ("tensor-file-dotdot", _set(["tensors", T, "file"], "../model.safetensors"), f"tensors.{T}.file: malformed value"),
    ("tensor-file-empty", _set(["tensors", T, "file"], ""), f"tensors.{T}.file: malformed value"),
    ("tensor-file-int", _set(["tensors", T, "file"], 3), f"tensors.{T}.file: malformed value"),
    ("tensor-file-unknown", _set(["tensors", T, "file"], "model-2.safetensors"),
     f"tensors.{T}.file: 'model-2.safetensors' is not among the manifest's files"),
    ("tensor-digest-missing", _del(["tensors", T, "digest"]), f"tensors.{T}.digest: missing"),
    ("tensor-digest-not-hex", _set(["tensors", T, "digest"], "g0"), f"tensors.{T}.digest: malformed value 'g0'"),
    ("tensor-digest-empty", _set(["tensors", T, "digest"], ""), f"tensors.{T}.digest: malformed value"),
    ("tensor-dtype-missing", _del(["tensors", T, "dtype"]), f"tensors.{T}.dtype: missing"),
    ("tensor-dtype-unstorable", _set(["tensors", T, "dtype"], "complex64"),
     f"tensors.{T}.dtype: malformed value 'complex64' (not one of bfloat16, bool, float16"),
    ("tensor-dtype-torch-prefix", _set(["tensors", T, "dtype"], "torch.float32"),
     f"tensors.{T}.dtype: malformed value"),
    ("tensor-shape-missing", _del(["tensors", T, "shape"]), f"tensors.{T}.shape: missing"),
    ("tensor-shape-negative", _set(["tensors", T, "shape"], [4, -1]), f"tensors.{T}.shape: malformed value [4, -1]"),
    ("tensor-shape-bool", _set(["tensors", T, "shape"], [True]), f"tensors.{T}.shape: malformed value"),
    ("tensor-shape-float", _set(["tensors", T, "shape"], [4.0]), f"tensors.{T}.shape: malformed value"),
    ("tensor-shape-string", _set(["tensors", T, "shape"], "4,8"), f"tensors.{T}.shape: malformed value"),
    ("file-not-object", _set(["files", F], 1234), f"files.{F}: expected an object, got int"),
    ("file-size-missing", _del(["files", F, "size"]), f"files.{F}.size: missing"),
    ("file-size-negative", _set(["files", F, "size"], -1), f"files.{F}.size: malformed value -1"),
    ("file-size-bool", _set(["files", F, "size"], True), f"files.{F}.size: malformed value True"),
    ("file-size-string", _set(["files", F, "size"], "1234"), f"files.{F}.size: malformed value '1234'"),
    ("file-sha-short", _set(["files", F, "sha256"], "0" * 63), f"files.{F}.sha256: malformed value"),
    ("file-sha-not-hex", _set(["files", F, "sha256"], "z" * 64), f"files.{F}.sha256: malformed value"),
    ("file-header-sha", _set(["files", F, "header_sha256"], None), f"files.{F}.header_sha256: malformed value None"),
    ("tied-not-string", _set(["tied"], {"lm_head.weight": 1}), "tied.lm_head.weight: expected a string, got int"),
    ("dropped-not-string", _set(["dropped"], {"x": None}), "dropped.x: expected a string, got NoneType"),
    ("renamed-not-string", _set(["renamed"], {"a.gamma": ["a.g_weight"]}),
     "renamed.a.gamma: expected a string, got list"),
]


@pytest.mark.parametrize("mutate, field", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_each_malformed_field_is_reported_naming_it(mutate, field):
    d = valid()
    mutate(d)
    problems = manifest_problems(d)
    path = field.split(": ")[0]
    assert problems and all(p.split(": ")[0] == path for p in problems), problems  # that field, nothing else
    assert any(p.startswith(field) for p in problems), problems
    with pytest.raises(ManifestError) as e:
        ExportManifest.from_json(d, source="snap/export_manifest.json")
    assert str(e.value).startswith("snap/export_manifest.json is not a valid sa2va_hooks manifest: ")
    assert field in str(e.value)


def test_only_the_broken_field_is_reported():
    d = valid()
    d["tensors"][T]["shape"] = [4, -1]
    assert manifest_problems(d) == [f"tensors.{T}.shape: malformed value [4, -1]"]


def test_a_manifest_that_is_not_an_object():
    for d in ([], "manifest", None, 3):
        assert manifest_problems(d) == [f"(top level): expected a JSON object, got {type(d).__name__}"]
        with pytest.raises(ManifestError, match=r"\(top level\): expected a JSON object"):
            ExportManifest.from_json(d)


def test_many_problems_are_summarised():
    with pytest.raises(ManifestError) as e:
        ExportManifest.from_json({})
    msg = str(e.value)
    assert [k for k in REQUIRED if f"{k}: missing" in msg] == REQUIRED[:5]
    assert "; and 3 more." in msg and "re-export the snapshot" in msg


# -- load ---------------------------------------------------------------------------------------------

def test_load_of_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} is not a directory"):
        ExportManifest.load(tmp_path / "nope")


def test_load_of_a_directory_without_manifest_names_the_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / MANIFEST_FILE} does not exist"):
        ExportManifest.load(tmp_path)


@pytest.mark.parametrize("text", [json.dumps(VALID)[:40], "", "\xff\xfe", "[" * 100_000 + "]" * 100_000],
                         ids=["truncated", "empty", "not-utf8", "nested-too-deeply"])
def test_load_of_a_damaged_manifest_is_a_manifest_error_naming_it(tmp_path, text):
    (tmp_path / MANIFEST_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(ManifestError) as e:
        ExportManifest.load(tmp_path)
    assert str(tmp_path / MANIFEST_FILE) in str(e.value)


def test_load_of_a_malformed_manifest_names_the_file_and_field(tmp_path):
    d = valid()
    d["files"][F]["size"] = -1
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(d))
    with pytest.raises(ManifestError) as e:
        ExportManifest.load(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / MANIFEST_FILE} is not a valid sa2va_hooks manifest: files.{F}.size")


def test_load_never_follows_a_manifest_symlink_or_reads_a_directory(tmp_path):
    real = tmp_path / "elsewhere.json"
    real.write_text(json.dumps(valid()))
    snap = tmp_path / "snap"
    snap.mkdir()
    os.symlink(real, snap / MANIFEST_FILE)
    with pytest.raises(ManifestError, match="a symlink"):
        ExportManifest.load(snap)
    (snap / MANIFEST_FILE).unlink()
    (snap / MANIFEST_FILE).mkdir()
    with pytest.raises(ManifestError, match="a directory"):
        ExportManifest.load(snap)


def test_a_v1_manifest_is_still_read_and_says_its_digests_are_v1():
    d = {**valid(), "format": "sa2va_hooks.export_manifest/v1"}
    assert manifest_problems(d) == []
    assert ExportManifest.from_json(d).digest_algorithm == "xxh3_128(name,dtype,shape,bytes);v1"
    assert MANIFEST_FORMAT == "sa2va_hooks.export_manifest/v2"
    with pytest.raises(ManifestError, match="format: 'sa2va_hooks.export_manifest/v3' is not one of"):
        ExportManifest.from_json({**valid(), "format": "sa2va_hooks.export_manifest/v3"})


def test_package_versions_are_the_installed_ones_and_each_call_gets_its_own_dict():
    from importlib import metadata

    from sa2va_hooks.core.manifest import package_versions
    first = package_versions()
    assert first["torch"] == metadata.version("torch") and first["peft"] == metadata.version("peft")
    first["torch"] = "tampered"
    assert package_versions()["torch"] == metadata.version("torch")  # read once, never shared
