"""zero_checkpoint: a hand-built ZeRO-1/2 and ZeRO-3 directory in DeepSpeed's layout (the module
docstring's format: per-rank flat fp32 partitions, param_shapes, frozen fragments) is consolidated
back to the tensors it was cut from, recomputed with ``torch.cat``/``narrow``; missing files are named.
CPU only, no DeepSpeed needed."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sa2va_hooks.offline.zero_checkpoint import ZeroCheckpointError, consolidate, regular_file, zero_files

WORLD = 2


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lin.weight": torch.randn(3, 4, generator=g), "lin.bias": torch.randn(5, generator=g),
            "out.weight": torch.randn(2, 3, generator=g)}


def _optim(path: Path, stage: int, key: str, groups: list[torch.Tensor]) -> None:
    torch.save({"optimizer_state_dict": {"zero_stage": stage, "partition_count": WORLD, key: groups}}, path)


def _model_states(params, frozen, frozen_fragments, buffers):
    return {"module": dict(buffers), "buffer_names": list(buffers),
            "param_shapes": [{n: list(t.shape) for n, t in params.items()}],
            "frozen_param_shapes": {n: list(t.shape) for n, t in frozen.items()},
            "frozen_param_fragments": frozen_fragments, "shared_params": {"tied.weight": "out.weight"}}


def _zero12(tag: Path, params, frozen, buffers) -> None:
    flat = torch.cat([t.reshape(-1) for t in params.values()])
    align = 2 * WORLD
    flat = torch.cat([flat, torch.zeros(math.ceil(flat.numel() / align) * align - flat.numel())])
    per = flat.numel() // WORLD
    for r in range(WORLD):
        _optim(tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", 2, "single_partition_of_fp32_groups",
               [flat.narrow(0, r * per, per).clone()])
    torch.save(_model_states(params, frozen, dict(frozen), buffers), tag / "mp_rank_00_model_states.pt")


def _zero3(tag: Path, params, frozen, buffers) -> None:
    def split(t, r):
        n = t.numel()
        k = math.ceil(n / WORLD)
        padded = torch.cat([t.reshape(-1), torch.zeros(k * WORLD - n)])
        return padded.narrow(0, r * k, k)
    for r in range(WORLD):
        flat = torch.cat([split(t, r) for t in params.values()])
        # two groups per rank, cut in the middle of a parameter: consolidation must join them
        _optim(tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", 3, "fp32_flat_groups",
               [flat[:5].clone(), flat[5:].clone()])
        torch.save(_model_states(params, frozen, {n: split(t, r).clone() for n, t in frozen.items()}, buffers),
                   tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")


@pytest.mark.parametrize("build", [_zero12, _zero3], ids=["zero2", "zero3"])
def test_consolidation_restores_the_tensors_it_was_cut_from(tmp_path, build):
    params, frozen = _params(seed=71), {"emb.weight": torch.randn(7, 2, generator=torch.Generator().manual_seed(72))}
    buffers = {"norm.running": torch.arange(4, dtype=torch.float16)}
    build(tmp_path, params, frozen, buffers)
    state, first = consolidate(tmp_path)
    for name, t in {**params, **frozen}.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], t), name
    assert torch.equal(state["norm.running"], buffers["norm.running"].float())
    assert torch.equal(state["tied.weight"], params["out.weight"])
    assert set(state) == set(params) | set(frozen) | set(buffers) | {"tied.weight"}
    assert "param_shapes" in first


def test_partitions_from_different_checkpoints_are_refused(tmp_path):
    params = _params(seed=73)
    _zero3(tmp_path, params, {}, {})
    p = tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _optim(p, 3, "fp32_flat_groups", [torch.zeros(3)])  # a rank holding fewer values than the others
    with pytest.raises(ZeroCheckpointError, match="different numbers of fp32 values"):
        consolidate(tmp_path)


def test_a_missing_rank_file_is_named(tmp_path):
    _zero12(tmp_path, _params(seed=74), {}, {})
    (tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (tmp_path / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ZeroCheckpointError, match=r"ranks \[0, 2\].*missing"):
        zero_files(tmp_path)


def test_no_optimizer_files_and_a_missing_file_are_named(tmp_path):
    (tmp_path / "stray.pt").write_bytes(b"")
    with pytest.raises(ZeroCheckpointError, match="stray.pt"):
        zero_files(tmp_path)
    missing = tmp_path / "mp_rank_00_model_states.pt"
    with pytest.raises(FileNotFoundError, match="mp_rank_00_model_states.pt does not exist"):
        regular_file(missing, what="DeepSpeed checkpoint file")
