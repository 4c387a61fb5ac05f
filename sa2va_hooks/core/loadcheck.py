"""Does a written snapshot load? Checked without memory or weights, before it is published.

``verify`` proves the files hold what was computed; this proves ``from_pretrained`` will put those
tensors where the model reads them. From the written ``config.json`` (remote code included) the
target class is built with every parameter on the meta device, then:
- its parameter and buffer names and shapes must equal the snapshot's tensors: a tensor the class
  does not have would be dropped on load, and one the class has but the snapshot lacks would keep
  its random initialisation (unless loading ties it to a tensor that is present, which is checked
  the way ``from_pretrained`` does it: fresh tensors for the loaded keys, then ``tie_weights()``);
- ``model_type`` must be the one of the config class ``auto_map`` names;
- a ``template`` must be one the remote code knows (the converter names the table);
- the tokenizer, if any, must fit the embedding and hold the tokens the converter requires.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from .manifest import MANIFEST_FILE
from .vocab import INDEX_FILE
from .errors import MismatchError

_AUTO_MODEL_KEYS = ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForVision2Seq")


class SnapshotLoadError(MismatchError, RuntimeError):
    """The snapshot's config and code would not load its tensors as they were written."""


def check_snapshot_loads(snapshot: str | Path, tensors: Mapping[str, Mapping], *,
                         template_table: str | None = None, required_tokens: Sequence[str] = (),
                         label: str | Path | None = None) -> dict:
    """Raise :class:`SnapshotLoadError` listing every way ``snapshot`` would not load ``tensors``
    (name -> manifest entry with ``shape`` and ``digest``, as written). Returns what was checked.
    ``label`` is the name to report (the final name of a snapshot checked in its staging directory)."""
    snapshot, where_written = Path(label or snapshot), Path(snapshot)
    shapes = {n: list(t["shape"]) for n, t in tensors.items()}
    digests = {n: t.get("digest") for n, t in tensors.items()}
    with _importable_copy(where_written) as where:
        config = _load_config(where, snapshot)
        problems = _model_type_problems(config, where)
        problems += _template_problems(config, where, template_table)
        if problems:  # the model's own code would fail on them first, with a bare KeyError
            raise _load_error(snapshot, "its config.json", problems)
        cls = _model_class(config, where, snapshot)
        expected = getattr(cls, "config_class", None)
        # by name too: transformers 5 may import a remote config module twice (for AutoConfig and for the
        # model's relative import), which gives two class objects for one class
        if isinstance(expected, type) and not isinstance(config, expected) \
                and type(config).__qualname__ != expected.__qualname__:
            raise _load_error(snapshot, "its config.json", [
                f"model_type {getattr(config, 'model_type', None)!r} makes AutoConfig read config.json as "
                f"{type(config).__name__}, but {cls.__name__} takes a {expected.__name__}: the Auto classes "
                "would build another model than the one the tensors were written for"])
        model = _build_on_meta(cls, config, snapshot)
        renamed = _load_time_names(cls, shapes)
        shapes = {renamed[n]: s for n, s in shapes.items()}
        digests = {renamed[n]: d for n, d in digests.items()}
        problems += _tensor_problems(model, shapes, digests)
        problems += _tokenizer_problems(model, config, where, required_tokens)
    if problems:
        raise _load_error(snapshot, f"{cls.__name__} built from its config.json", problems)
    return {"class": f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}", "tensors": len(shapes),
            "template_table": template_table, "required_tokens": list(required_tokens)}


def _load_error(snapshot: Path, what: str, problems: list[str]) -> SnapshotLoadError:
    shown = "\n".join(f"- {p}" for p in problems[:30])
    more = f"\n- ... and {len(problems) - 30} more" if len(problems) > 30 else ""
    return SnapshotLoadError(f"{snapshot} would not load as written ({what}):\n{shown}{more}\n"
                             "Nothing was published. Make the written config build the class the tensors were written "
                             "for: the converter's key rules, template= or model_type=, or its remote code "
                             "(hf_code_dir). `sa2va-hooks verify DIR --load` runs this check on a snapshot.")


@contextlib.contextmanager
def _importable_copy(snapshot: Path) -> Iterator[Path]:
    """The snapshot's small files in a directory whose name is an importable module name.
    transformers imports remote code under the directory's name; a staging name such as
    ``iter_6.incomplete-1a2b`` is not one. The name comes from the code's hash, so the same code
    is imported once per process however many exports there are."""
    small = [f for f in sorted(snapshot.iterdir()) if f.is_file() and f.name not in (MANIFEST_FILE, INDEX_FILE)
             and not f.name.endswith(".safetensors")]
    code = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in small if f.suffix == ".py"))
    tmp = Path(tempfile.mkdtemp(prefix="sa2va_hooks_loadcheck_"))
    where = tmp / f"sa2va_check_{code.hexdigest()[:16]}"
    try:
        where.mkdir()
        for f in small:
            shutil.copyfile(f, where / f.name)
        yield where
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_config(where: Path, snapshot: Path):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(where), trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the config is this one problem
        raise SnapshotLoadError(f"{snapshot / 'config.json'} does not load with AutoConfig.from_pretrained"
                                f"(trust_remote_code=True): {type(e).__name__}: {e}") from e


