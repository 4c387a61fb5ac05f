"""Hostile checkpoints (issue 19, items 1, 7, 8, 12): loading never runs code from a file, follows
no path out of a DeepSpeed directory, never blocks on a FIFO, and says what is wrong with a
sidecar that is no sidecar.

The DeepSpeed directories are written by real 2-process DeepSpeed training on the CPU (gloo, the
workarounds of tests/dist_launch.py) of a tiny model with a trained part, a frozen part, a buffer
and a parameter shared between two modules, in DeepSpeed's own layout (``latest`` naming
``global_step2``). Our consolidation is compared with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
(the independent reference) tensor for tensor. The hostile variants are copies of those directories
with one file replaced. Every subprocess has a timeout, so a regression to hanging fails the test.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_qwen2
from sa2va_hooks import export_hf
from sa2va_hooks.cli import main as cli
from sa2va_hooks.offline.checkpoint_io import UnsafeCheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
TIMEOUT = 180  # a hang (the FIFO bug) fails here instead of blocking CI
_ports = itertools.count(29400 + os.getpid() % 200)

# real DeepSpeed training: a trained Linear stack, a frozen Linear, a buffer, a parameter shared by two modules
TRAIN = r'''
import os, sys
sys.path.insert(0, os.environ["SA2VA_TESTS"])
from dist_launch import _cpu_workarounds
_cpu_workarounds()
import deepspeed, torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 10, bias=False)
        self.frozen = nn.Linear(10, 10)
        self.mid = nn.Linear(10, 7)
        self.head = nn.Linear(7, 10, bias=False)
        self.out = nn.Linear(10, 6, bias=False)
        self.tied = nn.Linear(6, 10, bias=False)
        self.tied.weight = self.emb.weight
        self.frozen.requires_grad_(False)
        self.register_buffer("scale", torch.arange(5, dtype=torch.float32))

    def forward(self, x):
        h = self.frozen(self.emb(x) + self.tied(x))
        return self.out(self.head(torch.relu(self.mid(h)))) * self.scale.sum()

stage, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = Tiny()
cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
       "zero_optimization": {"stage": stage, "overlap_comm": False, "stage3_param_persistence_threshold": 0},
       "fp16": {"enabled": False}, "bf16": {"enabled": False}, "steps_per_print": 10**9}
params = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=torch.optim.SGD(params, lr=0.1),
                                  config=cfg)
g = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
for _ in range(2):
    engine.backward(engine(torch.randn(2, 6, generator=g)).pow(2).mean())
    engine.step()
engine.save_checkpoint(out, tag="global_step2")
torch.distributed.barrier()  # both ranks' files are complete
# skip the interpreter's teardown: once in a few runs DeepSpeed's CPU threads aborted it ("terminate
# called without an active exception", SIGABRT) after the checkpoint was written (2026-12-01)
sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
'''


class _Call:
    """Pickles as ``f(*args)``: how the hostile files are made (it is never unpickled by our loader)."""

    def __init__(self, f, args):
        self.f, self.args = f, args

    def __reduce__(self):
        return self.f, self.args

    def __call__(self, *a):  # pickle wants a callable in the reduce position
        raise AssertionError("never called")


def getattr_payload(marker: Path) -> _Call:
    """A value whose pickle names only ``builtins.getattr`` and ``torch._utils._rebuild_tensor_v2``
    and, under full pickle, runs ``eval`` (creating ``marker``): ``_rebuild_tensor_v2.__globals__
    .get("__builtins__").get("eval")(code)``."""
    g = _Call(getattr, (torch._utils._rebuild_tensor_v2, "__globals__"))
    builtins_dict = _Call(_Call(getattr, (g, "get")), ("__builtins__",))
    ev = _Call(_Call(getattr, (builtins_dict, "get")), ("eval",))
    return _Call(ev, (f"__import__('pathlib').Path({str(marker)!r}).touch()",))


def weights_only_payload(marker: Path) -> _Call:
    """The same through torch's weights_only list alone (plus the ``getattr`` that mmengine's
    HistoryBuffer needs): ``getattr(getattr, "__self__")`` is the builtins module, and torch's
    allowlisted ``_rebuild_from_type_v2`` calls the ``eval`` fetched from it."""
    ev = _Call(getattr, (_Call(getattr, (getattr, "__self__")), "eval"))
    code = f"(__import__('pathlib').Path({str(marker)!r}).touch(), __import__('torch').zeros(1))[1]"
    return _Call(torch._tensor._rebuild_from_type_v2, (ev, torch.Tensor, (code,), {}))


@pytest.fixture(scope="module")
def ds_dirs(tmp_path_factory) -> dict[int, Path]:
    """stage -> a real DeepSpeed checkpoint root (``latest`` + ``global_step2/``), ZeRO-2 and ZeRO-3."""
    pytest.importorskip("deepspeed", reason="writing a real DeepSpeed checkpoint needs DeepSpeed")
    base = tmp_path_factory.mktemp("ds")
    (base / "train.py").write_text(TRAIN)
    out = {}
    for stage in (2, 3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(next(_ports)), str(base / "train.py"), str(stage), str(base / f"zero{stage}")]
        proc = subprocess.run(cmd, cwd=base, env={**ENV, "SA2VA_TESTS": str(ROOT / "tests")}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        out[stage] = base / f"zero{stage}"
    return out


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """A valid snapshot, so that ``verify SNAPSHOT --checkpoint X`` gets as far as loading X."""
    snap = tmp_path_factory.mktemp("snap") / "snap"
    export_hf(tiny_qwen2(), snap)
    return snap


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _entry_points(ckpt: Path, snapshot: Path, out: Path) -> dict[str, list[str]]:
    return {
        "tools/export.py": [sys.executable, str(ROOT / "tools" / "export.py"), str(ROOT / "configs" /
                                                                                   "xtuner_tiny_lora_sft.py"),
                            str(ckpt), "--out", str(out)],
        "verify --checkpoint": [sys.executable, "-m", "sa2va_hooks", "verify", str(snapshot), "--checkpoint",
                                str(ckpt)],
        "fingerprint": [sys.executable, "-m", "sa2va_hooks", "fingerprint", str(ckpt)],
    }


ENTRY_POINTS = ["tools/export.py", "verify --checkpoint", "fingerprint"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


# ------------------------------------------------------------------ 1: our consolidation is DeepSpeed's


@pytest.mark.parametrize("stage", [2, 3])
def test_consolidation_equals_deepspeeds_own_tensor_for_tensor(ds_dirs, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ours = load_checkpoint(ds_dirs[stage], log=lambda m: None)["state_dict"]
    ref = get_fp32_state_dict_from_zero_checkpoint(str(ds_dirs[stage]))
    assert list(ours) == list(ref)
    # the cases the fixture was made for: frozen params, a buffer and the shared param are all there
    assert {"frozen.weight", "frozen.bias", "scale", "tied.weight", "emb.weight"} <= set(ours)
    for name, t in ref.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape, name
        assert torch.equal(ours[name], t), name
    assert not torch.equal(ours["mid.weight"], torch.zeros_like(ours["mid.weight"]))


def test_consolidation_needs_no_deepspeed(ds_dirs):
    """DeepSpeed stays optional: with it unimportable, the same tensors come out (a fresh process,
    so that nothing was imported before)."""
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            "import torch\n"
            "from sa2va_hooks.offline.checkpoint_io import load_checkpoint\n"
            f"sd = load_checkpoint({str(ds_dirs[3])!r}, log=lambda m: None)['state_dict']\n"
            f"torch.save(sd, {str(ds_dirs[3].parent / 'no_ds.pt')!r})\n"
            "assert 'deepspeed' not in [m.split('.')[0] for m, v in sys.modules.items() if v is not None]\n")
    proc = _run([sys.executable, "-c", code], ds_dirs[3].parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = torch.load(ds_dirs[3].parent / "no_ds.pt", weights_only=True)
    ref = load_checkpoint(ds_dirs[3], log=lambda m: None)["state_dict"]
    assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)


# ------------------------------------------------------------------ 1: no code runs without --allow-pickle


def _poison(ckpt_root: Path, which: str, marker: Path) -> Path:
    """Replace the model-states or an optimizer file of a copy of a real checkpoint with the same
    content plus the getattr payload."""
    tag = ckpt_root / "global_step2"
    target = next(tag.glob("*model_states.pt")) if which == "model-states" else \
        tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    content = torch.load(target, map_location="cpu", weights_only=False)  # our own file, just written
    content["evil"] = getattr_payload(marker)
    torch.save(content, target)
    return ckpt_root


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("which", ["model-states", "optimizer"])
def test_a_getattr_pickle_in_a_deepspeed_dir_is_refused_and_runs_nothing(ds_dirs, snapshot, tmp_path, which, entry):
    marker = tmp_path / "MARKER"
    ckpt = _poison(_copy(ds_dirs[2], tmp_path / "ckpt"), which, marker)
    proc = _run(_entry_points(ckpt, snapshot, tmp_path / "out")[entry], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "UnsafeCheckpointError" in proc.stderr or "nothing in it was run" in proc.stderr.lower(), proc.stderr[-2000:]
    assert "getattr" in proc.stderr and "--allow-pickle" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_getattr_payload_is_real(ds_dirs, tmp_path):
    """With the explicit opt-in the same file does run its code: the refusal above is what kept it out."""
    marker = tmp_path / "MARKER"
    ckpt = _poison(_copy(ds_dirs[2], tmp_path / "ckpt"), "optimizer", marker)
    proc = _run([sys.executable, "-m", "sa2va_hooks", "fingerprint", str(ckpt), "--allow-pickle"], tmp_path)
    assert marker.exists(), proc.stderr[-2000:]


def test_a_getattr_pickle_in_a_pth_file_is_refused_and_runs_nothing(tmp_path):
    """A plain .pth goes through torch's weights_only loader with the globals mmengine needs; its
    ``getattr`` is our guarded one, so ``eval`` cannot be fetched for ``_rebuild_from_type_v2``."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "iter_1.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": weights_only_payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"iter_1\.pth.*'__self__'.*getattr.*nothing in it was run"):
        load_checkpoint(path)
    assert not marker.exists()
    load_checkpoint(path, allow_pickle=True, log=lambda m: None)  # and the payload is real
    assert marker.exists()


