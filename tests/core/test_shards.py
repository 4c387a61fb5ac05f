"""Shard planning in ``sa2va_hooks.core.shards``, on dummy sizes: no model, no export, no file but one
tiny safetensors buffer.

What is pinned, and against what:
- ``parse_size``: hand-computed byte counts for every unit, and transformers' own
  ``convert_file_size_to_int`` for the spellings both accept (the docstring promises its meaning);
- ``TensorSlot.nbytes``: elements times element size, computed by hand and by ``torch.empty(...).nbytes``;
- ``plan_shards``: the greedy, order-preserving rule stated in its docstring, as properties that
  determine the greedy split uniquely (concatenation = input, no shard over the limit unless it is a
  single tensor, no shard could have taken the next tensor), plus hand-worked cases and file names;
- ``plan_shard_groups``: groups never share a file at any limit (one larger than the whole model
  included: the limit caps a file, it never merges groups), numbering runs across groups, a single
  group is planned as ``plan_shards`` plans it (one file when it fits), and the frozen group's
  files do not depend on the trained group (the hard-link rationale);
- ``safetensors_header``: parsed and compared with the header ``safetensors.torch.save`` writes for the
  same tensors in the same order, and the header + data loads back with safetensors itself;
- ``assign_shards``: the documented rule (largest file first, to the least loaded rank, ties to the
  lowest rank, equal sizes by name) on a hand-worked case, and properties for world sizes 1..8:
  every file has exactly one owner in range, independent of the plan's file order, a load spread no
  wider than the largest file, and every rank used when there are at least as many files.
"""
from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from sa2va_hooks.core.shards import (SINGLE_FILE, ShardPlan, TensorSlot, assign_shards, parse_size,
                                     plan_shard_groups, plan_shards, safetensors_header)


def slots_of(*sizes: int, prefix: str = "t") -> list[TensorSlot]:
    """uint8 slots of the given byte sizes (1 byte per element), named t0, t1, ..."""
    return [TensorSlot(f"{prefix}{i}", (n,), torch.uint8) for i, n in enumerate(sizes)]


def names(plan: ShardPlan) -> list[tuple[str, list[str]]]:
    return [(f, [s.name for s in slots]) for f, slots in plan.files]


# -- parse_size ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling, expected", [
    (0, 0), (123, 123), ("123", 123), ("123B", 123),
    ("1KB", 1000), ("1MB", 1000**2), ("5GB", 5 * 1000**3), ("2TB", 2 * 1000**4),
    ("1KiB", 1024), ("500MiB", 500 * 1024**2), ("2GiB", 2 * 1024**3), ("1TiB", 1024**4),
    ("1.5GB", 1_500_000_000), ("0.5KiB", 512),
    (" 5 GB ", 5 * 1000**3), (" 5 gb ", 5 * 1000**3 // 8), ("2gib", 2 * 1024**3), ("10Kib", 10 * 1024),
])
def test_parse_size_units(spelling, expected):
    assert parse_size(spelling) == expected


@pytest.mark.parametrize("spelling", ["", "five gigs", "5XB", "-5GB", "5G", "GB", "5 G B", "1e9", "5GB5"])
def test_parse_size_refuses_what_is_not_a_size_naming_it(spelling):
    with pytest.raises(ValueError, match="max_shard_size .* is not a size"):
        parse_size(spelling)


@pytest.mark.parametrize("spelling", ["5iB", "5 IB"])
def test_parse_size_unit_without_prefix_is_a_value_error(spelling):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(spelling)


@pytest.mark.parametrize("spelling", ["5GB", "2GiB", "500MiB", "7MB", "10KB", "3KiB", "2gib", "5gB"])
def test_parse_size_agrees_with_transformers(spelling):
    from transformers.utils.hub import convert_file_size_to_int
    assert parse_size(spelling) == convert_file_size_to_int(spelling)


@pytest.mark.parametrize("spelling", ["5Gb", "500Mb", "8Kb", "5gb"])
def test_parse_size_lowercase_b_means_bits_as_in_transformers(spelling):
    from transformers.utils.hub import convert_file_size_to_int
    assert parse_size(spelling) == convert_file_size_to_int(spelling)


