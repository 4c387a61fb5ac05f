"""What this package needs from the environment it is installed into, checked early and loudly.

Two jobs:
- :func:`check_bitsandbytes` runs when ``sa2va_hooks`` is imported (``custom_imports``, a lazy
  config, ``tools/export.py``, the CLI). PEFT imports bitsandbytes whenever it is installed, and
  xtuner builds every model through ``get_peft_model``. A bitsandbytes that cannot be imported
  therefore breaks every training run deep inside PEFT, with a message that names neither
  bitsandbytes' version nor the fix. We say it once, at import, before any model is built.
- :func:`doctor` (``python -m sa2va_hooks doctor``) prints the versions it sees against the ranges
  this package declares, and runs a tiny real check of each feature.

No mmengine here: the check must run before anything heavy is imported.
"""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import importlib.util

from packaging.requirements import Requirement
from packaging.version import Version
from .core.errors import BadInputError, InternalError, MissingDependencyError
from .core.vocab import DEEPSPEED_REQUIREMENT

# bitsandbytes < 0.45.1 imports ``triton.ops`` as soon as triton is installed; triton 3.2
# (torch >= 2.6) removed that module. xtuner 0.2.0 pins bitsandbytes 0.45.0.
BNB_TRITON_OPS_FIXED = Version("0.45.1")


class IncompatibleDependencyError(BadInputError, ImportError):
    """An installed package that this package (or PEFT under it) cannot work with."""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def bitsandbytes_problem() -> str | None:
    """Why PEFT cannot use the installed bitsandbytes, or None when it can (or none is installed).

    Importing bitsandbytes costs seconds, so only a version known to break is imported to
    confirm: a version at or above the fix is taken as working."""
    installed = _version("bitsandbytes")
    if installed is None or importlib.util.find_spec("bitsandbytes") is None:
        return None
    if Version(installed) >= BNB_TRITON_OPS_FIXED:
        return None
    try:
        importlib.import_module("bitsandbytes")
    except Exception as e:  # noqa: BLE001 - any failure here is the failure PEFT would hit
        return _bnb_message(installed, e)
    return None


def _bnb_message(installed: str, error: Exception) -> str:
    torch_v, triton_v = _version("torch") or "?", _version("triton") or "none"
    return (f"bitsandbytes {installed} is installed but cannot be imported with torch {torch_v} "
            f"(triton {triton_v}): {type(error).__name__}: {error}. PEFT imports bitsandbytes whenever it is "
            f"installed, so get_peft_model (which xtuner calls to build every model) would fail inside it. "
            f"Cause: bitsandbytes < {BNB_TRITON_OPS_FIXED} imports triton.ops, which triton >= 3.2 removed "
            f"(xtuner 0.2.0 pins bitsandbytes==0.45.0). Fix: pip install 'bitsandbytes>={BNB_TRITON_OPS_FIXED}' "
            f"(pip will warn about xtuner's pin; that is expected), or pip uninstall bitsandbytes if you "
            f"do not train QLoRA.")


def check_bitsandbytes() -> None:
    """Raise :class:`IncompatibleDependencyError` with the whole story when PEFT cannot use the
    installed bitsandbytes."""
    problem = bitsandbytes_problem()
    if problem:
        raise IncompatibleDependencyError(problem)


# ---------------------------------------------------------------- doctor

CORE = ("torch", "transformers", "peft", "mmengine", "safetensors", "xxhash", "numpy")
OPTIONAL = ("xtuner", "deepspeed", "bitsandbytes", "accelerate")


def declared_ranges() -> dict[str, str]:
    """The version ranges this installed package declares (``install_requires``), by name."""
    try:
        reqs = metadata.requires("sa2va_hooks") or []
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return {}
    out = {}
    for line in reqs:
        r = Requirement(line)
        if r.marker is None:
            out[r.name.lower()] = str(r.specifier)
    return out


def version_rows() -> list[tuple[str, str, str, bool]]:
    """(name, installed version or 'missing', declared range, within range) per package."""
    ranges = declared_ranges()
    rows = []
    for name in CORE + OPTIONAL:
        got, spec = _version(name), ranges.get(name, "")
        ok = got is not None and (not spec or Version(got) in Requirement(f"{name}{spec}").specifier)
        rows.append((name, got or "missing", spec or ("optional" if name in OPTIONAL else ""),
                     ok or (got is None and name in OPTIONAL)))
    return rows


