"""A fingerprint sidecar passed where a checkpoint belongs is called what it is (issue 16, item 2):
the checkpoint it belongs to, whether that still exists, and what to pass instead. Bad input: exit 2."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from sa2va_demo.runs import train_tiny
from sa2va_hooks.cli import main as cli
from sa2va_hooks.offline.checkpoint_io import NotACheckpointError, load_checkpoint

SIDECAR_WORDS = "is a fingerprint sidecar written by FingerprintHook, not a checkpoint"


@pytest.fixture(scope="module")
def run(tiny_base, tmp_path_factory):
    """A real Runner training: checkpoints, sidecars and snapshots at iterations 1, 2 and 3."""
    work = tmp_path_factory.mktemp("sidecar_run")
    train_tiny(work, tiny_base, max_iters=3, save_interval=1,
               hooks=[dict(type="FingerprintHook"), dict(type="HFExportHook")])
    return work


def _copy(run, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(run, work)
    return work


def test_a_sidecar_of_an_existing_checkpoint_names_it(run, tmp_path, capsys):
    work = _copy(run, tmp_path)
    sidecar, ckpt = work / "iter_3.pth.fingerprints.json", work / "iter_3.pth"
    with pytest.raises(NotACheckpointError, match=re.escape(
            f"{sidecar} {SIDECAR_WORDS}: it records the trained tensors' fingerprints of checkpoint iter_3.pth "
            f"(iteration 3), and holds no weights. That checkpoint exists: pass {ckpt} instead.")) as e:
        load_checkpoint(sidecar)
    assert type(e.value).__name__ == "SidecarNotCheckpointError"
    capsys.readouterr()
    assert cli(["verify", str(work / "hf" / "iter_3"), "--checkpoint", str(sidecar)]) == 2
    err = capsys.readouterr().err
    assert "SidecarNotCheckpointError" in err and SIDECAR_WORDS in err and f"pass {ckpt} instead" in err
    # the checkpoint it names is the right thing to pass
    assert cli(["verify", str(work / "hf" / "iter_3"), "--checkpoint", str(ckpt)]) == 0


def test_a_renamed_sidecar_is_recognised_by_its_content(run, tmp_path):
    work = _copy(run, tmp_path)
    renamed = work / "record.json"
    (work / "iter_2.pth.fingerprints.json").rename(renamed)
    with pytest.raises(NotACheckpointError, match=re.escape(f"{renamed} {SIDECAR_WORDS}") +
                       ".*checkpoint iter_2.pth \\(iteration 2\\).*" + re.escape(f"pass {work / 'iter_2.pth'}")):
        load_checkpoint(renamed)


def test_a_sidecar_whose_checkpoint_was_removed_says_so_and_what_to_pass(run, tmp_path, capsys):
    work = _copy(run, tmp_path)
    (work / "iter_1.pth").unlink()  # as max_keep_ckpts does (sidecars of earlier versions stayed behind)
    sidecar = work / "iter_1.pth.fingerprints.json"
    capsys.readouterr()
    assert cli(["verify", str(work / "hf" / "iter_1"), "--checkpoint", str(sidecar)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    for words in (f"{sidecar} {SIDECAR_WORDS}", "checkpoint iter_1.pth (iteration 1)",
                  f"That checkpoint no longer exists at {work / 'iter_1.pth'}", "max_keep_ckpts",
                  f"Checkpoints in {work} now: iter_2.pth, iter_3.pth",
                  f"`python -m sa2va_hooks fingerprint {sidecar}` prints its root"):
        assert words in err, (words, err)
    # the missing checkpoint itself: named, with its sidecar
    assert cli(["verify", str(work / "hf" / "iter_1"), "--checkpoint", str(work / "iter_1.pth")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"checkpoint {work / 'iter_1.pth'} does not exist, but its fingerprint sidecar {sidecar} does" in err
            and "max_keep_ckpts" in err and "iter_2.pth, iter_3.pth" in err), err
    # and what the message suggests works: the sidecar's root is the snapshot's trained_root
    assert cli(["fingerprint", str(sidecar), "--json"]) == 0
    side = json.loads(capsys.readouterr().out)
    assert cli(["fingerprint", str(work / "hf" / "iter_1"), "--json"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert side["root"] == snap["trained_root"]


def test_a_missing_checkpoint_without_sidecar_keeps_its_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint {tmp_path / 'iter_9.pth'} does not exist; "
                                                          "pass the .pth file CheckpointHook wrote")):
        load_checkpoint(tmp_path / "iter_9.pth")
