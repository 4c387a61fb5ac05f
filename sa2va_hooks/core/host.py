"""Device-to-host copies into reused pinned memory.

A plain ``tensor.cpu()`` from a GPU goes through pageable memory at about 1.3 GiB/s (anchor
measurement), and every fresh host tensor must also be faulted in page by page. Pinned memory
reaches about 51 GiB/s, but allocating it is itself slow. So a stager copies each tensor straight
into one pinned buffer, as large as the largest tensor it has seen, which is taken from and given
back to a small process-wide pool: the second export (and the first, when the hook reserved the
buffer before training) allocates nothing. What ``to_host`` returns is a view of that buffer,
valid until the stager's next call: callers hash and write it, then ask for the next tensor.
"""
from __future__ import annotations

import threading

import torch

_POOL: list[torch.Tensor] = []
_POOL_LOCK = threading.Lock()
_POOL_MAX = 2  # a background export and a synchronous fingerprint pass may need one each


def _take(nbytes: int) -> torch.Tensor:
    with _POOL_LOCK:
        fits = [i for i, b in enumerate(_POOL) if b.numel() >= nbytes]
        if fits:  # the smallest that fits (by index: list.remove would compare tensors by value)
            return _POOL.pop(min(fits, key=lambda i: _POOL[i].numel()))
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _give_back(buf: torch.Tensor) -> None:
    with _POOL_LOCK:
        _POOL.append(buf)
        _POOL.sort(key=lambda b: -b.numel())
        del _POOL[_POOL_MAX:]  # keep the largest; the rest is freed


def reserve(nbytes: int) -> None:
    """Allocate (and touch) a pinned buffer of ``nbytes`` now, so that the first export does not
    pay for it. Only where CUDA is available: on the CPU nothing is staged."""
    if nbytes > 0 and torch.cuda.is_available():
        buf = _take(nbytes)
        buf.zero_()
        _give_back(buf)


class HostStager:
    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def __enter__(self) -> "HostStager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give the pinned buffer back to the pool (views handed out become invalid)."""
        if self._buf is not None:
            _give_back(self._buf)
            self._buf = None

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < nbytes:
            self.close()
            self._buf = _take(nbytes)
        return self._buf

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU copy of ``t`` (the tensor itself when it is on the CPU). For a CUDA
        tensor it is a view of this stager's pinned buffer, overwritten by the next call."""
        if t.device.type == "cpu":
            return t.contiguous()
        if t.device.type != "cuda":
            return t.to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        out = self._buffer(max(nbytes, 1))[:nbytes].view(t.dtype).view(t.shape)
        out.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return out
