"""The one staging cleanup (``core.publish.removed_on_failure``): rank 0 removes the staging
directory when the block raises, whatever it raises, and the error goes on; other ranks never
remove it (rank 0 made it, and they may still be writing into it); success leaves it in place."""
from __future__ import annotations

import dataclasses

import pytest

from sa2va_hooks.core.publish import discard_staging, removed_on_failure


@dataclasses.dataclass
class Rank:
    rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _staging(tmp_path):
    staging = tmp_path / "iter_1.incomplete-0123456789ab"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    return staging


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_removed_on_failure_rank0_removes_and_reraises(tmp_path, error):
    staging = _staging(tmp_path)
    with pytest.raises(type(error)):
        with removed_on_failure(staging, Rank(0)):
            raise error
    assert not staging.exists()


def test_removed_on_failure_other_ranks_leave_it(tmp_path):
    staging = _staging(tmp_path)
    with pytest.raises(ValueError, match="rank 1 failed"):
        with removed_on_failure(staging, Rank(1)):
            raise ValueError("rank 1 failed")
    assert staging.is_dir()


def test_removed_on_failure_success_keeps_it(tmp_path):
    staging = _staging(tmp_path)
    with removed_on_failure(staging, Rank(0)) as path:
        assert path == staging
    assert (staging / "model.safetensors").is_file()


def test_discard_staging_is_rank0_only_and_tolerates_a_missing_directory(tmp_path):
    staging = _staging(tmp_path)
    discard_staging(staging, Rank(1))
    assert staging.is_dir()
    discard_staging(staging, Rank(0))
    assert not staging.exists()
    discard_staging(staging, Rank(0))  # gone already (published, or removed): no error
