"""What several converters need: reading the live HF model and its config, the embedding rows, the
base directory's config.json, remote code. Converters import from here and from ``base``, never from
each other, so a family's file can change without touching another's."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..core.sharding import logical_shape
from .base import ConversionError, SnapshotContext


def _peft_model_class() -> type | tuple:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return ()
    return PeftModel


def is_hf_model(m: object) -> bool:
    from transformers import PreTrainedModel
    return isinstance(m, (PreTrainedModel, _peft_model_class()))


def unwrap_hf(model: nn.Module) -> nn.Module:
    """The PreTrainedModel inside a PeftModel (for its config and class), or the model itself."""
    peft_cls = _peft_model_class()
    return model.get_base_model() if peft_cls and isinstance(model, peft_cls) else model


def embedding_rows(model: nn.Module) -> int | None:
    """Rows of the input embedding, or None for models without one (vision, audio encoders)."""
    try:
        emb = unwrap_hf(model).get_input_embeddings()
    except NotImplementedError:
        return None
    if emb is None:
        return None
    # the logical shape: under ZeRO-3 the live weight is an empty placeholder, and reading it as
    # an attribute would gather it (a collective) on this rank alone; named_parameters does not.
    # A PEFT modules_to_save wrapper holds the weight in its copies, all of one shape.
    weight = next((p for n, p in emb.named_parameters() if n.rsplit(".", 1)[-1] == "weight"), None)
    return None if weight is None else int(logical_shape(weight)[0])


def causal_lm_config(hf_model: nn.Module, ctx: SnapshotContext, prefix: str = ""):
    """The live config with dtype, vocab size and tie flag made true to the exported tensors."""
    inner = unwrap_hf(hf_model)
    cfg = copy.deepcopy(inner.config)
    if ctx.dtype is not None:
        cfg.torch_dtype = ctx.dtype
    rows = embedding_rows(hf_model)
    if rows is not None:
        if getattr(cfg, "vocab_size", rows) != rows:
            ctx.notes.append(f"{prefix}vocab_size set from {cfg.vocab_size} to {rows}, the embedding rows")
        cfg.vocab_size = rows
    cfg.architectures = [type(inner).__name__]
    if getattr(cfg, "quantization_config", None) is not None:
        # the weights are written dequantized; a leftover quantization_config would make
        # from_pretrained treat them as pre-quantized
        del cfg.quantization_config
        ctx.notes.append(f"{prefix}quantization_config removed: the base was dequantized for the export")
    if hasattr(cfg, "_pre_quantization_dtype"):
        del cfg._pre_quantization_dtype
    tied_keys = getattr(inner, "_tied_weights_keys", None) or []
    exported_tied = [k for k in tied_keys if f"{prefix}{k}" in ctx.names]
    if getattr(cfg, "tie_word_embeddings", False) and exported_tied:
        cfg.tie_word_embeddings = False
        ctx.notes.append(f"{prefix}tie_word_embeddings set to False: training made {exported_tied} differ from "
                         "the input embeddings, so both are exported")
    return cfg


def base_config_dict(config: Any, override: str | None = None) -> dict:
    """config.json of the base model directory the live config came from, else the live config."""
    path = Path(override) if override else Path(str(getattr(config, "_name_or_path", "") or "")) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if override:
        raise ConversionError(f"base config {override} does not exist; pass base_config= the config.json of the "
                              "base model directory the run started from.")
    return config.to_dict()


def set_llm_vocab(cfg: dict, rows: int | None, ctx: SnapshotContext, key: str = "llm_config") -> None:
    if rows is None:
        return
    sub = cfg.setdefault(key, {})
    if sub.get("vocab_size") != rows:
        ctx.notes.append(f"{key}.vocab_size set from {sub.get('vocab_size')} to {rows}, the embedding rows")
    sub["vocab_size"] = rows


def copy_remote_code(code_dir: str | Path | None, out_dir: Path, ctx: SnapshotContext, *,
                     required: bool = False) -> None:
    """Copy the remote-code ``.py`` files (not ``__init__.py``) of ``code_dir`` into the snapshot.
    ``required``: the user named the directory, so a missing one, or one with no code, is an error
    (a snapshot whose auto_map names code it lacks cannot load); otherwise, it is a best effort from
    the base model directory."""
    where = Path(code_dir) if code_dir else None
    code = sorted(f for f in where.glob("*.py") if f.name != "__init__.py") if where and where.is_dir() else []
    if required and not code:
        what = "has no .py files" if where and where.is_dir() else "does not exist"
        raise ConversionError(f"hf_code_dir {code_dir} {what}"
                              "; point it at the directory with the model's modeling_*.py and configuration_*.py.")
    for f in code:
        shutil.copy2(f, out_dir / f.name)


# Settings of the machine that trained, not of the model: eager attention on a CPU, flash_attention_2
# on GPUs. Written into config.json they would force the training machine's kernel on every user of
# the snapshot (Sa2VA's own converter writes none).
MACHINE_SETTINGS = ("attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
                    "_attn_implementation_internal")


def strip_machine_settings(cfg: dict, ctx: SnapshotContext, where: str = "") -> None:
    """Remove :data:`MACHINE_SETTINGS` from a config dict and every sub-config in it, with a note."""
    for key in [k for k in cfg if k in MACHINE_SETTINGS]:
        value = cfg.pop(key)
        if value is not None and not key.endswith("_autoset"):
            ctx.notes.append(f"{where}{key}={value!r} (a setting of the training machine) not written")
    for key, sub in cfg.items():
        if isinstance(sub, dict):
            strip_machine_settings(sub, ctx, f"{where}{key}.")
