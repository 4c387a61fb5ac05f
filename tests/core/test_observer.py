"""core/observer.py: the no-op base every observer extends, and what an observer that raises does to
an export (fails it like any other error; nothing is published). The export is the package's public
``export_hf`` on a tiny Qwen2 with fresh random weights."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_qwen2
from sa2va_hooks import export_hf
from sa2va_hooks.core.observer import NO_OBSERVER, ExportObserver


def test_the_base_observer_does_nothing_for_every_event():
    for obs in (ExportObserver(), NO_OBSERVER):
        assert obs.tensor_producing(object()) is None
        assert obs.tensor_produced(object()) is None
        assert obs.file_done("model.safetensors", 10, False) is None


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("event", ["tensor_producing", "tensor_produced", "file_done"])
def test_an_observer_that_raises_fails_the_export_and_publishes_nothing(tmp_path, event):
    class Raising(ExportObserver):
        pass

    def boom(self, *args, **kwargs):
        raise _Boom(f"observer failed in {event}")
    setattr(Raising, event, boom)
    seed = int(torch.randint(0, 1000, (1,)))
    with pytest.raises(Exception) as e:
        export_hf(tiny_qwen2(seed=seed), tmp_path / "out", observer=Raising())
    chain, err = [], e.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(f"observer failed in {event}" in str(x) for x in chain), chain
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
