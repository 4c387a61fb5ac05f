"""core/partitions.py: tensors assembled from every rank's piece over a gloo group of their own,
against the tensor they were cut from; layouts that do not cover a tensor; a rank that dies
mid-assembly (the other rank fails in bounded time instead of hanging)."""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sa2va_hooks.core.partitions import Piece, PieceExchange, PieceExchangeError, check_cover


def test_check_cover_accepts_an_exact_cover_and_names_the_tensor_otherwise():
    check_cover("w", [(0, 5), (5, 3)], 8)
    check_cover("w", [(0, 8), (8, 0)], 8)  # ZeRO-3: a rank past the end holds nothing
    for spans in ([(0, 5), (6, 2)], [(0, 5), (4, 4)], [(0, 4), (4, 3)]):
        with pytest.raises(PieceExchangeError, match=r"partitions of 'w' \(8 elements\) do not cover it"):
            check_cover("w", spans, 8)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"a": torch.randn(5, 3, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g),
            "c": torch.randint(0, 100, (1,), generator=g)}


def _spans(numel: int, world: int) -> list[tuple[int, int]]:
    size = -(-numel // world)  # ZeRO-3's rule: equal parts, the last one short
    return [(min(size * r, numel), max(0, min(size, numel - size * r))) for r in range(world)]


def _worker(rank: int, world: int, init: str, out: str, die: bool) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    result: dict = {"rank": rank}
    try:
        ex = PieceExchange.create(timeout_s=60)
        got = {}
        for i, (name, t) in enumerate(_tensors().items()):
            if die and rank == 1 and i == 1:
                os._exit(3)  # killed mid-assembly: no goodbye, no exception
            spans = _spans(t.numel(), world)
            start, length = spans[rank]
            piece = Piece(name, tuple(t.shape), t.dtype, start, length, t.reshape(-1), start, False)
            owner = i % world
            t0 = time.monotonic()
            full = ex.assemble(piece.read().clone(), spans, piece, owner)
            result["seconds"] = time.monotonic() - t0
            if full is not None:
                got[name] = torch.equal(full, t) and full.dtype == t.dtype and full.shape == t.shape
        result.update(ok=True, equal=got)
    except Exception as e:  # noqa: BLE001 - reported through the result file
        result.update(ok=False, error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if not die:
        dist.destroy_process_group()
    os._exit(0)


def _run(tmp_path: Path, die: bool) -> list[dict | None]:
    init = f"file://{tmp_path / 'store'}"
    ctx = mp.start_processes(_worker, args=(2, init, str(tmp_path), die), nprocs=2, join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=300)
    assert not any(p.is_alive() for p in ctx.processes), "a rank hung"
    return [json.loads(f.read_text()) if (f := tmp_path / f"rank{r}.json").exists() else None for r in range(2)]


def test_every_tensor_is_assembled_on_its_owner_equal_to_the_tensor_it_was_cut_from(tmp_path):
    results = _run(tmp_path, die=False)
    assert all(r["ok"] for r in results), results
    # rank 0 owns tensors 0 and 2, rank 1 tensor 1; each equals the original, dtype and shape included
    assert results[0]["equal"] == {"a": True, "c": True} and results[1]["equal"] == {"b": True}


def test_a_rank_killed_mid_assembly_makes_the_other_fail_instead_of_hanging(tmp_path):
    results = _run(tmp_path, die=True)
    assert results[1] is None  # rank 1 died without a word
    assert results[0]["ok"] is False, results[0]
    assert results[0]["error"]  # gloo reports the lost peer (or the group's timeout) as an error
