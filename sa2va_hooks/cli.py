"""Command line: ``python -m sa2va_hooks {verify,diff,fingerprint,doctor}`` and ``--version``.

Exit codes: 0 all well (verified / identical / consistent), 1 a mismatch or difference was
found, 2 the command could not run (bad input, unreadable file).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
import sys
import traceback
from pathlib import Path
from typing import Sequence

from . import __version__
from .core.fingerprint import (DIGEST_ALGORITHM, FingerprintSet, compare_fingerprints, digest_tensor_as,
                               fingerprint_state, root_digest)
from .core.vocab import DIGEST_V1
from .core.errors import exit_code
from .core.manifest import ExportManifest
from .core.verify import verify_snapshot
from .diff import TensorDir, compare_tensors, diff_dirs, plot_rel_delta
from .environment import doctor


def cmd_verify(args: argparse.Namespace) -> int:
    problems = verify_snapshot(args.dir)
    if args.checkpoint:
        from .offline.checkpoint_io import load_checkpoint, recorded_fingerprints
        rec = recorded_fingerprints(load_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle), args.checkpoint)
        if rec.trained is None:
            problems.append(f"checkpoint {args.checkpoint} has no recorded fingerprints (no meta, no sidecar)")
        else:
            exported = FingerprintSet.from_json(ExportManifest.load(args.dir).trained).tensors
            problems += [f"{p} (checkpoint {rec.source} vs export)"
                         for p in compare_fingerprints(rec.trained.tensors, exported)]
    loaded = ""
    if args.load and not problems:
        problems, loaded = _load_check(args.dir)
    for p in problems:
        print(p)
    if problems:
        print(f"FAILED: {args.dir}: {len(problems)} problem(s)")
        return 1
    extra = f", and its trained tensors match {args.checkpoint}" if args.checkpoint else ""
    print(f"OK: {args.dir}: every tensor, file and the root digest match the manifest{extra}{loaded}")
    return 0


def _load_check(snapshot: str) -> tuple[list[str], str]:
    """The export's load check again, here and with this transformers (it runs the snapshot's
    remote code, hence opt-in), with the template table and tokens the converter named at export."""
    from .core.loadcheck import SnapshotLoadError, check_snapshot_loads
    manifest = ExportManifest.load(snapshot)
    recorded = manifest.provenance.get("load_check") or {}
    try:
        got = check_snapshot_loads(snapshot, manifest.tensors, template_table=recorded.get("template_table"),
                                   required_tokens=recorded.get("required_tokens") or ())
    except SnapshotLoadError as e:
        return str(e).splitlines(), ""
    return [], f"; it loads as {got['class']} (built on the meta device from its config.json)"


def _carries_training(d: TensorDir, base: TensorDir) -> tuple[set[str], set[str], dict[str, float]]:
    """Names that differ from BASE, names BASE lacks, and relative ||dW|| vs BASE."""
    trained, no_base, rel = set(), set(), {}
    for name in sorted(d.names()):
        if name not in base.where:
            no_base.add(name)
            continue
        r = compare_tensors(name, d.get(name), base.get(name), dtype_counts=False)  # decision 17
        if r.status != "identical":
            trained.add(name)
        rel[name] = r.rel_norm if r.status == "differs" else (0.0 if r.status == "identical" else None)
    return trained, no_base, rel


def cmd_diff(args: argparse.Namespace) -> int:
    a, b = TensorDir(args.a), TensorDir(args.b)
    diffs = list(diff_dirs(a, b))
    for d in diffs:
        if args.all or d.status != "identical":
            print(d.line())
    differ = {d.name for d in diffs if d.status != "identical"}
    common = a.names() & b.names()
    if args.base:
        base = TensorDir(args.base)
        ta, na, rel_a = _carries_training(a, base)
        tb, nb, rel_b = _carries_training(b, base)
        # a tensor BASE lacks carries training unless a manifest says it is frozen
        unknown = {n for n in (na | nb) if (a.role(n) or b.role(n)) != "frozen"}
        trained = (ta | tb | unknown) & common
        frozen = common - trained
        print(f"A carries training in {len(ta)} tensors vs BASE ({len(na)} not in BASE); "
              f"B in {len(tb)} ({len(nb)} not in BASE)")
        plot = {f"A:{k}": v for k, v in rel_a.items()} | {f"B:{k}": v for k, v in rel_b.items()}
        title = f"relative ||W - W_base|| ({Path(args.a).name}, {Path(args.b).name} vs {Path(args.base).name})"
    else:
        roles = {n: a.role(n) or b.role(n) for n in common}
        trained = {n for n, r in roles.items() if r not in (None, "frozen")}
        frozen = {n for n, r in roles.items() if r == "frozen"}
        plot = {n: d.rel_norm for d in diffs if (n := d.name) in common and d.rel_norm is not None}
        title = f"relative ||A - B|| ({Path(args.a).name} vs {Path(args.b).name})"
    if trained or frozen:
        frozen_differ = frozen & differ
        print(f"A and B differ in {len(trained & differ)} of {len(trained)} trained tensors; "
              f"{len(frozen - differ)} frozen tensors identical"
              + (f"; {len(frozen_differ)} FROZEN tensors differ: {sorted(frozen_differ)[:10]}"
                 if frozen_differ else ""))
    print(f"A and B differ in {len(differ & common)} of {len(common)} common tensors; "
          f"{len(a.names() - b.names())} only in A, {len(b.names() - a.names())} only in B")
    pairs = Counter(d.dtypes for d in diffs if d.dtypes)
    if pairs:
        only = sum(1 for d in diffs if d.status == "dtype")
        print(f"A and B differ in dtype in {sum(pairs.values())} tensors ("
              + "; ".join(f"A {x}, B {y}: {n}" for (x, y), n in pairs.most_common())
              + f"), {only} of them only in dtype (values equal after the cast to the narrower dtype)")
    if args.png and plot_rel_delta(plot, args.png, title):
        print(f"wrote {args.png}")
    if not differ:
        print("RESULT: identical")
        return 0
    print("RESULT: different")
    return 1


def _fingerprint_dir(path: Path) -> dict:
    """Digests of a directory's tensors: made as its manifest's entries were (v1 or v2), so the root
    compares with the recorded one; the current algorithm for a tensor no manifest names."""
    d = TensorDir(path)
    entries = d.manifest["tensors"] if d.manifest else {}
    algorithms = {n: entries[n].get("algorithm", DIGEST_V1) if n in entries else DIGEST_ALGORITHM for n in d.names()}
    digests = {n: digest_tensor_as(algorithms[n], n, d.get(n)) for n in sorted(d.names())}
    out = {"kind": "snapshot", "path": str(path), "tensors": len(digests), "root": root_digest(digests)}
    if d.manifest:
        out["manifest_root"] = d.manifest["root_digest"]
        out["consistent"] = out["manifest_root"] == out["root"]
        out["trained_root"] = d.manifest["trained"]["root"]
        out["trained_tensors"] = d.manifest["trained"]["count"]
    return out


def _fingerprint_checkpoint(path: Path, allow_pickle: bool) -> dict:
    from .offline.checkpoint_io import extract_state_dict, load_checkpoint, recorded_fingerprints
    ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    rec = recorded_fingerprints(ckpt, path)
    state = extract_state_dict(ckpt, path)
    saved = FingerprintSet.of(fingerprint_state(state.items()))
    out = {"kind": "checkpoint", "path": str(path), "tensors": len(saved.tensors), "bytes": saved.nbytes,
           "root": saved.root}
    if rec.trained is not None:
        out.update(recorded_root=rec.trained.root, recorded_source=rec.source, frozen_root=rec.frozen_root)
        if set(rec.trained.tensors) <= set(saved.tensors):  # a full state dict (FSDP 'full') holds frozen ones too
            # a record of another digest version (v1: written before digest v2) is recomputed in its version
            older = {k: fp.algorithm for k, fp in rec.trained.tensors.items() if fp.algorithm != DIGEST_ALGORITHM}
            again = {k: saved.tensors[k] for k in rec.trained.tensors} | fingerprint_state(
                ((k, state[k]) for k in older), algorithms=older)
            out["consistent"] = not compare_fingerprints(rec.trained.tensors, again)
        else:
            out["note"] = ("the checkpoint saves tensors under other names than training used (e.g. PEFT-style "
                           "without the adapter name); use tools/export.py or verify --checkpoint to check them")
    return out


def _fingerprint_sidecar(path: Path) -> dict:
    from .offline.checkpoint_io import read_sidecar
    rec = read_sidecar(path)  # a clear error (exit 2) for a FIFO, invalid JSON or another JSON file
    fps = FingerprintSet.from_json(rec["trained"])
    return {"kind": "sidecar", "path": str(path), "tensors": len(fps.tensors), "bytes": fps.nbytes,
            "root": fps.root, "consistent": root_digest(fps.tensors) == fps.root,
            "frozen_root": rec.get("frozen_root"), "iter": rec.get("iter")}


def _is_deepspeed_dir(path: Path) -> bool:
    """mmengine + DeepSpeed's iter_N.pth/ (model-states files inside) or DeepSpeed's own layout (a
    'latest' file naming the tag directory; any 'latest', even a symlink, so that the loader's checks refuse it)."""
    return os.path.lexists(path / "latest") or any(path.glob("*model_states.pt"))


def cmd_fingerprint(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir() and not _is_deepspeed_dir(path):
        out = _fingerprint_dir(path)
    elif path.suffix == ".json":
        out = _fingerprint_sidecar(path)
    else:
        out = _fingerprint_checkpoint(path, args.allow_pickle)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 1 if out.get("consistent") is False else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sa2va_hooks", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"sa2va_hooks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="the versions this environment has, and a tiny real check of each feature")
    doc.set_defaults(func=lambda args: doctor())
    v = sub.add_parser("verify", help="check a snapshot against its export_manifest.json (and a checkpoint)")
    v.add_argument("dir")
    v.add_argument("--checkpoint", help="also check the export's trained tensors against this checkpoint's record")
    v.add_argument("--allow-pickle", action="store_true", help="load a legacy checkpoint with full pickle")
    v.add_argument("--load", action="store_true",
                   help="also build the model class from config.json on the meta device "
                        "and check it takes every tensor (runs the snapshot's remote code)")
    v.set_defaults(func=cmd_verify)
    d = sub.add_parser("diff", help="compare two snapshots (or HF model directories), optionally against a base")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--base", help="the base model directory: says which tensors carry training")
    d.add_argument("--png", default="diff_rel_delta.png", help="heat map of relative ||dW|| by layer and module "
                                                               "('' to skip)")
    d.add_argument("--all", action="store_true", help="also list identical tensors")
    d.set_defaults(func=cmd_diff)
    f = sub.add_parser("fingerprint", help="summary and root digest of a checkpoint, a sidecar or a snapshot")
    f.add_argument("path")
    f.add_argument("--json", action="store_true")
    f.add_argument("--allow-pickle", action="store_true", help="load a legacy checkpoint with full pickle")
    f.set_defaults(func=cmd_fingerprint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - top of the CLI: report, don't dump a traceback
        if args.debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return exit_code(e)