def feature_checks() -> list[tuple[str, bool, str]]:
    """(feature, works, how it was checked or why not), each by a real, tiny run or import."""
    checks = [("LoRA merge + export + verify + from_pretrained", _check_export),
              ("mmengine hooks register", _check_hooks), ("xtuner model classes import", _check_xtuner),
              ("DeepSpeed for ZeRO-2/3 imports under mmengine", _check_deepspeed),
              ("bitsandbytes for QLoRA bases imports", _check_bnb)]
    out = []
    for name, check in checks:
        try:
            out.append((name, True, check()))
        except Exception as e:  # noqa: BLE001 - doctor reports every failure and goes on
            out.append((name, False, f"{type(e).__name__}: {e}"))
    return out


def _check_export() -> str:
    """A fresh random tiny Qwen2 with LoRA on every linear layer: export it, verify it, reload it
    with from_pretrained and compare its logits with PEFT's own merge."""
    import copy
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from .core.verify import verify_snapshot
    from .export import export_hf
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    pm = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        want = copy.deepcopy(pm).merge_and_unload().eval()(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(pm, f"{tmp}/out")
        problems = verify_snapshot(f"{tmp}/out")
        if problems:
            raise InternalError(f"verify failed: {problems[:3]}")
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(f"{tmp}/out").eval()(input_ids=ids).logits
    diff = float((got - want).abs().max())
    if diff > 1e-5:
        raise InternalError(f"reloaded logits differ from PEFT's merge by {diff:.2e}")
    return f"tiny Qwen2 + LoRA exported, verified, reloaded; logits equal PEFT's merge (max diff {diff:.1e})"


def _check_hooks() -> str:
    from mmengine.registry import HOOKS

    from . import hooks  # noqa: F401 - registers them
    missing = [h for h in ("FingerprintHook", "HFExportHook") if HOOKS.get(h) is None]
    if missing:
        raise InternalError(f"not registered in mmengine's HOOKS: {missing}")
    return "FingerprintHook and HFExportHook registered in mmengine's HOOKS"


def _check_xtuner() -> str:
    if importlib.util.find_spec("xtuner") is None:
        raise MissingDependencyError("xtuner is not installed (optional: only for xtuner configs)")
    from xtuner.model import SupervisedFinetune  # noqa: F401
    return "xtuner.model.SupervisedFinetune imports"


def _check_deepspeed() -> str:
    got = _version("deepspeed")
    if got is None:
        raise MissingDependencyError(f"deepspeed is not installed (optional: pip install '{DEEPSPEED_REQUIREMENT}')")
    if Version(got) >= Version("0.19"):
        raise InternalError(f"deepspeed {got}: mmengine 0.10.x imports deepspeed.runtime.fp16.onebit, which 0.19 "
                           f"removed; pip install '{DEEPSPEED_REQUIREMENT}'")
    from mmengine._strategy import DeepSpeedStrategy  # noqa: F401
    return f"deepspeed {got} and mmengine's DeepSpeedStrategy import"


def _check_bnb() -> str:
    if _version("bitsandbytes") is None:
        raise MissingDependencyError("bitsandbytes is not installed (optional: only for QLoRA bases)")
    problem = bitsandbytes_problem()
    if problem:
        raise InternalError(problem)
    importlib.import_module("bitsandbytes")
    return f"bitsandbytes {_version('bitsandbytes')} imports"


def doctor() -> int:
    """Print what ``python -m sa2va_hooks doctor`` shows. 0: every package within its declared
    range and the core feature works; 1 otherwise (optional features may be missing)."""
    import platform
    import sys

    from . import __version__
    print(f"sa2va_hooks {__version__} (python {platform.python_version()}, {sys.executable})")
    ok = True
    for name, got, spec, within in version_rows():
        mark = "ok" if within else "OUTSIDE the declared range"
        print(f"  {name:<13} {got:<14} {spec:<22} {mark}")
        ok &= within
    for i, (feature, works, how) in enumerate(feature_checks()):
        print(f"  [{'works' if works else 'FAILS'}] {feature}: {how}")
        ok &= works or i > 0  # only the export path itself is required; the rest is optional
    print("doctor: OK" if ok else "doctor: PROBLEMS above")
    return 0 if ok else 1
