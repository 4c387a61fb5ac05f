"""Hostile and unlucky snapshots: links that fail, symlinks, FIFOs, stray entries, modules named like
the ones the CLI imports, and damaged JSON, dtypes and shards (issue 19, items 3, 6, 9 and 12).

Every snapshot here is a real one, written by the package's own export of a tiny PEFT Qwen2 and then
tampered with. Every command that could hang on a regression (a FIFO that is opened blocks its reader
forever) runs in a subprocess with a timeout, so a hang fails the test instead of blocking the run.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model

from conftest import tiny_qwen2, train_like
from sa2va_hooks import ExportManifest, export_hf, verify_snapshot
from sa2va_hooks.cli import main as cli
from sa2va_hooks.core import publish as export_mod
from sa2va_hooks.core.fingerprint import dtype_name
from sa2va_hooks.core.manifest import STORABLE_DTYPES, sha256_file
from sa2va_hooks.core.shards import _ST_DTYPES

REPO = Path(__file__).resolve().parents[2]
MANIFEST = "export_manifest.json"
TIMEOUT = 300  # seconds: generous for a cold torch import on a busy machine, finite so a hang fails


def _peft(seed: int = 0):
    # LoRA on attention only: the MLPs and norms are frozen and land in shards of their own, which a later
    # export links
    pm = get_peft_model(tiny_qwen2(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    train_like(pm)
    return pm


@pytest.fixture(scope="module")
def model():
    return _peft()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, model):
    """A sharded snapshot, and a second export of the same weights made without any link (the reference
    an export that had to write instead of link must equal byte for byte)."""
    root = tmp_path_factory.mktemp("pristine")
    export_hf(model, root / "snap", max_shard_size="12KB")
    export_hf(model, root / "reference", max_shard_size="12KB")
    assert len(list((root / "snap").glob("*.safetensors"))) >= 3
    assert verify_snapshot(root / "snap") == []
    return root


def _copy(pristine: Path, dst: Path) -> Path:
    shutil.copytree(pristine / "snap", dst)
    return dst


def _frozen_files(m: ExportManifest) -> set[str]:
    trained = {t["file"] for t in m.tensors.values() if t["role"] != "frozen"}
    return {t["file"] for t in m.tensors.values()} - trained


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _assert_same_as_reference(got: Path, reference: Path) -> None:
    """Every file but the manifest byte for byte; the manifest's tensors and files entries too."""
    a, b = _files(got), _files(reference)
    assert set(a) == set(b)
    for rel in a:
        if rel != MANIFEST:
            assert a[rel] == b[rel], rel
    ma, mb = ExportManifest.load(got), ExportManifest.load(reference)
    assert ma.root_digest == mb.root_digest and ma.tensors == mb.tensors and ma.files == mb.files


def _cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli(list(args))
    return rc, out.getvalue() + err.getvalue()


def _run(*args: str, cwd: Path | None = None) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return p.returncode, p.stdout + p.stderr


def _link_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and "could not hard-link" in r.getMessage()]


# ------------------------------------------------------------ item 3: a failed link is a write

@pytest.mark.parametrize("code", ["ENOSYS", "EIO", "EACCES", "ENOENT", "EXDEV", "EPERM", "EMLINK"])
def test_a_failed_link_is_a_write_whatever_the_errno(pristine, model, tmp_path, monkeypatch, caplog, code):
    prev = _copy(pristine, tmp_path / "iter_1")
    n = getattr(errno, code)
    calls = []

    def failing_link(src, dst, *a, **kw):
        calls.append(src)
        raise OSError(n, os.strerror(n), str(src), None, str(dst))

    monkeypatch.setattr(os, "link", failing_link)
    with caplog.at_level(logging.DEBUG, logger="sa2va_hooks"):
        m = export_hf(model, tmp_path / "iter_2", max_shard_size="12KB", link_from=prev)
    frozen = _frozen_files(m)
    assert len(calls) == len(frozen) >= 2  # every frozen shard was tried, and each failure was written instead
    assert m.storage["linked_from"] == {} and m.storage["bytes_linked"] == 0
    for f in frozen:
        assert os.stat(tmp_path / "iter_2" / f).st_ino != os.stat(prev / f).st_ino
    warned = _link_warnings(caplog)
    assert len(warned) == 1  # once per export and errno, though every frozen shard failed
    assert code in warned[0].getMessage() and str(prev) in warned[0].getMessage()
    assert verify_snapshot(tmp_path / "iter_2") == []
    _assert_same_as_reference(tmp_path / "iter_2", pristine / "reference")


