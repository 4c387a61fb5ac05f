"""``export_hf`` as a collective over 2 real gloo processes (no Runner), against a single-process
export of the same weights; a failure on one rank; a work dir that one rank cannot see; and
what ``verify`` and the exporter do with the empty tensors a ZeRO-3 placeholder would give."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from conftest import lora_qwen2, tiny_qwen2
from sa2va_hooks import export_hf
from sa2va_hooks.core.dist import RankGroup
from sa2va_hooks.core.fingerprint import digest_tensor, root_digest
from sa2va_hooks.core.sharding import ShardedTensorError
from sa2va_hooks.core.verify import verify_snapshot


def _worker(rank: int, world: int, init: str, out: str, scenario: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    outcome: dict = {"rank": rank}
    try:
        if scenario == "private_dir" and rank == 1:
            _hide_directory(Path(out).parent)
        pm = lora_qwen2()
        if scenario == "fail_rank1" and rank == 1:
            import sa2va_hooks.core.rank_writer as ex

            def refuse(path, slots):
                raise OSError(28, "No space left on device (test, rank 1)", str(path))
            ex.ShardWriter = refuse
        manifest = export_hf(pm, out, dtype="bf16", max_shard_size=20000)
        outcome.update(ok=True, root=manifest.root_digest, writers=manifest.provenance["shard_writers"])
    except Exception as e:  # noqa: BLE001 - reported to the test through the result file
        outcome.update(ok=False, error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
    # torch 2.4's ProcessGroupGloo destructor joins its worker threads while holding the GIL, and a
    # worker still freeing the last collective's tensors needs the GIL: a deadlock at shutdown (seen
    # with the Sa2VA-era stack). Give the workers a moment, with the GIL released, before destroying.
    time.sleep(0.5)
    dist.destroy_process_group()


def _hide_directory(path: Path) -> None:
    """This rank alone gets its own, empty view of ``path``: what a node-local work dir looks like
    from another node. A private mount namespace with a tmpfs over the directory."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        raise PermissionError("unshare(CLONE_NEWNS) refused")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], check=True)


def _run(tmp_path: Path, scenario: str) -> list[dict]:
    out = tmp_path / "hf" / "iter_1"
    (tmp_path / "hf").mkdir()
    results = tmp_path / "results"
    results.mkdir()
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_worker, args=(2, init, str(out), scenario, str(results)), nprocs=2, join=True,
                       start_method="spawn")
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]


def _can_hide_directories() -> bool:
    proc = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return proc.returncode == 0


def test_two_ranks_write_one_snapshot_equal_to_a_single_process_export(tmp_path):
    results = _run(tmp_path, "ok")
    assert all(r["ok"] for r in results), [r.get("tb") for r in results]
    assert results[0]["root"] == results[1]["root"]
    assert set(results[0]["writers"].values()) == {0, 1}, "both ranks write shards"
    snap = tmp_path / "hf" / "iter_1"
    assert verify_snapshot(snap) == []
    single = export_hf(lora_qwen2(), tmp_path / "single", dtype="bf16", max_shard_size=20000,
                       group=RankGroup(0, 1))
    assert single.root_digest == results[0]["root"]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["iter_1"]


def test_a_failure_on_rank_1_fails_every_rank_and_publishes_nothing(tmp_path):
    results = _run(tmp_path, "fail_rank1")
    assert [r["ok"] for r in results] == [False, False]
    for r in results:  # the same message on every rank, naming rank 1 and the cause
        assert "RankFailedError" in r["error"] and "rank 1: OSError" in r["error"] and "(test, rank 1)" in r["error"]
    assert list((tmp_path / "hf").iterdir()) == [], "no snapshot and no staging directory left behind"


@pytest.mark.skipif(not _can_hide_directories(), reason="needs unshare(CLONE_NEWNS) (root in a mount namespace)")
def test_a_work_dir_not_shared_by_all_ranks_is_refused(tmp_path):
    results = _run(tmp_path, "private_dir")
    assert [r["ok"] for r in results] == [False, False]
    for r in results:
        assert "rank 1" in r["error"] and "not on a filesystem shared by all ranks" in r["error"]
    assert list((tmp_path / "hf").iterdir()) == []


def test_an_empty_tensor_is_refused_before_anything_is_written(tmp_path):
    model = tiny_qwen2()
    model.model.layers[0].mlp.up_proj.weight.data = torch.empty(0)  # what a ZeRO-3 placeholder is
    with pytest.raises(ShardedTensorError, match=r"up_proj\.weight"):
        export_hf(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_verify_rejects_an_export_of_empty_tensors_with_no_vocabulary(tmp_path):
    """What the old ZeRO-3 path published: every tensor numel 0, vocab_size 0, a manifest whose
    digests match the files. Rebuilt here by hand from a real export."""
    snap = tmp_path / "snap"
    export_hf(tiny_qwen2(), snap)
    manifest = json.loads((snap / "export_manifest.json").read_text())
    empty = {n: torch.empty(0, dtype=torch.float32) for n in manifest["tensors"]}
    save_file(empty, str(snap / "model.safetensors"), metadata={"format": "pt"})
    for n, t in manifest["tensors"].items():
        t.update(shape=[0], dtype="float32", digest=digest_tensor(n, empty[n]))
    manifest["root_digest"] = root_digest({n: t["digest"] for n, t in manifest["tensors"].items()})
    cfg = json.loads((snap / "config.json").read_text())
    cfg["vocab_size"] = 0
    (snap / "config.json").write_text(json.dumps(cfg))
    manifest["files"]["model.safetensors"]["size"] = (snap / "model.safetensors").stat().st_size
    from sa2va_hooks.core.manifest import sha256_file
    manifest["files"]["config.json"] = {"size": (snap / "config.json").stat().st_size,
                                        "sha256": sha256_file(snap / "config.json")}
    (snap / "export_manifest.json").write_text(json.dumps(manifest))
    problems = verify_snapshot(snap)
    assert any(p.startswith("empty tensor model.embed_tokens.weight") for p in problems), problems
    assert any("vocab_size is 0" in p for p in problems), problems
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([os.sys.executable, "-m", "sa2va_hooks", "verify", str(snap)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode != 0 and "OK" not in proc.stdout
