"""Test-only launcher: xtuner's own train entry point under ``torch.distributed.run`` on a CPU.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_launch.py CONFIG [xtuner train args...]

It applies six CPU-only workarounds, then runs ``xtuner.tools.train`` unchanged (as
``tools/train.py`` does). None of them is in the product's code path, and none applies on GPUs:

1. mmengine's pytorch launcher calls ``torch.cuda.set_device(local_rank)`` on every rank, which
   fails without CUDA: made a no-op there (only there: on GPUs rank 1 would stay on cuda:0, which the
   lent H200s showed, 2026-11-30).
2. gloo's ``all_gather_into_tensor`` rejects the in-place view DeepSpeed ZeRO-2 passes (its
   input is a slice of its output) with 2 ranks: replaced, for gloo only, by ``all_gather`` into
   fresh chunks and a copy (same result).
3. DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op (``deepspeed_shm_comm_op``,
   about 4.5 minutes on this machine) at its first start. It is an optimisation only; without it
   DeepSpeed uses the plain torch.distributed (gloo) collectives. Skipped, so CI does not pay for it.
4. (on the command line, not here) DDP on CPU needs ``model_wrapper_cfg.device_ids=None``.
5. xtuner 0.1.23's ``DeepSpeedStrategy._wrap_model`` calls ``data_preprocessor.cuda()`` unconditionally
   (for ZeRO-3, where DeepSpeed does not move the model); without CUDA that fails: on a machine
   without CUDA, mmengine's ``BaseDataPreprocessor.cuda`` leaves the preprocessor where it is (on
   the CPU, with the model). xtuner 0.2.0 did not call it.
6. A process that exits with its gloo process group alive can abort in interpreter finalization ("terminate
   called without an active exception", SIGABRT): gloo's worker threads still hold tensors whose release
   needs the GIL (pytorch/pytorch PR #179291, abandoned). Seen twice on this 2-core machine on 2026-11-30
   under load (a DDP launch without the hooks in CI; a 2-rank ZeRO-3 export in the golden test). The
   process group is destroyed at exit, while the interpreter is still whole.

Failure injection for the tests: ``SA2VA_TEST_FAIL_RANK=r`` and ``SA2VA_TEST_FAIL_ITER=n`` make
rank r's shard writer raise ENOSPC during the export of iteration n.
"""
from __future__ import annotations

import atexit
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_workarounds() -> None:
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():  # 1. (with CUDA each rank must keep its own device)
        torch.cuda.set_device = lambda *a, **k: None

    real = dist.all_gather_into_tensor

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):  # 2.
        if dist.get_backend(group) != "gloo":
            return real(output_tensor, input_tensor, group=group, async_op=async_op)
        world = dist.get_world_size(group)
        parts = [torch.empty_like(input_tensor) for _ in range(world)]
        dist.all_gather(parts, input_tensor.contiguous().clone(), group=group)
        output_tensor.view(-1).copy_(torch.cat([p.reshape(-1) for p in parts]))
        return _Done() if async_op else None

    dist.all_gather_into_tensor = all_gather_into_tensor
    if not torch.cuda.is_available():  # 5.
        from mmengine.model import BaseDataPreprocessor
        BaseDataPreprocessor.cuda = lambda self, *a, **k: self
    atexit.register(_destroy_process_group)  # 6.
    try:  # 3. by module path: "import deepspeed.comm.torch as x" binds torch itself (deepspeed.comm's attribute)
        import importlib
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    except ImportError:
        pass


def _destroy_process_group() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _Done:
    def wait(self, *a, **k) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _inject_failure() -> None:
    rank, it = os.environ.get("SA2VA_TEST_FAIL_RANK"), os.environ.get("SA2VA_TEST_FAIL_ITER")
    if rank is None or int(rank) != int(os.environ.get("RANK", "0")):
        return
    import errno

    import sa2va_hooks.core.rank_writer as ex
    real_writer, real_host_shard = ex.ShardWriter, ex.HostShard

    def injected(path) -> bool:
        """By the shard's staging directory (``iter_N.incomplete-*``), not by the iteration training is at:
        a background export may still be writing iteration 3 when training reaches 6."""
        return it is None or Path(path).parent.name.split(".incomplete")[0] == f"iter_{int(it)}"

    def writer(path, slots):
        if injected(path):
            raise OSError(errno.ENOSPC, f"No space left on device (injected on rank {rank})", str(path))
        return real_writer(path, slots)

    class HostShard(real_host_shard):  # the shard opened in the host process (decision 62); a class still
        def __init__(self, host, path, entries, done) -> None:
            if injected(path):
                raise OSError(errno.ENOSPC, f"No space left on device (injected on rank {rank})", str(path))
            super().__init__(host, path, entries, done)

    ex.ShardWriter, ex.HostShard = writer, HostShard


def main() -> None:
    _cpu_workarounds()
    from sa2va_hooks.compat import allow_mmengine_checkpoint_globals, apply_torch_cpu_bf16_shim
    apply_torch_cpu_bf16_shim()
    allow_mmengine_checkpoint_globals()
    _inject_failure()
    sys.argv = ["xtuner.tools.train", *sys.argv[1:]]
    runpy.run_module("xtuner.tools.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