def test_an_unreadable_previous_shard_is_written(pristine, model, tmp_path, monkeypatch, caplog):
    """chmod 000 (root reads it anyway, so the open is made to fail as it would for a user)."""
    prev = _copy(pristine, tmp_path / "iter_1")
    real_open = open

    def guarded_open(path, *a, **kw):
        if str(path).startswith(str(prev) + os.sep) and str(path).endswith(".safetensors"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(export_mod, "open", guarded_open, raising=False)  # the module's open: same_shard's read
    with caplog.at_level(logging.WARNING, logger="sa2va_hooks"):
        m = export_hf(model, tmp_path / "iter_2", max_shard_size="12KB", link_from=prev)
    assert m.storage["linked_from"] == {}
    warned = _link_warnings(caplog)
    assert len(warned) == 1 and "EACCES" in warned[0].getMessage()
    _assert_same_as_reference(tmp_path / "iter_2", pristine / "reference")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod-000 file; the monkeypatched open above stands in")
def test_a_chmod_000_previous_shard_is_written(pristine, model, tmp_path):
    prev = _copy(pristine, tmp_path / "iter_1")
    m1 = ExportManifest.load(prev)
    for f in _frozen_files(m1):
        os.chmod(prev / f, 0)
    try:
        m = export_hf(model, tmp_path / "iter_2", max_shard_size="12KB", link_from=prev)
    finally:
        for f in _frozen_files(m1):
            os.chmod(prev / f, 0o644)
    assert m.storage["linked_from"] == {}
    _assert_same_as_reference(tmp_path / "iter_2", pristine / "reference")


def test_a_previous_snapshot_deleted_during_the_export_is_written(pristine, model, tmp_path, monkeypatch, caplog):
    """The older snapshot is really deleted (keep_last pruning it) between the check of a shard and its
    link: link() fails with a real ENOENT, and every shard left is written."""
    prev = _copy(pristine, tmp_path / "iter_1")
    same_shard = export_mod._Previous.same_shard

    def then_delete(self, *a, **kw):
        same = same_shard(self, *a, **kw)
        if same and prev.exists():
            shutil.rmtree(prev)
        return same

    monkeypatch.setattr(export_mod._Previous, "same_shard", then_delete)
    with caplog.at_level(logging.WARNING, logger="sa2va_hooks"):
        m = export_hf(model, tmp_path / "iter_2", max_shard_size="12KB", link_from=prev)
    assert not prev.exists() and m.storage["linked_from"] == {}
    warned = _link_warnings(caplog)
    assert len(warned) == 1 and "ENOENT" in warned[0].getMessage()
    assert verify_snapshot(tmp_path / "iter_2") == []
    _assert_same_as_reference(tmp_path / "iter_2", pristine / "reference")


def test_links_still_happen_when_they_can(pristine, model, tmp_path):
    prev = _copy(pristine, tmp_path / "iter_1")
    m = export_hf(model, tmp_path / "iter_2", max_shard_size="12KB", link_from=prev)
    assert set(m.storage["linked_from"]) == _frozen_files(m)
    for f in _frozen_files(m):
        assert os.stat(tmp_path / "iter_2" / f).st_ino == os.stat(prev / f).st_ino
    _assert_same_as_reference(tmp_path / "iter_2", pristine / "reference")


# ------------------------------------------------------------ item 6: symlinks, stray entries, FIFOs

def test_a_symlinked_previous_shard_is_written_never_linked(pristine, model, tmp_path, caplog):
    prev = _copy(pristine, tmp_path / "iter_1")
    victim = sorted(_frozen_files(ExportManifest.load(prev)))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(prev / victim, outside)  # the same bytes, so only the symlink itself can stop a link
    os.symlink(outside, prev / victim)
    with caplog.at_level(logging.WARNING, logger="sa2va_hooks"):
        m = export_hf(model, tmp_path / "iter_2", max_shard_size="12KB", link_from=prev)
    dst = tmp_path / "iter_2" / victim
    assert not dst.is_symlink() and stat.S_ISREG(os.lstat(dst).st_mode)
    assert os.stat(dst).st_ino != os.stat(outside).st_ino
    assert victim not in m.storage["linked_from"] and m.storage["linked_from"]  # the regular ones still are
    assert verify_snapshot(tmp_path / "iter_2") == []
    _assert_same_as_reference(tmp_path / "iter_2", pristine / "reference")
    rc, out = _cli("verify", str(prev))
    assert rc == 1 and f"symlink {victim} -> {outside}" in out and "outside the snapshot" in out


def _shard(d: Path) -> str:
    return sorted(p.name for p in d.glob("*.safetensors"))[0]


def _symlink_shard_outside(d: Path) -> list[str]:
    name = _shard(d)
    outside = d.parent / "elsewhere.safetensors"
    shutil.move(d / name, outside)
    os.symlink(outside, d / name)
    return [f"symlink {name} -> {outside}", "outside the snapshot"]


def _symlink_config_outside(d: Path) -> list[str]:
    outside = d.parent / "config.json"
    shutil.move(d / "config.json", outside)
    os.symlink(outside, d / "config.json")
    return [f"symlink config.json -> {outside}"]


def _rootlink(d: Path) -> list[str]:
    os.symlink("/", d / "rootlink")
    return ["symlink rootlink -> / (leads outside the snapshot, to /)"]


def _inner_symlink(d: Path) -> list[str]:
    os.symlink("config.json", d / "config2.json")
    return ["symlink config2.json -> config.json (inside the snapshot)"]


def _empty_dir(d: Path) -> list[str]:
    (d / "empty").mkdir()
    return ["extra directory empty (empty)"]


def _dir_with_file(d: Path) -> list[str]:
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "sub" / "deeper" / "x.txt").write_text("x")
    return ["extra directory sub", "extra directory sub/deeper", "extra file sub/deeper/x.txt"]