def _model_type_problems(config, snapshot: Path) -> list[str]:
    declared = getattr(type(config), "model_type", "") or ""
    written = _config_json(snapshot).get("model_type")
    if declared and written != declared:
        return [f"config.json model_type is {written!r}, but its config class {type(config).__name__} is "
                f"{declared!r}: transformers would warn and may build the wrong model"]
    return []


def _config_json(snapshot: Path) -> dict:
    return json.loads((snapshot / "config.json").read_text())


def _template_problems(config, where: Path, table: str | None) -> list[str]:
    """``table`` is ``module.NAME`` of the dict in the remote code that the model looks its template
    up in (Sa2VA: ``templates.PROMPT_TEMPLATE``, keyed with '-' read as '_')."""
    if not table:
        return []
    module, attr = table.rsplit(".", 1)
    if not (where / f"{module}.py").is_file():
        return [f"the remote code has no {module}.py, where the templates ({table}) are looked up"]
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    known = get_class_from_dynamic_module(table, str(where))
    name = getattr(config, "template", None)
    if not isinstance(name, str) or (name not in known and name.replace("-", "_") not in known):
        return [f"template {name!r} is not one the remote code knows ({table}): {', '.join(sorted(known))}. "
                "Pass the template the model was trained with, e.g. converter=dict(type=..., template=NAME)"]
    return []


def _model_class(config, where: Path, snapshot: Path) -> type:
    auto_map = getattr(config, "auto_map", None) or {}
    ref = next((auto_map[k] for k in _AUTO_MODEL_KEYS if k in auto_map), None)
    if ref is not None:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        try:
            return get_class_from_dynamic_module(ref, str(where))
        except Exception as e:  # noqa: BLE001 - missing or broken remote code is this one problem
            raise SnapshotLoadError(f"{snapshot}: auto_map names {ref}, which does not import from the snapshot's "
                                    f"remote code: {type(e).__name__}: {e}") from e
    import transformers
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise SnapshotLoadError(f"{snapshot / 'config.json'}: neither auto_map nor architectures ({arch!r}) names a "
                                "model class this transformers has; from_pretrained could not build it")
    return cls


_ON_META = threading.local()  # set in the thread that builds a model for the check, and only there
_PATCH_LOCK = threading.Lock()
_patched_users = 0
_register_parameter = nn.Module.register_parameter


