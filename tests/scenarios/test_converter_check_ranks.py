"""The hook's converter check in ``before_train`` over 2 real gloo processes: when only one rank sees
a problem (its ``hf_code_dir`` missing, as a node-local path can be), every rank stops with the same
error naming that rank, and no rank goes on into training's first collective."""
from __future__ import annotations

import json
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, init: str, root: str, result_dir: str) -> None:
    # bounded: without the agreement rank 0 would wait in the barrier for a rank that stopped
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=120))
    outcome: dict = {"rank": rank}
    try:
        from mmengine.config import Config
        from mmengine.logging import MMLogger

        from sa2va_demo.v2.training import HF_CODE, TEMPLATE, Sa2VAModelV2
        from sa2va_hooks import HFExportHook
        model = Sa2VAModelV2("internvl", root)
        code = str(HF_CODE["internvl"]) if rank == 0 else str(Path(root) / "not_on_this_node")
        hook = HFExportHook(converter=dict(type="auto", hf_code_dir=code))
        runner = SimpleNamespace(model=model, cfg=Config(dict(template=TEMPLATE)),
                                 logger=MMLogger.get_instance(f"ranks_{rank}"))
        hook._resolve_converter(runner)
        outcome["went_on"] = True
        dist.barrier()  # what training's first collective would be
    except Exception as e:  # noqa: BLE001 - reported to the test through the result file
        outcome.update(error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def test_one_ranks_failed_converter_check_stops_every_rank(tmp_path):
    from sa2va_demo.v2.training import make_base
    make_base("internvl", tmp_path / "base_internvl")  # there before the job, as a downloaded base is
    results = tmp_path / "results"
    results.mkdir()
    mp.start_processes(_worker, args=(f"file://{tmp_path / 'store'}", str(tmp_path), str(results)), nprocs=2,
                       join=True, start_method="spawn")
    out = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert not any(r.get("went_on") for r in out), out
    for r in out:
        assert r["error"].startswith("RankFailedError"), r
        assert "rank 1" in r["error"] and "not_on_this_node" in r["error"] and "does not exist" in r["error"], r
