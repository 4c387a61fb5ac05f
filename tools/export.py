"""Strict offline re-export of a training checkpoint to a verified HF snapshot.

    python tools/export.py CONFIG CHECKPOINT --out DIR [--converter NAME] [--dtype bf16]
        [--max-shard-size 5GB] [--cfg-options k=v ...] [--json] [--overwrite]
        [--no-verify] [--allow-pickle] [--strict-pretrained]

Exit codes: 0 exported and verified; 1 the checkpoint or the rebuilt model does not match what
training recorded, or does not fit the config; 2 bad input or another error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="snapshot directory to create")
    p.add_argument("--converter", default="auto",
                   help="converter name (default: the config's HFExportHook setting, else detect by structure)")
    p.add_argument("--hf-code-dir", default=None,
                   help="the model's HF remote code (Sa2VA: <Sa2VA checkout>/projects/sa2va/hf/<family folder>); "
                        "default: the config's HFExportHook converter setting")
    p.add_argument("--dtype", default=None,
                   help="bf16, fp16, fp32 (default: the config's HFExportHook setting, else as in memory)")
    p.add_argument("--max-shard-size", default=None, help="default: the config's HFExportHook setting, else 5GB")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings, mmengine style")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing snapshot at --out")
    p.add_argument("--no-verify", action="store_true", help="skip the check against recorded fingerprints "
                                                             "(recorded in the manifest)")
    p.add_argument("--allow-pickle", action="store_true", help="load legacy checkpoints with full pickle "
                                                                "(runs code in the file; logged)")
    p.add_argument("--strict-pretrained", action="store_true",
                   help="fail when most of the config's pretrained_pth does not fit the model")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    say = (lambda m: print(m, file=sys.stderr)) if args.json else print
    # with --json, stdout carries the JSON alone: whatever the model code (or a logger created
    # while importing it) prints goes to stderr
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with quiet:
            from sa2va_hooks.core.errors import MismatchError, exit_code
            from sa2va_hooks.offline import export_checkpoint
    except ImportError as e:  # e.g. a bitsandbytes that PEFT cannot use: the message says why and what to do
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        with quiet:
            res = export_checkpoint(args.config, args.checkpoint, args.out, converter=args.converter, dtype=args.dtype,
                                    max_shard_size=args.max_shard_size, cfg_options=args.cfg_options,
                                    overwrite=args.overwrite, verify=not args.no_verify,
                                    allow_pickle=args.allow_pickle, strict_pretrained=args.strict_pretrained,
                                    progress=not args.json, hf_code_dir=args.hf_code_dir, log=say)
    except Exception as e:  # noqa: BLE001 - top of a CLI: say what happened, exit by the error's category
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}" if isinstance(e, MismatchError) else f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return exit_code(e)
    m = res.manifest
    if args.json:
        print(json.dumps({"out": str(res.out_dir), "root_digest": m.root_digest, "converter": m.converter,
                          "dtype": m.dtype, "tensors": len(m.tensors), "training_effect": m.training_effect,
                          "report": res.report, "notes": m.notes}, indent=1))
        return 0
    for line in res.lines:
        print(line)
    eff = m.training_effect
    print(f"exported {res.out_dir}: {len(m.tensors)} tensors, converter {m.converter}, dtype {m.dtype}, "
          f"root {m.root_digest}; {eff['trained_differ_from_base']}/{eff['trained_tensors']} trained tensors differ "
          f"from the base; read back and verified")
    for note in m.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