def test_real_mmengine_history_buffers_still_load_through_the_guarded_getattr(tmp_path):
    """HistoryBuffer pickles ``getattr(HistoryBuffer, "min")``: the guarded getattr returns it."""
    from mmengine.logging import MessageHub
    hub = MessageHub("hostile_test")
    hub.update_scalar("train/loss", 1.5)
    path = tmp_path / "iter_1.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "message_hub": hub.state_dict()}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["message_hub"]["log_scalars"]["train/loss"].current() == 1.5


# ------------------------------------------------------------------ 7: no path is followed out of the directory


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_latest_naming_a_checkpoint_elsewhere_is_not_followed(ds_dirs, snapshot, tmp_path, entry):
    ckpt = _copy(ds_dirs[2], tmp_path / "ckpt")
    (ckpt / "latest").write_text(str(ds_dirs[3] / "global_step2"))  # absolute: a real checkpoint elsewhere
    proc = _run(_entry_points(ckpt, snapshot, tmp_path / "out")[entry], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"{ckpt / 'latest'} does not hold a plain tag name" in proc.stderr, proc.stderr[-2000:]
    assert str(ds_dirs[3]) not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("tag", ["../../zero3/global_step2", "..", "global_step2/../../zero3/global_step2",
                                 "bad\x07tag", "x" * 300])
def test_latest_must_hold_a_plain_tag_name(ds_dirs, tmp_path, tag):
    ckpt = _copy(ds_dirs[2], tmp_path / "ckpt")
    (ckpt / "latest").write_text(tag)
    with pytest.raises(UnsafeCheckpointError, match="does not hold a plain tag name") as e:
        load_checkpoint(ckpt, log=lambda m: None)
    assert len(tag) < 3 or tag not in str(e.value)  # the content is not echoed


def test_a_symlinked_latest_is_not_read_and_its_target_not_shown(ds_dirs, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-FIRST-LINE\n")
    ckpt = _copy(ds_dirs[2], tmp_path / "ckpt")
    (ckpt / "latest").unlink()
    (ckpt / "latest").symlink_to(secret)
    with pytest.raises(UnsafeCheckpointError, match=r"latest is a symlink.*not read") as e:
        load_checkpoint(ckpt, log=lambda m: None)
    assert "SECRET" not in str(e.value)
    assert cli(["fingerprint", str(ckpt)]) == 2


def test_a_tag_directory_symlinked_outside_is_not_followed(ds_dirs, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("global_step2")
    (ckpt / "global_step2").symlink_to(ds_dirs[3] / "global_step2")
    with pytest.raises(UnsafeCheckpointError, match=r"resolves outside"):
        load_checkpoint(ckpt, log=lambda m: None)


def test_a_rank_file_symlinked_outside_is_not_opened(ds_dirs, tmp_path):
    ckpt = _copy(ds_dirs[2], tmp_path / "ckpt")
    f = ckpt / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.unlink()
    f.symlink_to(ds_dirs[2] / "global_step2" / f.name)  # the same content, outside this directory
    with pytest.raises(UnsafeCheckpointError, match=rf"{f.name} is a symlink to a file outside"):
        load_checkpoint(ckpt, log=lambda m: None)


def test_a_mmengine_layout_directory_still_loads(ds_dirs, tmp_path):
    """mmengine's layout: the tag directory itself (iter_N.pth/, no 'latest')."""
    shutil.copytree(ds_dirs[3] / "global_step2", tmp_path / "iter_2.pth")
    ours = load_checkpoint(tmp_path / "iter_2.pth", log=lambda m: None)["state_dict"]
    ref = load_checkpoint(ds_dirs[3], log=lambda m: None)["state_dict"]
    assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)


# ------------------------------------------------------------------ 8: no hang on a FIFO


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_fifo_optimizer_file_is_refused_without_blocking(ds_dirs, snapshot, tmp_path, entry):
    ckpt = _copy(ds_dirs[2], tmp_path / "ckpt")
    fifo = ckpt / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    fifo.unlink()
    os.mkfifo(fifo)
    proc = _run(_entry_points(ckpt, snapshot, tmp_path / "out")[entry], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"{fifo} is a FIFO (named pipe), not a regular file" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_fifo_checkpoint_is_refused_without_blocking(snapshot, tmp_path, entry):
    fifo = tmp_path / "iter_3.pth"
    os.mkfifo(fifo)
    proc = _run(_entry_points(fifo, snapshot, tmp_path / "out")[entry], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"{fifo} is a FIFO (named pipe), not a regular file" in proc.stderr, proc.stderr[-2000:]


def test_a_fifo_sidecar_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "iter_3.pth.fingerprints.json"
    os.mkfifo(fifo)
    proc = _run([sys.executable, "-m", "sa2va_hooks", "fingerprint", str(fifo)], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{fifo} is a FIFO (named pipe), not a regular file" in proc.stderr
    # beside a checkpoint that holds no record, the loader looks for the sidecar: refused the same way
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": {}}, tmp_path / "iter_3.pth")
    proc = _run([sys.executable, "-m", "sa2va_hooks", "fingerprint", str(tmp_path / "iter_3.pth")], tmp_path)
    assert proc.returncode == 2 and f"{fifo} is a FIFO" in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------ 12: a JSON file that is no sidecar


@pytest.mark.parametrize("content,words", [
    ("{not json", "is not a fingerprint sidecar: it is not valid JSON"),
    (json.dumps({"model": "x", "epochs": 3}), "is not a fingerprint sidecar: it holds a JSON object with keys "
                                              "['epochs', 'model']"),
    (json.dumps([1, 2]), "is not a fingerprint sidecar: it holds JSON of type list"),
    ("[" * 100000 + "]" * 100000, "is not a fingerprint sidecar: its JSON is nested too deeply to read"),
])
def test_fingerprint_of_a_json_that_is_no_sidecar_says_so(tmp_path, capsys, content, words):
    path = tmp_path / "garbage.json"
    path.write_text(content)
    assert cli(["fingerprint", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} {words}" in err and "FingerprintHook writes a JSON object with 'checkpoint' and 'trained'" in err
    assert "JSONDecodeError" not in err
