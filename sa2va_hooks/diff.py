"""The CLI's ``diff``: reading tensors from snapshot directories, comparing two of them, and the
heat map of relative ``||dW||``.

Not part of the core: the export pipeline never compares two snapshots (its own checks are in
``core/verify.py``), and the plot needs matplotlib.

A directory may be a sa2va_hooks export (with a manifest) or any HF model directory with
safetensors files. Tensors are read one at a time, so comparing two 15 GiB snapshots needs
memory for two tensors, not two models.
"""
from __future__ import annotations

import dataclasses
import os
import re
import stat
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from .core.errors import BadValueError, MissingFileError
from .core.manifest import (MANIFEST_FILE, ManifestError, NotRegularFileError, file_kind, manifest_problems,
                            read_json_file)
from .core.vocab import SHORT_DTYPE_NAMES


def _regular(path: Path) -> Path:
    """``path`` when it is a regular file, or a symlink to one (an HF cache directory is all symlinks
    into its blobs), checked right before safetensors opens it; anything else (a FIFO named
    ``*.safetensors`` would block the reader forever, a directory, a device) is refused, never opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise OSError(e.errno, f"cannot read {path}: {e.strerror}", str(path)) from None
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(path, file_kind(mode), "; only regular safetensors files are read. Remove it, or "
                                                         "compare a directory that holds the real files")
    return path


def _safetensors_error(path: Path, e: Exception) -> BadValueError:
    return BadValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is damaged or not "
                      "a safetensors file. Re-export it, or remove it from the directory.")


class TensorDir:
    """Name -> file for every tensor in the safetensors files of a directory. Every file is checked to
    be a regular file (or a symlink to one) before it is opened, and a damaged one is named."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingFileError(f"{self.path} is not a directory; diff compares export or HF model directories")
        self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise MissingFileError(f"{self.path} has no *.safetensors files; convert .bin checkpoints first or pass "
                                    "an export directory")
        self.where: dict[str, Path] = {}
        for f in self.files:
            try:
                with safe_open(str(_regular(f)), framework="pt") as h:
                    for k in h.keys():
                        self.where[k] = f
            except SafetensorError as e:
                raise _safetensors_error(f, e) from None
        manifest = self.path / MANIFEST_FILE
        self.manifest = read_json_file(manifest, follow_symlinks=True) if os.path.lexists(manifest) else None
        problems = manifest_problems(self.manifest) if self.manifest is not None else []
        if problems:
            raise ManifestError(f"{manifest} is not a valid sa2va_hooks manifest: {'; '.join(problems[:3])}. It is "
                                "damaged: re-export the snapshot, or remove the file to compare the directory as a "
                                "plain HF directory.")

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        path = self.where[name]
        try:
            with safe_open(str(_regular(path)), framework="pt") as h:
                return h.get_tensor(name)
        except SafetensorError as e:
            raise _safetensors_error(path, e) from None

    def role(self, name: str) -> str | None:
        entry = self.manifest["tensors"].get(name) if self.manifest else None
        return entry.get("role") if isinstance(entry, dict) else None


def dtype_name(dtype: torch.dtype) -> str:
    """bf16, fp16, fp32, fp64; other dtypes as torch names them (int64, float8_e4m3fn, ...)."""
    name = str(dtype).removeprefix("torch.")
    return SHORT_DTYPE_NAMES.get(name, name)


