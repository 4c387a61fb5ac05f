"""A fault on one rank of a background export, with 2 real gloo processes talking through a real
TCPStore (what torchrun gives): a full disk mid-shard with bytes still buffered, an exception in
rank 1's writer, a stuck rank, a rank killed mid-export, a rank that dies after sending its
records. Each checks: a complete snapshot or nothing published, no staging left, one error that
names the rank, and every surviving rank finished (within its timeout, where one applies).

The timeouts here are the product's own (``StoreGroup(timeout_s=...)``); the tests wait for
states (a rank's result file), and no sleep decides a result."""
from __future__ import annotations

import json
import os
import resource
import signal
import socket
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import lora_qwen2
from sa2va_hooks import export_hf
from sa2va_hooks.core.dist import RankGroup
from sa2va_hooks.core.verify import verify_snapshot

TIMEOUT_S = 4.0  # the export's own per-step timeout in the scenarios that need one


def _wait_for(path: Path) -> None:
    """A state, not a clock: block until another process wrote ``path``."""
    while not path.exists():
        time.sleep(0.01)


class _Faults:
    """What rank 1 does wrong, installed on rank 1 only, by scenario."""

    def __init__(self, scenario: str, result_dir: Path) -> None:
        self.scenario, self.result_dir = scenario, result_dir
        self.appended = 0

    def install(self) -> None:
        import sa2va_hooks.core.rank_writer as ex
        import sa2va_hooks.core.dist as dist_mod
        faults = self
        real_writer = ex.ShardWriter

        class FaultyWriter(real_writer):
            def append(self, slot, t):
                faults.appended += 1
                if faults.appended == 2:
                    faults.at_second_tensor()
                return super().append(slot, t)

        ex.ShardWriter = FaultyWriter
        if self.scenario == "dies_after_records":
            real_broadcast = dist_mod.StoreGroup.broadcast
            calls = []

            def broadcast(group, obj, src=0):
                calls.append(src)
                if len(calls) == 2:  # the last step: the records are sent; rank 0 alone publishes
                    os._exit(7)
                return real_broadcast(group, obj, src)
            dist_mod.StoreGroup.broadcast = broadcast

    def at_second_tensor(self) -> None:
        if self.scenario == "writer_raises":
            raise RuntimeError("injected fault in rank 1's writer")
        if self.scenario == "stuck":  # until rank 0 has given up and said so
            _wait_for(self.result_dir / "rank0.json")
        if self.scenario == "killed":
            os._exit(9)


def _worker(rank: int, world: int, init: str, out: str, scenario: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results = Path(result_dir)
    outcome: dict = {"rank": rank}
    try:
        pm = lora_qwen2()
        group = RankGroup.background(TIMEOUT_S)
        if rank == 1 and scenario in ("writer_raises", "stuck", "killed", "dies_after_records"):
            _Faults(scenario, results).install()
        if rank == 1 and scenario == "efbig":
            # a real kernel error mid-shard: writes past 6000 bytes fail with EFBIG (SIGXFSZ ignored);
            # the writer's buffer still holds bytes when it aborts, as on a full disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (6000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        from sa2va_hooks.export import prepare_background_export
        job = prepare_background_export(pm, out, group=group, dtype="bf16", max_shard_size=20000)
        t0 = time.monotonic()
        job.start()
        try:
            manifest = job.result()
            outcome.update(ok=True, root=manifest.root_digest)
        except Exception as e:  # noqa: BLE001 - reported to the test through the result file
            outcome.update(ok=False, error=f"{type(e).__name__}: {e}", tb=traceback.format_exc()[-1500:])
        outcome["seconds"] = round(time.monotonic() - t0, 2)
        outcome["threads_left"] = [t.name for t in threading.enumerate() if t.name.startswith("sa2va_hooks-export")]
    except Exception as e:  # noqa: BLE001
        outcome.update(ok=False, error=f"setup: {type(e).__name__}: {e}", tb=traceback.format_exc()[-1500:])
    if rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    (results / f"rank{rank}.json.tmp").write_text(json.dumps(outcome))
    os.replace(results / f"rank{rank}.json.tmp", results / f"rank{rank}.json")
    if rank == 0:  # the store lives in rank 0: keep it up until rank 1 has reported (or died)
        _wait_for_peer(results)
    os._exit(0)  # no destroy_process_group: a dead peer would make it wait


def _wait_for_peer(results: Path) -> None:
    while not (results / "rank1.json").exists() and not (results / "rank1.gone").exists():
        time.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, scenario: str) -> tuple[list[dict | None], list[int | None], Path]:
    root = tmp_path / "hf"
    root.mkdir()
    out = root / "iter_1"
    results = tmp_path / "results"
    results.mkdir()
    ctx = mp.start_processes(_worker, args=(2, f"tcp://127.0.0.1:{_free_port()}", str(out), scenario, str(results)),
                             nprocs=2, join=False, start_method="spawn")
    procs = ctx.processes
    # rank 1 may die on purpose; tell rank 0 (which hosts the store) once it has
    while procs[1].is_alive():
        procs[1].join(0.05)
    if not (results / "rank1.json").exists():
        (results / "rank1.gone").write_text(str(procs[1].exitcode))
    procs[0].join(300)  # a safety net against a hang regression, not part of any result
    if procs[0].is_alive():
        procs[0].kill()
        pytest.fail(f"rank 0 was still running 300 s after rank 1 ended ({scenario}): a hang")
    outcomes = [json.loads(p.read_text()) if (p := results / f"rank{r}.json").exists() else None for r in range(2)]
    return outcomes, [p.exitcode for p in procs], root