def _socket(d: Path) -> list[str]:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "sock.safetensors"))
    s.close()
    return ["not a regular file sock.safetensors: a socket"]


def _device(d: Path) -> list[str]:
    try:
        os.mknod(d / "null.safetensors", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs root (CAP_MKNOD)")
    return ["not a regular file null.safetensors: a character device"]


@pytest.mark.parametrize("tamper", [_symlink_shard_outside, _symlink_config_outside, _rootlink, _inner_symlink,
                                    _empty_dir, _dir_with_file, _socket, _device], ids=lambda f: f.__name__[1:])
def test_verify_fails_symlinks_strays_and_special_files(pristine, tmp_path, tamper):
    d = _copy(pristine, tmp_path / "snap")
    assert _cli("verify", str(d))[0] == 0
    want = tamper(d)
    rc, out = _cli("verify", str(d))
    assert rc == 1, out
    for w in want:
        assert w in out, (w, out)


def test_a_fifo_is_reported_never_opened(pristine, tmp_path):
    """A FIFO in place of a shard, and one more beside it: verify lists both and returns; diff and
    fingerprint refuse, naming the file, instead of blocking on it forever."""
    d = _copy(pristine, tmp_path / "snap")
    name = _shard(d)
    (d / name).unlink()
    os.mkfifo(d / name)
    os.mkfifo(d / "extra.safetensors")
    rc, out = _run("-m", "sa2va_hooks", "verify", str(d))
    assert rc == 1, out
    assert f"not a regular file {name}: a FIFO" in out and "not a regular file extra.safetensors: a FIFO" in out
    rc, out = _run("-m", "sa2va_hooks", "diff", str(d), str(pristine / "snap"), "--png", "")
    assert rc == 2 and "a FIFO, not a regular file" in out and str(d) in out, out
    rc, out = _run("-m", "sa2va_hooks", "fingerprint", str(d))
    assert rc == 2 and "a FIFO, not a regular file" in out, out


def test_a_fifo_manifest_is_refused_never_opened(pristine, tmp_path):
    d = _copy(pristine, tmp_path / "snap")
    (d / MANIFEST).unlink()
    os.mkfifo(d / MANIFEST)
    rc, out = _run("-m", "sa2va_hooks", "verify", str(d))
    assert rc == 2 and f"{d / MANIFEST} is a FIFO, not a regular file" in out, out


def test_a_symlinked_manifest_is_refused(pristine, tmp_path):
    d = _copy(pristine, tmp_path / "snap")
    shutil.move(d / MANIFEST, tmp_path / MANIFEST)
    os.symlink(tmp_path / MANIFEST, d / MANIFEST)
    rc, out = _cli("verify", str(d))
    assert rc == 2 and f"{d / MANIFEST} is a symlink, not a regular file" in out, out


def test_diff_still_reads_an_hf_cache_directory_of_symlinks(pristine, tmp_path):
    """huggingface_hub's cache is symlinks into blobs: diff follows a symlink to a regular file."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for p in (pristine / "reference").iterdir():
        if p.name != MANIFEST:
            shutil.copy(p, blobs / p.name)
            os.symlink(blobs / p.name, snap / p.name)
    rc, out = _cli("diff", str(snap), str(pristine / "snap"), "--png", "")
    assert rc == 0 and "RESULT: identical" in out, out


# ------------------------------------------------------------ item 9: the CLI never imports from its cwd

HOSTILE = """import pathlib
pathlib.Path({marker!r}).write_text("imported " + __name__)
raise SystemExit("hostile module {name} was imported")
"""


def _plant(d: Path, marker: Path, names=("json", "safetensors", "modeling_x")) -> None:
    for name in names:
        (d / f"{name}.py").write_text(HOSTILE.format(marker=str(marker), name=name))


def test_verify_from_inside_a_snapshot_imports_nothing_from_it(pristine, tmp_path):
    d = _copy(pristine, tmp_path / "snap")
    marker = tmp_path / "MARKER"
    _plant(d, marker)
    rc, out = _run("-m", "sa2va_hooks", "verify", ".", cwd=d)
    assert not marker.exists(), marker.read_text()
    assert rc == 1 and "extra file json.py" in out and "extra file safetensors.py" in out, out
    # the same files, known to the manifest (remote code named like a module): verified, still not imported
    m = json.loads((d / MANIFEST).read_text())
    for name in ("json.py", "safetensors.py", "modeling_x.py"):
        m["files"][name] = {"size": (d / name).stat().st_size, "sha256": sha256_file(d / name)}
    (d / MANIFEST).write_text(json.dumps(m))
    rc, out = _run("-m", "sa2va_hooks", "verify", ".", cwd=d)
    assert not marker.exists(), marker.read_text()
    assert rc == 0 and "OK: ." in out, out


def test_pytest_keeps_its_cwd_on_sys_path(tmp_path):
    """The cwd is dropped only when sa2va_hooks is the -m target: under ``python -m pytest`` a test that
    imports sa2va_hooks can still import a module from the directory pytest was started in."""
    (tmp_path / "helper_in_cwd.py").write_text("VALUE = 7\n")
    (tmp_path / "probe").mkdir()  # the test file elsewhere, so that only -m's cwd entry can find the helper
    (tmp_path / "probe" / "test_probe.py").write_text(
        "import os, sys\nimport sa2va_hooks\n\ndef test_probe():\n    assert sys.path[0] == os.getcwd()\n"
        "    import helper_in_cwd\n    assert helper_in_cwd.VALUE == 7\n")
    rc, out = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "--import-mode=append",
                   "probe/test_probe.py", cwd=tmp_path)
    assert rc == 0 and "1 passed" in out, out


# ------------------------------------------------------------ item 12: damaged inputs, clear messages

def test_storable_dtypes_are_the_writers():
    assert STORABLE_DTYPES == {dtype_name(d) for d in _ST_DTYPES}


def _edit_manifest(d: Path, edit) -> None:
    m = json.loads((d / MANIFEST).read_text())
    edit(m)
    (d / MANIFEST).write_text(json.dumps(m))


def test_a_nonsense_dtype_in_the_manifest_is_named(pristine, tmp_path):
    d = _copy(pristine, tmp_path / "snap")
    name = sorted(json.loads((d / MANIFEST).read_text())["tensors"])[0]
    _edit_manifest(d, lambda m: m["tensors"][name].update(dtype="nonsense"))
    rc, out = _cli("verify", str(d))
    assert rc == 2 and str(d / MANIFEST) in out and f"tensors.{name}.dtype: malformed value 'nonsense'" in out, out
    assert "AttributeError" not in out
    rc, out = _cli("diff", str(d), str(pristine / "snap"), "--png", "")
    assert rc == 2 and str(d / MANIFEST) in out and "'nonsense'" in out, out


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where, rc_want, words", [
    (MANIFEST, 2, ["export_manifest.json", "too deeply"]),
    ("model.safetensors.index.json", 1, ["corrupt model.safetensors.index.json", "too deeply"]),
    ("config.json", 1, ["corrupt config.json", "too deeply", "mismatch size of config.json"]),
])
def test_deeply_nested_json_is_named_not_a_recursion_error(pristine, tmp_path, where, rc_want, words):
    d = _copy(pristine, tmp_path / "snap")
    (d / where).write_text(DEEP)
    rc, out = _cli("verify", str(d))
    assert rc == rc_want and "RecursionError" not in out, out
    for w in words:
        assert w in out, (w, out)
    if where == MANIFEST:
        rc, out = _cli("diff", str(d), str(pristine / "snap"), "--png", "")
        assert rc == 2 and str(d / MANIFEST) in out and "too deeply" in out and "RecursionError" not in out, out


def test_a_deeply_nested_shard_header_is_named(pristine, tmp_path):
    d = _copy(pristine, tmp_path / "snap")
    name = _shard(d)
    raw = DEEP.encode()
    (d / name).write_bytes(len(raw).to_bytes(8, "little") + raw)
    rc, out = _cli("verify", str(d))
    assert rc == 1 and f"corrupt header of {name}: header nests JSON too deeply" in out, out
    assert "RecursionError" not in out


def test_random_bytes_named_safetensors_are_named(pristine, tmp_path):
    d = _copy(pristine, tmp_path / "snap")
    name = _shard(d)
    (d / name).write_bytes(random.Random(0).randbytes(4096))
    rc, out = _cli("verify", str(d))
    assert rc == 1 and f"corrupt header of {name}" in out and f"unreadable shard {name}" in out, out
    for cmd in (["diff", str(d), str(pristine / "snap"), "--png", ""], ["fingerprint", str(d)]):
        rc, out = _cli(*cmd)
        assert rc == 2 and f"{d / name} is not a readable safetensors file" in out, (cmd, out)
