"""Behaviour pinned before the refactor of the export path (issue 17): a few tiny models are
exported and every file's bytes (as sha256) and the root digest are compared with what the code
wrote before the refactor, kept in ``tests/golden/<stack>.json``.

Cases: a causal LM with LoRA and a tied head; the tiny Sa2VA; a 2-rank DeepSpeed ZeRO-3 export on
the CPU (2 gloo processes). Every weight comes from a fixed seed, so the bytes are a function of
the code alone. The manifest is compared without the fields that record versions or times
(``provenance.versions``, ``provenance.created``, ``provenance.training_paused_s``), and the golden
files are per stack because ``config.json`` records the transformers version.

Digest v2 (decision 59) changed the digests the manifest holds, not the data: the pins stay the v1
ones, and each fresh export is checked in two steps, with digests written here with xxhash directly
(not sa2va_hooks' functions): every v2 digest in the manifest (tensors from the files, trained
tensors from the model) and both roots equal the independent v2 recomputation; then the manifest's
"v1 view" (those digests replaced by independently recomputed v1 ones, format v1) must be byte for
byte the pinned v1 manifest, and the v1 root over the files the pinned root digest.

To re-pin after an intended change of the written bytes (say why in the commit):
``SA2VA_GOLDEN_WRITE=1 SA2VA_STACK=<stack> python -m pytest tests/scenarios/test_golden.py`` on each stack.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open

from conftest import tiny_qwen2, train_like
from sa2va_hooks import export_hf

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = ROOT / "tests" / "golden"
STACK = os.environ.get("SA2VA_STACK", "latest")
VOLATILE = ("versions", "created", "training_paused_s")

ZERO3 = r'''
import os, sys
sys.path.insert(0, os.environ["SA2VA_TESTS"])
from dist_launch import _cpu_workarounds
_cpu_workarounds()
import deepspeed, torch
from conftest import tiny_qwen2, train_like
from peft import LoraConfig, get_peft_model
from sa2va_hooks import export_hf

model = get_peft_model(tiny_qwen2(seed=11, tie=True),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
train_like(model, seed=12)
params = [p for p in model.parameters() if p.requires_grad]
cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
       "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=torch.optim.SGD(params, lr=0.1),
                                  config=cfg)
export_hf(engine.module, sys.argv[1], dtype="bf16", max_shard_size=30000)
'''


V1 = "xxh3_128(name,dtype,shape,bytes);v1"
V1_FORMAT = "sa2va_hooks.export_manifest/v1"
V2_CHUNK = 16 << 20


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _head(name: str, t: torch.Tensor) -> bytes:
    return json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()


def _v1(name: str, t: torch.Tensor) -> str:
    return xxhash.xxh3_128(_head(name, t) + _raw(t)).hexdigest()


def _v2(name: str, t: torch.Tensor) -> str:
    raw, h = _raw(t), xxhash.xxh3_128(_head(name, t))
    for i in range(0, len(raw), V2_CHUNK):
        h.update(xxhash.xxh3_128_digest(raw[i:i + V2_CHUNK]))
    return h.hexdigest()


def _root(digests: dict[str, str]) -> str:
    return xxhash.xxh3_128("\n".join(sorted(f"{n}={d}" for n, d in digests.items())).encode()).hexdigest()


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _causal_lm_model():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_qwen2(seed=7, tie=True), LoraConfig(r=4, lora_alpha=8,
                                                                    target_modules=["q_proj", "v_proj", "up_proj"]))
    train_like(model, seed=8)
    return model


def _causal_lm_tied(out: Path) -> tuple[Path, dict]:
    model = _causal_lm_model()
    export_hf(model, out, dtype="bf16", max_shard_size=20000)
    return out, _trained(model)


def _tiny_sa2va(out: Path, base: Path) -> tuple[Path, dict]:
    from sa2va_demo.tiny_sa2va import TinySa2VA
    torch.manual_seed(0)
    model = TinySa2VA(base_dir=str(base))
    train_like(model, seed=9)
    export_hf(model, out, converter="tiny_sa2va", dtype="fp32")
    return out, _trained(model)


def _zero3_trained() -> dict[str, torch.Tensor]:
    """The ZeRO-3 script's trainable tensors, rebuilt here from the same seeds (no step is taken there)."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_qwen2(seed=11, tie=True),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    train_like(model, seed=12)
    return _trained(model)


def _zero3(out: Path, work: Path) -> tuple[Path, dict]:
    pytest.importorskip("deepspeed", reason="the ZeRO-3 case needs DeepSpeed")
    script = work / "zero3.py"
    script.write_text(ZERO3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SA2VA_TESTS": str(ROOT / "tests"), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    port = 29000 + os.getpid() % 900
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script), str(out)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, _zero3_trained()