def _register_maybe_on_meta(module: nn.Module, name: str, param) -> None:
    _register_parameter(module, name, param)
    if getattr(_ON_META, "active", False) and param is not None and param.device.type != "meta":
        module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter this thread creates inside goes to the meta device as it is registered (so
    nothing is allocated or initialised), while other tensors stay real: model code that computes
    on the CPU in ``__init__`` (``torch.linspace(...).item()`` in InternViT) still works. Other
    threads are untouched: the check runs in the export thread while training (FSDP's parameter
    write-back, for one) registers parameters in its own."""
    global _patched_users
    with _PATCH_LOCK:
        if _patched_users == 0:
            nn.Module.register_parameter = _register_maybe_on_meta
        _patched_users += 1
    _ON_META.active = True
    try:
        yield
    finally:
        _ON_META.active = False
        with _PATCH_LOCK:
            _patched_users -= 1
            if _patched_users == 0:
                nn.Module.register_parameter = _register_parameter


_ZERO3_OFF = threading.local()


def _install_thread_aware_zero3_check() -> None:
    """transformers' ``_from_config`` (which a model's ``__init__`` may call for its parts: Qwen2.5-VL's
    vision tower and language model) enters ``deepspeed.zero.Init`` whenever a ZeRO-3 run registered
    its config; that collective partitioning cannot run on one rank, on meta tensors. In the checking
    thread only, the check then says "not ZeRO-3"; every other thread (training) gets the real answer.
    Installed once, idempotent; it wraps the names ``modeling_utils`` and the deepspeed integration use."""
    try:
        from transformers import modeling_utils
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers without the integration
        return
    for module in (modeling_utils, hf_ds):
        real = getattr(module, "is_deepspeed_zero3_enabled", None)
        if real is None or getattr(real, "_sa2va_thread_aware", False):
            continue

        def thread_aware(real=real) -> bool:
            return False if getattr(_ZERO3_OFF, "active", False) else real()

        thread_aware._sa2va_thread_aware = True  # type: ignore[attr-defined]
        module.is_deepspeed_zero3_enabled = thread_aware


@contextlib.contextmanager
def _zero3_off_in_this_thread() -> Iterator[None]:
    with _PATCH_LOCK:
        _install_thread_aware_zero3_check()
    _ZERO3_OFF.active = True
    try:
        yield
    finally:
        _ZERO3_OFF.active = False


def _build_on_meta(cls: type, config, snapshot: Path) -> nn.Module:
    try:
        with _parameters_on_meta(), _zero3_off_in_this_thread():
            # the class itself, not _from_config: that one enters deepspeed.zero.Init when a ZeRO-3 run
            # registered its config with transformers, and this runs on one rank only
            model = cls(config)
    except Exception as e:  # noqa: BLE001 - the class not building from the config is this one problem
        raise SnapshotLoadError(f"{cls.__name__} does not build from {snapshot / 'config.json'}: "
                                f"{type(e).__name__}: {e}") from e
    return model.eval()


def _load_time_names(cls: type, names: Mapping[str, object]) -> dict[str, str]:
    """Written name -> the name ``from_pretrained`` loads it under. transformers 4.5x renames the
    keys of vision-language classes on load (``cls._checkpoint_conversion_mapping``, for the class
    names in ``modeling_utils.VLMS``: LLaVA's ``language_model.model.*`` becomes
    ``model.language_model.*``) and writes them back in the old layout on save; first matching
    pattern wins, as there."""
    import re

    from transformers import modeling_utils
    vlms = getattr(modeling_utils, "VLMS", ())
    mapping = getattr(cls, "_checkpoint_conversion_mapping", None) or {}
    if not mapping or not any(v in c.__name__.lower() for c in cls.__mro__[:-1] for v in vlms):
        return {n: n for n in names}
    out = {}
    for name in names:
        new = name
        for pattern, repl in mapping.items():
            new, hits = re.subn(pattern, repl, name)
            if hits:
                break
        out[name] = new
    return out


def _tensor_problems(model: nn.Module, shapes: Mapping[str, list], digests: Mapping[str, str]) -> list[str]:
    own = model.state_dict(keep_vars=True)
    problems = [f"{n}: the snapshot has it, but {type(model).__name__} has no such parameter or buffer, so "
                "from_pretrained would drop it" for n in sorted(set(shapes) - set(own))]
    problems += [f"{n}: written as {shapes[n]}, but the class expects {list(own[n].shape)}"
                 for n in sorted(set(shapes) & set(own)) if list(own[n].shape) != shapes[n]]
    loaded = sorted(set(shapes) & set(own))
    fresh = _load_and_tie(model, loaded)
    problems += [f"{n}: the class has it, the snapshot does not, and loading does not tie it to a written "
                 "tensor, so it would keep its random initialisation"
                 for n in sorted(set(own) - set(shapes)) if id(_param(model, n)) not in fresh]
    for n in loaded:
        twin = fresh.get(id(_param(model, n)), n)
        if twin != n and digests.get(n) != digests.get(twin):
            problems.append(f"{n}: written apart from {twin}, but the config ties them, so loading would replace it")
    return problems


def _load_and_tie(model: nn.Module, loaded: list[str]) -> dict[int, str]:
    """As from_pretrained does it: every loaded parameter gets a new tensor, then ``tie_weights()``.
    Returns id(new tensor) -> the name it was loaded under; a name whose parameter is afterwards
    another name's tensor was tied to it (and its own file tensor overwritten or never read)."""
    fresh: dict[int, str] = {}
    for name in loaded:
        module, leaf = _owner(model, name)
        old = module._parameters.get(leaf)
        if old is not None:
            new = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False)
            module._parameters[leaf] = new
            fresh[id(new)] = name
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return fresh


def _param(model: nn.Module, name: str):
    module, leaf = _owner(model, name)
    return module._parameters.get(leaf)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def _tokenizer_problems(model: nn.Module, config, where: Path, required: Sequence[str]) -> list[str]:
    if not (where / "tokenizer_config.json").is_file():
        return []
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(where), trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - an unloadable tokenizer is this one problem
        return [f"the tokenizer does not load with AutoTokenizer.from_pretrained: {type(e).__name__}: {e}"]
    problems = []
    rows = _embedding_rows(model, config)
    if rows is not None and len(tok) > rows:
        problems.append(f"the tokenizer has {len(tok)} tokens but the input embedding has {rows} rows: the ids "
                        f"{rows}..{len(tok) - 1} would index past it")
    vocab = tok.get_vocab()
    absent = [t for t in required if t not in vocab]
    if absent:
        problems.append(f"the tokenizer lacks {absent}, which the model's code looks up")
    return problems


def _embedding_rows(model: nn.Module, config) -> int | None:
    try:
        emb = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    for sub in ("llm_config", "text_config"):
        inner = getattr(config, sub, None)
        size = inner.get("vocab_size") if isinstance(inner, dict) else getattr(inner, "vocab_size", None)
        if size:
            return int(size)
    return getattr(config, "vocab_size", None)
