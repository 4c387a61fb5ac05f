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

from ..core.plan import SnapshotContext  # noqa: F401 - converters take it from here
from ..core.errors import BadInputError, DuplicateRegistrationError, UnknownConverterError


class _NameRegistry:
    """What this package needs of mmengine's ``Registry`` (register by name, look up, list), for use
    without mmengine: exporting from a plain script, the CLI, the core."""

    def __init__(self, name: str, scope: str | None = None) -> None:
        self.name, self.scope, self.module_dict = name, scope, {}

    def register_module(self, name: str | None = None, module: type | None = None, force: bool = False):
        def register(cls: type) -> type:
            key = name or cls.__name__
            if key in self.module_dict and not force:
                raise DuplicateRegistrationError(f"{key} is already registered in {self.name}")
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


class ConversionError(BadInputError, ValueError):
    """The model cannot be mapped to the target layout without losing or inventing weights."""


def written_dtype(ctx: SnapshotContext) -> Any:
    """The dtype the floating tensors have in the files: the export's ``dtype``, or, when tensors are
    kept as in memory, theirs. Where they differ, the widest (loading with ``torch_dtype="auto"``
    then loses nothing), with a note naming the mix."""
    if ctx.dtype is not None:
        return ctx.dtype
    floating = {d for d in ctx.file_dtypes.values() if d.is_floating_point}
    if len(floating) > 1:
        kept = sorted(str(d).removeprefix("torch.") for d in floating)
        ctx.notes.append(f"the tensors are kept as in memory, in {kept}; config.json declares the widest")
    return max(floating, key=lambda d: d.itemsize) if floating else None