def _v1_view(snapshot: Path, manifest: dict, trained: dict[str, torch.Tensor], problems: list[str]) -> dict:
    """The manifest as the v1 code wrote it, its v2 digests checked on the way (``problems``)."""
    v1, v2 = {}, {}
    for name, entry in manifest["tensors"].items():
        with safe_open(str(snapshot / entry["file"]), framework="pt") as f:
            t = f.get_tensor(name)
        v1[name], v2[name] = _v1(name, t), _v2(name, t)
        if (entry["digest"], entry["algorithm"]) != (v2[name], manifest["digest_algorithm"]):
            problems.append(f"tensor {name}: manifest digest {entry['digest']} != independent v2 {v2[name]}")
        entry.update(digest=v1[name], algorithm=V1)
    if manifest["root_digest"] != _root(v2):
        problems.append(f"root digest {manifest['root_digest']} != independent v2 root {_root(v2)}")
    manifest["root_digest"] = _root(v1)
    section, t1, t2 = manifest["trained"], {}, {}
    for name, fp in section["tensors"].items():
        t1[name], t2[name] = _v1(name, trained[name]), _v2(name, trained[name])
        if fp["digest"] != t2[name]:
            problems.append(f"trained {name}: manifest digest {fp['digest']} != independent v2 {t2[name]}")
        fp.update(digest=t1[name], algorithm=V1)
    if section["root"] != _root(t2):
        problems.append(f"trained root {section['root']} != independent v2 root {_root(t2)}")
    section["root"] = _root(t1)
    if manifest.pop("digest_algorithm") != "xxh3_128(name,dtype,shape,xxh3_128 per 16MiB chunk);v2":
        problems.append("the manifest's digest_algorithm is not v2 with 16 MiB chunks")
    manifest["format"] = V1_FORMAT
    return manifest


def _pinned(made: tuple[Path, dict]) -> dict:
    """What is pinned of a snapshot: sha256 of every file's bytes, the manifest's (its v1 view) without
    its volatile fields, and the v1 root digest; ``v2_problems``: its v2 digests that are wrong."""
    snapshot, trained = made
    files, problems = {}, []
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        rel = path.relative_to(snapshot).as_posix()
        data = path.read_bytes()
        if rel == "export_manifest.json":
            manifest = _v1_view(snapshot, json.loads(data), trained, problems)
            for key in VOLATILE:
                manifest.get("provenance", {}).pop(key, None)
            data = json.dumps(manifest, sort_keys=True).encode()
            root = manifest["root_digest"]
        files[rel] = hashlib.sha256(data).hexdigest()
    return {"root_digest": root, "files": files, "v2_problems": problems}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_base) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("golden")
    return {"causal_lm_lora_tied": _pinned(_causal_lm_tied(work / "causal_lm")),
            "tiny_sa2va": _pinned(_tiny_sa2va(work / "tiny_sa2va", tiny_base)),
            "zero3_two_ranks": _pinned(_zero3(work / "zero3", work))}


def test_the_manifests_v2_digests_equal_an_independent_recomputation(exported):
    problems = [f"{case}: {p}" for case, got in sorted(exported.items()) for p in got["v2_problems"]]
    assert problems == [], "\n".join(problems)


def test_every_file_and_root_digest_equal_the_pinned_ones(exported):
    golden = GOLDEN_DIR / f"{STACK}.json"
    if os.environ.get("SA2VA_GOLDEN_WRITE") == "1":
        GOLDEN_DIR.mkdir(exist_ok=True)
        pins = {case: {k: v for k, v in got.items() if k != "v2_problems"} for case, got in exported.items()}
        golden.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {golden}: this run pinned, it compared nothing")
    assert golden.is_file(), f"no pinned files for the stack {STACK!r} ({golden}); see this module's docstring"
    want = json.loads(golden.read_text())
    problems = []
    for case in sorted(set(want) | set(exported)):
        a, b = want.get(case), exported.get(case)
        if a is None or b is None:
            problems.append(f"{case}: {'not pinned' if a is None else 'not exported'}")
            continue
        if a["root_digest"] != b["root_digest"]:
            problems.append(f"{case}: root digest {b['root_digest']} != pinned {a['root_digest']}")
        for name in sorted(set(a["files"]) | set(b["files"])):
            if a["files"].get(name) != b["files"].get(name):
                what = ("missing" if name not in b["files"] else "extra" if name not in a["files"]
                        else "bytes differ")
                problems.append(f"{case}/{name}: {what}")
    assert problems == [], "\n".join(problems)
