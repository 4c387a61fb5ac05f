"""The demo: train a tiny Sa2VA-shaped model for a few iterations on the CPU with the hooks on,
export in the loop at each checkpoint, verify every export, reload it with from_pretrained and
compare its logits with the model in memory.

    python tools/demo.py [--work-dir work_dirs/demo]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=str(ROOT / "work_dirs" / "demo"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModel

    from sa2va_hooks.cli import main as cli
    from sa2va_hooks.core.manifest import ExportManifest
    from sa2va_demo.runs import train_tiny

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    base = work / "base"
    t0 = time.perf_counter()
    runner = train_tiny(work / "train", base, max_iters=6, save_interval=3)
    train_s = time.perf_counter() - t0
    print("\n=== sa2va_hooks demo summary ===")
    print(f"trained 6 iterations in {train_s:.1f}s; checkpoints and in-loop exports:")
    ok = True
    for it in (3, 6):
        snap = work / "train" / "hf" / f"iter_{it}"
        m = ExportManifest.load(snap)
        eff = m.training_effect
        size = sum(f["size"] for f in m.files.values())
        print(f"- {snap.relative_to(work)}: {len(m.tensors)} tensors, {size} bytes, root {m.root_digest}; "
              f"{eff['trained_differ_from_base']}/{eff['trained_tensors']} trained tensors differ from the base, "
              f"{eff['frozen_tensors']} frozen")
        print(f"  $ python -m sa2va_hooks verify {snap.relative_to(work)}")
        ok &= cli(["verify", str(snap)]) == 0

    snap = work / "train" / "hf" / "iter_6"
    hf = AutoModel.from_pretrained(str(snap), trust_remote_code=True, torch_dtype=torch.float32).eval()
    live = runner.model.eval()
    g = torch.Generator().manual_seed(0)
    pix, ids = torch.randn(2, 3, 16, 16, generator=g), torch.randint(4, 60, (2, 8), generator=g)
    with torch.no_grad():
        diff = (hf(pix, ids).logits - live(pix, ids, mode="tensor")).abs().max().item()
    print(f"from_pretrained({snap.relative_to(work)}) vs the model in memory: max |logit diff| {diff:.4f} "
          "(bf16 export)")
    ok &= diff < 0.1

    print("\n--- offline re-export of the last checkpoint, then verify and diff against the in-loop export ---")
    ok &= _offline_roundtrip(work, base)
    print("RESULT:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def _run(cmd: list[str], work: Path, env: dict) -> int:
    import subprocess
    shown = [str(Path(c).relative_to(work)) if c.startswith(str(work)) else
             str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd]
    print("$", " ".join(["python", *shown[1:]]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    print("\n".join("  " + ln for ln in lines[-8:]))
    if proc.returncode != 0:
        print("  " + "\n  ".join(proc.stderr.strip().splitlines()[-5:]))
    return proc.returncode


def _offline_roundtrip(work: Path, base: Path) -> bool:
    import os
    env = {**os.environ, "SA2VA_TINY_BASE": str(base), "PYTHONPATH": str(ROOT)}
    py = sys.executable
    offline, inloop = work / "offline" / "iter_6", work / "train" / "hf" / "iter_6"
    rc = _run([py, str(ROOT / "tools" / "export.py"), str(ROOT / "configs" / "tiny_sa2va_demo.py"),
               str(work / "train" / "iter_6.pth"), "--out", str(offline), "--dtype", "bf16"], work, env)
    rc |= _run([py, "-m", "sa2va_hooks", "verify", str(offline), "--checkpoint", str(work / "train" / "iter_6.pth")],
               work, env)
    diff_rc = _run([py, "-m", "sa2va_hooks", "diff", str(offline), str(inloop), "--png", ""], work, env)
    print("offline export vs in-loop export:", "identical" if diff_rc == 0 else "DIFFERENT")
    return rc == 0 and diff_rc == 0


if __name__ == "__main__":
    sys.exit(main())