# -- TensorSlot.nbytes --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, dtype, expected", [
    ((), torch.float32, 4), ((3,), torch.float16, 6), ((2, 3), torch.bfloat16, 12), ((2, 3, 4), torch.float64, 192),
    ((5,), torch.int64, 40), ((7,), torch.bool, 7), ((0, 4), torch.float32, 0), ((4, 0), torch.int8, 0),
    ((3, 3), torch.float8_e4m3fn, 9), ((1000, 1000), torch.int32, 4_000_000),
])
def test_nbytes_is_elements_times_element_size(shape, dtype, expected):
    slot = TensorSlot("w", shape, dtype)
    assert slot.nbytes == expected == torch.empty(shape, dtype=dtype).nbytes


# -- plan_shards: the greedy rule -----------------------------------------------------------------------

def assert_greedy_split(sizes: list[int], limit: int, plan: ShardPlan) -> None:
    """The properties that make the greedy, order-preserving split unique."""
    flat = [s for _, slots in plan.files for s in slots]
    assert [s.name for s in flat] == [f"t{i}" for i in range(len(sizes))], "order changed or tensors lost"
    parts = [[s.nbytes for s in slots] for _, slots in plan.files]
    for i, part in enumerate(parts):
        assert part, "an empty shard"
        assert sum(part) <= limit or len(part) == 1, f"shard {i} {part} over the limit {limit} with several tensors"
        if i + 1 < len(parts):
            assert sum(part) + parts[i + 1][0] > limit, f"shard {i} {part} could have taken {parts[i + 1][0]}"


def test_everything_that_fits_is_one_unsharded_file():
    plan = plan_shards(slots_of(10, 20, 30), 60)  # exactly the limit still fits
    assert names(plan) == [(SINGLE_FILE, ["t0", "t1", "t2"])]
    assert plan.total_size == 60
    assert plan.weight_map == {"t0": SINGLE_FILE, "t1": SINGLE_FILE, "t2": SINGLE_FILE}


def test_split_is_greedy_and_files_are_named_as_transformers_names_them():
    plan = plan_shards(slots_of(40, 40, 40, 10, 90), 80)
    # 40 + 40 = 80 fits; 40 more starts a file; 40 + 10 = 50; 50 + 90 > 80 starts the third
    assert names(plan) == [("model-00001-of-00003.safetensors", ["t0", "t1"]),
                           ("model-00002-of-00003.safetensors", ["t2", "t3"]),
                           ("model-00003-of-00003.safetensors", ["t4"])]
    assert plan.total_size == 220


def test_a_tensor_larger_than_the_limit_gets_a_shard_of_its_own():
    plan = plan_shards(slots_of(10, 500, 10), 50)
    assert [[s.name for s in slots] for _, slots in plan.files] == [["t0"], ["t1"], ["t2"]]


def test_limit_given_as_a_string():
    assert len(plan_shards(slots_of(600, 600), "1KB").files) == 2
    assert len(plan_shards(slots_of(600, 600), "2KB").files) == 1


@pytest.mark.parametrize("seed", range(12))
def test_greedy_properties_on_random_sizes(seed):
    rng = random.Random(seed)
    limit = rng.choice([1, 50, 100, 1000])
    sizes = [rng.choice([0, 1, rng.randint(1, 120), rng.randint(100, 3000)]) for _ in range(rng.randint(1, 40))]
    plan = plan_shards(slots_of(*sizes), limit)
    assert_greedy_split(sizes, limit, plan)
    n = len(plan.files)
    expected_names = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert [f for f, _ in plan.files] == expected_names
    assert plan.total_size == sum(sizes)
    assert set(plan.weight_map) == {f"t{i}" for i in range(len(sizes))}


# -- plan_shard_groups ----------------------------------------------------------------------------------

def test_groups_never_share_a_file_and_numbering_runs_across_groups():
    frozen, trained = slots_of(60, 60, prefix="f"), slots_of(30, prefix="x")
    plan = plan_shard_groups([frozen, trained], 100)
    # plan_shards alone would give [f0], [f1, x0]; groups keep x0 apart
    assert names(plan) == [("model-00001-of-00003.safetensors", ["f0"]),
                           ("model-00002-of-00003.safetensors", ["f1"]),
                           ("model-00003-of-00003.safetensors", ["x0"])]


@pytest.mark.parametrize("limit", [100, 101, 10**4, "5GB"])
def test_groups_that_would_fit_one_file_still_get_files_of_their_own(limit):
    """At the default 5GB a small model fits one file; the frozen tensors still get their own, so
    the next export can hard-link it."""
    plan = plan_shard_groups([slots_of(30, prefix="f"), slots_of(20, 50, prefix="x")], limit)
    assert names(plan) == [("model-00001-of-00002.safetensors", ["f0"]),
                           ("model-00002-of-00002.safetensors", ["x0", "x1"])]