def set_dtype(cfg: dict, ctx: SnapshotContext, *subs: str) -> None:
    """Declare the dtype of the written tensors (:func:`written_dtype`) in a config dict and in its
    named sub-configs, under the key(s) the installed transformers reads (``dtype`` from 5,
    ``torch_dtype`` before) and any the dict already has, so that no stale dtype is left beside the
    new one: a base config's ``bfloat16`` over float32 files would be a lie."""
    dtype = written_dtype(ctx)
    if dtype is None:
        return
    from ..compat import config_dtype_keys
    name = str(dtype).removeprefix("torch.")
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
        self.tokenizer = tokenizer  # what the user passed: it wins
        self.run_tokenizer: Any = None  # the training config's top-level tokenizer: the last resort
        self.run_template: str | None = None
        self._resolved: dict[int, Any] = {}
        self._ready_for: int | None = None  # id of the model check_ready last passed for

    def use_run_config(self, *, template: Any = None, tokenizer: Any = None) -> None:
        """Defaults from the training config (the hook's ``runner.cfg``, ``tools/export.py``'s CONFIG):
        its top-level ``template`` (a name) and ``tokenizer`` (an object, a path, or a callable that
        builds it when it is needed). What the user passed to the converter wins, then what the model
        holds, then these: a config's top-level tokenizer is often the *base* one, without the tokens
        the model added (Sa2VA's ``[SEG]``)."""
        self.run_template = template if isinstance(template, str) else None
        self.run_tokenizer = tokenizer

    def describe(self, model: nn.Module) -> str:
        """One line for the log at the start of a run: what this converter will write."""
        tok, source = self.find_tokenizer(model)
        return f"{self.name}; tokenizer: {source if tok is not None else 'none'}"

    def ensure_ready(self, model: nn.Module) -> None:
        """:meth:`check_ready` once per model: the pipeline calls this at every export, in the training
        thread, and what it checks (code, template, tokenizer) does not change during a run; reading a
        real tokenizer's vocabulary at every checkpoint would be work on training's hot path."""
        if self._ready_for != id(model):
            self.check_ready(model)
            self._ready_for = id(model)

    def check_ready(self, model: nn.Module) -> None:
        """Raise :class:`ConversionError` for anything that would make the export fail or unusable and
        can be told before a byte is written (the hook calls it in ``before_train``). Here: the
        tokenizer holds the tokens the target's code looks up."""
        problems = self.tokenizer_problems(model)
        if problems:
            raise ConversionError("\n".join(problems))

    def tokenizer_problems(self, model: nn.Module) -> list[str]:
        if not self.required_tokens:
            return []
        tok, source = self.find_tokenizer(model)
        if tok is None:
            return [f"converter '{self.name}' needs a tokenizer holding {list(self.required_tokens)}, and none was "
                    "found: the model has none and none was given. Pass tokenizer=PATH_OR_OBJECT to HFExportHook "
                    "(or --cfg-options to tools/export.py)."]
        vocab = tok.get_vocab()
        absent = [t for t in self.required_tokens if t not in vocab]
        if not absent:
            return []
        advice = ("remove tokenizer= from HFExportHook so that the model's own tokenizer is used, or pass one "
                  "that has them" if source == "given" and self.model_tokenizer(model) is not None else
                  "pass tokenizer= (HFExportHook(tokenizer=...), or converter=dict(type=..., tokenizer=...)) the "
                  "tokenizer the model was trained with, the one with the added tokens")
        return [f"the tokenizer ({source}) lacks {absent}, which the model's code looks up; {advice}."]

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
        return self.find_tokenizer(model)[0]

    def model_tokenizer(self, model: nn.Module) -> Any:
        """The tokenizer the training model holds (families override where it lives)."""
        return getattr(model, "tokenizer", None)

    def find_tokenizer(self, model: nn.Module) -> tuple[Any, str]:
        """(tokenizer, where it came from): the one given to the converter, else the model's own,
        else the training config's top-level one. Paths and builders are resolved once."""
        for source, tok in (("given", self.tokenizer), ("the model's", self.model_tokenizer(model)),
                            ("the config's top-level", self.run_tokenizer)):
            if tok is not None:
                return self._materialise(tok), source
        return None, "none"

    def _materialise(self, tok: Any) -> Any:
        if id(tok) not in self._resolved:
            obj = tok
            if isinstance(tok, (str, Path)):
                from transformers import AutoTokenizer
                obj = AutoTokenizer.from_pretrained(str(tok), trust_remote_code=True)
            elif callable(tok) and not hasattr(tok, "get_vocab"):
                obj = tok()
            self._resolved[id(tok)] = obj
        return self._resolved[id(tok)]


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
        raise UnknownConverterError(f"unknown converter {spec!r}; known converters: "
                                    f"{', '.join(sorted(CONVERTERS.module_dict))}. "
                                    "Register your own with @CONVERTERS.register_module().")
    return cls(**kwargs)


def converter_for_run(spec: Any, model: nn.Module, *, template: Any = None, tokenizer: Any = None) -> Converter:
    """The converter of a training run, checked before anything is written: resolved against the
    model, given the run config's defaults (its top-level ``template`` and ``tokenizer``, see
    :meth:`Converter.use_run_config`), then :meth:`Converter.check_ready`. The hook calls it in
    ``before_train`` and ``tools/export.py`` right after building the model, so a missing
    ``hf_code_dir``, an unknown template or a tokenizer without ``[SEG]`` is refused before
    training starts or any tensor is merged."""
    conv = resolve_converter(spec, model)
    conv.use_run_config(template=template, tokenizer=tokenizer)
    conv.ensure_ready(model)
    return conv


def detect_converter(model: nn.Module) -> type[Converter]:
    ranked = sorted(CONVERTERS.module_dict.values(), key=lambda c: -c.priority)
    for cls in ranked:
        if cls.matches(model):
            return cls
    raise ConversionError(
        f"no converter matches a model of class {type(model).__module__}.{type(model).__qualname__}; "
        f"known converters: {', '.join(sorted(CONVERTERS.module_dict))}. Pass converter=NAME, or register a "
        "converter for this family with @sa2va_hooks.CONVERTERS.register_module().")