def _nothing_left(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _single_process_root(tmp_path: Path) -> str:
    return export_hf(lora_qwen2(), tmp_path / "single", dtype="bf16", max_shard_size=20000).root_digest


def test_two_ranks_export_in_the_background_through_the_store(tmp_path):
    outcomes, codes, root = _run(tmp_path, "none")
    assert codes == [0, 0]
    assert all(o["ok"] for o in outcomes), outcomes
    assert outcomes[0]["root"] == outcomes[1]["root"] == _single_process_root(tmp_path)
    assert verify_snapshot(root / "iter_1") == []
    assert _nothing_left(root) == ["iter_1"]
    assert outcomes[0]["threads_left"] == [] and outcomes[1]["threads_left"] == []


@pytest.mark.parametrize("scenario,cause", [
    ("efbig", "File too large"),
    ("writer_raises", "injected fault in rank 1's writer"),
])
def test_a_failure_on_rank_1_mid_shard_ends_the_export_on_both_ranks(tmp_path, scenario, cause):
    """Before: rank 1's abort() raised on the bytes still buffered, its thread died outside the
    agreement and rank 0 waited in it (gloo's 30 minutes). After: one error, on both ranks,
    naming rank 1 and the cause, with no timeout involved."""
    outcomes, codes, root = _run(tmp_path, scenario)
    assert codes == [0, 0]
    for o in outcomes:
        assert not o["ok"], o
        assert "rank 1:" in o["error"] and cause in o["error"], o["error"]
        assert "did not answer" not in o["error"]  # decided by the agreement, not by a timeout
    assert _nothing_left(root) == []


def test_a_stuck_rank_is_named_and_abandoned_within_the_timeout(tmp_path):
    outcomes, codes, root = _run(tmp_path, "stuck")
    assert codes == [0, 0]
    r0, r1 = outcomes
    assert not r0["ok"] and "rank(s) 1 did not answer within 4 s" in r0["error"], r0
    assert r0["seconds"] < TIMEOUT_S * 10  # bounded by its own timeout (with room for a slow machine)
    # rank 1, once unstuck, learns who gave up and why, instead of waiting a timeout of its own
    assert not r1["ok"] and "another rank gave up on this export (rank 0: rank(s) 1 did not answer" in r1["error"]
    assert _nothing_left(root) == []


def test_a_rank_killed_mid_export_is_named_and_nothing_is_published(tmp_path):
    outcomes, codes, root = _run(tmp_path, "killed")
    assert codes[1] == 9 and outcomes[1] is None
    r0 = outcomes[0]
    assert not r0["ok"] and "rank(s) 1 did not answer within 4 s (stuck, or dead)" in r0["error"], r0
    assert r0["seconds"] < TIMEOUT_S * 10
    assert _nothing_left(root) == []


def test_a_rank_that_dies_after_sending_its_records_does_not_undo_the_publish(tmp_path):
    """Before: rank 0 published, then failed waiting for rank 1 in the last agreement, and logged
    the published export as FAILED. After: rank 0's last step is one-way, so it reports what it
    did: published, verified."""
    outcomes, codes, root = _run(tmp_path, "dies_after_records")
    assert codes[1] == 7 and outcomes[1] is None
    assert outcomes[0]["ok"], outcomes[0]
    assert outcomes[0]["root"] == _single_process_root(tmp_path)
    assert verify_snapshot(root / "iter_1") == []
    assert _nothing_left(root) == ["iter_1"]


def test_abort_after_a_full_disk_mid_shard_never_raises(tmp_path):
    """A real ENOSPC on a 64 KiB tmpfs, with bytes still in Python's write buffer: ``append``
    reports it naming the file; ``abort`` (the cleanup before the agreement) does not raise."""
    import subprocess

    import torch

    from sa2va_hooks.core.shards import TensorSlot
    from sa2va_hooks.core.writer import ShardWriter
    from test_enospc import _mount_tmpfs
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, 64 << 10)
    try:
        slots = [TensorSlot(f"t{i}", (1000,), torch.float32) for i in range(64)]  # 256 KB: more than the disk
        writer = ShardWriter(disk / "model.safetensors", slots)
        with pytest.raises(OSError, match="No space left on device") as e:
            for slot in slots:
                writer.append(slot, torch.zeros(1000))
        assert str(disk / "model.safetensors") in str(e.value)
        writer.abort()  # must not raise: the flush of what is still buffered fails again
        writer.abort()  # and is harmless twice
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
