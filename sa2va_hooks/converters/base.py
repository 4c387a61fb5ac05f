"""Converter base class and registry.

A converter says three things about one model family, declaratively where it can:
- which module to walk (``hf_root``) and whether a model is of its family (``matches``, by
  structure, never by importing the family's code);
- how training-time names become HF names (``key_rules``: ordered ``(regex, replacement)``
  pairs, first match wins, ``None`` = dropped on purpose, plus ``post_rules`` applied to every
  mapped key);
- what else a loadable snapshot needs (``config.json``, tokenizer, remote code).

A key that no rule maps is an error, not a silent drop. A key that transformers would rename
on load (``gamma``/``beta`` -> ``weight``/``bias``) is an error unless a rule maps it away.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, ClassVar, Sequence

from torch import nn

from ..core.export import SnapshotContext  # noqa: F401 - converters take it from here


class _NameRegistry:
    """What this package needs of mmengine's ``Registry`` (register by name, look up, list), for use
    without mmengine: exporting from a plain script, the CLI, the core."""

    def __init__(self, name: str, scope: str | None = None) -> None:
        self.name, self.scope, self.module_dict = name, scope, {}

    def register_module(self, name: str | None = None, module: type | None = None, force: bool = False):
        def register(cls: type) -> type:
            key = name or cls.__name__
            if key in self.module_dict and not force:
                raise KeyError(f"{key} is already registered in {self.name}")
            self.module_dict[key] = cls
            return cls
        return register(module) if module is not None else register

    def get(self, key: str):
        return self.module_dict.get(key)


try:
    from mmengine.registry import Registry
except ModuleNotFoundError:  # mmengine is needed by the hooks only
    Registry = _NameRegistry  # type: ignore[misc,assignment]

CONVERTERS = Registry("sa2va_hooks converter", scope="sa2va_hooks")

# transformers' from_pretrained rewrites any key containing these (modeling_utils'
# legacy fix-up), so the tensor would silently not load under its own name.
LEGACY_RENAMED_SUBSTRINGS = ("gamma", "beta")


class ConversionError(ValueError):
    """The model cannot be mapped to the target layout without losing or inventing weights."""


def set_dtype(cfg: dict, ctx: SnapshotContext, *subs: str) -> None:
    """Declare the export dtype in a config dict and in its named sub-configs, under the key(s) the
    installed transformers reads (``dtype`` from 5, ``torch_dtype`` before) and any the dict already
    has, so that no stale dtype is left beside the new one."""
    if ctx.dtype is None:
        return
    from ..compat import config_dtype_keys
    name = str(ctx.dtype).removeprefix("torch.")
    for d in [cfg, *(cfg.get(sub) for sub in subs)]:
        if isinstance(d, dict):
            for key in config_dtype_keys(d):
                d[key] = name


def _first_rule(key: str, rules: Sequence[tuple[str, str | None]]) -> tuple[bool, str | None]:
    for pattern, repl in rules:
        if re.search(pattern, key):
            return True, (None if repl is None else re.sub(pattern, repl, key, count=1))
    return False, None


class Converter:
    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # "auto" tries converters with a higher priority first
    key_rules: ClassVar[tuple[tuple[str, str | None], ...]] = ((r"^(.*)$", r"\1"),)
    post_rules: ClassVar[tuple[tuple[str, str], ...]] = ()
    # exported names (regexes) of tied parameters to write as copies, because the target class does
    # not tie them again on load (Sa2VA: the outer config unties the inner LLM's lm_head)
    write_tied: ClassVar[tuple[str, ...]] = ()
    # ``module.NAME`` of the dict in the remote code that config.json's ``template`` must be a key of
    template_table: ClassVar[str | None] = None
    # tokens the target's code looks up in the tokenizer (Sa2VA: "[SEG]")
    required_tokens: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    # -- family detection and tree -------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def hf_root(self, model: nn.Module) -> nn.Module:
        return model

    # -- names --------------------------------------------------------------------------
    def map_keys(self, keys: Sequence[str]) -> dict[str, str | None]:
        """Canonical name -> HF name (None: dropped on purpose). Raises listing every bad key."""
        out: dict[str, str | None] = {}
        unmapped, legacy = [], []
        for key in keys:
            hit, new = _first_rule(key, self.key_rules)
            if not hit:
                unmapped.append(key)
                continue
            if new is not None:
                for pattern, repl in self.post_rules:
                    new = re.sub(pattern, repl, new)
                if any(s in new for s in LEGACY_RENAMED_SUBSTRINGS):
                    legacy.append(f"{key} -> {new}")
            out[key] = new
        problems = []
        if unmapped:
            problems.append(f"{len(unmapped)} key(s) match no rule of converter '{self.name}': "
                            f"{_head(unmapped)}. Add a key rule (or register your own converter) so that no "
                            "weight is dropped without a decision.")
        if legacy:
            problems.append(f"{len(legacy)} exported key(s) contain 'gamma' or 'beta', which transformers' "
                            f"from_pretrained silently renames to 'weight'/'bias' on load: {_head(legacy)}. Map them "
                            "with a rule of the family (e.g. '.gamma' -> '.g_weight', with the remote code using "
                            "that name).")
        dup = _duplicates([v for v in out.values() if v is not None])
        if dup:
            problems.append(f"several keys map to the same exported name: {_head(dup)}; fix the converter's rules.")
        if problems:
            raise ConversionError("\n".join(problems))
        return out

    def writes_tied(self, hf_name: str) -> bool:
        return any(re.search(p, hf_name) for p in self.write_tied)

    # -- files beside the weights --------------------------------------------------------
    def hf_config(self, model: nn.Module, ctx: SnapshotContext) -> Any:
        """An object with ``save_pretrained(dir)`` or a plain dict for config.json."""
        raise NotImplementedError

    def save_extras(self, model: nn.Module, out_dir: Path, ctx: SnapshotContext) -> None:
        tok = self.resolve_tokenizer(model)
        if tok is not None:
            tok.save_pretrained(str(out_dir))

    def resolve_tokenizer(self, model: nn.Module) -> Any:
        tok = self.tokenizer if self.tokenizer is not None else getattr(model, "tokenizer", None)
        if isinstance(tok, (str, Path)):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(tok), trust_remote_code=True)
        return tok


def _head(items: Sequence[str], n: int = 20) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" ... and {len(items) - n} more" if len(items) > n else "")


def _duplicates(items: Sequence[str]) -> list[str]:
    seen, dup = set(), []
    for i in items:
        if i in seen:
            dup.append(i)
        seen.add(i)
    return dup


def resolve_converter(spec: Any, model: nn.Module) -> Converter:
    """'auto', a registered name, an mmengine-style dict, or a Converter instance."""
    if isinstance(spec, Converter):
        return spec
    kwargs: dict = {}
    if isinstance(spec, dict):
        kwargs = copy.copy(spec)
        spec = kwargs.pop("type", "auto")
    if isinstance(spec, type) and issubclass(spec, Converter):
        return spec(**kwargs)
    if spec == "auto":
        return detect_converter(model)(**kwargs)
    cls = CONVERTERS.get(spec)
    if cls is None:
        raise KeyError(f"unknown converter {spec!r}; known converters: {', '.join(sorted(CONVERTERS.module_dict))}. "
                       "Register your own with @CONVERTERS.register_module().")
    return cls(**kwargs)


def detect_converter(model: nn.Module) -> type[Converter]:
    ranked = sorted(CONVERTERS.module_dict.values(), key=lambda c: -c.priority)
    for cls in ranked:
        if cls.matches(model):
            return cls
    raise ConversionError(
        f"no converter matches a model of class {type(model).__module__}.{type(model).__qualname__}; "
        f"known converters: {', '.join(sorted(CONVERTERS.module_dict))}. Pass converter=NAME, or register a "
        "converter for this family with @sa2va_hooks.CONVERTERS.register_module().")
