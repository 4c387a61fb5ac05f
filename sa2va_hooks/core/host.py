"""Device-to-host copies through a reused pinned bounce buffer.

A plain ``tensor.cpu()`` from a GPU goes through pageable memory at about 1.3 GiB/s (anchor
measurement); pinned memory reaches about 51 GiB/s, but allocating pinned memory per tensor is
itself slow. So one pinned buffer is allocated once and reused: GPU -> pinned (DMA), then
pinned -> the destination host tensor (memcpy).
"""
from __future__ import annotations

import torch


class HostStager:
    def __init__(self, chunk_bytes: int = 64 << 20) -> None:
        self.chunk_bytes = chunk_bytes
        self._pinned: torch.Tensor | None = None

    def _buffer(self) -> torch.Tensor:
        if self._pinned is None:
            self._pinned = torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True)
        return self._pinned

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU copy of ``t`` (the tensor itself is returned when it is on the CPU)."""
        if t.device.type == "cpu":
            return t.contiguous()
        if t.device.type != "cuda":
            return t.to("cpu").contiguous()
        t = t.contiguous()
        out = torch.empty(t.shape, dtype=t.dtype)
        if t.numel() == 0:
            return out
        src, dst = t.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8)
        buf = self._buffer()
        for start in range(0, src.numel(), self.chunk_bytes):
            n = min(self.chunk_bytes, src.numel() - start)
            buf[:n].copy_(src[start:start + n], non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()
            dst[start:start + n].copy_(buf[:n])
        return out