@pytest.mark.parametrize("limit", [10**4, "5GB"])
def test_one_group_that_fits_is_one_file(limit):
    assert names(plan_shard_groups([slots_of(30, 20, prefix="f"), []], limit)) == [(SINGLE_FILE, ["f0", "f1"])]
    assert names(plan_shard_groups([[], slots_of(30, prefix="x")], limit)) == [(SINGLE_FILE, ["x0"])]


def test_empty_groups_are_ignored_and_one_group_is_plain_planning():
    plan = plan_shard_groups([[], slots_of(40, 40, 40), []], 80)
    assert names(plan) == [("model-00001-of-00002.safetensors", ["t0", "t1"]),
                           ("model-00002-of-00002.safetensors", ["t2"])]


@pytest.mark.parametrize("trained_sizes", [(1,), (70,), (30, 30, 30), (500, 5)])
def test_frozen_files_hold_the_same_tensors_whatever_the_trained_group(trained_sizes):
    """The point of groups: the frozen shards repeat from export to export, so they can be hard-linked."""
    frozen = slots_of(60, 30, 60, 60, prefix="f")
    plan = plan_shard_groups([frozen, slots_of(*trained_sizes, prefix="x")], 100)
    contents = [[s.name for s in slots] for _, slots in plan.files]
    assert contents[:3] == [["f0", "f1"], ["f2"], ["f3"]]
    assert all(all(n.startswith("x") for n in c) for c in contents[3:])
    n = len(plan.files)
    assert [f for f, _ in plan.files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


@pytest.mark.parametrize("seed", range(8))
def test_group_properties_on_random_sizes(seed):
    rng = random.Random(100 + seed)
    limit = rng.choice([50, 100, 400])
    groups = [slots_of(*[rng.randint(0, 150) for _ in range(rng.randint(0, 10))], prefix=p) for p in "abc"]
    plan = plan_shard_groups(groups, limit)
    flat = [s.name for _, slots in plan.files for s in slots]
    assert flat == [s.name for g in groups for s in g]
    for _, slots in plan.files:
        assert len({s.name[0] for s in slots}) <= 1, "a file mixes groups"
    nonempty = [g for g in groups if g]
    if len(nonempty) == 1 and sum(s.nbytes for s in nonempty[0]) <= limit:
        assert [f for f, _ in plan.files] == [SINGLE_FILE]
    else:
        assert SINGLE_FILE not in [f for f, _ in plan.files]


@pytest.mark.parametrize("seed", range(8))
def test_frozen_and_trained_never_share_a_file_at_any_limit(seed):
    rng = random.Random(200 + seed)
    frozen = slots_of(*[rng.randint(0, 150) for _ in range(rng.randint(1, 8))], prefix="f")
    trained = slots_of(*[rng.randint(0, 150) for _ in range(rng.randint(1, 8))], prefix="x")
    total = sum(s.nbytes for s in frozen + trained)
    for limit in (1, 50, total, total + 1, 10 * total + 10, "5GB"):
        plan = plan_shard_groups([frozen, trained], limit)
        kinds = [{s.name[0] for s in slots} for _, slots in plan.files]
        assert all(len(k) == 1 for k in kinds), (limit, names(plan))
        assert kinds[0] == {"f"} and kinds[-1] == {"x"}, (limit, names(plan))


# -- safetensors_header against safetensors' own writer -----------------------------------------------

def _split_header(raw: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


TENSORS = {
    "a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b.bias": torch.arange(5, dtype=torch.float16),
    "c.scale": torch.tensor(1.5, dtype=torch.bfloat16),  # 0-d
    "d.ids": torch.arange(4, dtype=torch.int64),
    "e.empty": torch.zeros(0, 4, dtype=torch.int8),
    "f.mask": torch.tensor([True, False, True]),
    "g.big": torch.arange(3, dtype=torch.float64),
    "h.f8": torch.zeros(2, 2, dtype=torch.float8_e5m2),
}


def _ours_in_safetensors_order(tensors: dict) -> tuple[bytes, bytes, int]:
    """(safetensors' file, our header for the same tensors in the order safetensors placed them, the
    length of safetensors' header). safetensors chooses its own layout (by dtype, then name)."""
    from safetensors.torch import save
    ref = save(tensors, metadata={"format": "pt"})
    ref_len, ref_header = _split_header(ref)
    order = sorted((k for k in ref_header if k != "__metadata__"), key=lambda k: ref_header[k]["data_offsets"][0])
    return ref, safetensors_header([TensorSlot(k, tuple(tensors[k].shape), tensors[k].dtype) for k in order]), ref_len


def test_header_matches_what_safetensors_writes():
    ref, ours, ref_len = _ours_in_safetensors_order(TENSORS)
    our_len, our_header = _split_header(ours)
    assert our_header == _split_header(ref)[1]  # dtype names, shapes, offsets, metadata
    assert our_len % 8 == 0 and ref_len % 8 == 0 and len(ours) == 8 + our_len


def test_header_and_data_load_with_safetensors():
    from safetensors.torch import load
    # safetensors 0.4.3 (the legacy stack) cannot load a 0-element tensor from bytes at all
    tensors = {k: t for k, t in TENSORS.items() if t.numel()}
    ref, ours, ref_len = _ours_in_safetensors_order(tensors)
    loaded = load(ours + ref[8 + ref_len:])
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape
        assert torch.equal(loaded[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_header_offsets_are_contiguous_in_plan_order():
    slots = [TensorSlot("z", (3,), torch.float32), TensorSlot("a", (2, 2), torch.float16),
             TensorSlot("m", (), torch.bool)]
    _, header = _split_header(safetensors_header(slots))
    assert header.pop("__metadata__") == {"format": "pt"}
    assert list(header) == ["z", "a", "m"]
    assert [header[k]["data_offsets"] for k in header] == [[0, 12], [12, 20], [20, 21]]
    assert [header[k]["dtype"] for k in header] == ["F32", "F16", "BOOL"]


def test_header_refuses_a_dtype_safetensors_cannot_store_naming_the_tensor():
    with pytest.raises(TypeError, match="tensor 'c' has dtype torch.complex64"):
        safetensors_header([TensorSlot("ok", (1,), torch.float32), TensorSlot("c", (1,), torch.complex64)])


# -- assign_shards --------------------------------------------------------------------------------------

def plan_of(sizes: dict[str, int]) -> ShardPlan:
    return ShardPlan([(f, [TensorSlot(f + ".t", (n,), torch.uint8)]) for f, n in sizes.items()])


def test_assignment_follows_the_documented_rule_on_a_worked_case():
    # largest first, each to the least loaded rank, ties to the lowest rank:
    # A50 -> r0 (50) | B40 -> r1 (40) | C30 -> r1 (70) | D20 -> r0 (70) | E10 -> tie 70/70 -> r0
    plan = plan_of({"E": 10, "C": 30, "A": 50, "D": 20, "B": 40})
    assert assign_shards(plan, 2) == {"A": 0, "B": 1, "C": 1, "D": 0, "E": 0}


def test_equal_sizes_are_taken_in_name_order():
    plan = plan_of({"c": 7, "a": 7, "b": 7})
    assert assign_shards(plan, 3) == {"a": 0, "b": 1, "c": 2}
    assert assign_shards(plan, 2) == {"a": 0, "b": 1, "c": 0}


def test_one_rank_writes_everything():
    assert set(assign_shards(plan_of({"x": 1, "y": 99, "z": 5}), 1).values()) == {0}


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("seed", range(5))
def test_assignment_properties(world, seed):
    rng = random.Random(seed * 31 + world)
    n = rng.randint(1, 20)
    sizes = {f"model-{i + 1:05d}-of-{n:05d}.safetensors": rng.randint(1, 10_000) for i in range(n)}
    plan = plan_of(sizes)
    owner = assign_shards(plan, world)
    # coverage: exactly the plan's files, each owned by one rank in range
    assert set(owner) == set(sizes) and all(0 <= r < world for r in owner.values())
    # deterministic, and independent of the order the plan lists its files in (every rank agrees)
    shuffled = list(plan.files)
    rng.shuffle(shuffled)
    assert assign_shards(ShardPlan(shuffled), world) == owner == assign_shards(plan, world)
    # balanced: no rank is more than the largest file above the least loaded one
    load = [sum(sizes[f] for f, r in owner.items() if r == rank) for rank in range(world)]
    assert max(load) - min(load) <= max(sizes.values())
    # the largest file (the first by name among equals) goes to rank 0; every rank works when there are
    # enough files, else exactly ranks 0..n-1 do
    assert owner[min(sizes, key=lambda f: (-sizes[f], f))] == 0
    assert set(owner.values()) == set(range(min(world, n)))