@dataclasses.dataclass
class TensorDiff:
    name: str
    status: str  # identical | differs | dtype | shape | only_a | only_b
    max_abs: float | None = None
    rel_norm: float | None = None  # ||a - b|| / ||b||
    dtypes: tuple[str, str] | None = None  # (A's, B's) when they differ and the dtype counts

    def _dtype(self) -> str:
        return f"dtype: A {self.dtypes[0]}, B {self.dtypes[1]}" if self.dtypes else ""

    def line(self) -> str:
        if self.status == "differs":
            dt = f"{self._dtype()}; " if self.dtypes else ""
            return f"differs   {self.name}: {dt}max |a-b| {self.max_abs:.3e}, ||a-b||/||b|| {self.rel_norm:.3e}"
        if self.status == "dtype":
            return f"dtype     {self.name}: {self._dtype()} (values equal after the cast to the narrower dtype)"
        if self.status == "shape":
            return f"shape     {self.name}: {self.max_abs}" + (f"; {self._dtype()}" if self.dtypes else "")
        return {"identical": f"identical {self.name}", "only_a": f"only in A {self.name}",
                "only_b": f"only in B {self.name}"}[self.status]


def compare_tensors(name: str, a: torch.Tensor, b: torch.Tensor, *, dtype_counts: bool = True) -> TensorDiff:
    """A against B. A dtype difference is a difference (status "dtype" when the values are equal
    after the cast to the narrower dtype, else "differs" naming both dtypes), unless
    ``dtype_counts=False``: against a base, an fp32 base and a bf16 export equal after the cast
    are identical (the export holds the base unchanged; decision 17)."""
    dtypes = (dtype_name(a.dtype), dtype_name(b.dtype)) if a.dtype != b.dtype and dtype_counts else None
    if a.shape != b.shape:
        shapes = f"A {list(a.shape)} vs B {list(b.shape)}"
        return TensorDiff(name, "shape", shapes, dtypes=dtypes)  # type: ignore[arg-type]
    if a.dtype == b.dtype and torch.equal(a, b):
        return TensorDiff(name, "identical")
    equal = TensorDiff(name, "dtype", 0.0, 0.0, dtypes) if dtypes else TensorDiff(name, "identical")
    if a.dtype != b.dtype and a.is_floating_point() and b.is_floating_point():
        # An fp32 base against a bf16 export: equal after casting to the narrower dtype means the
        # export holds the base unchanged (training did not touch it), not a difference in value.
        narrow = a.dtype if a.element_size() <= b.element_size() else b.dtype
        if torch.equal(a.to(narrow), b.to(narrow)):
            return equal
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    d = a64 - b64
    max_abs = float(d.abs().max()) if d.numel() else 0.0
    if max_abs == 0.0:
        return equal
    bn = float(torch.linalg.vector_norm(b64))
    return TensorDiff(name, "differs", max_abs, float(torch.linalg.vector_norm(d)) / bn if bn else float("inf"),
                      dtypes)


def diff_dirs(a: TensorDir, b: TensorDir) -> Iterator[TensorDiff]:
    for name in sorted(a.names() | b.names()):
        if name not in b.where:
            yield TensorDiff(name, "only_a")
        elif name not in a.where:
            yield TensorDiff(name, "only_b")
        else:
            yield compare_tensors(name, a.get(name), b.get(name))


_LAYER = re.compile(r"^(?P<prefix>.*?)\.layers\.(?P<layer>\d+)\.(?P<module>.+?)(?:\.weight|\.bias)?$")


def plot_rel_delta(rel: dict[str, float], path: str | Path, title: str) -> bool:
    """Heat map of relative ||dW|| by layer (columns) and module (rows). Returns False when no
    tensor name has a layer index."""
    cells: dict[tuple[str, int], float] = {}
    for name, value in rel.items():
        m = _LAYER.match(name)
        if m and value is not None:
            cells[(f"{m['prefix'].split('.')[-2] if '.' in m['prefix'] else m['prefix']}:{m['module']}",
                   int(m["layer"]))] = value
    if not cells:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted({r for r, _ in cells})
    cols = sorted({c for _, c in cells})
    grid = torch.full((len(rows), len(cols)), float("nan"))
    for (r, c), v in cells.items():
        grid[rows.index(r), cols.index(c)] = v
    fig, ax = plt.subplots(figsize=(max(6, len(cols) * 0.4 + 4), max(3, len(rows) * 0.35 + 1.5)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="relative ||dW||")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
    return True
