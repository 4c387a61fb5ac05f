"""The compatibility paths of sa2va_hooks.compat, each against an independent reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sa2va_hooks import compat


class _RunsCode:
    def __reduce__(self):
        return (exec, ("raise SystemExit('this must never run')",))


def test_unsafe_globals_reader_equals_torchs_own_and_runs_nothing(tmp_path, monkeypatch):
    """torch >= 2.5 lists a checkpoint's unsafe globals itself; our reader for torch 2.4 must list the
    same ones for the same file (and, like torch, never unpickle it)."""
    path = tmp_path / "ckpt.pth"
    torch.save({"w": torch.ones(3), "step": np.float64(2.0), "arr": np.arange(3), "evil": _RunsCode(),
                "od": __import__("collections").OrderedDict(a=1)}, path)
    own = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
    ours = compat.unsafe_globals_in_checkpoint(str(path))
    assert "builtins.exec" in ours and not any(g.startswith("torch.") or g.startswith("collections.") for g in ours)
    if own is None:
        pytest.skip(f"torch {torch.__version__} has no get_unsafe_globals_in_checkpoint to compare with "
                    f"(found {ours})")
    assert sorted(ours) == sorted(own(str(path)))


def test_unsafe_globals_reader_names_a_file_that_is_not_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
    bad = tmp_path / "random.bin"
    bad.write_bytes(b"\x00\x01not a zip")
    with pytest.raises(ValueError, match="random.bin is not a torch zip checkpoint"):
        compat.unsafe_globals_in_checkpoint(str(bad))


def test_numpy_multiarray_is_the_module_numpy_pickles_through():
    import pickle
    import pickletools
    ops = [arg for op, arg, _ in pickletools.genops(pickle.dumps(np.arange(2), protocol=2)) if op.name == "GLOBAL"]
    module = next(a.split(" ")[0] for a in ops if a.endswith(" _reconstruct"))
    assert compat.numpy_multiarray().__name__ == module
