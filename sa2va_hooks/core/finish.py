"""Steps 3 to 5 of an export, on the staged snapshot: read back, describe, verify.

    read back   each rank, its own shards, with verify's code, against the digests it computed
                in memory (:func:`read_back`)
    describe    rank 0: the index, the converter's config and extras, the load check, the
                manifest (every rank's records, merged)
    verify      rank 0: the staged snapshot, manifest included, through verify, before publishing

Why verify what was just written: a full disk, a bad filesystem or a converter bug must fail the
export, not surface at the first ``from_pretrained`` weeks later; publishing
(:mod:`.publish`) happens only after all three passed.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .errors import MismatchError
from .fingerprint import DIGEST_ALGORITHM, FingerprintSet, root_digest
from .loadcheck import check_snapshot_loads
from .manifest import MANIFEST_FILE, ExportManifest, TrainingEffect, package_versions, sha256_file
from .plan import ConverterProtocol, ExportPlan, SnapshotContext
from .verify import check_shard_data, header_sha256, verify_snapshot
from .writer import file_entries, with_path, write_index, write_json


class ExportVerificationError(MismatchError, RuntimeError):
    """What was read back from disk is not what was computed in memory."""


def read_back(staging: Path, files: list[str], expected: Mapping[str, dict]) -> None:
    """A rank's own shards, read back with verify's code, against what it computed in memory."""
    problems, _ = check_shard_data(staging, expected, files)
    if problems:
        lines = "\n".join(problems[:20])
        raise ExportVerificationError(f"read-back of {staging} does not match the tensors computed in memory "
                                      f"({len(problems)} problem(s)); the disk or filesystem corrupted the write:\n"
                                      f"{lines}")


def _verify_staged(staging: Path, out_dir: Path, host: Any = None) -> None:
    """The staged snapshot, manifest included, through verify (files, index, config sizes, every
    shard header); the tensor data was read back by each rank already. In the host process when
    there is one (see :func:`_load_check`)."""
    if host is None:
        problems = verify_snapshot(staging, data=False)
    else:
        with host.lock:
            problems = host.call("verify_staged", str(staging))
    if problems:
        raise ExportVerificationError(f"the snapshot for {out_dir} fails verify before publishing "
                                      f"({len(problems)} problem(s)):\n" + "\n".join(problems[:20]))


def describe_snapshot(staging: Path, parts: list, ep: ExportPlan, *, model: nn.Module, conv: ConverterProtocol,
                      dt: Any, trained: FingerprintSet, provenance: Mapping, readback: bool,
                      out_dir: Path, host: Any = None) -> ExportManifest:
    """Rank 0, after every rank wrote and read back its shards: index, config and extras, load
    check, manifest, verify of the staged snapshot. Returns the manifest it wrote. ``host``: the
    export's host process (:class:`~.host_process.HostProcess`), which then runs the load check and
    the verify."""
    tensors, effect, storage = _merge_rank_parts(parts, ep)
    write_index(staging, ep.shards)
    notes = _write_config_and_extras(staging, model, conv, dt, ep)
    files = _file_records(staging)
    storage["bytes_written"] += sum(v["size"] for k, v in files.items() if not k.endswith(".safetensors"))
    load_check = _load_check(host, staging, tensors, conv, out_dir)
    manifest = ExportManifest(
        converter=conv.name, dtype=str(dt).removeprefix("torch.") if dt else "as_in_memory",
        tensors=dict(sorted(tensors.items())),
        root_digest=root_digest({n: t["digest"] for n, t in tensors.items()}),
        files=files, trained=trained.to_json(), training_effect=effect.to_json(),
        provenance={**provenance, "versions": package_versions(), "load_check": load_check,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        tied=ep.tied, dropped=ep.dropped, renamed=ep.renamed, notes=notes, readback_verified=readback,
        storage=storage, digest_algorithm=DIGEST_ALGORITHM)
    write_json(staging / MANIFEST_FILE, manifest.to_json())
    _verify_staged(staging, out_dir, host)
    return manifest


def _load_check(host: Any, staging: Path, tensors: dict, conv: ConverterProtocol, out_dir: Path) -> dict:
    """:func:`.loadcheck.check_snapshot_loads`, in the export's host process when there is one.
    Why: it builds the model class on the meta device, pure Python that holds the GIL for 67 ms
    per export at 7.6B on a 2-core CPU (11 ms for a 4-layer model), and a launch-bound training
    thread waits for every hand-over of the GIL (issue 18, item 3). It reads only the staged files,
    so the process checks the same thing; its errors (a :class:`~.loadcheck.SnapshotLoadError`
    listing the problems) come back as themselves."""
    table, tokens = conv.template_table, list(conv.required_tokens)
    if host is None:
        return check_snapshot_loads(staging, tensors, template_table=table, required_tokens=tokens, label=out_dir)
    with host.lock:
        return host.call("load_check", str(staging), tensors, table, tokens, out_dir)


def _write_config_and_extras(staging: Path, model: nn.Module, conv: ConverterProtocol, dt: Any,
                             ep: ExportPlan) -> list[str]:
    """The converter's config.json and extras (tokenizer, processor, remote code); returns the notes."""
    ctx = SnapshotContext(model=model, dtype=dt, names=set(ep.entries), notes=list(ep.notes),
                          file_dtypes={n: e.dtype for n, e in ep.entries.items()})
    cfg = conv.hf_config(model, ctx)
    try:
        if isinstance(cfg, dict):
            write_json(staging / "config.json", cfg)
        else:
            cfg.save_pretrained(str(staging))
        conv.save_extras(model, staging, ctx)
    except OSError as e:  # transformers' writers name no file on ENOSPC: at least the directory
        raise with_path(e, staging) from None
    return ctx.notes


def _merge_rank_parts(parts, ep: ExportPlan) -> tuple[dict[str, dict], TrainingEffect, dict]:
    """Every rank's tensor records, training effect and storage counts, as one; every planned
    tensor must have been written by some rank."""
    tensors: dict[str, dict] = {}
    effect = TrainingEffect()
    storage = {"bytes_written": 0, "bytes_linked": 0, "linked_from": {}}
    for rank_tensors, rank_effect, rank_storage in parts:
        tensors.update({n: r.to_json() for n, r in rank_tensors.items()})
        effect.absorb(rank_effect)
        storage["bytes_written"] += rank_storage["bytes_written"]
        storage["bytes_linked"] += rank_storage["bytes_linked"]
        storage["linked_from"].update(rank_storage["linked_from"])
    missing = sorted(set(ep.entries) - set(tensors))
    if missing:
        raise ExportVerificationError(f"{len(missing)} planned tensor(s) were written by no rank, e.g. {missing[:5]}")
    return tensors, effect, storage


def _file_records(staging: Path) -> dict[str, dict]:
    """Size of every file; for shards the sha256 of the header (the data is covered by the tensor
    digests), for the rest the sha256 of the whole file."""
    return {rel: {"size": size} | ({"header_sha256": header_sha256(staging / rel)} if rel.endswith(".safetensors")
                                   else {"sha256": sha256_file(staging / rel)})
            for rel, size in file_entries(staging, exclude=[MANIFEST_FILE]).items()}
